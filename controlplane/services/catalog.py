"""Backbones and functions: what each function is, which adapter version it serves, its price."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.models import AdapterArtifact, Backbone, Function
from lorafaas.artifacts import ArtifactStore, StoredArtifact
from lorafaas.errors import Conflict, InvalidArtifact, InvalidInput, NotFound
from lorafaas.settings import LimitSettings
from lorafaas.wire import AdapterRef


@dataclass(frozen=True)
class ServedFunction:
    """A function resolved for invocation: the row, the adapter version it serves, its backbone."""

    function: Function
    artifact: AdapterArtifact
    backbone: Backbone

    def adapter_ref(self) -> AdapterRef:
        a = self.artifact
        return AdapterRef(function_id=self.function.id, bucket=a.bucket, prefix=a.prefix, sha256=a.sha256, rank=a.rank)


@dataclass(frozen=True)
class AdapterSpec:
    rank: int
    target_modules: list[str]


async def register_backbone(
    session: AsyncSession,
    name: str,
    uri: str,
    shape: dict,
    max_context: int,
    price_input_micros_per_1m: int = 0,
    price_output_micros_per_1m: int = 0,
) -> Backbone:
    """Register (or update) a backbone that workers can hold."""
    backbone = await session.scalar(select(Backbone).where(Backbone.name == name))
    if backbone is None:
        backbone = Backbone(name=name)
        session.add(backbone)
    backbone.uri, backbone.shape, backbone.max_context = uri, shape, max_context
    backbone.default_price_input_micros_per_1m = price_input_micros_per_1m
    backbone.default_price_output_micros_per_1m = price_output_micros_per_1m
    await session.flush()
    return backbone


async def backbone_by_name(session: AsyncSession, name: str) -> Backbone:
    backbone = await session.scalar(select(Backbone).where(Backbone.name == name))
    if backbone is None:
        raise NotFound(f"backbone '{name}' not found")
    return backbone


def read_adapter_spec(folder: Path, limits: LimitSettings) -> AdapterSpec:
    """The rank and target modules of a PEFT folder, refusing what no worker could serve."""
    config_path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArtifact(f"adapter_config.json cannot be read: {e}", file="adapter_config.json") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidArtifact(f"adapter_config.json: peft_type {config.get('peft_type')!r} is not LORA", file="adapter_config.json")
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= limits.max_adapter_rank:
        raise InvalidArtifact(f"adapter_config.json: r={rank!r} must be an integer in 1..{limits.max_adapter_rank}", file="adapter_config.json")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    return AdapterSpec(rank=rank, target_modules=targets)


async def register_function(
    session: AsyncSession,
    store: ArtifactStore,
    limits: LimitSettings,
    tenant_id: str,
    name: str,
    backbone_name: str,
    adapter_folder: Path,
    price_input_micros_per_1m: int | None = None,
    price_output_micros_per_1m: int | None = None,
    max_tokens: int | None = None,
) -> ServedFunction:
    """Create a function, or add a new adapter version to an existing one and serve it.

    The adapter is uploaded under the tenant's content-addressed prefix first; if the database
    refuses the rows, the upload is removed again so nothing is left behind.
    """
    if not name or len(name) > 128 or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidInput("function name must be 1-128 characters of letters, digits, '-', '_' or '.'")
    backbone = await backbone_by_name(session, backbone_name)
    spec = read_adapter_spec(adapter_folder, limits)
    function = await session.scalar(select(Function).where(Function.tenant_id == tenant_id, Function.name == name))
    if function is None:
        function = Function(
            tenant_id=tenant_id,
            name=name,
            backbone_id=backbone.id,
            price_input_micros_per_1m=_price(price_input_micros_per_1m, backbone.default_price_input_micros_per_1m),
            price_output_micros_per_1m=_price(price_output_micros_per_1m, backbone.default_price_output_micros_per_1m),
            max_tokens=max_tokens,
        )
        session.add(function)
        await session.flush()
    elif function.backbone_id != backbone.id:
        raise Conflict(f"function '{name}' runs on another backbone; register it under a new name")
    stored = await asyncio.to_thread(store.upload_adapter, adapter_folder, tenant_id)
    try:
        artifact = await _add_version(session, function, stored, spec)
    except Exception:
        await asyncio.to_thread(store.delete_prefix, stored.prefix)
        raise
    return ServedFunction(function, artifact, backbone)


def _price(value: int | None, default: int) -> int:
    price = default if value is None else value
    if not isinstance(price, int) or price < 0:
        raise InvalidInput(f"prices are non-negative integer micro-dollars per 1M tokens, got {price!r}")
    return price


async def _add_version(session: AsyncSession, function: Function, stored: StoredArtifact, spec: AdapterSpec) -> AdapterArtifact:
    latest = await session.scalar(select(func.max(AdapterArtifact.version)).where(AdapterArtifact.function_id == function.id))
    artifact = AdapterArtifact(
        function_id=function.id,
        tenant_id=function.tenant_id,
        version=(latest or 0) + 1,
        bucket=stored.bucket,
        prefix=stored.prefix,
        sha256=stored.sha256,
        rank=spec.rank,
        target_modules=spec.target_modules,
        size_bytes=stored.size_bytes,
    )
    session.add(artifact)
    await session.flush()
    function.artifact_id = artifact.id
    await session.flush()
    return artifact


async def served_function(session: AsyncSession, tenant_id: str, name: str) -> ServedFunction:
    """The tenant's function by name. Another tenant's function is 'not found', like a missing one."""
    row = (
        await session.execute(
            select(Function, AdapterArtifact, Backbone)
            .join(AdapterArtifact, AdapterArtifact.id == Function.artifact_id)
            .join(Backbone, Backbone.id == Function.backbone_id)
            .where(Function.tenant_id == tenant_id, Function.name == name)
        )
    ).first()
    if row is None:
        raise NotFound(f"function '{name}' not found", function=name)
    return ServedFunction(*row)


async def list_functions(session: AsyncSession, tenant_id: str) -> list[ServedFunction]:
    rows = await session.execute(
        select(Function, AdapterArtifact, Backbone)
        .join(AdapterArtifact, AdapterArtifact.id == Function.artifact_id)
        .join(Backbone, Backbone.id == Function.backbone_id)
        .where(Function.tenant_id == tenant_id)
        .order_by(Function.name)
    )
    return [ServedFunction(*row) for row in rows]
