"""Postbacks while PostgreSQL cannot store them: spooled in Redis, answered 200, stored by the
worker once PostgreSQL is back (``shared.postback_store``, ``services.worker.spool``).

A network retries a postback it got no 2xx for only a few times (some never): each one refused
during a PostgreSQL restart or failover was a conversion lost."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import orjson
import pytest
from arq.connections import ArqRedis

from services.gateway.app import create_app
from services.gateway.routes import postbacks as postback_route
from services.worker import main as worker_main
from services.worker import spool
from shared import postback_store
from shared.postback_fields import normalise
from shared.postback_store import SPOOL_REFUSED, SPOOL_STREAM, spool_entry, store
from tests.helpers import free_port, make_offer, make_tenant, metric_value, postgres_link
from tests.worker.conftest import burst_worker


@pytest.fixture
async def empty_spool(redis) -> AsyncIterator[None]:
    await redis.delete(SPOOL_STREAM, SPOOL_REFUSED)
    yield
    await redis.delete(SPOOL_STREAM, SPOOL_REFUSED)


async def _gateway(settings, database_url: str, redis_url: str | None = None):
    app = create_app(replace(settings, database_url=database_url, redis_url=redis_url or settings.redis_url))
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test")
    return app, lifespan, client


async def _stop(lifespan, client) -> None:
    await client.aclose()
    await lifespan.__aexit__(None, None, None)


def _unreachable(settings) -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/trackly"


async def test_postbacks_while_postgresql_is_down_are_answered_spooled_and_stored_later(
    settings, db, redis, api, tenant, empty_spool
):
    offer = await make_offer(api, tenant, payout="2.00")
    arq = ArqRedis(pool_or_conn=redis.connection_pool)
    # The token answered for its account lately (a HEAD stores nothing): a gateway started since,
    # with no PostgreSQL to ask, finds it among the tokens known in Redis.
    assert (await api.head(f"/postback/{tenant.postback_token}")).status_code == 200
    before = datetime.now(UTC)
    _, lifespan, gateway = await _gateway(settings, _unreachable(settings))
    try:
        answers = [
            await gateway.get(f"/postback/{tenant.postback_token}",
                              params={"conversion_id": "spool-1", "payout": "3.25"}),
            # A JSON body: its numbers are kept exactly as sent.
            await gateway.post(f"/postback/{tenant.postback_token}",
                               json={"conversion_id": "spool-2", "payout": 1.50, "offer_id": offer["id"]}),
        ]
        # A token no gateway has seen lately: nothing vouches for it, and anyone may send any: 503.
        unknown = await gateway.get("/postback/notatokenofanyaccount", params={"conversion_id": "spool-3"})
        assert (unknown.status_code, unknown.json()["code"]) == (503, "service_unavailable")
        # Not ready for the API, ready for postbacks (a balancer routes /postback/ by the latter).
        assert (await gateway.get("/readyz")).status_code == 503
        ready = await gateway.get("/readyz/postbacks")
        assert ready.status_code == 200 and ready.json()["postgres"].startswith("error"), ready.text
    finally:
        await _stop(lifespan, gateway)
    assert [(a.status_code, a.json()["status"]) for a in answers] == [(200, "accepted")] * 2, [a.text for a in answers]
    assert await redis.xlen(SPOOL_STREAM) == 2
    assert metric_value((await api.get("/metrics")).text, "trackly_postback_spool") == 2

    assert await spool.drain_spool_once(db, redis, arq) == 2
    assert await redis.xlen(SPOOL_STREAM) == 0 and await redis.xlen(SPOOL_REFUSED) == 0
    assert metric_value((await api.get("/metrics")).text, "trackly_postback_spool") == 0
    rows = await db.fetch(
        "SELECT conversion_key, payout, params, received_at, spool_id, processed_at FROM postbacks"
        " WHERE account_id = $1 ORDER BY id", tenant.account_id)
    assert [r["conversion_key"] for r in rows] == ["spool-1", "spool-2"]
    # Stored as the receiver stores one at once: the same postback sent to a gateway with PostgreSQL.
    direct = await api.post(f"/postback/{tenant.postback_token}",
                            json={"conversion_id": "direct-2", "payout": 1.50, "offer_id": offer["id"]})
    assert direct.json()["status"] == "accepted"
    row = await db.fetchrow("SELECT payout, params FROM postbacks WHERE account_id = $1 AND conversion_key = 'direct-2'",
                            tenant.account_id)
    assert [str(r["payout"]) for r in rows] == ["3.25", str(row["payout"])]
    assert {**rows[1]["params"], "conversion_id": "direct-2"} == row["params"]
    assert all(before <= r["received_at"] <= datetime.now(UTC) and r["spool_id"] for r in rows)
    await burst_worker(settings)  # runs the jobs the drain enqueued
    conversions = await db.fetch("SELECT payout FROM conversions WHERE account_id = $1 ORDER BY payout",
                                 tenant.account_id)
    assert [c["payout"] for c in conversions] == [Decimal("1.5"), Decimal("1.5"), Decimal("3.25")]



async def test_a_demoted_primary_read_only_after_a_failover_spools(settings, db, redis, tenant, empty_spool):
    """The token is looked up (reads work); the INSERT is refused as read-only: spooled, with its account."""
    dsn = settings.database_url + ("&" if "?" in settings.database_url else "?") + "default_transaction_read_only=on"
    _, lifespan, gateway = await _gateway(settings, dsn)
    try:
        resp = await gateway.get(f"/postback/{tenant.postback_token}", params={"conversion_id": "ro-1", "payout": "1"})
    finally:
        await _stop(lifespan, gateway)
    assert (resp.status_code, resp.json()["status"]) == (200, "accepted")
    [(_, fields)] = await redis.xrange(SPOOL_STREAM)
    assert b'"a":%d' % tenant.account_id in fields[b"p"]
    assert await spool.drain_spool_once(db, redis) == 1
    assert await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1 AND conversion_key = 'ro-1'",
                             tenant.account_id) == 1


@pytest.mark.parametrize("how", ["cut", "freeze"])
async def test_postgresql_hanging_spools_within_the_budget(settings, db, redis, tenant, empty_spool, monkeypatch, how):
    """A PostgreSQL that answers nothing (a partition; or frozen, which also takes the connection
    asyncpg opens to cancel the statement, and never answers it) held a postback up to the pool's
    60 s command timeout, past any network's patience."""
    monkeypatch.setattr(postback_route, "POSTBACK_DB_BUDGET", 1.0)
    link, through = postgres_link(settings.database_url)
    await link.mend()
    _, lifespan, gateway = await _gateway(settings, through(link.port))
    try:
        first = await gateway.get(f"/postback/{tenant.postback_token}", params={"conversion_id": "hang-1"})
        assert first.status_code == 200  # stored in PostgreSQL; the token's account is remembered
        await (link.cut() if how == "cut" else link.freeze())
        started = time.monotonic()
        second = await gateway.get(f"/postback/{tenant.postback_token}", params={"conversion_id": "hang-2"})
        assert time.monotonic() - started < 5
    finally:
        await _stop(lifespan, gateway)
        link.close()
    assert (second.status_code, second.json()["status"]) == (200, "accepted")
    assert await redis.xlen(SPOOL_STREAM) == 1
    await spool.drain_spool_once(db, redis)
    keys = await db.fetch("SELECT conversion_key FROM postbacks WHERE account_id = $1 ORDER BY id", tenant.account_id)
    assert [k["conversion_key"] for k in keys] == ["hang-1", "hang-2"]


