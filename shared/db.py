"""PostgreSQL pools (asyncpg). NUMERIC comes back as Decimal; jsonb is (de)coded with orjson."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import orjson

from shared.logs import Throttled

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
# Seconds a pool that PostgreSQL refused a connection for lack of room (see Pool) serves callers
# with the connections it has before it tries a new one.
SERVER_FULL_PAUSE = 1.0
_report_server_full = Throttled(
    log, logging.WARNING, "postgresql takes no more connections (too_many_connections): waiting for this pool's own")


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


class Pool(asyncpg.Pool):
    """An asyncpg pool whose ``release`` never turns finished work into an error, and whose callers
    wait for its own connections when PostgreSQL takes no more (``_acquire``, below).

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
        finally:
            if self._returned is not None:
                async with self._returned:
                    self._returned.notify(1)

    # When PostgreSQL takes no more connections (max_connections reached, or the role's or the
    # database's CONNECTION LIMIT), asyncpg's pool still opens one for every caller that finds none
    # of its open connections free, and each refusal failed its request (503), while the pool's
    # own connections would have served them a moment later. Here a refusal makes the pool stop
    # opening connections for SERVER_FULL_PAUSE: callers that would have opened one wait for one
    # of the pool's own to come back instead, as at the pool's size. After the pause one caller
    # at a time tries a new connection (a refused connect still costs the server a process), and
    # once one opens, connections are opened as usual again. With none of its connections open
    # the pool has nothing to wait for: the refusal is raised (DatabaseUnavailable) as before.
    # Waiters are served as connections come back, not strictly in arrival order; each looks
    # again at least every SERVER_FULL_PAUSE.
    _full_until = 0.0  # loop time until which no new connection is tried
    _trying = False  # a caller is trying a new connection on a server that was full
    _returned: asyncio.Condition | None = None  # notified on each release

    def _has_open(self) -> bool:
        return any(holder.is_connected() for holder in self._holders)

    async def _get_new_connection(self) -> Any:
        # Every connect of the pool comes here (asyncpg's PoolConnectionHolder.connect), for
        # callers already queued inside asyncpg's acquire too.
        loop = asyncio.get_running_loop()
        if self._has_open() and (loop.time() < self._full_until or self._trying):
            raise _UseOwnConnections  # (the holder goes back to the pool's queue)
        trying = self._full_until > 0
        self._trying = self._trying or trying
        try:
            connection = await super()._get_new_connection()
        except DatabaseUnavailable as exc:
            if isinstance(exc.__cause__, asyncpg.TooManyConnectionsError):
                self._full_until = loop.time() + SERVER_FULL_PAUSE
                _report_server_full()
            raise
        finally:
            if trying:
                self._trying = False
        if trying:  # (a connect begun before the refusals proves nothing)
            self._full_until = 0.0  # the server took one after its pause: connections are opened as usual
        return connection

    async def _acquire(self, timeout: float | None) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise asyncio.TimeoutError
            try:
                return await super()._acquire(remaining)
            except _UseOwnConnections:
                pass
            except DatabaseUnavailable as exc:
                if not isinstance(exc.__cause__, asyncpg.TooManyConnectionsError) or not self._has_open():
                    raise
            await self._wait_returned(max(self._full_until - loop.time(), 0.01), remaining)

    async def _wait_returned(self, pause: float, remaining: float | None) -> None:
        if self._returned is None:
            self._returned = asyncio.Condition()
        async with self._returned:
            try:
                await asyncio.wait_for(self._returned.wait(), pause if remaining is None else min(pause, remaining))
            except TimeoutError:
                pass


class _UseOwnConnections(Exception):
    """Raised instead of opening a connection while PostgreSQL is full (see ``Pool``)."""


class DatabaseUnavailable(ConnectionError):
    """The pool could not open a connection (PostgreSQL down, starting, full, or the database
    missing). A ConnectionError, so an OSError: whoever reports unreachable dependencies (the
    gateway answers 503 service_unavailable) handles it with the rest."""


# What PostgreSQL raises when it cannot take a write now, though the write itself is fine: the
# server unreachable, full, starting or stopping (a restart, a failover), out of disk, read-only
# (a primary demoted by a failover), a connection lost mid-way, or a statement stopped (a timeout,
# an operator's cancel). An OSError covers DatabaseUnavailable and timeouts.
POSTGRES_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.LockNotAvailableError,
)


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
