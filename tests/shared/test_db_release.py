"""A connection that cannot be reset when it is released (its server died just after the work
committed) never turns the committed work into an error."""
from __future__ import annotations

import secrets

import asyncpg
import pytest

from shared import db
from shared.settings import Settings


async def _unresettable(conn: asyncpg.Connection) -> None:
    # What asyncpg raised in a black-box audit when PostgreSQL was killed mid-release.
    raise asyncpg.exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress")


async def test_release_failure_after_commit_is_not_the_callers_error(settings: Settings) -> None:
    table = f"release_probe_{secrets.token_hex(4)}"
    plain = await db.create_pool(settings.database_url, max_size=1)
    failing = await db.create_pool(settings.database_url, max_size=1, reset=_unresettable)
    try:
        await plain.execute(f"CREATE TABLE {table} (n int)")
        async with failing.acquire() as conn, conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert await failing.execute(f"INSERT INTO {table} VALUES (2)") == "INSERT 0 1"  # Pool.execute releases too
        # The connection that could not be reset was closed; the pool opened another one.
        assert await plain.fetchval(f"SELECT array_agg(n ORDER BY n) FROM {table}") == [1, 2]
        # An error raised inside the block still propagates as it was.
        with pytest.raises(asyncpg.UndefinedTableError):
            async with failing.acquire() as conn:
                await conn.execute("SELECT * FROM no_such_table_here")
        # Only a release that gave the connection back is quiet: a real misuse still raises.
        stranger = await plain.acquire()
        with pytest.raises(asyncpg.InterfaceError, match="not a member of this pool"):
            await failing.release(stranger)
        await plain.release(stranger)
    finally:
        await plain.execute(f"DROP TABLE IF EXISTS {table}")
        await db.close_pool(failing)
        await db.close_pool(plain)
