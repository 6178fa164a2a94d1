"""Callbacks, backpressure, cancelling queued work, dead letters, and a NATS outage."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import nats
import pytest

from controlplane.callbacks import verify
from launcher.devstack import free_port, start_nats, stop_process
from launcher.stack import PlatformProcesses
from lorafaas.names import Names
from lorafaas.settings import NatsSettings
from lorafaas.streams import pull_invocations
from tests.gateway.conftest import idle_function, poll_status
from tests.support.platform import Platform

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


class FlakyReceiver:
    """A callback endpoint on 127.0.0.1 that answers 500 twice, then 200."""

    def __init__(self, failures: int = 2) -> None:
        self.calls: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if len(receiver.calls) <= failures else 200)
                self.end_headers()

            def log_message(self, *args) -> None:
                """Silent: the test reads ``calls``, not the server's log."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


async def test_callback_retried_until_delivered_and_signed(platform: Platform) -> None:
    receiver = FlakyReceiver(failures=2)
    try:
        async with platform.client("alpha") as client:
            secret = (await client.get("/v1/callbacks/secret")).json()["secret"]
            job = await client.post(
                "/v1/functions/alpha-a8/invoke",
                json={"prompt": "call me back", "max_tokens": 4, "mode": "async", "callback_url": receiver.url},
            )
            assert job.status_code == 202, job.text
            status = await poll_status(
                client, job.json()["id"], lambda b: (b["callback"] or {}).get("state") == "delivered", timeout_s=30
            )
    finally:
        receiver.close()
    attempts = status["callback"]["attempts"]
    assert [a["status_code"] for a in attempts] == [500, 500, 200] and len(receiver.calls) == 3
    headers, body = receiver.calls[-1]
    assert verify(secret, headers["lorafaas-signature"], body)
    assert not verify("whsec_wrong", headers["lorafaas-signature"], body)
    payload = json.loads(body)
    assert payload["id"] == job.json()["id"] and payload["state"] == "succeeded" and payload["text"] == status["text"]
    assert payload["usage"] == status["usage"]


async def test_queue_limit_is_a_429_and_queued_work_can_be_cancelled(
    platform: Platform, backbone_dir: Path, adapter_dirs: dict
) -> None:
    await idle_function(platform, "tiny-idle", "alpha-idle", backbone_dir, adapter_dirs["a8"], max_queue=2)
    body = {"prompt": "wait in line", "max_tokens": 4, "mode": "async"}
    async with platform.client("alpha") as client:
        first, second = [await client.post("/v1/functions/alpha-idle/invoke", json=body) for _ in range(2)]
        refused = await client.post("/v1/functions/alpha-idle/invoke", json=body)
        assert first.status_code == second.status_code == 202
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1" and refused.headers["x-ratelimit-limit-requests"] == "2"
        assert (
            refused.headers["x-ratelimit-remaining-requests"] == "0"
            and "queue limit is 2" in refused.json()["error"]["message"]
        )
        cancel = await client.post(f"/v1/invocations/{first.json()['id']}/cancel")
        assert cancel.status_code == 202
        cancelled = await poll_status(client, first.json()["id"], lambda b: b["state"] == "cancelled")
        admitted = await client.post("/v1/functions/alpha-idle/invoke", json=body)
        for job in (second, admitted):
            await client.post(f"/v1/invocations/{job.json()['id']}/cancel")
    assert cancelled["finish_reason"] == "cancelled" and cancelled["usage"]["completion_tokens"] == 0
    assert admitted.status_code == 202


async def _keep_pulling(sub) -> None:
    while True:
        try:
            await sub.fetch(batch=1, timeout=0.2)
        except (TimeoutError, nats.errors.TimeoutError):
            continue


async def test_exhausted_deliveries_are_dead_lettered_and_the_caller_learns(
    platform: Platform, backbone_dir: Path, adapter_dirs: dict
) -> None:
    s = platform.settings
    names = Names(s.nats.prefix)
    await idle_function(platform, "tiny-dead", "alpha-dead", backbone_dir, adapter_dirs["a8"])
    nc = await nats.connect(s.nats.url)
    js = nc.jetstream()
    # A worker that takes the invocation twice and dies each time (never acks), on a short AckWait.
    sub = await pull_invocations(
        js, names, "tiny-dead", NatsSettings(prefix=s.nats.prefix, ack_wait_s=0.5, max_deliver=2)
    )
    try:
        async with platform.client("alpha") as client:
            sync_call = asyncio.create_task(
                client.post("/v1/functions/alpha-dead/invoke", json={"prompt": "doomed", "max_tokens": 4})
            )
            for _ in range(2):
                await sub.fetch(batch=1, timeout=10)
            # Pulls keep coming (as from a live worker): the server emits the advisory on its next redelivery check.
            puller = asyncio.create_task(_keep_pulling(sub))
            response = await asyncio.wait_for(sync_call, 20)
            puller.cancel()
            status = await poll_status(
                client, response.json()["error"]["invocation_id"], lambda b: b["state"] == "failed"
            )
        dead = await js.get_last_msg(names.dead_letter_stream, names.dead_letter_subject("tiny-dead"))
    finally:
        await sub.unsubscribe()
        await nc.close()
    assert response.status_code == 502 and "2 deliveries" in response.json()["error"]["message"]
    assert "2 deliveries" in status["error"]
    assert (
        json.loads(dead.data)["invocation_id"] == status["id"]
        and "2 deliveries" in dead.headers["Lorafaas-Dead-Reason"]
    )


async def test_nats_outage_is_a_fast_503_and_the_gateway_recovers(
    platform: Platform, backbone_dir: Path, adapter_dirs: dict, tmp_path: Path
) -> None:
    await idle_function(platform, "tiny-outage", "alpha-outage", backbone_dir, adapter_dirs["a8"])
    port, store = free_port(), tmp_path / "nats"
    server = start_nats(port, store)
    private = platform.settings.model_copy(
        update={
            "nats": platform.settings.nats.model_copy(update={"url": f"nats://127.0.0.1:{port}"}),
            "gateway_port": free_port(),
        }
    )
    procs = PlatformProcesses(private, tmp_path / "gateway")
    body = {"prompt": "are you there", "max_tokens": 2, "mode": "async"}
    try:
        await asyncio.to_thread(procs.start_gateway)
        url = f"http://127.0.0.1:{private.gateway_port}/v1/functions/alpha-outage/invoke"
        async with httpx.AsyncClient(
            headers={"Authorization": f"Bearer {platform.keys['alpha']}"}, timeout=10
        ) as client:
            assert (await client.post(url, json=body)).status_code == 202
            stop_process(server)
            await asyncio.sleep(0.3)
            started = time.monotonic()
            down = await client.post(url, json=body)
            elapsed = time.monotonic() - started
            assert down.status_code == 503 and down.headers["retry-after"] == "1" and elapsed < 1.0, (
                down.text,
                elapsed,
            )
            server = start_nats(port, store)
            for _ in range(100):
                back = await client.post(url, json=body)
                if back.status_code == 202:
                    break
                await asyncio.sleep(0.1)
            assert back.status_code == 202, back.text
    finally:
        procs.stop_all()
        stop_process(server)
