"""Link lookups at the edge: a bounded in-process cache in front of Redis, never PostgreSQL.

* A fresh entry (younger than ``settings.link_cache_ttl``) is answered without touching Redis:
  that is what keeps the cached hot path at the speed of a fixed redirect.
* An expired entry is refreshed from Redis, so a paused offer or a removed link stops answering
  within one TTL.
* If Redis fails during a refresh, the expired entry is served as it was (and Redis is asked again
  after ``retry_after``): a Redis blip must not turn working links into errors. Only a key never
  seen before fails, with ``EdgeUnavailable``.
* Concurrent misses for one key share a single Redis read.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("trackly.redirect.cache")

T = TypeVar("T")


class EdgeUnavailable(Exception):
    """Redis could not be asked and nothing (not even a stale entry) is cached."""


class EdgeCache(Generic[T]):
    def __init__(
        self,
        redis: aioredis.Redis,
        decode: Callable[[bytes], T],
        *,
        ttl: float,
        size: int,
        retry_after: float = 1.0,
    ) -> None:
        self._redis = redis
        self._decode = decode
        self._ttl = ttl
        self._retry_after = min(retry_after, ttl) if ttl > 0 else retry_after
        # key -> (expires_at (monotonic), value). A tuple, not a list, and values are tuples too
        # (NamedTuples of str/bytes/int): the garbage collector untracks such tuples, so a full
        # collection does not walk every cached link (with 200k cached links a walk that stalls
        # every request for tens of milliseconds).
        #
        # A plain dict in insertion order, not cachetools' LRUCache: a hit is a C-level dict get
        # instead of a Python-level reorder (two lookups per tracker hop). Every entry is stored
        # again when it is refreshed (each TTL, while it is used), which moves it to the end, so
        # the first entry is the one refreshed longest ago: what is evicted when the dict is full.
        # That is least-recently-used to within one TTL.
        self._entries: dict[str, tuple[float, Any]] = {}
        self._size = size
        self._inflight: dict[str, asyncio.Future[T | None]] = {}
        self.misses = 0
        self.stale_served = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self, key: str) -> T | None:
        """The cached value if it is still fresh, else None (then call ``load``). No I/O."""
        slot = self._entries.get(key)
        if slot is None:
            return None
        if slot[0] > time.monotonic():  # no hit counter: nothing reads one, and this runs twice a click
            return slot[1]  # type: ignore[no-any-return]
        return None

    def expires(self, key: str) -> float:
        """When the cached entry stops being fresh (``time.monotonic()``); 0 if none is cached."""
        slot = self._entries.get(key)
        return slot[0] if slot is not None else 0.0

    async def load(self, key: str) -> T | None:
        """Ask Redis (once for all concurrent callers). None: the key does not exist."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await self._fetch(key)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # consumed here; waiters still see it raised
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._inflight[key]

    async def _fetch(self, key: str) -> T | None:
        self.misses += 1
        try:
            raw = await self._redis.execute_command("GET", key)
        except (RedisError, OSError) as exc:
            slot = self._entries.get(key)
            if slot is None:
                raise EdgeUnavailable(str(exc)) from exc
            self._store(key, (time.monotonic() + self._retry_after, slot[1]))
            self.stale_served += 1
            log.warning("redis unavailable (%s); serving %s from a stale cache entry", exc, key)
            return slot[1]  # type: ignore[no-any-return]
        if raw is None:
            self._entries.pop(key, None)
            return None
        value = self._decode(raw)
        self._store(key, (time.monotonic() + self._ttl, value))
        return value

    def _store(self, key: str, slot: tuple[float, Any]) -> None:
        entries = self._entries
        entries.pop(key, None)  # to the end: the most recently refreshed
        entries[key] = slot
        if len(entries) > self._size:
            del entries[next(iter(entries))]