async def test_with_redis_down_too_the_answer_is_503(settings, tenant, empty_spool):
    _, lifespan, gateway = await _gateway(settings, _unreachable(settings), f"redis://127.0.0.1:{free_port()}/0")
    try:
        resp = await gateway.get(f"/postback/{tenant.postback_token}", params={"conversion_id": "both-down"})
        assert (await gateway.get("/readyz/postbacks")).status_code == 503
    finally:
        await _stop(lifespan, gateway)
    assert (resp.status_code, resp.json()["code"]) == (503, "service_unavailable")


async def test_a_spooled_postback_is_stored_once_whatever_fails_between_store_and_delete(db, redis, tenant, empty_spool):
    """The worker died after its commit, before the entry's delete (or two workers took it): the
    entry is stored once. A postback naming neither id is its own conversion, so nothing else
    would tell the two apart."""
    now = datetime.now(UTC)
    entry = spool_entry(account_id=tenant.account_id, token_digest=None, received_at=now, method="GET",
                        params={"payout": "4.00", "offer_id": "none-such"}, body_error=None, conversion_key=None)
    entry_id = (await redis.xadd(SPOOL_STREAM, entry)).decode()
    params = {"payout": "4.00", "offer_id": "none-such"}
    await store(db, tenant.account_id, now, "GET", params, normalise(params, now), spool_id=entry_id)
    assert await spool.drain_spool_once(db, redis) == 1
    assert await redis.xlen(SPOOL_STREAM) == 0
    assert await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1", tenant.account_id) == 1
    # Two workers at once: one drains, the other finds the spool held.
    entry_id = (await redis.xadd(SPOOL_STREAM, entry)).decode()
    assert sorted(await asyncio.gather(spool.drain_spool_once(db, redis), spool.drain_spool_once(db, redis))) == [0, 1]
    assert await db.fetchval("SELECT count(*) FROM postbacks WHERE spool_id = $1", entry_id) == 1
    assert await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1", tenant.account_id) == 2


