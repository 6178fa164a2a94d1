"""The control plane's consumer of worker events: started, result and usage.

One durable pull consumer over the events stream. Each event is one idempotent statement
(a guarded state transition, or an ``ON CONFLICT DO NOTHING`` usage record), run on an
autocommit session: no BEGIN or COMMIT round trips around it. The message is acked only
after the statement committed, and a repeated message changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from controlplane.db.session import make_sessionmaker
from controlplane.services import invocations, ledger
from lorafaas.errors import LorafaasError
from lorafaas.names import Names
from lorafaas.settings import NatsSettings
from lorafaas.streams import controlplane_consumer_config
from lorafaas.wire import InvocationResult, Started, UsageEvent

log = logging.getLogger(__name__)

_DECODERS = {"started": Started, "result": InvocationResult, "usage": UsageEvent}


Event = Started | InvocationResult | UsageEvent


def decode_event(subject: str, data: bytes) -> Event:
    """The event kind is the subject token after ``events``."""
    kind = subject.split(".events.", 1)[-1].split(".", 1)[0]
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ValueError(f"unknown event subject {subject}")
    return decoder.decode(data)


async def apply_event(session: AsyncSession, event: Event) -> bool | invocations.Settled | None:
    if isinstance(event, Started):
        return await invocations.apply_started(session, event)
    if isinstance(event, InvocationResult):
        return await invocations.apply_result(session, event)
    return await ledger.record_usage(session, event)


class EventConsumer:
    """Pulls events and applies them to Postgres until stopped."""

    def __init__(
        self,
        js: JetStreamContext,
        engine: AsyncEngine,
        names: Names,
        nats: NatsSettings,
        on_result: Callable[[InvocationResult], None] | None = None,
    ) -> None:
        self.js, self.names, self.nats = js, names, nats
        self.sessions = make_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))
        # Called after commit for each result that settled an invocation (callbacks hook in here).
        self.on_result = on_result
        self._stopping = asyncio.Event()
        self.applied = 0

    async def run(self) -> None:
        config = controlplane_consumer_config(self.names, self.nats)
        sub = await self.js.pull_subscribe(
            config.filter_subject, durable=config.durable_name, stream=self.names.events_stream, config=config
        )
        try:
            while not self._stopping.is_set():
                try:
                    msgs = await sub.fetch(batch=64, timeout=0.5)
                except (TimeoutError, NatsTimeout):  # nats-py raises either
                    continue
                for msg in msgs:
                    await self.handle(msg)
        finally:
            await sub.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    async def handle(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.subject, msg.data)
        except (ValueError, ValidationError) as e:
            log.error("dropping undecodable event on %s: %s", msg.subject, e)
            await msg.term()
            return
        try:
            async with self.sessions() as session:
                outcome = await apply_event(session, event)
        except (OperationalError, DBAPIError, OSError) as e:
            log.warning("database unavailable applying %s, retrying: %s", msg.subject, e)
            await msg.nak(delay=1.0)
            return
        except LorafaasError as e:
            log.error("refusing event on %s: %s", msg.subject, e.message)
            await msg.term()
            return
        self.applied += 1
        await msg.ack()
        if isinstance(outcome, invocations.Settled) and outcome.has_callback and self.on_result is not None:
            self.on_result(event)
