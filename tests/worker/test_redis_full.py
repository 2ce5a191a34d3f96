"""A full Redis (maxmemory reached, ``noeviction``: every write that could grow it answers OOM)."""
from __future__ import annotations

from typing import Any

import asyncpg

from shared import edge
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
