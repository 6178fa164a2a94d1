"""Dead letters: an invocation whose last delivery died with its worker.

A worker answers a message on its last delivery as failed (and copies it to the dead-letter
stream) when it can. When the worker died instead, JetStream emits
``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`` and keeps the message in
the work queue. This mover hears the advisory, fetches the message by stream sequence, copies
it to the dead-letter stream with the reason, publishes a failed result (so a sync caller
gets an error, the job reads failed and its callback fires) and deletes it from the queue.

Advisories are core NATS: one sent while the control plane is down is not replayed.
"""

from __future__ import annotations

import json
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from lorafaas.errors import InvocationFailed
from lorafaas.names import DEAD_REASON_HEADER, MSG_ID_HEADER, Names, dead_message_msg_id, dead_msg_id, result_msg_id
from lorafaas.wire import Invocation, InvocationResult, ResultStatus, UnknownSchemaVersion

log = logging.getLogger(__name__)


class DeadLetterMover:
    def __init__(self, nc: NATS, js: JetStreamContext, names: Names) -> None:
        self.nc, self.js, self.names = nc, js, names
        self.moved = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            self.names.max_deliveries_advisory(self.names.invocations_stream), cb=self._on_advisory
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            advisory = json.loads(msg.data)
            await self.move(
                int(advisory["stream_seq"]), int(advisory.get("deliveries", 0)), advisory.get("consumer", "")
            )
        except Exception:  # one bad advisory must not end the subscription
            log.exception("could not dead-letter after advisory %s", msg.data[:200])

    async def move(self, seq: int, deliveries: int, consumer: str) -> None:
        stream = self.names.invocations_stream
        try:
            raw = await self.js.get_msg(stream, seq)
        except NotFoundError:
            return  # already answered (acked or terminated) by a worker
        reason = (
            f"no worker finished it in {deliveries} deliveries (consumer {consumer}); "
            "the last attempt died before answering"
        )
        data = raw.data or b""
        try:
            invocation = Invocation.decode(data)
        except (ValidationError, UnknownSchemaVersion) as e:
            log.error("dead-lettering undecodable message %d of %s: %s (%s)", seq, stream, reason, e)
            subject = (raw.subject or "").replace(f"{self.names.prefix}.invoke.", f"{self.names.prefix}.dead.", 1)
            await self.js.publish(
                subject,
                data,
                headers={MSG_ID_HEADER: dead_message_msg_id(stream, seq), DEAD_REASON_HEADER: f"{reason}; {e}"},
            )
            await self.js.delete_msg(stream, seq)
            return
        inv_id = invocation.invocation_id
        await self.js.publish(
            self.names.dead_letter_subject(invocation.backbone),
            data,
            headers={MSG_ID_HEADER: dead_msg_id(inv_id), DEAD_REASON_HEADER: reason},
        )
        failed = InvocationResult(
            invocation_id=inv_id, status=ResultStatus.FAILED, error=reason, error_code=InvocationFailed.code
        )
        await self.js.publish(
            self.names.result_subject(inv_id), failed.encode(), headers={MSG_ID_HEADER: result_msg_id(inv_id)}
        )
        await self.js.delete_msg(stream, seq)
        self.moved += 1
        log.warning("invocation %s dead-lettered: %s", inv_id, reason)
