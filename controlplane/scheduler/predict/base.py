"""The one interface every demand predictor implements, and the arrival features they share.

Time is cut into buckets of equal width. After each bucket the caller hands the predictor the
arrival counts of that bucket (one entry per function, always in the same order); the predictor
answers with a ``Forecast`` for the next bucket: a score per function (how likely it is invoked
then, used to rank functions when the device cannot hold every wanted adapter) and ``keep``,
whether its adapter should be resident on the device during that bucket.

Predictors are deterministic: their state is a function of the counts they were fed, their
parameters and their seed. They read no clock and do no I/O, so the control plane rebuilds one
after a restart by feeding it the persisted history again, and the offline benchmark, the unit
tests and the live loop all run the same code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

NEVER = 1e9  # "buckets since the last arrival" of a function never invoked


@dataclass(frozen=True)
class Forecast:
    """What a predictor says about the next bucket, one entry per function."""

    score: np.ndarray  # float in [0, 1]: likelihood of at least one invocation in the next bucket
    keep: np.ndarray  # bool: the adapter should be resident on the device during the next bucket


class Predictor(ABC):
    """Base of every predictor: tracks the arrival features each of them needs.

    ``since_last[f]`` counts buckets since the last bucket in which ``f`` was invoked (0 right
    after such a bucket); ``last_gap[f]`` is the previous idle time, the distance in buckets
    between its last two active buckets.
    """

    name = "predictor"

    def __init__(self, functions: int) -> None:
        self.t = 0  # buckets observed
        self.functions = 0
        self.since_last = np.zeros(0)
        self.last_gap = np.zeros(0)
        self.total = np.zeros(0)
        self.grow(functions)

    def grow(self, functions: int) -> None:
        """Make room for new functions (appended at the end, never invoked so far)."""
        extra = functions - self.functions
        if extra < 0:
            raise ValueError(f"cannot shrink from {self.functions} to {functions} functions")
        if extra == 0:
            return
        self.since_last = np.concatenate([self.since_last, np.full(extra, NEVER)])
        self.last_gap = np.concatenate([self.last_gap, np.full(extra, NEVER)])
        self.total = np.concatenate([self.total, np.zeros(extra)])
        self.functions = functions
        self._grow(extra)

    def observe(self, counts: np.ndarray) -> None:
        """Feed the arrival counts of the bucket that just ended."""
        counts = np.asarray(counts, dtype=float)
        if counts.shape != (self.functions,):
            raise ValueError(f"expected {self.functions} counts, got shape {counts.shape}")
        self._update(counts)  # sees the features as they were before this bucket
        active = counts > 0
        gap = self.since_last + 1
        self.last_gap = np.where(active & (self.since_last < NEVER), gap, self.last_gap)
        self.since_last = np.where(active, 0.0, np.minimum(self.since_last + 1, NEVER))
        self.total += counts
        self.t += 1

    def observe_many(self, counts: np.ndarray) -> None:
        """Feed a (buckets, functions) history, oldest first."""
        for row in np.asarray(counts, dtype=float):
            self.observe(row)

    @abstractmethod
    def forecast(self) -> Forecast:
        """The forecast for the next bucket."""

    def forecast_within(self, buckets: int) -> Forecast:
        """Hold the adapter now if any of the next ``buckets`` buckets wants it (no arrival assumed
        before each); the score is the highest of theirs.

        For a live loop whose next decision lands up to a bucket late (the history is counted
        after a bucket ends, the loop acts on its own period): deciding for the next bucket only,
        a prefetch would arrive after the burst began. By default only the next bucket: a
        predictor that can score a later one (``HazardHistogram``) overrides this.
        """
        return self.forecast()

    def _update(self, counts: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Predictor-specific learning from one bucket; the shared features are not yet updated."""

    def _grow(self, extra: int) -> None:  # noqa: B027 - optional hook
        """Predictor-specific room for ``extra`` new functions."""


def keep_rule(score: np.ndarray, threshold: float, weight: np.ndarray | None = None) -> np.ndarray:
    """Keep where the odds of an arrival pay for the memory: ``p / (1 - p) >= threshold x weight``.

    ``weight`` is each adapter's bytes relative to the mean (1 when omitted): keeping a bucket
    costs its bytes when no arrival comes (probability 1 - p) and saves a cold start when one
    does (p), so a large adapter needs better odds than a small one.
    """
    w = np.ones_like(score) if weight is None else weight
    return score >= threshold * w * (1.0 - score)


class ThresholdPredictor(Predictor):
    """A predictor whose decision is ``keep_rule(score, threshold, weight)``; one run gives its whole curve."""

    def __init__(self, functions: int, threshold: float, weight: np.ndarray | None = None) -> None:
        super().__init__(functions)
        self.threshold = threshold
        self.weight = weight

    @abstractmethod
    def scores(self) -> np.ndarray:
        """Likelihood of at least one invocation in the next bucket, per function."""

    def forecast(self) -> Forecast:
        s = self.scores()
        return Forecast(score=s, keep=keep_rule(s, self.threshold, self.weight))
