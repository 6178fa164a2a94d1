"""Replays a counts matrix through a predictor: cold starts against wasted device memory.

A bucket in which a function is invoked while its adapter is not resident costs one cold start
(the first invocation loads the adapter; the rest of the bucket finds it warm). A bucket in
which the adapter is resident and the function is not invoked wastes ``bytes x bucket_s``
adapter-byte-seconds. Loads and unloads happen at bucket boundaries, as the live loop does them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from controlplane.scheduler.predict.base import Predictor, keep_rule


@dataclass(frozen=True)
class Outcome:
    invocations: int
    cold_starts: int
    wasted_byte_s: float  # resident and idle
    resident_byte_s: float  # resident in total (idle or used)
    loads: int  # prefetches plus cold loads

    @property
    def cold_rate(self) -> float:
        return self.cold_starts / max(self.invocations, 1)


def outcome(counts: np.ndarray, keep: np.ndarray, adapter_bytes: np.ndarray, bucket_s: float) -> Outcome:
    """Score the decisions ``keep`` (buckets, functions) against the arrivals ``counts``."""
    active = counts > 0
    cold = active & ~keep
    resident = keep | active  # a cold start makes it resident for the rest of its bucket
    prev = np.vstack([np.zeros((1, counts.shape[1]), dtype=bool), resident[:-1]])
    return Outcome(
        invocations=int(counts.sum()),
        cold_starts=int(cold.sum()),
        wasted_byte_s=float(((keep & ~active) * adapter_bytes).sum() * bucket_s),
        resident_byte_s=float((resident * adapter_bytes).sum() * bucket_s),
        loads=int((resident & ~prev).sum()),
    )


def run(predictor: Predictor, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decisions and scores for every bucket, each made before that bucket's counts were seen."""
    buckets, functions = counts.shape
    keep = np.zeros((buckets, functions), dtype=bool)
    score = np.zeros((buckets, functions))
    for t in range(buckets):
        f = predictor.forecast()
        keep[t], score[t] = f.keep, f.score
        predictor.observe(counts[t])
    return keep, score


def sweep_thresholds(
    make: Callable[[float], Predictor],
    thresholds: list[float],
    counts: np.ndarray,
    adapter_bytes: np.ndarray,
    bucket_s: float,
    weight: np.ndarray | None = None,
) -> list[tuple[float, Outcome]]:
    """A threshold predictor's whole curve from one run: its scores do not depend on the threshold.

    Only for predictors whose decision is ``keep_rule(score, threshold, weight)``
    (``ThresholdPredictor``, ``HazardHistogram``).
    """
    _, score = run(make(thresholds[0]), counts)
    return [(th, outcome(counts, keep_rule(score, th, weight), adapter_bytes, bucket_s)) for th in thresholds]


def cold_at_waste(curve: list[Outcome], wasted_byte_s: float) -> float:
    """Cold starts at a given waste, interpolated on the curve's lower envelope (its Pareto front).

    Below the curve's smallest waste the answer is that point's cold starts (no better is shown).
    """
    pts = sorted((o.wasted_byte_s, o.cold_starts) for o in curve)
    front: list[tuple[float, float]] = []
    for w, c in pts:
        if not front or c < front[-1][1]:
            front.append((w, float(c)))
    ws = np.array([w for w, _ in front])
    cs = np.array([c for _, c in front])
    return float(np.interp(wasted_byte_s, ws, cs))
