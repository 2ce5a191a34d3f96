"""Redis trouble at the edge, and the operations endpoints."""
from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx

from shared import edge as edge_contract
from shared.embedded import EmbeddedRedis
from shared.redis_client import create_redis
from shared.settings import Settings
from tests.helpers import Tenant, metric_value
from tests.redirect.conftest import Edge, drain, offer_and_link, running_edge, spare_redis_with_link


async def test_cached_links_keep_redirecting_while_redis_is_down(
    api: httpx.AsyncClient, tenant: Tenant, settings: Settings, redis: object, tmp_path: Path
) -> None:
    offer, link = await offer_and_link(api, tenant, "https://lp.example/land?s={sub1}")
    async with spare_redis_with_link(redis, link, offer["id"], tmp_path / "spare-redis") as spare:
        ttl = 0.05
        async with running_edge(settings, redis_url=spare.url, link_cache_ttl=ttl) as edge:
            tracker = (await edge.get(link["shortUrl"] + "?sub1=a")).headers["location"]
            assert (await edge.get(tracker)).status_code == 302
            assert (await edge.get("http://edge/readyz")).status_code == 200

            spare.stop()
            # Fresh entries: answered without Redis.
            assert (await edge.get(link["shortUrl"] + "?sub1=a")).headers["location"] == tracker
            await asyncio.sleep(ttl * 3)
            # Expired entries: Redis fails, the stale entry is served.
            short = await edge.get(link["shortUrl"] + "?sub1=a")
            assert short.status_code == 302 and short.headers["location"] == tracker
            head = await edge.head(tracker)
            assert head.status_code == 302 and head.headers["location"] == "https://lp.example/land?s=a"
            # A click cannot be recorded: never a 302 for it.
            failed = await edge.get(tracker)
            assert failed.status_code == 503
            assert failed.headers["cache-control"] == "private, no-store"
            # A code never seen cannot be answered either way.
            assert (await edge.get("https://sms.example.com/Qq1Qq1")).status_code == 503
            ready = await edge.get("http://edge/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
            metrics = (await edge.get("http://edge/metrics")).text
            assert metric_value(metrics, "trackly_redirect_stale_served_total") >= 1
            assert metric_value(metrics, "trackly_redirect_clicks_failed_total") == 1



async def test_health_readiness_and_metrics(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool, redis: object
) -> None:
    assert (await edge.get("http://edge/healthz")).json() == {"status": "ok"}
    ready = await edge.get("http://edge/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] == "ok"

    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    await drain(db, redis)
    for _ in range(3):
        await edge.click(link["shortUrl"])
    await edge.get("https://sms.example.com/Nope00")
    metrics = await edge.get("http://edge/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert metric_value(text, "trackly_redirect_requests_total", '{hop="short",status="302"}') == 3
    assert metric_value(text, "trackly_redirect_requests_total", '{hop="tracker",status="302"}') == 3
    assert metric_value(text, "trackly_redirect_requests_total", '{hop="short",status="404"}') == 1
    assert metric_value(text, "trackly_redirect_request_seconds_count") >= 7
    assert metric_value(text, "trackly_redirect_clicks_recorded_total") == 3
    assert metric_value(text, "trackly_click_stream_length") >= 1  # the three clicks wait for the drainer
    await asyncio.sleep(0.3)
    waited = metric_value((await edge.get("http://edge/metrics")).text, "trackly_click_stream_oldest_seconds")
    assert 0.3 <= waited < 60  # the drain's lag: seconds since Redis took the oldest batch
    await drain(db, redis)
    after = (await edge.get("http://edge/metrics")).text
    assert metric_value(after, "trackly_click_stream_length") == 0
    assert metric_value(after, "trackly_click_stream_pending") == 0
    assert metric_value(after, "trackly_click_stream_oldest_seconds") == 0


async def test_the_stream_gauges_go_while_redis_cannot_be_read(settings: Settings, tmp_path: Path) -> None:
    """Their last values would say the stream is drained while nobody can tell."""
    private = EmbeddedRedis(tmp_path / "redis")
    private.start()
    try:
        async with running_edge(settings, redis_url=private.url) as e:
            client = create_redis(private.url)
            await client.xgroup_create(edge_contract.CLICK_STREAM, edge_contract.CLICK_GROUP, id="0", mkstream=True)
            await client.aclose()
            assert "trackly_click_stream_length" in (await e.get("http://edge/metrics")).text
            private.stop()
            text = (await e.get("http://edge/metrics")).text
            assert "trackly_click_stream_length" not in text and "trackly_click_stream_pending" not in text
            assert "trackly_click_stream_oldest_seconds" not in text
    finally:
        private.stop()


async def test_the_stream_gauges_show_clicks_no_worker_has_seen_yet(
    api: httpx.AsyncClient, tenant: Tenant, settings: Settings, redis: object, tmp_path: Path
) -> None:
    """A Redis that came back empty (no persistence) while the workers are down, or a redirect
    deployed before any worker ran: the clicks' XADD makes the stream, but the drainers' group
    does not exist until a worker makes it. The waiting clicks are what the gauges are for: the
    pending count is 0 (nobody holds any), the length and age are the stream's."""
    offer, link = await offer_and_link(api, tenant, "https://lp.example/land")
    async with spare_redis_with_link(redis, link, offer["id"], tmp_path / "spare-redis") as spare:
        async with running_edge(settings, redis_url=spare.url) as e:
            await e.click(link["shortUrl"])
            await asyncio.sleep(0.3)
            text = (await e.get("http://edge/metrics")).text
            assert metric_value(text, "trackly_click_stream_length") == 1
            assert metric_value(text, "trackly_click_stream_pending") == 0
            assert 0.3 <= metric_value(text, "trackly_click_stream_oldest_seconds") < 60


async def test_start_notes_a_redis_that_does_not_keep_what_it_acknowledges(settings: Settings, tmp_path: Path) -> None:
    """A 302 says the click is stored; on a Redis without appendfsync always that is not quite
    so, and the redirect says it when it starts (a warning in its log)."""
    private = EmbeddedRedis(tmp_path / "redis")
    private.start()
    try:
        async with running_edge(settings, redis_url=private.url) as e:
            assert e.app.redis_persistence_problem is None
        client = create_redis(private.url)
        await client.config_set("appendonly", "no")
        await client.aclose()
        async with running_edge(settings, redis_url=private.url) as e:
            assert "appendonly is off" in (e.app.redis_persistence_problem or "")
    finally:
        private.stop()
