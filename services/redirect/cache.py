"""Link lookups at the edge: a bounded in-process cache in front of Redis, never PostgreSQL.

* A fresh entry (younger than ``settings.link_cache_ttl``) is answered without touching Redis:
  that is what keeps the cached hot path at the speed of a fixed redirect.
* An expired entry is refreshed from Redis, so a paused offer or a removed link stops answering
  within one TTL.
* If Redis fails during a refresh, the expired entry is served as it was (and Redis is asked again
  after ``retry_after``): a Redis blip must not turn working links into errors. Only a key never
  seen before fails, with ``EdgeUnavailable``, and so does an entry Redis last confirmed more
  than ``MAX_STALE_AGE`` ago: a paused or deleted offer must stop answering within 15 s
  (CONTRACT.md §4) even while this edge cannot read Redis and the gateway could write it.
* Concurrent misses for one key share a single Redis read, and the misses of one event loop
  iteration go to Redis as one ``MGET`` (``BatchedGets``): a per-message short URL is mostly
  clicked once, so its lookup is a miss, and real SMS traffic is mostly such lookups.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from redis.exceptions import RedisError

from services.redirect.rawredis import Executor, RawRedisError
from shared.logs import Throttled

log = logging.getLogger("trackly.redirect.cache")

T = TypeVar("T")

# How long after Redis last confirmed an entry it may still be served while Redis fails (then the
# edge answers 503): under CONTRACT.md §4's 15 s for a paused offer to stop answering.
MAX_STALE_AGE = 14.0

Get = Callable[[str], Awaitable["bytes | None"]]


class BatchedGets:
    """``get(key)``: the keys asked for during one event loop iteration are read with one
    ``MGET`` on a pipelined connection (``rawredis.RawRedis``), not one redis-py ``GET`` each,
    which costs tens of microseconds of Python per command (a per-message short hop that missed
    the cache cost ~150 us of CPU, most of it there). If the read fails, every caller of that
    batch gets the error (``EdgeCache`` then serves what it has, or ``EdgeUnavailable``)."""

    def __init__(self, redis: Executor) -> None:
        self._redis = redis
        self._keys: list[bytes] = []
        self._waiters: list[asyncio.Future[bytes | None]] = []
        self._loop = asyncio.get_running_loop()
        self.batches = 0

    def get(self, key: str) -> asyncio.Future[bytes | None]:
        future: asyncio.Future[bytes | None] = self._loop.create_future()
        try:
            raw_key = key.encode()
        except UnicodeEncodeError:  # no such key can be in Redis; and it must not fail the batch it would join
            future.set_result(None)
            return future
        if not self._keys:
            self._loop.call_soon(self._flush)  # after every request that is ready now has asked
        self._keys.append(raw_key)
        self._waiters.append(future)
        return future

    def _flush(self) -> None:
        keys, waiters, self._keys, self._waiters = self._keys, self._waiters, [], []
        self.batches += 1
        reply = self._redis.request("MGET", *keys)
        reply.add_done_callback(lambda done: self._finish(done, waiters))

    @staticmethod
    def _finish(reply: asyncio.Future[Any], waiters: list[asyncio.Future[bytes | None]]) -> None:
        values: Any = None
        if reply.cancelled():
            exc: BaseException | None = ConnectionError("the read was cancelled")
        else:
            exc = reply.exception()
            if exc is None:
                values = reply.result()
                if not isinstance(values, list) or len(values) != len(waiters):
                    exc = ConnectionError(f"MGET of {len(waiters)} keys answered {values!r:.100}")
            elif not isinstance(exc, (OSError, RedisError, RawRedisError)):
                # Whatever it was (a key that cannot be sent...), the callers see a failed read:
                # stale entries or EdgeUnavailable, never an error of their own.
                exc = ConnectionError(f"{type(exc).__name__}: {exc}")
        for i, waiter in enumerate(waiters):
            if waiter.done():  # its request went away
                continue
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(values[i])


class EdgeUnavailable(Exception):
    """Redis could not be asked and nothing (not even a stale entry) is cached."""


class EdgeCache(Generic[T]):
    def __init__(
        self,
        get: Get,
        decode: Callable[[bytes], T],
        *,
        ttl: float,
        size: int,
        retry_after: float = 1.0,
        max_stale: float = MAX_STALE_AGE,
    ) -> None:
        self._get = get  # a key's raw value in Redis, None if it has none (BatchedGets.get)
        self._decode = decode
        self._ttl = ttl
        self._retry_after = min(retry_after, ttl) if ttl > 0 else retry_after
        self._max_stale = max_stale
        # key -> (expires_at (monotonic), value, when Redis last confirmed it). A tuple, not a list, and values are tuples too
        # (NamedTuples of str/bytes/int): the garbage collector untracks such tuples, so a full
        # collection does not walk every cached link (with 200k cached links a walk that stalls
        # every request for tens of milliseconds).
        #
        # An OrderedDict, not cachetools' LRUCache: a hit is a C-level get instead of a
        # Python-level reorder (two lookups per tracker hop). Every entry is stored again when it
        # is refreshed (each TTL, while it is used), which moves it to the end, so the first entry
        # is the one refreshed longest ago: what is evicted when the cache is full. That is
        # least-recently-used to within one TTL. Not a plain dict: taking its first entry walks
        # past every slot deleted before it, so at 100k entries each eviction cost ~20-30 us.
        self._entries: OrderedDict[str, tuple[float, Any, float]] = OrderedDict()
        self._size = size
        self._inflight: dict[str, asyncio.Future[T | None]] = {}
        self.misses = 0
        self._report_stale = Throttled(
            log, logging.WARNING, "redis unavailable (%s); serving lookups from stale cache entries, %s the latest"
        )

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def stale_served(self) -> int:
        """Lookups answered from an expired entry because Redis failed."""
        return self._report_stale.count

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
            # The others waiting on this read were not cancelled themselves: for them it failed.
            shared = EdgeUnavailable("the read was cancelled") if isinstance(exc, asyncio.CancelledError) else exc
            future.set_exception(shared)
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
            raw = await self._get(key)
        except (RedisError, RawRedisError, OSError) as exc:
            slot = self._entries.get(key)
            now = time.monotonic()
            if slot is None or now - slot[2] > self._max_stale:
                raise EdgeUnavailable(str(exc)) from exc
            self._store(key, (now + self._retry_after, slot[1], slot[2]))
            self._report_stale(exc, key)
            return slot[1]  # type: ignore[no-any-return]
        if raw is None:
            self._entries.pop(key, None)
            return None
        value = self._decode(raw)
        now = time.monotonic()
        self._store(key, (now + self._ttl, value, now))
        return value

    def _store(self, key: str, slot: tuple[float, Any, float]) -> None:
        entries = self._entries
        entries[key] = slot
        entries.move_to_end(key)  # the most recently refreshed
        if len(entries) > self._size:
            entries.popitem(last=False)
