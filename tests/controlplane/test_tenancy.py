"""Admin and tenant routes: key lifecycle over HTTP, tenant isolation, bills, usage, margin, workers."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from controlplane.db.models import UsageRecord
from controlplane.services import functions, invocations, ledger
from launcher.platform import admin
from lorafaas import wire
from lorafaas.names import Names
from lorafaas.settings import Settings
from tests.controlplane.conftest import new_tenant, register, tenant_client

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def test_admin_routes_need_the_operator_token(cp_app: FastAPI) -> None:
    async with tenant_client(cp_app, "not-the-token") as client:
        r = await client.get("/admin/tenants")
    assert r.status_code == 401 and "admin" in r.json()["error"]["message"]


async def test_key_lifecycle_over_http(cp_app: FastAPI, admin_client) -> None:
    tenant_id, secret = await new_tenant(admin_client, "keys")
    async with tenant_client(cp_app, secret) as client:
        assert (await client.get("/v1/functions")).status_code == 200
        keys = (await admin_client.get(f"/admin/tenants/{tenant_id}/keys")).json()["data"]
        assert len(keys) == 1 and secret.startswith(keys[0]["prefix"]) and "secret" not in keys[0]
        revoked_at = time.monotonic()
        assert (await admin_client.delete(f"/admin/tenants/{tenant_id}/keys/{keys[0]['id']}")).status_code == 200
        r = await client.get("/v1/functions")
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        assert time.monotonic() - revoked_at < 1.0
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    expired = (await admin_client.post(f"/admin/tenants/{tenant_id}/keys", json={"expires_at": past})).json()["secret"]
    async with tenant_client(cp_app, expired) as client:
        assert (await client.get("/v1/functions")).status_code == 401
    fresh = (await admin_client.post(f"/admin/tenants/{tenant_id}/keys", json={"expires_in_s": 3600})).json()["secret"]
    async with tenant_client(cp_app, fresh) as client:
        assert (await client.get("/v1/functions")).status_code == 200
        assert (await admin_client.post(f"/admin/tenants/{tenant_id}/suspend")).json()["status"] == "suspended"
        r = await client.get("/v1/functions")
        assert r.status_code == 401 and "suspended" in r.json()["error"]["message"]
        assert (await admin_client.post(f"/admin/tenants/{tenant_id}/reactivate")).json()["status"] == "active"
        assert (await client.get("/v1/functions")).status_code == 200


async def test_a_tenant_manages_its_own_keys(cp_app: FastAPI, admin_client) -> None:
    """/v1/keys: a tenant makes, lists and revokes its keys with one of its own, never beyond that key's
    scopes, and never another tenant's."""
    _, secret = await new_tenant(admin_client, "own-keys")
    _, other_secret = await new_tenant(admin_client, "own-keys-other")
    period = f"{datetime.now(UTC):%Y-%m}"
    async with tenant_client(cp_app, secret) as client, tenant_client(cp_app, other_secret) as other:
        [maker] = (await client.get("/v1/keys")).json()["data"]
        r = await client.post("/v1/keys", json={"name": "dashboards", "scopes": ["read-usage"], "expires_in_s": 3600})
        assert r.status_code == 201, r.text
        reader = r.json()
        assert reader["scopes"] == ["read-usage"] and reader["secret"].startswith(reader["prefix"])
        assert reader["expires_at"] is not None and reader["tenant_id"] == maker["tenant_id"]
        listed = (await client.get("/v1/keys")).json()["data"]
        assert [k["id"] for k in listed] == [maker["id"], reader["id"]] and all("secret" not in k for k in listed)
        # Another tenant neither sees the key nor revokes it: not found, as if it did not exist.
        assert reader["id"] not in {k["id"] for k in (await other.get("/v1/keys")).json()["data"]}
        r = await other.delete(f"/v1/keys/{reader['id']}")
        assert r.status_code == 404 and reader["id"] in r.json()["error"]["message"]

        async with tenant_client(cp_app, reader["secret"]) as as_reader:
            assert (await as_reader.get(f"/v1/bills/{period}")).status_code == 200
            r = await as_reader.post("/v1/keys", json={"scopes": ["read-usage"]})
            assert r.status_code == 403 and "manage-functions" in r.json()["error"]["message"]
            assert (await as_reader.delete(f"/v1/keys/{maker['id']}")).status_code == 403

        r = await client.post("/v1/keys", json={"scopes": ["manage-functions", "read-usage"]})
        manager = r.json()
        async with tenant_client(cp_app, manager["secret"]) as as_manager:
            r = await as_manager.post("/v1/keys", json={"scopes": ["invoke"]})
            assert r.status_code == 403 and "invoke" in r.json()["error"]["message"]
            r = await as_manager.post("/v1/keys", json={"name": "same-as-me"})  # default: the maker's scopes
            assert r.status_code == 201 and sorted(r.json()["scopes"]) == ["manage-functions", "read-usage"]
        r = await client.post("/v1/keys", json={"scopes": ["everything"]})
        assert r.status_code == 400 and "scopes" in r.json()["error"]["message"]
        r = await client.post("/v1/keys", json={"expires_in_s": -5})
        assert r.status_code == 400 and "expires_in_s" in r.json()["error"]["message"]

        r = await client.delete(f"/v1/keys/{reader['id']}")
        assert r.status_code == 200 and r.json()["revoked_at"] is not None
        async with tenant_client(cp_app, reader["secret"]) as as_reader:
            assert (await as_reader.get(f"/v1/bills/{period}")).status_code == 401
        assert (await client.get("/v1/keys")).status_code == 200  # the maker still works


