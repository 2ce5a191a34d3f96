"""PostgreSQL pools (asyncpg). NUMERIC comes back as Decimal; jsonb is (de)coded with orjson."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import orjson

log = logging.getLogger("trackly.db")

# How long closing a pool waits for connections still in use before it cuts them.
CLOSE_TIMEOUT = 5.0
# PostgreSQL ends a session of ours left idle inside a transaction this long (seconds), which
# rolls it back and frees its locks. A gateway or worker whose machine died (or whose process
# froze: a paused VM, a partition) mid-transaction sends neither its next statement nor a FIN:
# its session held its rows (an Idempotency-Key's, a new contact's, clicks being drained) until
# TCP keepalive noticed, over two hours by default and never for a frozen process, and every
# retry of that key, or drain of those clicks, waited on them. Our transactions are never idle
# that long: between statements they do Python work or a Redis call (at most
# redis_client.SOCKET_TIMEOUT plus its CONNECT_TIMEOUT).
IDLE_IN_TRANSACTION_TIMEOUT = 30.0


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


class Pool(asyncpg.Pool):
    """An asyncpg pool whose ``release`` never turns finished work into an error.

    Releasing resets the connection for its next user. If that fails (the server died just after
    the caller's transaction committed), asyncpg has already terminated the connection, and the pool
    opens a new one when it is next needed; but the error would still be raised out of
    ``async with pool.acquire()``, after the commit, and a committed send would be answered as a
    failure (which a client retries into a duplicate). Here it is logged instead. An exception
    raised inside the block is not affected: it propagates as it was.
    """

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        try:
            await super().release(connection, timeout=timeout)
        except Exception:
            # Swallowed only when the pool has the connection back (asyncpg detaches the proxy
            # once the holder is free): not, say, for a connection of another pool.
            if getattr(connection, "_con", None) is not None:
                raise
            log.error("a connection could not be reset for reuse and was closed", exc_info=True)


class DatabaseUnavailable(ConnectionError):
    """The pool could not open a connection (PostgreSQL down, starting, full, or the database
    missing). A ConnectionError, so an OSError: whoever reports unreachable dependencies (the
    gateway answers 503 service_unavailable) handles it with the rest."""


async def _connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(*args, **kwargs)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}") from exc


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What the pool runs on a released connection after asyncpg has rolled back any open
    transaction: nothing. See ``create_pool``."""


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, **options: Any) -> asyncpg.Pool:
    """``asyncpg.create_pool`` with its own defaults, building ``Pool`` above (``options``:
    further ``asyncpg.create_pool`` arguments)."""
    arguments: dict[str, Any] = {
        # asyncpg.create_pool's own defaults (asyncpg >= 0.30, as pyproject requires), which the
        # Pool constructor does not have.
        "max_queries": 50_000,
        "max_inactive_connection_lifetime": 300.0,
        "loop": None,
        "connection_class": asyncpg.Connection,
        "record_class": asyncpg.Record,
        "init": _init_connection,
        "connect": _connect,
        "command_timeout": 60,
        # asyncpg's default reset sends "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
        # RESET ALL" on every release: a round trip per request (two for most), for session state
        # this code never creates (tests/test_architecture.py checks that no SQL sets any).
        "reset": _keep_session,
        "server_settings": {"idle_in_transaction_session_timeout": str(int(IDLE_IN_TRANSACTION_TIMEOUT * 1000))},
        **options,
    }
    return await Pool(dsn, min_size=min_size, max_size=max_size, **arguments)


async def create_pool_when_reachable(dsn: str, *, max_size: int = 10, **options: Any) -> asyncpg.Pool:
    """``create_pool``, but one that opens its connections on first use when PostgreSQL cannot be
    reached now: a service that reports its readiness (``/readyz``) starts anyway and reports it."""
    try:
        return await create_pool(dsn, max_size=max_size, **options)
    except OSError as exc:  # DatabaseUnavailable, or refused before asyncpg got to speak
        log.warning("PostgreSQL unreachable at start (%s); connecting on first use", exc)
        return await create_pool(dsn, min_size=0, max_size=max_size, **options)


async def connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    return conn


async def close_pool(pool: asyncpg.Pool, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close gracefully, but never wait forever: ``Pool.close`` waits for every connection to be
    released, and one held by a task that never finishes would hold the shutdown with it. After
    ``timeout`` the rest are terminated (their transactions roll back)."""
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except TimeoutError:
        log.error("connections still in use after %s s; terminating them", timeout)
        pool.terminate()


def statistics_problem(settings: dict[str, str]) -> str | None:
    """What keeps PostgreSQL's planner statistics from staying fresh, given the server's
    ``autovacuum`` and ``track_counts`` settings; None when nothing does."""
    off = [name for name in ("autovacuum", "track_counts") if settings.get(name) != "on"]
    if not off:
        return None
    return (
        f"{' and '.join(off)} {'is' if len(off) == 1 else 'are'} off: table statistics go stale unless ANALYZE is run"
        " by hand (after a big import above all); on a big account, reports and batch plans then pick plans made for"
        " tables thought tiny (seconds instead of milliseconds)"
    )


async def warn_if_statistics_stale(conn: asyncpg.Connection) -> str | None:
    """Log (and return) ``statistics_problem`` of the server ``conn`` is on."""
    rows = await conn.fetch("SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', 'track_counts')")
    problem = statistics_problem({r["name"]: r["setting"] for r in rows})
    if problem:
        log.warning("postgresql: %s", problem)
    return problem
