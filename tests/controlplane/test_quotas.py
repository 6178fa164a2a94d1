"""Quotas as the gateway enforces them: spend cap 402, concurrency and tokens/minute 429 with
Retry-After, and a change made through the admin API reaching the gateway's cache at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import nats
import pytest
from fastapi import FastAPI

from controlplane.db.session import make_engine, make_sessionmaker
from controlplane.services import functions, invocations, ledger
from gateway.quotas import QuotaGuard
from launcher.platform import admin
from lorafaas import wire
from lorafaas.errors import LorafaasError, PaymentRequired, QuotaExceeded
from lorafaas.http_errors import install_error_handlers
from lorafaas.names import Names
from lorafaas.settings import Settings
from tests.controlplane.conftest import new_tenant, register, tenant_client

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def _accept(settings: Settings, tenant_id: str, guard: QuotaGuard, max_tokens: int = 4) -> str:
    """What InvocationService.accept does: the guard runs inside the accepting transaction."""
    engine = make_engine(settings.database)
    try:
        async with make_sessionmaker(engine).begin() as session:
            await guard.check(session, await guard.quota(session, tenant_id), max_tokens)
            served = await functions.served_function(session, tenant_id, "fn")
            row = await invocations.accept(
                session, served, "hi", wire.SamplingParams(max_tokens=max_tokens), wire.InvocationMode.SYNC
            )
            return row.id
    finally:
        await engine.dispose()


async def _finish(settings: Settings, tenant_id: str, invocation_id: str, tokens: int) -> None:
    async with admin(settings) as a:
        served = await functions.served_function(a.session, tenant_id, "fn")
        await invocations.apply_result(
            a.session, wire.InvocationResult(invocation_id=invocation_id, status=wire.ResultStatus.SUCCEEDED)
        )
        await ledger.record_usage(
            a.session,
            wire.UsageEvent(
                invocation_id=invocation_id,
                tenant_id=tenant_id,
                function_id=served.function.id,
                input_tokens=tokens,
                output_tokens=0,
            ),
        )


async def _tenant_with_fn(cp_app: FastAPI, admin_client, adapter: Path, prefix: str, **quotas: int) -> str:
    tenant_id, key = await new_tenant(admin_client, prefix, **quotas)
    async with tenant_client(cp_app, key) as client:
        assert (await register(client, "fn", adapter)).status_code == 201
    return tenant_id


async def _http_answer(error: LorafaasError) -> httpx.Response:
    """How the shared error handlers answer this domain error."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/")
    async def fail() -> None:
        raise error

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.get("/")


async def test_spend_cap_is_402(
    cp_app: FastAPI, admin_client, settings: Settings, adapter_dirs: dict[str, Path]
) -> None:
    tenant_id = await _tenant_with_fn(cp_app, admin_client, adapter_dirs["a8"], "spend")
    fns = (await admin_client.get(f"/admin/functions?tenant_id={tenant_id}")).json()["data"]
    await admin_client.patch(f"/admin/functions/{fns[0]['id']}", json={"price_input_micros_per_1m": 1_000_000})
    await admin_client.patch(f"/admin/tenants/{tenant_id}/quotas", json={"monthly_spend_cap_picousd": 10 * 1_000_000})
    guard = QuotaGuard(settings.controlplane)
    first = await _accept(settings, tenant_id, guard)
    await _finish(settings, tenant_id, first, tokens=10)  # exactly the cap: 10 tokens at $1/1M
    with pytest.raises(PaymentRequired) as caught:
        await _accept(settings, tenant_id, guard)
    r = await _http_answer(caught.value)
    assert r.status_code == 402 and "monthly spend cap of $0.00001 reached" in r.json()["error"]["message"]


async def test_concurrency_and_tokens_per_minute_are_429_with_retry_after(
    cp_app: FastAPI, admin_client, settings: Settings, adapter_dirs: dict[str, Path]
) -> None:
    tenant_id = await _tenant_with_fn(cp_app, admin_client, adapter_dirs["a8"], "conc", max_concurrency=2)
    guard = QuotaGuard(settings.controlplane)
    running = [await _accept(settings, tenant_id, guard) for _ in range(2)]
    with pytest.raises(QuotaExceeded, match="limit is 2 at a time") as caught:
        await _accept(settings, tenant_id, guard)
    r = await _http_answer(caught.value)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    await _finish(settings, tenant_id, running[0], tokens=5)
    await _accept(settings, tenant_id, guard)  # a slot is free again

    tpm = await _tenant_with_fn(cp_app, admin_client, adapter_dirs["a8"], "tpm", tokens_per_minute=100)
    done = await _accept(settings, tpm, guard, max_tokens=50)
    await _finish(settings, tpm, done, tokens=60)
    with pytest.raises(QuotaExceeded, match="limit of 100 tokens per minute") as caught:
        await _accept(settings, tpm, guard, max_tokens=50)
    r = await _http_answer(caught.value)
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    await _accept(settings, tpm, guard, max_tokens=40)


async def test_a_quota_change_reaches_the_gateway_cache_at_once(
    cp_app: FastAPI, admin_client, settings: Settings, adapter_dirs: dict[str, Path]
) -> None:
    tenant_id = await _tenant_with_fn(cp_app, admin_client, adapter_dirs["a8"], "inval")
    guard = QuotaGuard(settings.controlplane.model_copy(update={"quota_cache_ttl_s": 3600}))  # only NATS can refresh it
    nc = await nats.connect(settings.nats.url)
    try:
        await guard.listen(nc, Names(settings.nats.prefix))
        await nc.flush()
        await _accept(settings, tenant_id, guard)  # caches "unlimited"
        assert (
            await admin_client.patch(f"/admin/tenants/{tenant_id}/quotas", json={"max_concurrency": 1})
        ).status_code == 200
        for _ in range(20):  # well within a second
            if tenant_id not in guard._cache:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(QuotaExceeded):
            await _accept(settings, tenant_id, guard)
    finally:
        await nc.close()
