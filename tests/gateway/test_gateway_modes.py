"""Every invocation mode end to end over HTTP: gateway -> JetStream -> real worker -> events -> Postgres."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import select

from controlplane.db.models import UsageRecord
from launcher.platform import admin
from tests.gateway.conftest import poll_status, sse_events, stream_invoke
from tests.support.platform import Platform

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

PROMPT = "the quick brown fox"


async def usage_record(platform: Platform, invocation_id: str, timeout_s: float = 10.0) -> UsageRecord | None:
    for _ in range(int(timeout_s / 0.05)):
        async with admin(platform.settings) as a:
            record = await a.session.scalar(select(UsageRecord).where(UsageRecord.invocation_id == invocation_id))
        if record is not None:
            return record
        await asyncio.sleep(0.05)
    return None


async def test_sync_stream_and_async_agree(platform: Platform) -> None:
    body = {"prompt": PROMPT, "max_tokens": 10}
    async with platform.client("alpha") as client:
        sync = await client.post("/v1/functions/alpha-a8/invoke", json=body)
        events = await stream_invoke(client, "alpha-a8", body)
        submitted = await client.post("/v1/functions/alpha-a8/invoke", json={**body, "mode": "async"})
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        assert (
            job["state"] in ("queued", "running", "succeeded")
            and submitted.headers["location"] == f"/v1/invocations/{job['id']}"
        )
        done = await poll_status(client, job["id"], lambda b: b["state"] == "succeeded")
    assert sync.status_code == 200, sync.text
    expected = sync.json()
    tokens = [data for event, data in events if event == "token"]
    (final,) = [data for event, data in events if event == "done"]
    assert events[-1][0] == "done" and len(tokens) >= 2  # tokens arrived one by one, before the end
    assert "".join(t["text"] for t in tokens) == final["text"] == expected["text"] == done["text"]
    assert final["usage"] == expected["usage"] == done["usage"]
    assert final["state"] == "succeeded" and done["mode"] == "async" and done["finished_at"]


async def test_idempotent_resubmission_runs_and_bills_once(platform: Platform) -> None:
    body = {"prompt": "idempotent " + PROMPT, "max_tokens": 6}
    async with platform.client("alpha") as client:
        first = await client.post("/v1/functions/alpha-b16/invoke", json=body, headers={"Idempotency-Key": "order-42"})
        again = await client.post("/v1/functions/alpha-b16/invoke", json=body, headers={"Idempotency-Key": "order-42"})
        other = await client.post(
            "/v1/functions/alpha-b16/invoke", json={**body, "max_tokens": 7}, headers={"Idempotency-Key": "order-42"}
        )
        job = await client.post(
            "/v1/functions/alpha-b16/invoke", json={**body, "mode": "async"}, headers={"Idempotency-Key": "job-42"}
        )
        job_again = await client.post(
            "/v1/functions/alpha-b16/invoke", json={**body, "mode": "async"}, headers={"Idempotency-Key": "job-42"}
        )
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert other.status_code == 409 and "different request body" in other.json()["error"]["message"]
    assert job.status_code == job_again.status_code == 202 and job.json()["id"] == job_again.json()["id"]
    assert (await usage_record(platform, first.json()["id"])) is not None
    async with admin(platform.settings) as a:
        records = (
            await a.session.scalars(
                select(UsageRecord.invocation_id).where(UsageRecord.invocation_id == first.json()["id"])
            )
        ).all()
    assert len(records) == 1


async def test_cancel_mid_generation_bills_only_produced_tokens(platform: Platform) -> None:
    async with platform.client("beta") as client:
        async with client.stream(
            "POST", "/v1/functions/beta-c32/invoke", json={"prompt": PROMPT, "max_tokens": 64, "mode": "stream"}
        ) as response:
            invocation_id = response.headers["x-invocation-id"]
            final = None
            cancelled = False
            async for event, data in sse_events(response):
                if event == "token" and not cancelled:
                    cancel = await client.post(f"/v1/invocations/{invocation_id}/cancel")
                    assert cancel.status_code == 202, cancel.text
                    assert cancel.json()["cancel_requested_at"]
                    cancelled = True
                if event == "done":
                    final = json.loads(data)
        status = await poll_status(client, invocation_id, lambda b: b["state"] == "cancelled")
        again = await client.post(f"/v1/invocations/{invocation_id}/cancel")
    assert final is not None and final["state"] == "cancelled"
    produced = final["usage"]["completion_tokens"]
    assert 1 <= produced < 64
    assert status["usage"]["completion_tokens"] == produced
    record = await usage_record(platform, invocation_id)
    assert record is not None and record.output_tokens == produced
    assert again.status_code == 409


async def test_metrics_are_prometheus_text(platform: Platform) -> None:
    async with platform.client("alpha") as client:
        await client.post("/v1/functions/alpha-a8/invoke", json={"prompt": PROMPT, "max_tokens": 2})
        text = (await client.get("/metrics")).text
    assert 'lorafaas_gateway_requests_total{method="POST",route="/v1/functions/{function}/invoke",status="200"}' in text
    assert 'lorafaas_gateway_queue_depth{function="alpha-a8"}' in text
    assert "lorafaas_gateway_ttft_seconds_bucket" in text and "lorafaas_gateway_invocation_seconds_count" in text
