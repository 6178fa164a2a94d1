"""The usage ledger: exact integer money, one record per invocation, bills as sums of records.

Prices are integer micro-dollars per 1M tokens. ``tokens x price`` is then an integer number
of pico-dollars (1e-12 USD): no request is ever rounded, and a bill's total is the exact sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import BigInteger, Integer, String, bindparam, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.models import Function, Invocation, Tenant, UsageRecord
from lorafaas.errors import InvalidInput, NotFound
from lorafaas.wire import UsageEvent

PICOUSD_PER_USD = 10**12


def amount_picousd(
    input_tokens: int, output_tokens: int, price_in_micros_per_1m: int, price_out_micros_per_1m: int
) -> int:
    """The exact charge of one invocation in pico-dollars."""
    return input_tokens * price_in_micros_per_1m + output_tokens * price_out_micros_per_1m


def picousd_to_usd(amount: int) -> Decimal:
    """Exact dollars (Decimal) of a pico-dollar amount, for display."""
    return Decimal(amount) / PICOUSD_PER_USD


def _record_usage_statement():
    """The usage record of an event, priced from the invocation's snapshot, as one INSERT .. SELECT.

    Built once with bind parameters (SQLAlchemy then only looks up its compiled form); the
    amount is ``amount_picousd`` itself, applied to SQL expressions: exact bigint arithmetic.
    """
    inv = Invocation.__table__.c
    in_tokens, out_tokens = bindparam("u_input_tokens", type_=Integer), bindparam("u_output_tokens", type_=Integer)
    source = select(
        inv.id,
        inv.tenant_id,
        inv.function_id,
        in_tokens,
        out_tokens,
        inv.price_input_micros_per_1m,
        inv.price_output_micros_per_1m,
        amount_picousd(in_tokens, out_tokens, inv.price_input_micros_per_1m, inv.price_output_micros_per_1m),
        bindparam("u_device_ns", type_=BigInteger),
        bindparam("u_worker_id", type_=String),
        func.coalesce(bindparam("u_finished_at", type_=UsageRecord.recorded_at.type), func.now()),
    ).where(
        inv.id == bindparam("u_invocation_id"),
        inv.tenant_id == bindparam("u_tenant_id"),
        inv.function_id == bindparam("u_function_id"),
    )
    columns = [
        "invocation_id",
        "tenant_id",
        "function_id",
        "input_tokens",
        "output_tokens",
        "price_input_micros_per_1m",
        "price_output_micros_per_1m",
        "amount_picousd",
        "device_ns",
        "worker_id",
        "recorded_at",
    ]
    return (
        insert(UsageRecord.__table__)
        .from_select(columns, source)
        .on_conflict_do_nothing(index_elements=["invocation_id"])
        .returning(UsageRecord.id)
    )


_RECORD_USAGE = _record_usage_statement()


async def record_usage(session: AsyncSession, event: UsageEvent) -> bool:
    """Insert the invocation's one usage record; a repeated event changes nothing.

    Returns True when this call wrote the record. The price comes from the snapshot taken
    when the invocation was accepted, never from the function's current price.
    """
    params = {
        "u_invocation_id": event.invocation_id,
        "u_tenant_id": event.tenant_id,
        "u_function_id": event.function_id,
        "u_input_tokens": event.input_tokens,
        "u_output_tokens": event.output_tokens,
        "u_device_ns": event.device_ns,
        "u_worker_id": event.worker_id,
        "u_finished_at": event.finished_at,
    }
    if (await session.execute(_RECORD_USAGE, params)).scalar_one_or_none() is not None:
        return True
    # Nothing written: a repeat (False), or an event that names no such invocation (refused).
    invocation = await session.get(Invocation, event.invocation_id)
    if invocation is None:
        raise NotFound(f"usage for unknown invocation {event.invocation_id}")
    if invocation.tenant_id != event.tenant_id or invocation.function_id != event.function_id:
        raise InvalidInput(f"usage event for {event.invocation_id} names another tenant or function")
    return False


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
        raise InvalidInput(f"month must be 1..12, got {month}", param="period")
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
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


# --- usage over time (the tenant's view) ------------------------------------------------
BUCKET_WIDTHS = {"1h": timedelta(hours=1), "1d": timedelta(days=1)}
MAX_BUCKETS = 31 * 24


@dataclass(frozen=True)
class UsageRow:
    bucket_start: datetime
    function_id: str | None
    function_name: str | None
    invocations: int
    input_tokens: int
    output_tokens: int
    amount_picousd: int


def bucket_starts(start: datetime, end: datetime, width: str) -> list[datetime]:
    """Every bucket in [start, end), aligned to UTC hours or days like OpenAI's usage API."""
    if width not in BUCKET_WIDTHS:
        raise InvalidInput(f"bucket_width must be one of {sorted(BUCKET_WIDTHS)}, got {width!r}", param="bucket_width")
    if end <= start:
        raise InvalidInput("end_time must be after start_time", param="end_time")
    step = BUCKET_WIDTHS[width]
    first = start.replace(minute=0, second=0, microsecond=0)
    if width == "1d":
        first = first.replace(hour=0)
    count = -(-(end - first) // step)
    if count > MAX_BUCKETS:
        raise InvalidInput(
            f"the range spans {count} buckets of {width}; the limit is {MAX_BUCKETS}", param="start_time"
        )
    return [first + i * step for i in range(count)]


async def usage_by_bucket(
    session: AsyncSession,
    tenant_id: str,
    start: datetime,
    end: datetime,
    width: str,
    function_id: str | None = None,
    by_function: bool = True,
) -> list[UsageRow]:
    """A tenant's usage records summed per UTC hour or day (and per function), exactly."""
    trunc = func.date_trunc("hour" if width == "1h" else "day", UsageRecord.recorded_at, "UTC").label("bucket")
    cols = [
        trunc,
        func.count(UsageRecord.id),
        func.sum(UsageRecord.input_tokens),
        func.sum(UsageRecord.output_tokens),
        func.sum(UsageRecord.amount_picousd),
    ]
    group = [trunc]
    if by_function:
        cols[1:1] = [UsageRecord.function_id, Function.name]
        group += [UsageRecord.function_id, Function.name]
    query = (
        select(*cols)
        .join(Function, Function.id == UsageRecord.function_id)
        .where(UsageRecord.tenant_id == tenant_id, UsageRecord.recorded_at >= start, UsageRecord.recorded_at < end)
        .group_by(*group)
        .order_by(*group)
    )
    if function_id is not None:
        query = query.where(UsageRecord.function_id == function_id)
    rows = []
    for row in await session.execute(query):
        bucket, *rest = row
        fid, fname = (rest.pop(0), rest.pop(0)) if by_function else (None, None)
        n, i, o, a = rest
        rows.append(UsageRow(bucket.astimezone(UTC), fid, fname, int(n), int(i), int(o), int(a)))
    return rows


# --- revenue, cost and margin (the operator's view) -------------------------------------
NS_PER_HOUR = 3600 * 10**9
PICO_PER_MICRO = 10**6


def device_cost_picousd(device_ns: int, price_micros_per_hour: int) -> int:
    """Platform cost of summed device time, rounded half up to a pico-dollar only here, at report time."""
    numerator = device_ns * price_micros_per_hour * PICO_PER_MICRO
    return (2 * numerator + NS_PER_HOUR) // (2 * NS_PER_HOUR)


class RevenueCost:
    """Revenue and device cost of a report row; the margin is derived, never stored."""

    revenue_picousd: int
    device_ns: int
    cost_picousd: int

    @property
    def margin_picousd(self) -> int:
        return self.revenue_picousd - self.cost_picousd


@dataclass(frozen=True)
class MarginLine(RevenueCost):
    tenant_id: str
    tenant_name: str
    function_id: str | None
    function_name: str | None
    invocations: int
    input_tokens: int
    output_tokens: int
    revenue_picousd: int
    device_ns: int
    cost_picousd: int


@dataclass(frozen=True)
class MarginReport(RevenueCost):
    start: datetime
    end: datetime
    device_price_micros_per_hour: int
    by_function: list[MarginLine]
    by_tenant: list[MarginLine]
    revenue_picousd: int
    device_ns: int
    cost_picousd: int


async def margin_report(
    session: AsyncSession, start: datetime, end: datetime, price_micros_per_hour: int, tenant_id: str | None = None
) -> MarginReport:
    """Revenue beside device cost per function and per tenant; cost comes from summed device_ns."""
    query = (
        select(
            Tenant.id,
            Tenant.name,
            Function.id,
            Function.name,
            func.count(UsageRecord.id),
            func.sum(UsageRecord.input_tokens),
            func.sum(UsageRecord.output_tokens),
            func.sum(UsageRecord.amount_picousd),
            func.sum(UsageRecord.device_ns),
        )
        .join(Function, Function.id == UsageRecord.function_id)
        .join(Tenant, Tenant.id == UsageRecord.tenant_id)
        .where(UsageRecord.recorded_at >= start, UsageRecord.recorded_at < end)
        .group_by(Tenant.id, Tenant.name, Function.id, Function.name)
        .order_by(Tenant.name, Function.name)
    )
    if tenant_id is not None:
        query = query.where(UsageRecord.tenant_id == tenant_id)
    raw = [tuple(int(v) if i >= 4 else v for i, v in enumerate(row)) for row in await session.execute(query)]
    by_function = [
        MarginLine(t, tn, f, fn, n, i, o, r, d, device_cost_picousd(d, price_micros_per_hour))
        for t, tn, f, fn, n, i, o, r, d in raw
    ]
    by_tenant = []
    for tid in dict.fromkeys(line.tenant_id for line in by_function):
        lines = [line for line in by_function if line.tenant_id == tid]
        d = sum(line.device_ns for line in lines)
        by_tenant.append(
            MarginLine(
                tid,
                lines[0].tenant_name,
                None,
                None,
                sum(x.invocations for x in lines),
                sum(x.input_tokens for x in lines),
                sum(x.output_tokens for x in lines),
                sum(x.revenue_picousd for x in lines),
                d,
                device_cost_picousd(d, price_micros_per_hour),
            )
        )
    device_ns = sum(line.device_ns for line in by_function)
    revenue = sum(line.revenue_picousd for line in by_function)
    return MarginReport(
        start,
        end,
        price_micros_per_hour,
        by_function,
        by_tenant,
        revenue,
        device_ns,
        device_cost_picousd(device_ns, price_micros_per_hour),
    )


FIRST_YEAR, LAST_YEAR = 1970, 9998  # a bill's period ends a month later: still a valid date


def month_of(period: str) -> tuple[int, int]:
    """``YYYY-MM`` -> (year, month), refusing anything else (and years a date cannot hold)."""
    try:
        year, month = (int(x) for x in period.split("-"))
    except ValueError as e:
        raise InvalidInput(f"period must be YYYY-MM, got {period[:32]!r}", param="period") from e
    if not FIRST_YEAR <= year <= LAST_YEAR:
        raise InvalidInput(f"period must be between {FIRST_YEAR}-01 and {LAST_YEAR}-12, got {year}", param="period")
    month_range(year, month)
    return year, month
