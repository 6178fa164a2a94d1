"""The simulator predicts a live 3-worker replay within the bound: a short slice (20 s, 31 requests: with 10 s and
13 requests the live TTFT p50 alone varied by 25% between runs), in CI.

The live side is the real stack (HTTP streaming client, gateway, NATS, Postgres, S3, the
control plane's scheduler, three worker processes on the tiny backbone); the simulated side
runs the production placement and routing on this machine's calibration profile. The serving
path's overhead is calibrated from probe requests sent one at a time after the replay, not
from the replay's requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.cluster_sim import validate

pytestmark = pytest.mark.e2e

BOUND = 0.25


def test_simulator_predicts_the_live_replay_within_the_bound(tmp_path: Path) -> None:
    out = tmp_path / "validate.json"
    code = validate.main(["--duration", "20", "--probes", "2", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    res = json.loads(out.read_text())
    measured, predicted, error = res["measured"], res["predicted"], res["error"]
    # Both sides served the same requests.
    assert measured["failed"] == 0 and measured["completed"] == predicted["completed"] > 5
    # The serving path was calibrated from probes, not left at zero.
    assert res["serving_path"]["request_overhead_s"] > 0
    for key in ("ttft_p50_s", "throughput_tokens_per_s"):
        assert abs(error[key]) <= BOUND, (key, measured[key], predicted[key])
    assert code == 0 and res["within_bound"]
