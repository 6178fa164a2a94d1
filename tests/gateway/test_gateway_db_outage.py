"""Postgres away and back: the gateway's sessions answer 503 fast and recover by themselves.

The gateway keeps no pre-ping on its pool (it would cost three round trips per request), so
recovery rests on SQLAlchemy invalidating the pool when a connection error is seen. This
test stops and restarts a private Postgres server (never the shared one) under a live engine.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.db import GuardedSessions, make_gateway_engine
from launcher.devstack import free_port, wait_for_port
from lorafaas.errors import ServiceUnavailable
from lorafaas.settings import DatabaseSettings

pytestmark = pytest.mark.asyncio(loop_scope="session")

PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))


class PrivatePostgres:
    """A throwaway cluster on a free port, run as the ``postgres`` user when we are root."""

    def __init__(self, root: Path) -> None:
        self.bin = Path(PG_BINS[-1])
        self.data = root / "pgdata"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        # No pipes: the server that pg_ctl starts would hold them open, and we would wait forever.
        subprocess.run(
            [*self.as_user, str(self.bin / tool), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-o", options, "-w", "start")
        wait_for_port("127.0.0.1", self.port, 10)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if not PG_BINS or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("no PostgreSQL server binaries to start a private cluster")
    root = Path(tempfile.mkdtemp(prefix="lorafaas-pg-"))  # not under pytest's tmp: postgres must reach it
    try:
        server = PrivatePostgres(root)
        server.start()
        try:
            yield server
        finally:
            subprocess.run(
                [*server.as_user, str(server.bin / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "stop"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _select_one(sessions: GuardedSessions) -> int:
    async with sessions.connect() as connection:
        return (await connection.execute(text("SELECT 1"))).scalar_one()


async def test_database_outage_is_a_fast_503_and_the_pool_recovers(private_postgres: PrivatePostgres) -> None:
    engine = make_gateway_engine(DatabaseSettings(url=private_postgres.url, pool_size=2))
    sessions = GuardedSessions(engine)
    try:
        assert await _select_one(sessions) == 1  # the pool now holds a connection that will go stale

        private_postgres.stop()
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable) as refused:
            await _select_one(sessions)
        assert time.monotonic() - started < 1.5
        assert refused.value.retry_after_s is not None

        private_postgres.start()
        deadline, failures = time.monotonic() + 10, 0
        while True:
            try:
                assert await _select_one(sessions) == 1
                break
            except ServiceUnavailable:
                failures += 1
                assert time.monotonic() < deadline, "the pool never recovered after Postgres came back"
        assert failures <= 2  # stale connections are dropped on the first error, not one per request
        for _ in range(5):
            assert await _select_one(sessions) == 1
    finally:
        await engine.dispose()
