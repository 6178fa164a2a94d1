"""The usage ledger: exact integer money, one record per invocation, bills as sums of records.

Prices are integer micro-dollars per 1M tokens. ``tokens x price`` is then an integer number
of pico-dollars (1e-12 USD): no request is ever rounded, and a bill's total is the exact sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.models import Function, Invocation, UsageRecord
from lorafaas.errors import InvalidInput, NotFound
from lorafaas.wire import UsageEvent

PICOUSD_PER_USD = 10**12


def amount_picousd(input_tokens: int, output_tokens: int, price_in_micros_per_1m: int, price_out_micros_per_1m: int) -> int:
    """The exact charge of one invocation in pico-dollars."""
    return input_tokens * price_in_micros_per_1m + output_tokens * price_out_micros_per_1m


def picousd_to_usd(amount: int) -> Decimal:
    """Exact dollars (Decimal) of a pico-dollar amount, for display."""
    return Decimal(amount) / PICOUSD_PER_USD


async def record_usage(session: AsyncSession, event: UsageEvent) -> bool:
    """Insert the invocation's one usage record; a repeated event changes nothing.

    Returns True when this call wrote the record. The price comes from the snapshot taken
    when the invocation was accepted, never from the function's current price.
    """
    invocation = await session.get(Invocation, event.invocation_id)
    if invocation is None:
        raise NotFound(f"usage for unknown invocation {event.invocation_id}")
    if invocation.tenant_id != event.tenant_id or invocation.function_id != event.function_id:
        raise InvalidInput(f"usage event for {event.invocation_id} names another tenant or function")
    values = dict(
        invocation_id=event.invocation_id,
        tenant_id=invocation.tenant_id,
        function_id=invocation.function_id,
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        price_input_micros_per_1m=invocation.price_input_micros_per_1m,
        price_output_micros_per_1m=invocation.price_output_micros_per_1m,
        amount_picousd=amount_picousd(
            event.input_tokens, event.output_tokens, invocation.price_input_micros_per_1m, invocation.price_output_micros_per_1m
        ),
        device_ns=event.device_ns,
        worker_id=event.worker_id,
        recorded_at=event.finished_at,
    )
    stmt = insert(UsageRecord).values(**values).on_conflict_do_nothing(index_elements=["invocation_id"]).returning(UsageRecord.id)
    return (await session.execute(stmt)).scalar_one_or_none() is not None


@dataclass(frozen=True)
class BillLine:
    function_id: str
    function_name: str
    invocations: int
    input_tokens: int
    output_tokens: int
    amount_picousd: int


@dataclass(frozen=True)
class Bill:
    tenant_id: str
    period_start: datetime
    period_end: datetime
    lines: list[BillLine]

    @property
    def total_picousd(self) -> int:
        return sum(line.amount_picousd for line in self.lines)


def month_range(year: int, month: int) -> tuple[datetime, datetime]:
    if not 1 <= month <= 12:
        raise InvalidInput(f"month must be 1..12, got {month}")
    start = datetime(year, month, 1, tzinfo=timezone.utc)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=timezone.utc)
    return start, end


async def monthly_bill(session: AsyncSession, tenant_id: str, year: int, month: int) -> Bill:
    """A tenant's bill for a calendar month (UTC): one line per function, summed exactly."""
    start, end = month_range(year, month)
    rows = await session.execute(
        select(
            UsageRecord.function_id,
            Function.name,
            func.count(UsageRecord.id),
            func.sum(UsageRecord.input_tokens),
            func.sum(UsageRecord.output_tokens),
            func.sum(UsageRecord.amount_picousd),
        )
        .join(Function, Function.id == UsageRecord.function_id)
        .where(UsageRecord.tenant_id == tenant_id, UsageRecord.recorded_at >= start, UsageRecord.recorded_at < end)
        .group_by(UsageRecord.function_id, Function.name)
        .order_by(Function.name)
    )
    lines = [BillLine(fid, name, int(n), int(i), int(o), int(a)) for fid, name, n, i, o, a in rows]
    return Bill(tenant_id, start, end, lines)


@dataclass(frozen=True)
class UsageTotals:
    records: int
    input_tokens: int
    output_tokens: int
    amount_picousd: int
    device_ns: int


async def usage_totals(session: AsyncSession, tenant_id: str, invocation_ids: list[str] | None = None) -> UsageTotals:
    """Sums of a tenant's usage records, optionally only those of the given invocations."""
    query = select(
        func.count(UsageRecord.id),
        func.coalesce(func.sum(UsageRecord.input_tokens), 0),
        func.coalesce(func.sum(UsageRecord.output_tokens), 0),
        func.coalesce(func.sum(UsageRecord.amount_picousd), 0),
        func.coalesce(func.sum(UsageRecord.device_ns), 0),
    ).where(UsageRecord.tenant_id == tenant_id)
    if invocation_ids is not None:
        query = query.where(UsageRecord.invocation_id.in_(invocation_ids))
    n, i, o, a, d = (await session.execute(query)).one()
    return UsageTotals(int(n), int(i), int(o), int(a), int(d))
