"""The click drainer's account check and contact counts, read by PostgreSQL and the checked way
(found unpinned by mutation testing)."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from services.worker.clicks import STORE_JSON_FRESH
from shared import edge, ids
from tests.helpers import Tenant, random_phone, table_reads
from tests.worker.test_clicks import T0, click, contact_clicks, drain_all, message, xadd

async def test_clicks_of_an_account_that_does_not_exist_are_dropped(db: asyncpg.Pool, redis: Any, tenant: Tenant) -> None:
    """A stale edge key can name an account that is gone: its clicks are dropped (and the entry
    acknowledged), the others of the batch stored."""
    await drain_all(db, redis)
    left = await redis.xlen(edge.CLICK_STREAM)  # (acknowledged entries another run did not delete)
    ghost_account = await db.fetchval("SELECT coalesce(max(id), 0) + 1000000 FROM accounts")
    ghost = dict(click(tenant, at=T0), a=ghost_account)
    good = click(tenant, at=T0)
    for checked in (False, True):  # read by PostgreSQL, and the checked way (beside a malformed entry)
        ghost, good = dict(ghost, id=ids.click_id()), dict(good, id=ids.click_id())
        await xadd(redis, [ghost, good])
        if checked:
            await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: b"not json"})
        await drain_all(db, redis)
        assert await db.fetchval("SELECT count(*) FROM clicks WHERE id = $1", ghost["id"]) == 0
        assert await db.fetchval("SELECT count(*) FROM clicks WHERE id = $1", good["id"]) == 1
        assert await redis.xlen(edge.CLICK_STREAM) == left
        assert (await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP))["pending"] == 0


async def test_contact_counts_add_up_over_batches_and_bots_never_count(
    db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant
) -> None:
    phone = random_phone()
    mid = await message(api, tenant, phone)
    await drain_all(db, redis)
    for n in range(3):  # one human click per drain, and a bot each time
        await xadd(redis, [click(tenant, at=T0 + timedelta(minutes=n), message_id=mid),
                           click(tenant, at=T0 + timedelta(hours=1), message_id=mid, bot=True)])
        await drain_all(db, redis)
    # Two human clicks in one batch, drained the checked way (beside a legacy entry).
    await xadd(redis, [click(tenant, at=T0 - timedelta(minutes=1), message_id=mid),
                       click(tenant, at=T0 + timedelta(minutes=9), message_id=mid)])
    await redis.xadd(edge.CLICK_STREAM, {edge.LEGACY_BATCH_FIELD: b"[]"})
    await drain_all(db, redis)
    assert await contact_clicks(db, tenant, phone) == (5, T0 + timedelta(minutes=9))
    first = await db.fetchrow("SELECT clicked_at, source FROM message_clicks WHERE message_id = $1", mid)
    assert first["clicked_at"] == T0 - timedelta(minutes=1)


@pytest.mark.parametrize("checked", [False, True])
async def test_a_bot_alone_makes_no_engagement_and_no_contact_click(
    db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant, checked: bool
) -> None:
    """Read by PostgreSQL, or the checked way (a legacy entry beside it): stored flagged, never counts."""
    phone = random_phone()
    mid = await message(api, tenant, phone)
    await drain_all(db, redis)
    bot = click(tenant, at=T0, message_id=mid, bot=True)
    await xadd(redis, [bot])
    if checked:
        await redis.xadd(edge.CLICK_STREAM, {edge.LEGACY_BATCH_FIELD: b"[]"})
    await drain_all(db, redis)
    assert await db.fetchval("SELECT is_bot FROM clicks WHERE id = $1", bot["id"]) is True
    assert await db.fetchval("SELECT count(*) FROM message_clicks WHERE message_id = $1", mid) == 0
    assert await contact_clicks(db, tenant, phone) == (0, None)


async def test_a_later_click_never_replaces_the_first(
    db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant
) -> None:
    mid = await message(api, tenant, random_phone())
    await drain_all(db, redis)
    first, later = click(tenant, at=T0, message_id=mid), click(tenant, at=T0 + timedelta(seconds=1), message_id=mid)
    for c in (first, later):
        await xadd(redis, [c])
        await drain_all(db, redis)
    row = await db.fetchrow("SELECT click_id, clicked_at FROM message_clicks WHERE message_id = $1", mid)
    assert (row["click_id"], row["clicked_at"]) == (first["id"], T0)
    assert await db.fetchval("SELECT count(*) FROM clicks WHERE message_id = $1", mid) == 2  # kept as a raw click


async def test_a_batch_reads_each_clicked_message_by_its_key_whatever_the_table_size(db: asyncpg.Pool, tenant: Tenant) -> None:
    """The drain's statement (and the rollup trigger it fires) probes the messages of the clicks
    it stores one by one: with a join, the planner read the whole messages table per batch until
    it held a few hundred thousand rows. 6000 messages with fresh statistics, a batch of 2000
    clicks of which 1000 name a message: no scan of messages, every first click stored."""
    mids = [f"dx{i:06d}" for i in range(6000)]
    async with db.acquire() as conn:
        await conn.copy_records_to_table(
            "messages", columns=("id", "account_id", "list_id", "to_phone", "body", "sent_at"),
            records=[(m, tenant.account_id, tenant.list_id, f"+1416{i:07d}", "x", T0) for i, m in enumerate(mids)],
        )
        await conn.execute("ANALYZE messages")
        clicks = [edge.click_from(click(tenant, at=T0 + timedelta(seconds=i), message_id=mids[i] if i % 2 else None))
                  for i in range(2000)]
        batches = [orjson.dumps(clicks[i : i + 100]) for i in range(0, 2000, 100)]
        row, reads = await table_reads(conn, lambda: conn.fetchrow(STORE_JSON_FRESH, batches), "messages")
        assert (row["seen"], row["first_clicks"], reads["messages"][0]) == (2000, 1000, 0)
        assert await conn.fetchval(
            "SELECT count(*) FROM message_clicks WHERE message_id LIKE 'dx%' AND account_id = $1", tenant.account_id
        ) == 1000
