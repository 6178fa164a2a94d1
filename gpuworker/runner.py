"""The engine thread: every engine call runs on one thread, and the step loop lives there.

The asyncio side submits requests and receives each request's outputs on its own queue;
torch work never blocks the event loop that keeps NATS heartbeats and acks flowing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from gpuworker.engine import EngineRequest, LoraEngine, StepOutput

T = TypeVar("T")


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


class EngineRunner:
    """Owns the engine's thread; the only way anything touches the engine."""

    def __init__(self, engine: LoraEngine) -> None:
        self.engine = engine
        self.stats = StepStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._queues: dict[str, asyncio.Queue[StepOutput]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the engine thread, between two steps."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine-steps")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(
        self, request: EngineRequest, prepare: Callable[[], None] | None = None
    ) -> asyncio.Queue[StepOutput]:
        """Queue a request; its outputs arrive on the returned queue, the last one ``finished``.

        ``prepare`` (loading the request's adapter) runs in the same engine-thread call, just
        before the request is added: no step can come between them.
        """
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
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

    async def _loop(self) -> None:
        while True:
            if not await self.call(self.engine.has_work):
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.perf_counter()
            outputs = await self.call(self.engine.step)
            self.stats.record(time.perf_counter() - started, len(outputs))
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if out.finished:
                        del self._queues[out.request_id]
