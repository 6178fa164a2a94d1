"""The engine thread: every engine call runs on one thread, and the step loop lives there.

The asyncio side submits requests and receives each request's outputs on its own queue;
torch work never blocks the event loop that keeps NATS heartbeats and acks flowing.

The thread steps back to back while there is work and runs the calls the asyncio side
queued between two steps. Before, every step was two executor round trips (``has_work`` and
``step``) and a wake-up of the event loop for each; now a step costs the event loop one
callback that hands all of the step's outputs over at once (see ``docs/engine.md``, "Where a
token's time goes").
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from gpuworker.engine import EngineRequest, LoraEngine, StepOutput

T = TypeVar("T")
log = logging.getLogger(__name__)

SMALL_BATCH = 4  # at or below this many running requests a step reads weights (memory bound): one thread


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


class ThreadPolicy:
    """How many intra-op threads a step gets, by running batch size.

    A small decode batch is bound by reading the weights; a second OpenMP thread adds a barrier per
    op, and when the gateway, control plane and NATS hold the other core the barrier waits for a
    time slice. Large batches are compute bound and use every thread. ``None`` leaves torch alone.
    """

    def __init__(self, max_threads: int | None = None, small_batch: int = SMALL_BATCH) -> None:
        # Default: leave one core to the event loop and the services beside the worker (NATS, the
        # gateway, the control plane on a small machine); on 2 cores that is one thread at any batch.
        default = min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) - 1))
        self.max_threads = max_threads if max_threads is not None else default
        self.small_batch = small_batch

    def apply(self, running: int) -> None:
        """Set the calling thread's intra-op threads (with OpenMP the setting is per thread)."""
        want = 1 if running <= self.small_batch else self.max_threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)


class EngineRunner:
    """Owns the engine's thread; the only way anything touches the engine."""

    def __init__(self, engine: LoraEngine, threads: ThreadPolicy | None = None) -> None:
        self.engine = engine
        self.stats = StepStats()
        # Read torch's thread count here, on the caller's thread: the engine thread starts with
        # OpenMP's default, whatever the process set with torch.set_num_threads.
        self.threads = threads or ThreadPolicy()
        self._queues: dict[str, asyncio.Queue[StepOutput]] = {}
        self._calls: deque[tuple[Callable[..., Any], tuple[object, ...], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None  # what stopped the step loop, if anything did

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the engine thread, between two steps."""
        if self._thread is None:
            self.start()
        fut: Future[T] = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine thread has stopped")
            self._calls.append((fn, args, fut))
            self._cond.notify()
        return await asyncio.wrap_future(fut)

    def start(self) -> None:
        """Start the engine thread (idempotent; the first ``call`` starts it too)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def submit(
        self, request: EngineRequest, prepare: Callable[[], None] | None = None
    ) -> asyncio.Queue[StepOutput]:
        """Queue a request; its outputs arrive on the returned queue, the last one ``finished``.

        ``prepare`` (making the request's adapter usable) runs in the same engine-thread call,
        just before the request is added: no step can come between them.
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
        return queue

    async def abort(self, request_id: str) -> None:
        await self.call(self.engine.abort, request_id)

    @property
    def running(self) -> int:
        return len(self._queues)

    # -- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._calls and not self.engine.has_work():
                    self._cond.wait()
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, args, fut in calls:
                self._run_call(fn, args, fut)
            if self.engine.has_work():
                try:
                    self._step()
                except Exception as e:  # the step loop stops, as an uncaught error in it always did
                    log.exception("engine step failed; the engine thread stops")
                    self.error = e
                    break
        self._fail_pending()

    def _run_call(self, fn: Callable[..., Any], args: tuple[object, ...], fut: Future[Any]) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # handed to the awaiting coroutine, which re-raises it
            fut.set_exception(e)

    def _step(self) -> None:
        if self.threads is not None:
            self.threads.apply(self.engine.num_running() + self.engine.num_waiting())
        started = time.perf_counter()
        outputs = self.engine.step()
        self.stats.record(time.perf_counter() - started, len(outputs))
        if outputs and self._loop is not None:
            # One callback per step, however many requests it served.
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
                if out.finished:
                    del self._queues[out.request_id]

    def _fail_pending(self) -> None:
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
            self._stopping = True
        for _, _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("the engine thread stopped"))
