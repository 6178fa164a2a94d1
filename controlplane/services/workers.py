"""The worker registry: heartbeats upsert a row; a worker silent past a threshold is marked dead."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.models import Worker
from lorafaas.wire import WorkerHeartbeat


class WorkerStatus(StrEnum):
    ALIVE = "alive"
    STUCK = "stuck"  # the process beats, but its engine has failed or makes no progress
    DEAD = "dead"


async def record_heartbeat(
    session: AsyncSession, beat: WorkerHeartbeat, status: WorkerStatus = WorkerStatus.ALIVE
) -> None:
    """Register or refresh a worker. The receive time (the database's clock) is what counts,
    so a worker with a skewed clock is judged like any other."""
    values = dict(
        id=beat.worker_id,
        backbone=beat.backbone,
        device=beat.device,
        started_at=beat.started_at,
        status=status,
    )
    stmt = insert(Worker).values(**values, last_heartbeat_at=func.now())
    stmt = stmt.on_conflict_do_update(
        index_elements=[Worker.id],
        set_=dict(
            backbone=beat.backbone,
            device=beat.device,
            started_at=beat.started_at,
            status=status,
            last_heartbeat_at=func.now(),
            dead_at=None,
        ),
    )
    await session.execute(stmt)


async def mark_silent_dead(session: AsyncSession, silent_for_s: float) -> list[str]:
    """Mark every alive or stuck worker whose last heartbeat is older than the threshold as dead; returns their ids."""
    cutoff = func.now() - timedelta(seconds=silent_for_s)
    result = await session.execute(
        update(Worker)
        .where(Worker.status.in_([WorkerStatus.ALIVE, WorkerStatus.STUCK]), Worker.last_heartbeat_at < cutoff)
        .values(status=WorkerStatus.DEAD, dead_at=func.now())
        .returning(Worker.id)
    )
    return list(result.scalars())


async def list_workers(session: AsyncSession, status: str | None = None) -> list[Worker]:
    query = select(Worker).order_by(Worker.backbone, Worker.id)
    if status is not None:
        query = query.where(Worker.status == status)
    return list(await session.scalars(query))
