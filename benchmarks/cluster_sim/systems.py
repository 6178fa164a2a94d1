"""The systems compared, each a routing + placement + worker-mode combination.

``lorafaas`` and ``rank-oblivious`` call the production policies of ``controlplane.scheduler``
(``placement.plan`` / ``placement.rank_oblivious_plan``, ``routing.choose_worker`` /
``routing.least_loaded``) unchanged: the simulator only builds their input (a ``ClusterView``
of its workers, the demand measured over the last planning window, the catalog) and carries out
their output (placement table, PREFETCH/OFFLOAD commands, shed). The other systems have no
policy of ours to run: they are the baselines' own rules, written here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from controlplane.scheduler import placement as placement_policy
from controlplane.scheduler import routing as routing_policy
from controlplane.scheduler.model import (
    AdapterSpec,
    ClusterView,
    CommandKind,
    Demand,
    Placement,
    PlacementConfig,
    Tier,
    WorkerState,
    WorkerView,
)
from controlplane.scheduler.view import ReportedDemand

from . import engine_model as em
from .sim import Req, Sim, SimWorker

BACKBONE = "llama"
PlanFn = Callable[..., Any]
RouteFn = Callable[..., Any]


def fname(fn: int) -> str:
    return f"f{fn}"


class System(ABC):
    """What every simulated system shares: a worker batches every running request; nothing to keep or
    refill. Each system says where a request goes (``route``)."""

    name = "system"
    peer_fetch = False

    def setup(self, sim: Sim) -> None:
        for w in sim.workers:
            w.disk = set(range(len(sim.ranks)))  # artifacts pre-staged on every local disk

    @abstractmethod
    def route(self, sim: Sim, req: Req) -> None:
        """Queue ``req`` on a worker (or hold it until one can take it)."""

    def decode_rows(self, sim: Sim, w: SimWorker) -> list[Req]:
        return w.running

    def idle(self, sim: Sim, w: SimWorker) -> None:
        """Called when a worker runs out of work; by default nothing happens."""
        return None

    def refill(self, sim: Sim, w: SimWorker) -> None:
        """Called at every step boundary (a pull-based worker takes queued work here); by default nothing."""
        return None

    def keep(self, sim: Sim, w: SimWorker) -> set[int]:
        """Adapters a background load must not evict from w's device."""
        return set()


@dataclass
class PlannerSettings:
    plan_period_s: float = 10.0
    spill_threshold: int | None = None  # default: the profile's max_batch
    config: PlacementConfig | None = None
    # Mirror the live control loop (controlplane/scheduler/loop.py) instead of an idealised one:
    # demand from ReportedDemand over the workers' reports (in-flight invocations per function,
    # tokens/s over the last 5 s), the config's own worker_capacity, in-flight counted as queued.
    live_loop: bool = False


