"""Backbones and functions: registration, versions, prices and limits.

Reading a function as served (what the gateway does on every request) lives in
``controlplane.services.functions``, which loads neither the adapter validator nor numpy.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from minio.error import S3Error
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.models import AdapterArtifact, Backbone, Function
from controlplane.services.functions import ServedFunction, served_function, valid_name
from controlplane.services.validation import AdapterSpec, BackboneSpec, validate_adapter
from lorafaas.artifacts import ArtifactStore, StoredArtifact, adapter_files, file_sha256, folder_digest, parse_s3_uri
from lorafaas.errors import Conflict, InvalidInput, NotFound
from lorafaas.names import adapter_prefix, backbone_prefix
from lorafaas.settings import LimitSettings

SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
)
REQUIRED_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def backbone_shape(config: dict) -> dict:
    """The dimensions adapters are validated against, from a Hugging Face config.json."""
    return {k: config.get(k) for k in SHAPE_KEYS if config.get(k) is not None}


async def register_backbone_from(
    session: AsyncSession,
    store: ArtifactStore,
    name: str,
    uri: str,
    shape: dict | None = None,
    max_context: int | None = None,
) -> Backbone:
    """Register a backbone from a local Hugging Face folder (uploaded to S3 first) or an s3:// prefix.

    The shape comes from its config.json unless given; without the Llama dimensions no adapter
    could be validated against it, so such a backbone is refused.
    """
    if uri.startswith("s3://"):
        config = await asyncio.to_thread(_read_s3_config, store, uri)
    else:
        folder = Path(uri)
        try:
            config = _config(uri, (folder / "config.json").read_bytes())
        except OSError as e:  # missing, not a folder, a name too long, unreadable
            raise InvalidInput(f"{uri} is not a model folder with a readable config.json", param="uri") from e
        await asyncio.to_thread(store.upload_folder, folder, backbone_prefix(name))
        uri = f"s3://{store.bucket}/{backbone_prefix(name)}"
    shape = shape or backbone_shape(config)
    missing = [k for k in REQUIRED_SHAPE if not isinstance(shape.get(k), int)]
    if missing:
        raise InvalidInput(f"backbone shape lacks {missing}", param="shape")
    existing = await session.scalar(select(Backbone).where(Backbone.name == name))
    prices = (
        (existing.default_price_input_micros_per_1m, existing.default_price_output_micros_per_1m)
        if existing
        else (0, 0)
    )
    return await register_backbone(
        session, name, uri, shape, max_context or config.get("max_position_embeddings", 2048), *prices
    )


def _config(uri: str, raw: bytes) -> dict:
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise InvalidInput(f"{uri}/config.json is not valid JSON ({e})", param="uri") from e
    if not isinstance(config, dict):
        raise InvalidInput(f"{uri}/config.json is not a JSON object", param="uri")
    return config


def _read_s3_config(store: ArtifactStore, uri: str) -> dict:
    bucket, prefix = parse_s3_uri(uri)
    try:
        response = store.client.get_object(bucket, f"{prefix}/config.json")
    except S3Error as e:
        raise InvalidInput(f"{uri}/config.json cannot be read ({e.code})", param="uri") from e
    except ValueError as e:  # the client refuses an invalid bucket or object name before asking
        raise InvalidInput(f"{uri} is not a valid s3:// location ({e})", param="uri") from e
    try:
        return _config(uri, response.read())
    finally:
        response.close()
        response.release_conn()


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


async def backbone_spec(session: AsyncSession, backbone: Backbone) -> BackboneSpec:
    """What an adapter for ``backbone`` is validated against, with the names of every other backbone."""
    others = (await session.execute(select(Backbone.name, Backbone.aliases).where(Backbone.id != backbone.id))).all()
    other_names = {name for name, _ in others} | {alias for _, aliases in others for alias in (aliases or [])}
    accepted = {backbone.name, backbone.uri, *(backbone.aliases or [])}
    return BackboneSpec(
        name=backbone.name,
        shape=backbone.shape or {},
        accepted_names=frozenset(accepted),
        other_names=frozenset(other_names - accepted),
    )


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
    progress: object | None = None,
) -> ServedFunction:
    """Create a function, or add a new adapter version to an existing one and serve it.

    The folder is validated in full before anything is written; the adapter is then uploaded
    under the tenant's content-addressed prefix, and if the database refuses the rows the
    upload is removed again (unless another version already uses the same content), so a
    refusal leaves nothing behind.
    """
    if not valid_name(name):
        raise InvalidInput("function name must be 1-128 characters of letters, digits, '-', '_' or '.'")
    backbone = await backbone_by_name(session, backbone_name)
    spec = await asyncio.to_thread(validate_adapter, adapter_folder, await backbone_spec(session, backbone), limits)
    function = await session.scalar(select(Function).where(Function.tenant_id == tenant_id, Function.name == name))
    if function is not None and function.backbone_id != backbone.id:
        raise Conflict(f"function '{name}' runs on another backbone; register it under a new name")
    price_in = _price(price_input_micros_per_1m, backbone.default_price_input_micros_per_1m)
    price_out = _price(price_output_micros_per_1m, backbone.default_price_output_micros_per_1m)
    # Identical content of this tenant is already stored (another version): reuse it, never delete it.
    prefix = adapter_prefix(tenant_id, await asyncio.to_thread(adapter_digest, adapter_folder))
    reused = (
        await session.scalar(select(func.count()).select_from(AdapterArtifact).where(AdapterArtifact.prefix == prefix))
        > 0
    )
    stored = await asyncio.to_thread(store.upload_adapter, adapter_folder, tenant_id, progress)
    try:
        if function is None:
            function = Function(
                tenant_id=tenant_id,
                name=name,
                backbone_id=backbone.id,
                price_input_micros_per_1m=price_in,
                price_output_micros_per_1m=price_out,
                max_tokens=max_tokens if max_tokens is not None else backbone.default_max_tokens,
                max_queue=backbone.default_max_queue,
            )
            session.add(function)
            await session.flush()
        artifact = await _add_version(session, function, stored, spec)
    except BaseException:
        if not reused:
            await asyncio.to_thread(store.delete_prefix, stored.prefix)
        raise
    return ServedFunction(function, artifact, backbone)


def adapter_digest(folder: Path) -> str:
    """The content hash the artifact store will key this folder by."""
    return folder_digest({p.name: file_sha256(p) for p in adapter_files(folder)})


def _price(value: int | None, default: int) -> int:
    price = default if value is None else value
    if not isinstance(price, int) or price < 0:
        raise InvalidInput(f"prices are non-negative integer micro-dollars per 1M tokens, got {price!r}")
    return price


async def _add_version(
    session: AsyncSession, function: Function, stored: StoredArtifact, spec: AdapterSpec
) -> AdapterArtifact:
    latest = await session.scalar(
        select(func.max(AdapterArtifact.version)).where(AdapterArtifact.function_id == function.id)
    )
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


async def list_versions(session: AsyncSession, tenant_id: str, name: str) -> tuple[Function, list[AdapterArtifact]]:
    """Every stored version of the tenant's function, oldest first."""
    function = await function_by_name(session, tenant_id, name)
    rows = await session.scalars(
        select(AdapterArtifact).where(AdapterArtifact.function_id == function.id).order_by(AdapterArtifact.version)
    )
    return function, list(rows)


