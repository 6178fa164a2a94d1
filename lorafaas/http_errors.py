"""The one place that maps domain errors to HTTP, in OpenAI's error shape, and documents them.

``{"error": {"message": ..., "type": ..., "param": null, "code": ...}}``

Both services install the same handlers (``install_error_handlers``): domain errors by their
status below, request validation as 400, third-party errors through the service's translator
(the database's outages as 503 with ``Retry-After``), and anything else as a logged 500. A NUL
character in a path or query value is refused with 400 before any handler runs: no id, name or
filter can hold one, and Postgres cannot store it. ``document_errors`` makes the OpenAPI
document say the same: every error status a route answers, with this body.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from lorafaas import errors

log = logging.getLogger(__name__)

STATUS: dict[type[errors.LorafaasError], int] = {
    errors.InvalidInput: 400,
    errors.Unauthenticated: 401,
    errors.PaymentRequired: 402,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.InvalidArtifact: 422,
    errors.QuotaExceeded: 429,
    errors.ArtifactIntegrityError: 500,
    errors.InvocationFailed: 502,
    errors.ServiceUnavailable: 503,
    errors.InvocationTimeout: 504,
}

Translator = Callable[[Exception], errors.LorafaasError | None]


def check_text(value: str) -> str:
    """A pydantic validator for text from clients: no NUL (Postgres cannot store it) and no unpaired
    surrogate (a JSON escape like ``\\ud800`` that UTF-8, and so NATS and Postgres, cannot carry)."""
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError as e:
        raise ValueError("must be valid Unicode (it contains an unpaired surrogate)") from e
    return value


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None, **extra: object) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code or type_, **extra}}


def domain_body(exc: errors.LorafaasError) -> dict:
    """The error body of a domain error: its message and code, and its plain details (param, limit, ...)."""
    body = error_body(exc.message, exc.code)
    body["error"].update({k: v for k, v in exc.details.items() if isinstance(v, (str, int, float, bool)) or v is None})
    return body


def status_of(exc: errors.LorafaasError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.LorafaasError)
    status = status_of(exc)
    headers = {str(k): str(v) for k, v in (getattr(exc, "headers", None) or {}).items()}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return JSONResponse(domain_body(exc), status_code=status, headers=headers)


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    if error.get("type") == "json_invalid":
        return f"request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    return f"{where or 'body'}: {error.get('msg')}"


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errs = exc.errors()
    param = ".".join(str(p) for p in errs[0].get("loc", ()) if p != "body") if errs else None
    message = "; ".join(_describe(e) for e in errs) or "invalid request"
    return JSONResponse(
        error_body(message, "invalid_request_error", "invalid_request", param=param or None), status_code=400
    )


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        error_body(str(exc.detail), "http_error", str(exc.status_code)),
        status_code=exc.status_code,
        headers=exc.headers,
    )


def _internal(exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal error", "server_error"), status_code=500)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    return _internal(exc)


def _translated(translate: Translator) -> Callable[[Request, Exception], Any]:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        domain = translate(exc)
        return await _domain_error(request, domain) if domain is not None else _internal(exc)

    return handler


class RefuseNul:
    """ASGI middleware: 400 for a NUL character in the path or query string (raw or %00)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope.get("path", "") or b"\x00" in unquote_to_bytes(scope.get("query_string", b""))
        ):
            where = "path" if "\x00" in scope.get("path", "") else "query string"
            body = error_body(f"the {where} contains a NUL character", "invalid_request_error", "invalid_request")
            await JSONResponse(body, status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install_error_handlers(
    app: FastAPI, translate: Translator | None = None, translated: Iterable[type[Exception]] = ()
) -> None:
    """Map every error to HTTP; ``translate`` turns the ``translated`` third-party errors into domain ones."""
    app.add_middleware(RefuseNul)
    app.add_exception_handler(errors.LorafaasError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    if translate is not None:
        for cls in translated:
            app.add_exception_handler(cls, _translated(translate))
    app.add_exception_handler(Exception, _unexpected)


# --- the OpenAPI document ---------------------------------------------------------------------
class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # details such as limit, invocation_id, scope
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error's body, OpenAI's shape."""

    error: ErrorDetail


_MEANING = {
    400: "Invalid request: a field, parameter or limit; `param` names it",
    401: "Missing, invalid, revoked or expired credentials",
    402: "The tenant's monthly spend cap is reached",
    403: "The API key lacks the scope this route needs",
    404: "Not found (another tenant's resources read as missing)",
    409: "Conflicts with the current state",
    413: "The upload is larger than the limit",
    422: "The adapter cannot be served; the message names the file, tensor and problem",
    429: "Rate limit, concurrency quota or queue limit; retry after `Retry-After` seconds",
    502: "The invocation failed on the worker",
    503: "NATS or Postgres unavailable; retry after `Retry-After` seconds",
    504: "No result within the sync timeout; `invocation_id` names the invocation to poll",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the error body (and Retry-After where sent)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _MEANING[status]}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


def document_errors(app: FastAPI) -> None:
    """Drop FastAPI's generated 422 (validation errors answer 400 here) from the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                generated = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
                if generated.get("$ref", "").endswith("/HTTPValidationError"):
                    del responses["422"]
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
