"""The live step: the forecast becomes prefetch commands before a burst and unloads after it."""

from __future__ import annotations

import numpy as np
import pytest

from controlplane.scheduler.history import ArrivalHistory
from controlplane.scheduler.model import (
    AdapterSpec,
    ClusterView,
    CommandKind,
    Placement,
    Tier,
    WorkerState,
    WorkerView,
)
from controlplane.scheduler.predict import HazardHistogram
from controlplane.scheduler.predict.live import Forecaster, FunctionForecast, ResidencyConfig, residency_commands

pytestmark = pytest.mark.unit

CATALOG = {
    "a": AdapterSpec("a", "tiny", 8, 8 << 20, 2),
    "b": AdapterSpec("b", "tiny", 64, 64 << 20, 8),
    "c": AdapterSpec("c", "tiny", 16, 16 << 20, 4),
}


def view(tiers: dict[str, Tier], pages: int = 10, queued: dict[str, int] | None = None) -> ClusterView:
    w = WorkerView("w1", "tiny", WorkerState.ACTIVE, pages, pages, tiers=tiers, queue_depth=queued or {})
    return ClusterView(now_s=0.0, workers={"w1": w})


PLACED = Placement(version=1, replicas={"a": ("w1",), "b": ("w1",), "c": ("w1",)})


def test_prefetch_commands_come_the_bucket_before_a_periodic_burst() -> None:
    history = ArrivalHistory(bucket_s=1.0, capacity=500)
    for t in range(200):
        history.put(t, {"a": 2} if t % 20 == 5 else {"c": 1} if t == 0 else {})
    fc = Forecaster(lambda n: HazardHistogram(n, threshold=1.0))
    prefetch_at = []
    for t in range(200):
        fc.advance(history, t)
        cmds = residency_commands(view({}), PLACED, CATALOG, fc.forecast())
        if any(c.kind is CommandKind.PREFETCH and c.function_id == "a" for c in cmds):
            prefetch_at.append(t + 1)  # the command is for the next bucket
    later = [t for t in prefetch_at if t >= 100]
    assert later == [t for t in range(100, 200) if t % 20 == 5]  # exactly before every burst


def test_idle_adapters_are_offloaded_then_evicted_but_not_while_queued() -> None:
    idle = {
        "a": FunctionForecast(0.0, False, 3),
        "b": FunctionForecast(0.0, False, 500),
        "c": FunctionForecast(0.0, False, 3),
    }
    tiers = {"a": Tier.DEVICE, "b": Tier.DEVICE, "c": Tier.DEVICE}
    cmds = residency_commands(
        view(tiers, queued={"c": 1}), PLACED, CATALOG, idle, ResidencyConfig(evict_after_buckets=100)
    )
    assert {(c.function_id, c.kind) for c in cmds} == {("a", CommandKind.OFFLOAD), ("b", CommandKind.EVICT)}


def test_what_is_prefetched_fits_the_pool_best_score_per_page_first() -> None:
    hot = {f: FunctionForecast(p, True, 1) for f, p in (("a", 0.5), ("b", 0.9), ("c", 0.6))}
    cmds = residency_commands(view({}, pages=7), PLACED, CATALOG, hot)
    # per page: a 0.25, c 0.15, b 0.11; a (2) + c (4) fit in 7 pages, b (8) does not
    assert [(c.function_id, c.kind) for c in cmds] == [("a", CommandKind.PREFETCH), ("c", CommandKind.PREFETCH)]
    assert np.isclose(sum(CATALOG[c.function_id].pages for c in cmds), 6)


def test_history_window_keeps_the_newest_buckets_and_recounts_in_place() -> None:
    history = ArrivalHistory(bucket_s=1.0, capacity=3)
    for b in range(10):
        history.put(b, {"a": b})
    assert list(history.counts) == [7, 8, 9]
    history.put(8, {"a": 80})  # a recount overwrites
    history.put(2, {"a": 1})  # past the window: ignored
    assert history.matrix(["a"], 7, 9)[:, 0].tolist() == [7, 80, 9]
    with pytest.raises(ValueError):
        ArrivalHistory(1.0, 10, counts={5: {}}, newest=5).put(3, {"a": 1})  # a hole behind the newest
