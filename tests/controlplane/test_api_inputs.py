"""Hostile input on the control plane's routes is a 4xx naming the problem, never a 500:
NUL characters in ids, names and query values; integers and times past what Postgres or a date
can hold; booleans sent as numbers; and ``/v1/usage`` totals when ``group_by`` is omitted."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from lorafaas.settings import Settings
from tests.controlplane.conftest import new_tenant, register, tenant_client
from tests.controlplane.test_tenancy import _invoke_and_settle

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


def _refused(response: httpx.Response, param: str | None = None) -> None:
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param or param in error["message"], error


async def test_nul_characters_are_refused_not_500(cp_app: FastAPI, admin_client: httpx.AsyncClient) -> None:
    tenant_id, key = await new_tenant(admin_client, "nul")
    for path in (
        "/admin/tenants/%00",
        f"/admin/tenants/{tenant_id}/keys/a%00b",
        "/admin/functions?tenant_id=%00",
        "/admin/reports/margin?tenant_id=%00",
        "/admin/backbones/x%00y",
    ):
        response = await admin_client.get(path) if "keys" not in path else await admin_client.delete(path)
        assert response.status_code == 400 and "NUL" in response.json()["error"]["message"], (path, response.text)
    _refused(await admin_client.post("/admin/tenants", json={"name": "a\u0000b"}), "name")
    _refused(await admin_client.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "\u0000"}), "name")
    _refused(await admin_client.post("/admin/backbones", json={"name": "b", "uri": "/tmp/\u0000"}), "uri")
    async with tenant_client(cp_app, key) as client:
        for path in ("/v1/functions/a%00b", "/v1/invocations?function=%00", "/v1/bills/2026-0%00"):
            assert (await client.get(path)).status_code == 400, path


async def test_out_of_range_numbers_and_times_are_refused(cp_app: FastAPI, admin_client: httpx.AsyncClient) -> None:
    tenant_id, key = await new_tenant(admin_client, "bounds")
    quotas = f"/admin/tenants/{tenant_id}/quotas"
    _refused(await admin_client.patch(quotas, json={"max_concurrency": 2**31}), "max_concurrency")
    _refused(await admin_client.patch(quotas, json={"tokens_per_minute": 2**63}), "tokens_per_minute")
    _refused(await admin_client.patch(quotas, json={"monthly_spend_cap_picousd": 2**63}), "monthly_spend_cap_picousd")
    # A boolean is not a number: `true` once set a 1-picodollar cap.
    _refused(await admin_client.patch(quotas, json={"monthly_spend_cap_picousd": True}), "monthly_spend_cap_picousd")
    _refused(await admin_client.post("/admin/tenants", json={"name": "t-bool", "max_concurrency": False}))
    _refused(await admin_client.post(f"/admin/tenants/{tenant_id}/keys", json={"expires_in_s": 1e12}), "expires_in_s")
    _refused(await admin_client.patch("/admin/backbones/tiny", json={"default_max_queue": 2**31}), "default_max_queue")
    _refused(await admin_client.patch("/admin/backbones/tiny", json={"default_max_tokens": 2**31}))
    fn = (await admin_client.get("/admin/functions")).json()["data"]
    if fn:
        _refused(await admin_client.patch(f"/admin/functions/{fn[0]['id']}", json={"price_input_micros_per_1m": 2**63}))
    for period in ("9999-12", "0-01", "2026-13", "2026", "x"):
        _refused(await admin_client.get(f"/admin/tenants/{tenant_id}/bills/{period}"), "period")
        _refused(await admin_client.get(f"/admin/reports/margin?period={period}"), "period")
    async with tenant_client(cp_app, key) as client:
        _refused(await client.get("/v1/functions/any/versions/2147483648"), "version")
        _refused(await client.get("/v1/invocations?start_time=100000000000000"), "start_time")
        _refused(await client.get("/v1/invocations?end_time=1e20"), "end_time")
        _refused(await client.get("/v1/usage?start_time=100000000000000"), "start_time")
        _refused(await client.get("/v1/usage?start_time=0&end_time=100000000000000"), "end_time")
        for period in ("9999-12", "0-01"):
            _refused(await client.get(f"/v1/bills/{period}"), "period")
        _refused(await client.post("/v1/functions/any/rollback", json={"version": 2**31}), "version")
    # The largest accepted values are stored and read back as sent.
    r = await admin_client.patch(quotas, json={"max_concurrency": 2**31 - 1, "monthly_spend_cap_picousd": 2**63 - 1})
    assert r.status_code == 200 and r.json()["monthly_spend_cap_picousd"] == 2**63 - 1, r.text


async def test_usage_without_group_by_is_totals(
    cp_app: FastAPI, admin_client: httpx.AsyncClient, settings: Settings, adapter_dirs: dict[str, Path]
) -> None:
    tenant_id, key = await new_tenant(admin_client, "totals")
    async with tenant_client(cp_app, key) as client:
        for name, adapter in (("t1", "a8"), ("t2", "b16")):
            assert (await register(client, name, adapter_dirs[adapter])).status_code == 201
        for i in range(4):
            await _invoke_and_settle(settings, tenant_id, "t1" if i % 2 else "t2", (10 + i, 2 + i))
        since = int(time.time()) - 3600
        totals = (await client.get(f"/v1/usage?start_time={since}&bucket_width=1h")).json()
        by_function = (await client.get(f"/v1/usage?start_time={since}&bucket_width=1h&group_by=function")).json()
    total_results = [r for bucket in totals["data"] for r in bucket["results"]]
    function_results = [r for bucket in by_function["data"] for r in bucket["results"]]
    assert total_results and all(r["function"] is None and r["function_id"] is None for r in total_results)
    assert {r["function"] for r in function_results} == {"t1", "t2"}
    for field in ("num_model_requests", "input_tokens", "output_tokens", "amount_picousd"):
        assert sum(r[field] for r in total_results) == sum(r[field] for r in function_results), field
    assert sum(r["num_model_requests"] for r in total_results) == 4
