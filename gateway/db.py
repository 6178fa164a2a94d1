"""The gateway's database access: fail fast and answer 503 when Postgres is away.

The gateway must never hang on a dead database: connects and pool checkouts time out within
about a second, and connection-level errors become ``ServiceUnavailable`` here, at the
wrapper, so routes and services only ever see domain errors. ``pool_pre_ping`` lets the
pool replace dead connections, so the gateway recovers by itself when Postgres returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from lorafaas.errors import ServiceUnavailable
from lorafaas.settings import DatabaseSettings

CONNECT_TIMEOUT_S = 1.0
STATEMENT_TIMEOUT_S = 5.0


def make_gateway_engine(db: DatabaseSettings) -> AsyncEngine:
    return create_async_engine(
        db.url,
        pool_size=db.pool_size,
        max_overflow=db.pool_size,
        pool_pre_ping=True,
        pool_timeout=CONNECT_TIMEOUT_S,
        connect_args={"timeout": CONNECT_TIMEOUT_S, "command_timeout": STATEMENT_TIMEOUT_S},
    )


def _unavailable(error: BaseException) -> bool:
    """Connection trouble, as opposed to a query the database refused (e.g. a unique key)."""
    if isinstance(error, IntegrityError):
        return False
    if isinstance(error, (OperationalError, InterfaceError, PoolTimeout, OSError, asyncio.TimeoutError)):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


class GuardedSessions:
    """An ``async_sessionmaker`` look-alike whose sessions raise ``ServiceUnavailable`` when Postgres is down."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self._sessions() as session:
                yield session
        except Exception as e:
            if _unavailable(e):
                raise ServiceUnavailable("the database is unavailable; retry shortly", retry_after_s=1.0) from e
            raise

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncSession]:
        """One transaction, committed when the block ends cleanly."""
        try:
            async with self._sessions.begin() as session:
                yield session
        except Exception as e:
            if _unavailable(e):
                raise ServiceUnavailable("the database is unavailable; retry shortly", retry_after_s=1.0) from e
            raise
