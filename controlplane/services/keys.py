"""Tenants and API keys. A key's secret is shown once; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.models import ApiKey, Tenant, TenantStatus
from lorafaas.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from lorafaas.scopes import ALL_SCOPES

KEY_PREFIX = "lf_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant behind an API key, and what the key may do."""

    tenant_id: str
    key_id: str
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise Forbidden(f"this API key lacks the '{scope}' scope", scope=scope)


def hash_secret(secret: str) -> str:
    # Keys carry 192 bits of randomness, so a fast hash is safe and lookups stay O(1).
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_tenant(session: AsyncSession, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        await session.flush()
    except IntegrityError as e:
        raise Conflict(f"a tenant named '{name}' already exists", name=name) from e
    return tenant


async def get_tenant(session: AsyncSession, tenant_id: str) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} not found")
    return tenant


async def tenant_by_name(session: AsyncSession, name: str) -> Tenant:
    tenant = await session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(f"tenant '{name}' not found")
    return tenant


async def create_api_key(
    session: AsyncSession,
    tenant_id: str,
    name: str = "",
    scopes: tuple[str, ...] = ALL_SCOPES,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key and return it with its secret, which is never retrievable again."""
    await get_tenant(session, tenant_id)
    unknown = set(scopes) - set(ALL_SCOPES)
    if unknown:
        raise InvalidInput(f"unknown scopes {sorted(unknown)}; known: {list(ALL_SCOPES)}")
    secret = KEY_PREFIX + secrets.token_urlsafe(24)
    key = ApiKey(
        tenant_id=tenant_id,
        name=name,
        prefix=secret[:10],
        secret_hash=hash_secret(secret),
        scopes=list(scopes),
        expires_at=expires_at,
    )
    session.add(key)
    await session.flush()
    return key, secret


async def create_own_api_key(
    session: AsyncSession, maker: Principal, name: str, scopes: tuple[str, ...], expires_at: datetime | None
) -> tuple[ApiKey, str]:
    """A key the tenant makes with one of its own keys: never with a scope the maker lacks."""
    beyond = set(scopes) - maker.scopes
    if beyond:
        raise Forbidden(f"the key making this one lacks {sorted(beyond)}; a new key cannot have more scopes")
    return await create_api_key(session, maker.tenant_id, name, scopes, expires_at)


async def revoke_api_key(session: AsyncSession, tenant_id: str, key_id: str) -> ApiKey:
    key = await session.get(ApiKey, key_id)
    if key is None or key.tenant_id != tenant_id:
        raise NotFound(f"API key {key_id} not found")
    key.revoked_at = key.revoked_at or datetime.now(UTC)
    return key


async def authenticate(session: AsyncSession, secret: str | None) -> Principal:
    """Resolve a bearer secret to its tenant; every failure is the same 401 to the caller."""
    if not secret:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    row = (
        await session.execute(
            select(ApiKey, Tenant.status)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(ApiKey.secret_hash == hash_secret(secret))
        )
    ).first()
    return _principal_of(row)


async def authenticate_key_id(session: AsyncSession, key_id: str) -> Principal:
    """Resolve a key by id (a dashboard session names its key, never its secret); same checks as ``authenticate``."""
    row = (
        await session.execute(
            select(ApiKey, Tenant.status).join(Tenant, Tenant.id == ApiKey.tenant_id).where(ApiKey.id == key_id)
        )
    ).first()
    return _principal_of(row)


def _principal_of(row: tuple[ApiKey, str] | None) -> Principal:
    now = datetime.now(UTC)
    if row is None:
        raise Unauthenticated("invalid API key")
    key, status = row
    if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
        raise Unauthenticated("this API key is revoked or expired")
    if status != TenantStatus.ACTIVE:
        raise Unauthenticated("this tenant is suspended")
    return Principal(tenant_id=key.tenant_id, key_id=key.id, scopes=frozenset(key.scopes))


async def list_tenants(session: AsyncSession) -> list[Tenant]:
    return list(await session.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.name)))


async def set_tenant_status(session: AsyncSession, tenant_id: str, status: TenantStatus) -> Tenant:
    """Suspend or reactivate; keys are checked against the status on every request, so it acts at once."""
    tenant = await get_tenant(session, tenant_id)
    tenant.status = status
    tenant.suspended_at = datetime.now(UTC) if status == TenantStatus.SUSPENDED else None
    await session.flush()
    return tenant


async def list_api_keys(session: AsyncSession, tenant_id: str) -> list[ApiKey]:
    await get_tenant(session, tenant_id)
    return list(await session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)))


async def ensure_callback_secret(session: AsyncSession, tenant_id: str) -> str:
    """The tenant's secret for signing callbacks, made on first use (race-safe: the first writer wins)."""
    await session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id, Tenant.callback_secret.is_(None))
        .values(callback_secret="whsec_" + secrets.token_hex(24))
    )
    secret = await session.scalar(select(Tenant.callback_secret).where(Tenant.id == tenant_id))
    if secret is None:
        raise NotFound(f"tenant {tenant_id} not found")
    return secret


async def callback_secret(session: AsyncSession, tenant_id: str) -> str | None:
    """The tenant's callback secret, or None before its first async invocation with a callback."""
    return await session.scalar(select(Tenant.callback_secret).where(Tenant.id == tenant_id))
