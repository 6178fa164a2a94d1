"""The gateway's database access: fail fast and answer 503 when Postgres is away.

The gateway must never hang on a dead database: connects and pool checkouts time out within
about a second, and connection-level errors become ``ServiceUnavailable`` here, at the
wrapper (``controlplane.db.errors`` decides what an error means), so routes and services only
ever see domain errors. A connection error makes
SQLAlchemy invalidate the whole pool, so the gateway recovers by itself when Postgres
returns; no pre-ping, which would cost three round trips on every checkout.

Plain sessions autocommit: reads and a lone write cost one round trip each, with no BEGIN
and COMMIT/ROLLBACK around them; ``begin()`` is for blocks that must be atomic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from contextlib import asynccontextmanager
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from controlplane.db.errors import domain_error
from controlplane.db.session import make_sessionmaker
from lorafaas.settings import DatabaseSettings

T = TypeVar("T")

CONNECT_TIMEOUT_S = 1.0
STATEMENT_TIMEOUT_S = 5.0


def make_gateway_engine(db: DatabaseSettings) -> AsyncEngine:
    return create_async_engine(
        db.url,
        pool_size=db.pool_size,
        max_overflow=db.pool_size,
        pool_timeout=CONNECT_TIMEOUT_S,
        connect_args={"timeout": CONNECT_TIMEOUT_S, "command_timeout": STATEMENT_TIMEOUT_S},
    )


class GuardedSessions:
    """An ``async_sessionmaker`` look-alike whose sessions raise ``ServiceUnavailable`` when Postgres is down."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._transactional = make_sessionmaker(engine)
        self._autocommit = make_sessionmaker(self._autocommit_engine)

    @asynccontextmanager
    async def _guarded(self, opened: AsyncContextManager[T]) -> AsyncIterator[T]:
        try:
            async with opened as session:
                yield session
        except Exception as e:
            domain = domain_error(e)  # an outage (including crash recovery) is a 503, a refused value a 400
            if domain is not None:
                raise domain from e
            raise

    def __call__(self) -> AsyncContextManager[AsyncSession]:
        """Each statement commits by itself: for reads, or a block whose only write is one statement."""
        return self._guarded(self._autocommit())

    def connect(self) -> AsyncContextManager[AsyncConnection]:
        """A bare autocommit connection, without the ORM session's overhead: for one Core statement."""
        return self._guarded(self._autocommit_engine.connect())

    def begin(self) -> AsyncContextManager[AsyncSession]:
        """One transaction, committed when the block ends cleanly."""
        return self._guarded(self._transactional.begin())
