"""Liveness, readiness (PostgreSQL and Redis answer, the schema is this code's) and Prometheus metrics."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from services.gateway.http import JSONResponse
from shared import migrate

T = TypeVar("T")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def settled(check: Awaitable[T], timeout: float) -> asyncio.Future[T] | None:
    """``check`` as a finished future (its result or its exception), or None if it took longer
    than ``timeout``. Unlike ``asyncio.wait_for``, a check that does not end is left to be
    cancelled in the background instead of being waited for: cancelling a query to a PostgreSQL
    that stopped answering waits on that same PostgreSQL."""
    task = asyncio.ensure_future(check)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():  # overdue, or the caller itself was cancelled
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nobody awaits it
    return task if done else None


async def _probe(check: Awaitable[object], timeout: float = 2.0) -> str:
    """"ok", or why not, within ``timeout`` (see ``settled``)."""
    task = await settled(check, timeout)
    if task is None:
        return "error: TimeoutError"
    exc = task.exception()
    if exc is None:
        return "ok"
    return f"behind: {exc}" if isinstance(exc, migrate.SchemaBehind) else f"error: {type(exc).__name__}"


async def _asked(request: Request, ask: Callable[[asyncpg.Connection], Awaitable[object]]) -> None:
    """``ask`` on a pooled connection; or, when every connection the pool may open is in use
    (requests queued behind a row lock, a burst), on a connection of its own, closed after: a busy
    pool is not an unreachable PostgreSQL, and a 503 for it took each gateway out of its load
    balancer at once (all their requests wait on the same lock), the postbacks that would have
    waited with them refused at the balancer."""
    db = request.app.state.db
    if db.get_idle_size() or db.get_size() < db.get_max_size():
        async with db.acquire() as conn:
            await ask(conn)
        return
    conn = await asyncpg.connect(request.app.state.settings.database_url)
    try:
        await ask(conn)
    finally:
        await conn.close()


async def _schema_current(request: Request) -> None:
    """Raises ``SchemaBehind`` while the database lacks a migration this code has: a gateway of a new
    release deployed before ``trackly migrate`` ran would answer 500s on what the migration adds.
    Once current, it stays so (nothing undoes a migration): not asked again."""
    state = request.app.state
    if getattr(state, "schema_current", False):
        return
    await _asked(request, migrate.require_current)
    state.schema_current = True


async def _checks(request: Request) -> dict[str, str]:
    postgres, redis = await asyncio.gather(
        _probe(_asked(request, lambda conn: conn.fetchval("SELECT 1"))), _probe(request.app.state.redis.ping())
    )
    checks = {"postgres": postgres, "redis": redis}
    if postgres == "ok":
        checks["schema"] = await _probe(_schema_current(request))
    return checks


def _answer(checks: dict[str, str], ready: bool) -> Response:
    return JSONResponse({"status": "ready" if ready else "unavailable", **checks}, status_code=200 if ready else 503)


async def readyz(request: Request) -> Response:
    checks = await _checks(request)
    return _answer(checks, all(v == "ok" for v in checks.values()))


async def readyz_postbacks(request: Request) -> Response:
    """Readiness for the postback receiver alone: with PostgreSQL down it still takes postbacks
    (spooled in Redis), so it needs Redis, and a schema that is this code's when PostgreSQL
    answers (a gateway of a new release before ``trackly migrate`` would fail their store)."""
    checks = await _checks(request)
    return _answer(checks, checks["redis"] == "ok" and checks.get("schema", "ok") == "ok")


async def metrics(request: Request) -> Response:
    state = request.app.state
    await state.metrics.refresh(state.db, state.redis)
    return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