class Planned(System):
    """A system driven by a placement policy and a routing policy of ``controlplane.scheduler``."""

    def __init__(self, name: str, plan_fn: PlanFn, route_fn: RouteFn, settings: PlannerSettings, peer: bool) -> None:
        self.name = name
        self.plan_fn = plan_fn
        self.route_fn = route_fn
        self.settings = settings
        self.peer_fetch = peer
        self.placement = Placement(0, {})
        self.shed: frozenset[str] = frozenset()
        self._kept: dict[int, set[int]] = {}
        self.warming: dict[str, tuple[str, ...]] = {}
        self._window: dict[int, list[float]] = {}  # fn -> [requests, tokens] since the last plan

    def setup(self, sim: Sim) -> None:
        super().setup(sim)
        cfg = self.settings.config or PlacementConfig()
        wl = sim.wl
        capacity = em.worker_capacity_tokens(
            sim.p, float(wl.prompt.mean()), float(wl.output.mean()), sum(wl.ranks) / len(wl.ranks)
        )
        self.config = cfg if self.settings.live_loop else replace(cfg, worker_capacity=capacity)
        self.reported = ReportedDemand()
        self.catalog = {
            fname(f): AdapterSpec(fname(f), BACKBONE, r, sim.nbytes[f], sim.npages[f]) for f, r in enumerate(wl.ranks)
        }
        self.threshold = self.settings.spill_threshold or sim.p.max_batch
        # The first round sees the first period's demand: the cluster was serving before the run.
        period = self.settings.plan_period_s
        for r in sim.reqs:
            if r.arrival < period:
                self._count(r)
        self._plan(sim, initial=True)
        sim.at(period, self._tick, sim)

    def _count(self, r: Req) -> None:
        acc = self._window.setdefault(r.fn, [0.0, 0.0])
        acc[0] += 1
        acc[1] += r.prompt + r.output

    def _tick(self, sim: Sim) -> None:
        self._plan(sim, initial=False)
        if sim.now + self.settings.plan_period_s <= sim.duration_s:
            sim.at(sim.now + self.settings.plan_period_s, self._tick, sim)

    def view(self, sim: Sim) -> ClusterView:
        workers = {}
        for w in sim.workers:
            tiers = {fname(f): Tier.HOST for f in w.host}  # every adapter is also on disk: not listed
            tiers.update({fname(f): Tier.DEVICE for f in w.device})
            queue: dict[str, int] = {}
            for r in w.waiting:
                queue[fname(r.fn)] = queue.get(fname(r.fn), 0) + 1
            for fn, reqs in w.loading.items():
                if reqs:
                    queue[fname(fn)] = queue.get(fname(fn), 0) + len(reqs)
            if self.settings.live_loop:  # a worker reports every invocation it holds, running ones too
                for fn, rows in w.fn_rows.items():
                    queue[fname(fn)] = queue.get(fname(fn), 0) + rows
            workers[w.name] = WorkerView(
                w.name,
                BACKBONE,
                WorkerState.ACTIVE,
                sim.device_pages_cap,
                sim.device_pages_cap - w.pages_used,
                tiers,
                queue,
                running_batch=len(w.running),
                tokens_per_s=w.tokens_per_s(sim.now),
            )
        return ClusterView(sim.now, workers)

    def _plan(self, sim: Sim, initial: bool) -> None:
        period = self.settings.plan_period_s
        view = self.view(sim)
        if self.settings.live_loop:
            demand = self.reported.estimate(view, self.catalog)
        else:
            demand = {
                fname(f): Demand(fname(f), acc[0] / period, acc[1] / period) for f, acc in sorted(self._window.items())
            }
        self._window = {}
        plan = self.plan_fn(view, demand, self.catalog, self.placement, self.config, sim.seed)
        self.placement = plan.placement
        self.shed = plan.shed
        sim.c.moves += 0 if initial else plan.moves
        by_name = {w.name: w for w in sim.workers}
        self._kept = {}
        for fn, holders in plan.placement.replicas.items():
            for h in holders:
                self._kept.setdefault(by_name[h].wid, set()).add(int(fn[1:]))
        for cmd in plan.commands:
            w = by_name[cmd.worker_id]
            f = int(cmd.function_id[1:]) if cmd.function_id else -1
            if cmd.kind == CommandKind.PREFETCH:
                if initial:  # placed before traffic: resident at time 0
                    sim.host_insert(w, f)
                    sim.to_device(w, f, background=True)
                else:
                    sim.prefetch(w, f)
            elif cmd.kind == CommandKind.OFFLOAD and w.pinned[f] == 0:
                sim.evict(w, f)
        if initial:
            sim.c.adapter_loads = 0
        # What the published table says is still loading: as of this round's view (live, the table
        # is built from the reports the plan read); the initial preloads are resident at time 0.
        self.warming = routing_policy.warming_replicas(plan.placement, self.view(sim) if initial else view)

    def keep(self, sim: Sim, w: SimWorker) -> set[int]:
        return self._kept.get(w.wid, set())

    def route(self, sim: Sim, req: Req) -> None:
        if req.arrival >= self.settings.plan_period_s:  # the first period was counted in setup
            self._count(req)
        if BACKBONE in self.shed:
            req.rejected = True
            sim.c.rejected += 1
            return
        states = self.placement.worker_states
        function_id = fname(req.fn)
        warming = self.warming.get(function_id, ())
        choice = self.route_fn(function_id, self.placement, sim.depths, states, self.threshold, req.rid, warming)
        if choice is None:
            req.rejected = True
            sim.c.rejected += 1
            return
        sim.c.spills += int(choice.spilled)
        sim.accept(sim.workers[int(choice.worker_id[1:])], req)


class SharedQueue(System):
    """Today's design: one queue per backbone, any worker pulls the next invocation (no affinity)."""

    name = "shared-queue"

    def route(self, sim: Sim, req: Req) -> None:
        for w in sim.workers:  # a worker with a free slot pulls it now
            if w.depth < sim.p.max_batch:
                sim.accept(w, req)
                return
        sim.global_queue.append(req)

    def refill(self, sim: Sim, w: SimWorker) -> None:
        while sim.global_queue and w.depth < sim.p.max_batch:
            sim.accept(w, sim.global_queue.popleft())

    def idle(self, sim: Sim, w: SimWorker) -> None:
        self.refill(sim, w)


