"""Routing with adapter affinity: which subject each invocation is published to.

The gateway watches the placement bucket (one ``PlacementTable`` per backbone, published by
the control plane's scheduler loop) and never asks the database where to route. For each
invocation it calls the pure routing policy (``controlplane.scheduler.routing.choose_worker``)
with the table's queue depths plus what this gateway sent since that table, and publishes to
the chosen worker's own subject. With no table yet, or no active worker in it, it publishes to
the backbone's shared subject, which every worker pulls. If the control plane goes away the
last table stays in force: workers keep serving what they hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter

from controlplane.scheduler.model import Placement, WorkerState
from controlplane.scheduler.routing import choose_worker
from lorafaas.errors import QuotaExceeded
from lorafaas.names import Names
from lorafaas.settings import SchedulerSettings
from lorafaas.streams import placement_bucket
from lorafaas.wire import Invocation, InvocationMode, PlacementTable

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 1.0  # the longest a gateway's shutdown waits for its placement watch
STALE_WATCH_S = 10.0  # no update for this long: the watch is re-opened (tables come every interval_s)


@dataclass
class RoutingTable:
    """One backbone's table as the policy reads it, with this gateway's sends since it arrived."""

    table: PlacementTable
    placement: Placement
    states: dict[str, WorkerState]
    sent: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, table: PlacementTable) -> RoutingTable:
        states = {w: WorkerState(r.state) for w, r in table.workers.items()}
        placement = Placement(table.version, {f: tuple(ws) for f, ws in table.replicas.items()}, states)
        return cls(table, placement, states)

    def depths(self) -> Mapping[str, int]:
        return {w: r.queued + self.sent.get(w, 0) for w, r in self.table.workers.items()}

    def finished(self, worker_id: str) -> None:
        """One of this gateway's sends since the table is done: it no longer adds to that worker's queue."""
        if self.sent.get(worker_id, 0) > 0:
            self.sent[worker_id] -= 1


class PlacementRouter:
    def __init__(
        self, js: JetStreamContext, names: Names, settings: SchedulerSettings, registry: CollectorRegistry
    ) -> None:
        self.js, self.names, self.settings = js, names, settings
        self.tables: dict[str, RoutingTable] = {}
        # Invocations this gateway routed under the current tables and waits on (sync, stream): when
        # one finishes, it leaves its worker's count, so a client's back-to-back requests do not add
        # up to a spill before the next table arrives. Cleared with each new table.
        self._routed: dict[str, tuple[str, str]] = {}  # invocation id -> (backbone, worker)
        self._turn = itertools.count()
        self._task: asyncio.Task | None = None
        self.routes = Counter(
            "lorafaas_gateway_routes_total",
            "Invocations by routing outcome: affinity (a holder), spill (another worker), shared (no table/worker)",
            ["outcome"],
            registry=registry,
        )
        self.sheds = Counter(
            "lorafaas_gateway_sheds_total", "Invocations refused with 429: every worker saturated", registry=registry
        )

    async def start(self) -> None:
        if self.settings.routing == "affinity":
            self._task = asyncio.create_task(self._watch(), name="placement-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: a watch cancelled inside a nats-py request can outlive the cancel; shutdown must not.
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)

    async def _watch(self) -> None:
        """Follow the bucket; on any failure or a silent spell, re-open the watch (the last tables stay)."""
        while True:
            watcher = None
            try:
                kv = await placement_bucket(self.js, self.names)
                watcher = await kv.watchall()
                while True:
                    entry = await watcher.updates(timeout=STALE_WATCH_S)
                    if entry is not None and entry.value:
                        self.apply(PlacementTable.decode(entry.value))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # NATS away or the watch went quiet: keep routing on the last tables
                log.debug("placement watch re-opened after %r", e)
                await asyncio.sleep(0.5)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(watcher.stop(), STOP_TIMEOUT_S)

    def apply(self, table: PlacementTable) -> None:
        self.tables[table.backbone] = RoutingTable.of(table)
        self._routed = {i: (b, w) for i, (b, w) in self._routed.items() if b != table.backbone}

    def finished(self, invocation_id: str) -> None:
        """The result of an invocation this gateway routed (and waited on) has arrived."""
        routed = self._routed.pop(invocation_id, None)
        if routed is not None and routed[0] in self.tables:
            self.tables[routed[0]].finished(routed[1])

    def admit(self, backbone: str) -> None:
        """429 with Retry-After when the control plane shed the backbone (every worker saturated)."""
        current = self.tables.get(backbone)
        if current is not None and current.table.shed:
            self.sheds.inc()
            raise QuotaExceeded(
                f"every worker of backbone {backbone!r} is saturated; retry shortly",
                retry_after_s=current.table.retry_after_s,
                backbone=backbone,
            )

    def subject_for(self, invocation: Invocation) -> str:
        current = self.tables.get(invocation.backbone)
        if current is not None:
            choice = choose_worker(
                invocation.adapter.function_id,
                current.placement,
                current.depths(),
                current.states,
                current.table.spill_threshold,
                next(self._turn),
                current.table.warming.get(invocation.adapter.function_id, ()),
            )
            if choice is not None:
                current.sent[choice.worker_id] = current.sent.get(choice.worker_id, 0) + 1
                if invocation.mode != InvocationMode.ASYNC:  # the gateway hears its result
                    self._routed[invocation.invocation_id] = (invocation.backbone, choice.worker_id)
                self.routes.labels("spill" if choice.spilled else "affinity").inc()
                return self.names.invoke_worker_subject(invocation.backbone, choice.worker_id)
        self.routes.labels("shared").inc()
        return self.names.invoke_subject(invocation.backbone)
