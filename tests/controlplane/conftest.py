"""The control plane app in-process (its lifespan run by hand) against real Postgres, NATS and S3."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest_asyncio
from fastapi import FastAPI

from controlplane.main import create_app
from launcher.platform import publish_backbone
from lorafaas.settings import Settings


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def cp_app(settings: Settings, backbone_dir: Path) -> AsyncIterator[FastAPI]:
    """Without a scheduler: the session's platform runs a control plane on the same NATS prefix, and
    two placement loops would command its worker (this one from a view that goes stale while the
    session's event loop stands still between async tests)."""
    await publish_backbone(settings, "tiny", backbone_dir)
    app = create_app(
        settings.model_copy(update={"scheduler": settings.scheduler.model_copy(update={"enabled": False})})
    )
    async with app.router.lifespan_context(app):
        yield app


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def admin_client(cp_app: FastAPI, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {settings.admin_token}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=cp_app), base_url="http://cp", headers=headers, timeout=30
    ) as client:
        yield client


def tenant_client(app: FastAPI, secret: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://cp",
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )


async def new_tenant(admin: httpx.AsyncClient, prefix: str, **quotas: int) -> tuple[str, str]:
    """A fresh tenant and a key with every scope: (tenant_id, secret)."""
    r = await admin.post("/admin/tenants", json={"name": f"{prefix}-{uuid.uuid4().hex[:6]}", **quotas})
    assert r.status_code == 201, r.text
    tenant_id = r.json()["id"]
    r = await admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "test"})
    assert r.status_code == 201, r.text
    return tenant_id, r.json()["secret"]


def adapter_files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """Multipart parts for every file of a PEFT folder."""
    return [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]


async def register(client: httpx.AsyncClient, name: str, folder: Path, backbone: str = "tiny") -> httpx.Response:
    return await client.post("/v1/functions", data={"name": name, "backbone": backbone}, files=adapter_files(folder))
