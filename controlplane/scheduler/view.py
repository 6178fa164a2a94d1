"""The cluster view: what the control plane knows of each worker, rebuilt from its reports.

Workers publish a ``ContentionReport`` every ``report_interval_s`` and a ``WorkerHeartbeat``
on core NATS (lossy by design: the next one repairs a lost one). The tracker keeps the
latest of each per worker, with the control plane's receive time, and turns them into the
frozen ``ClusterView`` the policies read. A worker silent for ``dead_after_s`` is dead; one
an operator asked to drain is draining from that moment, whatever it reports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from controlplane.scheduler.model import AdapterSpec, ClusterView, Demand, Tier, WorkerState, WorkerView
from lorafaas.names import Names
from lorafaas.wire import ContentionReport, WorkerHeartbeat

log = logging.getLogger(__name__)

TIER_ORDER = {Tier.S3: 0, Tier.DISK: 1, Tier.HOST: 2, Tier.DEVICE: 3}


@dataclass
class Seen:
    """One worker as the control plane last heard it."""

    worker_id: str
    backbone: str
    first_seen_s: float
    last_seen_s: float
    reported_state: str = "joining"
    report: ContentionReport | None = None
    drain_requested: bool = False
    stream_queued: int = 0  # invocations waiting on its own subject, not yet pulled (set by the loop)


@dataclass
class ClusterTracker:
    """Subscribes to reports and heartbeats; hands out ``ClusterView`` snapshots."""

    names: Names
    dead_after_s: float
    clock: Callable[[], float]
    workers: dict[str, Seen] = field(default_factory=dict)
    _subs: list[Subscription] = field(default_factory=list)

    async def start(self, nc: NATS) -> None:
        self._subs = [
            await nc.subscribe(self.names.contention_subject, cb=self._on_report),
            await nc.subscribe(self.names.heartbeat_subject, cb=self._on_beat),
        ]

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []

    async def _on_report(self, msg: Msg) -> None:
        try:
            self.observe_report(ContentionReport.decode(msg.data))
        except ValidationError as e:
            log.error("dropping undecodable contention report: %s", e)

    async def _on_beat(self, msg: Msg) -> None:
        try:
            self.observe_beat(WorkerHeartbeat.decode(msg.data))
        except ValidationError as e:
            log.error("dropping undecodable heartbeat: %s", e)

    # --- what arrives ------------------------------------------------------------------------
    def _seen(self, worker_id: str, backbone: str) -> Seen:
        now = self.clock()
        seen = self.workers.get(worker_id)
        if seen is None or now - seen.last_seen_s > self.dead_after_s:  # new, or back after its death
            if seen is not None:
                log.info("worker %s is back after %.1fs of silence", worker_id, now - seen.last_seen_s)
            seen = self.workers[worker_id] = Seen(worker_id, backbone, now, now)
        seen.last_seen_s = now
        return seen

    def observe_report(self, report: ContentionReport) -> None:
        seen = self._seen(report.worker_id, report.backbone)
        seen.report, seen.reported_state = report, report.state

    def observe_beat(self, beat: WorkerHeartbeat) -> None:
        self._seen(beat.worker_id, beat.backbone).reported_state = beat.state

    def request_drain(self, worker_id: str) -> Seen | None:
        seen = self.workers.get(worker_id)
        if seen is not None:
            seen.drain_requested = True
        return seen

    def forget(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    # --- what the policies read --------------------------------------------------------------
    def state_of(self, seen: Seen, now: float) -> WorkerState:
        if now - seen.last_seen_s > self.dead_after_s:
            return WorkerState.DEAD
        if seen.drain_requested or seen.reported_state == "draining":
            return WorkerState.DRAINING
        return WorkerState.JOINING if seen.reported_state == "joining" else WorkerState.ACTIVE

    def view(self) -> ClusterView:
        now = self.clock()
        return ClusterView(now_s=now, workers={w: self.worker_view(s, now) for w, s in sorted(self.workers.items())})

    def worker_view(self, seen: Seen, now: float) -> WorkerView:
        r = seen.report
        state = self.state_of(seen, now)
        if r is None:
            return WorkerView(seen.worker_id, seen.backbone, state, 0, 0, last_report_s=seen.last_seen_s)
        tiers: dict[str, Tier] = {}
        for a in r.adapters:
            tier = Tier(a.tier)
            if a.function_id not in tiers or TIER_ORDER[tier] > TIER_ORDER[tiers[a.function_id]]:
                tiers[a.function_id] = tier
        # In flight on the worker, by function; what still waits on its own subject is in
        # ``stream_queued`` (the stream does not say which function a message is for).
        depth = dict(r.queue_depth)
        return WorkerView(
            worker_id=seen.worker_id,
            backbone=seen.backbone,
            state=state,
            pool_pages_total=r.pool_pages_used + r.pool_pages_free,
            pool_pages_free=r.pool_pages_free,
            tiers=tiers,
            queue_depth=depth,
            running_batch=r.running_batch,
            rank_mix=dict(r.rank_mix),
            step_latency_p50_s=r.step_latency_p50_s,
            step_latency_p95_s=r.step_latency_p95_s,
            tokens_per_s=r.tokens_per_s,
            last_report_s=seen.last_seen_s,
        )

    def page_bytes(self, backbone: str) -> int:
        """Bytes of one device pool page on this backbone's workers (0 before any report)."""
        for seen in self.workers.values():
            if seen.backbone == backbone and seen.report is not None and seen.report.pool_page_bytes:
                return seen.report.pool_page_bytes
        return 0


def adapter_spec(function_id: str, backbone: str, rank: int, size_bytes: int, page_bytes: int) -> AdapterSpec:
    """What the policies know of an adapter; its pages from the pool's page size once a worker reported it."""
    pages = max(1, math.ceil(size_bytes / page_bytes)) if page_bytes else 1
    return AdapterSpec(function_id=function_id, backbone=backbone, rank=rank, bytes=size_bytes, pages=pages)


@dataclass
class ReportedDemand:
    """Demand as the reports show it: an EWMA of each function's queued and running invocations.

    Tokens/s of a function: each worker's tokens/s shared by its functions in proportion to
    their invocations on it. A predictor (P-LoRA) can stand in for this source: the loop
    only calls ``estimate``.
    """

    alpha: float = 0.3
    _requests: dict[str, float] = field(default_factory=dict)
    _tokens: dict[str, float] = field(default_factory=dict)

    def estimate(self, view: ClusterView, catalog: dict[str, AdapterSpec]) -> dict[str, Demand]:
        requests = dict.fromkeys(catalog, 0.0)
        tokens = dict.fromkeys(catalog, 0.0)
        for w in view.workers.values():
            if w.state == WorkerState.DEAD:
                continue
            total = sum(n for f, n in w.queue_depth.items() if f in catalog) or 1
            for f, n in w.queue_depth.items():
                if f in catalog:
                    requests[f] += n
                    tokens[f] += w.tokens_per_s * n / total
        for f in catalog:
            self._requests[f] = (1 - self.alpha) * self._requests.get(f, 0.0) + self.alpha * requests[f]
            self._tokens[f] = (1 - self.alpha) * self._tokens.get(f, 0.0) + self.alpha * tokens[f]
        return {f: Demand(f, self._requests[f], self._tokens[f]) for f in catalog}
