"""Native HTTP routes of the gateway: thin over ``InvocationService``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse

from gateway.deps import PrincipalDep, ServiceDep
from gateway.schemas import CallbackSecret, InvocationStatus, InvokeRequest, InvokeResponse
from gateway.service import Accepted, response_of
from gateway.streaming import event_stream, native_events
from lorafaas.http_errors import error_responses
from lorafaas.names import SIGNATURE_HEADER
from lorafaas.wire import InvocationMode

router = APIRouter()

# What a submission answers besides its result: each error status, with OpenAI's error body.
SUBMIT_ERRORS = error_responses(400, 401, 402, 403, 404, 409, 429, 502, 503, 504)
SSE_CONTENT = {"text/event-stream": {"schema": {"type": "string", "description": "Server-sent events"}}}

IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", description="Same key and body within 24 h: the same invocation.")
]


def replay_headers(accepted: Accepted) -> dict[str, str]:
    headers = {"x-invocation-id": accepted.invocation_id}
    if accepted.replayed:
        headers["Idempotent-Replayed"] = "true"
    return headers


@router.get("/healthz", include_in_schema=False)
async def healthz(request: Request) -> dict:
    nc = request.app.state.runtime.nc
    return {"status": "ok" if nc.is_connected else "degraded", "nats": nc.is_connected}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return request.app.state.runtime.metrics.render()


@router.post(
    "/v1/functions/{function}/invoke",
    response_model=InvokeResponse,
    tags=["invocations"],
    responses={
        200: {"description": "mode=sync: the result (JSON); mode=stream: server-sent events", "content": SSE_CONTENT},
        202: {"model": InvocationStatus, "description": "mode=async: accepted; poll the Location"},
        **SUBMIT_ERRORS,
    },
)
async def invoke(
    function: str,
    body: InvokeRequest,
    principal: PrincipalDep,
    service: ServiceDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
):
    """Invoke a function: ``sync`` waits (504 with the invocation id past the timeout), ``stream``
    answers with server-sent events, ``async`` answers 202 with the id to poll or cancel."""
    accepted = await service.accept(principal, function, body, idempotency_key)
    headers = replay_headers(accepted)
    timeout = request.app.state.runtime.settings.limits.sync_timeout_s
    if body.mode == InvocationMode.ASYNC:
        status = await service.invoke_async(principal, accepted)
        return JSONResponse(
            status.model_dump(),
            status_code=202,
            headers={**headers, "Location": f"/v1/invocations/{accepted.invocation_id}"},
        )
    if body.mode == InvocationMode.STREAM:
        items = await service.open_stream(accepted, timeout)
        return event_stream(native_events(accepted.invocation_id, items), headers)
    result = await service.invoke_sync(accepted, timeout)
    return JSONResponse(response_of(accepted, result).model_dump(mode="json"), headers=headers)


@router.get(
    "/v1/invocations/{invocation_id}",
    response_model=InvocationStatus,
    tags=["invocations"],
    responses=error_responses(400, 401, 403, 404, 503),
)
async def invocation_status(invocation_id: str, principal: PrincipalDep, service: ServiceDep) -> InvocationStatus:
    """The state of one of the tenant's invocations, with its result, usage and callback attempts."""
    return await service.status(principal, invocation_id)


@router.post(
    "/v1/invocations/{invocation_id}/cancel",
    response_model=InvocationStatus,
    status_code=202,
    tags=["invocations"],
    responses=error_responses(400, 401, 403, 404, 409, 503),
)
async def cancel_invocation(invocation_id: str, principal: PrincipalDep, service: ServiceDep) -> InvocationStatus:
    """Cancel a queued or running invocation (409 once it finished); poll its status for the outcome."""
    return await service.cancel(principal, invocation_id)


@router.get(
    "/v1/callbacks/secret",
    response_model=CallbackSecret,
    tags=["callbacks"],
    responses=error_responses(400, 401, 403, 503),
)
async def callback_secret(principal: PrincipalDep, service: ServiceDep) -> CallbackSecret:
    """The tenant's secret for verifying callback signatures."""
    secret = await service.callback_secret(principal)
    return CallbackSecret(
        secret=secret, header=SIGNATURE_HEADER, scheme="t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.<raw body>')>"
    )
