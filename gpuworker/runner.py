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
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from gpuworker.engine import EngineRequest, LoraEngine, PoolStats, StepOutput
from gpuworker.threads import ThreadPolicy

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
    """Owns the engine's thread; the only way anything touches the engine.

    One thread runs the step loop itself: between two steps it runs the calls queued by the
    event loop, then steps while the engine has work, and hands each step's outputs to the
    event loop with one ``call_soon_threadsafe``. A step costs the event loop one wake-up and no
    executor round trip (the loop used to make two executor hops and two wake-ups per step: one
    to ask ``has_work``, one to step). Before each step the thread applies ``ThreadPolicy`` for the
    running batch (intra-op threads are per thread, so only this thread can set them).
    """

    def __init__(self, engine: LoraEngine, policy: ThreadPolicy | None = None) -> None:
        self.engine = engine
        self.policy = policy if policy is not None else ThreadPolicy()
        self.stats = StepStats()
        self._queues: dict[str, asyncio.Queue[StepOutput | EngineFailed]] = {}
        # Calls queued for the engine thread, each with the future its caller awaits.
        self._calls: deque[tuple[Callable[[], None], asyncio.Future]] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stepping = False  # set by start(): before it, the thread only runs calls
        self._stop = False
        self._dead = False  # the thread has left its loop (stopped or failed)
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
        if self.failure is not None:
            raise self.failure
        loop = asyncio.get_running_loop()
        self._ensure_thread(loop)
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            result: T | None = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as e:  # the caller's error, not the engine's: it goes back to the caller
                error = e
            # Swapping one reference (readers see the old or the new, never a mix), and before the
            # caller resumes: what it reads next (``snapshot``) already shows what its call did.
            self.snapshot = self._take_snapshot()
            loop.call_soon_threadsafe(_settle, future, result, error)

        with self._cv:
            if self._dead:  # the thread has left: nobody would run it
                raise self.failure or EngineFailed("the engine thread has stopped")
            self._calls.append((run, future))
            self._cv.notify()
        return await future

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
        """Start stepping (call from the event loop that will read the outputs)."""
        self._ensure_thread(asyncio.get_running_loop())
        with self._cv:
            self._stepping = True
            self._cv.notify()

    def _ensure_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is None:
            self._loop = loop
            self._thread = threading.Thread(target=self._run, name="engine-steps", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        thread = self._thread
        # A failed or stuck engine thread cannot be joined (it may sit in a step that never
        # returns; it is a daemon thread): do not wait for it. A healthy one leaves after its step.
        if thread is not None and self.failure is None:
            await asyncio.to_thread(thread.join, 30)

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
        return queue

    async def abort(self, request_id: str) -> None:
        await self.call(self.engine.abort, request_id)

    @property
    def running(self) -> int:
        return len(self._queues)

    # --- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        """The engine thread: queued calls between steps, then a step while there is work."""
        engine = self.engine
        while True:
            with self._cv:
                while not self._stop and not self._calls and not (self._stepping and engine.has_work()):
                    if self._busy:
                        self._busy, self._progress_at = False, time.monotonic()
                    self._cv.wait()
                if self._stop:
                    self._leave()
                    return
                calls = list(self._calls)
                self._calls.clear()
            for run, _ in calls:
                run()
            if not (self._stepping and engine.has_work()):
                continue
            if not self._busy:
                self._busy, self._progress_at = True, time.monotonic()
            try:
                self.policy.apply(max(engine.num_running(), 1))
                started = time.perf_counter()
                outputs = engine.step()
                elapsed = time.perf_counter() - started
                self.steps += 1  # before the snapshot, which reports it
                self.snapshot = self._take_snapshot()
            except Exception as e:  # the engine cannot go on: say so, fail what it held, stop
                self._post(self._fail, e)
                self._leave()
                return
            self._progress_at = time.monotonic()
            self._post(self._deliver, outputs, elapsed)

    def _leave(self) -> None:
        """The thread is leaving: calls still queued fail (their callers must not wait forever)."""
        with self._cv:
            self._dead = True
            left = list(self._calls)
            self._calls.clear()
        for _, future in left:
            self._post(self._abandon, future)

    def _abandon(self, future: asyncio.Future) -> None:
        _settle(future, None, self.failure or EngineFailed("the engine thread has stopped"))

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is left to read the outputs
            self._loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, outputs: list[StepOutput], elapsed: float) -> None:
        """On the event loop: one call per step puts every output on its request's queue."""
        self.stats.record(elapsed, len(outputs))
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
        with self._cv:
            self._stop = True  # the thread leaves after the step it is in, if it ever returns

    def _fail(self, error: Exception) -> None:
        if self.failure is not None:
            return
        log.critical("engine loop stopped: %r; failing %d requests in flight", error, len(self._queues), exc_info=error)
        self.failure = EngineFailed(f"the engine stopped: {error!r}")
        self._failed.set()
        for queue in self._queues.values():
            queue.put_nowait(self.failure)
        self._queues.clear()
        with self._cv:  # calls the (failed or hung) thread has not taken fail too
            left = list(self._calls)
            self._calls.clear()
        for _, future in left:
            _settle(future, None, self.failure)


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
