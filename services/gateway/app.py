"""The public API: an app factory whose lifespan owns the pools handed to handlers via state."""
from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route

from services.gateway import health
from services.gateway.http import JSONResponse, error_response
from services.gateway.metrics import GatewayMetrics, MetricsMiddleware
from services.gateway.routes import ROUTES, postbacks, reports
from shared import db
from shared.errors import ApiError, unavailable
from shared.redis_client import create_redis, warn_if_not_durable
from shared.settings import Settings


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "http_error")
    return error_response(ApiError(exc.status_code, code, str(exc.detail)))


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Nothing was acknowledged: writes publish to Redis before they commit, so the client retries.
    return error_response(unavailable())


async def _redis_refused(request: Request, exc: Exception) -> JSONResponse:
    """A command Redis refused. Redis before 7 reports a full Redis (OOM) inside a script (the
    per-message codes' SETs with TRACKLY_MESSAGE_CODE_DAYS) as a script error, not as OOM."""
    if "OOM command not allowed" in str(exc):
        return await _unavailable(request, exc)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_response(ApiError(500, "internal_error", "Internal server error"))


class TrailingSlash:
    """``/api/v2/offers/`` is ``/api/v2/offers``: a JSON API answers both rather than a bodiless
    307 redirect (which clients would have to follow with their POST body)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if len(path) > 1 and path.endswith("/"):
                scope = {**scope, "path": path.rstrip("/") or "/"}
        await self.app(scope, receive, send)


class AnswerWhenCut:
    """uvicorn cancels the requests still running when a graceful shutdown runs out (a request
    waiting on a row lock, a long report or import) and answers each that had not started its
    answer with a 500 in plain text: here they are answered 503 ``service_unavailable`` in the
    contract's error body (nothing was acknowledged: retry, a write with its Idempotency-Key), and
    the cancellation goes on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if not started:
                await error_response(unavailable("The gateway is stopping; retry shortly"))(
                    scope, receive, send)
            raise


def create_app(settings: Settings) -> Starlette:
    if not settings.database_url or not settings.redis_url:
        raise ValueError("create_app needs resolved database and redis URLs")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.settings = settings
        # Neither pool needs its server to be up now: the gateway starts, /readyz says what is
        # missing, and requests that need it answer 503 until it is back.
        app.state.db = await db.create_pool_when_reachable(settings.database_url, max_size=10)
        app.state.redis = create_redis(settings.redis_url)
        # arq's client (enqueue_job) on the same connections; arq.create_pool would ping first.
        app.state.arq = ArqRedis(pool_or_conn=app.state.redis.connection_pool)
        app.state.report_slots = reports.ReportSlots()
        app.state.window_job = None  # the attribution window whose job this process has enqueued
        app.state.postgres_for_postbacks = postbacks.Breaker()
        app.state.postback_tokens = {}  # token -> (account id, trusted until): postbacks._account_for
        # Published links (and the attribution jobs) live in Redis: say so if it may lose them.
        app.state.redis_persistence_problem = await warn_if_not_durable(app.state.redis)
        # What exists now (modules, routes, pools) lives as long as the process: out of the
        # collector's sight, a full collection during a bulk request walks that request's objects
        # only (it took ~25 ms, stalling every request in flight; well under 1 ms frozen).
        gc.freeze()
        try:
            yield
        finally:
            await app.state.arq.aclose()
            await app.state.redis.aclose()
            await db.close_pool(app.state.db)

    routes = [
        Route("/healthz", health.healthz),
        Route("/readyz", health.readyz),
        Route("/readyz/postbacks", health.readyz_postbacks),
        Route("/metrics", health.metrics),
        *ROUTES,
    ]
    metrics = GatewayMetrics()
    app = Starlette(
        routes=routes,
        middleware=[Middleware(TrailingSlash), Middleware(MetricsMiddleware, metrics=metrics, routes=routes),
                    Middleware(AnswerWhenCut)],
        lifespan=lifespan,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            RedisConnectionError: _unavailable,
            RedisTimeoutError: _unavailable,
            # A full Redis (maxmemory, noeviction) refuses the publish: retry once it has room.
            RedisOutOfMemoryError: _unavailable,
            RedisResponseError: _redis_refused,
            OSError: _unavailable,
            asyncpg.PostgresConnectionError: _unavailable,
            asyncpg.InterfaceError: _unavailable,
            # A connection left unusable by a server that died mid-operation ("cannot switch to state").
            asyncpg.exceptions.InternalClientError: _unavailable,
            # A statement PostgreSQL stopped (an operator's lock_timeout or statement_timeout, or
            # pg_cancel_backend on a query stuck behind a lock): its transaction rolled back, as
            # when the pool's command_timeout stops one (a TimeoutError, so an OSError): retry.
            asyncpg.QueryCanceledError: _unavailable,
            asyncpg.LockNotAvailableError: _unavailable,
            Exception: _unexpected,
        },
    )
    app.router.redirect_slashes = False
    app.state.metrics = metrics
    return app
