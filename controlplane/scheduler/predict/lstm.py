"""A small LSTM demand predictor (P-LoRA), trained online, in numpy (forward and BPTT by hand).

Why numpy and not torch: the predictor runs in the control plane's scheduler loop, in the same
process as the control plane API, and torch must stay off that import path (a second or more
to import, hundreds of MB resident, for a model of about 1,500 weights). At this size numpy is
as fast as torch on a CPU, needs no extra process, and the same code runs in the offline
benchmark and in the cluster simulator. ``tests/predict`` checks the gradients against finite
differences.

One set of weights is shared by every function (a global model, as in DeepAR): a function with
little history borrows what the others taught it. Each function keeps its own input window.
Inputs per bucket: log1p(arrivals), the idle time so far and the previous idle time (both
log-scaled to the histogram range), and their ratio (an idle time about to repeat itself shows
as a ratio near 1). Target: whether the next bucket has an arrival (binary cross-entropy).
Every ``train_every`` buckets it takes ``steps`` Adam steps on windows of ``window`` buckets
drawn (with the seed) from the kept history; the forecast runs the last window from a zero
state, as in training. Until ``warmup`` buckets have been seen it falls back to a keep-alive.
"""

from __future__ import annotations

import numpy as np

from controlplane.scheduler.predict.base import NEVER, ThresholdPredictor

FEATURES = 4


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


