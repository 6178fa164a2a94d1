"""The control plane's event consumer under bad events (issues 12.2, 12.3 and 13.6), on real Postgres and NATS.

Regressions: a result whose text held a NUL byte was refused by Postgres, taken for an outage
and retried every second forever (``max_deliver=-1``), leaving its invocation ``running`` and
its usage billed; events were decoded by subject and any schema version was read as ours.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from controlplane.db.models import Invocation, InvocationState, UsageRecord
from controlplane.db.session import make_engine
from controlplane.events import EventConsumer, is_transient
from controlplane.services import catalog, invocations, keys
from launcher.devstack import free_port
from launcher.platform import admin, publish_backbone
from lorafaas import wire
from lorafaas.names import DEAD_REASON_HEADER, MSG_ID_HEADER, Names, result_msg_id
from lorafaas.settings import Settings
from lorafaas.streams import EVENTS_MAX_DELIVER, controlplane_consumer_config, ensure_streams

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def _function(settings: Settings, backbone_dir: Path, adapter: Path, name: str) -> catalog.ServedFunction:
    await publish_backbone(settings, "tiny", backbone_dir)
    async with admin(settings) as a:
        tenant = await keys.create_tenant(a.session, name)
        return await catalog.register_function(
            a.session, a.store, settings.limits, tenant.id, "fn", "tiny", adapter, 1_000, 2_000
        )


async def _accept(settings: Settings, served: catalog.ServedFunction) -> str:
    async with admin(settings) as a:
        admitted = await invocations.accept(
            a.session, served, "hi", wire.SamplingParams(max_tokens=4), wire.InvocationMode.SYNC
        )
    assert admitted.id is not None
    return admitted.id


def _result(inv_id: str, served: catalog.ServedFunction, text: str) -> wire.InvocationResult:
    billing = wire.Billing(tenant_id=served.function.tenant_id, function_id=served.function.id, device_ns=5)
    return wire.InvocationResult(
        invocation_id=inv_id,
        status=wire.ResultStatus.SUCCEEDED,
        text=text,
        prompt_tokens=2,
        completion_tokens=3,
        billing=billing,
    )


async def _row(settings: Settings, inv_id: str) -> tuple[Invocation, UsageRecord | None]:
    async with admin(settings) as a:
        row = await a.session.get(Invocation, inv_id)
        usage = await a.session.scalar(select(UsageRecord).where(UsageRecord.invocation_id == inv_id))
    return row, usage


async def _consume_until(settings: Settings, js, done, timeout_s: float = 20.0) -> EventConsumer:
    names = Names(settings.nats.prefix)
    engine = make_engine(settings.database)
    consumer = EventConsumer(js, engine, names, settings.nats)
    task = asyncio.create_task(consumer.run())
    try:
        for _ in range(int(timeout_s / 0.1)):
            if await done(consumer):
                break
            await asyncio.sleep(0.1)
    finally:
        consumer.stop()
        await task
        await engine.dispose()
    return consumer


async def test_a_nul_byte_result_is_dead_lettered_settled_failed_and_not_billed(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path], js_conn
) -> None:
    _nc, js = js_conn
    names = Names(settings.nats.prefix)
    await ensure_streams(js, names)
    served = await _function(settings, backbone_dir, adapter_dirs["a8"], "nul-tenant")
    poisoned, healthy = await _accept(settings, served), await _accept(settings, served)
    for inv_id, body in ((poisoned, "a\x00b"), (healthy, "fine")):
        result = _result(inv_id, served, body)
        await js.publish(names.result_subject(inv_id), result.encode(), headers={MSG_ID_HEADER: result_msg_id(inv_id)})

    async def settled(_consumer: EventConsumer) -> bool:
        rows = [(await _row(settings, i))[0] for i in (poisoned, healthy)]
        return all(r.state in (InvocationState.FAILED, InvocationState.SUCCEEDED) for r in rows)

    # (The session's platform, when running, shares the durable consumer: assert on what is stored.)
    consumer = await _consume_until(settings, js, settled)
    (bad, bad_usage), (good, good_usage) = await _row(settings, poisoned), await _row(settings, healthy)
    assert bad.state == InvocationState.FAILED and bad_usage is None, "a data error settles failed, unbilled"
    assert "could not be recorded" in bad.error and "0x00" in bad.error
    assert good.state == InvocationState.SUCCEEDED and good_usage.output_tokens == good.completion_tokens == 3
    assert consumer.outages == 0  # refused at once, not taken for an outage
    dead = await js.get_last_msg(names.dead_letter_stream, names.dead_event_subject("result"))
    assert dead.data is not None and dead.headers is not None
    assert json.loads(dead.data)["invocation_id"] == poisoned and "0x00" in dead.headers[DEAD_REASON_HEADER]


async def test_an_unknown_schema_version_is_refused_loudly(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path], js_conn
) -> None:
    _nc, js = js_conn
    names = Names(settings.nats.prefix)
    await ensure_streams(js, names)
    served = await _function(settings, backbone_dir, adapter_dirs["b16"], "schema-tenant")
    inv_id = await _accept(settings, served)
    future = json.loads(_result(inv_id, served, "from the future").encode())
    future["schema_version"] = wire.SCHEMA_VERSION + 1
    await js.publish(names.result_subject(inv_id), json.dumps(future).encode())

    async def refused(_consumer: EventConsumer) -> bool:
        return (await _row(settings, inv_id))[0].state == InvocationState.FAILED

    await _consume_until(settings, js, refused)
    row, usage = await _row(settings, inv_id)
    assert row.state == InvocationState.FAILED and usage is None  # refused, never read as ours, unbilled
    assert f"schema_version {wire.SCHEMA_VERSION + 1}" in row.error
    dead = await js.get_last_msg(names.dead_letter_stream, names.dead_event_subject("result"))
    assert dead.headers is not None and "schema_version" in dead.headers[DEAD_REASON_HEADER]


async def test_events_are_decoded_by_kind_and_refuse_unknown_versions() -> None:
    started = wire.Started(invocation_id="i", worker_id="w")
    assert wire.decode_event(started.encode()) == started
    with pytest.raises(wire.UnknownSchemaVersion):
        wire.decode_event(started.model_copy(update={"schema_version": 2}).encode())
    with pytest.raises(wire.UnknownSchemaVersion):
        wire.Invocation.decode(json.dumps({"schema_version": 0, "kind": "invocation"}).encode())
    with pytest.raises(ValueError):  # a kind that is not an event (the old separate usage message)
        wire.decode_event(json.dumps({"kind": "usage", "invocation_id": "i"}).encode())


async def test_the_events_consumer_retries_a_bounded_number_of_times(settings: Settings) -> None:
    config = controlplane_consumer_config(Names(settings.nats.prefix), settings.nats)
    assert 0 < config.max_deliver == EVENTS_MAX_DELIVER


class _Orig(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


async def test_database_errors_are_classified(settings: Settings) -> None:
    engine = make_engine(settings.database)
    try:
        async with engine.connect() as connection:
            with pytest.raises(DBAPIError) as data_error:
                await connection.exec_driver_sql("SELECT $1::text", ("a\x00b",))
    finally:
        await engine.dispose()
    assert not is_transient(data_error.value)  # a NUL byte fails the same way every time
    away = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x")
    try:
        with pytest.raises(OSError) as refused:
            async with away.connect() as conn:
                await conn.execute(text("select 1"))
    finally:
        await away.dispose()
    assert is_transient(refused.value)
    for code, transient in (("57P03", True), ("08006", True), ("40001", True), ("22021", False), ("23505", False)):
        assert is_transient(DBAPIError("SELECT 1", None, _Orig(code))) is transient, code
