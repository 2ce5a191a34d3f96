"""A full Redis (maxmemory reached, ``noeviction``: every write that could grow it answers OOM):
``redis`` here is a Redis server of this module's own."""
from __future__ import annotations

from typing import Any

import asyncpg

from shared import edge
from tests.helpers import own_redis_server, redis_on_own_server  # noqa: F401 (fixtures: ``redis`` is a server of this module's own)
from tests.helpers import Tenant, redis_full
from tests.worker.test_clicks import T0, click, drain_all, xadd


async def test_clicks_are_drained_while_redis_is_full(db: asyncpg.Pool, redis: Any, tenant: Tenant) -> None:
    """Draining is what frees a full Redis (each stored entry is deleted from the stream): the
    acknowledged clicks waiting there must still reach PostgreSQL, or Redis stays full for good."""
    await drain_all(db, redis)
    waiting = [click(tenant, at=T0), click(tenant, at=T0)]
    await xadd(redis, waiting)
    async with redis_full(redis):
        assert await drain_all(db, redis) == 2
    stored = await db.fetchval("SELECT count(*) FROM clicks WHERE id = ANY($1::text[])", [c["id"] for c in waiting])
    assert stored == 2
    assert (await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP))["pending"] == 0


async def test_a_drainer_started_while_redis_is_full_drains(db: asyncpg.Pool, redis: Any, tenant: Tenant) -> None:
    """A worker started (or restarted) while Redis is full cannot set its heartbeat (a SET needs
    memory): it drains all the same, since nothing else would free Redis."""
    import asyncio

    from services.worker.clicks import run_drainer

    await drain_all(db, redis)
    waiting = [click(tenant, at=T0), click(tenant, at=T0)]
    await xadd(redis, waiting)
    ids = [c["id"] for c in waiting]
    async with redis_full(redis):
        task = asyncio.create_task(run_drainer({"db": db, "redis_client": redis, "click_consumer": "started-full"}))
        try:
            for _ in range(100):
                if await db.fetchval("SELECT count(*) FROM clicks WHERE id = ANY($1::text[])", ids) == 2:
                    break
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert await db.fetchval("SELECT count(*) FROM clicks WHERE id = ANY($1::text[])", ids) == 2
