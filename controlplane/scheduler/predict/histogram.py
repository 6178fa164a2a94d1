"""The hybrid histogram policy of "Serverless in the Wild" (Shahrad et al., USENIX ATC 2020).

Per function, a histogram of idle times (buckets between two consecutive active buckets) over
a bounded range. When the histogram is representative, the adapter is unloaded after use,
pre-warmed once the idle time reaches the head percentile (minus a margin) and kept until the
tail percentile (plus a margin); an idle time inside the window finds it warm. When a function
has too little history, or its idle times are spread evenly (coefficient of variation of the
bin counts below a threshold), the policy falls back to a fixed keep-alive. When most idle
times fall outside the range, the paper forecasts the next one with ARIMA; here the forecast
is the median of the recent out-of-range idle times (a time-series model of order zero), with
the same margins. Deviation from the paper, stated: bins are buckets, not minutes.
"""

from __future__ import annotations

import numpy as np

from controlplane.scheduler.predict.base import NEVER, Forecast, Predictor, keep_rule


class HybridHistogram(Predictor):
    name = "histogram"

    def __init__(
        self,
        functions: int,
        range_buckets: int = 240,
        head_pct: float = 5.0,
        tail_pct: float = 99.0,
        margin: float = 0.10,
        min_samples: int = 4,
        cv_threshold: float = 2.0,
        oob_fraction: float = 0.5,
        fallback_keep_alive: int = 24,
    ) -> None:
        self.range_buckets = range_buckets
        self.head_pct, self.tail_pct, self.margin = head_pct, tail_pct, margin
        self.min_samples, self.cv_threshold, self.oob_fraction = min_samples, cv_threshold, oob_fraction
        self.fallback_keep_alive = fallback_keep_alive
        self.hist = np.zeros((0, range_buckets + 1))  # bins 1..range; bin 0 unused
        self.oob: list[list[float]] = []
        self.window = np.zeros((0, 2))  # per function: [start, end] of the warm window in idle buckets
        self.mode = np.zeros(0, dtype=int)  # 0 fallback, 1 histogram, 2 out-of-range forecast
        super().__init__(functions)

    def _grow(self, extra: int) -> None:
        self.hist = np.vstack([self.hist, np.zeros((extra, self.range_buckets + 1))])
        self.oob.extend([] for _ in range(extra))
        self.window = np.vstack([self.window, np.tile([1.0, float(self.fallback_keep_alive)], (extra, 1))])
        self.mode = np.concatenate([self.mode, np.zeros(extra, dtype=int)])

    def _update(self, counts: np.ndarray) -> None:
        ended = np.flatnonzero((counts > 0) & (self.since_last < NEVER))
        for f in ended.tolist():
            gap = int(self.since_last[f]) + 1
            if gap <= self.range_buckets:
                self.hist[f, gap] += 1
            else:
                self.oob[f] = [*self.oob[f][-9:], float(gap)]
            self._refit(f)

    def _refit(self, f: int) -> None:
        bins = self.hist[f, 1:]
        inside = bins.sum()
        outside = len(self.oob[f])
        if inside + outside < self.min_samples:
            self.mode[f], self.window[f] = 0, (1.0, float(self.fallback_keep_alive))
        elif outside > self.oob_fraction * (inside + outside):
            guess = float(np.median(self.oob[f]))
            self.mode[f], self.window[f] = 2, (guess * (1 - self.margin), guess * (1 + self.margin))
        elif bins.std() / max(bins.mean(), 1e-12) < self.cv_threshold:
            self.mode[f], self.window[f] = 0, (1.0, float(self.fallback_keep_alive))
        else:
            cdf = np.cumsum(bins) / inside
            head = float(np.searchsorted(cdf, self.head_pct / 100.0) + 1)
            tail = float(np.searchsorted(cdf, self.tail_pct / 100.0) + 1)
            self.mode[f], self.window[f] = 1, (np.floor(head * (1 - self.margin)), np.ceil(tail * (1 + self.margin)))

    def forecast(self) -> Forecast:
        idle = self.since_last + 1  # the next bucket's distance from the last active one
        keep = (idle >= self.window[:, 0]) & (idle <= self.window[:, 1])
        return Forecast(score=self._hazard(idle), keep=keep)

    def _hazard(self, idle: np.ndarray, prior: float = 0.0) -> np.ndarray:
        """P(the idle time ends at ``idle`` | it lasted this long), from the histogram.

        With ``prior`` > 0 each bin's estimate is shrunk towards the residual rate: the constant
        hazard of a memoryless process fitted to the idle times that lasted at least this long
        (their buckets from here on), so a bin seen rarely neither rules an arrival out nor makes
        it certain. The residual rate, not one fitted to all idle times: a function that arrives
        in sessions has many short idle times inside a session and few long ones between them;
        fitted to all of them, the rate is the in-session one and overstates an arrival once the
        session is over (measured: 4x, ``docs/benchmarks.md``). That rate has its own prior of one
        pseudo-arrival per ``1 + idle so far`` buckets (the keep-alive-like score), so an idle
        time longer than any seen makes an arrival less and less likely. Beyond the range, or
        with an empty histogram, it is that keep-alive-like 1 / (1 + idle so far).
        """
        since_last = idle - 1.0
        out = 1.0 / (1.0 + since_last)
        bins = self.hist[:, 1:]
        n = bins.sum(axis=1)
        i = np.minimum(idle, self.range_buckets + 1).astype(int)
        ok = (i <= self.range_buckets) & (n > 0)
        rows = np.flatnonzero(ok)
        if rows.size == 0:
            return out
        b = bins[rows]
        r = np.arange(rows.size)
        idx = i[rows] - 1  # column of bin i in ``bins``
        cum = np.cumsum(b, axis=1)
        cum_len = np.cumsum(b * np.arange(1, self.range_buckets + 1), axis=1)
        prev = np.maximum(idx - 1, 0)
        survived = n[rows] - np.where(idx >= 1, cum[r, prev], 0.0)  # idle times of at least i
        # Their buckets at risk from i on: sum over j >= i of (j - i + 1).
        at_risk = cum_len[:, -1] - np.where(idx >= 1, cum_len[r, prev], 0.0) - idx * survived
        residual = (survived + 1.0) / (at_risk + 1.0 + since_last[rows])
        out[rows] = (b[r, idx] + prior * residual) / np.maximum(survived + prior, 1e-12)
        return np.clip(out, 0.0, 1.0)


