"""The offline predict benchmark on a trace file other than the project's (same three columns)."""

from __future__ import annotations

import json
import math
import random
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from benchmarks.predict import main

pytestmark = pytest.mark.unit


def _other_trace(path: Path, seconds: float = 900.0, seed: int = 3) -> Path:
    """Poisson arrivals with a rate that swings over the slice, other token lengths."""
    rng = random.Random(seed)
    start, t, rows = datetime(2024, 5, 1, 9, 0, 0), 0.0, ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    while (t := t + rng.expovariate(1.5 + math.sin(2 * math.pi * t / 300))) < seconds - 1:
        rows.append(
            f"{(start + timedelta(seconds=t)):%Y-%m-%d %H:%M:%S.%f}0,{rng.randint(20, 3000)},{rng.randint(5, 400)}"
        )
    path.write_text("\n".join(rows) + "\n")
    return path


def test_benchmark_runs_on_another_trace_and_scores_every_predictor(tmp_path: Path) -> None:
    out, png = tmp_path / "predict.json", tmp_path / "curves.png"
    args = ["--trace", str(_other_trace(tmp_path / "other.csv")), "--duration", "900", "--functions", "8"]
    assert main([*args, "--no-lstm", "--out", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    assert png.stat().st_size > 0
    for name in ("structured", "zipf"):
        w = result["workloads"][name]
        assert set(w["curves"]) >= {"keepalive", "aggregate", "ewma", "histogram", "hazard", "seasonal"}
        reactive = next(p for p in w["curves"]["keepalive"] if p["knob"] == "keep-alive 0 s")
        assert reactive["wasted_gib_s"] == 0  # reactive loading never holds an idle adapter
        always = min(w["curves"]["keepalive"], key=lambda p: p["cold_starts"])
        assert always["cold_starts"] <= reactive["cold_starts"]
        assert 0 < w["invocations"] == sum(1 for _ in open(tmp_path / "other.csv")) - 1
