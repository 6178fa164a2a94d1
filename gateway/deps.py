"""FastAPI dependencies of the gateway, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controlplane.services.keys import Principal
from gateway.service import InvocationService

_bearer = HTTPBearer(auto_error=False, description="A tenant API key: 'Authorization: Bearer lf_...'")


async def _service(request: Request) -> InvocationService:  # async: a plain def would run in a thread
    return request.app.state.runtime.invocations


async def _principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    runtime = request.app.state.runtime
    return await runtime.keys.principal(runtime.invocations.sessions, credentials.credentials if credentials else None)


ServiceDep = Annotated[InvocationService, Depends(_service)]
PrincipalDep = Annotated[Principal, Depends(_principal)]
