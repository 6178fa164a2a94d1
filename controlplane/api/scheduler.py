"""The operator's view of the scheduler: placement, drain, and its Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane.api.deps import require_operator
from controlplane.scheduler.loop import SchedulerLoop
from lorafaas.errors import NotFound, ServiceUnavailable
from lorafaas.http_errors import error_responses

router = APIRouter(tags=["scheduler"], responses=error_responses(400, 401, 404, 503))


async def _scheduler(request: Request) -> SchedulerLoop:
    scheduler = getattr(request.app.state, "scheduler", None)
    if scheduler is None:
        raise ServiceUnavailable("the scheduler is disabled on this control plane (LORAFAAS_SCHEDULER__ENABLED)")
    return scheduler


SchedulerDep = Annotated[SchedulerLoop, Depends(_scheduler)]


@router.get("/admin/placement", dependencies=[Depends(require_operator)])
async def placement(scheduler: SchedulerDep) -> dict:
    """Per worker: the functions placed on it, its adapters by tier, its load; and the table itself."""
    return scheduler.describe()


@router.post("/admin/workers/{worker_id}/drain", status_code=202, dependencies=[Depends(require_operator)])
async def drain(worker_id: str, scheduler: SchedulerDep) -> dict:
    """Move the worker's functions away, hand its queue to the others, let running work finish, then it exits."""
    state = scheduler.drain(worker_id)
    if state is None:
        raise NotFound(f"no live worker {worker_id!r} is known to the scheduler", worker_id=worker_id)
    return {"worker_id": worker_id, "state": state.value}


@router.get("/metrics", include_in_schema=False)
async def metrics(scheduler: SchedulerDep) -> Response:
    return Response(generate_latest(scheduler.metrics.registry), media_type=CONTENT_TYPE_LATEST)
