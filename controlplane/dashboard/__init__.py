"""The usage and billing dashboard, served by the control plane under ``/dashboard``.

``mount(app)`` adds the pages, the static files and the residency tracker (the latest worker
reports, for "where is my adapter") to the control plane's app.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from controlplane.dashboard.residency import ResidencyTracker


def mount(app: FastAPI) -> None:
    """Serve the dashboard from ``app``; call after the app is built, before it starts."""
    from controlplane.dashboard.routes import router

    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=Path(__file__).parent / "static"), name="dashboard-static")
    inner = app.router.lifespan_context

    # The tracker needs the NATS connection the app's own lifespan opens, so it starts inside it.
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            tracker = ResidencyTracker()
            app.state.dashboard_residency = tracker
            await tracker.start(app.state.runtime.nc, app.state.runtime.names)
            try:
                yield
            finally:
                await tracker.stop()

    app.router.lifespan_context = lifespan
