"""The edge's link cache: bounded, and what it evicts is what was refreshed longest ago."""
from __future__ import annotations

import secrets
from typing import Any

from services.redirect.cache import EdgeCache


async def test_bounded_and_evicts_the_entry_refreshed_longest_ago(redis: Any) -> None:
    prefix = f"test:cache:{secrets.token_hex(4)}"
    keys = [f"{prefix}:{n}" for n in range(4)]
    await redis.mset({k: k.encode() for k in keys})
    cache = EdgeCache(redis, bytes.decode, ttl=0.0, size=3)  # ttl 0: every lookup refreshes
    for key in keys[:3]:
        assert await cache.load(key) == key
    assert await cache.load(keys[0]) == keys[0]  # refreshed: now the newest
    assert await cache.load(keys[3]) == keys[3]  # full: the entry refreshed longest ago goes
    assert len(cache) == 3
    assert cache.expires(keys[1]) == 0.0 and all(cache.expires(k) > 0 for k in (keys[0], keys[2], keys[3]))
    await redis.delete(*keys)