async def test_a_spooled_repeat_of_a_stored_postback_is_a_duplicate(db, redis, tenant, empty_spool):
    now = datetime.now(UTC)
    params = {"conversion_id": "rep-1", "payout": "2"}
    await store(db, tenant.account_id, now, "GET", params, normalise(params, now))
    await redis.xadd(SPOOL_STREAM, spool_entry(account_id=tenant.account_id, token_digest=None, received_at=now,
                                               method="GET", params=params, body_error=None, conversion_key=None))
    await spool.drain_spool_once(db, redis)
    rows = await db.fetch("SELECT is_duplicate FROM postbacks WHERE account_id = $1 ORDER BY id", tenant.account_id)
    assert [r["is_duplicate"] for r in rows] == [False, True]


async def test_a_postback_naming_no_conversion_stored_before_its_answer_was_lost_is_stored_once(db, redis, tenant, empty_spool):
    """Its INSERT committed, then PostgreSQL's answer never came (a connection lost, the budget run
    out): the gateway spooled it. A postback with neither id is its own conversion, under a random
    key: stored again under another, it would have been a second conversion (and its money twice)."""
    now = datetime.now(UTC)
    params = {"payout": "4.00", "offer_id": "none-such"}
    pb = normalise(params, now)
    await store(db, tenant.account_id, now, "GET", params, pb)  # committed; the gateway never heard
    await redis.xadd(SPOOL_STREAM, spool_entry(account_id=tenant.account_id, token_digest=None, received_at=now,
                                               method="GET", params=params, body_error=None,
                                               conversion_key=pb.conversion_key))
    await spool.drain_spool_once(db, redis)
    rows = await db.fetch("SELECT is_duplicate FROM postbacks WHERE account_id = $1 ORDER BY id", tenant.account_id)
    assert [r["is_duplicate"] for r in rows] == [False, True]


async def test_entries_postgresql_refuses_are_set_aside_and_the_rest_stored(api, db, redis, tenant, empty_spool):
    now = datetime.now(UTC)

    def entry(account_id: int, key: str) -> dict[str, bytes]:
        return spool_entry(account_id=account_id, token_digest=None, received_at=now, method="GET",
                           params={"conversion_id": key}, body_error=None, conversion_key=None)

    await redis.xadd(SPOOL_STREAM, entry(2**62, "deleted-account"))  # no such account: its foreign key refuses it
    # A token known lately but no longer (rotated since, its grace over): dropped, as a 401.
    await redis.xadd(SPOOL_STREAM, spool_entry(account_id=None, token_digest=bytes(32), received_at=now, method="GET",
                                               params={"conversion_id": "gone-token"}, body_error=None,
                                               conversion_key=None))
    await redis.xadd(SPOOL_STREAM, {"p": b"not json", "q": b"{}"})
    await redis.xadd(SPOOL_STREAM, entry(tenant.account_id, "after"))
    assert await spool.drain_spool_once(db, redis) == 4
    assert await redis.xlen(SPOOL_STREAM) == 0
    refused = await redis.xrange(SPOOL_REFUSED)
    assert [fields[b"why"].split(b":")[0] for _, fields in refused] == [b"refused by postgresql", b"unreadable"]
    assert await db.fetchval("SELECT conversion_key FROM postbacks WHERE account_id = $1", tenant.account_id) == "after"
    assert metric_value((await api.get("/metrics")).text, "trackly_postback_spool_refused") == 2


