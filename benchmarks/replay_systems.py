"""The systems a trace replay compares, each a real configuration of our own stack.

- ``lorafaas``: shared backbone, every adapter pre-loaded (S3 -> disk -> host -> device, with a
  warm-up pass) before traffic, host cache kept, paged pool, mixed-adapter batching.
- ``reactive``: the S-LoRA-style baseline P-LoRA beats: one shared backbone, adapters loaded from
  storage only when a request needs them, LRU eviction from the device pool, no host cache, no
  pre-loading.
- ``dedicated``: the serverless-LLM baseline ServerlessLoRA beats: every function gets its own
  backbone copy (its own worker process and work queue), started on its first request and
  stopped after an idle timeout.
- ``rank-oblivious``: the baseline LoRAServe beats, with ``--workers N``: one shared queue every
  worker pulls, adapters placed on workers at random (``placement.rank_oblivious_plan``) and
  prefetched there; any worker may get any function and loads what it lacks.

With ``--workers`` above 1, ``lorafaas`` runs its scheduler: rank-aware placement, prefetch of
each worker's placements before it takes traffic, and affinity routing with spill-over.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats

from launcher.devstack import free_port
from launcher.platform import (
    adapter_refs,
    create_tenant_with_key,
    prepare,
    publish_backbone,
    register_backbone_copy,
    register_function,
)
from launcher.stack import PlatformProcesses, wait_for_worker
from lorafaas import wire
from lorafaas.names import Names
from lorafaas.settings import Settings

SYSTEMS = ("lorafaas", "dedicated", "reactive", "rank-oblivious")


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    rank: int
    adapter_dir: Path


@dataclass
class ReplaySetup:
    """What every system is given: the same backbone, the same adapters, the same prices."""

    backbone_dir: Path
    functions: list[FunctionSpec]
    workers: int = 1
    pool_pages: int = 0
    host_cache_bytes: int = 0  # 0 = the worker's default
    max_batch: int = 16
    idle_timeout_s: float = 20.0
    price_input: int = 150_000
    price_output: int = 600_000


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # the process is gone
        return 0
    return 0


@dataclass
class WorkerLife:
    started: float
    ready: float | None = None
    stopped: float | None = None


class System:
    """One system under test: its own database, NATS prefix, ports and worker processes."""

    name = "base"

    def __init__(self, base: Settings, setup: ReplaySetup, workdir: Path) -> None:
        suffix = uuid.uuid4().hex[:6]
        token = self.name.replace("-", "")
        # A database of its own per run: replays of several sessions may share one Postgres.
        db_url = base.database.url.rsplit("/", 1)[0] + f"/lorafaas_bench_{token}_{suffix}"
        self.settings = base.model_copy(
            update={
                "nats": base.nats.model_copy(update={"prefix": f"bench{token}{suffix}"}),
                "database": base.database.model_copy(update={"url": db_url}),
                "gateway_port": free_port(),
                "controlplane_port": free_port(),
                "limits": base.limits.model_copy(update={"sync_timeout_s": 600.0, "max_tokens": 4096}),
            }
        )
        self.setup = setup
        self.workdir = workdir / self.name
        self.procs = PlatformProcesses(self.settings, self.workdir)
        self.lives: dict[str, WorkerLife] = {}
        self.api_key = ""
        self.peak_memory_bytes = 0
        self._sampler: asyncio.Task | None = None

    def use_scheduler(self, **changes: str | float) -> None:
        """This system's control plane runs the scheduler with these settings changed."""
        scheduler = self.settings.scheduler.model_copy(update=changes)
        self.settings = self.settings.model_copy(update={"scheduler": scheduler})
        self.procs = PlatformProcesses(self.settings, self.workdir)

    @property
    def url(self) -> str:
        return f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"

    def worker_env(self, backbone: str, worker_id: str, host_cache: bool = True) -> dict[str, str]:
        env = {
            "LORAFAAS_WORKER__BACKBONE": backbone,
            "LORAFAAS_WORKER__BACKBONE_URI": str(self.setup.backbone_dir),
            # Each worker its own disk cache, as on separate machines.
            "LORAFAAS_WORKER__CACHE_DIR": str(self.workdir / "cache" / worker_id),
            "LORAFAAS_WORKER__POOL_PAGES": str(self.setup.pool_pages),
            "LORAFAAS_WORKER__MAX_BATCH": str(self.setup.max_batch),
        }
        if not host_cache:
            env["LORAFAAS_WORKER__HOST_CACHE_BYTES"] = "0"
        elif self.setup.host_cache_bytes:
            env["LORAFAAS_WORKER__HOST_CACHE_BYTES"] = str(self.setup.host_cache_bytes)
        return env

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self._drop_database()
        await prepare(self.settings)
        await self.register()
        await asyncio.to_thread(self.procs.start_controlplane)
        await asyncio.to_thread(self.procs.start_gateway)
        await self.start_workers()
        self._sampler = asyncio.create_task(self._sample_memory())

    async def publish_backbones(self) -> None:
        await publish_backbone(self.settings, "bench", self.setup.backbone_dir)

    async def register(self) -> None:
        await self.publish_backbones()
        tenant_id, self.api_key = await create_tenant_with_key(self.settings, "bench")
        for fn in self.setup.functions:
            await register_function(
                self.settings,
                tenant_id,
                fn.name,
                self.backbone_of(fn),
                fn.adapter_dir,
                self.setup.price_input,
                self.setup.price_output,
            )
        self.tenant_id = tenant_id

    def backbone_of(self, fn: FunctionSpec) -> str:
        return "bench"

    async def start_workers(self) -> None:
        """All at once: they join together, so the first placement round sees them all."""
        ids = [f"{self.name}-w{i}" for i in range(self.setup.workers)]
        for worker_id in ids:
            await self.spawn_worker(worker_id, "bench", wait=False)
        for worker_id in ids:
            await wait_for_worker(self.settings, worker_id, timeout_s=900)
            self.lives[worker_id].ready = time.monotonic()

    async def spawn_worker(self, worker_id: str, backbone: str, wait: bool, host_cache: bool = True) -> None:
        self.lives[worker_id] = WorkerLife(started=time.monotonic())
        self.procs.start_worker(worker_id, self.worker_env(backbone, worker_id, host_cache))
        if wait:
            await wait_for_worker(self.settings, worker_id, timeout_s=900)
            self.lives[worker_id].ready = time.monotonic()

    async def stop(self) -> None:
        if self._sampler:
            self._sampler.cancel()
        now = time.monotonic()
        for life in self.lives.values():
            life.stopped = life.stopped or now
        await asyncio.to_thread(self.procs.stop_all)
        await self._drop_database()

    async def _drop_database(self) -> None:
        import asyncpg
        from sqlalchemy.engine import make_url

        url = make_url(self.settings.database.url)
        conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database="postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        finally:
            await conn.close()

    async def _sample_memory(self) -> None:
        while True:
            total = sum(
                rss_bytes(p.pid) for n, p in self.procs.procs.items() if n.startswith("worker-") and p.poll() is None
            )
            self.peak_memory_bytes = max(self.peak_memory_bytes, total)
            await asyncio.sleep(0.25)

    # --- per request -----------------------------------------------------------------------
    async def before_request(self, function_index: int, now: float) -> float | None:
        """Called at each arrival; returns when the function's backbone became ready if it was
        not resident at arrival (a backbone cold start), else None."""
        return None

    def after_request(self, function_index: int, now: float) -> None:
        """Called when a request finishes (the dedicated system's idle clock starts here)."""

    async def counters(self) -> dict[str, float]:
        """Scheduler counters at the end of a run: adapter loads and peer fetches (the workers'
        reports, via the control plane), spill-overs (the gateway), re-routes, placement moves and
        worker commands (the control plane's scheduler loop)."""
        s = self.settings
        out = {
            "adapter_loads": 0.0,
            "peer_fetches": 0.0,
            "spill_overs": 0.0,
            "rerouted": 0.0,
            "placement_moves": 0.0,
            "worker_commands": 0.0,
        }
        controlplane = f"http://{s.controlplane_host}:{s.controlplane_port}"
        try:
            async with httpx.AsyncClient(timeout=10) as c:
                placement = (
                    await c.get(f"{controlplane}/admin/placement", headers={"Authorization": f"Bearer {s.admin_token}"})
                ).json()
                metrics = (await c.get(f"{self.url}/metrics")).text + (await c.get(f"{controlplane}/metrics")).text
        except (httpx.HTTPError, ValueError):
            return out
        for worker in placement.get("workers", {}).values():
            out["adapter_loads"] += worker.get("adapter_loads", 0)
            out["peer_fetches"] += worker.get("peer_fetches", 0)
        out["rerouted"] = float(placement.get("rerouted", 0))
        for line in metrics.splitlines():
            if line.startswith("lorafaas_gateway_routes_total") and 'outcome="spill"' in line:
                out["spill_overs"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("lorafaas_scheduler_placement_moves_total{"):
                out["placement_moves"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("lorafaas_scheduler_commands_total{"):
                out["worker_commands"] += float(line.rsplit(" ", 1)[1])
        return out

    def device_seconds(self, start: float, end: float) -> float:
        """Device time held during [start, end]: each worker is one accelerator."""
        held = 0.0
        for life in self.lives.values():
            lo, hi = max(start, life.started), min(end, life.stopped or end)
            held += max(0.0, hi - lo)
        return held


class LorafaasSystem(System):
    name = "lorafaas"

    async def start_workers(self) -> None:
        await super().start_workers()
        if self.setup.workers == 1:  # with more, the scheduler places and prefetches before traffic
            await self.preload()

    async def preload(self) -> None:
        """ServerlessLoRA's comprehensive pre-loading: every adapter onto every worker, warmed up."""
        names = Names(self.settings.nats.prefix)
        refs = await adapter_refs(self.settings, self.tenant_id, [fn.name for fn in self.setup.functions])
        nc = await nats.connect(self.settings.nats.url)
        try:
            for worker_id in self.lives:
                for ref in refs:
                    command = wire.WorkerCommand(command=wire.CommandKind.PREFETCH, adapter=ref)
                    await nc.request(names.worker_command_subject(worker_id), command.encode(), timeout=120)
        finally:
            await nc.close()


class ReactiveSystem(System):
    name = "reactive"

    def __init__(self, base: Settings, setup: ReplaySetup, workdir: Path) -> None:
        super().__init__(base, setup, workdir)
        # the scheduler loads nothing ahead of an invocation (no keep-in-step prefetch of placements)
        self.use_scheduler(predictor="reactive")

    async def spawn_worker(self, worker_id: str, backbone: str, wait: bool, host_cache: bool = True) -> None:
        await super().spawn_worker(worker_id, backbone, wait, host_cache=False)


class DedicatedSystem(System):
    """Each function on its own backbone copy: a worker per function, started on demand."""

    name = "dedicated"

    def __init__(self, base: Settings, setup: ReplaySetup, workdir: Path) -> None:
        super().__init__(base, setup, workdir)
        self.inflight: dict[int, int] = {}
        self.last_done: dict[int, float] = {}
        self.ready_events: dict[int, asyncio.Event] = {}
        self.worker_of: dict[int, str] = {}
        self.ready_at: dict[int, float] = {}
        self.starting: dict[int, asyncio.Task] = {}  # held so a start is not garbage-collected mid-way
        self._reaper: asyncio.Task | None = None

    def backbone_of(self, fn: FunctionSpec) -> str:
        return f"ded-{fn.name}"

    async def publish_backbones(self) -> None:
        await super().publish_backbones()
        # the same weights, one backbone (and queue) per function
        await register_backbone_copy(self.settings, "bench", [self.backbone_of(fn) for fn in self.setup.functions])

    async def start_workers(self) -> None:
        self._reaper = asyncio.create_task(self._reap())

    def _worker_id(self, function_index: int) -> str:
        return f"ded-{function_index}-{len(self.lives)}"

    async def before_request(self, function_index: int, now: float) -> float | None:
        self.inflight[function_index] = self.inflight.get(function_index, 0) + 1
        event = self.ready_events.get(function_index)
        if event is not None and event.is_set():
            return None
        if event is None:  # cold: start this function's own backbone
            event = self.ready_events[function_index] = asyncio.Event()
            self.starting[function_index] = asyncio.create_task(self._start_function_worker(function_index, event))
        return await self._ready_time(function_index, event)

    async def _ready_time(self, function_index: int, event: asyncio.Event) -> float:
        await event.wait()
        return self.ready_at[function_index]

    async def _start_function_worker(self, function_index: int, event: asyncio.Event) -> None:
        worker_id = self._worker_id(function_index)
        fn = self.setup.functions[function_index]
        await self.spawn_worker(worker_id, self.backbone_of(fn), wait=True)
        self.worker_of[function_index] = worker_id
        self.ready_at[function_index] = self.lives[worker_id].ready or time.monotonic()
        event.set()

    def after_request(self, function_index: int, now: float) -> None:
        self.inflight[function_index] -= 1
        self.last_done[function_index] = now

    async def _reap(self) -> None:
        """Stop a function's worker once it has been idle for the timeout (scale to zero)."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for fi, event in list(self.ready_events.items()):
                idle = self.inflight.get(fi, 0) == 0 and now - self.last_done.get(fi, now) > self.setup.idle_timeout_s
                if event.is_set() and idle:
                    worker_id = self.worker_of[fi]
                    del self.ready_events[fi]
                    self.lives[worker_id].stopped = now
                    await asyncio.to_thread(self.procs.stop_one, f"worker-{worker_id}")

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        await super().stop()


class RankObliviousSystem(System):
    """LoRAServe's baseline: a shared queue, adapters placed (and prefetched) at random."""

    name = "rank-oblivious"

    def __init__(self, base: Settings, setup: ReplaySetup, workdir: Path) -> None:
        super().__init__(base, setup, workdir)
        self.use_scheduler(policy="rank-oblivious", routing="shared")


def make_system(name: str, base: Settings, setup: ReplaySetup, workdir: Path) -> System:
    systems: dict[str, type[System]] = {
        "lorafaas": LorafaasSystem,
        "reactive": ReactiveSystem,
        "dedicated": DedicatedSystem,
        "rank-oblivious": RankObliviousSystem,
    }
    return systems[name](base, setup, workdir)