class LstmNet:
    """One LSTM layer and a logistic output on every step. Gate order in ``w``: i, f, o, g."""

    def __init__(self, inputs: int, hidden: int, rng: np.random.Generator) -> None:
        self.inputs, self.hidden = inputs, hidden
        scale = 1.0 / np.sqrt(inputs + hidden)
        self.params: dict[str, np.ndarray] = {
            "w": rng.normal(0.0, scale, (inputs + hidden, 4 * hidden)),
            "b": np.zeros(4 * hidden),
            "wy": rng.normal(0.0, 1.0 / np.sqrt(hidden), hidden),
            "by": np.zeros(1),
        }
        self.params["b"][hidden : 2 * hidden] = 1.0  # forget gate open at start
        self._m = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._v = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._steps = 0

    def size(self) -> int:
        return sum(v.size for v in self.params.values())

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list]:
        """Logits (batch, time) for inputs (batch, time, inputs); the cache is for ``backward``."""
        batch, steps, _ = x.shape
        hid = self.hidden
        h, c = np.zeros((batch, hid)), np.zeros((batch, hid))
        logits = np.empty((batch, steps))
        cache = []
        p = self.params
        for t in range(steps):
            z = np.concatenate([x[:, t], h], axis=1)
            a = z @ p["w"] + p["b"]
            i, f, o = _sigmoid(a[:, :hid]), _sigmoid(a[:, hid : 2 * hid]), _sigmoid(a[:, 2 * hid : 3 * hid])
            g = np.tanh(a[:, 3 * hid :])
            c_prev = c
            c = f * c_prev + i * g
            tc = np.tanh(c)
            h = o * tc
            logits[:, t] = h @ p["wy"] + p["by"][0]
            cache.append((z, i, f, o, g, c_prev, tc, h))
        return logits, cache

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean binary cross-entropy over every step, and its gradients by backpropagation through time."""
        logits, cache = self.forward(x)
        batch, steps = y.shape
        prob = _sigmoid(logits)
        eps = 1e-9
        loss = float(-np.mean(y * np.log(prob + eps) + (1 - y) * np.log(1 - prob + eps)))
        dlogit = (prob - y) / (batch * steps)
        p, hid = self.params, self.hidden
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        dh_next, dc_next = np.zeros((batch, hid)), np.zeros((batch, hid))
        for t in reversed(range(steps)):
            z, i, f, o, g, c_prev, tc, h = cache[t]
            grads["wy"] += h.T @ dlogit[:, t]
            grads["by"] += dlogit[:, t].sum()
            dh = np.outer(dlogit[:, t], p["wy"]) + dh_next
            dc = dh * o * (1 - tc**2) + dc_next
            da = np.concatenate(
                [dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dh * tc * o * (1 - o), dc * i * (1 - g**2)], axis=1
            )
            grads["w"] += z.T @ da
            grads["b"] += da.sum(axis=0)
            dz = da @ p["w"].T
            dh_next, dc_next = dz[:, self.inputs :], dc * f
        return loss, grads

    def adam_step(self, grads: dict[str, np.ndarray], lr: float, clip: float = 1.0) -> None:
        norm = np.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        scale = min(1.0, clip / max(norm, 1e-12))
        self._steps += 1
        b1, b2 = 0.9, 0.999
        for k, g in grads.items():
            g = g * scale
            self._m[k] = b1 * self._m[k] + (1 - b1) * g
            self._v[k] = b2 * self._v[k] + (1 - b2) * g * g
            m_hat = self._m[k] / (1 - b1**self._steps)
            v_hat = self._v[k] / (1 - b2**self._steps)
            self.params[k] -= lr * m_hat / (np.sqrt(v_hat) + 1e-8)


class LstmPredictor(ThresholdPredictor):
    name = "lstm"

    def __init__(
        self,
        functions: int,
        threshold: float,
        weight: np.ndarray | None = None,
        seed: int = 0,
        hidden: int = 16,
        window: int = 32,
        history: int = 512,
        train_every: int = 6,
        steps: int = 4,
        batch: int = 64,
        lr: float = 0.01,
        warmup: int = 48,
        range_buckets: int = 240,
        fallback_keep_alive: int = 24,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.net = LstmNet(FEATURES, hidden, self.rng)
        self.window, self.history, self.train_every, self.steps = window, history, train_every, steps
        self.batch, self.lr, self.warmup, self.range_buckets = batch, lr, warmup, range_buckets
        self.fallback_keep_alive = fallback_keep_alive
        self.x = np.zeros((0, history, FEATURES))  # ring of inputs, column t % history
        self.active = np.zeros((0, history))
        self.last_loss = float("nan")
        self.train_calls = 0
        super().__init__(functions, threshold, weight)

    def _grow(self, extra: int) -> None:
        self.x = np.concatenate([self.x, np.zeros((extra, self.history, FEATURES))])
        self.active = np.vstack([self.active, np.zeros((extra, self.history))])

    def _update(self, counts: np.ndarray) -> None:
        # Features of this bucket as seen after it: the base class updates since_last and last_gap
        # after this hook, so compute them here the same way.
        active = counts > 0
        since = np.where(active, 0.0, self.since_last + 1)
        gap = np.where(active & (self.since_last < 1e9), self.since_last + 1, self.last_gap)
        col = self.t % self.history
        self.x[:, col] = self._features(counts, since, gap)
        self.active[:, col] = active
        seen = self.t + 1
        if seen >= self.warmup and seen % self.train_every == 0:
            self._train(seen)

    def _features(self, counts: np.ndarray, since: np.ndarray, gap: np.ndarray) -> np.ndarray:
        top = np.log1p(self.range_buckets)
        s, g = np.minimum(since, self.range_buckets), np.minimum(gap, self.range_buckets)
        ratio = np.minimum((s + 1) / np.maximum(g, 1), 2.0) / 2.0
        return np.stack([np.log1p(counts), np.log1p(s) / top, np.log1p(g) / top, ratio], axis=1)

    def _train(self, seen: int) -> None:
        n = min(seen, self.history)
        if n <= self.window:
            return
        for _ in range(self.steps):
            fs = self.rng.choice(self.functions, size=min(self.batch, self.functions), replace=False)
            # A window ends at most at the second-newest bucket: its target is the newest one.
            ends = seen - 1 - self.rng.integers(0, n - self.window, size=len(fs))
            cols = (ends[:, None] - self.window + np.arange(self.window)[None, :]) % self.history
            x = self.x[fs[:, None], cols]
            y = self.active[fs[:, None], (cols + 1) % self.history]
            self.last_loss, grads = self.net.loss_and_grads(x, y)
            self.net.adam_step(grads, self.lr)
        self.train_calls += 1

    def scores(self) -> np.ndarray:
        seen = self.t
        if seen < max(self.warmup, self.window):
            return np.where(self.since_last + 1 <= self.fallback_keep_alive, 1.0, 0.0)
        cols = (seen - self.window + np.arange(self.window)) % self.history
        logits, _ = self.net.forward(self.x[:, cols])
        # A function never invoked has nothing to forecast from: the model's base rate is not its.
        return np.where(self.since_last >= NEVER, 0.0, _sigmoid(logits[:, -1]))
