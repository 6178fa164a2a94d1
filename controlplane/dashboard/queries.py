"""The dashboard's own read queries: counts and cursors, never money (money comes from the ledger)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.models import Invocation, InvocationState
from lorafaas.errors import InvalidInput

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


async def failed_counts(session: AsyncSession, tenant_id: str, start: datetime, end: datetime) -> dict[str, int]:
    """How many of the tenant's invocations accepted in [start, end) failed, per function id.

    Read through ``ix_invocations_tenant_state``: only the failed rows are visited, not the period's.
    """
    rows = await session.execute(
        select(Invocation.function_id, func.count())
        .where(
            Invocation.tenant_id == tenant_id,
            Invocation.state == InvocationState.FAILED,
            Invocation.accepted_at >= start,
            Invocation.accepted_at < end,
        )
        .group_by(Invocation.function_id)
    )
    return {fid: int(n) for fid, n in rows}


def encode_cursor(accepted_at: datetime, invocation_id: str) -> str:
    """The keyset cursor after an invocation: exact microseconds since the epoch, then its id."""
    return f"{(accepted_at - EPOCH) // MICROSECOND}.{invocation_id}"


def decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor:
        return None
    micros, _, invocation_id = cursor.partition(".")
    try:
        return EPOCH + int(micros) * MICROSECOND, invocation_id
    except ValueError as e:
        raise InvalidInput(f"not a page cursor: {cursor!r}", param="before") from e


def parse_time(value: str | None, param: str) -> datetime | None:
    """A time typed in a form (ISO 8601, e.g. ``2026-11-30T14:00``); without a zone it is UTC."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as e:
        raise InvalidInput(f"{param}: not a time like 2026-11-30T14:00, got {value!r}", param=param) from e
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
