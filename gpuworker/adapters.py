"""The one owner of every adapter tier: S3 -> local disk -> host memory -> device pool.

Disk is a content-addressed cache (one folder per sha256, checked on download); host
memory holds parsed ``AdapterWeights`` (pinned on CUDA) in an LRU bounded by bytes; the
device tier is the engine's paged pool, reached only through the engine thread. A request
waits only for the tiers its adapter is missing.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path

from gpuworker.engine import AdapterWeights, LoraEngine, PoolFullError
from gpuworker.engine.engine import PendingLoad
from gpuworker.runner import EngineRunner
from lorafaas.artifacts import ArtifactStore
from lorafaas.wire import AdapterRef, AdapterResidency


class Tier(StrEnum):
    S3 = "s3"
    DISK = "disk"
    HOST = "host"
    DEVICE = "device"


def adapter_key(ref: AdapterRef) -> str:
    """The engine's id of an adapter: its function and content, so a new version is a new id."""
    return f"{ref.function_id}:{ref.sha256[:16]}"


class AdapterEvicted(RuntimeError):
    """The adapter was resident when staged and evicted before its request reached the engine."""


class DeviceLoad:
    """The last host -> device step of one adapter, run on the engine thread (see ``AdapterManager.stage``).

    Normally the copy has already happened off the engine thread (``pending``) and this only
    makes the adapter usable; if the pool had no room at staging time, the copy runs here
    (and raises ``PoolFullError`` into ``EngineRunner.submit`` if there is still none).
    """

    def __init__(
        self,
        engine: LoraEngine,
        key: str,
        weights: AdapterWeights | None,
        fetch_s: float,
        pending: PendingLoad | None = None,
        tier: Tier = Tier.DEVICE,
        moves_s: dict[str, float] | None = None,
        on_load: Callable[[], None] | None = None,
    ) -> None:
        self.engine, self.key, self.weights, self.pending = engine, key, weights, pending
        self.fetch_s = fetch_s  # seconds spent bringing it to host memory
        self.copy_s = pending.copy_s if pending is not None else 0.0  # seconds of the device copy
        self.tier = tier  # where the adapter was when staged
        self.moves_s = dict(moves_s or {})  # "s3->disk" or "peer->disk", "disk->host", then "host->device"
        if pending is not None:
            self.moves_s["host->device"] = self.copy_s
        self.on_load = on_load  # counts device loads for the scheduler's reports

    def __call__(self) -> None:
        if self.pending is not None and not self.pending.finished:
            self.engine.finish_load(self.pending)
            return
        if self.engine.is_resident(self.key):
            return
        if self.weights is None:
            raise AdapterEvicted(f"adapter {self.key} was evicted before its request started")
        started = time.perf_counter()
        self.engine.load_adapter(self.key, self.weights)
        self.copy_s = time.perf_counter() - started
        self.moves_s["host->device"] = self.copy_s
        if self.on_load is not None:
            self.on_load()


