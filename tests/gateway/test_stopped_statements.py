"""A statement PostgreSQL stops before it finishes: an operator's ``lock_timeout`` or
``statement_timeout`` (on the role, the database, or as a parameter of TRACKLY_DATABASE_URL), or an
operator cancelling a query stuck behind a lock (``pg_cancel_backend``). Its transaction is rolled
back and nothing of the request is kept, as when the pool's own command_timeout stops a statement
(503): the client is told to retry, not that the server is broken (it was 500 internal_error, and a
traceback in the log for every request the operator's setting or cancel stopped)."""
from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from contextlib import AbstractAsyncContextManager
from dataclasses import replace

import httpx
import pytest

from services.gateway.app import create_app
from tests.helpers import lock_waiters, make_offer, row_held


def assert_unavailable(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.json()["success"] is False and resp.json()["code"] == "service_unavailable"


@pytest.fixture
async def gateway_with(settings):
    """An in-process gateway whose PostgreSQL sessions carry these settings (DSN parameters, which
    asyncpg sends as server settings: what ``ALTER ROLE ... SET`` would give them)."""
    stack: list = []

    async def start(**server_settings: str) -> httpx.AsyncClient:
        # Added to the DSN's own query (the embedded PostgreSQL's has ?host=...).
        dsn = urlsplit(settings.database_url)
        query = urlencode([*parse_qsl(dsn.query), *server_settings.items()])
        app = create_app(replace(settings, database_url=urlunsplit(dsn._replace(query=query))))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test")
        stack.append((lifespan, client))
        # It reaches PostgreSQL (a DSN it cannot use would answer every request 503, as the tests expect).
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        return client

    yield start
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


def _offer_locked(settings, offer_id: str) -> AbstractAsyncContextManager:
    return row_held(settings.database_url, "SELECT 1 FROM offers WHERE id = $1 FOR UPDATE", offer_id)


@pytest.mark.parametrize("setting", [{"lock_timeout": "200"}, {"statement_timeout": "200"}])
async def test_a_change_stopped_by_an_operators_timeout_answers_503(api, db, settings, tenant, gateway_with, setting):
    offer = await make_offer(api, tenant)
    gateway = await gateway_with(**setting)
    async with _offer_locked(settings, offer["id"]):
        resp = await gateway.patch(f"/api/v2/offers/{offer['id']}", json={"name": "Renamed"}, headers=tenant.headers)
    assert_unavailable(resp)
    assert await db.fetchval("SELECT name FROM offers WHERE id = $1", offer["id"]) == offer["name"]


async def test_a_keyed_send_stopped_by_an_operators_lock_timeout_answers_503_and_its_retry_is_stored(
    api, db, settings, tenant, gateway_with
):
    """The key's row held by another transaction (a request with the same key, on a gateway that
    froze): the send waits on it, is stopped, keeps nothing, and its retry is stored once."""
    gateway = await gateway_with(lock_timeout="200")
    send = {"to": "+14155550123", "list_id": tenant.list_id, "body": "hello"}
    headers = {**tenant.headers, "Idempotency-Key": "stopped-1"}
    async with row_held(
        settings.database_url,
        "INSERT INTO idempotency_keys (account_id, key, fingerprint, status, response) VALUES ($1, 'stopped-1', '\\x00', 201, '{}')",
        tenant.account_id,
    ):
        assert_unavailable(await gateway.post("/api/v2/send", json=send, headers=headers))
    assert await db.fetchval("SELECT count(*) FROM messages WHERE account_id = $1", tenant.account_id) == 0
    retried = await gateway.post("/api/v2/send", json=send, headers=headers)
    assert retried.status_code == 201, retried.text
    assert await db.fetchval("SELECT count(*) FROM messages WHERE account_id = $1", tenant.account_id) == 1


async def test_a_query_an_operator_cancels_answers_503_and_its_connection_serves_again(api, db, settings, tenant):
    """``pg_cancel_backend`` on a request waiting behind a lock (the gentle way out of a stuck
    query): the request is told to retry, and the pool's connection is handed back, usable."""
    offer = await make_offer(api, tenant)
    async with _offer_locked(settings, offer["id"]):
        patch = asyncio.ensure_future(
            api.patch(f"/api/v2/offers/{offer['id']}", json={"name": "Renamed"}, headers=tenant.headers))
        await lock_waiters(db, 1)
        pid = await db.fetchval("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
        assert await db.fetchval("SELECT pg_cancel_backend($1)", pid)
        resp = await asyncio.wait_for(patch, 30)
    assert_unavailable(resp)
    again = await api.patch(f"/api/v2/offers/{offer['id']}", json={"name": "Renamed"}, headers=tenant.headers)
    assert again.status_code == 200 and again.json()["offer"]["name"] == "Renamed", again.text


async def test_a_change_cut_short_by_the_gateways_shutdown_answers_503_and_keeps_nothing(
    api, db, settings, tenant, gateway_app
):
    """uvicorn cancels what still runs when a graceful shutdown runs out: a change waiting on its
    offer's row lock was answered uvicorn's 500 in plain text (the app sent nothing). It is
    answered 503 in the contract's error body, and still cancelled."""
    offer = await make_offer(api, tenant)
    sent: list[dict] = []
    body = json.dumps({"name": "Renamed"}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PATCH", "scheme": "http",
             "path": f"/api/v2/offers/{offer['id']}", "raw_path": f"/api/v2/offers/{offer['id']}".encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"gw"), (b"x-api-key", tenant.api_key.encode()), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    bodies = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> dict:
        return next(bodies, None) or await asyncio.Event().wait()  # (then nothing more: the client waits)

    async def send(message: dict) -> None:
        sent.append(message)

    async with _offer_locked(settings, offer["id"]):
        change = asyncio.ensure_future(gateway_app(scope, receive, send))
        await lock_waiters(db, 1)
        change.cancel()
        with pytest.raises(asyncio.CancelledError):
            await change
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], sent
    assert sent[0]["status"] == 503
    answer = json.loads(sent[1]["body"])
    assert answer["success"] is False and answer["code"] == "service_unavailable"
    assert await db.fetchval("SELECT name FROM offers WHERE id = $1", offer["id"]) == offer["name"]