async def _invoke_and_settle(
    settings: Settings, tenant_id: str, name: str, tokens: tuple[int, int], device_ns: int = 0
) -> str:
    """An accepted invocation with its usage recorded, as the event consumer would leave it."""
    async with admin(settings) as a:
        served = await functions.served_function(a.session, tenant_id, name)
        row = await invocations.accept(
            a.session, served, "hi", wire.SamplingParams(max_tokens=4), wire.InvocationMode.SYNC
        )
        result = wire.InvocationResult(
            invocation_id=row.id,
            status=wire.ResultStatus.SUCCEEDED,
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
        )
        await invocations.apply_result(a.session, result)
        usage = wire.UsageEvent(
            invocation_id=row.id,
            tenant_id=tenant_id,
            function_id=served.function.id,
            input_tokens=tokens[0],
            output_tokens=tokens[1],
            device_ns=device_ns,
        )
        await ledger.record_usage(a.session, usage)
        return row.id


async def test_tenant_b_sees_nothing_of_tenant_a(
    cp_app: FastAPI, admin_client, settings: Settings, adapter_dirs: dict[str, Path]
) -> None:
    a_id, a_key = await new_tenant(admin_client, "iso-a")
    _b_id, b_key = await new_tenant(admin_client, "iso-b")
    async with tenant_client(cp_app, a_key) as a, tenant_client(cp_app, b_key) as b:
        fn = (await register(a, "secret-fn", adapter_dirs["a8"])).json()
        await _invoke_and_settle(settings, a_id, "secret-fn", (5, 3))
        for path in (
            "/v1/functions/secret-fn",
            "/v1/functions/secret-fn/versions",
            "/v1/functions/secret-fn/versions/1",
            "/v1/invocations?function=secret-fn",
            f"/v1/usage?start_time={int(time.time()) - 3600}&function=secret-fn",
        ):
            r = await b.get(path)
            assert r.status_code == 404, (path, r.text)
        assert (await b.post("/v1/functions/secret-fn/rollback", json={"version": 1})).status_code == 404
        # A's stored artifact cannot be named as B's source, even with its exact s3:// prefix.
        uri = f"s3://{settings.s3.bucket}/tenants/{a_id}/adapters/{fn['sha256']}"
        r = await b.post("/v1/functions", data={"name": "stolen", "backbone": "tiny", "s3_uri": uri})
        assert r.status_code == 422 and "no adapter files" in r.json()["error"]["message"]
        assert (await b.get("/v1/functions")).json()["data"] == []
        assert (await b.get("/v1/invocations")).json()["data"] == []
        month = f"{datetime.now(UTC):%Y-%m}"
        assert (await b.get(f"/v1/bills/{month}")).json()["lines"] == []
        usage = (await b.get(f"/v1/usage?start_time={int(time.time()) - 3600}")).json()
        assert all(bucket["results"] == [] for bucket in usage["data"])
        assert len((await a.get("/v1/invocations?function=secret-fn&state=succeeded")).json()["data"]) == 1