async def test_a_running_worker_stores_the_spool_on_its_own(settings, db, redis, tenant, empty_spool):
    ctx: dict = {"settings": settings, "redis": ArqRedis(pool_or_conn=redis.connection_pool)}  # (arq gives "redis")
    await worker_main.startup(ctx)
    try:
        await redis.xadd(SPOOL_STREAM, spool_entry(account_id=tenant.account_id, token_digest=None,
                                                   received_at=datetime.now(UTC), method="GET",
                                                   params={"conversion_id": "by-the-loop"}, body_error=None,
                                                   conversion_key=None))
        for _ in range(100):
            if await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1", tenant.account_id):
                break
            await asyncio.sleep(0.1)
    finally:
        await worker_main.shutdown(ctx)
    assert await db.fetchval("SELECT conversion_key FROM postbacks WHERE account_id = $1", tenant.account_id) == "by-the-loop"
    assert await redis.xlen(SPOOL_STREAM) == 0


async def test_postgresql_down_during_the_drain_leaves_the_spool_as_it_was(settings, redis, tenant, empty_spool):
    from shared import db as shared_db

    await redis.xadd(SPOOL_STREAM, spool_entry(account_id=tenant.account_id, token_digest=None,
                                               received_at=datetime.now(UTC), method="GET",
                                               params={"conversion_id": "later"}, body_error=None, conversion_key=None))
    pool = await shared_db.create_pool(_unreachable(settings), min_size=0)
    try:
        with pytest.raises(OSError):  # (DatabaseUnavailable is one)
            await spool.drain_spool_once(pool, redis)
    finally:
        await shared_db.close_pool(pool)
    assert await redis.xlen(SPOOL_STREAM) == 1


