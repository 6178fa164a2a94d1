"""An oversize upload is refused before it is spooled (issue 12.7), over a real HTTP connection.

The control plane app is served by uvicorn on a loopback port; httpx sends a body far over
the limit, once with a ``Content-Length`` and once streamed (chunked). The server answers
413 naming the limit and closes the connection, so the client manages to send only a small
part of the body (what fits the socket buffers), never the whole of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI

from controlplane.api.upload_limit import upload_limit
from launcher.devstack import free_port
from lorafaas.settings import Settings
from tests.controlplane.conftest import adapter_files, new_tenant

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

MAX_ADAPTER = 100_000
SENT_AT_MOST = 256 * 1024 * 1024  # what the client would send if nothing stopped it
CHUNK = 64 * 1024
BOUNDARY = "lorafaas-test-boundary"


@pytest_asyncio.fixture(loop_scope="session")
async def server(cp_app: FastAPI, settings: Settings, monkeypatch) -> AsyncIterator[str]:
    """The app on a real socket (its lifespan already runs), with a small adapter limit."""
    limits = settings.limits.model_copy(update={"max_adapter_bytes": MAX_ADAPTER})
    monkeypatch.setattr(cp_app.state.runtime, "settings", settings.model_copy(update={"limits": limits}))
    port = free_port()
    config = uvicorn.Config(cp_app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    for _ in range(1000):  # uvicorn offers no event for "listening"
        if srv.started:
            break
        await asyncio.sleep(0.01)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    await task


class Body:
    """A multipart body of one huge file part, counting what the client actually sent."""

    def __init__(self) -> None:
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\nfn\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="backbone"\r\n\r\ntiny\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self.sent += len(head)
        yield head
        chunk = b"\0" * CHUNK
        while self.sent < SENT_AT_MOST:
            self.sent += CHUNK
            yield chunk
            await asyncio.sleep(0)


async def _post(base: str, secret: str, body: Body, content_length: int | None) -> tuple[int, dict]:
    """POST with aiohttp, which reads the response while it is still sending (as curl and browsers do),
    so it sees an early 413 instead of a reset connection."""
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    if content_length is not None:
        headers["Content-Length"] = str(content_length)
    async with aiohttp.ClientSession() as client, client.post(f"{base}/v1/functions", data=body, headers=headers) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_oversize_upload_is_413_before_it_is_read(
    declared: bool, server: str, admin_client, settings: Settings
) -> None:
    _, secret = await new_tenant(admin_client, "big-upload")
    body = Body()
    status, answer = await _post(server, secret, body, SENT_AT_MOST if declared else None)
    limit = upload_limit(settings.limits.model_copy(update={"max_adapter_bytes": MAX_ADAPTER}))
    assert status == 413, answer
    assert f"over the upload limit of {limit} bytes" in answer["error"]["message"]
    # The server stopped reading: the client got no further than its socket buffers allow.
    assert body.sent < SENT_AT_MOST // 4, f"the client sent {body.sent} bytes of {SENT_AT_MOST}"
    async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {secret}"}) as client:
        assert (await client.get("/v1/functions")).json()["data"] == []


async def test_an_upload_under_the_limit_still_registers(
    server: str, admin_client, adapter_dirs: dict[str, Path]
) -> None:
    _, secret = await new_tenant(admin_client, "small-upload")
    async with httpx.AsyncClient(base_url=server, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as client:
        r = await client.post(
            "/v1/functions", data={"name": "fn", "backbone": "tiny"}, files=adapter_files(adapter_dirs["a8"])
        )
    assert r.status_code == 201, r.text
