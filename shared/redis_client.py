"""Redis clients built the same way by every service."""
from __future__ import annotations

import redis.asyncio as aioredis


def create_redis(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, max_connections=max_connections, health_check_interval=30)
