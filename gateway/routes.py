"""Native HTTP routes of the gateway: thin over ``InvocationService``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.deps import PrincipalDep, ServiceDep
from gateway.schemas import InvocationStatus, InvokeRequest, InvokeResponse

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
async def healthz(request: Request) -> dict:
    nc = request.app.state.runtime.nc
    return {"status": "ok" if nc.is_connected else "degraded", "nats": nc.is_connected}


@router.post("/v1/functions/{function}/invoke", response_model=InvokeResponse, tags=["invocations"])
async def invoke(function: str, body: InvokeRequest, principal: PrincipalDep, service: ServiceDep, request: Request) -> InvokeResponse:
    """Invoke a function synchronously: waits for the result (504 with the invocation id past the timeout)."""
    timeout = request.app.state.runtime.settings.limits.sync_timeout_s
    return await service.invoke_sync(principal, function, body, timeout)


@router.get("/v1/invocations/{invocation_id}", response_model=InvocationStatus, tags=["invocations"])
async def invocation_status(invocation_id: str, principal: PrincipalDep, service: ServiceDep) -> InvocationStatus:
    """The state of one of the tenant's invocations, with its result and usage once finished."""
    return await service.status(principal, invocation_id)
