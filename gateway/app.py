"""The gateway's app factory: settings in, a FastAPI app with its NATS and database runtime out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from starlette.types import ASGIApp, Receive, Scope, Send

from controlplane.db.errors import DATABASE_ERRORS, domain_error
from gateway.auth import KeyCache
from gateway.db import GuardedSessions, make_gateway_engine
from gateway.dispatch import Dispatcher
from gateway.metrics import GatewayMetrics
from gateway.openai_routes import router as openai_router
from gateway.quotas import QuotaGuard
from gateway.router import PlacementRouter
from gateway.routes import router
from gateway.service import InvocationService
from gateway.tokens import TokenCounter
from lorafaas.artifacts import ArtifactStore
from lorafaas.http_errors import document_errors, install_error_handlers
from lorafaas.names import Names
from lorafaas.settings import Settings
from lorafaas.streams import ensure_streams

FORM_TYPE = b"application/x-www-form-urlencoded"


class JsonBodies:
    """ASGI middleware: every gateway body is JSON, so one sent without a content type, or with the
    form type ``curl -d`` sends by default, is read as JSON (the docs' curl examples rely on it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            given = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if not given or given.split(b";")[0].strip().lower() == FORM_TYPE:
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


@dataclass
class GatewayRuntime:
    settings: Settings
    nc: NATS
    invocations: InvocationService
    metrics: GatewayMetrics
    keys: KeyCache


async def connect_nats(settings: Settings, name: str) -> NATS:
    return await nats.connect(
        settings.nats.url,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
    )


def create_app(settings: Settings) -> FastAPI:
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        names = Names(settings.nats.prefix)
        engine = make_gateway_engine(settings.database)
        nc = await connect_nats(settings, "lorafaas-gateway")
        js = nc.jetstream()
        await ensure_streams(js, names)
        quota_guard = QuotaGuard(settings.controlplane)
        await quota_guard.listen(nc, names)
        key_cache = KeyCache(settings.controlplane.key_cache_ttl_s)
        await key_cache.listen(nc, names)
        router = PlacementRouter(js, names, settings.scheduler, metrics.registry)
        await router.start()
        service = InvocationService(
            GuardedSessions(engine),
            Dispatcher(nc, js, names, router),
            settings,
            TokenCounter(ArtifactStore(settings.s3)),
            metrics,
            quota_guard,
        )
        app.state.runtime = GatewayRuntime(settings, nc, service, metrics, key_cache)
        try:
            yield
        finally:
            await router.stop()
            await nc.close()
            await engine.dispose()

    app = FastAPI(
        title="lorafaas gateway",
        version="0.1.0",
        description="Invoke LoRA functions on shared backbones; pay per token. Native and OpenAI-compatible APIs.",
        lifespan=lifespan,
    )
    install_error_handlers(app, domain_error, DATABASE_ERRORS)
    app.add_middleware(JsonBodies)
    metrics.install(app)
    app.include_router(router)
    app.include_router(openai_router)
    document_errors(app)
    return app
