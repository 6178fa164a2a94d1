"""Prestart step: wait for Postgres, create the database if missing, run ``alembic upgrade head``.

Alembic is the only way the schema is made.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]


def _asyncpg_dsn(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def ensure_database(url: str, timeout_s: float = 30.0) -> None:
    """Wait until the server answers, then create the URL's database if it does not exist."""
    name = make_url(url).database
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = await asyncpg.connect(_asyncpg_dsn(url, "postgres"), timeout=2)
            break
        except (OSError, asyncpg.PostgresError) as e:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Postgres at {make_url(url).host}:{make_url(url).port} did not answer in {timeout_s:g}s: {e}"
                ) from e
            await asyncio.sleep(0.5)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    return config


def upgrade_head(url: str) -> None:
    """Run the migrations (blocking; alembic's env runs its own event loop)."""
    command.upgrade(alembic_config(url), "head")


async def prepare_database(url: str) -> None:
    await ensure_database(url)
    await asyncio.to_thread(upgrade_head, url)
