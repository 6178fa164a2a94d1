"""Refuse an oversize adapter upload before its body is spooled.

FastAPI parses a multipart body (writing file parts to temporary files) before the route
runs, so a size check inside the route comes after the whole upload is on disk. This
route class checks first: a ``Content-Length`` over the limit is answered 413 before one
byte of the body is read, and a streamed (chunked) body is cut off as soon as it passes
the limit. Either way the response closes the connection, so the rest is never read.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from starlette.types import Message

from lorafaas.settings import LimitSettings

# Room for the multipart framing and the form fields around the adapter's files.
ENVELOPE_BYTES = 1 << 20


def upload_limit(limits: LimitSettings) -> int:
    """The largest request body an adapter upload may have."""
    return limits.max_adapter_bytes + ENVELOPE_BYTES


def _too_large(limits: LimitSettings, size: int | None) -> HTTPException:
    sent = f"{size} bytes" if size is not None else "the request body"
    return HTTPException(
        status_code=413,
        detail=f"{sent} is over the upload limit of {upload_limit(limits)} bytes "
        f"(an adapter of at most {limits.max_adapter_bytes} bytes plus {ENVELOPE_BYTES} bytes of form fields)",
        headers={"Connection": "close"},
    )


class UploadRoute(APIRoute):
    """An APIRoute whose request body may not exceed ``upload_limit`` of the running settings."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            limits: LimitSettings = request.app.state.runtime.settings.limits
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > upload_limit(limits):
                raise _too_large(limits, int(declared))
            received = 0

            async def receive() -> Message:
                nonlocal received
                message = await request.receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > upload_limit(limits):
                        raise _too_large(limits, None)
                return message

            return await handler(Request(request.scope, receive))

        return limited