async def test_a_slow_body_is_no_time_of_postgresqls(api, db, redis, tenant, empty_spool, monkeypatch):
    """The budget is PostgreSQL's time: a body that takes longer to arrive is stored at once, not spooled."""
    monkeypatch.setattr(postback_route, "POSTBACK_DB_BUDGET", 0.5)

    async def trickle():
        for piece in (b"conversion_id=slow-1", b"&payout=2"):
            await asyncio.sleep(0.4)
            yield piece

    resp = await api.post(f"/postback/{tenant.postback_token}", content=trickle(),
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert (resp.status_code, resp.json()["status"]) == (200, "accepted")
    assert await redis.xlen(SPOOL_STREAM) == 0
    assert await db.fetchval("SELECT spool_id IS NULL FROM postbacks WHERE account_id = $1 AND conversion_key = 'slow-1'",
                             tenant.account_id) is True


async def test_a_worker_that_died_draining_holds_the_spool_only_a_while(db, redis, tenant, empty_spool, monkeypatch):
    monkeypatch.setattr(spool, "SPOOL_LOCK_MS", 300)
    await redis.set(spool.SPOOL_LOCK, "a-worker-gone", px=300)
    await redis.xadd(SPOOL_STREAM, spool_entry(account_id=tenant.account_id, token_digest=None,
                                               received_at=datetime.now(UTC), method="GET",
                                               params={"conversion_id": "after-lock"}, body_error=None, conversion_key=None))
    assert await spool.drain_spool_once(db, redis) == 0
    await asyncio.sleep(0.4)
    assert await spool.drain_spool_once(db, redis) == 1
    assert await redis.get(spool.SPOOL_LOCK) is None  # released after its pass


async def test_after_a_failure_postbacks_spool_without_waiting_for_postgresql(settings, redis, tenant, empty_spool, monkeypatch):
    """A frozen PostgreSQL (or a host gone) takes each postback's whole budget to fail: after one
    has, the next ones spool at once for a while, and then one asks again."""
    monkeypatch.setattr(postback_route, "POSTBACK_DB_BUDGET", 0.5)
    monkeypatch.setattr(postback_route, "POSTGRES_PAUSE", 30.0)
    link, through = postgres_link(settings.database_url)
    await link.mend()
    _, lifespan, gateway = await _gateway(settings, through(link.port))
    try:
        assert (await gateway.get(f"/postback/{tenant.postback_token}", params={"conversion_id": "b-0"})).status_code == 200
        await link.freeze()
        first = await gateway.get(f"/postback/{tenant.postback_token}", params={"conversion_id": "b-1"})
        started = time.monotonic()
        rest = [await gateway.get(f"/postback/{tenant.postback_token}", params={"conversion_id": f"b-{n}"})
                for n in range(2, 12)]
        assert time.monotonic() - started < 1.0  # (each waiting its budget: 5 s)
    finally:
        await _stop(lifespan, gateway)
        link.close()
    assert [r.json()["status"] for r in [first, *rest]] == ["accepted"] * 11
    assert await redis.xlen(SPOOL_STREAM) == 11


def test_the_breaker_lets_one_postback_ask_after_its_pause(monkeypatch):
    monkeypatch.setattr(postback_route, "POSTGRES_PAUSE", 1.0)
    breaker = postback_route.Breaker()
    assert breaker.ask(0.0) and breaker.ask(0.0)  # all ask while PostgreSQL answers
    breaker.fared(0.5, ok=False)
    assert not breaker.ask(1.0)  # within the pause: none asks
    assert breaker.ask(1.6)  # after it: one asks...
    assert not breaker.ask(1.7)  # ...and the others spool until it has its answer
    breaker.fared(1.8, ok=False)
    assert not breaker.ask(2.0) and breaker.ask(2.9)
    breaker.fared(3.0, ok=True)
    assert breaker.ask(3.0) and breaker.ask(3.0)


async def test_a_spooled_postback_does_not_undo_a_later_one_stored_before_it(
    settings, db, redis, api, tenant, empty_spool
):
    """A network's approval spooled during an outage, then its rejection (a minute later, say)
    stored at once by a gateway that reaches PostgreSQL (the outage over, or that gateway's pool
    full no longer) before the workers drained the spool: the approval was then stored after the
    rejection and moved the conversion back to approved, its payout counted as revenue. A spooled
    postback received before the conversion's latest stored one is kept, superseded, not applied."""
    arq = ArqRedis(pool_or_conn=redis.connection_pool)
    assert (await api.head(f"/postback/{tenant.postback_token}")).status_code == 200  # (known lately)
    _, lifespan, gateway = await _gateway(settings, _unreachable(settings))
    try:
        spooled = [await gateway.get(f"/postback/{tenant.postback_token}", params=params) for params in (
            {"conversion_id": "late-1", "payout": "5.00", "status": "approved"},
            {"conversion_id": "late-2", "payout": "5.00", "status": "approved"},
            # A repeat that only adds the click the network learned late: still news, as when direct.
            {"conversion_id": "late-3", "payout": "4.00", "click_id": "clk-late-3"},
            # Received first, they stand whatever follows: a reversal is final, a late pending ignored.
            {"conversion_id": "late-4", "payout": "3.00", "status": "reversed"},
            {"conversion_id": "late-5", "payout": "3.00", "status": "approved"},
            # Rejected after it, then a pending the machine ignores: still rejected in the end.
            {"conversion_id": "late-6", "payout": "3.00", "status": "approved"},
        )]
    finally:
        await _stop(lifespan, gateway)
    assert [a.json()["status"] for a in spooled] == ["accepted"] * 6
    later = [await api.get(f"/postback/{tenant.postback_token}", params=params) for params in (
        {"conversion_id": "late-1", "status": "rejected"},
        {"conversion_id": "late-2", "payout": "7.00", "status": "approved"},
        {"conversion_id": "late-3", "payout": "4.00"},
        {"conversion_id": "late-4", "payout": "3.00", "status": "approved"},
        {"conversion_id": "late-5", "payout": "3.00", "status": "pending"},
        {"conversion_id": "late-6", "status": "rejected"},
        {"conversion_id": "late-6", "status": "pending"},
    )]
    assert [a.json()["status"] for a in later] == ["accepted"] * 7
    await burst_worker(settings)
    assert await spool.drain_spool_once(db, redis, arq) == 6
    await burst_worker(settings)
    conversions = await db.fetch(
        "SELECT conversion_key, status, payout, click_id FROM conversions WHERE account_id = $1 ORDER BY conversion_key",
        tenant.account_id)
    assert [(c["conversion_key"], c["status"], c["click_id"]) for c in conversions] == [
        ("late-1", "rejected", None), ("late-2", "approved", None), ("late-3", "approved", "clk-late-3"),
        ("late-4", "reversed", None), ("late-5", "approved", None), ("late-6", "rejected", None)]
    assert [c["payout"] for c in conversions[1:5]] == [Decimal("7"), Decimal("4"), Decimal("3"), Decimal("3")]
    assert await spool.drain_spool_once(db, redis, arq) == 0
    states = await db.fetch(
        "SELECT conversion_key, process_error FROM postbacks WHERE account_id = $1 AND spool_id IS NOT NULL"
        " ORDER BY conversion_key", tenant.account_id)
    assert [(s["conversion_key"], (s["process_error"] or "").split(":")[0]) for s in states] == [
        ("late-1", "superseded"), ("late-2", "superseded"), ("late-3", ""), ("late-4", ""), ("late-5", ""),
        ("late-6", "superseded")]


async def test_an_entry_of_the_right_shape_with_wrong_values_is_set_aside_not_retried_forever(
    db, redis, tenant, empty_spool
):
    """An entry read_spool_entry let through failed inside the store on every pass (a TypeError
    joining a body error that is no text, an account id past bigint refused by asyncpg before it
    is sent), and each pass stopped there: the postbacks after it waited forever."""
    good = spool_entry(account_id=tenant.account_id, token_digest=None, received_at=datetime.now(UTC), method="GET",
                       params={"conversion_id": "behind-bad"}, body_error=None, conversion_key=None)
    payload = orjson.loads(good["p"])
    for bad in ({**payload, "e": 5}, {**payload, "a": 2**63}, {**payload, "m": ["GET"]}):
        await redis.xadd(SPOOL_STREAM, {"p": orjson.dumps(bad), "q": good["q"]})
    await redis.xadd(SPOOL_STREAM, good)
    for _ in range(3):
        try:
            await spool.drain_spool_once(db, redis)
        except Exception:
            pass
    assert await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1 AND conversion_key = 'behind-bad'",
                             tenant.account_id) == 1
    assert await redis.xlen(SPOOL_STREAM) == 0 and await redis.xlen(SPOOL_REFUSED) == 3


