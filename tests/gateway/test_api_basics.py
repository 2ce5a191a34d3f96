"""Auth, account scoping, the uniform error body, limits and health endpoints."""
import asyncio
import contextlib
import gc
import secrets
import signal
import time
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from services.gateway.app import create_app
from shared import redis_client
from shared.embedded import EmbeddedRedis
from shared.migrate import migrate
from tests.helpers import make_offer, make_tenant, scratch_database


def assert_error(resp, status, code):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["success"] is False and body["code"] == code and body["error"]


@pytest.mark.parametrize("headers", [{}, {"X-Api-Key": "trk_" + "0" * 32}, {"X-Api-Key": ""}])
async def test_missing_or_unknown_key_is_401(api, headers):
    assert_error(await api.get("/api/v2/offers", headers=headers), 401, "unauthorized")
    assert_error(await api.post("/api/v2/send", headers=headers, json={}), 401, "unauthorized")


async def test_other_accounts_resources_answer_404(api, db, tenant):
    other = await make_tenant(db)
    offer = await make_offer(api, other)
    assert_error(await api.get(f"/api/v2/offers/{offer['id']}", headers=tenant.headers), 404, "offer_not_found")
    assert_error(await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"name": "x"}), 404, "offer_not_found")
    assert_error(await api.delete(f"/api/v2/offers/{offer['id']}", headers=tenant.headers), 404, "offer_not_found")
    assert_error(await api.get(f"/api/v2/lists/{other.list_id}", headers=tenant.headers), 404, "list_not_found")
    listed = (await api.get("/api/v2/offers", headers=tenant.headers)).json()
    assert all(o["id"] != offer["id"] for o in listed["offers"])
    resp = await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id})
    assert_error(resp, 404, "offer_not_found")
    resp = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": "+14155551234", "list_id": other.list_id, "body": "hi"})
    assert_error(resp, 404, "list_not_found")
    sent = await api.post("/api/v2/send", headers=other.headers,
                          json={"to": "+14155551234", "list_id": other.list_id, "body": "hi"})
    assert_error(await api.get(f"/api/v2/messages/{sent.json()['message_id']}", headers=tenant.headers), 404, "message_not_found")


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b'"text"', b"{\"a\": NaN}"])
async def test_invalid_json_is_400(api, tenant, body):
    resp = await api.post("/api/v2/offers", headers={**tenant.headers, "Content-Type": "application/json"}, content=body)
    assert_error(resp, 400, "invalid_json")


@pytest.mark.parametrize("size", [5_000_001, 5 * 1024 * 1024 + 1])
async def test_body_over_5mb_is_413(api, tenant, size):
    big = b'{"name": "' + b"x" * (size - 12) + b'"}'
    assert len(big) == size
    assert_error(await api.post("/api/v2/offers", headers=tenant.headers, content=big), 413, "payload_too_large")


async def test_body_of_5mb_is_read(api, tenant):
    just = b'{"name": "' + b"x" * (5_000_000 - 12) + b'"}'
    assert_error(await api.post("/api/v2/offers", headers=tenant.headers, content=just), 400, "validation_error")


async def test_unknown_route_is_uniform_404(api, tenant):
    assert_error(await api.get("/api/v2/nothing-here", headers=tenant.headers), 404, "not_found")
    assert_error(await api.get("/api/v2/nothing-here/", headers=tenant.headers), 404, "not_found")


async def test_trailing_slash_is_the_same_route(api, tenant):
    created = await api.post("/api/v2/offers/", headers=tenant.headers, json={"name": "n", "destination_url": "https://e.com"})
    assert created.status_code == 201
    listed = await api.get("/api/v2/offers/", headers=tenant.headers)
    assert listed.status_code == 200 and [o["id"] for o in listed.json()["offers"]] == [created.json()["offer"]["id"]]


async def test_health_endpoints(api):
    assert (await api.get("/healthz")).json()["status"] == "ok"
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["postgres"] == "ok" and ready.json()["redis"] == "ok"
    await api.get("/api/v2/offers/abc", headers={"X-Api-Key": "nope"})
    metrics = await api.get("/metrics")
    assert metrics.status_code == 200
    assert 'trackly_gateway_requests_total{method="GET",route="/api/v2/offers/{offer_id}",status="401"}' in metrics.text
    assert 'trackly_gateway_request_seconds_count{route="/readyz"}' in metrics.text
    assert "process_cpu_seconds_total" in metrics.text


