"""FastAPI dependencies of the control plane API, as ``Annotated`` aliases."""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from controlplane.services.keys import Principal, authenticate
from lorafaas.artifacts import ArtifactStore
from lorafaas.errors import Unauthenticated
from lorafaas.names import Names
from lorafaas.settings import Settings

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="Admin: the operator token. Tenant routes: an API key 'lf_...'.")


@dataclass
class ControlPlaneRuntime:
    """What every handler needs: settings, database sessions, the artifact store and NATS."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    store: ArtifactStore
    nc: NATS
    names: Names

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """Committed before the handler answers, so a client never sees an uncommitted change."""
        async with self.sessions.begin() as session:
            yield session

    async def tenant_changed(self, tenant_id: str) -> None:
        """Tell every gateway to drop its cached quota of this tenant (after the commit)."""
        try:
            await self.nc.publish(self.names.tenant_changed_subject, tenant_id.encode())
            await self.nc.flush(timeout=1)
        except Exception as e:  # the gateways' cache TTL is the safety net
            log.warning("could not publish quota change of %s: %s", tenant_id, e)


def _runtime(request: Request) -> ControlPlaneRuntime:
    return request.app.state.runtime


async def _runtime_dep(request: Request) -> ControlPlaneRuntime:  # async: a plain def would run in a thread
    return _runtime(request)


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials else None


async def require_operator(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    expected = _runtime(request).settings.admin_token
    token = _token(credentials)
    if not token or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthenticated("admin routes need 'Authorization: Bearer <LORAFAAS_ADMIN_TOKEN>'")


async def _principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    async with _runtime(request).sessions() as session:
        return await authenticate(session, _token(credentials))


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    """A read-only session: writes go through ``runtime.transaction()``."""
    async with _runtime(request).sessions() as session:
        yield session


RuntimeDep = Annotated[ControlPlaneRuntime, Depends(_runtime_dep)]
PrincipalDep = Annotated[Principal, Depends(_principal)]
ReadSessionDep = Annotated[AsyncSession, Depends(_session)]