async def get_version(session: AsyncSession, tenant_id: str, name: str, version: int) -> AdapterArtifact:
    function = await function_by_name(session, tenant_id, name)
    artifact = await session.scalar(
        select(AdapterArtifact).where(AdapterArtifact.function_id == function.id, AdapterArtifact.version == version)
    )
    if artifact is None:
        raise NotFound(f"function '{name}' has no version {version}", function=name)
    return artifact


async def function_by_name(session: AsyncSession, tenant_id: str, name: str) -> Function:
    """The tenant's function row; another tenant's function is 'not found', like a missing one."""
    function = await session.scalar(select(Function).where(Function.tenant_id == tenant_id, Function.name == name))
    if function is None:
        raise NotFound(f"function '{name}' not found", function=name)
    return function


async def rollback(session: AsyncSession, tenant_id: str, name: str, version: int | None = None) -> ServedFunction:
    """Serve an older stored version (default: the one before the current one)."""
    function, versions = await list_versions(session, tenant_id, name)
    current = next((a for a in versions if a.id == function.artifact_id), None)
    if version is None:
        older = [a for a in versions if current is not None and a.version < current.version]
        if not older:
            raise Conflict(f"function '{name}' has no version older than the one it serves", function=name)
        target = older[-1]
    else:
        target = next((a for a in versions if a.version == version), None)
        if target is None:
            raise NotFound(f"function '{name}' has no version {version}", function=name)
    function.artifact_id = target.id
    await session.flush()
    return await served_function(session, tenant_id, name)


async def update_function(
    session: AsyncSession,
    function_id: str,
    price_input_micros_per_1m: int | None = None,
    price_output_micros_per_1m: int | None = None,
    max_tokens: int | None = None,
    max_queue: int | None = None,
) -> Function:
    """The operator's price and limits of one function; later invocations see them, earlier ones keep their snapshot."""
    function = await session.get(Function, function_id)
    if function is None:
        raise NotFound(f"function {function_id} not found")
    if price_input_micros_per_1m is not None:
        function.price_input_micros_per_1m = _price(price_input_micros_per_1m, 0)
    if price_output_micros_per_1m is not None:
        function.price_output_micros_per_1m = _price(price_output_micros_per_1m, 0)
    if max_tokens is not None:
        function.max_tokens = max_tokens
    if max_queue is not None:
        function.max_queue = max_queue
    await session.flush()
    return function


async def list_backbones(session: AsyncSession) -> list[Backbone]:
    return list(await session.scalars(select(Backbone).order_by(Backbone.name)))


async def update_backbone_defaults(
    session: AsyncSession,
    name: str,
    price_input_micros_per_1m: int | None = None,
    price_output_micros_per_1m: int | None = None,
    max_tokens: int | None = None,
    max_queue: int | None = None,
    aliases: list[str] | None = None,
) -> Backbone:
    """Defaults that functions registered from now on start with."""
    backbone = await backbone_by_name(session, name)
    if price_input_micros_per_1m is not None:
        backbone.default_price_input_micros_per_1m = _price(price_input_micros_per_1m, 0)
    if price_output_micros_per_1m is not None:
        backbone.default_price_output_micros_per_1m = _price(price_output_micros_per_1m, 0)
    if max_tokens is not None:
        backbone.default_max_tokens = max_tokens
    if max_queue is not None:
        backbone.default_max_queue = max_queue
    if aliases is not None:
        backbone.aliases = sorted(set(aliases))
    await session.flush()
    return backbone
