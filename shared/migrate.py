"""Versioned SQL migrations: each ``migrations/NNNN_name.sql`` is applied once, in order, inside a
transaction, and recorded in ``schema_migrations``. A session-level advisory lock makes concurrent
runs (several replicas starting at once) safe.

On a live database a migration's lock waits behind long transactions, and every query that needs
the table queues behind the waiting migration: the whole API stalls while it waits. So a
migration waits at most ``LOCK_TIMEOUT`` for a lock, then gives up, lets the queue drain for
``LOCK_RETRY_PAUSE`` and tries again, up to ``LOCK_ATTEMPTS`` times in all.

A migration that sets up something triggers keep up to date and then fills it from the rows
already there (the report rollup) has a ``BACKFILL`` line: what comes before it runs as any
migration does, and exports its snapshot while it holds its locks; what comes after runs on
another connection, in a transaction that reads that snapshot, after the first has committed. So
writers wait only for the DDL, not for the backfill, and every row is counted once: the backfill
sees exactly the rows written before the triggers existed (nothing could write meanwhile, the
locks were held), the triggers count every later one. The version is recorded with the backfill:
if that fails, the migration runs again from the start (its first part must be written to, and
empties what the triggers counted in the meantime).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from importlib import resources

import asyncpg

log = logging.getLogger("trackly.migrate")

LOCK_TIMEOUT = 2.0  # seconds
LOCK_RETRY_PAUSE = 1.0
LOCK_ATTEMPTS = 30
CONNECTION_ATTEMPTS = 3
BACKFILL = "-- trackly: backfill from the snapshot above\n"

# Arbitrary, fixed: "trackly" in ASCII, as one bigint.
_LOCK_ID = 0x747261636B6C79
# Held by a backfill's transaction until it commits, and taken by the DDL part of every migration
# with a backfill: a run whose connection (and with it _LOCK_ID) was lost mid-backfill is waited
# for, and its version then seen, instead of being undone by the next run. "backfill".
_BACKFILL_LOCK_ID = 0x6261636B66696C6C


def _migrations() -> list[tuple[str, str]]:
    files = resources.files("shared") / "migrations"
    found = sorted(f for f in files.iterdir() if f.name.endswith(".sql"))
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in found]


class _LostBetweenMigrations(Exception):
    """The run's connection (and with it the migration lock) was lost while a backfill committed
    its migration on another connection: the work is done; the rest needs the lock again."""


async def migrate(dsn: str) -> list[str]:
    """Bring the schema up to date; returns the versions applied by this call.

    A connection lost inside a migration fails the run (the migration was rolled back, nothing is
    recorded; run it again). One lost while a backfill committed its migration on its own connection
    (the backfill goes on without it) is replaced, up to ``CONNECTION_ATTEMPTS`` times, and the run
    goes on with the versions not recorded yet, under the lock again."""
    applied: list[str] = []
    for attempt in range(1, CONNECTION_ATTEMPTS + 1):
        conn = await asyncpg.connect(dsn)
        try:
            await _migrate_on(dsn, conn, applied)
            return applied
        except _LostBetweenMigrations:
            if attempt == CONNECTION_ATTEMPTS:
                raise
            log.warning("the migration's connection was lost after %s (attempt %d of %d); going on with a new one",
                        applied[-1], attempt, CONNECTION_ATTEMPTS)
        finally:
            await conn.close()
    raise AssertionError("unreachable")


async def _migrate_on(dsn: str, conn: asyncpg.Connection, applied: list[str]) -> None:
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'schema_migrations' AND column_name = 'checksum')"
        ):
            await conn.execute("ALTER TABLE schema_migrations ADD COLUMN checksum text")
        done = {r["version"]: r["checksum"] for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")}
        for version, sql in _migrations():
            if version in done:
                await _check_unchanged(conn, version, sql, done[version])
                continue
            await _apply(dsn, conn, version, sql)
            applied.append(version)
            if conn.is_closed():  # only a backfill's part can end with this connection gone (see _apply)
                raise _LostBetweenMigrations(version)
    finally:
        if not conn.is_closed():  # a connection that died took its lock with it
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)


def checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


async def _check_unchanged(conn: asyncpg.Connection, version: str, sql: str, recorded: str | None) -> None:
    """An applied migration's file must stay as it was applied: a database migrated before an edit
    never runs the edit (another built since does), and the two differ from then on, silently.
    Said loudly; recorded for the versions applied before checksums were."""
    digest = checksum(sql)
    if recorded is None:
        await conn.execute("UPDATE schema_migrations SET checksum = $2 WHERE version = $1", version, digest)
    elif recorded != digest:
        log.warning("migration %s was changed after this database applied it: the change is not in this database"
                    " (write a new migration instead of editing an applied one)", version)


async def _apply(dsn: str, conn: asyncpg.Connection, version: str, sql: str) -> None:
    schema, _, backfill = sql.partition(BACKFILL)
    digest = checksum(sql)
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            if backfill:
                await _apply_with_backfill(dsn, conn, version, schema, backfill, digest)
                return
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{int(LOCK_TIMEOUT * 1000)}ms'")
                await conn.execute(schema)
                await conn.execute("INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)", version, digest)
            return
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            # A deadlock: a writer that holds a table this migration locks next, and waits for one
            # it has locked already. The writer goes on; the migration tries again.
            if attempt == LOCK_ATTEMPTS:
                raise
            log.warning("migration %s could not take its locks (%s; attempt %d of %d); trying again",
                        version, type(exc).__name__, attempt, LOCK_ATTEMPTS)
            await asyncio.sleep(LOCK_RETRY_PAUSE)


async def before_backfill(version: str) -> None:
    """Called between the two parts of a migration with a backfill (tests pause or fail there)."""


async def _apply_with_backfill(
    dsn: str, conn: asyncpg.Connection, version: str, schema: str, backfill: str, digest: str
) -> None:
    reader = await asyncpg.connect(dsn)
    try:
        filling = reader.transaction(isolation="repeatable_read")
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{int(LOCK_TIMEOUT * 1000)}ms'")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _BACKFILL_LOCK_ID)
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)", version):
                return  # a run that lost its connection finished it meanwhile
            await conn.execute(schema)
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            await filling.start()
            await reader.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            # Granted once this transaction commits and releases it: sent now, so that no other
            # run can take it in between.
            handed_over = asyncio.ensure_future(reader.execute("SELECT pg_advisory_xact_lock($1)", _BACKFILL_LOCK_ID))
            handed_over.add_done_callback(lambda task: task.cancelled() or task.exception())  # raised below if at all
            await asyncio.sleep(0)  # the request is on its way before the commit below
        # The triggers are live, the locks released; the backfill reads the rows from before.
        try:
            await handed_over
            await before_backfill(version)
            await reader.execute(backfill)
            await reader.execute("INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)", version, digest)
        except BaseException:
            await filling.rollback()
            raise
        await filling.commit()
    finally:
        await reader.close()


class SchemaBehind(Exception):
    """The database lacks migrations this code has (``trackly migrate`` has not run yet)."""

    def __init__(self, missing: list[str]) -> None:
        more = ", ..." if len(missing) > 3 else ""
        super().__init__(f"{len(missing)} not applied ({', '.join(missing[:3])}{more}): run trackly migrate")


async def pending(dsn: str) -> list[str] | None:
    """Versions not applied yet, read without writing anything; None when the database has no
    schema at all (``schema_migrations`` does not exist)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await pending_on(conn)
    finally:
        await conn.close()


async def pending_on(conn: asyncpg.Connection, *, none_if_empty: bool = True) -> list[str] | None:
    """``pending`` on a connection the caller has (a pooled one); with ``none_if_empty=False``,
    every version when the database has no schema."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return None if none_if_empty else [version for version, _ in _migrations()]
    done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [version for version, _ in _migrations() if version not in done]


async def require_current(conn: asyncpg.Connection) -> None:
    """Raise ``SchemaBehind`` while the database lacks a migration this code has (with no schema at
    all, every one): what a gateway's readiness and a worker's start wait for."""
    missing = await pending_on(conn, none_if_empty=False)
    if missing:
        raise SchemaBehind(missing)
