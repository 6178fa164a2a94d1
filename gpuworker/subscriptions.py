"""How invocations reach a worker: its own subject first, the backbone's shared subject beside it.

The gateway routes an invocation of a function placed on this worker to the worker's own
subject; an invocation of an unplaced function, or one spilled over because every replica
is busy, goes to the backbone's shared subject, which every worker of the backbone pulls.
NATS 2.9 gives a consumer one filter subject, so these are two durable consumers, pulled by
two loops that share the worker's room (``2 x max_batch`` invocations in flight).

Lifecycle: a worker starts ``joining`` and pulls nothing until the control plane has
prefetched its placements and sent ``activate`` (or ``join_timeout_s`` passed with no control
plane); ``drain`` stops both loops, then running invocations finish and the worker exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError

from lorafaas.names import Names
from lorafaas.settings import NatsSettings, WorkerSettings
from lorafaas.streams import pull_invocations, pull_own_invocations, republish_to_shared

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 0.25
SUBSCRIBE_RETRY_S = 0.5

State = Literal["joining", "active", "draining"]


class Lifecycle:
    """The worker's state as it reports it: joining -> active -> draining."""

    def __init__(self) -> None:
        self.activated = asyncio.Event()
        self.draining = asyncio.Event()
        self.stopped_pulling = asyncio.Event()

    @property
    def state(self) -> State:
        if self.draining.is_set():
            return "draining"
        return "active" if self.activated.is_set() else "joining"

    def activate(self) -> None:
        self.activated.set()

    def drain(self) -> None:
        self.draining.set()
        self.activated.set()  # a worker drained while joining stops waiting for activation


class Intake:
    """Pulls the worker's two consumers into ``handle`` while there is room."""

    def __init__(
        self,
        js: JetStreamContext,
        names: Names,
        nats: NatsSettings,
        settings: WorkerSettings,
        lifecycle: Lifecycle,
        inflight: Callable[[], int],
        handle: Callable[[Msg], None],
    ) -> None:
        self.js, self.names, self.nats, self.settings = js, names, nats, settings
        self.lifecycle, self.inflight, self.handle = lifecycle, inflight, handle
        self.pulled = {"own": 0, "shared": 0}

    async def run(self) -> None:
        """Wait to be activated, pull until drained; then ``stopped_pulling`` is set."""
        try:
            await self._join()
            if self.lifecycle.draining.is_set():
                return
            bb, wid = self.settings.backbone, self.settings.worker_id
            own = await self._subscribe(lambda: pull_own_invocations(self.js, self.names, bb, wid, self.nats))
            shared = await self._subscribe(lambda: pull_invocations(self.js, self.names, bb, self.nats))
            try:
                await asyncio.gather(self._pull(own, "own"), self._pull(shared, "shared"))
                await self._hand_off(own)
            finally:
                for sub in (own, shared):
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
        finally:
            self.lifecycle.stopped_pulling.set()

    async def _join(self) -> None:
        try:
            await asyncio.wait_for(self.lifecycle.activated.wait(), self.settings.join_timeout_s)
        except TimeoutError:
            log.warning(
                "no activation within %gs (is the control plane down?): taking traffic without placements",
                self.settings.join_timeout_s,
            )
            self.lifecycle.activate()

    async def _subscribe(
        self, subscribe: Callable[[], Awaitable[JetStreamContext.PullSubscription]]
    ) -> JetStreamContext.PullSubscription:
        """Retry while the control plane still sweeps this worker's subject (a restart under an old id)."""
        while True:
            try:
                return await subscribe()
            except BadRequestError as e:  # "filtered consumer not unique on workqueue stream"
                if self.lifecycle.draining.is_set():
                    raise
                log.warning("consumer not ready yet (%s); retrying", e.description)
                await asyncio.sleep(SUBSCRIBE_RETRY_S)

    async def _hand_off(self, own: JetStreamContext.PullSubscription) -> None:
        """Draining: what still waits on this worker's own subject goes to the shared one, for the others."""
        moved = 0
        while True:
            try:
                msgs = await own.fetch(batch=64, timeout=FETCH_TIMEOUT_S)
            except (TimeoutError, NatsTimeout):
                break
            for msg in msgs:
                await republish_to_shared(self.js, self.names, self.settings.backbone, msg, self.settings.worker_id)
                moved += 1
        if moved:
            log.info("draining: handed %d queued invocations to the shared subject", moved)

    async def _pull(self, sub: JetStreamContext.PullSubscription, which: str) -> None:
        while not self.lifecycle.draining.is_set():
            room = 2 * self.settings.max_batch - self.inflight()
            if room <= 0:
                await asyncio.sleep(0.01)
                continue
            try:
                # One at a time: nats-py's fetch(batch > 1) holds what arrived until the batch is full or
                # the timeout passes, which added up to FETCH_TIMEOUT_S to a lone invocation's wait on an idle
                # worker; batch=1 returns on arrival, at one round trip per invocation.
                msgs = await sub.fetch(batch=1, timeout=FETCH_TIMEOUT_S)
            except (TimeoutError, NatsTimeout):  # nats-py raises either
                continue
            except Exception as e:  # NATS away: the client reconnects by itself; keep pulling after
                log.warning("pulling invocations (%s) failed, retrying: %r", which, e)
                await asyncio.sleep(0.5)
                continue
            self.pulled[which] += len(msgs)
            for msg in msgs:
                self.handle(msg)
