"""Invocations: accepted by the gateway, moved through their state machine by worker events.

``queued -> running -> succeeded | failed | cancelled``. Every transition is a guarded
UPDATE, so a repeated event (JetStream redelivery, a second worker) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import JSON, bindparam, func, insert, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from controlplane.db.models import IN_FLIGHT, Invocation, InvocationState, new_id
from controlplane.services.functions import ServedFunction
from lorafaas.errors import Conflict, InvalidInput, NotFound
from lorafaas.wire import InvocationMode, InvocationResult, SamplingParams, Started

TERMINAL = [InvocationState.SUCCEEDED, InvocationState.FAILED, InvocationState.CANCELLED]
# States of a callback delivery (``invocations.callback_state``): pending -> delivered | failed.
CALLBACK_PENDING, CALLBACK_DELIVERED, CALLBACK_FAILED = "pending", "delivered", "failed"


# What an invocation is recorded with when accepted; the rest is filled in as it runs.
ACCEPTED_COLUMNS = (
    "id",
    "tenant_id",
    "function_id",
    "artifact_id",
    "mode",
    "state",
    "request",
    "request_hash",
    "idempotency_key",
    "price_input_micros_per_1m",
    "price_output_micros_per_1m",
    "callback_url",
    "callback_state",
    "callback_attempts",
)


def _accept_statement():
    """count in-flight -> insert if below the limit -> (count, id or NULL), as one statement.

    Built once with bind parameters: SQLAlchemy then only looks up its compiled form.
    """
    columns = Invocation.__table__.c
    depth = (
        select(func.count().label("n"))
        .select_from(Invocation)
        .where(Invocation.function_id == bindparam("function_id"), Invocation.state.in_(IN_FLIGHT))
        .cte("depth")
    )
    # JSON None stays SQL NULL (as when the column is left out), not the JSON value null.
    types = {
        name: JSON(none_as_null=True) if isinstance(columns[name].type, JSON) else columns[name].type
        for name in ACCEPTED_COLUMNS
    }
    row = (
        select(*(bindparam(name, type_=types[name]) for name in ACCEPTED_COLUMNS))
        .select_from(depth)
        .where(depth.c.n < bindparam("queue_limit"))
    )
    inserted = insert(Invocation.__table__).from_select(ACCEPTED_COLUMNS, row).returning(Invocation.id).cte("inserted")
    return select(depth.c.n, inserted.c.id).select_from(depth.outerjoin(inserted, true()))


_ACCEPT = _accept_statement()


@dataclass(frozen=True)
class Admission:
    """The outcome of ``accept``: the new invocation's id, or None when the queue was full."""

    id: str | None
    queue_depth: int  # the function's invocations queued or running before this one


async def accept(
    session: AsyncSession | AsyncConnection,
    served: ServedFunction,
    prompt: str,
    sampling: SamplingParams,
    mode: InvocationMode,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    callback_url: str | None = None,
    queue_limit: int | None = None,
) -> Admission:
    """Record an accepted invocation with a snapshot of the function's current price.

    One statement counts the function's in-flight invocations and inserts only while they are
    below ``queue_limit``: a single round trip, so on an autocommit session admission costs
    no BEGIN or COMMIT. Concurrent accepts may overshoot the limit by the number racing on
    the same count; it is a soft limit.
    """
    fn = served.function
    params = {
        "id": new_id(),
        "tenant_id": fn.tenant_id,
        "function_id": fn.id,
        "artifact_id": served.artifact.id,
        "mode": mode.value,
        "state": InvocationState.QUEUED.value,
        "request": {"prompt": prompt, "sampling": sampling.model_dump()},
        "request_hash": request_hash,
        "idempotency_key": idempotency_key,
        "price_input_micros_per_1m": fn.price_input_micros_per_1m,
        "price_output_micros_per_1m": fn.price_output_micros_per_1m,
        "callback_url": callback_url,
        "callback_state": CALLBACK_PENDING if callback_url else None,
        "callback_attempts": [] if callback_url else None,
        "queue_limit": queue_limit if queue_limit is not None else 2**31 - 1,  # None: no limit
    }
    depth_before, invocation_id = (await session.execute(_ACCEPT, params)).one()
    return Admission(invocation_id, depth_before)


async def get_for_tenant(session: AsyncSession, tenant_id: str, invocation_id: str) -> Invocation:
    invocation = await session.scalar(
        select(Invocation).where(Invocation.id == invocation_id, Invocation.tenant_id == tenant_id)
    )
    if invocation is None:
        raise NotFound(f"invocation {invocation_id} not found")
    return invocation


