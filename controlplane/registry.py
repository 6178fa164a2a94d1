"""The control plane's side of the worker registry: heartbeat subscriber and dead-worker reaper.

A worker is ``alive`` only while its heartbeats arrive *and* report engine progress: a beat
saying the engine failed, or held work without a step for ``stuck_after_s``, marks it
``stuck`` (the process answers, its engine does not); silence marks it ``dead``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from controlplane.services import workers
from lorafaas.names import Names
from lorafaas.wire import UnknownSchemaVersion, WorkerHeartbeat

log = logging.getLogger(__name__)


def liveness(beat: WorkerHeartbeat, stuck_after_s: float) -> workers.WorkerStatus:
    """What a heartbeat says of its worker: alive only if its engine works and moves."""
    if beat.engine_failed is not None or beat.engine_stalled_s > stuck_after_s:
        return workers.WorkerStatus.STUCK
    return workers.WorkerStatus.ALIVE


class WorkerRegistry:
    """Heartbeats arrive on core NATS (lossy by design: the next beat repairs a lost one)."""

    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        names: Names,
        dead_after_s: float,
        stuck_after_s: float = 30.0,
    ) -> None:
        self.nc, self.sessions, self.names, self.dead_after_s = nc, sessions, names, dead_after_s
        self.stuck_after_s = stuck_after_s
        self._stopping = asyncio.Event()
        self.beats = 0

    async def run(self) -> None:
        sub = await self.nc.subscribe(self.names.heartbeat_subject, cb=self._on_beat)
        try:
            while not self._stopping.is_set():
                await self.reap()
                with contextlib.suppress(asyncio.TimeoutError):  # the next sweep is due
                    await asyncio.wait_for(self._stopping.wait(), timeout=max(0.2, self.dead_after_s / 4))
        finally:
            await sub.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    async def reap(self) -> list[str]:
        try:
            async with self.sessions.begin() as session:
                dead = await workers.mark_silent_dead(session, self.dead_after_s)
        except (OperationalError, DBAPIError, OSError) as e:
            log.warning("database unavailable marking silent workers: %s", e)
            return []
        for worker_id in dead:
            log.warning("worker %s silent for over %gs: marked dead", worker_id, self.dead_after_s)
        return dead

    async def _on_beat(self, msg: Msg) -> None:
        try:
            beat = WorkerHeartbeat.decode(msg.data)
        except (ValidationError, UnknownSchemaVersion) as e:
            log.error("dropping undecodable heartbeat: %s", e)
            return
        status = liveness(beat, self.stuck_after_s)
        if status == workers.WorkerStatus.STUCK:
            log.warning(
                "worker %s is stuck: engine %s",
                beat.worker_id,
                beat.engine_failed or f"stalled for {beat.engine_stalled_s:.1f}s",
            )
        try:
            async with self.sessions.begin() as session:
                await workers.record_heartbeat(session, beat, status)
        except (OperationalError, DBAPIError, OSError) as e:
            log.warning("database unavailable recording heartbeat of %s: %s", beat.worker_id, e)
            return
        self.beats += 1
