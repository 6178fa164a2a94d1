"""A worker that takes an invocation and dies before acking: redelivered, answered once, billed once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from controlplane.db.models import Invocation, InvocationState, UsageRecord
from launcher.platform import admin, publish_backbone, register_function
from tests.support.platform import PRICE_IN, PRICE_OUT, Platform

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


async def _read_line(proc: subprocess.Popen, prefix: str, timeout_s: float = 60) -> str:
    def read() -> str:
        for line in proc.stdout:
            if line.startswith(prefix):
                return line.strip()
        raise RuntimeError(f"fake worker exited without printing {prefix!r}")

    return await asyncio.wait_for(asyncio.to_thread(read), timeout_s)


async def test_worker_killed_before_ack_is_redelivered_answered_and_billed_once(
    platform: Platform, backbone_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    s = platform.settings
    # A backbone of its own, so only the fake worker pulls from its work queue at first.
    uri = await publish_backbone(s, "tiny-faults", backbone_dir)
    await register_function(
        s, platform.tenant_ids["alpha"], "alpha-faults", "tiny-faults", adapter_dirs["a8"], PRICE_IN, PRICE_OUT
    )
    fake = subprocess.Popen(
        [
            sys.executable,
            str(FAKE_WORKER),
            s.nats.url,
            s.nats.prefix,
            "tiny-faults",
            str(s.nats.ack_wait_s),
            str(s.nats.max_deliver),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        await _read_line(fake, "ready")
        async with platform.client("alpha") as client:
            call = asyncio.create_task(
                client.post("/v1/functions/alpha-faults/invoke", json={"prompt": "the lazy dog", "max_tokens": 8})
            )
            taken = await _read_line(fake, "took")
            fake.kill()  # SIGKILL: no ack, no nak, no goodbye
            fake.wait()
            platform.procs.start_worker("faults-worker", platform.worker_env("tiny-faults", uri))
            response = await asyncio.wait_for(call, 90)
    finally:
        if fake.poll() is None:
            fake.kill()
    assert response.status_code == 200, response.text
    invocation_id = response.json()["id"]
    assert taken == f"took {invocation_id}"
    for _ in range(100):
        async with admin(s) as a:
            records = await a.session.scalar(
                select(func.count()).select_from(UsageRecord).where(UsageRecord.invocation_id == invocation_id)
            )
            row = await a.session.get(Invocation, invocation_id)
        if records and row.state == InvocationState.SUCCEEDED:
            break
        await asyncio.sleep(0.1)
    assert records == 1
    assert row.state == InvocationState.SUCCEEDED and row.worker_id == "faults-worker"
    assert row.completion_tokens == response.json()["usage"]["completion_tokens"]
