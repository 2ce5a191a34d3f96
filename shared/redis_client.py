"""Redis clients built the same way by every service."""
from __future__ import annotations

import redis.asyncio as aioredis

# A Redis that accepts connections but does not answer (stopped, swapping, partitioned) must turn
# into an error the caller can report (the gateway answers 503 and rolls back), not a request
# that waits forever while its client gives up and retries. Longer than any command we send
# needs, and than the drainer's blocking read (1 s).
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0


def create_redis(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, max_connections=max_connections, health_check_interval=30,
        socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
    )
