"""Gateway metrics: a count and a latency histogram per route and status, and the state of the
pipeline behind the API, read when scraped.

The registry belongs to the app (no import-time globals), so tests and several apps in one
process do not share counters.

The pipeline gauges (``PIPELINE``) say whether what the gateway accepted is being worked off:
postbacks stored and not yet attributed, and the oldest of them (the worker takes a window's
postbacks every ``shared.jobs.ATTRIBUTION_WINDOW`` seconds, so this stays near a second while
workers keep up: an alert on it catches workers down or behind long before anyone notices
missing revenue), the arq jobs queued for the workers, the postbacks spooled in Redis while
PostgreSQL could not store them (and those it refused since), and the gateway's own database pool.
They are read from PostgreSQL and Redis at each scrape, each within ``READ_TIMEOUT``; one that
cannot be read is left out of that scrape (not shown at its last value, which would say all is
well). The click stream's gauges are the redirect's (``trackly_click_stream_*``).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from typing import Any

from arq.constants import default_queue_name
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Match

from services.gateway.health import settled
from shared.postback_store import SPOOL_REFUSED, SPOOL_STREAM

READ_TIMEOUT = 2.0
# Counted up to this many: a backlog of millions is counted in a bounded time, and past this
# many the figure that matters is the age of the oldest.
COUNT_CAP = 100_000

_POSTBACKS_WAITING = f"""
SELECT (SELECT count(*) FROM (SELECT 1 FROM postbacks WHERE processed_at IS NULL AND NOT is_duplicate
                              LIMIT {COUNT_CAP}) w) AS waiting,
       extract(epoch FROM now() - (SELECT min(received_at) FROM postbacks
                                   WHERE processed_at IS NULL AND NOT is_duplicate)) AS oldest
"""

PIPELINE = {
    "trackly_postbacks_waiting": (
        f"Postbacks stored and not yet attributed by a worker (counted up to {COUNT_CAP:,})"),
    "trackly_postbacks_waiting_oldest_seconds": (
        "Age of the oldest postback not yet attributed (0 when none waits)"),
    "trackly_worker_queue_jobs": "Jobs in the arq queue, due or deferred",
    "trackly_postback_spool": (
        "Postbacks received while PostgreSQL could not store them, kept in Redis until a worker stores them"),
    "trackly_postback_spool_refused": (
        "Spooled postbacks PostgreSQL refused, set aside in Redis for the operator (trk:postback-spool:refused)"),
}


class _Pipeline(Collector):
    """Yields the gauges of the latest refresh (``GatewayMetrics.refresh``)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.pool: tuple[int, int] | None = None  # (busy, idle) connections

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, value in self.values.items():
            yield GaugeMetricFamily(name, PIPELINE[name], value=value)
        if self.pool is not None:
            family = GaugeMetricFamily(
                "trackly_gateway_db_connections", "Connections of the gateway's PostgreSQL pool", labels=("state",))
            family.add_metric(("busy",), self.pool[0])
            family.add_metric(("idle",), self.pool[1])
            yield family


async def _within(read: Awaitable[Any]) -> Any:
    """``read``'s result, or None if it failed or took longer than READ_TIMEOUT."""
    task = await settled(read, READ_TIMEOUT)
    return None if task is None or task.exception() is not None else task.result()


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "trackly_gateway_requests", "HTTP requests answered", ("route", "method", "status"), registry=self.registry
        )
        self.latency = Histogram(
            "trackly_gateway_request_seconds", "Time to answer a request", ("route",), registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.pipeline = _Pipeline()
        self.registry.register(self.pipeline)

    async def refresh(self, db: Any, redis: Any) -> None:
        """Read the pipeline gauges (see the module's docstring)."""
        postbacks, queued, spooled, refused = await asyncio.gather(
            _within(db.fetchrow(_POSTBACKS_WAITING)), _within(redis.zcard(default_queue_name)),
            _within(redis.xlen(SPOOL_STREAM)), _within(redis.xlen(SPOOL_REFUSED)))
        values: dict[str, float] = {}
        if spooled is not None and refused is not None:
            values["trackly_postback_spool"] = float(spooled)
            values["trackly_postback_spool_refused"] = float(refused)
        if postbacks is not None:
            values["trackly_postbacks_waiting"] = float(postbacks["waiting"])
            values["trackly_postbacks_waiting_oldest_seconds"] = max(0.0, float(postbacks["oldest"] or 0))
        if queued is not None:
            values["trackly_worker_queue_jobs"] = float(queued)
        self.pipeline.values = values
        size, idle = db.get_size(), db.get_idle_size()
        self.pipeline.pool = (size - idle, idle)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: labels by route template (``/api/v2/offers/{offer_id}``), never by
    raw path, so ids cannot blow up the label space."""

    def __init__(self, app: Any, metrics: GatewayMetrics, routes: list[Any]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route(self, scope: dict[str, Any]) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return route.path
        return "unmatched"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = self._route(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