_SENT = [  # (method, httpx arguments): each kind of postback the receiver reads
    ("GET", {"params": {"conversion_id": "rt-1", "payout": "3.25", "currency": "eur", "x": ["a", "b"]}}),
    ("POST", {"data": {"conversion_id": "rt-2", "payout": "1.50", "status": "pending"}}),
    ("POST", {"content": b'{"conversion_id":"rt-3","payout":1.50,"n":{"a":[1,2.0,1e2,-0.0,12345678901234567890123],'
                         b'"u":"\\u00e9\\ud800x\\u0000"},"big":1e500,"z":0.000001}',
              "headers": {"content-type": "application/json"}}),
    ("POST", {"files": {"payout": (None, "2.5"), "conversion_id": (None, "rt-4"), "f": ("a.txt", b"hello")}}),
    ("POST", {"content": b"[1,2]", "headers": {"content-type": "application/json"}}),  # unparseable
    ("POST", {"content": b"garbage", "headers": {"content-type": "text/plain"}}),  # no fields
    ("GET", {"params": {"conversion_id": "rt-7", "payout": "abc"}}),
    ("GET", {"params": {"conversion_id": "rt-8", "timestamp": "2026-01-02T03:04:05Z", "payout": "7"}}),
    ("GET", {"params": {"payout": "9", "offer_id": "no-ids"}}),
]


async def test_a_spooled_postback_is_stored_as_the_same_postback_stored_at_once(settings, db, redis, api, empty_spool):
    """Every column of postbacks, for each kind of postback, through the spool (a demoted primary:
    its account looked up, its INSERT refused) and straight into PostgreSQL (another account); a
    HEAD stores nothing either way."""
    spooled_to, direct_to = await make_tenant(db), await make_tenant(db)
    dsn = settings.database_url + ("&" if "?" in settings.database_url else "?") + "default_transaction_read_only=on"
    _, lifespan, gateway = await _gateway(settings, dsn)
    try:
        for method, arguments in _SENT:
            resp = await gateway.request(method, f"/postback/{spooled_to.postback_token}", **arguments)
            assert resp.status_code == 200, resp.text
        assert (await gateway.head(f"/postback/{spooled_to.postback_token}")).status_code == 200
    finally:
        await _stop(lifespan, gateway)
    for method, arguments in _SENT:
        assert (await api.request(method, f"/postback/{direct_to.postback_token}", **arguments)).status_code == 200
    assert (await api.head(f"/postback/{direct_to.postback_token}")).status_code == 200
    assert await redis.xlen(SPOOL_STREAM) == len(_SENT)
    await spool.drain_spool_once(db, redis)
    assert await redis.xlen(SPOOL_REFUSED) == 0

    async def stored(account_id: int) -> list[dict]:
        rows = await db.fetch("SELECT * FROM postbacks WHERE account_id = $1 ORDER BY id", account_id)
        out = []
        for row in map(dict, rows):
            received = row.pop("received_at")
            for key in ("id", "account_id", "spool_id"):
                row.pop(key)
            # Times relative to the receipt; a postback naming neither id is its own conversion.
            row["processed_at"] = row["processed_at"] and row["processed_at"] - received
            row["converted_at"] = row["converted_at"] - received if row["converted_at"] >= received else row["converted_at"]
            if row["conversion_key"].startswith("postback:"):
                row["conversion_key"], row["dedupe_key"] = "own", row["dedupe_key"] and "own"
            out.append(row)
        return out

    assert await stored(spooled_to.account_id) == await stored(direct_to.account_id)
    assert await db.fetchval("SELECT count(spool_id) FROM postbacks WHERE account_id = $1",
                             spooled_to.account_id) == len(_SENT)


