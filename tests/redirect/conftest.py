"""An in-process redirect app on the real Redis of the run, driven through httpx.ASGITransport."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.redirect.app import RedirectApp, create_app
from services.worker.clicks import drain_once
from shared import edge as edge_keys
from shared.embedded import EmbeddedRedis
from shared.redis_client import create_redis
from shared.settings import Settings
from tests.helpers import Tenant, make_link, make_offer

PHONE_UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"


@dataclass
class Edge:
    app: RedirectApp
    client: httpx.AsyncClient

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("headers", {}).setdefault("user-agent", PHONE_UA)
        return await self.client.get(url, **kwargs)

    async def head(self, url: str, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("headers", {}).setdefault("user-agent", PHONE_UA)
        return await self.client.head(url, **kwargs)

    async def click(self, short_url: str, **kwargs: Any) -> str:
        """Both hops, as a phone would follow them; the final Location."""
        first = await self.get(short_url, **kwargs)
        assert first.status_code == 302, first.text
        second = await self.get(first.headers["location"], headers=dict(kwargs.get("headers", {})))
        assert second.status_code == 302, second.text
        return second.headers["location"]


@contextlib.asynccontextmanager
async def running_edge(settings: Settings, *, client_ip: str = "198.51.100.7", **changes: Any) -> AsyncIterator[Edge]:
    app = create_app(replace(settings, **changes))
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app, client=(client_ip, 40000))
        async with httpx.AsyncClient(transport=transport) as client:
            yield Edge(app, client)
    finally:
        await app.shutdown()


@pytest.fixture
async def edge(settings: Settings) -> AsyncIterator[Edge]:
    async with running_edge(settings) as e:
        yield e


async def drain(db: asyncpg.Pool, redis: Any) -> int:
    """Everything in the click stream into PostgreSQL (other tests' clicks too)."""
    total = 0
    while n := await drain_once(db, redis, consumer="pytest", min_idle_ms=0):
        total += n
    return total


async def offer_and_link(api: httpx.AsyncClient, tenant: Tenant, destination: str, **offer: Any) -> tuple[dict, dict]:
    o = await make_offer(api, tenant, destination_url=destination, **offer)
    link = await make_link(api, tenant, o["id"])
    return o, link


@contextlib.asynccontextmanager
async def spare_redis_with_link(redis: Any, link: dict, offer_id: str, path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A Redis of the test's own (to stop when it likes) holding a copy of the link's edge keys:
    its short code, tracker and offer. Stopped afterwards, if the test has not."""
    spare = EmbeddedRedis(path)
    spare.start()
    try:
        client = create_redis(spare.url)
        try:
            tracker_id = link["clickTrackerUrl"].rsplit("/", 1)[1]
            for key in (
                edge_keys.short_key("sms.example.com", link["linkId"]),
                edge_keys.tracker_key(tracker_id),
                edge_keys.offer_key(offer_id),
            ):
                value = await redis.get(key)
                assert value is not None, key
                await client.set(key, value)
        finally:
            await client.aclose()
        yield spare
    finally:
        spare.stop()
