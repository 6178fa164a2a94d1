"""Each predictor on synthetic series with a known answer: a strict period, a burst, silence."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.scheduler.predict import (
    AggregateRate,
    Ewma,
    FixedKeepAlive,
    HazardHistogram,
    HybridHistogram,
    LstmPredictor,
    Predictor,
    SeasonalNaive,
)
from controlplane.scheduler.predict.evaluate import cold_at_waste, outcome, run
from controlplane.scheduler.predict.lstm import LstmNet

pytestmark = pytest.mark.unit


def periodic(buckets: int, period: int, phase: int = 3) -> np.ndarray:
    c = np.zeros((buckets, 1))
    c[phase::period, 0] = 1
    return c


def burst(before: int = 60, length: int = 20, after: int = 60) -> np.ndarray:
    return np.concatenate([np.zeros(before), np.full(length, 3.0), np.zeros(after)])[:, None]


def cold_after(pred: Predictor, counts: np.ndarray, warm: int) -> tuple[int, int]:
    """Cold starts and idle resident buckets after the first ``warm`` buckets."""
    keep, _ = run(pred, counts)
    active = counts[warm:] > 0
    return int((active & ~keep[warm:]).sum()), int((keep[warm:] & ~active).sum())


def test_strict_period_histogram_prewarms_just_before_each_arrival() -> None:
    counts = periodic(400, 10)
    cold, idle = cold_after(HybridHistogram(1, margin=0.1), counts, warm=100)
    assert cold == 0
    assert idle <= 2 * 30  # window [9, 11] around each of the 30 arrivals: at most 2 idle buckets each


def test_strict_period_hazard_keeps_only_the_arrival_bucket() -> None:
    cold, idle = cold_after(HazardHistogram(1, threshold=1.0), periodic(400, 10), warm=100)
    assert (cold, idle) == (0, 0)


def test_hazard_between_sessions_is_the_residual_rate_not_the_in_session_one() -> None:
    # Sessions: 10 active buckets in a row (nine idle times of 1), then 40 silent (one of 41).
    cycle = np.r_[np.ones(10), np.zeros(40)]
    pred = HazardHistogram(1, threshold=1.0)
    pred.observe_many(np.tile(cycle, 4)[:-40, None])  # four sessions, the last one just ended
    pred.observe(np.zeros(1))
    after: list[float] = []
    for _ in range(40):  # between sessions: the next bucket's idle time is 2 .. 41
        after.append(float(pred.scores()[0]))
        pred.observe(np.zeros(1))
    # No idle time of 2..40 was ever seen. Shrunk towards the rate fitted to all idle times
    # (about 0.24 per bucket, the in-session one) these read about 0.1; the residual rate of the
    # idle times that lasted this long keeps them near 0.02.
    assert max(after[:-1]) < 0.05
    assert after[-1] > 0.5  # idle 41: the next session starts


def test_hazard_forecast_within_two_buckets_holds_from_the_bucket_before_each_arrival() -> None:
    counts = periodic(400, 10)
    pred = HazardHistogram(1, threshold=1.0)
    pred.observe_many(counts[:200])
    held = []
    for t in range(200, 400):
        if pred.forecast_within(2).keep[0]:
            held.append(t)  # decided before bucket t, for buckets t and t + 1
        assert pred.forecast_within(1).keep[0] == pred.forecast().keep[0]
        pred.observe(counts[t])
    arrivals = np.flatnonzero(counts[200:, 0]) + 200
    assert held == sorted({a - d for a in arrivals for d in (0, 1)})


def test_strict_period_seasonal_naive_finds_the_season() -> None:
    pred = SeasonalNaive(1, tolerance=0, refit_every=10)
    cold, idle = cold_after(pred, periodic(400, 10), warm=100)
    assert pred.season[0] == 10
    assert (cold, idle) == (0, 0)


def test_strict_period_fixed_keep_alive_pays_either_way() -> None:
    counts = periodic(400, 10)
    assert cold_after(FixedKeepAlive(1, 5), counts, 100) == (30, 30 * 5)  # every arrival cold, 5 idle each
    assert cold_after(FixedKeepAlive(1, 10), counts, 100) == (0, 30 * 9)  # never cold, 9 idle of 10


def test_strict_period_lstm_learns_to_prewarm() -> None:
    counts = periodic(320, 8)
    pred = LstmPredictor(1, threshold=1.0, seed=1, window=16, warmup=32, train_every=2, steps=8)
    keep, score = run(pred, counts)
    active = counts[240:, 0] > 0
    assert score[240:, 0][active].min() > 0.5  # confident before each arrival
    assert score[240:, 0][~active].max() < 0.5  # and not in between
    assert not (active & ~keep[240:, 0]).any()


@pytest.mark.parametrize(
    "pred",
    [FixedKeepAlive(1, 3), Ewma(1, 0.5), AggregateRate(1, 0.5), HazardHistogram(1, 0.5), SeasonalNaive(1, 1)],
    ids=lambda p: p.name,
)
def test_burst_costs_at_most_two_cold_starts_and_is_unloaded_after(pred: Predictor) -> None:
    counts = burst()
    keep, _ = run(pred, counts)
    active = counts[:, 0] > 0
    assert (active & ~keep[:, 0]).sum() <= 2
    assert not keep[-20:, 0].any()  # scaled to zero once the silence is long


@pytest.mark.parametrize(
    "pred",
    [
        FixedKeepAlive(2, 60),
        Ewma(2, 0.01),
        AggregateRate(2, 0.01),
        HybridHistogram(2),
        HazardHistogram(2, 0.01),
        SeasonalNaive(2, 3),
        LstmPredictor(2, 0.01, warmup=40, train_every=4),
    ],
    ids=lambda p: p.name,
)
def test_silence_keeps_nothing_resident(pred: Predictor) -> None:
    keep, _ = run(pred, np.zeros((120, 2)))
    assert not keep.any()


def test_outcome_counts_cold_starts_and_idle_bytes() -> None:
    counts = np.array([[1, 0], [0, 2], [0, 0]])
    keep = np.array([[False, True], [True, True], [False, False]])
    o = outcome(counts, keep, np.array([10.0, 20.0]), bucket_s=2.0)
    assert (o.invocations, o.cold_starts) == (3, 1)
    assert o.wasted_byte_s == (20 + 10) * 2.0  # function 1 idle in bucket 0, function 0 idle in bucket 1
    assert o.loads == 2


def test_cold_at_waste_interpolates_the_lower_envelope() -> None:
    from controlplane.scheduler.predict.evaluate import Outcome

    curve = [Outcome(0, 100, 0.0, 0, 0), Outcome(0, 50, 10.0, 0, 0), Outcome(0, 80, 12.0, 0, 0)]
    assert cold_at_waste(curve, 5.0) == 75.0
    assert cold_at_waste(curve, 20.0) == 50.0  # a dominated point never raises the curve


def test_lstm_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(0)
    net = LstmNet(3, 4, rng)
    x, y = rng.normal(size=(2, 5, 3)), (rng.random((2, 5)) > 0.5).astype(float)
    _, grads = net.loss_and_grads(x, y)
    for name, param in net.params.items():
        for idx in [(0,) * param.ndim, tuple(s - 1 for s in param.shape)]:
            old = param[idx]
            param[idx] = old + 1e-5
            up, _ = net.loss_and_grads(x, y)
            param[idx] = old - 1e-5
            down, _ = net.loss_and_grads(x, y)
            param[idx] = old
            assert grads[name][idx] == pytest.approx((up - down) / 2e-5, rel=1e-4, abs=1e-8), name


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=3, max_size=3), min_size=1, max_size=60), st.integers(0, 5))
def test_replaying_the_history_rebuilds_the_same_predictor(rows: list[list[int]], seed: int) -> None:
    """What a control-plane restart relies on: same history and seed, same forecasts."""
    counts = np.array(rows, dtype=float)
    for make in (
        lambda: LstmPredictor(3, 0.5, seed=seed, warmup=8, window=4, train_every=2),
        lambda: HazardHistogram(3, 0.5),
    ):
        a, b = make(), make()
        a.observe_many(counts)
        b.observe_many(counts)
        assert np.array_equal(a.forecast().score, b.forecast().score)
        assert np.array_equal(a.forecast().keep, b.forecast().keep)


def test_grow_adds_functions_without_touching_the_others() -> None:
    pred = HazardHistogram(1, 0.5)
    pred.observe_many(periodic(50, 5))
    before = pred.forecast().score.copy()
    pred.grow(3)
    after = pred.forecast()
    assert after.score.shape == (3,) and after.score[0] == before[0]
    assert not after.keep[1:].any()
