"""The arrival history comes from the invocations table, so it survives a control-plane restart."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from controlplane.db.models import AdapterArtifact, Backbone, Function, Invocation, Tenant
from controlplane.db.session import make_engine, make_sessionmaker
from controlplane.scheduler.history import ArrivalHistory, HistoryStore
from controlplane.scheduler.predict import HazardHistogram
from controlplane.scheduler.predict.live import Forecaster
from lorafaas.settings import Settings

pytestmark = pytest.mark.integration

BASE = datetime(2001, 1, 1, tzinfo=UTC)  # far from any other test's invocations in the shared test database
BUCKET_S = 10.0


async def _seed(settings: Settings, arrivals: dict[int, list[float]]) -> list[str]:
    """Two functions; ``arrivals[i]`` are the offsets (s after BASE) of function i's invocations."""
    engine = make_engine(settings.database)
    sessions = make_sessionmaker(engine)
    tag = uuid.uuid4().hex[:8]
    async with sessions() as s, s.begin():
        tenant = Tenant(id=f"t{tag}", name=f"history-{tag}", status="active")
        backbone = Backbone(id=f"b{tag}", name=f"history-{tag}", uri="/nowhere", shape={})
        s.add_all([tenant, backbone])
        await s.flush()
        ids = []
        for i, offsets in arrivals.items():
            fn = Function(
                id=f"f{i}{tag}",
                tenant_id=tenant.id,
                name=f"fn{i}",
                backbone_id=backbone.id,
                price_input_micros_per_1m=0,
                price_output_micros_per_1m=0,
            )
            s.add(fn)
            await s.flush()
            art = AdapterArtifact(
                function_id=fn.id, tenant_id=tenant.id, version=1, bucket="b", prefix="p", sha256="0" * 64,
                rank=8, size_bytes=1,
            )  # fmt: skip
            s.add(art)
            await s.flush()
            for off in offsets:
                s.add(
                    Invocation(
                        tenant_id=tenant.id, function_id=fn.id, artifact_id=art.id, mode="sync", state="succeeded",
                        price_input_micros_per_1m=0, price_output_micros_per_1m=0,
                        accepted_at=BASE + timedelta(seconds=off),
                    )
                )  # fmt: skip
            ids.append(fn.id)
    await engine.dispose()
    return ids


async def _load(settings: Settings, now_s: float, capacity: int) -> ArrivalHistory:
    """What a freshly started control plane does: new engine, empty history, one query."""
    engine = make_engine(settings.database)
    try:
        history = ArrivalHistory(bucket_s=BUCKET_S, capacity=capacity)
        await HistoryStore(make_sessionmaker(engine)).load(history, now_s)
        return history
    finally:
        await engine.dispose()


async def test_history_survives_a_controlplane_restart(settings: Settings) -> None:
    # Function 0 every 30 s, function 1 in a burst at 50-59 s; 'now' is 120 s after BASE.
    f0, f1 = await _seed(settings, {0: [1.0, 31.0, 61.0, 91.0], 1: [50.0, 52.5, 59.9]})
    now_s = BASE.timestamp() + 120.0
    first = await _load(settings, now_s, capacity=12)
    b0 = first.bucket_of(BASE.timestamp())
    expected = np.zeros((12, 2))
    expected[[0, 3, 6, 9], 0] = 1
    expected[5, 1] = 3
    assert np.array_equal(first.matrix([f0, f1], b0, b0 + 11), expected)

    again = await _load(settings, now_s, capacity=12)  # the restart
    assert again.counts == first.counts

    # The predictor rebuilt from the reloaded history forecasts what the first one did.
    forecasts = []
    for history in (first, again):
        fc = Forecaster(lambda n: HazardHistogram(n, threshold=0.5, min_samples=2))
        assert fc.advance(history, b0 + 11) == 12
        forecasts.append(fc.forecast())
    assert forecasts[0] == forecasts[1]
    assert set(forecasts[0]) == {f0, f1}


async def test_history_is_bounded_in_memory(settings: Settings) -> None:
    await _seed(settings, {0: [float(s) for s in range(0, 400, 7)]})
    history = await _load(settings, BASE.timestamp() + 400.0, capacity=5)
    assert len(history.counts) == 5
    assert max(history.counts) == history.bucket_of(BASE.timestamp() + 400.0) - 1


async def test_prefetch_commands_come_before_each_forecast_burst_live(settings: Settings) -> None:
    """The advisor against real Postgres, its wall clock stepped through a periodic function's life."""
    from controlplane.scheduler.model import (
        AdapterSpec,
        ClusterView,
        CommandKind,
        Placement,
        Plan,
        WorkerState,
        WorkerView,
    )
    from controlplane.scheduler.prefetch import PredictiveAdvisor

    base = BASE + timedelta(days=1)
    offset = (base - BASE).total_seconds()
    # A burst of two invocations every 10 s (a cron-like function), for 160 s.
    (fn,) = await _seed(settings, {0: [offset + t + d for t in range(3, 160, 10) for d in (0.1, 0.6)]})
    engine = make_engine(settings.database)
    now = {"t": base.timestamp() + 60.0}
    try:
        advisor = PredictiveAdvisor(
            HistoryStore(make_sessionmaker(engine)),
            specs=lambda: {fn: AdapterSpec(fn, "tiny", 8, 1 << 20, 1)},
            bucket_s=1.0,
            capacity=600,
            make=lambda n: HazardHistogram(n, threshold=1.0),
            wall_clock=lambda: now["t"],
            grace_s=0.0,
        )
        await advisor.start()  # the first 60 s, as after a restart
        worker = WorkerView("w1", "tiny", WorkerState.ACTIVE, 16, 16)
        plan = Plan(placement=Placement(1, {fn: ("w1",)}))
        prefetched = []
        for t in range(60, 160):
            now["t"] = base.timestamp() + t
            await advisor.refresh()  # buckets up to t-1 are known
            cmds = advisor.advise(ClusterView(now_s=t, workers={"w1": worker}), {}, plan)
            if any(c.kind is CommandKind.PREFETCH and c.function_id == fn for c in cmds):
                prefetched.append(t)  # sent at the start of bucket t, for bucket t
        bursts = [t for t in range(60, 160) if t % 10 == 3]
        # Decided a bucket ahead (horizon 2: the loop's next decision may come a bucket late), and
        # again in the burst's bucket (this worker never reports it loaded); at no other time.
        assert prefetched == sorted({b - d for b in bursts for d in (0, 1)})
    finally:
        await engine.dispose()
