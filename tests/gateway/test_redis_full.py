"""The gateway on a full Redis (maxmemory reached, ``noeviction``): writes that must publish fail
cleanly and leave nothing behind; postbacks, stored in PostgreSQL first, are still taken. The
gateway here (``api``) and ``redis`` use a Redis server of this module's own."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import httpx
import pytest

from services.gateway.app import create_app
from shared.embedded import EmbeddedRedis
from shared.settings import Settings
from tests.gateway.test_api_basics import assert_error
from tests.helpers import own_redis_server, redis_on_own_server  # noqa: F401 (fixtures: ``redis`` is a server of this module's own)
from tests.helpers import Tenant, make_offer, random_phone, redis_full


@pytest.fixture
async def gateway_app(settings: Settings, own_redis_server: EmbeddedRedis) -> AsyncIterator[object]:
    app = create_app(replace(settings, redis_url=own_redis_server.url))
    async with app.router.lifespan_context(app):
        yield app


async def test_writes_that_cannot_publish_are_503_and_nothing_half_written(
    db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant
) -> None:
    offer = await make_offer(api, tenant)
    link = (await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id})).json()
    send = {"to": random_phone(), "list_id": tenant.list_id, "body": f"hi {link['shortUrl']}"}
    async with redis_full(redis):
        for resp in [
            await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id}),
            await api.post("/api/v2/send", headers=tenant.headers, json=send),
            await api.post("/api/v2/offers", headers=tenant.headers, json={"name": "B", "destination_url": "https://example.com/b"}),
        ]:
            assert_error(resp, 503, "service_unavailable")
    account = tenant.account_id
    assert await db.fetchval("SELECT count(*) FROM links WHERE account_id = $1", account) == 1
    assert await db.fetchval("SELECT count(*) FROM messages WHERE account_id = $1", account) == 0
    assert await db.fetchval("SELECT count(*) FROM offers WHERE account_id = $1", account) == 1
    assert (await api.post("/api/v2/send", headers=tenant.headers, json=send)).status_code == 201


async def test_a_postback_is_taken_while_redis_is_full(db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant) -> None:
    async with redis_full(redis):
        resp = await api.get(f"/postback/{tenant.postback_token}", params={"click_id": "x" * 32, "payout": "1.50"})
    assert resp.status_code == 200, resp.text
    assert await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1", tenant.account_id) == 1


async def test_a_send_with_expiring_codes_on_a_full_redis_is_503(
    db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant, settings: Settings, own_redis_server: EmbeddedRedis
) -> None:
    """With TRACKLY_MESSAGE_CODE_DAYS the codes are written by a script, and Redis before 7 (the
    embedded one) reports its OOM as a script error: 503 all the same, not 500."""
    link = (await api.post("/api/v2/links", headers=tenant.headers,
                           json={"offerId": (await make_offer(api, tenant))["id"], "listId": tenant.list_id})).json()
    app = create_app(replace(settings, redis_url=own_redis_server.url, message_code_days=30))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://g"
    ) as gateway:
        send = {"to": random_phone(), "list_id": tenant.list_id, "body": f"hi {link['shortUrl']}"}
        async with redis_full(redis):
            assert_error(await gateway.post("/api/v2/send", headers=tenant.headers, json=send), 503, "service_unavailable")
        assert await db.fetchval("SELECT count(*) FROM messages WHERE account_id = $1", tenant.account_id) == 0
        assert (await gateway.post("/api/v2/send", headers=tenant.headers, json=send)).status_code == 201


async def test_an_offer_change_on_a_full_redis_is_503_and_not_made(
    db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant
) -> None:
    """A pause (or delete) that cannot reach the edge is not made: the edge and PostgreSQL keep
    agreeing, and the client retries."""
    offer = await make_offer(api, tenant)
    async with redis_full(redis):
        paused = await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"status": "paused"})
        deleted = await api.delete(f"/api/v2/offers/{offer['id']}", headers=tenant.headers)
    assert_error(paused, 503, "service_unavailable")
    assert_error(deleted, 503, "service_unavailable")
    assert await db.fetchval("SELECT status FROM offers WHERE id = $1", offer["id"]) == "active"
    resp = await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"status": "paused"})
    assert resp.status_code == 200 and resp.json()["offer"]["status"] == "paused", resp.text