async def test_the_spool_is_bounded_in_entries_and_in_size(settings, db, redis, tenant, empty_spool, monkeypatch):
    """It shares its Redis with the click stream, which a full Redis refuses: past its bounds a
    postback is answered 503 (the network retries it later), never spooled."""
    monkeypatch.setattr(postback_store, "SPOOL_MAX_ENTRIES", 2)
    dsn = settings.database_url + ("&" if "?" in settings.database_url else "?") + "default_transaction_read_only=on"
    _, lifespan, gateway = await _gateway(settings, dsn)
    try:
        url = f"/postback/{tenant.postback_token}"
        big = await gateway.post(url, json={"conversion_id": "big", "notes": "x" * postback_store.SPOOL_MAX_ENTRY_BYTES})
        answers = [await gateway.get(url, params={"conversion_id": f"cap-{n}"}) for n in range(3)]
    finally:
        await _stop(lifespan, gateway)
    assert (big.status_code, big.json()["code"]) == (503, "service_unavailable")
    assert [a.status_code for a in answers] == [200, 200, 503]
    assert await redis.xlen(SPOOL_STREAM) == 2


async def test_a_postback_that_never_asked_postgresql_leaves_the_breaker_open(settings, redis, tenant, empty_spool,
                                                                               monkeypatch):
    """The one postback let ask after the pause may not ask at all: a HEAD (a link checker) with its
    token cached, or one cancelled (its client gone, the gateway stopping) while PostgreSQL has
    not answered. Counted as PostgreSQL answering, it closed the breaker: every postback asked the
    frozen PostgreSQL again, each waiting its whole budget."""
    monkeypatch.setattr(postback_route, "POSTBACK_DB_BUDGET", 1.0)
    monkeypatch.setattr(postback_route, "POSTGRES_PAUSE", 0.2)
    link, through = postgres_link(settings.database_url)
    await link.mend()
    app, lifespan, gateway = await _gateway(settings, through(link.port))
    url = f"/postback/{tenant.postback_token}"

    async def timed(n: int) -> float:
        started = time.monotonic()
        assert (await gateway.get(url, params={"conversion_id": f"nb-{n}"})).status_code == 200
        return time.monotonic() - started

    try:
        assert (await gateway.get(url, params={"conversion_id": "nb-0"})).status_code == 200  # (its token cached)
        await link.freeze()
        assert await timed(1) >= 1.0  # the failure that opens the breaker
        await asyncio.sleep(0.3)
        assert (await gateway.head(url)).status_code == 200  # after the pause; asks nothing
        waits = await asyncio.gather(*(timed(n) for n in range(2, 7)))
        assert sorted(waits)[-2] < 0.5, waits  # one asks (and fails); the others spool at once
        await asyncio.sleep(0.3)
        asking = asyncio.ensure_future(gateway.get(url, params={"conversion_id": "nb-cancelled"}))
        await asyncio.sleep(0.2)
        asking.cancel()
        await asyncio.gather(asking, return_exceptions=True)
        waits = await asyncio.gather(*(timed(n) for n in range(7, 12)))
        assert sorted(waits)[-2] < 0.5, waits
    finally:
        await _stop(lifespan, gateway)
        link.close()


