"""A click answered 302 is only as durable as Redis keeps what it acknowledges: the redirect warns
at start when its Redis does not fsync every write."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shared.embedded import EmbeddedRedis
from shared.redis_client import create_redis, persistence_problem, warn_if_not_durable


@pytest.mark.parametrize("config, problem", [
    ({"appendonly": "yes", "appendfsync": "always"}, None),
    ({"appendonly": "yes", "appendfsync": "everysec"}, "up to a second"),
    ({"appendonly": "yes", "appendfsync": "no"}, "kernel had not yet written"),
    ({"appendonly": "no", "appendfsync": "always"}, "appendonly is off"),
    ({}, "appendonly is off"),
    ({"appendonly": "yes", "appendfsync": "always", "maxmemory": "0", "maxmemory-policy": "allkeys-lru"}, None),
    ({"appendonly": "yes", "appendfsync": "always", "maxmemory": "1073741824", "maxmemory-policy": "noeviction"}, None),
    ({"appendonly": "yes", "appendfsync": "always", "maxmemory": "1073741824", "maxmemory-policy": "volatile-lru"},
     "maxmemory-policy is 'volatile-lru'"),
])
def test_persistence_problem(config, problem):
    found = persistence_problem(config)
    assert found is None if problem is None else problem in found


async def test_warns_about_a_redis_that_does_not_keep_what_it_acknowledges(tmp_path: Path, caplog) -> None:
    server = EmbeddedRedis(tmp_path / "redis")  # appendfsync always, as trackly run's own
    server.start()
    client = create_redis(server.url)
    try:
        with caplog.at_level(logging.WARNING, logger="trackly.redis"):
            assert await warn_if_not_durable(client) is None
            assert not caplog.records
            await client.config_set("maxmemory", "1gb")
            assert await warn_if_not_durable(client) is None  # noeviction: refused writes, nothing lost
            await client.config_set("maxmemory-policy", "volatile-ttl")
            await client.config_set("appendonly", "no")
            both = await warn_if_not_durable(client) or ""
            assert "appendonly is off" in both and "maxmemory-policy is 'volatile-ttl'" in both
            assert "does not keep everything it acknowledges" in caplog.text
    finally:
        await client.aclose()
        server.stop()
