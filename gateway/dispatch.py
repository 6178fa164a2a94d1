"""Publishing invocations to JetStream and waiting for their results on NATS."""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client as NATS
from nats.errors import ConnectionClosedError, NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from lorafaas.errors import InvocationTimeout, ServiceUnavailable
from lorafaas.names import MSG_ID_HEADER, Names
from lorafaas.wire import Invocation, InvocationResult

PUBLISH_TIMEOUT_S = 2.0


class Dispatcher:
    """Owns the gateway's side of the wire: publish an invocation, wait for its result."""

    def __init__(self, nc: NATS, js: JetStreamContext, names: Names) -> None:
        self.nc, self.js, self.names = nc, js, names

    async def publish(self, invocation: Invocation) -> None:
        """Publish once; JetStream drops a repeat with the same Nats-Msg-Id (the invocation id)."""
        subject = self.names.invoke_subject(invocation.backbone)
        try:
            await self.js.publish(subject, invocation.encode(), timeout=PUBLISH_TIMEOUT_S, headers={MSG_ID_HEADER: invocation.invocation_id})
        except (NatsTimeout, NoStreamResponseError, ConnectionClosedError, NoServersError, asyncio.TimeoutError) as e:
            raise ServiceUnavailable("the invocation queue is unavailable; retry shortly", retry_after_s=1.0) from e

    async def invoke_and_wait(self, invocation: Invocation, timeout_s: float) -> InvocationResult:
        """Subscribe to the result before publishing, so the answer cannot be missed."""
        sub = await self.nc.subscribe(self.names.result_subject(invocation.invocation_id), max_msgs=1)
        try:
            await self.publish(invocation)
            try:
                msg = await sub.next_msg(timeout=timeout_s)
            except NatsTimeout as e:
                raise InvocationTimeout(
                    f"no result within {timeout_s:g}s; the invocation goes on: poll GET /v1/invocations/{invocation.invocation_id}",
                    invocation_id=invocation.invocation_id,
                ) from e
            return InvocationResult.decode(msg.data)
        finally:
            with contextlib.suppress(Exception):  # already gone once max_msgs arrived
                await sub.unsubscribe()
