"""Engine and session factory, built from settings (never at import time)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from lorafaas.settings import DatabaseSettings


def make_engine(db: DatabaseSettings) -> AsyncEngine:
    # No pre-ping (three round trips per checkout): a connection error invalidates the pool instead.
    return create_async_engine(db.url, pool_size=db.pool_size)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
