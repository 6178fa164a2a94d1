"""The thin loop around the pure policies: read the world, call ``plan``, carry out the decisions.

Every ``interval_s``: refresh the catalog (functions and their adapters, from Postgres, every
few seconds) and each worker's own-subject backlog (JetStream), take a ``ClusterView`` from the
tracker, estimate demand, call the placement policy, then

1. publish one ``PlacementTable`` per backbone to the placement bucket (gateways watch it);
2. send the plan's worker commands (prefetch / offload / evict), plus what keeps the workers in
   step with the table: a placed adapter a worker lacks is prefetched, a joining worker is
   activated once its placements are on its device, a draining worker is told to drain;
3. re-route the queue of every dead worker (``reroute``).

Commands run as background requests (one at a time per worker and adapter), so a slow
prefetch never delays a round. Extra decisions (a demand predictor's prefetches and
unloads) plug in as ``advisors``; a predictor can also stand in for ``demand``.

With ``scheduler.predictor`` set to "hazard", the loop runs the ``PredictiveAdvisor``
(``prefetch``): it prefetches each placed adapter before its forecast arrival and unloads it
when it is forecast idle. An advisor that ``owns`` a function's residency takes it over from
step 2: neither keep-in-step nor the plan's "placed" prefetch loads it back (they would undo
every unload), and a joining worker does not wait for it before activation. "reactive" loads
nothing ahead of an invocation (``OnDemand``); "off" keeps every placed adapter loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from controlplane.scheduler import placement
from controlplane.scheduler.history import HistoryStore
from controlplane.scheduler.hysteresis import MoveBudget
from controlplane.scheduler.metrics import SchedulerMetrics
from controlplane.scheduler.model import (
    AdapterSpec,
    ClusterView,
    Command,
    CommandKind,
    Demand,
    Placement,
    PlacementConfig,
    Plan,
    Tier,
    WorkerState,
)
from controlplane.scheduler.prefetch import PREDICTORS, OnDemand, PredictiveAdvisor
from controlplane.scheduler.reroute import Rerouter
from controlplane.scheduler.routing import warming_replicas
from controlplane.scheduler.view import ClusterTracker, ReportedDemand, adapter_spec
from controlplane.services import functions as function_service
from lorafaas import wire
from lorafaas.names import Names
from lorafaas.settings import Settings
from lorafaas.streams import placement_bucket

log = logging.getLogger(__name__)

CATALOG_REFRESH_S = 2.0
PREFETCH_RETRY_S = 30.0  # a failed or unfinished prefetch of the same adapter is retried after this
COMMAND_TIMEOUT_S = 120.0  # a prefetch downloads, copies and warms up the adapter
WARMUP_S = 2.0  # after a (re)start, reports arrive before the loop acts on an empty view
ACTIVATE_RETRY_S = 3.0  # its next report says active; until then, do not send it again
HISTORY_GRACE_S = 0.5  # a bucket's invocations are counted this long after it ends (late commits)
ADVISED_SETTLE_S = 1.5  # a worker's next report (every 1 s by default) shows an advised command carried out
ON_DEVICE = (Tier.DEVICE,)
HELD = (Tier.DEVICE, Tier.HOST)

PolicyFn = Callable[
    [ClusterView, Mapping[str, Demand], Mapping[str, AdapterSpec], Placement, PlacementConfig, int], Plan
]
POLICIES: dict[str, PolicyFn] = {"rank-aware": placement.plan, "rank-oblivious": placement.rank_oblivious_plan}


class DemandSource(Protocol):
    def estimate(self, view: ClusterView, catalog: dict[str, AdapterSpec]) -> dict[str, Demand]: ...


class Advisor(Protocol):
    """Extra decisions on top of a plan (e.g. a predictor's prefetches and unloads)."""

    def advise(self, view: ClusterView, demand: Mapping[str, Demand], plan: Plan) -> Iterable[Command]: ...

    def owns(self, function_id: str) -> bool:
        """True where the advisor alone decides the function's device residency."""
        ...


@dataclass(frozen=True)
class CatalogEntry:
    ref: wire.AdapterRef
    backbone: str
    rank: int
    size_bytes: int


class SchedulerLoop:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        sessions: async_sessionmaker[AsyncSession],
        names: Names,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nc, self.js, self.sessions, self.names, self.clock = nc, js, sessions, names, clock
        self.settings = settings.scheduler
        self.tracker = ClusterTracker(names, self.settings.dead_after_s, clock)
        self.metrics = SchedulerMetrics()
        self.rerouter = Rerouter(js, names, settings.nats.ack_wait_s)
        self.policy = POLICIES[self.settings.policy]
        self.config = PlacementConfig(
            contended_queue=self.settings.contended_queue, saturated_queue=self.settings.saturated_queue
        )
        self.move_budget = MoveBudget(self.settings.moves_per_minute_per_worker)
        self.demand: DemandSource = ReportedDemand()
        self.advisors: list[Advisor] = []
        self.predictor: PredictiveAdvisor | None = None
        self._predictor_task: asyncio.Task | None = None
        self.placement = Placement(0, {}, {})
        self.last_plan: Plan | None = None
        self.catalog: dict[str, CatalogEntry] = {}
        self.tables: dict[str, wire.PlacementTable] = {}
        self.kv: KeyValue | None = None
        self._catalog_at = -1e9
        self._started = clock()
        self._tasks: dict[tuple[str, str, str], asyncio.Task] = {}
        self._tried: dict[tuple[str, str], float] = {}  # (worker, function) -> last prefetch sent
        self._activated: dict[str, float] = {}  # worker -> when activate was last sent
        self._advised: dict[tuple[str, str, str], float] = {}  # an advisor's command -> when last sent
        self._drained: set[str] = set()  # drain command answered: the worker stopped pulling
        self._stopping = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.tracker.start(self.nc)
        self.kv = await placement_bucket(self.js, self.names)
        await self._restore()
        if self.settings.predictor != "off":
            await self._start_predictor()

    async def _start_predictor(self) -> None:
        if self.settings.predictor == "reactive":
            self.advisors.append(OnDemand())
            return
        make = PREDICTORS.get(self.settings.predictor)
        if make is None:
            known = ", ".join(["off", "reactive", *PREDICTORS])
            raise ValueError(f"unknown scheduler.predictor {self.settings.predictor!r}; one of {known}")
        threshold, bucket_s = self.settings.predictor_threshold, self.settings.predictor_bucket_s
        # A bucket is counted HISTORY_GRACE_S after it ends, at the next refresh (every half bucket), and
        # acted on at the next round: decide for every bucket that starts within that lag too.
        late = (HISTORY_GRACE_S + bucket_s / 2 + self.settings.interval_s) / bucket_s
        self.predictor = PredictiveAdvisor(
            HistoryStore(self.sessions),
            self.specs,
            bucket_s=bucket_s,
            make=lambda n: make(n, threshold),
            grace_s=HISTORY_GRACE_S,
            horizon=1 + math.ceil(late),
        )
        try:
            await self.predictor.start()
        except (OperationalError, DBAPIError, OSError) as e:  # its run task loads the history once Postgres is back
            log.warning("arrival history not loaded yet: %s", e)
        self.advisors.append(self.predictor)
        self._predictor_task = asyncio.create_task(self.predictor.run(), name="predictor-history")

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.round()
            except Exception:  # one bad round must not end scheduling; the next one retries
                log.exception("scheduler round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.interval_s)

    def stop(self) -> None:
        self._stopping.set()
        if self.predictor is not None:
            self.predictor.stop()

    async def close(self) -> None:
        if self.predictor is not None:
            self.predictor.stop()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), *filter(None, [self._predictor_task]), return_exceptions=True)
        await self.tracker.stop()

    async def _restore(self) -> None:
        """Start from the table the previous control plane published: no churn across a restart."""
        replicas: dict[str, tuple[str, ...]] = {}
        version = 0
        kv = self.kv
        with contextlib.suppress(NotFoundError, KeyNotFoundError, NoKeysError):
            for key in await kv.keys() if kv is not None else []:
                entry = await kv.get(key)  # type: ignore[union-attr]
                if not entry.value:
                    continue
                table = wire.PlacementTable.decode(entry.value)
                self.tables[table.backbone] = table
                version = max(version, table.version)
                replicas.update({f: tuple(ws) for f, ws in table.replicas.items()})
        self.placement = Placement(version, replicas, {})

    # --- one round ---------------------------------------------------------------------------
    async def round(self) -> Plan | None:
        now = self.clock()
        await self._refresh_catalog(now)
        await self._refresh_backlogs()
        view = self.tracker.view()
        if now - self._started < WARMUP_S:
            return None
        specs = self.specs()
        demand = self.demand.estimate(view, specs)
        config = self.config
        if not view.joining():
            live = sum(1 for v in view.workers.values() if v.state != WorkerState.DEAD)
            config = replace(config, max_moves=min(config.max_moves, self.move_budget.available(now, live)))
        plan = self.policy(view, demand, specs, self.placement, config, self.settings.seed)
        self.move_budget.spend(now, plan.moves - plan.forced_moves)
        extra = [c for advisor in self.advisors for c in advisor.advise(view, demand, plan)]
        self.placement, self.last_plan = plan.placement, plan
        await self._publish(view, plan)
        # The plan's "placed" prefetches of an owned function are the advisor's to make (or not).
        planned = [c for c in plan.commands if c.kind != CommandKind.PREFETCH or not self._owned(c.function_id)]
        for c in (*planned, *self._unrepeated(extra), *self._keep_in_step(view, plan.placement)):
            self._send(c.worker_id, wire.CommandKind(str(c.kind)), c.function_id, c.reason)
        for w in self._ready_to_activate(view, plan.placement):
            self._send(w, wire.CommandKind.ACTIVATE, None, "placements prefetched")
        await self._lifecycle(view, now)
        moved = await self.rerouter.sweep(now, self.settings.reroute_ttl_s)
        self._count(view, plan, moved)
        return plan

    def specs(self) -> dict[str, AdapterSpec]:
        page_bytes = {b: self.tracker.page_bytes(b) for b in {e.backbone for e in self.catalog.values()}}
        return {
            f: adapter_spec(f, e.backbone, e.rank, e.size_bytes, page_bytes[e.backbone])
            for f, e in self.catalog.items()
        }

    async def _refresh_catalog(self, now: float) -> None:
        if now - self._catalog_at < CATALOG_REFRESH_S:
            return
        try:
            async with self.sessions() as session:
                served = await function_service.list_all_functions(session)
        except (OperationalError, DBAPIError, OSError) as e:  # Postgres away: plan on the last catalog
            log.warning("catalog refresh failed, planning on the last one: %s", e)
            return
        self._catalog_at = now
        self.catalog = {
            s.function.id: CatalogEntry(s.adapter_ref(), s.backbone.name, s.artifact.rank, s.artifact.size_bytes)
            for s in served
        }

    async def _refresh_backlogs(self) -> None:
        """Each live worker's backlog on its own subject (pulled work is in its report)."""
        for seen in self.tracker.workers.values():
            if self.tracker.state_of(seen, self.clock()) == WorkerState.DEAD:
                continue
            try:
                info = await self.js.consumer_info(
                    self.names.invocations_stream, self.names.worker_own_consumer(seen.worker_id)
                )
                seen.stream_queued = info.num_pending or 0
            except NotFoundError:  # not pulling yet
                seen.stream_queued = 0

    # --- carrying it out -----------------------------------------------------------------------
    def _table_for(
        self, backbone: str, view: ClusterView, plan: Plan, warming: dict[str, tuple[str, ...]]
    ) -> wire.PlacementTable:
        functions = {f for f, e in self.catalog.items() if e.backbone == backbone}
        workers = {w: v for w, v in view.workers.items() if v.backbone == backbone}
        active = [v for v in workers.values() if v.state == WorkerState.ACTIVE]
        return wire.PlacementTable(
            backbone=backbone,
            version=plan.placement.version,
            replicas={f: list(ws) for f, ws in plan.placement.replicas.items() if f in functions},
            warming={f: list(ws) for f, ws in warming.items() if f in functions},
            workers={
                w: wire.RoutedWorker(state=v.state.value, queued=v.queued + self.tracker.workers[w].stream_queued)
                for w, v in workers.items()
            },
            spill_threshold=self.settings.spill_threshold,
            # The policy sheds a backbone with no active worker too; with none, the shared subject
            # still holds the work for the next one to join, so only a saturated one is shed.
            shed=backbone in plan.shed and bool(active),
            retry_after_s=self.settings.retry_after_s,
        )

    async def _publish(self, view: ClusterView, plan: Plan) -> None:
        backbones = {e.backbone for e in self.catalog.values()} | {v.backbone for v in view.workers.values()}
        warming = warming_replicas(plan.placement, view)  # every backbone's, once per round
        for backbone in sorted(backbones):
            table = self._table_for(backbone, view, plan, warming)
            self.tables[backbone] = table
            try:
                if self.kv is None:
                    raise RuntimeError("the placement bucket is not open (start() first)")
                await self.kv.put(self.names.placement_key(backbone), table.encode())
            except Exception as e:  # NATS away: gateways route on the last table they saw
                log.warning("could not publish the placement table of %s: %r", backbone, e)

    def _unrepeated(self, commands: list[Command]) -> list[Command]:
        """An advisor's command, unless the same one went to the same worker within ``ADVISED_SETTLE_S``.

        The advisor decides every round from the reported tiers, and a worker reports a finished
        prefetch or offload only on its next report: without this each decision went out twice.
        """
        now = self.clock()
        out = []
        for c in commands:
            key = (c.worker_id, str(c.kind), c.function_id or "")
            if now - self._advised.get(key, -1e9) >= ADVISED_SETTLE_S:
                self._advised[key] = now
                out.append(c)
        return out

    def _owned(self, function_id: str | None) -> bool:
        """Whether an advisor decides this function's residency (then the loop does not load it)."""
        return function_id is not None and any(a.owns(function_id) for a in self.advisors)

    def _keep_in_step(self, view: ClusterView, placed: Placement) -> list[Command]:
        """Prefetch what a worker is placed to hold and lacks (a restart, a lost command, a joining worker).

        Not a function an advisor owns: a predictor that scaled it to zero meant it.
        """
        out: list[Command] = []
        now = self.clock()
        for fn, holders in sorted(placed.replicas.items()):
            if self._owned(fn):
                continue
            for w in holders:
                v = view.workers.get(w)
                if v is None or v.state not in (WorkerState.ACTIVE, WorkerState.JOINING) or v.tiers.get(fn) in HELD:
                    continue
                if now - self._tried.get((w, fn), -1e9) > PREFETCH_RETRY_S:
                    out.append(Command(w, CommandKind.PREFETCH, fn, "placed, not held"))
        return out

    def _ready_to_activate(self, view: ClusterView, placed: Placement) -> list[str]:
        """Joining workers whose placements are on their device (or were tried): they may take traffic."""
        ready = []
        now = self.clock()
        for w, v in view.workers.items():
            if v.state != WorkerState.JOINING or any(k[0] == w for k in self._tasks):
                continue
            # Its pool is known only from a report: before one, nothing could be placed on it.
            if self.tracker.workers[w].report is None or now - self._activated.get(w, -1e9) < ACTIVATE_RETRY_S:
                continue
            mine = [fn for fn, hs in placed.replicas.items() if w in hs and not self._owned(fn)]
            if all(v.tiers.get(fn) in ON_DEVICE or (w, fn) in self._tried for fn in mine):
                ready.append(w)
        return ready

    def _send(self, worker_id: str, kind: wire.CommandKind, function_id: str | None, reason: str) -> None:
        """One command as a background request; the same (worker, kind, adapter) is never in flight twice."""
        key = (worker_id, kind.value, function_id or "")
        if key in self._tasks:
            return
        adapter = None
        if function_id is not None:
            entry = self.catalog.get(function_id)
            if entry is None:
                return
            adapter = entry.ref
        if kind == wire.CommandKind.PREFETCH and function_id:
            self._tried[(worker_id, function_id)] = self.clock()
        if kind == wire.CommandKind.ACTIVATE:
            self._activated[worker_id] = self.clock()
        message = wire.WorkerCommand(command=kind, adapter=adapter)
        task = asyncio.create_task(self._request(worker_id, message, reason), name=f"command-{key}")
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))

    async def _request(self, worker_id: str, message: wire.WorkerCommand, reason: str) -> bool:
        kind = message.command.value
        function_id = message.adapter.function_id if message.adapter else ""
        try:
            reply = await self.nc.request(
                self.names.worker_command_subject(worker_id), message.encode(), timeout=COMMAND_TIMEOUT_S
            )
            ok = bool(json.loads(reply.data).get("ok"))
        except Exception as e:  # the worker is gone or busy: the next rounds decide again
            log.warning("command %s to %s failed: %r", kind, worker_id, e)
            ok = False
        self.metrics.commands.labels(kind, "ok" if ok else "failed").inc()
        log.info("command %s %s -> %s (%s): %s", kind, function_id, worker_id, reason, "ok" if ok else "failed")
        if ok and message.command == wire.CommandKind.DRAIN:
            self._drained.add(worker_id)
        return ok

    async def _lifecycle(self, view: ClusterView, now: float) -> None:
        """Drain what an operator asked to drain; re-route the queues of dead workers; forget the long gone."""
        for w, v in view.workers.items():
            seen = self.tracker.workers[w]
            if v.state == WorkerState.DRAINING and seen.drain_requested and w not in self._drained:
                self._send(w, wire.CommandKind.DRAIN, None, "operator drain")
            elif v.state == WorkerState.DEAD:
                reason = "drained" if (seen.drain_requested or seen.reported_state == "draining") else "dead"
                if self.rerouter.adopt(w, v.backbone, now, reason):
                    log.warning("worker %s is %s: its functions are re-placed, its queue re-routed", w, reason)
                if now - seen.last_seen_s > self.settings.reroute_ttl_s:
                    self.tracker.forget(w)
                    self._drained.discard(w)
            elif w in self.rerouter.orphans:  # back under the same id: its subject is its own again
                await self.rerouter.release(w)

    def _count(self, view: ClusterView, plan: Plan, moved: dict[str, int]) -> None:
        m = self.metrics
        m.rounds.inc()
        m.moves.labels("forced").inc(plan.forced_moves)
        m.moves.labels("optional").inc(max(0, plan.moves - plan.forced_moves))
        for w, n in moved.items():
            m.reroutes.labels(self.rerouter.orphans[w].reason if w in self.rerouter.orphans else "dead").inc(n)
        for backbone, table in self.tables.items():
            if table.shed:
                m.sheds.labels(backbone).inc()
        for state in WorkerState:
            m.workers.labels(state.value).set(sum(1 for v in view.workers.values() if v.state == state))
        m.table_version.set(plan.placement.version)
        for w, seen in self.tracker.workers.items():
            if seen.report is not None:
                m.adapter_loads.labels(w).set(seen.report.adapter_loads)
                m.peer_fetches.labels(w).set(seen.report.peer_fetches)

    # --- operator view -------------------------------------------------------------------------
    def drain(self, worker_id: str) -> WorkerState | None:
        """Ask for a worker to be drained; None if the worker is unknown."""
        seen = self.tracker.request_drain(worker_id)
        return None if seen is None else self.tracker.state_of(seen, self.clock())

    def states(self) -> dict[str, WorkerState]:
        now = self.clock()
        return {w: self.tracker.state_of(s, now) for w, s in self.tracker.workers.items()}

    def describe(self) -> dict:
        """``GET /admin/placement``: per worker, its placed functions, adapters by tier and load."""
        view = self.tracker.view()
        workers = {}
        for w, v in view.workers.items():
            seen = self.tracker.workers[w]
            report = seen.report
            workers[w] = {
                "backbone": v.backbone,
                "state": v.state.value,
                "functions": sorted(f for f, hs in self.placement.replicas.items() if w in hs),
                "adapters": {
                    tier.value: sorted(f for f, t in v.tiers.items() if t == tier)
                    for tier in (Tier.DEVICE, Tier.HOST, Tier.DISK)
                },
                "load": {
                    "queued": v.queued + seen.stream_queued,
                    "running_batch": v.running_batch,
                    "rank_mix": {str(k): n for k, n in sorted(v.rank_mix.items())},
                    "tokens_per_s": v.tokens_per_s,
                    "step_latency_p50_s": v.step_latency_p50_s,
                    "step_latency_p95_s": v.step_latency_p95_s,
                    "pool_pages_free": v.pool_pages_free,
                    "pool_pages_total": v.pool_pages_total,
                    "planned_load": (self.last_plan.worker_load.get(w, 0.0) if self.last_plan else 0.0),
                },
                "adapter_loads": report.adapter_loads if report else 0,
                "peer_fetches": report.peer_fetches if report else 0,
                "last_report_age_s": round(view.now_s - v.last_report_s, 3),
            }
        return {
            "policy": self.settings.policy,
            "version": self.placement.version,
            "replicas": {f: list(ws) for f, ws in sorted(self.placement.replicas.items()) if f in self.catalog},
            "shed": sorted(b for b, t in self.tables.items() if t.shed),
            "rerouted": self.rerouter.moved,
            "rerouting": sorted(self.rerouter.orphans),
            "workers": workers,
        }
