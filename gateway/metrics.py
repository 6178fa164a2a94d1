"""Prometheus metrics of the gateway, on ``/metrics``.

Requests by route template and status, queue depth per function (sampled at each
admission), and TTFT / end-to-end latency histograms. Each app gets its own registry so
several gateways can live in one process (tests) without duplicate-metric errors.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lorafaas_gateway_requests_total",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "lorafaas_gateway_request_seconds",
            "HTTP handling time by route (streams: until headers)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "lorafaas_gateway_queue_depth",
            "Invocations queued or running per function, at the last admission",
            ["function"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "lorafaas_gateway_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.latency = Histogram(
            "lorafaas_gateway_invocation_seconds",
            "End-to-end latency of sync and streamed invocations",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def install(self, app: FastAPI) -> None:
        # A plain ASGI middleware: BaseHTTPMiddleware would cost a task and a stream per request.
        app.add_middleware(_RequestMetrics, metrics=self)


class _RequestMetrics:
    def __init__(self, app, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the template, never raw ids
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