class AdapterManager:
    def __init__(
        self,
        store: ArtifactStore,
        cache_dir: Path,
        runner: EngineRunner,
        model_config: object,
        host_budget_bytes: int,
        pin_memory: bool = False,
    ) -> None:
        self.store, self.runner, self.model_config = store, runner, model_config
        self.disk_dir = Path(cache_dir) / "adapters"
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        self.host: OrderedDict[str, AdapterWeights] = OrderedDict()
        self.host_budget_bytes = host_budget_bytes
        self.pin_memory = pin_memory
        self.refs: dict[str, AdapterRef] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # One fetch per disk folder: functions registered with the same adapter share its folder
        # (named by content), and a second download would replace it while the first is read.
        self._folder_locks: dict[Path, asyncio.Lock] = {}
        self._pending: dict[str, PendingLoad] = {}  # copied, waiting for their request's engine call
        # Asked before S3 for an adapter missing from disk (gpuworker.peer); False: use S3.
        self.peer_fetch: Callable[[AdapterRef, Path], Awaitable[bool]] | None = None
        self.device_loads = 0  # host -> device copies, for the scheduler's reports

    # --- where things are ------------------------------------------------------------
    def disk_path(self, ref: AdapterRef) -> Path:
        return self.disk_dir / ref.sha256

    def tier_of(self, ref: AdapterRef) -> Tier:
        """Where the adapter is; the device tier as of the engine's last published snapshot."""
        key = adapter_key(ref)
        if key in self.runner.snapshot.resident:
            return Tier.DEVICE
        if key in self.host:
            return Tier.HOST
        if (self.disk_path(ref) / "adapter_config.json").is_file():
            return Tier.DISK
        return Tier.S3

    def residency(self) -> list[AdapterResidency]:
        return [
            AdapterResidency(
                function_id=r.function_id,
                rank=r.rank,
                tier=self.tier_of(r).value,
                bytes=self.host[k].nbytes if k in self.host else 0,
            )
            for k, r in list(self.refs.items())
        ]

    def holdings(self) -> dict[str, tuple[AdapterRef, Path]]:
        """The adapters in host memory, with their disk folders (what a peer may fetch from here)."""
        return {k: (self.refs[k], self.disk_path(self.refs[k])) for k in list(self.host) if k in self.refs}

    def _count_load(self) -> None:
        self.device_loads += 1

    def host_bytes(self) -> int:
        return sum(w.nbytes for w in self.host.values())

    # --- moving down the tiers ---------------------------------------------------------
    async def stage(self, ref: AdapterRef) -> DeviceLoad:
        """Bring the adapter down to host memory (S3 and disk as needed), off the engine thread.

        The host -> device copy happens here too, outside the engine thread (``_copy_to_device``),
        so the running batch keeps decoding while it runs. Returns the device step that makes the
        adapter usable, to run on the engine thread in the same call as the request that needs it
        (``EngineRunner.submit(prepare=...)``): no step runs between the two, so nothing can evict
        the adapter before its request pins it.
        """
        key = adapter_key(ref)
        self.refs[key] = ref
        self._pending = {k: p for k, p in self._pending.items() if not p.finished}
        engine = self.runner.engine
        if engine.is_resident(key):
            return DeviceLoad(engine, key, None, 0.0)
        tier = self.tier_of(ref)
        moves_s: dict[str, float] = {}
        started = time.perf_counter()  # a request that waits for another's fetch of it was delayed too
        async with self._locks.setdefault(key, asyncio.Lock()):
            weights = await self._to_host(ref, moves_s)
            fetch_s = time.perf_counter() - started
            pending = self._pending.get(key)
            if pending is None or pending.finished:
                pending = await self._copy_to_device(key, weights)
        return DeviceLoad(engine, key, weights, fetch_s, pending, tier, moves_s, self._count_load)

    async def _copy_to_device(self, key: str, weights: AdapterWeights) -> PendingLoad | None:
        """Reserve pages on the engine thread (between two steps, bookkeeping only), copy the
        weights in from a worker thread (a CUDA side stream from pinned memory) while the batch
        keeps decoding, and leave the commit to the request's own engine call.

        None when the adapter became resident meanwhile, or when the pool has no room now: the
        request's engine call then loads it there, or waits for pages (``PoolFullError``)."""
        engine = self.runner.engine
        try:
            pending = await self.runner.call(engine.begin_load, key, weights)
        except PoolFullError:
            return None
        if pending is None:
            return None
        try:
            await asyncio.to_thread(pending.copy)
        except BaseException:
            await asyncio.shield(self.runner.call(engine.abort_load, pending))
            raise
        self._pending[key] = pending
        self._count_load()
        return pending

    async def ensure_on_device(self, ref: AdapterRef) -> float:
        """Bring the adapter to the device pool; returns the seconds spent on missing tiers."""
        load = await self.stage(ref)
        await self.runner.call(load)
        return load.fetch_s + load.copy_s

    async def _to_host(self, ref: AdapterRef, moves_s: dict[str, float] | None = None) -> AdapterWeights:
        """The adapter's weights in host memory; ``moves_s`` gets the seconds of each move made."""
        moves_s = {} if moves_s is None else moves_s
        key = adapter_key(ref)
        if key in self.host:
            self.host.move_to_end(key)
            return self.host[key]
        folder = self.disk_path(ref)
        started = time.perf_counter()
        async with self._folder_locks.setdefault(folder, asyncio.Lock()):
            if not (folder / "adapter_config.json").is_file():
                if self.peer_fetch is not None and await self.peer_fetch(ref, folder):
                    moves_s["peer->disk"] = time.perf_counter() - started
                else:
                    await asyncio.to_thread(self.store.download, ref.prefix, folder, ref.sha256, ref.bucket)
                    moves_s["s3->disk"] = time.perf_counter() - started
                started = time.perf_counter()
            weights = await asyncio.to_thread(AdapterWeights.from_peft_folder, folder, self.model_config)
        if self.pin_memory:
            weights = weights.pin_memory()
        moves_s["disk->host"] = time.perf_counter() - started
        self.host[key] = weights
        self._trim_host()
        return weights

    def _trim_host(self) -> None:
        # A budget of 0 keeps nothing on the host: every reload comes from disk (reactive loading).
        while self.host and self.host_bytes() > self.host_budget_bytes:
            self.host.popitem(last=False)

    # --- moving up -------------------------------------------------------------------
    async def offload(self, ref: AdapterRef) -> bool:
        """Device -> host: frees the adapter's pages, keeps the host copy for a fast reload."""
        key = adapter_key(ref)
        if not self.runner.engine.is_resident(key):
            return False
        await self.runner.call(self.runner.engine.offload_adapter, key)
        return True

    async def evict(self, ref: AdapterRef) -> None:
        """Drop the adapter from device and host memory (the disk cache stays)."""
        key = adapter_key(ref)
        await self.offload(ref)
        self.host.pop(key, None)
        self.refs.pop(key, None)

    async def offload_coldest(self, count: int = 1) -> list[str]:
        """Under pressure: offload the least recently used adapters no request is using."""
        coldest = (await self.runner.call(self.runner.engine.lru_adapters))[:count]
        for key in coldest:
            await self.runner.call(self.runner.engine.offload_adapter, key)
        return coldest
