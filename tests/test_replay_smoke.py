"""A short trace replay through the whole stack, all three systems: the benchmark's smoke test."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from benchmarks.replay import parse_args, run

pytestmark = pytest.mark.e2e

FIELDS = {
    "ttft_p50_s",
    "ttft_p99_s",
    "tbt_p50_s",
    "e2e_p50_s",
    "throughput_tokens_per_s",
    "slo_attainment",
    "cold_starts",
    "cold_start_added_p50_s",
    "cost_per_1m_tokens_usd",
    "device_seconds",
    "peak_memory_bytes",
    "completed",
    "failed",
}


def _other_trace(path: Path, requests: int = 14, seed: int = 7) -> Path:
    """A trace file other than the Azure one, in the same format: Poisson arrivals, other lengths."""
    rng = random.Random(seed)
    start, t, rows = datetime(2024, 5, 1, 9, 0, 0), 0.0, ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for _ in range(requests):
        t += rng.expovariate(2.5)
        rows.append(
            f"{(start + timedelta(seconds=t)):%Y-%m-%d %H:%M:%S.%f}0,{rng.randint(20, 3000)},{rng.randint(5, 400)}"
        )
    path.write_text("\n".join(rows) + "\n")
    return path


def test_short_replay_serves_every_request_in_every_system(tmp_path: Path) -> None:
    """The same command on a trace file other than the project's: every system serves every request."""
    out = tmp_path / "replay.json"
    args = parse_args(
        [
            "--trace",
            str(_other_trace(tmp_path / "other.csv")),
            "--shape",
            "tiny",
            "--duration",
            "6",
            "--functions",
            "3",
            "--max-prompt",
            "24",
            "--max-output",
            "6",
            "--idle-timeout",
            "3",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--plots",
            str(tmp_path / "plots"),
        ]
    )
    report = asyncio.run(run(args))
    assert json.loads(out.read_text()) == report
    requests = int(report["trace"].split("-> ")[1].split(" ")[0])
    assert requests > 0
    for name, metrics in report["systems"].items():
        assert FIELDS <= set(metrics), name
        assert metrics["failed"] == 0 and metrics["completed"] == requests, name
    # Every function's first request on the dedicated baseline waits for its own backbone.
    assert report["systems"]["dedicated"]["cold_starts"] >= 1
    assert all(m["device_seconds"] > 0 and m["cost_per_1m_tokens_usd"] > 0 for m in report["systems"].values())
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "replay_cold_starts.png",
        "replay_cost.png",
        "replay_ttft_cdf.png",
    ]
