"""Per-tenant quotas: tokens per minute, concurrent invocations, a monthly spend cap.

The control plane owns the numbers (columns of ``tenants``); gateways cache them and enforce
them here, inside the transaction that accepts the invocation. Counters are read from the
ledger and the invocations table, so every gateway sees the same totals.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from controlplane.db.models import IN_FLIGHT, Invocation, Tenant, UsageRecord
from controlplane.services.keys import get_tenant
from controlplane.services.ledger import month_range, picousd_to_usd
from lorafaas.errors import InvalidInput, PaymentRequired, QuotaExceeded

WINDOW = timedelta(minutes=1)


@dataclass(frozen=True)
class TenantQuota:
    """The limits of one tenant; None means unlimited."""

    tenant_id: str
    tokens_per_minute: int | None = None
    max_concurrency: int | None = None
    monthly_spend_cap_picousd: int | None = None

    @property
    def unlimited(self) -> bool:
        return (
            self.tokens_per_minute is None and self.max_concurrency is None and self.monthly_spend_cap_picousd is None
        )

    @classmethod
    def of(cls, tenant: Tenant) -> TenantQuota:
        return cls(tenant.id, tenant.tokens_per_minute, tenant.max_concurrency, tenant.monthly_spend_cap_picousd)


async def load_quota(session: AsyncSession, tenant_id: str) -> TenantQuota:
    return TenantQuota.of(await get_tenant(session, tenant_id))


async def set_quota(session: AsyncSession, tenant_id: str, **limits: int | None) -> TenantQuota:
    """Set any of tokens_per_minute, max_concurrency, monthly_spend_cap_picousd (None lifts a limit)."""
    tenant = await get_tenant(session, tenant_id)
    for name, value in limits.items():
        if name not in ("tokens_per_minute", "max_concurrency", "monthly_spend_cap_picousd"):
            raise InvalidInput(f"unknown quota {name}")
        if value is not None and (not isinstance(value, int) or value < 0):
            raise InvalidInput(f"{name} must be a non-negative integer or null, got {value!r}", param=name)
        setattr(tenant, name, value)
    await session.flush()
    return TenantQuota.of(tenant)


async def enforce(
    session: AsyncSession | AsyncConnection,
    quota: TenantQuota,
    requested_tokens: int,
    in_flight_horizon_s: float,
    now: datetime | None = None,
) -> None:
    """Refuse an invocation that would cross a limit: 402 past the spend cap, 429 otherwise.

    With a concurrency limit, a transaction-scoped advisory lock on the tenant serialises
    accepts, so two gateways cannot both take the last slot.
    """
    if quota.unlimited:
        return
    now = now or datetime.now(UTC)
    if quota.monthly_spend_cap_picousd is not None:
        await _check_spend(session, quota, now)
    if quota.max_concurrency is not None:
        await session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"quota:{quota.tenant_id}"})
        await _check_concurrency(session, quota, now - timedelta(seconds=in_flight_horizon_s))
    if quota.tokens_per_minute is not None:
        await _check_tokens(session, quota, requested_tokens, now)


async def _check_spend(session: AsyncSession, quota: TenantQuota, now: datetime) -> None:
    start, end = month_range(now.year, now.month)
    spent = await session.scalar(
        select(func.coalesce(func.sum(UsageRecord.amount_picousd), 0)).where(
            UsageRecord.tenant_id == quota.tenant_id, UsageRecord.recorded_at >= start, UsageRecord.recorded_at < end
        )
    )
    cap = quota.monthly_spend_cap_picousd
    if int(spent) >= cap:
        raise PaymentRequired(
            f"monthly spend cap of ${picousd_to_usd(cap)} reached "
            f"(${picousd_to_usd(int(spent))} spent in {now:%Y-%m}); "
            "new invocations are refused until the cap is raised or the month ends",
            spent_picousd=int(spent),
            cap_picousd=cap,
        )


async def _check_concurrency(session: AsyncSession, quota: TenantQuota, since: datetime) -> None:
    # Invocations stuck past the horizon (a lost worker) stop counting, so a tenant is never locked out for good.
    running = await session.scalar(
        select(func.count())
        .select_from(Invocation)
        .where(
            Invocation.tenant_id == quota.tenant_id, Invocation.state.in_(IN_FLIGHT), Invocation.accepted_at >= since
        )
    )
    if running >= quota.max_concurrency:
        raise QuotaExceeded(
            f"{running} invocations are in flight; this tenant's limit is {quota.max_concurrency} at a time",
            retry_after_s=1.0,
            limit="concurrency",
        )


async def _check_tokens(session: AsyncSession, quota: TenantQuota, requested: int, now: datetime) -> None:
    """Tokens of the last minute: finished invocations' usage plus what in-flight ones may still generate."""
    since = now - WINDOW
    used, oldest_used = (
        await session.execute(
            select(
                func.coalesce(func.sum(UsageRecord.input_tokens + UsageRecord.output_tokens), 0),
                func.min(UsageRecord.recorded_at),
            ).where(UsageRecord.tenant_id == quota.tenant_id, UsageRecord.recorded_at >= since)
        )
    ).one()
    reserved_expr = Invocation.request["sampling"]["max_tokens"].as_integer()
    reserved, oldest_reserved = (
        await session.execute(
            select(func.coalesce(func.sum(reserved_expr), 0), func.min(Invocation.accepted_at)).where(
                Invocation.tenant_id == quota.tenant_id,
                Invocation.state.in_(IN_FLIGHT),
                Invocation.accepted_at >= since,
            )
        )
    ).one()
    total = int(used) + int(reserved)
    limit = quota.tokens_per_minute
    if total + requested > limit:
        oldest = min((t for t in (oldest_used, oldest_reserved) if t is not None), default=now)
        retry = max(1.0, (oldest + WINDOW - now).total_seconds())
        raise QuotaExceeded(
            f"{total} tokens used or reserved in the last minute; "
            f"this request's {requested} would pass the limit of {limit} tokens per minute",
            retry_after_s=retry,
            limit="tokens_per_minute",
        )
