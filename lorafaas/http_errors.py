"""The one place that maps domain errors to HTTP, in OpenAI's error shape.

``{"error": {"message": ..., "type": ..., "param": null, "code": ...}}``
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None, **extra: object) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code or type_, **extra}}


def status_of(exc: errors.LorafaasError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


async def _domain_error(_: Request, exc: errors.LorafaasError) -> JSONResponse:
    status = status_of(exc)
    headers = {str(k): str(v) for k, v in (getattr(exc, "headers", None) or {}).items()}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    extra = {k: v for k, v in exc.details.items() if isinstance(v, (str, int, float, bool)) or v is None}
    return JSONResponse(error_body(exc.message, exc.code, **extra), status_code=status, headers=headers)


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    if error.get("type") == "json_invalid":
        return f"request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    return f"{where or 'body'}: {error.get('msg')}"


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    param = ".".join(str(p) for p in errs[0].get("loc", ()) if p != "body") if errs else None
    message = "; ".join(_describe(e) for e in errs) or "invalid request"
    return JSONResponse(
        error_body(message, "invalid_request_error", "invalid_request", param=param or None), status_code=400
    )


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        error_body(str(exc.detail), "http_error", str(exc.status_code)),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal error", "server_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.LorafaasError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
