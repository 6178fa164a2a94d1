"""Database errors classified in one place: Postgres in crash recovery is a 503 with Retry-After
on both services, a value Postgres refuses is a 400, and only outages count as retryable.

The recovering database is a real TCP server speaking the Postgres wire protocol, which refuses
every connection the way a recovering Postgres does (FATAL 57P03 "the database system is not
yet accepting connections"), so asyncpg and SQLAlchemy raise exactly what they raise then.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from controlplane.db.errors import DbFailure, classify, domain_error
from controlplane.db.session import make_engine, make_sessionmaker
from gateway.app import create_app as create_gateway
from gateway.db import GuardedSessions, make_gateway_engine
from lorafaas.errors import InvalidInput, ServiceUnavailable
from lorafaas.settings import DatabaseSettings, Settings

RECOVERING = "the database system is not yet accepting connections"


def _error_response(code: str, message: str) -> bytes:
    fields = b"".join(tag + value.encode() + b"\x00" for tag, value in ((b"S", "FATAL"), (b"C", code), (b"M", message)))
    body = fields + b"\x00"
    return b"E" + struct.pack("!I", len(body) + 4) + body


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while True:
            length = struct.unpack("!I", await reader.readexactly(4))[0]
            payload = await reader.readexactly(length - 4)
            if struct.unpack("!I", payload[:4])[0] == 80877103:  # SSLRequest: no TLS here
                writer.write(b"N")
                await writer.drain()
                continue
            writer.write(_error_response("57P03", RECOVERING))  # the startup message: refuse it
            await writer.drain()
            break
    writer.close()


@pytest_asyncio.fixture(loop_scope="session")
async def recovering_db() -> AsyncIterator[str]:
    """A database URL whose server answers every connection like Postgres in crash recovery."""
    server = await asyncio.start_server(_refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/lorafaas"
    finally:
        server.close()
        await server.wait_closed()


# --- classification --------------------------------------------------------------------------
@pytest.mark.unit
def test_classify_by_sqlstate_and_type() -> None:
    assert classify(asyncpg.exceptions.CannotConnectNowError(RECOVERING)) == DbFailure.UNAVAILABLE
    assert classify(asyncpg.exceptions.AdminShutdownError("shutting down")) == DbFailure.UNAVAILABLE
    assert classify(asyncpg.exceptions.TooManyConnectionsError("too many")) == DbFailure.UNAVAILABLE
    assert classify(asyncpg.exceptions.SerializationError("retry")) == DbFailure.UNAVAILABLE
    assert classify(asyncpg.exceptions.CharacterNotInRepertoireError("0x00")) == DbFailure.DATA
    assert classify(asyncpg.exceptions.NumericValueOutOfRangeError("integer out of range")) == DbFailure.DATA
    assert classify(asyncpg.exceptions.UndefinedTableError("no table")) == DbFailure.OTHER
    assert classify(ConnectionRefusedError()) == DbFailure.UNAVAILABLE
    assert classify(IntegrityError("insert", {}, Exception("dup"))) == DbFailure.OTHER
    assert classify(ValueError("a bug")) == DbFailure.OTHER
    # SQLAlchemy's wrapper keeps the SQLSTATE on .orig; the cause chain is searched too.
    wrapped = DBAPIError("select 1", {}, asyncpg.exceptions.CannotConnectNowError(RECOVERING))
    assert classify(wrapped) == DbFailure.UNAVAILABLE
    assert isinstance(domain_error(wrapped), ServiceUnavailable)
    assert isinstance(domain_error(asyncpg.exceptions.CharacterNotInRepertoireError("0x00")), InvalidInput)
    assert domain_error(ValueError("a bug")) is None


# --- a recovering database over a real connection --------------------------------------------
@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="session")
async def test_recovering_database_is_unavailable_not_a_bug(recovering_db: str) -> None:
    engine = make_gateway_engine(DatabaseSettings(url=recovering_db, pool_size=1))
    try:
        with pytest.raises(DBAPIError) as raw:
            async with engine.connect() as conn:
                await conn.execute(text("select 1"))
        assert classify(raw.value) == DbFailure.UNAVAILABLE, raw.value
        with pytest.raises(ServiceUnavailable):
            async with GuardedSessions(engine)() as session:
                await session.execute(text("select 1"))
    finally:
        await engine.dispose()


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="session")
async def test_gateway_answers_503_with_retry_after_while_postgres_recovers(
    settings: Settings, recovering_db: str
) -> None:
    app: FastAPI = create_gateway(settings.model_copy(update={"database": DatabaseSettings(url=recovering_db)}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client,
    ):
        response = await client.get("/v1/models", headers={"Authorization": "Bearer lf_anything"})
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "service_unavailable"


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="session")
async def test_controlplane_answers_503_with_retry_after_while_postgres_recovers(
    cp_app: FastAPI, recovering_db: str
) -> None:
    runtime = cp_app.state.runtime
    engine = make_engine(DatabaseSettings(url=recovering_db, pool_size=1))
    healthy, runtime.sessions = runtime.sessions, make_sessionmaker(engine)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cp_app), base_url="http://cp") as client:
            tenant_route = await client.get("/v1/functions", headers={"Authorization": "Bearer lf_anything"})
            admin_route = await client.get(
                "/admin/tenants", headers={"Authorization": f"Bearer {runtime.settings.admin_token}"}
            )
    finally:
        runtime.sessions = healthy
        await engine.dispose()
    for response in (tenant_route, admin_route):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
