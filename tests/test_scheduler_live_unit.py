"""The scheduler's live pieces without I/O: the cluster view from reports, and the gateway's router."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from controlplane.scheduler.model import Tier, WorkerState
from controlplane.scheduler.view import ClusterTracker, ReportedDemand, adapter_spec
from gateway.router import PlacementRouter
from lorafaas.errors import QuotaExceeded
from lorafaas.names import Names
from lorafaas.settings import SchedulerSettings
from lorafaas.wire import (
    AdapterRef,
    AdapterResidency,
    ContentionReport,
    Invocation,
    PlacementTable,
    RoutedWorker,
    SamplingParams,
    WorkerHeartbeat,
)

pytestmark = pytest.mark.unit

NAMES = Names("unit")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(worker: str, state: str = "active", **kw) -> ContentionReport:
    return ContentionReport(worker_id=worker, backbone="bb", state=state, pool_pages_used=2, pool_pages_free=6, **kw)


def test_worker_states_follow_reports_drain_requests_and_silence() -> None:
    clock = Clock()
    tracker = ClusterTracker(NAMES, dead_after_s=2.0, clock=clock)
    from datetime import UTC, datetime

    tracker.observe_beat(
        WorkerHeartbeat(worker_id="w1", backbone="bb", device="cpu", started_at=datetime.now(UTC), state="joining")
    )
    assert tracker.view().workers["w1"].state == WorkerState.JOINING
    tracker.observe_report(
        report(
            "w1",
            "joining",
            adapters=[
                AdapterResidency(function_id="f", rank=8, tier="disk"),
                AdapterResidency(function_id="f", rank=8, tier="device", bytes=10),
            ],
            queue_depth={"f": 3},
            rank_mix={8: 3},
        )
    )
    w1 = tracker.view().workers["w1"]
    assert w1.state == WorkerState.JOINING and w1.tiers == {"f": Tier.DEVICE} and w1.pool_pages_total == 8
    assert w1.queued == 3 and w1.rank_mix == {8: 3}
    tracker.observe_report(report("w1"))
    assert tracker.view().workers["w1"].state == WorkerState.ACTIVE
    tracker.request_drain("w1")
    assert tracker.view().workers["w1"].state == WorkerState.DRAINING
    assert tracker.request_drain("nobody") is None
    clock.now += 2.5
    assert tracker.view().workers["w1"].state == WorkerState.DEAD
    tracker.observe_report(report("w1", "joining"))  # a new process under the same id: a fresh start
    assert tracker.view().workers["w1"].state == WorkerState.JOINING


def test_reported_demand_shares_tokens_by_queue() -> None:
    tracker = ClusterTracker(NAMES, dead_after_s=2.0, clock=Clock())
    tracker.observe_report(report("w1", queue_depth={"a": 3, "b": 1}, tokens_per_s=100.0))
    catalog = {f: adapter_spec(f, "bb", 8, 1000, 0) for f in ("a", "b", "c")}
    demand = ReportedDemand(alpha=1.0).estimate(tracker.view(), catalog)
    assert demand["a"].tokens_per_s == pytest.approx(75.0) and demand["b"].requests_per_s == 1.0
    assert demand["c"].requests_per_s == 0.0
    assert adapter_spec("a", "bb", 8, 1000, 300).pages == 4 and adapter_spec("a", "bb", 8, 1000, 0).pages == 1


def invocation(function_id: str, invocation_id: str = "i") -> Invocation:
    ref = AdapterRef(function_id=function_id, bucket="b", prefix="p", sha256="0" * 64, rank=8)
    return Invocation(
        invocation_id=invocation_id,
        tenant_id="t",
        backbone="bb",
        adapter=ref,
        prompt="x",
        sampling=SamplingParams(max_tokens=1),
    )


def table(queued: dict[str, int], shed: bool = False) -> PlacementTable:
    return PlacementTable(
        backbone="bb",
        version=1,
        replicas={"f": ["w1"]},
        workers={w: RoutedWorker(state="active", queued=q) for w, q in queued.items()},
        spill_threshold=2,
        shed=shed,
    )


def test_router_affinity_then_spill_then_shared_and_shed() -> None:
    router = PlacementRouter(None, NAMES, SchedulerSettings(), CollectorRegistry())  # type: ignore[arg-type]
    assert router.subject_for(invocation("f")) == NAMES.invoke_subject("bb")  # no table yet: the shared queue
    router.apply(table({"w1": 0, "w2": 0}))
    own = NAMES.invoke_worker_subject("bb", "w1")
    # The holder takes the first three (its depth counts this gateway's sends), then others get the spill.
    assert [router.subject_for(invocation("f")) for _ in range(3)] == [own] * 3
    assert router.subject_for(invocation("f")) == NAMES.invoke_worker_subject("bb", "w2")
    assert router.routes.labels("spill")._value.get() == 1 and router.routes.labels("affinity")._value.get() == 3
    router.apply(table({"w1": 0, "w2": 0}))  # a new table resets what this gateway counted
    assert router.subject_for(invocation("f")) == own
    router.admit("bb")
    router.apply(table({"w1": 99, "w2": 99}, shed=True))
    with pytest.raises(QuotaExceeded) as e:
        router.admit("bb")
    assert e.value.retry_after_s == 1.0


def test_router_forgets_a_send_once_its_result_is_heard() -> None:
    """Back-to-back requests of one client do not add up to a spill before the next table arrives."""
    router = PlacementRouter(None, NAMES, SchedulerSettings(), CollectorRegistry())  # type: ignore[arg-type]
    router.apply(table({"w1": 0, "w2": 0}))
    own = NAMES.invoke_worker_subject("bb", "w1")
    for n in range(10):  # each one finished before the next is sent
        assert router.subject_for(invocation("f", f"i{n}")) == own
        router.finished(f"i{n}")
    assert router.routes.labels("spill")._value.get() == 0
    for n in range(10, 13):  # not finished: they count
        assert router.subject_for(invocation("f", f"i{n}")) == own
    assert router.subject_for(invocation("f", "i13")) == NAMES.invoke_worker_subject("bb", "w2")
    router.finished("unknown")  # a result of an invocation routed elsewhere changes nothing


def test_router_keeps_a_replica_that_is_still_loading_for_spills() -> None:
    """The table's ``warming`` replica gets traffic only once the ready holder is past the threshold."""
    router = PlacementRouter(None, NAMES, SchedulerSettings(), CollectorRegistry())  # type: ignore[arg-type]
    loading = table({"w1": 0, "w2": 0}).model_copy(update={"replicas": {"f": ["w1", "w2"]}, "warming": {"f": ["w2"]}})
    router.apply(PlacementTable.decode(loading.encode()))  # as the gateway reads it from the bucket
    subjects = [router.subject_for(invocation("f", f"i{n}")) for n in range(4)]
    assert subjects == [NAMES.invoke_worker_subject("bb", "w1")] * 3 + [NAMES.invoke_worker_subject("bb", "w2")]
    assert router.routes.labels("spill")._value.get() == 0  # w2 holds a placement: not a spill
