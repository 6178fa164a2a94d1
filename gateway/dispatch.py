"""Publishing invocations to JetStream and hearing their tokens and results on NATS.

Every wait subscribes before it publishes, so an answer cannot slip past. When NATS is
away the gateway answers 503 at once (``ServiceUnavailable``) instead of letting nats-py
buffer the publish until its timeout; the client reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError

from gateway.router import PlacementRouter
from lorafaas.errors import InvocationTimeout, ServiceUnavailable
from lorafaas.names import MSG_ID_HEADER, Names, cancel_msg_id, invocation_msg_id, result_msg_id
from lorafaas.wire import CancelRequest, Invocation, InvocationResult, TokenChunk, WireMessage

PUBLISH_TIMEOUT_S = 1.0
NATS_ERRORS = (NatsTimeout, NoStreamResponseError, ConnectionClosedError, NoServersError, asyncio.TimeoutError)


@dataclass
class Watch:
    """Tokens and the result of one invocation, in arrival order, on one queue."""

    queue: asyncio.Queue[TokenChunk | InvocationResult]

    async def result(self, timeout_s: float, invocation_id: str) -> InvocationResult:
        """Skip tokens until the result; past ``timeout_s`` a 504 naming the id to poll."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                item = await asyncio.wait_for(self.queue.get(), max(0.0, remaining))
            except TimeoutError as e:
                raise InvocationTimeout(
                    f"no result within {timeout_s:g}s; the invocation goes on: "
                    f"poll GET /v1/invocations/{invocation_id}",
                    invocation_id=invocation_id,
                ) from e
            if isinstance(item, InvocationResult):
                return item


class Dispatcher:
    """Owns the gateway's side of the wire: publish invocations and cancels, watch results."""

    def __init__(self, nc: NATS, js: JetStreamContext, names: Names, router: PlacementRouter | None = None) -> None:
        self.nc, self.js, self.names, self.router = nc, js, names, router

    def require_connected(self) -> None:
        if not self.nc.is_connected:
            raise ServiceUnavailable("the invocation queue (NATS) is unavailable; retry shortly", retry_after_s=1.0)

    async def _publish(self, subject: str, message: WireMessage, msg_id: str) -> None:
        self.require_connected()
        try:
            await self.js.publish(subject, message.encode(), timeout=PUBLISH_TIMEOUT_S, headers={MSG_ID_HEADER: msg_id})
        except NATS_ERRORS as e:
            raise ServiceUnavailable("the invocation queue is unavailable; retry shortly", retry_after_s=1.0) from e

    async def publish(self, invocation: Invocation) -> None:
        """Publish once, to the worker the router picks; JetStream drops a repeat with the same Nats-Msg-Id."""
        subject = self.router.subject_for(invocation) if self.router else self.names.invoke_subject(invocation.backbone)
        await self._publish(subject, invocation, invocation_msg_id(invocation.invocation_id))

    async def publish_cancel(self, invocation_id: str) -> None:
        await self._publish(
            self.names.cancel_subject(invocation_id),
            CancelRequest(invocation_id=invocation_id),
            cancel_msg_id(invocation_id),
        )

    async def publish_result(self, result: InvocationResult) -> None:
        """A result the gateway settles itself (a cancelled queued invocation); same id as a worker's."""
        await self._publish(
            self.names.result_subject(result.invocation_id), result, result_msg_id(result.invocation_id)
        )

    async def _last_event(self, subject: str) -> bytes | None:
        self.require_connected()
        try:
            return (await self.js.get_last_msg(self.names.events_stream, subject)).data
        except NotFoundError:
            return None
        except NATS_ERRORS as e:
            raise ServiceUnavailable("the event stream is unavailable; retry shortly", retry_after_s=1.0) from e

    async def published_result(self, invocation_id: str) -> InvocationResult | None:
        """The result already in the events stream, even before the control plane applied it."""
        data = await self._last_event(self.names.result_subject(invocation_id))
        return InvocationResult.decode(data) if data is not None else None

    async def was_started(self, invocation_id: str) -> bool:
        """Has a worker announced it started? (The events stream knows before Postgres does.)"""
        return await self._last_event(self.names.started_subject(invocation_id)) is not None

    @contextlib.asynccontextmanager
    async def watch(self, invocation_id: str, tokens: bool = False) -> AsyncIterator[Watch]:
        """Subscribe to the result (and the token stream) of one invocation for the block's duration.

        The result subscription asks the server to drop it after one message, in the same write
        as the SUB: once the result is heard, ending the watch sends nothing more.
        """
        self.require_connected()
        queue: asyncio.Queue[TokenChunk | InvocationResult] = asyncio.Queue()
        heard = False

        async def on_result(msg: Msg) -> None:
            nonlocal heard
            heard = True
            if self.router is not None:
                self.router.finished(invocation_id)
            queue.put_nowait(InvocationResult.decode(msg.data))

        async def on_token(msg: Msg) -> None:
            queue.put_nowait(TokenChunk.decode(msg.data))

        result_sub = await self.nc.subscribe(self.names.result_subject(invocation_id), cb=on_result)
        await result_sub.unsubscribe(limit=1)
        token_sub = await self.nc.subscribe(self.names.token_subject(invocation_id), cb=on_token) if tokens else None
        try:
            yield Watch(queue)
        finally:
            for sub in (token_sub, None if heard else result_sub):
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
