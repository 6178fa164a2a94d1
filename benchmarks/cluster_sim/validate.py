"""Does the simulator predict a live run? The 3-worker trace replay, measured and simulated.

    python -m benchmarks.cluster_sim.validate --out benchmarks/results/cluster_sim_validate.json

1. Live: the replay of ``benchmarks/replay.py --systems lorafaas --workers 3 --shape tiny`` (same
   slice, seed, functions, ranks, pool and scheduler) through the real stack: HTTP streaming
   client, gateway, NATS, Postgres, S3, the control plane's scheduler and 3 worker processes.
2. Probes, on the same stack: requests sent one at a time (nothing else in flight), every
   function in turn, each after a seeded random pause, with prompt lengths drawn from the
   replay's. Half of the rounds run before the replay and half after it: the machine's load
   drifts over a minute, and probes on one side only calibrated the replay to a machine it did
   not run on. Before them, the replay's warm-up (one short request per function, not measured,
   as in ``benchmarks/replay.py``) pays the stack's first-use costs. What the serving path adds
   beyond the engine is calibrated from the probes and the profile: ``step_overhead_s`` =
   median(probe gap between tokens - predicted decode step of one row), and each probe's delay
   before its first token (TTFT - predicted prefill - step overhead); the simulation draws every
   request's delay from those (``request_overhead_s`` is their median). The probes are not the
   replay's requests: the replay's queueing, batching and placement are predicted, not fitted.
3. Simulated: the same requests (arrival, function, prompt and generated token counts as the
   live run tokenised and generated them), the same ranks, pool pages, max batch, spill threshold
   and placement config, the production policies (``placement.plan``, ``routing.choose_worker``)
   with the live loop's demand source (``ReportedDemand``), on the profile plus the two terms.

Prints predicted against measured TTFT p50/p99 and throughput (output tokens / wall, as the
replay computes it) with the relative error, and fails (exit 1) when TTFT p50 or throughput is
off by more than ``--bound`` (default 25%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.replay import (
    ROOT,
    RequestRecord,
    adapter_sizes,
    build_models,
    memory_for,
    pct,
    replay_system,
    scaled_trace,
    stream_completion,
    warm_up,
)
from benchmarks.replay_systems import FunctionSpec, ReplaySetup, System, make_system
from benchmarks.trace_args import add_function_args, add_scaling_args, add_slice_args
from controlplane.scheduler.model import PlacementConfig
from gpuworker.subscriptions import FETCH_TIMEOUT_S
from launcher import trace
from launcher.devstack import DevStack
from lorafaas.settings import S3Settings, Settings

from . import engine_model as em
from .profile import Profile, load_profile
from .sim import Sim
from .systems import PlannerSettings
from .systems import make_system as make_sim_system
from .workload import Workload

console = Console(stderr=True)
GATED = ("ttft_p50_s", "throughput_tokens_per_s")  # held to --bound; TTFT p99 is reported only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--profile", default="cpu-this-machine")
    add_slice_args(p, duration=20.0)
    add_scaling_args(p)
    add_function_args(p, functions=10)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--pool-fraction", type=float, default=0.5)
    p.add_argument("--probes", type=int, default=3, help="probe rounds (each sends one request per function)")
    p.add_argument("--probe-output", type=int, default=8)
    p.add_argument("--bound", type=float, default=0.25, help="allowed relative error on TTFT p50 and throughput")
    p.add_argument("--measured", type=Path, default=None, help="reuse the live part of an earlier --out JSON")
    p.add_argument("--workdir", type=Path, default=ROOT / ".lorafaas" / "validate")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


# --- live --------------------------------------------------------------------------------------
async def probe(
    system: System, functions: list[FunctionSpec], prompts: list[int], rounds: range, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One request at a time, each function in turn: the serving path's latency with no queueing.

    A seeded random pause (up to one pull window) before each probe: back-to-back probes would
    meet every worker's pull window at the same point each time, and the mean wait would not be
    half a window. Each prompt's length is drawn from the replay's (``prompts``): on a loaded
    machine the engine's prefill slows as much as the serving path does, and short probes alone
    calibrated none of that."""
    out = []
    rng = random.Random(args.seed + rounds.start)
    headers = {"Authorization": f"Bearer {system.api_key}"}
    async with httpx.AsyncClient(base_url=system.url, headers=headers, timeout=120) as client:
        for round_ in rounds:
            for i, fn in enumerate(functions):
                await asyncio.sleep(rng.uniform(0.0, FETCH_TIMEOUT_S))
                length = rng.choice(prompts)
                rec = RequestRecord(10_000 + i, i, 0.0, length, args.probe_output)
                rec.sent = time.perf_counter()
                prompt = trace.synthetic_prompt(length, 1_000_000 + 100 * round_ + i)
                await stream_completion(client, fn.name, prompt, rec)
                out.append(rec.as_json() | {"rank": fn.rank, "gaps_s": rec.gaps})
    return out


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The replay's lorafaas run with the scheduler, between two halves of the probes, on one stack."""
    scale, requests, ranks = scaled_trace(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    backbone, adapter_dirs = await asyncio.to_thread(build_models, args.workdir, args.shape, ranks)
    functions = [FunctionSpec(f"f{i:02d}-r{rank}", rank, d) for i, (rank, d) in enumerate(zip(ranks, adapter_dirs))]
    pool_pages, _ = memory_for(adapter_sizes(backbone, adapter_dirs), args.pool_fraction, 0.0)
    setup = ReplaySetup(backbone, functions, workers=args.workers, pool_pages=pool_pages)
    base = Settings(s3=S3Settings(endpoint="127.0.0.1:9000", bucket="lorafaas-bench"))
    with DevStack(base, args.workdir / "stack"):
        system = make_system("lorafaas", base, setup, args.workdir)
        try:
            await system.start()
            await warm_up(system, functions, 1, args.seed)
            before = args.probes // 2
            prompts = [r.prompt_tokens for r in requests]
            probes = await probe(system, functions, prompts, range(before), args)
            await asyncio.sleep(1.5)  # as replay.py: the control plane applies the warm-up's reports
            records, _, _ = await replay_system(system, requests, functions, args.seed)
            await asyncio.sleep(1.0)
            probes += await probe(system, functions, prompts, range(before, args.probes), args)
        finally:
            await system.stop()
    return {
        "trace": trace.describe(args.trace, scale, requests),
        "function_ranks": ranks,
        "pool_pages": setup.pool_pages,
        "max_batch": setup.max_batch,
        "scheduler": base.scheduler.model_dump(),
        "records": [r.as_json() for r in records],
        "probes": probes,
    }


# --- summary of either side ---------------------------------------------------------------------
def summarize(ttft: list[float], output_tokens: int, first_sent: float, last_done: float) -> dict[str, float]:
    """As ``benchmarks/replay.py`` computes them: its percentile, output tokens over the wall."""
    return {
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "throughput_tokens_per_s": output_tokens / max(1e-9, last_done - first_sent),
    }


def measured_summary(live: dict[str, Any]) -> dict[str, float]:
    ok = [r for r in live["records"] if r["ok"]]
    return summarize(
        [r["ttft_s"] for r in ok],
        sum(r["output_tokens"] for r in ok),
        min(r["sent"] for r in ok),
        max(r["done"] for r in ok),
    ) | {"completed": len(ok), "failed": len(live["records"]) - len(ok)}


# --- calibration of the serving path, and the simulation -----------------------------------------
def overhead_terms(profile: Profile, live: dict[str, Any]) -> dict[str, Any]:
    """The serving path's cost from the probes: the worker's per-step overhead, and the delay each
    probe saw before its first token beyond the engine (its measured distribution, not one
    number: it is bimodal here, see docs/benchmarks.md), each with its source."""
    ok = [r for r in live["probes"] if r["ok"] and r["output_tokens"] > 0]
    if not ok:
        raise RuntimeError("no probe request succeeded: cannot calibrate the serving path")
    gaps = [g - em.decode_s(profile, {0: 1}, 1, [r["rank"]], r["prompt_tokens"]) for r in ok for g in r["gaps_s"]]
    step = max(0.0, statistics.median(gaps)) if gaps else 0.0
    delays = [max(0.0, r["ttft_s"] - em.prefill_s(profile, r["prompt_tokens"], r["rank"]) - step) for r in ok]
    return {
        "step_overhead_s": step,
        "request_delays_s": sorted(delays),
        "request_overhead_s": statistics.median(delays),
        "sources": {
            "request_overhead_s": f"median of request_delays_s: {len(ok)} probe requests (one at a time, half "
            "before and half after the replay, same stack, each after a random pause) of client TTFT - the "
            "profile's prefill time - step_overhead_s: gateway, NATS, the worker's pull and HTTP streaming; the "
            "simulation draws each request's delay from all of them (seeded)",
            "step_overhead_s": f"median over {len(gaps)} probe token gaps of (gap - the profile's decode step of "
            "one row): the worker's per-step thread hop and token publishing",
        },
    }


def simulate(
    profile: Profile, live: dict[str, Any], workers: int, seed: int, delays: list[float] | None = None
) -> dict[str, Any]:
    recs = [r for r in live["records"] if r["ok"]]
    order = sorted(range(len(recs)), key=lambda i: recs[i]["arrival_s"])
    recs = [recs[i] for i in order]
    ranks = list(live["function_ranks"])
    wl = Workload(
        arrival_s=np.array([r["arrival_s"] for r in recs], dtype=float),
        prompt=np.array([max(1, r["prompt_tokens"]) for r in recs], dtype=int),
        output=np.array([max(1, r["output_tokens"]) for r in recs], dtype=int),
        function=np.array([r["function"] for r in recs], dtype=int),
        ranks=ranks,
        description=live["trace"],
    )
    sched = live["scheduler"]
    settings = PlannerSettings(
        plan_period_s=sched["interval_s"],
        spill_threshold=sched["spill_threshold"],
        config=PlacementConfig(contended_queue=sched["contended_queue"], saturated_queue=sched["saturated_queue"]),
        live_loop=True,
    )
    duration = float(wl.arrival_s.max()) + 1e-6 if len(recs) else 0.0
    sim = Sim(profile, wl, workers, make_sim_system("lorafaas", settings), duration, 0.0, seed, delays)
    sim.run(drain_s=600.0)
    served = [r for r in sim.reqs if r.done >= 0]
    summary = summarize(
        [r.first - r.arrival for r in served],
        sum(r.output for r in served),
        min(r.arrival for r in sim.reqs),
        max(r.done for r in served),
    )
    res = sim.results()
    return summary | {
        "completed": len(served),
        "adapter_loads": res["adapter_loads"],
        "request_path_loads": res["request_path_loads"],
        "spills": res["spills"],
        "fetches": res["fetches"],
    }


def compare(measured: dict[str, float], predicted: dict[str, float]) -> dict[str, float]:
    keys = ("ttft_p50_s", "ttft_p99_s", "throughput_tokens_per_s")
    return {k: (predicted[k] - measured[k]) / measured[k] for k in keys if measured[k]}


def report(out: dict[str, Any], bound: float) -> None:
    t = Table(title=f"simulator ({out['profile']}) against the live {out['workers']}-worker replay")
    for col in ("metric", "measured", "predicted", "error", "bound"):
        t.add_column(col, justify="right")
    for k, err in out["error"].items():
        gated = k in GATED
        t.add_row(
            k,
            f"{out['measured'][k]:.4g}",
            f"{out['predicted'][k]:.4g}",
            f"{err:+.1%}",
            f"±{bound:.0%}" if gated else "(reported)",
        )
    console.print(t)
    terms = out["serving_path"]
    d = terms["request_delays_s"]
    console.print(
        f"serving path from {len(d)} probes: delay before the first token min {d[0] * 1e3:.0f} / median "
        f"{terms['request_overhead_s'] * 1e3:.0f} / max {d[-1] * 1e3:.0f} ms, step overhead "
        f"{terms['step_overhead_s'] * 1e3:.2f} ms; within bound: {out['within_bound']}"
    )


def validate(args: argparse.Namespace, live: dict[str, Any]) -> dict[str, Any]:
    base = load_profile(args.profile)
    terms = overhead_terms(base, live)
    sources = dict(base.sources) | terms["sources"]
    profile = replace(
        base,
        pool_bytes=live["pool_pages"] * base.page_bytes,
        max_batch=live["max_batch"],
        request_overhead_s=terms["request_overhead_s"],
        step_overhead_s=terms["step_overhead_s"],
        sources=sources,
    )
    measured = measured_summary(live)
    predicted = simulate(profile, live, args.workers, args.seed, terms["request_delays_s"])
    error = compare(measured, predicted)
    gated = [abs(error[k]) for k in GATED if k in error]
    return {
        "profile": base.name,
        "workers": args.workers,
        "trace": live["trace"],
        "serving_path": terms,
        "measured": measured,
        "predicted": predicted,
        "error": error,
        "bound": args.bound,
        "within_bound": bool(gated) and max(gated) <= args.bound,
        "live": live,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measured:
        live = json.loads(args.measured.read_text())["live"]
    else:
        live = asyncio.run(measure(args))
    out = validate(args, live)
    report(out, args.bound)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    return 0 if out["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
