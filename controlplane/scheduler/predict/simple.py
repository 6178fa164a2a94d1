"""The simple predictors: fixed keep-alive, the aggregate rate split by shares, and a per-function EWMA."""

from __future__ import annotations

import numpy as np

from controlplane.scheduler.predict.base import Forecast, Predictor, ThresholdPredictor


class FixedKeepAlive(Predictor):
    """The usual serverless default: keep an adapter for ``keep_alive`` buckets after its last use.

    ``keep_alive = 0`` is pure reactive loading: every bucket with arrivals loads the adapter.
    """

    name = "keepalive"

    def __init__(self, functions: int, keep_alive: int, weight: np.ndarray | None = None) -> None:
        super().__init__(functions)
        self.keep_alive = keep_alive
        # With weights (bytes relative to the mean) the keep-alive shrinks for large adapters:
        # the byte-aware variant, to tell structure from byte-awareness in the benchmark.
        self.per_function = keep_alive / (np.ones(functions) if weight is None else weight)

    def forecast(self) -> Forecast:
        # The next bucket lies since_last + 1 buckets after the last active one.
        score = 1.0 / (1.0 + self.since_last)
        return Forecast(score=score, keep=self.since_last + 1 <= self.per_function)


def _poisson_any(rate: np.ndarray) -> np.ndarray:
    """P(at least one arrival in a bucket) for a Poisson process of ``rate`` arrivals per bucket."""
    return 1.0 - np.exp(-np.maximum(rate, 0.0))


class AggregateRate(ThresholdPredictor):
    """The aggregate rate split by long-run shares: an EWMA of all arrivals x each function's share.

    The control for per-function prediction: it follows the aggregate's ups and downs but knows
    nothing of a function's own timing. When functions are assigned to arrivals independently
    (the plain Zipf control) that is all a function's history can say about its next bucket.
    """

    name = "aggregate"

    def __init__(self, functions: int, threshold: float, weight: np.ndarray | None = None, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.aggregate = 0.0
        super().__init__(functions, threshold, weight)

    def _update(self, counts: np.ndarray) -> None:
        self.aggregate = self.alpha * float(counts.sum()) + (1 - self.alpha) * self.aggregate

    def scores(self) -> np.ndarray:
        share = (self.total + 1.0) / (self.total.sum() + self.functions)  # add-one prior: no share is 0
        return _poisson_any(self.aggregate * share)


class Ewma(ThresholdPredictor):
    """An exponentially weighted moving average of arrivals per bucket (P-LoRA's simple baseline)."""

    name = "ewma"

    def __init__(self, functions: int, threshold: float, weight: np.ndarray | None = None, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.rate = np.zeros(0)
        super().__init__(functions, threshold, weight)

    def _grow(self, extra: int) -> None:
        self.rate = np.concatenate([self.rate, np.zeros(extra)])

    def _update(self, counts: np.ndarray) -> None:
        self.rate = self.alpha * counts + (1 - self.alpha) * self.rate

    def scores(self) -> np.ndarray:
        return _poisson_any(self.rate)
