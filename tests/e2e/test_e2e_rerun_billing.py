"""A re-run invocation is billed for the result the caller received (issue 12.3).

Regression: the worker published the result and the usage as two messages. When a run
published its result and then lost NATS before its usage, the message was redelivered and run
again (with sampling: other tokens); JetStream de-duplication kept the first run's result and
the second run's usage, so an invocation that returned 14 tokens was billed 15. Here the first
run is played by the test (it publishes its result, then dies without acking), and a real
worker re-runs the invocation with sampling. The bill must count the first run's tokens.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from sqlalchemy import select

from controlplane.db.models import Invocation, InvocationState, UsageRecord
from launcher.platform import admin, publish_backbone
from lorafaas import wire
from lorafaas.names import MSG_ID_HEADER, Names, result_msg_id
from lorafaas.settings import NatsSettings
from lorafaas.streams import pull_invocations, worker_consumer_config
from tests.gateway.conftest import idle_function, poll_status
from tests.support.platform import Platform

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

MAX_TOKENS = 12


async def test_a_rerun_with_sampling_bills_the_tokens_the_caller_received(
    platform: Platform, backbone_dir: Path, adapter_dirs: dict
) -> None:
    s = platform.settings
    names = Names(s.nats.prefix)
    await idle_function(platform, "tiny-rerun", "alpha-rerun", backbone_dir, adapter_dirs["a8"])
    nc = await nats.connect(s.nats.url)
    js = nc.jetstream()
    first_run = await pull_invocations(js, names, "tiny-rerun", s.nats)
    try:
        async with platform.client("alpha") as client:
            job = await client.post(
                "/v1/functions/alpha-rerun/invoke",
                json={"prompt": "the lazy dog", "max_tokens": MAX_TOKENS, "temperature": 1.0, "mode": "async"},
            )
            assert job.status_code == 202, job.text
            inv_id = job.json()["id"]
            # Run 1: takes the invocation, publishes its result, dies before acking.
            msg = (await first_run.fetch(batch=1, timeout=10))[0]
            inv = wire.Invocation.decode(msg.data)
            one = wire.InvocationResult(
                invocation_id=inv_id,
                status=wire.ResultStatus.SUCCEEDED,
                text="what run one returned",
                finish_reason="length",
                prompt_tokens=4,
                completion_tokens=MAX_TOKENS + 5,  # a count run two cannot produce
                worker_id="run-one",
                billing=wire.Billing(tenant_id=inv.tenant_id, function_id=inv.adapter.function_id, device_ns=1),
            )
            await js.publish(names.result_subject(inv_id), one.encode(), headers={MSG_ID_HEADER: result_msg_id(inv_id)})
            await first_run.unsubscribe()
            # Run 2: a real worker gets the redelivery (AckWait) and samples its own tokens.
            uri = await publish_backbone(s, "tiny-rerun", backbone_dir)  # the same upload again: its URI
            platform.procs.start_worker("rerun-worker", platform.worker_env("tiny-rerun", uri))
            await _wait_acked(js, names, "tiny-rerun", s.nats, timeout_s=120)
            seen = await poll_status(client, inv_id, lambda b: b["state"] == "succeeded", timeout_s=30)
        async with admin(s) as a:
            record = await a.session.scalar(select(UsageRecord).where(UsageRecord.invocation_id == inv_id))
            row = await a.session.get(Invocation, inv_id)
    finally:
        await nc.close()
    assert row.state == InvocationState.SUCCEEDED and seen["text"] == "what run one returned"
    assert seen["usage"]["completion_tokens"] == MAX_TOKENS + 5
    assert (record.input_tokens, record.output_tokens) == (4, MAX_TOKENS + 5)  # billed = returned


async def _wait_acked(js, names: Names, backbone: str, nats_settings: NatsSettings, timeout_s: float) -> None:
    """Until the worker consumer has nothing pending or unacked: run two finished and acked."""
    durable = worker_consumer_config(names, backbone, nats_settings).durable_name
    for _ in range(int(timeout_s / 0.2)):
        info = await js.consumer_info(names.invocations_stream, durable)
        # Delivered twice (run one, then run two), and nothing left unacked.
        if info.num_ack_pending == 0 and info.num_pending == 0 and (info.delivered.consumer_seq or 0) >= 2:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the invocation was not re-run and acked within {timeout_s}s: {info}")
