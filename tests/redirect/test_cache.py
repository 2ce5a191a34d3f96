"""The edge's link cache: bounded, and what it evicts is what was refreshed longest ago."""
from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from services.redirect.cache import BatchedGets, EdgeCache, EdgeUnavailable
from services.redirect.rawredis import RawRedis
from shared.embedded import EmbeddedRedis
from shared.redis_client import create_redis


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
        # A key no Redis can hold (not encodable) is absent, and does not fail the batch it joins.
        assert await asyncio.gather(cache.load(f"{prefix}:\ud800"), cache.load(keys[6])) == [None, keys[6]]
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
    cache._store("known", (0.0, "stale value", time.monotonic()))  # expired: a lookup asks Redis first
    results = await asyncio.gather(cache.load("known"), cache.load("unknown"), return_exceptions=True)
    assert results[0] == "stale value" and isinstance(results[1], EdgeUnavailable)
    assert cache.stale_served == 1 and lookups.batches == 1


async def test_an_error_reply_serves_what_is_cached_and_refuses_the_rest(tmp_path: Path) -> None:
    """Redis answers the read with an error (here NOPERM, as LOADING during a restart would): as a
    failed read, never a 500."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    admin = create_redis(server.url)
    try:
        await admin.execute_command("ACL", "SETUSER", "edge", "on", ">pw", "~allowed:*", "+@all")
        conn = RawRedis(server.url.replace("unix://", "unix://edge:pw@", 1))
        lookups = BatchedGets(conn)
        cache = EdgeCache(lookups.get, bytes.decode, ttl=0.0, size=10)
        cache._store("denied:known", (0.0, "stale value", time.monotonic()))
        results = await asyncio.gather(cache.load("denied:known"), cache.load("denied:new"), return_exceptions=True)
        assert results[0] == "stale value" and isinstance(results[1], EdgeUnavailable)
        await conn.close()
    finally:
        await admin.aclose()
        server.stop()


async def test_a_request_that_goes_away_leaves_the_rest_of_its_batch_answered(redis: Any, settings: Any) -> None:
    prefix = f"test:cache:{secrets.token_hex(4)}"
    keys = [f"{prefix}:{n}" for n in range(3)]
    await redis.mset({k: k.encode() for k in keys})
    conn = RawRedis(settings.redis_url)
    try:
        lookups = BatchedGets(conn)
        cache = EdgeCache(lookups.get, bytes.decode, ttl=5.0, size=10)
        await cache.load(keys[0])  # connected: the next batch goes out with submit
        tasks = [asyncio.ensure_future(cache.load(k)) for k in keys[1:]]
        await asyncio.sleep(0)  # both have asked; the batch is not sent yet
        tasks[0].cancel()
        assert await asyncio.wait_for(tasks[1], 5) == keys[2]
        assert tasks[0].cancelled() and lookups.batches == 2
    finally:
        await conn.close()
        await redis.delete(*keys)


async def test_a_shared_read_whose_owner_is_cancelled_fails_as_unavailable_for_the_others(redis: Any, settings: Any) -> None:
    key = f"test:cache:{secrets.token_hex(4)}"
    conn = RawRedis(settings.redis_url)
    try:
        cache = EdgeCache(BatchedGets(conn).get, bytes.decode, ttl=5.0, size=10)
        owner = asyncio.ensure_future(cache.load(key))
        await asyncio.sleep(0)
        other = asyncio.ensure_future(cache.load(key))
        await asyncio.sleep(0)
        owner.cancel()
        with pytest.raises(EdgeUnavailable):  # not a CancelledError of a request nobody cancelled
            await asyncio.wait_for(other, 5)
    finally:
        await conn.close()


async def test_a_read_that_is_never_answered_fails_after_the_timeout(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    admin = create_redis(server.url)
    conn = RawRedis(server.url, timeout=0.3)
    try:
        cache = EdgeCache(BatchedGets(conn).get, bytes.decode, ttl=0.0, size=10)
        assert await cache.load("absent") is None  # connected
        cache._store("known", (0.0, "stale value", time.monotonic()))
        await admin.execute_command("CLIENT", "PAUSE", "4000")
        results = await asyncio.wait_for(
            asyncio.gather(cache.load("known"), cache.load("new"), return_exceptions=True), 3)
        assert results[0] == "stale value" and isinstance(results[1], EdgeUnavailable)
    finally:
        await conn.close()
        await admin.aclose()
        server.stop()


async def test_a_failed_connect_is_not_tried_again_for_a_moment_and_a_closed_connection_stays_closed() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = RawRedis(f"redis://127.0.0.1:{port}/0", connect_timeout=1.0, reconnect_pause=1.0)
    with pytest.raises(ConnectionRefusedError):
        await conn.execute("PING")
    with pytest.raises(ConnectionError, match="unreachable"):  # no second connect attempt yet
        await conn.execute("PING")
    await asyncio.sleep(1.05)
    with pytest.raises(ConnectionRefusedError):  # tried again
        await conn.execute("PING")
    await conn.close()
    with pytest.raises(ConnectionError, match="closed"):
        await conn.execute("PING")


async def test_an_outage_is_reported_not_once_per_stale_lookup(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = RawRedis(f"redis://127.0.0.1:{port}/0", connect_timeout=1.0)
    cache = EdgeCache(BatchedGets(conn).get, bytes.decode, ttl=0.0, size=10)
    for n in range(5):
        cache._store(f"k{n}", (0.0, f"v{n}", time.monotonic()))
    with caplog.at_level(logging.WARNING, logger="trackly.redirect.cache"):
        assert [await cache.load(f"k{n}") for n in range(5)] == [f"v{n}" for n in range(5)]
    assert cache.stale_served == 5
    assert len([r for r in caplog.records if r.name == "trackly.redirect.cache"]) == 1


async def test_an_entry_redis_has_not_confirmed_for_too_long_is_not_served() -> None:
    """A stale entry is served while Redis fails, but not forever: a paused offer must stop
    answering within 15 s (CONTRACT.md §4) even if only this edge cannot read Redis (found by the
    redirect review: it kept redirecting 75 s after the pause)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    up = True

    async def get(key: str) -> bytes | None:
        if not up:
            raise RedisConnectionError("partitioned")
        return b"active"

    cache = EdgeCache(get, bytes.decode, ttl=0.0, size=10, retry_after=0.0, max_stale=0.3)
    assert await cache.load("offer") == "active"
    up = False
    assert await cache.load("offer") == "active"  # stale, served
    await asyncio.sleep(0.35)
    with pytest.raises(EdgeUnavailable):
        await cache.load("offer")
    up = True
    assert await cache.load("offer") == "active"  # confirmed again: served again
    up = False
    assert await cache.load("offer") == "active"
