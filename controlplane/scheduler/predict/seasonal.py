"""Seasonal-naive: the next bucket looks like the bucket one season ago.

Each function's season is the lag (between ``min_season`` and ``max_season`` buckets) with the
highest autocorrelation of its activity over the kept history, re-estimated every
``refit_every`` buckets; a function whose best autocorrelation stays under ``min_acf`` has no
season and gets the plain naive forecast (the next bucket looks like the last one). With a
tolerance of ``w`` buckets the adapter is kept when the function was active anywhere in
``[t+1-S-w, t+1-S+w]``; for the naive case that is a keep-alive of ``w + 1`` buckets.
"""

from __future__ import annotations

import numpy as np

from controlplane.scheduler.predict.base import Forecast, Predictor


class SeasonalNaive(Predictor):
    name = "seasonal"

    def __init__(
        self,
        functions: int,
        tolerance: int = 1,
        history: int = 720,
        min_season: int = 2,
        max_season: int = 240,
        min_acf: float = 0.3,
        refit_every: int = 12,
    ) -> None:
        self.tolerance, self.history = tolerance, history
        self.min_season, self.max_season, self.min_acf = min_season, max_season, min_acf
        self.refit_every = refit_every
        self.ring = np.zeros((0, history))  # activity (0/1), column t % history
        self.season = np.zeros(0, dtype=int)  # 1 = no season found (naive)
        super().__init__(functions)

    def _grow(self, extra: int) -> None:
        self.ring = np.vstack([self.ring, np.zeros((extra, self.history))])
        self.season = np.concatenate([self.season, np.ones(extra, dtype=int)])

    def _update(self, counts: np.ndarray) -> None:
        self.ring[:, self.t % self.history] = counts > 0
        if (self.t + 1) % self.refit_every == 0:
            self.season = self._seasons(self._ordered(self.t + 1))

    def _ordered(self, seen: int) -> np.ndarray:
        """The kept activity, oldest first."""
        n = min(seen, self.history)
        cols = np.arange(seen - n, seen) % self.history
        return self.ring[:, cols]

    def _seasons(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[1]
        top = min(self.max_season, n // 2)
        if top < self.min_season:
            return np.ones(self.functions, dtype=int)
        x = x - x.mean(axis=1, keepdims=True)
        spec = np.fft.rfft(x, n=2 * n, axis=1)
        acf = np.fft.irfft(spec * np.conj(spec), axis=1)[:, : top + 1]
        # Unbiased: divide each lag by the number of pairs it has, then by the variance.
        acf = acf / (n - np.arange(top + 1)) / np.maximum(acf[:, :1] / n, 1e-12)
        # A period P also peaks at 2P, 3P, ...: take the shortest lag within 10% of the best.
        cand = acf[:, self.min_season :]
        near = cand >= 0.9 * cand.max(axis=1, keepdims=True)
        best = self.min_season + np.argmax(near, axis=1)
        strength = acf[np.arange(self.functions), best]
        return np.where(strength >= self.min_acf, best, 1)

    def forecast(self) -> Forecast:
        seen = self.t
        if seen == 0:
            return Forecast(score=np.zeros(self.functions), keep=np.zeros(self.functions, dtype=bool))
        x = self._ordered(seen)  # x[:, -1] is bucket t-1; the next bucket is t
        n = x.shape[1]
        score = np.zeros(self.functions)
        for f in range(self.functions):
            centre = n - self.season[f]  # index of bucket t - S in x
            lo, hi = max(centre - self.tolerance, 0), min(centre + self.tolerance, n - 1)
            if lo <= hi:
                score[f] = x[f, lo : hi + 1].max()
        return Forecast(score=score, keep=score > 0)