async def test_a_spooled_postback_does_not_undo_a_later_repeat_stored_before_it(
    settings, db, redis, api, tenant, empty_spool
):
    """Approved, then a rejection spooled during an outage, then approved again with the same payout
    (the network's correction) stored at once before the drain: stored as a repeat of the first
    approval (a duplicate, not the conversion's latest), so the rejection, received before it,
    was applied after it: the conversion ended rejected, its payout lost. In the order received
    it is approved."""
    arq = ArqRedis(pool_or_conn=redis.connection_pool)
    url = f"/postback/{tenant.postback_token}"
    first = await api.get(url, params={"conversion_id": "redo-1", "payout": "10.00", "status": "approved"})
    assert first.json()["status"] == "accepted"
    await burst_worker(settings)
    _, lifespan, gateway = await _gateway(settings, _unreachable(settings))
    try:
        spooled = await gateway.get(url, params={"conversion_id": "redo-1", "status": "rejected"})
    finally:
        await _stop(lifespan, gateway)
    assert spooled.json()["status"] == "accepted"
    again = await api.get(url, params={"conversion_id": "redo-1", "payout": "10.00", "status": "approved"})
    assert again.json()["status"] == "duplicate"
    await burst_worker(settings)
    assert await spool.drain_spool_once(db, redis, arq) == 1
    await burst_worker(settings)
    conversion = await db.fetchrow("SELECT status, payout FROM conversions WHERE account_id = $1"
                                   " AND conversion_key = 'redo-1'", tenant.account_id)
    assert (conversion["status"], conversion["payout"]) == ("approved", Decimal("10"))
    assert await db.fetchval("SELECT sum(a.amount) FROM conversion_adjustments a JOIN conversions c"
                             " ON c.id = a.conversion_id WHERE c.account_id = $1", tenant.account_id) == 10


async def test_a_postback_whose_body_is_slow_to_arrive_does_not_hold_the_breaker(settings, db, redis, tenant,
                                                                                  empty_spool):
    """The one postback let ask after the pause held its turn while its body arrived (no limit on
    how long that takes: a client that stalls holds it for good): every other postback spooled
    without asking a PostgreSQL that was back, and one whose token no gateway had seen lately
    was refused 503, for as long as that one body took."""
    app, lifespan, gateway = await _gateway(settings, settings.database_url)
    url = f"/postback/{tenant.postback_token}"
    newcomer = await make_tenant(db)  # its token never looked up: not among the tokens known in Redis
    arrived = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"conversion_id": "slow'
        await arrived.wait()
        yield b'-body"}'

    try:
        assert (await gateway.get(url, params={"conversion_id": "sb-0"})).status_code == 200  # (its token cached)
        # PostgreSQL failed a postback a while ago (the pause is over) and is back: the next one asks.
        app.state.postgres_for_postbacks.fared(asyncio.get_running_loop().time() - 5, ok=False)
        slow = asyncio.ensure_future(gateway.post(url, content=body(), headers={"content-type": "application/json"}))
        await asyncio.sleep(0.2)
        answers = [await gateway.get(url, params={"conversion_id": f"sb-{n}"}) for n in range(1, 4)]
        new = await gateway.get(f"/postback/{newcomer.postback_token}", params={"conversion_id": "sb-new"})
        arrived.set()
        assert (await slow).status_code == 200
    finally:
        arrived.set()
        await _stop(lifespan, gateway)
    assert [a.status_code for a in answers] == [200] * 3
    assert (new.status_code, new.json()["status"]) == (200, "accepted"), new.text
    assert await redis.xlen(SPOOL_STREAM) == 0  # all stored at once


async def test_the_spool_is_bounded_in_bytes(settings, db, redis, tenant, empty_spool, monkeypatch):
    """A million entries of up to 64 KB each was a bound of 64 GB: a flood of large postbacks (any
    token a gateway has seen will do) filled the Redis the clicks are kept in long before."""
    monkeypatch.setattr(postback_store, "SPOOL_MAX_BYTES", 200_000, raising=False)
    dsn = settings.database_url + ("&" if "?" in settings.database_url else "?") + "default_transaction_read_only=on"
    _, lifespan, gateway = await _gateway(settings, dsn)
    try:
        url = f"/postback/{tenant.postback_token}"
        answers = [await gateway.post(url, json={"conversion_id": f"bytes-{n}", "notes": "x" * 30_000})
                   for n in range(12)]
    finally:
        await _stop(lifespan, gateway)
    codes = [a.status_code for a in answers]
    assert 200 in codes and codes[-1] == 503 and codes == sorted(codes), codes
    assert await redis.memory_usage(SPOOL_STREAM) < 200_000 + postback_store.SPOOL_MAX_ENTRY_BYTES
