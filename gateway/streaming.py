"""Server-sent events: the native stream format and the HTTP error a stream can still carry.

Native events::

    event: token
    data: {"index": 0, "text": "..."}

    event: done
    data: {"id": ..., "state": "succeeded", "finish_reason": ..., "text": ..., "usage": {...}}

A failure after the response started cannot change the HTTP status, so it is sent as
``event: error`` with the same ``{"error": {...}}`` body a non-streamed call would get.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from gateway.service import raise_for_failure, usage_of
from lorafaas import wire
from lorafaas.errors import LorafaasError
from lorafaas.http_errors import domain_body, error_body

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def error_event(exc: Exception, event: str | None = "error") -> str:
    if isinstance(exc, LorafaasError):
        return sse(domain_body(exc), event)
    log.exception("stream failed", exc_info=exc)
    return sse(error_body("internal error", "server_error"), event)


async def guarded(events: AsyncIterator[str], on_error: Callable[[Exception], str] = error_event) -> AsyncIterator[str]:
    """Turn an exception mid-stream into a final error event instead of a cut connection."""
    try:
        async for chunk in events:
            yield chunk
    except Exception as e:
        yield on_error(e)


async def native_events(
    invocation_id: str, items: AsyncIterator[wire.TokenChunk | wire.InvocationResult]
) -> AsyncIterator[str]:
    async for item in items:
        if isinstance(item, wire.TokenChunk):
            if item.text:
                yield sse({"index": item.index, "text": item.text}, "token")
            continue
        raise_for_failure(item)
        usage = usage_of(item.prompt_tokens, item.completion_tokens).model_dump()
        yield sse(
            {
                "id": invocation_id,
                "state": item.status.value,
                "finish_reason": item.finish_reason,
                "text": item.text,
                "usage": usage,
            },
            "done",
        )


def event_stream(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(
        guarded(events), media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
    )
