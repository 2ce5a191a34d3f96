"""The edge's link cache: bounded, and what it evicts is what was refreshed longest ago."""
from __future__ import annotations

import asyncio
import secrets
from typing import Any

from services.redirect.cache import BatchedGets, EdgeCache, EdgeUnavailable
from services.redirect.rawredis import RawRedis


async def test_bounded_and_evicts_the_entry_refreshed_longest_ago(redis: Any) -> None:
    prefix = f"test:cache:{secrets.token_hex(4)}"
    keys = [f"{prefix}:{n}" for n in range(4)]
    await redis.mset({k: k.encode() for k in keys})
    cache = EdgeCache(redis.get, bytes.decode, ttl=0.0, size=3)  # ttl 0: every lookup refreshes
    for key in keys[:3]:
        assert await cache.load(key) == key
    assert await cache.load(keys[0]) == keys[0]  # refreshed: now the newest
    assert await cache.load(keys[3]) == keys[3]  # full: the entry refreshed longest ago goes
    assert len(cache) == 3
    assert cache.expires(keys[1]) == 0.0 and all(cache.expires(k) > 0 for k in (keys[0], keys[2], keys[3]))
    await redis.delete(*keys)


async def test_the_misses_of_one_loop_iteration_are_read_with_one_mget(redis: Any, settings: Any) -> None:
    """A per-message short URL is mostly clicked once: its lookup is a miss. Concurrent misses go to
    Redis together, one MGET on the edge's own connection, each caller getting its own value (None
    for a key Redis does not have); concurrent misses of one key share one read."""
    prefix = f"test:cache:{secrets.token_hex(4)}"
    keys = [f"{prefix}:{n}" for n in range(50)]
    await redis.mset({k: k.encode() for k in keys[:40]})
    conn = RawRedis(settings.redis_url)
    try:
        lookups = BatchedGets(conn)
        cache = EdgeCache(lookups.get, bytes.decode, ttl=5.0, size=100)
        values = await asyncio.gather(*(cache.load(k) for k in keys), cache.load(keys[0]))
        assert values == [*keys[:40], *[None] * 10, keys[0]]
        assert lookups.batches == 1 and cache.misses == 50
        assert await asyncio.gather(*(cache.load(k) for k in keys[:3])) == keys[:3]
        assert lookups.batches == 2
        assert cache.fresh(keys[5]) == keys[5] and cache.fresh(keys[45]) is None
    finally:
        await conn.close()
        await redis.delete(*keys)


async def test_a_failed_batch_serves_what_is_cached_and_refuses_the_rest() -> None:
    """Redis unreachable: a stale entry is served as it was, a key never seen is EdgeUnavailable."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = RawRedis(f"redis://127.0.0.1:{port}/0", connect_timeout=1.0)
    lookups = BatchedGets(conn)
    cache = EdgeCache(lookups.get, bytes.decode, ttl=0.0, size=10)
    cache._store("known", (0.0, "stale value"))  # expired: a lookup asks Redis first
    results = await asyncio.gather(cache.load("known"), cache.load("unknown"), return_exceptions=True)
    assert results[0] == "stale value" and isinstance(results[1], EdgeUnavailable)
    assert cache.stale_served == 1 and lookups.batches == 1
