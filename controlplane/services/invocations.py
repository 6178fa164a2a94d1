"""Invocations: accepted by the gateway, moved through their state machine by worker events.

``queued -> running -> succeeded | failed | cancelled``. Every transition is a guarded
UPDATE, so a repeated event (JetStream redelivery, a second worker) changes nothing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.models import Invocation, InvocationState
from controlplane.services.catalog import ServedFunction
from lorafaas.errors import InvalidInput, NotFound
from lorafaas.wire import InvocationMode, InvocationResult, SamplingParams, Started

TERMINAL = [InvocationState.SUCCEEDED, InvocationState.FAILED, InvocationState.CANCELLED]


async def accept(
    session: AsyncSession,
    served: ServedFunction,
    prompt: str,
    sampling: SamplingParams,
    mode: InvocationMode,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Invocation:
    """Record an accepted invocation with a snapshot of the function's current price."""
    fn = served.function
    invocation = Invocation(
        tenant_id=fn.tenant_id,
        function_id=fn.id,
        artifact_id=served.artifact.id,
        mode=mode.value,
        state=InvocationState.QUEUED,
        request={"prompt": prompt, "sampling": sampling.model_dump()},
        request_hash=request_hash,
        idempotency_key=idempotency_key,
        price_input_micros_per_1m=fn.price_input_micros_per_1m,
        price_output_micros_per_1m=fn.price_output_micros_per_1m,
    )
    session.add(invocation)
    await session.flush()
    return invocation


async def get_for_tenant(session: AsyncSession, tenant_id: str, invocation_id: str) -> Invocation:
    invocation = await session.scalar(select(Invocation).where(Invocation.id == invocation_id, Invocation.tenant_id == tenant_id))
    if invocation is None:
        raise NotFound(f"invocation {invocation_id} not found")
    return invocation


async def apply_started(session: AsyncSession, event: Started) -> bool:
    result = await session.execute(
        update(Invocation)
        .where(Invocation.id == event.invocation_id, Invocation.state == InvocationState.QUEUED)
        .values(state=InvocationState.RUNNING, started_at=event.started_at, worker_id=event.worker_id)
    )
    return result.rowcount == 1


async def apply_result(session: AsyncSession, event: InvocationResult) -> bool:
    """Settle an invocation once; returns False when it had already been settled."""
    result = await session.execute(
        update(Invocation)
        .where(Invocation.id == event.invocation_id, Invocation.state.not_in(TERMINAL))
        .values(
            state=InvocationState(event.status.value),
            finished_at=event.finished_at,
            first_token_at=event.first_token_at,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            result_text=event.text,
            finish_reason=event.finish_reason,
            error=event.error,
            worker_id=event.worker_id or None,
            timings=event.timings.model_dump(),
        )
    )
    return result.rowcount == 1


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