async def test_bill_usage_and_margin_are_exact_sums(
    cp_app: FastAPI, admin_client, settings: Settings, adapter_dirs: dict[str, Path]
) -> None:
    tenant_id, key = await new_tenant(admin_client, "bill")
    async with tenant_client(cp_app, key) as client:
        for name, adapter in (("f1", "a8"), ("f2", "b16")):
            assert (await register(client, name, adapter_dirs[adapter])).status_code == 201
        fns = {
            f["name"]: f["id"]
            for f in (await admin_client.get(f"/admin/functions?tenant_id={tenant_id}")).json()["data"]
        }
        r = await admin_client.patch(
            f"/admin/functions/{fns['f1']}",
            json={"price_input_micros_per_1m": 150_000, "price_output_micros_per_1m": 600_000},
        )
        assert r.status_code == 200
        await admin_client.patch(
            f"/admin/functions/{fns['f2']}",
            json={"price_input_micros_per_1m": 333_333, "price_output_micros_per_1m": 777_777},
        )
        for i in range(7):
            await _invoke_and_settle(
                settings, tenant_id, "f1" if i % 2 else "f2", (11 + i, 3 + i), device_ns=123_456_789 + i
            )
        month = f"{datetime.now(UTC):%Y-%m}"
        bill = (await client.get(f"/v1/bills/{month}")).json()
        usage = (await client.get(f"/v1/usage?start_time={int(time.time()) - 7200}&bucket_width=1h")).json()
    async with admin(settings) as a:
        records = (await a.session.scalars(select(UsageRecord).where(UsageRecord.tenant_id == tenant_id))).all()
    assert len(records) == 7
    assert (
        bill["total_picousd"]
        == sum(r.amount_picousd for r in records)
        == sum(line["amount_picousd"] for line in bill["lines"])
    )
    assert {line["function"] for line in bill["lines"]} == {"f1", "f2"}
    results = [res for bucket in usage["data"] for res in bucket["results"]]
    assert sum(res["amount_picousd"] for res in results) == bill["total_picousd"]
    assert sum(res["num_model_requests"] for res in results) == 7
    assert sum(res["input_tokens"] for res in results) == sum(r.input_tokens for r in records)
    report = (await admin_client.get(f"/admin/reports/margin?period={month}&tenant_id={tenant_id}")).json()
    device_ns = sum(r.device_ns for r in records)
    price = settings.controlplane.device_price_micros_per_hour
    assert report["device_ns"] == device_ns and report["revenue_picousd"] == bill["total_picousd"]
    assert report["cost_picousd"] == ledger.device_cost_picousd(device_ns, price)
    assert report["margin_picousd"] == report["revenue_picousd"] - report["cost_picousd"]
    assert [t["tenant_id"] for t in report["by_tenant"]] == [tenant_id] and len(report["by_function"]) == 2


async def test_heartbeat_registers_a_worker_and_silence_marks_it_dead(
    cp_app: FastAPI, admin_client, settings: Settings
) -> None:
    registry = cp_app.state.registry
    nc = await nats.connect(settings.nats.url)
    # A backbone no worker serves: the session platform's scheduler must not take this heartbeat for a worker to use.
    beat = wire.WorkerHeartbeat(
        worker_id="registry-w1", backbone="registry-only", device="cpu", started_at=datetime.now(UTC)
    )
    try:
        await nc.publish(Names(settings.nats.prefix).heartbeat_subject, beat.encode())
        await nc.flush()
        worker = None
        for _ in range(50):
            workers = (await admin_client.get("/admin/workers")).json()["data"]
            worker = next((w for w in workers if w["id"] == "registry-w1"), None)
            if worker:
                break
            await asyncio.sleep(0.1)
        assert worker is not None and worker["status"] == "alive" and worker["backbone"] == "registry-only"
    finally:
        await nc.close()
    registry.dead_after_s = 0.3
    try:
        await asyncio.sleep(0.5)
        await registry.reap()
        workers = (await admin_client.get("/admin/workers?status=dead")).json()["data"]
    finally:
        registry.dead_after_s = settings.controlplane.worker_dead_after_s
    assert "registry-w1" in [w["id"] for w in workers]