class HazardHistogram(HybridHistogram):
    """The same idle-time histogram, read as a hazard: keep the adapter where an arrival is likely.

    The paper's window spans the head to the tail percentile, so a function that arrives in
    bursts (many idle times of one bucket inside a burst, one long idle time between bursts)
    gets a window from 1 to the long gap: it is never unloaded. Reading the histogram as a
    hazard, P(idle time ends in the next bucket | it lasted this long), keeps such a function
    inside its bursts, unloads it between them and pre-warms it where the next burst is likely.
    A function without a usable histogram (fewer than ``min_samples`` idle times, or most of
    them out of range) falls back to a keep-alive; the paper's test of the histogram's spread
    (its CV) guards the percentile window and is not needed here. One run gives the whole
    threshold curve.
    """

    name = "hazard"

    def __init__(
        self, functions: int, threshold: float, weight: np.ndarray | None = None, prior: float = 2.0, **kwargs: float
    ) -> None:
        self.threshold, self.weight, self.prior = threshold, weight, prior
        super().__init__(functions, **kwargs)  # type: ignore[arg-type]

    def scores(self, ahead: int = 0) -> np.ndarray:
        """P(an arrival in the next bucket), or ``ahead`` buckets after it if none comes before."""
        since_last = np.minimum(self.since_last + ahead, NEVER)
        hazard = self._hazard(since_last + 1, self.prior)
        # Without a usable histogram the score is keep-alive-like, 1 / (1 + idle so far): under
        # ``keep_rule`` that is a keep-alive of 1 / (threshold x weight) buckets, so one
        # threshold sets both the hazard cut and the fallback's keep-alive.
        usable = (self.hist[:, 1:].sum(axis=1) >= self.min_samples) & (self.mode != 2)
        return np.where(usable, hazard, 1.0 / (1.0 + since_last))

    def forecast(self) -> Forecast:
        s = self.scores()
        return Forecast(score=s, keep=keep_rule(s, self.threshold, self.weight))

    def forecast_within(self, buckets: int) -> Forecast:
        score = np.zeros(self.functions)
        keep = np.zeros(self.functions, dtype=bool)
        for ahead in range(max(buckets, 1)):
            s = self.scores(ahead)
            score, keep = np.maximum(score, s), keep | keep_rule(s, self.threshold, self.weight)
        return Forecast(score=score, keep=keep)