async def test_ready_while_every_pooled_connection_is_busy(api, gateway_app, db):
    """Requests queued behind one row lock hold the whole pool: PostgreSQL still answers, so the
    gateway is ready (a 503 took every gateway out of its balancer at once). /readyz asks on a
    connection of its own then, and leaves the pool as it was."""
    pool = gateway_app.state.db
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        assert pool.get_idle_size() == 0
        ready = await api.get("/readyz")
        assert (ready.status_code, ready.json()["postgres"]) == (200, "ok"), ready.text
        assert pool.get_size() == pool.get_max_size() and pool.get_idle_size() == 0
        # It does ask: a database it cannot reach then is not ready.
        settings = gateway_app.state.settings
        gateway_app.state.settings = replace(
            settings, database_url=urlunsplit(urlsplit(settings.database_url)._replace(path="/trackly_no_such_db")))
        try:
            gone = await api.get("/readyz")
        finally:
            gateway_app.state.settings = settings
        assert (gone.status_code, gone.json()["postgres"]) == (503, "error: InvalidCatalogNameError"), gone.text
    finally:
        for conn in held:
            await pool.release(conn)



async def test_readiness_waits_for_the_schema_of_this_release(settings, db):
    """A gateway of a new release started on a database without its latest migration (deployed
    before ``trackly migrate`` ran) is not ready, and says what is missing; once applied, it is."""
    from shared.migrate import _migrations

    async with scratch_database(settings, db, f"trackly_behind_{secrets.token_hex(4)}") as dsn:
        await migrate(dsn)
        latest = _migrations()[-1][0]
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("DELETE FROM schema_migrations WHERE version = $1", latest)
            app = create_app(replace(settings, database_url=dsn))
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://g"
            ) as gateway:
                ready = await gateway.get("/readyz")
                assert ready.status_code == 503, ready.text
                assert ready.json() == {"status": "unavailable", "postgres": "ok", "redis": "ok",
                                        "schema": f"behind: 1 not applied ({latest}): run trackly migrate"}
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", latest)
                ready = await gateway.get("/readyz")
                assert ready.status_code == 200 and ready.json()["schema"] == "ok", ready.text
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def gateway_on_private_redis(settings, tmp_path):
    """(a gateway client, its Redis): a gateway whose Redis the test may stop."""
    private = EmbeddedRedis(tmp_path / "redis")
    private.start()
    app = create_app(replace(settings, redis_url=private.url))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://g") as gateway:
                yield gateway, private
    finally:
        private.stop()


async def test_the_gateway_starts_without_its_dependencies_and_says_so(settings, db, tmp_path):
    """PostgreSQL (here: a database not created yet) and Redis (not started yet) unreachable at
    start: the gateway serves /healthz, /readyz says what is missing, a request that needs them
    answers 503; once they are there, it works without a restart."""
    name = f"trackly_late_{secrets.token_hex(4)}"
    late_redis = EmbeddedRedis(tmp_path / "redis")
    app = create_app(replace(settings, database_url=urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}")),
                             redis_url=late_redis.url))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://g") as gateway:
                assert (await gateway.get("/healthz")).status_code == 200
                ready = await gateway.get("/readyz")
                assert ready.status_code == 503, ready.text
                assert ready.json()["postgres"] == "error: DatabaseUnavailable" and ready.json()["redis"].startswith("error")
                assert_error(await gateway.get("/api/v2/offers", headers={"X-Api-Key": "trk_x"}), 503, "service_unavailable")
                # The pipeline's gauges are left out while they cannot be read (not shown as zero).
                metrics = await gateway.get("/metrics")
                assert metrics.status_code == 200
                assert "trackly_postbacks_waiting" not in metrics.text and "trackly_worker_queue_jobs" not in metrics.text
                await db.execute(f"CREATE DATABASE {name}")
                await migrate(app.state.settings.database_url)
                late_redis.start()
                ready = await gateway.get("/readyz")
                assert ready.status_code == 200, ready.text
                tenant = await make_tenant(app.state.db)  # through the gateway's own pool
                offer = await gateway.post("/api/v2/offers", headers=tenant.headers, json={"name": "n", "destination_url": "https://e.com"})
                assert offer.status_code == 201, offer.text
                metrics = (await gateway.get("/metrics")).text
                assert "\ntrackly_postbacks_waiting 0.0\n" in metrics and "\ntrackly_worker_queue_jobs 0.0\n" in metrics
    finally:
        late_redis.stop()
        await db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_start_notes_a_redis_that_does_not_keep_what_it_acknowledges(settings, tmp_path):
    """Published links and attribution jobs live in Redis: the gateway warns at start when its
    Redis does not fsync every write, as the redirect does."""
    private = EmbeddedRedis(tmp_path / "redis")  # appendfsync always, as trackly run's own
    private.start()
    try:
        app = create_app(replace(settings, redis_url=private.url))
        async with app.router.lifespan_context(app):
            assert app.state.redis_persistence_problem is None
            await app.state.redis.config_set("appendfsync", "everysec")
        app = create_app(replace(settings, redis_url=private.url))
        async with app.router.lifespan_context(app):
            assert "everysec" in (app.state.redis_persistence_problem or "")
    finally:
        private.stop()


