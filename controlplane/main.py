"""The control plane service: event consumer, worker registry and its HTTP app (health, admin and tenant API)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import nats
from fastapi import FastAPI

from controlplane import dashboard
from controlplane.api import admin, scheduler, tenant
from controlplane.api.deps import ControlPlaneRuntime
from controlplane.callbacks import CallbackDispatcher
from controlplane.db.errors import DATABASE_ERRORS, domain_error
from controlplane.db.session import make_engine, make_sessionmaker
from controlplane.deadletters import DeadLetterMover
from controlplane.events import EventConsumer
from controlplane.registry import WorkerRegistry
from controlplane.scheduler.loop import SchedulerLoop
from lorafaas.artifacts import ArtifactStore
from lorafaas.http_errors import document_errors, install_error_handlers
from lorafaas.names import Names
from lorafaas.settings import Settings
from lorafaas.streams import ensure_streams

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """The control plane's app; its lifespan runs the event consumer and the worker registry beside the HTTP server."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database)
        sessions = make_sessionmaker(engine)
        nc = await nats.connect(
            settings.nats.url, name="lorafaas-controlplane", max_reconnect_attempts=-1, reconnect_time_wait=0.5
        )
        js = nc.jetstream()
        names = Names(settings.nats.prefix)
        await ensure_streams(js, names)
        # Gateway hooks (issue 6): signed callbacks of async results, and the dead-letter mover.
        callbacks = CallbackDispatcher(sessions, settings.callbacks)
        consumer = EventConsumer(js, engine, names, settings.nats, on_result=callbacks.on_result)
        deadletters = DeadLetterMover(nc, js, names)
        await deadletters.start()
        await callbacks.resume()
        cp = settings.controlplane
        registry = WorkerRegistry(nc, sessions, names, cp.worker_dead_after_s, cp.engine_stuck_after_s)
        tasks = [
            asyncio.create_task(consumer.run(), name="event-consumer"),
            asyncio.create_task(registry.run(), name="worker-registry"),
        ]
        app.state.scheduler = None
        if settings.scheduler.enabled:  # the deciding half: placement, routing table, lifecycle
            app.state.scheduler = SchedulerLoop(nc, js, sessions, names, settings)
            await app.state.scheduler.start()
            tasks.append(asyncio.create_task(app.state.scheduler.run(), name="scheduler"))
        app.state.sessions, app.state.nc, app.state.consumer, app.state.registry = sessions, nc, consumer, registry
        app.state.runtime = ControlPlaneRuntime(settings, sessions, ArtifactStore(settings.s3), nc, names)
        try:
            yield
        finally:
            consumer.stop()
            registry.stop()
            if app.state.scheduler is not None:
                app.state.scheduler.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            if app.state.scheduler is not None:
                await app.state.scheduler.close()
            await deadletters.stop()
            await callbacks.close()
            await nc.close()
            await engine.dispose()

    app = FastAPI(title="lorafaas control plane", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app, domain_error, DATABASE_ERRORS)
    app.include_router(admin.router)
    app.include_router(tenant.router)
    app.include_router(scheduler.router)
    document_errors(app)
    dashboard.mount(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {
            "status": "ok" if app.state.nc.is_connected else "degraded",
            "events_applied": app.state.consumer.applied,
            "events_dead_lettered": app.state.consumer.dead_lettered,
            "database_outages": app.state.consumer.outages,
        }

    return app
