"""The control plane service: event consumer plus its HTTP app (health, and the admin API)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import nats
from fastapi import FastAPI

from controlplane.db.session import make_engine, make_sessionmaker
from controlplane.events import EventConsumer
from lorafaas.http_errors import install_error_handlers
from lorafaas.names import Names
from lorafaas.settings import Settings
from lorafaas.streams import ensure_streams

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """The control plane's app; its lifespan runs the event consumer beside the HTTP server."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database)
        sessions = make_sessionmaker(engine)
        nc = await nats.connect(settings.nats.url, name="lorafaas-controlplane", max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        js = nc.jetstream()
        names = Names(settings.nats.prefix)
        await ensure_streams(js, names)
        consumer = EventConsumer(js, sessions, names, settings.nats)
        task = asyncio.create_task(consumer.run(), name="event-consumer")
        app.state.sessions, app.state.nc, app.state.consumer = sessions, nc, consumer
        try:
            yield
        finally:
            consumer.stop()
            await asyncio.gather(task, return_exceptions=True)
            await nc.close()
            await engine.dispose()

    app = FastAPI(title="lorafaas control plane", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok" if app.state.nc.is_connected else "degraded", "events_applied": app.state.consumer.applied}

    return app
