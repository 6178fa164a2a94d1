"""Admin operations shared by the CLI, the demo and the tests: database, backbone, tenants, functions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from minio.helpers import ProgressType
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.migrate import prepare_database
from controlplane.db.session import make_engine, make_sessionmaker
from controlplane.services import catalog, functions, invocations, keys, ledger
from lorafaas.artifacts import ArtifactStore
from lorafaas.errors import NotFound
from lorafaas.names import backbone_prefix
from lorafaas.scopes import ALL_SCOPES
from lorafaas.settings import Settings
from lorafaas.wire import AdapterRef


@dataclass
class Admin:
    """A database session and the artifact store, for one admin operation."""

    settings: Settings
    session: AsyncSession
    store: ArtifactStore


@asynccontextmanager
async def admin(settings: Settings) -> AsyncIterator[Admin]:
    """One transaction: committed when the block ends cleanly, rolled back otherwise."""
    engine = make_engine(settings.database)
    try:
        async with make_sessionmaker(engine).begin() as session:
            yield Admin(settings, session, ArtifactStore(settings.s3))
    finally:
        await engine.dispose()


async def prepare(settings: Settings) -> None:
    """Database created and migrated, bucket present."""
    await prepare_database(settings.database.url)
    await asyncio.to_thread(ArtifactStore(settings.s3).ensure_bucket)


async def publish_backbone(settings: Settings, name: str, folder: Path, price_in: int = 0, price_out: int = 0) -> str:
    """Upload a backbone folder to S3 and register it; returns its s3:// URI for workers."""
    store = ArtifactStore(settings.s3)
    prefix = backbone_prefix(name)
    await asyncio.to_thread(store.upload_folder, folder, prefix)
    config = json.loads((Path(folder) / "config.json").read_text())
    shape = catalog.backbone_shape(config)
    uri = f"s3://{store.bucket}/{prefix}"
    async with admin(settings) as a:
        await catalog.register_backbone(
            a.session, name, uri, shape, config.get("max_position_embeddings", 2048), price_in, price_out
        )
    return uri


async def create_tenant_with_key(
    settings: Settings, name: str, expires_in_days: float | None = None
) -> tuple[str, str]:
    """Create a tenant (or reuse one of that name) and a new API key; returns (tenant_id, secret)."""
    async with admin(settings) as a:
        try:
            tenant = await keys.tenant_by_name(a.session, name)
        except NotFound:
            tenant = await keys.create_tenant(a.session, name)
        expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
        _, secret = await keys.create_api_key(a.session, tenant.id, name="cli", expires_at=expires)
        return tenant.id, secret


async def create_api_key(
    settings: Settings, tenant_id: str, scopes: tuple[str, ...] = ALL_SCOPES, expires_in_days: float | None = None
) -> tuple[str, str]:
    """A new API key for an existing tenant; returns (key id, secret). The secret is shown once."""
    expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
    async with admin(settings) as a:
        key, secret = await keys.create_api_key(a.session, tenant_id, name="cli", scopes=scopes, expires_at=expires)
        return key.id, secret


async def register_function(
    settings: Settings,
    tenant_id: str,
    name: str,
    backbone: str,
    adapter_dir: Path,
    price_in: int | None,
    price_out: int | None,
    progress: ProgressType | None = None,
) -> functions.ServedFunction:
    async with admin(settings) as a:
        return await catalog.register_function(
            a.session,
            a.store,
            settings.limits,
            tenant_id,
            name,
            backbone,
            adapter_dir,
            price_in,
            price_out,
            progress=progress,
        )


async def bill(settings: Settings, tenant_id: str, year: int, month: int) -> ledger.Bill:
    async with admin(settings) as a:
        return await ledger.monthly_bill(a.session, tenant_id, year, month)


async def adapter_refs(settings: Settings, tenant_id: str, function_names: list[str]) -> list[AdapterRef]:
    """Where each named function's adapter lives (what a worker command names)."""
    async with admin(settings) as a:
        return [(await functions.served_function(a.session, tenant_id, name)).adapter_ref() for name in function_names]


async def register_backbone_copy(settings: Settings, source: str, names: list[str]) -> None:
    """Register the weights of backbone ``source`` again under each of ``names`` (one queue per name)."""
    async with admin(settings) as a:
        bb = await catalog.backbone_by_name(a.session, source)
        for name in names:
            await catalog.register_backbone(a.session, name, bb.uri, bb.shape, bb.max_context)


async def invocation_timings(settings: Settings, invocation_ids: list[str]) -> dict[str, dict[str, float]]:
    """The worker-measured timings of each invocation, by id (missing ids are left out)."""
    async with admin(settings) as a:
        return await invocations.timings_of(a.session, invocation_ids)