async def test_redis_down_is_503_and_nothing_half_written(settings, db, tenant, api, tmp_path):
    """A link is published to Redis before its row commits: with Redis gone the call fails
    cleanly (503, retry) and leaves no link row behind; /readyz says so."""
    body = {"offerId": (await make_offer(api, tenant))["id"], "listId": tenant.list_id}
    async with gateway_on_private_redis(settings, tmp_path) as (gateway, private):
        assert (await gateway.post("/api/v2/links", headers=tenant.headers, json=body)).status_code == 201
        private.stop()
        assert_error(await gateway.post("/api/v2/links", headers=tenant.headers, json=body), 503, "service_unavailable")
        ready = await gateway.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"].startswith("error")
    assert await db.fetchval("SELECT count(*) FROM links WHERE account_id = $1", tenant.account_id) == 1


async def test_a_redis_that_stops_answering_is_503_not_a_hang(settings, db, tenant, api, tmp_path, monkeypatch):
    """Redis accepts the connection but never answers (stopped, swapping): the call times out into
    503 and rolls back, instead of waiting until Redis returns and committing behind the back of a
    client that gave up and retried."""
    monkeypatch.setattr(redis_client, "SOCKET_TIMEOUT", 0.5)
    body = {"offerId": (await make_offer(api, tenant))["id"], "listId": tenant.list_id}
    async with gateway_on_private_redis(settings, tmp_path) as (gateway, private):
        assert (await gateway.post("/api/v2/links", headers=tenant.headers, json=body)).status_code == 201
        private.process.send_signal(signal.SIGSTOP)
        try:
            resp = await asyncio.wait_for(gateway.post("/api/v2/links", headers=tenant.headers, json=body), 10)
            assert_error(resp, 503, "service_unavailable")
            ready = await asyncio.wait_for(gateway.get("/readyz"), 10)
            assert ready.status_code == 503 and ready.json()["redis"].startswith("error")
        finally:
            private.process.send_signal(signal.SIGCONT)
    assert await db.fetchval("SELECT count(*) FROM links WHERE account_id = $1", tenant.account_id) == 1


async def test_a_connection_broken_mid_operation_is_503(api, tenant, monkeypatch):
    """asyncpg's InternalClientError is what a connection whose server died mid-operation raises
    (a black-box audit saw it on sends, postbacks and reads): a dependency failure, 503 and retry,
    not a 500."""
    from services.gateway import sending

    async def broken(*args, **kwargs):
        raise asyncpg.exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress")

    monkeypatch.setattr(sending, "find_lists", broken)
    resp = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": "+14155550188", "list_id": tenant.list_id, "body": "hi"})
    assert_error(resp, 503, "service_unavailable")


async def test_readiness_answers_in_time_even_when_a_check_cannot_be_cancelled_quickly():
    """A query to a PostgreSQL that stopped answering takes as long to cancel as to run (the
    cancel request goes to that same server): readiness does not wait for the cancellation."""
    from services.gateway.health import _probe

    async def stuck() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(3)  # cancelling takes long too
            raise

    start = time.monotonic()
    assert await _probe(stuck(), timeout=0.2) == "error: TimeoutError"
    assert time.monotonic() - start < 2
    assert await _probe(asyncio.sleep(0, "fine"), timeout=1) == "ok"

    async def failing() -> None:
        raise ConnectionRefusedError

    assert await _probe(failing()) == "error: ConnectionRefusedError"


async def test_the_gateway_keeps_what_it_starts_with_out_of_the_collectors_sight(settings):
    """A full collection during a request walks that request's objects, not every module, route
    and pool object of the process (it stalled every request in flight for ~25 ms)."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        assert gc.get_freeze_count() > 10_000
