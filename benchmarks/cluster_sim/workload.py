"""Workloads for the simulator: a trace's arrivals and token lengths, assigned to functions.

Any CSV with ``TIMESTAMP, ContextTokens, GeneratedTokens`` (``launcher.trace.read_rows``) or a
generated Poisson trace. The trace's inter-arrival gaps are rescaled to the offered rate asked
for (the trace is looped when it is too short), so the burstiness of the trace is kept at any
load. Each request goes to one of F functions by a seeded Zipf popularity; every
``drift_period_s`` a share of the hottest popularity ranks is swapped with random colder
functions (hot functions change over time). Ranks are drawn per function from the rank mix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launcher.trace import read_rows

RANK_MIX = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class WorkloadSpec:
    functions: int = 1000
    zipf_s: float = 1.0
    drift_period_s: float = 60.0
    drift_fraction: float = 0.2  # share of the top-50 popularity ranks re-assigned per period
    rank_mix: tuple[int, ...] = RANK_MIX
    seed: int = 0


@dataclass(frozen=True)
class TraceShape:
    """The trace reduced to what the simulator needs: gaps and token lengths, in trace order."""

    name: str
    gaps_s: np.ndarray  # inter-arrival gaps (the first is 0)
    prompt: np.ndarray
    output: np.ndarray

    @property
    def mean_rate(self) -> float:
        return len(self.gaps_s) / max(float(self.gaps_s.sum()), 1e-9)


@dataclass
class Workload:
    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    function: np.ndarray
    ranks: list[int]
    description: str


def trace_shape(path: Path | None, seed: int = 0, poisson_requests: int = 20000) -> TraceShape:
    """The trace at ``path``, or (path None) a Poisson trace with the Azure conv trace's token spread."""
    if path is not None:
        rows = read_rows(Path(path))
        ts = np.array([r[0] for r in rows])
        gaps = np.diff(ts, prepend=ts[0])
        return TraceShape(Path(path).name, gaps, np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, poisson_requests)
    gaps[0] = 0.0
    # Lognormal token lengths of the conversation trace's order (median ~1000 in, ~200 out).
    prompt = np.clip(rng.lognormal(6.9, 0.8, poisson_requests), 1, None).astype(int)
    output = np.clip(rng.lognormal(5.3, 0.9, poisson_requests), 1, None).astype(int)
    return TraceShape("poisson", gaps, prompt, output)


def build(
    shape: TraceShape,
    spec: WorkloadSpec,
    rate_per_s: float,
    duration_s: float,
    token_scale: float,
    max_prompt: int,
    max_output: int,
) -> Workload:
    """Requests arriving over ``duration_s`` at ``rate_per_s`` on average, assigned to functions."""
    n = len(shape.gaps_s)
    scale = shape.mean_rate / rate_per_s
    need = int(rate_per_s * duration_s * 1.2) + 16
    idx = np.arange(need) % n
    gaps = shape.gaps_s[idx] * scale
    arrival = np.cumsum(gaps)
    keep = arrival < duration_s
    idx, arrival = idx[keep], arrival[keep]
    prompt = np.clip(np.round(shape.prompt[idx] * token_scale), 1, max_prompt).astype(int)
    output = np.clip(np.round(shape.output[idx] * token_scale), 1, max_output).astype(int)
    function = assign_functions(arrival, spec)
    rng = random.Random(spec.seed + 1)
    ranks = [rng.choice(spec.rank_mix) for _ in range(spec.functions)]
    desc = (
        f"{shape.name}: {len(arrival)} requests over {duration_s:g}s (rate {rate_per_s:.2f}/s, gaps x{scale:.3g}); "
        f"tokens x{token_scale:g} capped {max_prompt}/{max_output}; "
        f"{spec.functions} functions, Zipf s={spec.zipf_s:g}, "
        f"drift {spec.drift_fraction:g} of the top 50 every {spec.drift_period_s:g}s; ranks {list(spec.rank_mix)}; "
        f"seed {spec.seed}"
    )
    return Workload(arrival, prompt, output, function, ranks, desc)


def assign_functions(arrival: np.ndarray, spec: WorkloadSpec) -> np.ndarray:
    """Zipf popularity ranks -> functions, through a permutation that drifts every period."""
    rng = np.random.default_rng(spec.seed)
    weights = 1.0 / np.arange(1, spec.functions + 1) ** spec.zipf_s
    weights /= weights.sum()
    pop_rank = rng.choice(spec.functions, size=len(arrival), p=weights)
    perm = rng.permutation(spec.functions)
    out = np.empty(len(arrival), dtype=int)
    epoch = (arrival // spec.drift_period_s).astype(int) if spec.drift_period_s > 0 else np.zeros(len(arrival), int)
    top = min(50, spec.functions)
    for e in range(int(epoch.max()) + 1 if len(arrival) else 0):
        if e > 0:
            swaps = int(spec.drift_fraction * top)
            for hot in rng.choice(top, size=swaps, replace=False):
                cold = int(rng.integers(top, spec.functions)) if spec.functions > top else int(rng.integers(0, top))
                perm[[hot, cold]] = perm[[cold, hot]]
        mask = epoch == e
        out[mask] = perm[pop_rank[mask]]
    return out