async def get(session: AsyncSession, invocation_id: str) -> Invocation:
    """One invocation by id, whoever owns it: for callers that hold an id they issued themselves."""
    invocation = await session.get(Invocation, invocation_id)
    if invocation is None:
        raise NotFound(f"invocation {invocation_id} not found")
    return invocation


async def by_idempotency_key(session: AsyncSession, tenant_id: str, key: str) -> Invocation | None:
    """The tenant's invocation recorded with this Idempotency-Key, if any."""
    return await session.scalar(
        select(Invocation).where(Invocation.tenant_id == tenant_id, Invocation.idempotency_key == key)
    )


async def release_idempotency_key(session: AsyncSession, invocation_id: str) -> None:
    """Free an expired Idempotency-Key so that it may name a new invocation."""
    await session.execute(update(Invocation).where(Invocation.id == invocation_id).values(idempotency_key=None))


async def request_cancel(session: AsyncSession, tenant_id: str, invocation_id: str) -> Invocation:
    """Mark the tenant's invocation as asked to cancel (409 once it finished); the worker or caller settles it."""
    invocation = await get_for_tenant(session, tenant_id, invocation_id)
    if InvocationState(invocation.state).terminal:
        raise Conflict(
            f"invocation {invocation_id} already {invocation.state}; nothing to cancel", state=invocation.state
        )
    invocation.cancel_requested_at = invocation.cancel_requested_at or datetime.now(UTC)
    await session.flush()
    return invocation


async def apply_started(session: AsyncSession, event: Started) -> bool:
    result = await session.execute(
        update(Invocation)
        .where(Invocation.id == event.invocation_id, Invocation.state == InvocationState.QUEUED)
        .values(state=InvocationState.RUNNING, started_at=event.started_at, worker_id=event.worker_id)
    )
    return result.rowcount == 1


@dataclass(frozen=True)
class Settled:
    """An invocation that ``apply_result`` settled just now."""

    has_callback: bool


_SETTLE = (
    Invocation.__table__.update()
    .where(Invocation.id == bindparam("r_invocation_id"), Invocation.state.not_in(TERMINAL))
    .values(
        state=bindparam("r_state"),
        finished_at=bindparam("r_finished_at"),
        first_token_at=bindparam("r_first_token_at"),
        prompt_tokens=bindparam("r_prompt_tokens"),
        completion_tokens=bindparam("r_completion_tokens"),
        result_text=bindparam("r_text"),
        finish_reason=bindparam("r_finish_reason"),
        error=bindparam("r_error"),
        worker_id=bindparam("r_worker_id"),
        timings=bindparam("r_timings", type_=Invocation.timings.type),
    )
    .returning(Invocation.callback_url)
)  # built once: SQLAlchemy only looks up its compiled form


async def apply_result(session: AsyncSession, event: InvocationResult) -> Settled | None:
    """Settle an invocation once; None when it had already been settled."""
    params = {
        "r_invocation_id": event.invocation_id,
        "r_state": InvocationState(event.status.value).value,
        "r_finished_at": event.finished_at,
        "r_first_token_at": event.first_token_at,
        "r_prompt_tokens": event.prompt_tokens,
        "r_completion_tokens": event.completion_tokens,
        "r_text": event.text,
        "r_finish_reason": event.finish_reason,
        "r_error": event.error,
        "r_worker_id": event.worker_id or None,
        "r_timings": event.timings.model_dump(),
    }
    row = (await session.execute(_SETTLE, params)).one_or_none()
    return Settled(has_callback=bool(row.callback_url)) if row is not None else None


async def list_for_tenant(
    session: AsyncSession,
    tenant_id: str,
    function_id: str | None = None,
    state: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
) -> list[Invocation]:
    """The tenant's invocations, newest first; only ever its own rows, whatever the filters."""
    if state is not None and state not in {s.value for s in InvocationState}:
        raise InvalidInput(f"state must be one of {[s.value for s in InvocationState]}, got {state!r}", param="state")
    query = select(Invocation).where(Invocation.tenant_id == tenant_id)
    if function_id is not None:
        query = query.where(Invocation.function_id == function_id)
    if state is not None:
        query = query.where(Invocation.state == state)
    if since is not None:
        query = query.where(Invocation.accepted_at >= since)
    if until is not None:
        query = query.where(Invocation.accepted_at < until)
    return list(await session.scalars(query.order_by(Invocation.accepted_at.desc(), Invocation.id).limit(limit)))


async def timings_of(session: AsyncSession, invocation_ids: list[str]) -> dict[str, dict[str, float]]:
    """Worker-measured timings by invocation id, for operators and benchmarks."""
    rows = await session.execute(select(Invocation.id, Invocation.timings).where(Invocation.id.in_(invocation_ids)))
    return {inv_id: dict(timings or {}) for inv_id, timings in rows.all()}
