"""Closing a pool never waits forever for a connection that is never released."""
from __future__ import annotations

import asyncio
import time

from shared import db
from shared.settings import Settings


async def test_close_pool_cuts_connections_still_in_use_after_its_timeout(settings: Settings) -> None:
    pool = await db.create_pool(settings.database_url, max_size=2)
    held = asyncio.Event()

    async def stuck() -> None:
        async with pool.acquire():
            held.set()
            await asyncio.Event().wait()  # never released, as by a task that hangs

    task = asyncio.create_task(stuck())
    await held.wait()
    start = time.monotonic()
    # (bounded here too: a regression must fail this test, not hang the session)
    await asyncio.wait_for(db.close_pool(pool, timeout=0.5), 5)
    assert time.monotonic() - start < 3
    assert pool.is_closing()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_close_pool_is_graceful_when_nothing_is_held(settings: Settings) -> None:
    pool = await db.create_pool(settings.database_url)
    assert await pool.fetchval("SELECT 1") == 1
    await db.close_pool(pool, timeout=5)
    assert pool.is_closing()
