"""The control plane's consumer of worker events: started and result.

One durable pull consumer over the events stream; events are told apart by their ``kind``
field. A ``started`` event is one guarded UPDATE on an autocommit session. A ``result`` settles
its invocation and, in the same transaction, writes the usage record derived from that very
result (``InvocationResult.usage``): the bill counts exactly the tokens of the stored result,
and a repeated or late result changes nothing. The message is acked only after the commit.

Failures are classified (``controlplane.db.errors``):
- the database away (connection-level): the event is ``nak``-ed with a growing delay and the
  consumer pauses until the database answers again, so an outage costs each event one
  delivery, not one per second;
- anything else (a data error such as a NUL byte Postgres refuses, an event naming an unknown
  invocation, an undecodable message, another schema version) is permanent: the event goes to
  the dead-letter stream with its reason, its invocation is settled ``failed`` and unbilled,
  and the event is terminated.
No event is retried without bound: after ``EVENTS_MAX_DELIVER`` deliveries it is dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from controlplane.db.errors import DbFailure, classify
from controlplane.db.session import make_sessionmaker
from controlplane.services import invocations, ledger
from lorafaas.errors import InvocationFailed, LorafaasError
from lorafaas.names import DEAD_REASON_HEADER, MSG_ID_HEADER, Names, dead_event_msg_id, dead_message_msg_id
from lorafaas.settings import NatsSettings
from lorafaas.streams import EVENTS_MAX_DELIVER, controlplane_consumer_config
from lorafaas.wire import InvocationResult, ResultStatus, Started, UnknownSchemaVersion, decode_event

log = logging.getLogger(__name__)

Event = Started | InvocationResult
RETRY_BASE_S, RETRY_MAX_S = 0.5, 10.0  # nak delay of a transient failure: doubles per delivery


async def apply_event(session: AsyncSession, event: Event) -> bool | invocations.Settled | None:
    """Apply one event inside the caller's transaction. A result that settles its invocation
    records its usage in the same transaction; a repeat of a settled one records nothing."""
    if isinstance(event, Started):
        return await invocations.apply_started(session, event)
    settled = await invocations.apply_result(session, event)
    usage = event.usage()
    if settled is not None and usage is not None:
        await ledger.record_usage(session, usage)
    return settled


def is_transient(error: BaseException) -> bool:
    """Connection-level trouble (worth a retry later), as opposed to a statement Postgres refused."""
    return classify(error) == DbFailure.UNAVAILABLE


class DatabaseUnavailable(Exception):
    """The database is away: stop applying events until it answers again."""


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
        self.engine = engine
        self.sessions = make_sessionmaker(engine)
        self.autocommit = make_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))
        # Called after commit for each result that settled an invocation (callbacks hook in here).
        self.on_result = on_result
        self._stopping = asyncio.Event()
        self.applied = 0
        self.dead_lettered = 0
        self.outages = 0  # database outages seen (each pauses the consumer until it ends)

    async def run(self) -> None:
        config = controlplane_consumer_config(self.names, self.nats)
        sub = await self.js.pull_subscribe(
            self.names.events_wildcard, durable=config.durable_name, stream=self.names.events_stream, config=config
        )
        try:
            while not self._stopping.is_set():
                try:
                    msgs = await sub.fetch(batch=64, timeout=0.5)
                except (TimeoutError, NatsTimeout):  # nats-py raises either
                    continue
                except Exception as e:  # NATS away: the client reconnects by itself
                    log.warning("fetching events failed, retrying: %r", e)
                    await asyncio.sleep(0.5)
                    continue
                try:
                    await self._handle_batch(msgs)
                except Exception:  # e.g. NATS gone mid-batch: unacked events come back after AckWait
                    log.exception("applying a batch of events failed; unacked events will be redelivered")
                    await asyncio.sleep(0.5)
        finally:
            await sub.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    async def _handle_batch(self, msgs: list[Msg]) -> None:
        for i, msg in enumerate(msgs):
            try:
                await self.handle(msg)
            except DatabaseUnavailable:
                for rest in msgs[i + 1 :]:  # not tried: back in the stream, to retry after the outage
                    await rest.nak(delay=RETRY_BASE_S)
                await self._wait_for_database()
                return

    async def handle(self, msg: Msg) -> None:
        """Apply one event; raises ``DatabaseUnavailable`` (after naking it) when Postgres is away."""
        try:
            event = decode_event(msg.data)
        except (ValidationError, UnknownSchemaVersion) as e:
            await self._refuse(msg, None, f"undecodable event: {e}")
            return
        try:
            outcome = await self._apply(event)
        except Exception as e:
            delivered = msg.metadata.num_delivered
            if is_transient(e) and delivered < EVENTS_MAX_DELIVER:
                log.warning("database unavailable applying %s (delivery %d), retrying: %r", msg.subject, delivered, e)
                await msg.nak(delay=min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (delivered - 1)))
                raise DatabaseUnavailable from e
            reason = e.message if isinstance(e, LorafaasError) else f"{type(e).__name__}: {e}"
            await self._refuse(msg, event, reason)
            return
        self.applied += 1
        await msg.ack()
        settled = isinstance(outcome, invocations.Settled) and outcome.has_callback
        if settled and isinstance(event, InvocationResult) and self.on_result is not None:
            self.on_result(event)

    async def _apply(self, event: Event) -> bool | invocations.Settled | None:
        if isinstance(event, Started):  # one statement: autocommit, no BEGIN/COMMIT round trips
            async with self.autocommit() as session:
                return await apply_event(session, event)
        async with self.sessions.begin() as session:  # settle + usage: both or neither
            return await apply_event(session, event)

    async def _refuse(self, msg: Msg, event: Event | None, reason: str) -> None:
        """A permanent failure: dead-letter the event with its reason, settle its invocation failed, terminate it."""
        kind, invocation_id = _identify(event, msg.data)
        log.error("dead-lettering %s event of invocation %s: %s", kind, invocation_id or "?", reason)
        msg_id = (
            dead_event_msg_id(kind, invocation_id)
            if invocation_id
            else dead_message_msg_id(self.names.events_stream, msg.metadata.sequence.stream)
        )
        await self.js.publish(
            self.names.dead_event_subject(kind),
            msg.data,
            headers={MSG_ID_HEADER: msg_id, DEAD_REASON_HEADER: reason[:1000]},
        )
        if invocation_id and kind == "result":
            await self._settle_failed(invocation_id, reason)
        self.dead_lettered += 1
        await msg.term()

    async def _settle_failed(self, invocation_id: str, reason: str) -> None:
        """A result that cannot be stored still ends its invocation: failed, with nothing billed."""
        failed = InvocationResult(
            invocation_id=invocation_id,
            status=ResultStatus.FAILED,
            error=f"the result could not be recorded: {reason}"[:2000],
            error_code=InvocationFailed.code,
        )
        try:
            async with self.autocommit() as session:
                outcome = await invocations.apply_result(session, failed)
        except Exception as e:  # the dead letter keeps the event for an operator either way
            log.error("could not settle invocation %s as failed: %r", invocation_id, e)
            return
        if outcome is not None and outcome.has_callback and self.on_result is not None:
            self.on_result(failed)

    async def _wait_for_database(self) -> None:
        """Pause until Postgres answers a trivial query again (backoff up to 5 s between probes)."""
        self.outages += 1
        started, delay = time.monotonic(), 0.25
        while not self._stopping.is_set():
            try:
                async with self.engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
            except Exception as e:
                if not is_transient(e):
                    raise
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            log.warning("database back after %.1fs; applying events again", time.monotonic() - started)
            return


def _identify(event: Event | None, data: bytes) -> tuple[str, str]:
    """The kind and invocation id of an event, read leniently when it did not decode."""
    if event is not None:
        return event.kind, event.invocation_id
    try:
        raw = json.loads(data)
    except ValueError:
        return "unknown", ""
    if not isinstance(raw, dict):
        return "unknown", ""
    kind, invocation_id = raw.get("kind"), raw.get("invocation_id")
    return (
        kind if isinstance(kind, str) and kind else "unknown",
        invocation_id if isinstance(invocation_id, str) else "",
    )
