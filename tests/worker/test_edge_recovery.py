"""A Redis that lost its data (restarted empty: no persistence, a new node, a failover to an empty
replica) is given the edge back by the worker, without an operator: until then every short link
and message code answers 404 at the edge (README: "`trackly admin republish` rebuilds the edge's
Redis from PostgreSQL ... if Redis lost its data"; nothing ran it)."""
from __future__ import annotations

import asyncio

import pytest

from services.worker import edge_offers
from shared import edge
from tests.helpers import make_link, make_offer
from tests.redirect.conftest import running_edge

EDGE_MARK = edge.EDGE_MARK  # what the worker leaves in a Redis whose edge keys it has all written


async def _lose_everything(redis, keys: list[str]) -> None:
    """What a Redis restarted empty holds of this test's keys (the run's Redis is shared: the
    whole database is not flushed)."""
    await redis.delete(EDGE_MARK, *keys)


async def test_the_worker_gives_an_emptied_redis_its_links_back(api, db, redis, settings, tenant):
    offer = await make_offer(api, tenant)
    link = await make_link(api, tenant, offer["id"])
    row = await db.fetchrow("SELECT * FROM links WHERE id = $1", link["linkId"])
    keys = [key for key, _ in edge.link_entries(row)] + [edge.offer_key(offer["id"])]
    published = await redis.mget(keys)
    assert all(published)
    ctx = {"db": db, "redis_client": redis, "settings": settings}

    await _lose_everything(redis, keys)
    async with running_edge(settings) as edge_app:
        assert (await edge_app.get(link["shortUrl"])).status_code == 404  # the edge lost it
        # The worker's periodic check (every edge_offers.CHECK_INTERVAL s), a few turns.
        for _ in range(3):
            await edge_offers.check_edge(ctx)
        assert await redis.mget(keys) == published
        # And only once: a Redis that keeps its data is left alone.
        assert await edge_offers.ensure_complete(db, redis) is None

        await asyncio.sleep(settings.link_cache_ttl + 0.1)  # the edge's cached miss expires
        assert (await edge_app.get(link["shortUrl"])).status_code == 302


async def test_a_redis_restarted_from_an_older_snapshot_gets_what_it_lacks(api, db, redis, settings, tenant):
    """A restart from an RDB snapshot keeps the mark of the pass before it, but not the links
    published since the snapshot: the mark names the Redis process (its run id), so it counts as
    a Redis that lost data."""
    offer = await make_offer(api, tenant)
    ctx = {"db": db, "redis_client": redis, "settings": settings}
    await edge_offers.check_edge(ctx)  # the edge complete, as of this process
    link = await make_link(api, tenant, offer["id"])  # published after the snapshot
    row = await db.fetchrow("SELECT * FROM links WHERE id = $1", link["linkId"])
    keys = [key for key, _ in edge.link_entries(row)]
    published = await redis.mget(keys)
    await redis.delete(*keys)
    await redis.set(EDGE_MARK, b"done:" + b"0" * 40)  # the snapshot's, from the process before the restart
    await edge_offers.check_edge(ctx)
    assert await redis.mget(keys) == published


async def test_a_failing_republish_does_not_stop_the_offer_check(api, db, redis, settings, tenant, monkeypatch):
    """A republish that keeps failing (a statement timeout, a Redis error mid-pass) must not hold up
    the offer check after it: a pause whose publish failed would never reach the edge (CONTRACT §4's
    15 s) for as long as it failed (found by review)."""
    offer = await make_offer(api, tenant)
    key = edge.offer_key(offer["id"])
    published = await redis.get(key)
    mark = await redis.get(edge.EDGE_MARK)
    await redis.set(key, b'{"stale":true}')  # a publish that failed
    await redis.delete(edge.EDGE_MARK)  # and Redis restarted

    async def failing(*args, **kwargs):
        raise TimeoutError("canceling statement due to statement timeout")

    monkeypatch.setattr(edge_offers, "republish", failing)
    ctx = {"db": db, "redis_client": redis, "settings": settings}
    try:
        with pytest.raises(TimeoutError):
            await edge_offers.check_edge(ctx)
        assert await redis.get(key) == published
    finally:  # the edge as it was: the next worker of the run need not publish the whole database again
        if mark is not None:
            await redis.set(edge.EDGE_MARK, mark)


async def test_a_republish_longer_than_its_lock_keeps_it_and_a_dead_workers_lock_expires(db, redis, monkeypatch):
    """One worker makes the pass at a time. A pass outlasting the lock's life (100M message codes
    take a quarter of an hour) renews it, so no second worker starts the same pass beside it; and
    the lock's life is short, so a worker killed mid-pass (never renewing again) holds the next
    one up for at most that long, not for the quarter of an hour the lock used to live."""
    monkeypatch.setattr(edge_offers, "REPUBLISH_LOCK_MS", 1000)
    monkeypatch.setattr(edge_offers, "REPUBLISH_RENEW_S", 0.1)
    passes = 0
    release = asyncio.Event()

    async def slow_pass(*args, **kwargs):
        nonlocal passes
        passes += 1
        if passes == 1:  # the long pass; any other returns at once (a test that fails, not hangs)
            await release.wait()
        return {"links": 0, "message_codes": 0, "offers": 0}

    monkeypatch.setattr(edge_offers, "republish", slow_pass)
    mark = await redis.get(edge.EDGE_MARK)
    await redis.delete(edge.EDGE_MARK, edge_offers.REPUBLISH_LOCK)
    try:
        first = asyncio.create_task(edge_offers.ensure_complete(db, redis))
        await asyncio.sleep(2.5)  # two and a half lives of the lock
        assert await edge_offers.ensure_complete(db, redis) is None  # another worker's check
        assert passes == 1
        assert 0 < await redis.pttl(edge_offers.REPUBLISH_LOCK) <= 1000
        release.set()
        assert await first == {"links": 0, "message_codes": 0, "offers": 0}
        assert await redis.exists(edge_offers.REPUBLISH_LOCK) == 0  # released at the end

        # A dead worker's lock (taken, never renewed) is the next worker's once its life is over.
        await redis.delete(edge.EDGE_MARK)
        await redis.set(edge_offers.REPUBLISH_LOCK, "a-dead-workers-token", px=edge_offers.REPUBLISH_LOCK_MS)
        assert await edge_offers.ensure_complete(db, redis) is None
        await asyncio.sleep(1.1)
        assert await edge_offers.ensure_complete(db, redis) is not None
        assert passes == 2
    finally:
        release.set()
        await redis.delete(edge_offers.REPUBLISH_LOCK)
        if mark is not None:
            await redis.set(edge.EDGE_MARK, mark)
        else:
            await redis.delete(edge.EDGE_MARK)
