"""The control plane against real Postgres, NATS and S3: schema, keys, artifacts, ledger, events."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import func, select

from controlplane.db.models import Invocation, InvocationState, Tenant, TenantStatus, UsageRecord
from controlplane.db.session import make_engine, make_sessionmaker
from controlplane.events import EventConsumer
from controlplane.services import catalog, functions, invocations, keys, ledger
from launcher.platform import admin, publish_backbone
from lorafaas import wire
from lorafaas.artifacts import ArtifactStore
from lorafaas.errors import ArtifactIntegrityError, InvalidArtifact, NotFound, Unauthenticated
from lorafaas.names import MSG_ID_HEADER, Names
from lorafaas.settings import Settings
from lorafaas.streams import delete_streams, ensure_streams

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def test_alembic_made_every_table(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database.url.replace("+asyncpg", ""))
    try:
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        head = await conn.fetchval("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()
    assert {
        "tenants",
        "api_keys",
        "backbones",
        "functions",
        "adapter_artifacts",
        "invocations",
        "usage_records",
        "workers",
    } <= tables
    # Later issues add revisions on top: the database must sit at whatever head the scripts have.
    from alembic.script import ScriptDirectory

    from controlplane.db.migrate import alembic_config

    assert head == ScriptDirectory.from_config(alembic_config(settings.database.url)).get_current_head()


async def test_key_lifecycle(settings: Settings) -> None:
    async with admin(settings) as a:
        tenant = await keys.create_tenant(a.session, "keys-tenant")
        key, secret = await keys.create_api_key(a.session, tenant.id)
        _, expired = await keys.create_api_key(
            a.session, tenant.id, expires_at=datetime.now(UTC) - timedelta(seconds=1)
        )
    assert secret.startswith("lf_") and key.prefix == secret[:10]
    async with admin(settings) as a:
        stored = await a.session.scalar(select(func.count()).where(keys.ApiKey.secret_hash == keys.hash_secret(secret)))
        assert stored == 1
        assert secret not in str((await a.session.get(keys.ApiKey, key.id)).__dict__)  # only the hash
        assert (await keys.authenticate(a.session, secret)).tenant_id == tenant.id
        with pytest.raises(Unauthenticated):
            await keys.authenticate(a.session, expired)
        with pytest.raises(Unauthenticated):
            await keys.authenticate(a.session, "lf_not-a-key")
        await keys.revoke_api_key(a.session, tenant.id, key.id)
    async with admin(settings) as a:
        with pytest.raises(Unauthenticated, match="revoked"):
            await keys.authenticate(a.session, secret)
        _, fresh = await keys.create_api_key(a.session, tenant.id)
        (await a.session.get(Tenant, tenant.id)).status = TenantStatus.SUSPENDED
    async with admin(settings) as a:
        with pytest.raises(Unauthenticated, match="suspended"):
            await keys.authenticate(a.session, fresh)


async def test_artifact_round_trip_and_integrity(
    settings: Settings, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    store = ArtifactStore(settings.s3)
    stored = await asyncio.to_thread(store.upload_adapter, adapter_dirs["a8"], "tenant-x")
    assert stored.prefix == f"tenants/tenant-x/adapters/{stored.sha256}"
    assert set(stored.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    dest = await asyncio.to_thread(store.download, stored.prefix, tmp_path / "copy", stored.sha256)
    assert (dest / "adapter_model.safetensors").read_bytes() == (
        adapter_dirs["a8"] / "adapter_model.safetensors"
    ).read_bytes()
    with pytest.raises(ArtifactIntegrityError):
        await asyncio.to_thread(store.download, stored.prefix, tmp_path / "wrong", "f" * 64)
    # Corrupt one object in S3: the download notices and leaves nothing behind.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not the weights")
    store.client.fput_object(store.bucket, f"{stored.prefix}/adapter_model.safetensors", str(bad))
    with pytest.raises(ArtifactIntegrityError, match="adapter_model.safetensors"):
        await asyncio.to_thread(store.download, stored.prefix, tmp_path / "corrupt", stored.sha256)
    assert not (tmp_path / "corrupt").exists()
    with pytest.raises(NotFound):
        await asyncio.to_thread(store.download, "tenants/nobody/adapters/none", tmp_path / "none")


async def _tenant_with_function(
    settings: Settings, backbone_dir: Path, adapter: Path, name: str, price_in: int, price_out: int
):
    await publish_backbone(settings, "tiny", backbone_dir)
    async with admin(settings) as a:
        tenant = await keys.create_tenant(a.session, name)
        served = await catalog.register_function(
            a.session, a.store, settings.limits, tenant.id, "fn", "tiny", adapter, price_in, price_out
        )
    return tenant.id, served


async def test_register_function_refuses_bad_folder_and_leaves_nothing(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    await publish_backbone(settings, "tiny", backbone_dir)
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dirs["a8"], broken)
    (broken / "adapter_config.json").write_text("{not json")
    async with admin(settings) as a:
        tenant = await keys.create_tenant(a.session, "refused-tenant")
    with pytest.raises(InvalidArtifact, match="adapter_config.json"):
        async with admin(settings) as a:
            await catalog.register_function(a.session, a.store, settings.limits, tenant.id, "fn", "tiny", broken)
    store = ArtifactStore(settings.s3)
    assert not list(store.client.list_objects(store.bucket, prefix=f"tenants/{tenant.id}/", recursive=True))


async def _accepted(settings: Settings, tenant_id: str, served) -> str:
    async with admin(settings) as a:
        row = await invocations.accept(
            a.session, served, "hi", wire.SamplingParams(max_tokens=4), wire.InvocationMode.SYNC
        )
        return row.id


async def test_thousand_copies_of_a_usage_event_make_one_record(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    tenant_id, served = await _tenant_with_function(
        settings, backbone_dir, adapter_dirs["a8"], "ledger-tenant", 150_000, 600_000
    )
    inv_id = await _accepted(settings, tenant_id, served)
    event = wire.UsageEvent(
        invocation_id=inv_id, tenant_id=tenant_id, function_id=served.function.id, input_tokens=11, output_tokens=7
    )
    engine = make_engine(settings.database)
    sessions = make_sessionmaker(engine)

    async def once() -> bool:
        async with sessions.begin() as session:
            return await ledger.record_usage(session, event)

    written = await asyncio.gather(*(once() for _ in range(1000)))
    await engine.dispose()
    assert sum(written) == 1
    async with admin(settings) as a:
        records = (await a.session.scalars(select(UsageRecord).where(UsageRecord.invocation_id == inv_id))).all()
        now = datetime.now(UTC)
        bill = await ledger.monthly_bill(a.session, tenant_id, now.year, now.month)
        totals = await ledger.usage_totals(a.session, tenant_id)
    assert len(records) == 1 and records[0].amount_picousd == 11 * 150_000 + 7 * 600_000
    assert bill.total_picousd == totals.amount_picousd == sum(r.amount_picousd for r in records)


async def test_price_change_affects_only_later_invocations(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    tenant_id, served = await _tenant_with_function(
        settings, backbone_dir, adapter_dirs["b16"], "price-tenant", 1_000, 2_000
    )
    before = await _accepted(settings, tenant_id, served)
    async with admin(settings) as a:
        fn = await a.session.get(catalog.Function, served.function.id)
        fn.price_input_micros_per_1m = 5_000
    async with admin(settings) as a:
        after = await _accepted(settings, tenant_id, await functions.served_function(a.session, tenant_id, "fn"))
    async with admin(settings) as a:
        for inv in (before, after):
            await ledger.record_usage(
                a.session,
                wire.UsageEvent(
                    invocation_id=inv,
                    tenant_id=tenant_id,
                    function_id=served.function.id,
                    input_tokens=10,
                    output_tokens=0,
                ),
            )
    async with admin(settings) as a:
        amounts = {
            r.invocation_id: r.amount_picousd
            for r in (await a.session.scalars(select(UsageRecord).where(UsageRecord.tenant_id == tenant_id))).all()
        }
    assert amounts == {before: 10_000, after: 50_000}


async def test_event_consumer_applies_a_repeated_result_once(
    settings: Settings, backbone_dir: Path, adapter_dirs: dict[str, Path], js_conn
) -> None:
    _nc, js = js_conn
    # Streams of its own: the session's control plane (``cp_app``) consumes the session prefix's
    # events with the same durable consumer, and would take (and, during a database test, hold) them.
    private = settings.nats.model_copy(update={"prefix": f"{settings.nats.prefix}ev{uuid.uuid4().hex[:6]}"})
    names = Names(private.prefix)
    await ensure_streams(js, names)
    tenant_id, served = await _tenant_with_function(
        settings, backbone_dir, adapter_dirs["c32"], "events-tenant", 100, 200
    )
    inv_id = await _accepted(settings, tenant_id, served)
    billing = wire.Billing(tenant_id=tenant_id, function_id=served.function.id)
    result = wire.InvocationResult(
        invocation_id=inv_id,
        status=wire.ResultStatus.SUCCEEDED,
        text="x",
        prompt_tokens=3,
        completion_tokens=2,
        billing=billing,
    )
    # A second run of the same invocation (other tokens), published after the first settled it.
    rerun = result.model_copy(update={"completion_tokens": 9, "text": "other run"})
    late_failure = wire.InvocationResult(invocation_id=inv_id, status=wire.ResultStatus.FAILED, error="late duplicate")
    # Distinct message ids, so JetStream keeps every copy: the consumer itself must be idempotent.
    for i in range(2):
        await js.publish(names.result_subject(inv_id), result.encode(), headers={MSG_ID_HEADER: f"r{i}-{inv_id}"})
    await js.publish(names.result_subject(inv_id), rerun.encode(), headers={MSG_ID_HEADER: f"rerun-{inv_id}"})
    await js.publish(names.result_subject(inv_id), late_failure.encode())
    engine = make_engine(settings.database)
    consumer = EventConsumer(js, engine, names, private)
    task = asyncio.create_task(consumer.run())
    try:
        for _ in range(300):  # up to 30 s on a loaded machine; done in well under 1 s on a quiet one
            async with admin(settings) as a:
                count = await a.session.scalar(
                    select(func.count()).select_from(UsageRecord).where(UsageRecord.invocation_id == inv_id)
                )
                row = await a.session.get(Invocation, inv_id)
            if count and consumer.applied >= 4:
                break
            await asyncio.sleep(0.1)
    finally:
        consumer.stop()
        await task
        await engine.dispose()
        await delete_streams(js, names)
    async with admin(settings) as a:
        record = await a.session.scalar(select(UsageRecord).where(UsageRecord.invocation_id == inv_id))
    assert count == 1
    assert row.state == InvocationState.SUCCEEDED and row.error is None and row.completion_tokens == 2
    # The bill counts the tokens of the stored result, never those of another run.
    assert (record.input_tokens, record.output_tokens) == (row.prompt_tokens, row.completion_tokens) == (3, 2)
