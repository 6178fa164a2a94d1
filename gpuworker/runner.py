"""The engine thread: every engine call runs on one thread, and the step loop lives there.

The asyncio side submits requests and receives each request's outputs on its own queue;
torch work never blocks the event loop that keeps NATS heartbeats and acks flowing.

Nothing outside the engine thread reads the engine's live state: after each step (and each
call that moves adapters) the engine thread publishes an immutable ``EngineSnapshot``, which
reports and heartbeats read instead. A step that raises does not end the loop silently: every
request in flight is failed with ``EngineFailed``, the loop stops, and ``failure`` says why, so
the worker stops taking work and exits non-zero (its messages are redelivered elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from gpuworker.engine import EngineRequest, LoraEngine, PoolStats, StepOutput

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineFailed(RuntimeError):
    """The engine loop stopped on an error it cannot isolate to one request; this worker is done."""


class StepStats:
    """Rolling step latency and token throughput for contention reports."""

    def __init__(self, window: int = 256) -> None:
        self.latencies: deque[float] = deque(maxlen=window)
        self.tokens: deque[tuple[float, int]] = deque(maxlen=window)

    def record(self, seconds: float, tokens: int) -> None:
        self.latencies.append(seconds)
        self.tokens.append((time.monotonic(), tokens))

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def tokens_per_s(self, horizon_s: float = 5.0) -> float:
        now = time.monotonic()
        recent = [n for t, n in self.tokens if now - t <= horizon_s]
        return sum(recent) / horizon_s


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state as the engine thread last saw it; safe to read from any thread."""

    pool: PoolStats
    running: int = 0
    waiting: int = 0
    resident: dict[str, int] = field(default_factory=dict)  # adapter id -> rank
    steps: int = 0
    taken_at: float = field(default_factory=time.monotonic)


class EngineRunner:
    """Owns the engine's thread; the only way anything touches the engine."""

    def __init__(self, engine: LoraEngine) -> None:
        self.engine = engine
        self.stats = StepStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._queues: dict[str, asyncio.Queue[StepOutput | EngineFailed]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.failure: EngineFailed | None = None
        self._failed = asyncio.Event()
        # When the engine last completed a step or was last seen idle: a loop with work that
        # does not move this forward is stuck (heartbeats report the gap).
        self._progress_at = time.monotonic()
        self._busy = False
        self.snapshot = self._take_snapshot()  # built here, before the engine thread exists

    # --- calls on the engine thread -----------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the engine thread, between two steps; then refresh the snapshot."""
        return await self._on_thread(fn, *args, snapshot=True)

    async def _on_thread(self, fn: Callable[..., T], *args: object, snapshot: bool) -> T:
        if self.failure is not None:
            raise self.failure

        def run() -> T:
            try:
                return fn(*args)
            finally:
                if snapshot:  # swapping one reference: readers see the old or the new, never a mix
                    self.snapshot = self._take_snapshot()

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def _take_snapshot(self) -> EngineSnapshot:
        engine = self.engine
        return EngineSnapshot(
            pool=engine.pool_stats(),
            running=engine.num_running(),
            waiting=engine.num_waiting(),
            resident=engine.resident_adapters(),
            steps=self.steps,
        )

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine-steps")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # A failed or stuck engine thread cannot be joined: do not wait for it.
        self._executor.shutdown(wait=self.failure is None and self.stalled_s() == 0.0, cancel_futures=True)

    async def wait_failed(self) -> EngineFailed:
        """Return once the engine loop has stopped on an error."""
        await self._failed.wait()
        assert self.failure is not None
        return self.failure

    def stalled_s(self) -> float:
        """Seconds the engine has held work without completing a step (0 while idle or moving)."""
        return time.monotonic() - self._progress_at if self._busy else 0.0

    # --- requests ------------------------------------------------------------------------
    async def submit(
        self, request: EngineRequest, prepare: Callable[[], None] | None = None
    ) -> asyncio.Queue[StepOutput | EngineFailed]:
        """Queue a request; its outputs arrive on the returned queue, the last one ``finished``.

        If the engine fails while the request is in it, an ``EngineFailed`` arrives instead.
        ``prepare`` (loading the request's adapter) runs in the same engine-thread call, just
        before the request is added: no step can come between them.
        """
        queue: asyncio.Queue[StepOutput | EngineFailed] = asyncio.Queue()
        self._queues[request.request_id] = queue

        def add() -> None:
            if prepare is not None:
                prepare()
            self.engine.add_request(request)

        try:
            await self.call(add)
        except Exception:
            self._queues.pop(request.request_id, None)
            raise
        self._wake.set()
        return queue

    async def abort(self, request_id: str) -> None:
        await self.call(self.engine.abort, request_id)
        self._wake.set()

    @property
    def running(self) -> int:
        return len(self._queues)

    # --- the step loop -------------------------------------------------------------------
    async def _loop(self) -> None:
        try:
            while True:
                if not await self._on_thread(self.engine.has_work, snapshot=False):
                    self._busy, self._progress_at = False, time.monotonic()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if not self._busy:
                    self._busy, self._progress_at = True, time.monotonic()
                await self._step()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine cannot go on: say so, fail what it held, stop
            self._fail(e)

    async def _step(self) -> None:
        started = time.perf_counter()

        def step() -> list[StepOutput]:
            outputs = self.engine.step()
            self.steps += 1  # before the snapshot, which reports it
            return outputs

        outputs = await self.call(step)
        self._progress_at = time.monotonic()
        self.stats.record(time.perf_counter() - started, len(outputs))
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
                if out.finished:
                    del self._queues[out.request_id]

    def declare_stuck(self, stalled_s: float) -> None:
        """The engine held work without completing a step for ``stalled_s``: fail it as if the step
        had raised (a thread inside a hung step cannot be stopped; the process must exit)."""
        if self.failure is None:
            self._fail(TimeoutError(f"no engine step completed in {stalled_s:.0f}s while requests waited"))
        if self._task is not None:
            self._task.cancel()

    def _fail(self, error: Exception) -> None:
        log.critical("engine loop stopped: %r; failing %d requests in flight", error, len(self._queues), exc_info=error)
        self.failure = EngineFailed(f"the engine stopped: {error!r}")
        self._failed.set()
        for queue in self._queues.values():
            queue.put_nowait(self.failure)
        self._queues.clear()
