"""Prometheus metrics of the service (prometheus-client), served at /metrics when METRICS=on.

- requests: `http_requests_total{route, method, status}` and `http_request_duration_seconds{route, method}`
  (a histogram), counted by a plain ASGI middleware under the route's template (`/user/{id}`, so ids
  never become labels; "unmatched" for paths no route serves);
- recommendations: `recommendations_served_total` (responses of /post/recommendations with status 200);
- refresh: `refresh_cycles_total`, `refresh_failures_total`, `refresh_consecutive_failures`,
  `refresh_last_success_timestamp_seconds`, `refresh_lag_seconds` (from the latest feed event merged to
  the service's clock, on the feed's naive time);
- model: `model_info{path, trained_until}` (always 1; trained_until, the end of its data, is its
  version) and `model_age_seconds` (since the model file was written).

Under gunicorn each worker is a process: with PROMETHEUS_MULTIPROC_DIR set (an empty folder, before
the service starts) prometheus-client keeps the values in files there and /metrics adds up every
worker's (its documented multiprocess mode; gunicorn.conf.py marks a dead worker's files). Without it,
/metrics shows the one process that answers.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

RECOMMEND_ROUTE = "/post/recommendations/"
# Latency buckets around the service's range (a recommendation takes milliseconds, a cold table read more).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The service's metrics in one registry (one per app, so tests can build several apps)."""

    def __init__(self) -> None:
        # In multiprocess mode the values live in files and the registry is built per scrape (collect).
        self.registry = None if multiprocess_dir() else CollectorRegistry()
        kw: dict[str, Any] = {"registry": self.registry}
        self.requests = Counter(
            "http_requests", "HTTP requests answered", ["route", "method", "status"], **kw
        )
        self.latency = Histogram(
            "http_request_duration_seconds", "time to answer", ["route", "method"], buckets=BUCKETS, **kw
        )
        self.recommendations = Counter("recommendations_served", "recommendation lists answered", **kw)
        self.refresh_cycles = Counter("refresh_cycles", "refresh cycles run (failed ones too)", **kw)
        self.refresh_failures = Counter("refresh_failures", "refresh cycles that failed", **kw)
        self.refresh_consecutive = Gauge(
            "refresh_consecutive_failures",
            "failed cycles since the last success",
            multiprocess_mode="max",
            **kw,
        )
        self.refresh_success = Gauge(
            "refresh_last_success_timestamp_seconds",
            "when a cycle last succeeded",
            multiprocess_mode="max",
            **kw,
        )
        self.refresh_lag = Gauge(
            "refresh_lag_seconds",
            "the service's clock minus the latest feed event merged (naive times)",
            multiprocess_mode="min",
            **kw,
        )
        self.model_info = Gauge(
            "model_info", "the model file served", ["path", "trained_until"], multiprocess_mode="max", **kw
        )
        self.model_age = Gauge(
            "model_age_seconds", "since the model file was written", multiprocess_mode="min", **kw
        )
        self._model_written: float | None = None

    def model_loaded(self, path: str, trained_until: str) -> None:
        self.model_info.labels(path=path, trained_until=trained_until).set(1)
        try:
            self._model_written = os.path.getmtime(path)
        except OSError:
            self._model_written = None

    def refresh_done(self, *, failed: bool, consecutive: int, lag_seconds: float | None) -> None:
        self.refresh_cycles.inc()
        self.refresh_consecutive.set(consecutive)
        if failed:
            self.refresh_failures.inc()
        else:
            self.refresh_success.set(time.time())
        if lag_seconds is not None:
            self.refresh_lag.set(lag_seconds)

    def exposition(self) -> bytes:
        """The text format of every metric (every worker's, in multiprocess mode)."""
        if self._model_written is not None:
            self.model_age.set(time.time() - self._model_written)
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


class MetricsMiddleware:
    """Counts each HTTP response by route template, method and status, and times it (plain ASGI: no
    per-request objects beyond a closure, so it costs little next to the request itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The app's lifespan sets app.state.metrics (None with METRICS=off): settings are read at startup.
        metrics = getattr(scope["app"].state, "metrics", None) if scope["type"] == "http" else None
        if metrics is None:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # an exception before the response started is answered 500 by the server

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            metrics.requests.labels(route=template, method=method, status=str(status)).inc()
            metrics.latency.labels(route=template, method=method).observe(time.perf_counter() - started)
            if status == 200 and template.rstrip("/") == RECOMMEND_ROUTE.rstrip("/"):
                metrics.recommendations.inc()


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: the Prometheus text format; 404 with METRICS=off."""
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is None:
        return Response('{"detail":"metrics are off (METRICS=off)"}', 404, media_type="application/json")
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
