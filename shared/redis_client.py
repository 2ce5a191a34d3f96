"""Redis clients built the same way by every service."""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import redis.asyncio as aioredis
from redis.connection import HiredisRespSerializer
from redis.exceptions import RedisError

log = logging.getLogger("trackly.redis")

# A Redis that accepts connections but does not answer (stopped, swapping, partitioned) must turn
# into an error the caller can report (the gateway answers 503 and rolls back), not a request
# that waits forever while its client gives up and retries. Longer than any command we send
# needs, and than the drainer's blocking read (1 s).
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0


class _HiredisPacking:
    """Commands packed by hiredis, in C, as redis-py's synchronous connections do (its
    ``HiredisRespSerializer``): its asyncio connections pack in Python, re-joining the buffer per
    argument, which took ~3 ms of CPU for the ``MSET`` of a 1000-message send's codes."""

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: object) -> list[bytes]:
        return self._serializer.pack(*args)


@functools.cache
def _hiredis_packing(cls: type) -> type:
    return type(cls.__name__, (_HiredisPacking, cls), {})


def create_redis(
    url: str, *, max_connections: int | None = 64, client_class: type[aioredis.Redis] = aioredis.Redis
) -> aioredis.Redis:
    """``client_class``: a subclass to build instead (arq's ``ArqRedis``); ``max_connections``
    None: no bound (redis-py's own default)."""
    client = client_class.from_url(
        url, max_connections=max_connections, health_check_interval=30,
        socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
    )
    pool = client.connection_pool  # (its class comes from the URL's scheme: TCP, TLS or a unix socket)
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return client


def persistence_problem(config: Mapping[str, str]) -> str | None:
    """What in a Redis server's ``appendonly`` / ``appendfsync`` / ``maxmemory`` settings can lose
    a write it has acknowledged (a click answered 302, a published link), or None with
    ``appendfsync always`` and no eviction."""
    problems = []
    fsync = config.get("appendfsync")
    if config.get("appendonly") != "yes":
        problems.append("appendonly is off: a restart of Redis loses every acknowledged click not yet drained into"
                        " PostgreSQL, and the links published since its last snapshot")
    elif fsync == "no":
        problems.append("appendfsync is 'no': a crash of its machine loses the acknowledged clicks the kernel had"
                        " not yet written")
    elif fsync == "everysec":
        problems.append("appendfsync is 'everysec': a crash of its machine loses up to a second of acknowledged clicks")
    policy = config.get("maxmemory-policy", "noeviction")
    if config.get("maxmemory", "0") != "0" and policy != "noeviction":
        problems.append(f"maxmemory-policy is '{policy}': a full Redis evicts keys (published links and per-message"
                        " codes, clicks not yet drained) instead of refusing writes; use 'noeviction'")
    return "; ".join(problems) or None


async def warn_if_not_durable(redis: aioredis.Redis) -> str | None:
    """Log (and return) a warning when this Redis does not keep what it acknowledges:
    clicks are durable only as far as Redis is (the embedded one and deploy/compose.yaml run
    ``appendfsync always``, without eviction). Silent when the settings cannot be read (a managed
    Redis may refuse CONFIG); a Redis that is down is the caller's business."""
    try:
        config = {**await redis.config_get("append*"), **await redis.config_get("maxmemory*")}
    except RedisError as exc:
        log.debug("could not read the persistence settings of redis: %s", exc)
        return None
    problem = persistence_problem({text(k): text(v) for k, v in config.items()})
    if problem:
        log.warning("redis does not keep everything it acknowledges: %s", problem)
    return problem


def text(value: object) -> str:
    """A reply value as text (redis-py answers bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)
