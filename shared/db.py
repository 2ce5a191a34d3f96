"""PostgreSQL pools (asyncpg). NUMERIC comes back as Decimal; jsonb is (de)coded with orjson."""
from __future__ import annotations

import asyncio
import logging

import asyncpg
import orjson

log = logging.getLogger("trackly.db")

# How long closing a pool waits for connections still in use before it cuts them.
CLOSE_TIMEOUT = 5.0


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, command_timeout=60
    )


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
