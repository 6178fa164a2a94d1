"""Gateway tests reuse the session-wide platform (control plane, gateway, worker processes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
from sqlalchemy import update

from controlplane.db.models import Function
from launcher.platform import admin, publish_backbone, register_function
from tests.support.platform import PRICE_IN, PRICE_OUT, Platform


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """(event, data) pairs of a server-sent event stream."""
    event, data = None, []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield event, "\n".join(data)
            event, data = None, []


async def stream_invoke(client: httpx.AsyncClient, function: str, body: dict) -> list[tuple[str | None, dict]]:
    async with client.stream("POST", f"/v1/functions/{function}/invoke", json={**body, "mode": "stream"}) as response:
        assert response.status_code == 200, await response.aread()
        return [(event, json.loads(data)) async for event, data in sse_events(response)]


async def poll_status(client: httpx.AsyncClient, invocation_id: str, until, timeout_s: float = 20.0) -> dict:
    """GET the status until ``until(body)`` holds; returns the last body."""
    body = {}
    for _ in range(int(timeout_s / 0.05)):
        body = (await client.get(f"/v1/invocations/{invocation_id}")).json()
        if until(body):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"status never matched: {body}")


async def idle_function(
    platform: Platform, backbone: str, name: str, backbone_dir, adapter_dir, max_queue: int | None = None
) -> None:
    """A function on a backbone no worker serves, so its invocations stay queued."""
    await publish_backbone(platform.settings, backbone, backbone_dir)
    served = await register_function(
        platform.settings, platform.tenant_ids["alpha"], name, backbone, adapter_dir, PRICE_IN, PRICE_OUT
    )
    if max_queue is not None:
        async with admin(platform.settings) as a:
            await a.session.execute(
                update(Function).where(Function.id == served.function.id).values(max_queue=max_queue)
            )
