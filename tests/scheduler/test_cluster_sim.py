"""The cluster simulator runs the production policies, is deterministic, and its costs behave."""

from __future__ import annotations

import ast
import inspect
import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.cluster_sim import engine_model as em
from benchmarks.cluster_sim.profile import PROFILES_DIR, load_profile
from benchmarks.cluster_sim.runner import RunSpec, run_once
from benchmarks.cluster_sim.systems import SYSTEMS, Planned, make_system
from benchmarks.cluster_sim.workload import WorkloadSpec, trace_shape
from controlplane.scheduler import placement, routing

pytestmark = pytest.mark.unit

SIM_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "cluster_sim"


def test_simulator_calls_the_production_policies():
    lf = make_system("lorafaas")
    ro = make_system("rank-oblivious")
    assert isinstance(lf, Planned) and isinstance(ro, Planned)
    assert lf.plan_fn is placement.plan and lf.route_fn is routing.choose_worker
    assert ro.plan_fn is placement.rank_oblivious_plan and ro.route_fn is routing.least_loaded


def test_simulator_carries_no_copy_of_a_policy():
    """No function of the simulator shares a name with a policy function of controlplane.scheduler."""
    policy_names = {
        name
        for module in (placement, routing)
        for name, obj in vars(module).items()
        if inspect.isfunction(obj) and obj.__module__ == module.__name__
    }
    assert {"plan", "rank_oblivious_plan", "choose_worker", "least_loaded"} <= policy_names
    for path in SIM_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert not (defined & policy_names), f"{path.name} defines {defined & policy_names}"


def _spec(functions: int = 40) -> RunSpec:
    profile = load_profile("gpu-h100-7b")
    shape = trace_shape(None, seed=3, poisson_requests=3000)
    return RunSpec(profile, shape, WorkloadSpec(functions=functions, seed=3), duration_s=12.0, warmup_s=2.0)


def test_runs_are_deterministic_and_serve_a_light_load():
    spec = _spec()
    a = run_once(spec, "lorafaas", 4, 4.0)
    b = run_once(spec, "lorafaas", 4, 4.0)
    for key in ("ttft_p50_s", "ttft_p99_s", "adapter_loads", "spills", "moves", "tokens_per_s"):
        assert a[key] == b[key]
    assert a["completed"] == a["requests"] > 20
    assert a["ttft_p99_s"] < spec.profile.ttft_slo_s


def test_every_system_runs_and_affinity_loads_fewer_adapters_than_a_shared_queue():
    spec = _spec()
    results = {s: run_once(spec, s, 4, 6.0) for s in SYSTEMS}
    for name, r in results.items():
        assert r["requests"] > 0, name
    assert results["dedicated"]["cold_starts"] > 0
    assert results["lorafaas"]["request_path_loads"] < results["shared-queue"]["request_path_loads"]


def test_padded_kernels_charge_the_largest_rank():
    base = load_profile("gpu-h100-7b")
    p = type(base)(**{**base.__dict__, "decode_per_group_s": 0.0, "decode_per_row_rank_s": 1e-6})
    ranks = [8, 128]
    rows = Counter({0: 8, 1: 8})
    grouped = em.decode_s(p, rows, 16, ranks, 1000)
    padded = em.decode_s(type(p)(**{**p.__dict__, "rank_mode": "padded"}), rows, 16, ranks, 1000)
    assert padded > grouped  # every row pays rank 128
    assert em.decode_s(p, Counter({0: 16}), 16, ranks, 1000) < grouped  # rank 8 alone costs less
    # With a launch cost per rank group, two ranks in one batch cost one group more than one rank.
    assert em.decode_s(base, rows, 16, ranks, 1000) > em.decode_s(base, Counter({0: 8, 2: 8}), 16, [8, 128, 8], 1000)


def test_every_profile_term_has_a_source(tmp_path):
    for path in PROFILES_DIR.glob("*.json"):
        load_profile(path)  # raises on a term without a source
    raw = json.loads((PROFILES_DIR / "gpu-h100-7b.json").read_text())
    del raw["sources"]["decode_base_s"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="decode_base_s"):
        load_profile(bad)