class Reactive(System):
    """S-LoRA style: every adapter in host memory, loaded to the device when a batch needs it;
    requests go to the least-loaded worker."""

    name = "reactive"

    def setup(self, sim: Sim) -> None:
        super().setup(sim)
        for w in sim.workers:
            for f in range(len(sim.ranks)):
                w.host[f] = sim.nbytes[f]
                sim.host_index.setdefault(f, set()).add(w.wid)
            w.host_used = 0  # unbounded host tier (S-LoRA keeps all adapters in host memory)

    def route(self, sim: Sim, req: Req) -> None:
        w = min(sim.workers, key=lambda x: (x.depth, (x.wid - req.rid) % len(sim.workers)))
        sim.accept(w, req)


class RayLru(System):
    """Ray Serve multiplexing: each replica keeps an LRU of K adapters and runs one adapter's batch
    at a time; requests go to a replica that has the adapter loaded, else the least-loaded one."""

    name = "ray-lru"

    def __init__(self, k: int = 8) -> None:
        self.k = k

    def setup(self, sim: Sim) -> None:
        super().setup(sim)
        sim.device_slots_cap = self.k
        sim.p = replace(sim.p, host_cache_bytes=0)  # a replica loads from its local disk

    def route(self, sim: Sim, req: Req) -> None:
        holders = sim.device_index.get(req.fn, set())
        best = min(holders, key=lambda h: sim.workers[h].depth, default=None)
        if best is None or sim.workers[best].depth >= sim.p.max_batch:
            w = min(sim.workers, key=lambda x: (x.depth, (x.wid - req.rid) % len(sim.workers)))
        else:
            w = sim.workers[best]
        sim.accept(w, req)

    def decode_rows(self, sim: Sim, w: SimWorker) -> list[Req]:
        oldest = min(w.running, key=lambda r: r.arrival).fn  # the adapter waiting longest runs next
        return [r for r in w.running if r.fn == oldest]


class Dedicated(System):
    """A backbone per function that scales to zero: a device serves one function; a request for a
    function without an instance claims a free (or idle) device and waits for its cold start."""

    name = "dedicated"

    def __init__(self) -> None:
        self.pending: list[Req] = []

    def route(self, sim: Sim, req: Req) -> None:
        mine = [w for w in sim.workers if w.owner == req.fn]
        best = min(mine, key=lambda w: w.depth, default=None)
        if best is not None and best.depth < sim.p.max_batch:
            sim.accept(best, req)
            return
        free = self._free_device(sim)
        if free is not None:
            self._start(sim, free, req)
        elif best is not None:
            sim.accept(best, req)
        else:
            self.pending.append(req)

    def _free_device(self, sim: Sim) -> SimWorker | None:
        idle = [w for w in sim.workers if w.depth == 0 and sim.now >= w.ready_at]
        return min(idle, key=lambda w: (w.owner >= 0, w.wid), default=None)

    def _start(self, sim: Sim, w: SimWorker, req: Req) -> None:
        """Scale the old function to zero, start a backbone for req's function, then its adapter."""
        for f in list(w.device):
            sim.evict(w, f)
        w.owner = req.fn
        w.ready_at = sim.now + sim.p.backbone_cold_start_s
        sim.c.cold_starts += 1
        req.worker = w.wid
        w.depth += 1
        sim.depths[w.name] = w.depth
        req.cold = True
        sim.fetch(w, req.fn, [req], extra_s=sim.p.backbone_cold_start_s)

    def idle(self, sim: Sim, w: SimWorker) -> None:
        if self.pending:
            req = self.pending.pop(0)
            if req.fn == w.owner:
                sim.accept(w, req)
            else:
                self._start(sim, w, req)


SYSTEMS = ("lorafaas", "rank-oblivious", "shared-queue", "dedicated", "reactive", "ray-lru")


def make_system(name: str, settings: PlannerSettings | None = None, ray_k: int = 8) -> System:
    """A fresh system by name (every run gets its own: systems keep per-run state)."""
    settings = settings or PlannerSettings()
    if name == "lorafaas":
        return Planned(name, placement_policy.plan, routing_policy.choose_worker, settings, peer=True)
    if name == "rank-oblivious":
        return Planned(name, placement_policy.rank_oblivious_plan, routing_policy.least_loaded, settings, peer=False)
    if name == "shared-queue":
        return SharedQueue()
    if name == "dedicated":
        return Dedicated()
    if name == "reactive":
        return Reactive()
    if name == "ray-lru":
        return RayLru(ray_k)
    raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS}")
