"""Shared fixtures: real NATS (the shared server, a private subject prefix), a private Postgres
database migrated by Alembic, a private S3 server (moto) on loopback, a tiny backbone and
PEFT adapters built in code, and the platform's processes for end-to-end tests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import nats
import pytest
import pytest_asyncio

from launcher.devstack import DevStack, free_port, start_s3, stop_process
from launcher.platform import prepare
from lorafaas.names import Names
from lorafaas.settings import (
    CallbackSettings,
    DatabaseSettings,
    LimitSettings,
    NatsSettings,
    S3Settings,
    Settings,
    WorkerSettings,
)
from lorafaas.streams import delete_streams

if TYPE_CHECKING:
    from tests.support.platform import Platform

NATS_URL = "nats://127.0.0.1:4222"
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def make_settings(tmp: Path, s3_port: int, db_name: str, prefix: str) -> Settings:
    return Settings(
        nats=NatsSettings(url=NATS_URL, prefix=prefix, ack_wait_s=3.0, max_deliver=4),
        database=DatabaseSettings(url=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{db_name}", pool_size=5),
        s3=S3Settings(endpoint=f"127.0.0.1:{s3_port}", bucket="lorafaas-test"),
        limits=LimitSettings(max_tokens=64, sync_timeout_s=60.0),
        worker=WorkerSettings(cache_dir=tmp / "cache", max_batch=8, report_interval_s=0.5, heartbeat_interval_s=0.5),
        # The tests' callback receivers listen on loopback, which production settings refuse.
        callbacks=CallbackSettings(allowed_networks=["127.0.0.0/8"]),
        gateway_port=free_port(),
        controlplane_port=free_port(),
    )


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lorafaas")


@pytest.fixture(scope="session")
def s3_port() -> Iterator[int]:
    port = free_port()
    proc = start_s3(port)
    yield port
    stop_process(proc)


@pytest.fixture(scope="session")
def settings(session_tmp: Path, s3_port: int) -> Iterator[Settings]:
    """Settings private to this test session: own database, own S3, own NATS prefix."""
    suffix = uuid.uuid4().hex[:8]
    s = make_settings(session_tmp, s3_port, f"lorafaas_test_{suffix}", f"lft{suffix}")
    with DevStack(s, session_tmp / "stack"):  # NATS and Postgres run already; starts nothing then
        asyncio.run(prepare(s))
        yield s
    asyncio.run(drop_private_state(s))


async def drop_private_state(s: Settings) -> None:
    """Drop a test's private database and NATS streams."""
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{s.database.url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()
    nc = await nats.connect(s.nats.url)
    js = nc.jetstream()
    await delete_streams(js, Names(s.nats.prefix))
    await nc.close()


@pytest_asyncio.fixture(loop_scope="session")
async def js_conn(settings: Settings) -> AsyncIterator[tuple]:
    nc = await nats.connect(settings.nats.url)
    yield nc, nc.jetstream()
    await nc.close()


@pytest.fixture(scope="session")
def backbone_dir(session_tmp: Path) -> Path:
    from gpuworker.models import build_backbone

    return build_backbone(session_tmp / "backbone-tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def adapter_dirs(session_tmp: Path, backbone_dir: Path) -> dict[str, Path]:
    """Three distinct adapters of different ranks on the tiny backbone."""
    from gpuworker.models import make_adapter

    specs = {"a8": (8, 1), "b16": (16, 2), "c32": (32, 3)}
    return {
        name: make_adapter(backbone_dir, session_tmp / f"adapter-{name}", rank, seed, scale=2.0)
        for name, (rank, seed) in specs.items()
    }


@pytest.fixture(scope="session")
def platform(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path], session_tmp: Path
) -> Iterator[Platform]:
    """One running platform for every end-to-end test of the session."""
    from tests.support.platform import run_platform

    yield from run_platform(settings, backbone_dir, adapter_dirs, session_tmp)
