"""Redirect edge behaviour that mutation testing found unpinned: how long a partitioned edge
may serve what it cached (CONTRACT.md §4: a paused or deleted offer stops answering within 15 s),
a raw non-ASCII query on the short hop, and X-Forwarded-For entries that are not addresses."""
from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from services.redirect import app as app_mod
from services.redirect import cache as cache_mod
from services.redirect.cache import EdgeCache, EdgeUnavailable
from services.redirect.client_ip import ClientIP
from shared.settings import Settings
from tests.helpers import Tenant
from tests.redirect.conftest import PHONE_UA, Edge, offer_and_link, running_edge, spare_redis_with_link


class ShiftedClock:
    """The ``time`` module, with ``monotonic()`` moved ``offset`` seconds ahead (no real waiting)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ShiftedClock:
    shifted = ShiftedClock()
    monkeypatch.setattr(cache_mod, "time", shifted)
    monkeypatch.setattr(app_mod, "time", shifted)
    return shifted


class FlakyRedis:
    """A ``get`` for EdgeCache: a value per key, or a connection error while ``up`` is False."""

    def __init__(self, **values: bytes) -> None:
        self.values: dict[str, bytes | None] = dict(values)
        self.up = True

    async def get(self, key: str) -> bytes | None:
        if not self.up:
            raise RedisConnectionError("partitioned")
        return self.values.get(key)


async def test_a_busy_partitioned_edge_stops_redirecting_15_s_after_redis_last_confirmed_the_link(
    api: httpx.AsyncClient, tenant: Tenant, settings: Settings, redis: Any, tmp_path: Path, clock: ShiftedClock
) -> None:
    """Stale entries are served while Redis fails, but measured from Redis's last confirmation,
    however often they are served meanwhile: else a paused offer would redirect for as long as
    the edge stays partitioned and its link keeps being clicked. Default TTL and stale limits."""
    offer, link = await offer_and_link(api, tenant, "https://lp.example/land?s={sub1}")
    async with spare_redis_with_link(redis, link, offer["id"], tmp_path / "spare-redis") as spare:
        async with running_edge(settings, redis_url=spare.url) as edge:
            assert edge.app.settings.link_cache_ttl <= 5.0
            tracker = (await edge.get(link["shortUrl"] + "?sub1=a")).headers["location"]
            assert (await edge.head(tracker)).status_code == 302
            spare.stop()
            for offset in (6.0, 9.0, 12.0):  # expired, Redis down, clicked all along: served stale
                clock.offset = offset
                short = await edge.get(link["shortUrl"] + "?sub1=a")
                assert short.status_code == 302 and short.headers["location"] == tracker, offset
                assert (await edge.head(tracker)).status_code == 302, offset
            clock.offset = 15.0  # 15 s since Redis last confirmed link and offer: no longer answered
            short = await edge.get(link["shortUrl"] + "?sub1=a")
            assert short.status_code == 503, short.headers.get("location")
            head = await edge.head(tracker)
            assert head.status_code == 503, head.headers.get("location")


async def test_after_a_stale_answer_redis_is_asked_again_within_a_second(clock: ShiftedClock) -> None:
    """Once Redis is back, what it says now (an offer paused meanwhile) replaces the stale entry
    within a second, not after another TTL or longer."""
    backend = FlakyRedis(offer=b"active")
    cache = EdgeCache(backend.get, bytes.decode, ttl=5.0, size=10)
    assert await cache.load("offer") == "active"
    clock.offset = 6.0  # expired
    backend.up = False
    assert cache.fresh("offer") is None
    assert await cache.load("offer") == "active"  # stale, served
    backend.up, backend.values["offer"] = True, b"paused"
    clock.offset = 7.01
    assert cache.fresh("offer") is None
    assert await cache.load("offer") == "paused"


async def test_a_key_redis_no_longer_has_is_not_served_stale_when_redis_then_fails() -> None:
    """A link or offer removed from Redis is forgotten at once: if Redis then fails, it is not
    brought back from the cache (a deleted offer would redirect again)."""
    backend = FlakyRedis(offer=b"active")
    cache = EdgeCache(backend.get, bytes.decode, ttl=0.0, size=10, retry_after=0.0)
    assert await cache.load("offer") == "active"
    backend.values["offer"] = None  # deleted
    assert await cache.load("offer") is None
    assert len(cache) == 0 and cache.expires("offer") == 0.0
    backend.up = False
    with pytest.raises(EdgeUnavailable):
        await cache.load("offer")
    assert cache.stale_served == 0


def test_a_forwarded_for_entry_that_is_not_an_address_ends_the_walk() -> None:
    """Walking X-Forwarded-For from the nearest hop back, an entry that is not an address
    ("unknown", junk) stops the walk: nothing left of it is believed."""
    resolve = ClientIP([ipaddress.ip_network("10.0.0.0/8")])
    assert resolve("10.1.2.3", b"1.2.3.4, unknown, 10.0.0.2") == "10.0.0.2"
    assert resolve("10.1.2.3", b"1.2.3.4, junk") == "10.1.2.3"


async def _raw_get(app: Any, host: bytes, path: str, query: bytes) -> tuple[int, dict[bytes, bytes]]:
    """One request straight into the ASGI app, with a query string as a client may send it
    (raw bytes: httpx would percent-encode them first)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "https",
        "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
        "headers": [(b"host", host), (b"user-agent", PHONE_UA.encode())],
        "client": ("198.51.100.7", 40000), "server": ("127.0.0.1", 8001),
    }
    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"])


async def test_a_raw_non_ascii_query_is_forwarded_percent_encoded(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge
) -> None:
    """A phone may send the query's UTF-8 unescaped: the Location header still carries ASCII
    only, and the tracker reads back the same value."""
    _, link = await offer_and_link(api, tenant, "https://lp.example/land?s={sub1}&src={source}")
    status, headers = await _raw_get(edge.app, b"sms.example.com", "/" + link["linkId"], "sub1=ü x&source=sms".encode())
    assert status == 302
    location = headers[b"location"]
    assert location.isascii(), location
    assert location.decode() == link["clickTrackerUrl"] + "?sub1=%C3%BC%20x&source=sms"
    assert headers[b"cache-control"] == b"private, no-store"
    final = await edge.get(location.decode())
    assert final.status_code == 302
    assert parse_qs(urlsplit(final.headers["location"]).query) == {"s": ["ü x"], "src": ["sms"]}
