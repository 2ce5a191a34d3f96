"""The click drainer: stream -> PostgreSQL, idempotent, first click per message, contacts."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from services.worker.clicks import (
    HEARTBEAT_PREFIX, HEARTBEAT_TTL_MS, RESCUE_IDLE_MS, beat, drain_once, ensure_group, run_drainer, store,
)
from shared.process import die_with_parent
from shared import edge, ids
from shared.redis_client import create_redis
from shared.settings import Settings
from tests.helpers import Tenant, make_tenant, random_phone

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


async def drain_all(db: asyncpg.Pool, redis: Any, consumer: str = "pytest") -> int:
    total = 0
    while n := await drain_once(db, redis, consumer=consumer, min_idle_ms=0):
        total += n
    return total


def click(tenant: Tenant, *, at: datetime, message_id: str | None = None, bot: bool = False, **q: str) -> dict[str, Any]:
    """A click by field name (edge.CLICK_FIELDS, with ``at`` instead of ``us``); ``xadd`` writes it
    to the stream as the redirect does."""
    return {
        "id": ids.click_id(), "l": "Ab3kX9", "o": "f" * 24, "a": tenant.account_id, "li": tenant.list_id,
        "m": message_id, "at": at, "ip": "198.51.100.1", "ua": "Mozilla/5.0", "cc": None, "bot": bot, "q": dict(q),
    }


async def xadd(redis: Any, clicks: list[dict[str, Any]]) -> None:
    await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: orjson.dumps([edge.click_from(c) for c in clicks])})


def legacy(click: dict[str, Any]) -> dict[str, Any]:
    """The same click as the stream held it before edge.CLICK_FIELDS (an object, ISO ``at``)."""
    return dict(click, t=ids.tracker_id(), at=click["at"].isoformat())


async def xadd_legacy(redis: Any, clicks: list[dict[str, Any]]) -> None:
    await redis.xadd(edge.CLICK_STREAM, {edge.LEGACY_BATCH_FIELD: orjson.dumps(clicks)})


async def message(api: httpx.AsyncClient, tenant: Tenant, phone: str) -> str:
    resp = await api.post(
        "/api/v2/send", json={"to": phone, "list_id": tenant.list_id, "body": "hello"}, headers=tenant.headers
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["message_id"]


async def contact_clicks(db: asyncpg.Pool, tenant: Tenant, phone: str) -> tuple[int, datetime | None]:
    row = await db.fetchrow(
        "SELECT click_count, last_clicked_at FROM contacts WHERE list_id = $1 AND phone_number = $2", tenant.list_id, phone
    )
    return row["click_count"], row["last_clicked_at"]


async def test_drains_clicks_with_their_fields(
    db: asyncpg.Pool, redis: Any, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    await drain_all(db, redis)
    at = T0 + timedelta(microseconds=654_321)
    c = click(tenant, at=at, sub1="a", foo="bar")
    c["cc"] = "GB"
    await xadd(redis, [c])
    with caplog.at_level(logging.WARNING, logger="trackly.worker.clicks"):
        assert await drain_all(db, redis) == 1
    assert not caplog.records  # stored by PostgreSQL reading the entry, not by the checked way
    row = await db.fetchrow("SELECT * FROM clicks WHERE id = $1", c["id"])
    assert (row["account_id"], row["link_id"], row["offer_id"], row["list_id"]) == (tenant.account_id, "Ab3kX9", "f" * 24, tenant.list_id)
    assert row["clicked_at"] == at and row["country_code"] == "GB" and row["ip"] == "198.51.100.1"
    assert row["params"] == {"sub1": "a", "foo": "bar"} and row["source"] == "edge" and row["is_bot"] is False
    assert await redis.xlen(edge.CLICK_STREAM) == 0  # acknowledged entries are deleted


async def test_a_batch_drained_twice_is_stored_and_counted_once(
    db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant
) -> None:
    phone = random_phone()
    mid = await message(api, tenant, phone)
    batch = [click(tenant, at=T0 + timedelta(seconds=i), message_id=mid) for i in range(3)]
    batch.append(click(tenant, at=T0, message_id=mid, bot=True))
    await drain_all(db, redis)
    await xadd(redis, batch)
    await xadd(redis, batch[:2])  # the same clicks again (a retried write, a redelivered entry)
    await drain_all(db, redis)
    await xadd(redis, batch)
    await drain_all(db, redis)
    # And the same rows through store() in a second transaction, as a crash before XACK would do.
    async with db.acquire() as conn, conn.transaction():
        assert await store(conn, [dict(c) for c in batch]) == []

    assert await db.fetchval("SELECT count(*) FROM clicks WHERE account_id = $1", tenant.account_id) == 4
    assert await db.fetchval("SELECT click_id FROM message_clicks WHERE message_id = $1", mid) == batch[0]["id"]
    assert await contact_clicks(db, tenant, phone) == (3, T0 + timedelta(seconds=2))


async def test_the_earliest_human_click_wins_even_out_of_order(
    db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant
) -> None:
    phone = random_phone()
    mid = await message(api, tenant, phone)
    late = click(tenant, at=T0 + timedelta(minutes=5), message_id=mid)
    early = click(tenant, at=T0, message_id=mid)
    earliest_bot = click(tenant, at=T0 - timedelta(minutes=1), message_id=mid, bot=True)
    await drain_all(db, redis)
    await xadd(redis, [late])
    await drain_all(db, redis)
    assert await db.fetchval("SELECT click_id FROM message_clicks WHERE message_id = $1", mid) == late["id"]
    await xadd(redis, [early, earliest_bot])
    await drain_all(db, redis)
    row = await db.fetchrow("SELECT * FROM message_clicks WHERE message_id = $1", mid)
    assert row["click_id"] == early["id"] and row["clicked_at"] == T0 and row["account_id"] == tenant.account_id
    assert await contact_clicks(db, tenant, phone) == (2, T0 + timedelta(minutes=5))


async def test_message_id_kept_only_for_an_existing_message_of_the_same_account(
    db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant
) -> None:
    other = await make_tenant(db)
    other_phone = random_phone()
    foreign = await message(api, other, other_phone)
    own = await message(api, tenant, random_phone())
    clicks = [
        click(tenant, at=T0, message_id=foreign),
        click(tenant, at=T0, message_id="Zz9Zz9Zz"),  # no such message
        click(tenant, at=T0, message_id=own),
    ]
    await drain_all(db, redis)
    await xadd(redis, clicks)
    await drain_all(db, redis)
    got = {r["id"]: r["message_id"] for r in await db.fetch("SELECT id, message_id FROM clicks WHERE account_id = $1", tenant.account_id)}
    assert got == {clicks[0]["id"]: None, clicks[1]["id"]: None, clicks[2]["id"]: own}
    assert await db.fetchval("SELECT count(*) FROM message_clicks WHERE message_id = $1", foreign) == 0
    assert await contact_clicks(db, other, other_phone) == (0, None)


async def test_malformed_entries_are_dropped_not_stuck(db: asyncpg.Pool, redis: Any, tenant: Tenant) -> None:
    await drain_all(db, redis)
    good = click(tenant, at=T0)
    nul = dict(click(tenant, at=T0), ua="evil\x00agent", q={"sub1": "a\x00b", "deep": {"k\x00": ["x\x00"]}})
    await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: b"not json"})
    await redis.xadd(edge.CLICK_STREAM, {"x": b"[]"})
    await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: b'[["\xff\xfe"]]'})  # not UTF-8
    rows: list[Any] = [
        ["too", "short"],
        {"id": "an object"},
        [*edge.click_from(click(tenant, at=T0))[:6], "yesterday", *edge.click_from(good)[7:]],  # time not an int
        edge.click_from(dict(click(tenant, at=T0), a=2**63)),  # account out of range
        edge.click_from(dict(click(tenant, at=T0), bot="maybe")),
        [*edge.click_from(click(tenant, at=T0))[:6], edge.MAX_MICROS + 1, *edge.click_from(good)[7:]],  # after 9999
        [*edge.click_from(click(tenant, at=T0)), "a 13th field"],
        edge.click_from(good),
        edge.click_from(nul),
    ]
    await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: orjson.dumps(rows)})
    await drain_all(db, redis)
    stored = await db.fetch("SELECT id, user_agent, params FROM clicks WHERE account_id = $1", tenant.account_id)
    assert sorted(r["id"] for r in stored) == sorted([good["id"], nul["id"]])
    cleaned = next(r for r in stored if r["id"] == nul["id"])
    assert cleaned["user_agent"] == "evilagent" and cleaned["params"] == {"sub1": "ab", "deep": {"k": ["x"]}}
    assert await redis.xlen(edge.CLICK_STREAM) == 0


async def test_a_row_of_another_shape_is_dropped_whatever_else_its_batch_holds(
    db: asyncpg.Pool, redis: Any, tenant: Tenant
) -> None:
    """Alone among good rows (where PostgreSQL reads the batch) or beside a malformed entry (where
    Python checks it), a click of 11 or 13 fields is dropped and the others are stored."""
    await drain_all(db, redis)
    short, long = click(tenant, at=T0), click(tenant, at=T0)
    for neighbour in (None, b"not json"):
        good = click(tenant, at=T0)
        rows = [edge.click_from(short)[:11], [*edge.click_from(long), "x"], edge.click_from(good)]
        await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: orjson.dumps(rows)})
        if neighbour is not None:
            await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: neighbour})
        await drain_all(db, redis)
        stored = {r["id"] for r in await db.fetch("SELECT id FROM clicks WHERE account_id = $1", tenant.account_id)}
        assert good["id"] in stored and not {short["id"], long["id"]} & stored


async def test_a_click_postgresql_refuses_is_dropped_alone_and_the_stream_goes_on(
    db: asyncpg.Pool, redis: Any, tenant: Tenant
) -> None:
    """Whatever PostgreSQL refuses that the checks did not foresee (here a constraint added for the
    test) costs only that click: the batch is stored click by click, and nothing stays pending."""
    await drain_all(db, redis)
    good, refused = click(tenant, at=T0), dict(click(tenant, at=T0), ua="refused-by-test")
    await db.execute(
        "ALTER TABLE clicks ADD CONSTRAINT pytest_refuse CHECK (user_agent IS DISTINCT FROM 'refused-by-test') NOT VALID"
    )
    try:
        await xadd(redis, [good, refused])
        assert await drain_all(db, redis) == 1
    finally:
        await db.execute("ALTER TABLE clicks DROP CONSTRAINT pytest_refuse")
    stored = {r["id"] for r in await db.fetch("SELECT id FROM clicks WHERE account_id = $1", tenant.account_id)}
    assert stored == {good["id"]}
    assert await redis.xlen(edge.CLICK_STREAM) == 0
    assert (await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP))["pending"] == 0


async def test_entries_in_the_legacy_format_are_drained(db: asyncpg.Pool, redis: Any, tenant: Tenant) -> None:
    """Clicks a redirect of the previous release wrote (objects, ISO times under field b) are
    stored like any other, malformed ones dropped, also in a batch with new-format entries."""
    await drain_all(db, redis)
    old = dict(click(tenant, at=T0 + timedelta(microseconds=123_456), sub1="x"), cc="GB")
    new = click(tenant, at=T0)
    await redis.xadd(edge.CLICK_STREAM, {edge.LEGACY_BATCH_FIELD: b"not json"})
    await redis.xadd(edge.CLICK_STREAM, {edge.LEGACY_BATCH_FIELD: b'[{"id": "\xff\xfe"}]'})  # not UTF-8
    bad_time = dict(legacy(click(tenant, at=T0)), at="yesterday")
    bad_type = dict(legacy(click(tenant, at=T0)), l=5)
    after_9999 = dict(legacy(click(tenant, at=T0)), at="9999-12-31T23:00:00-05:00")  # 10000-01-01 in UTC
    await xadd_legacy(redis, [{"id": 5}, bad_time, legacy(old), bad_type, after_9999])
    await xadd(redis, [new])
    await drain_all(db, redis)
    stored = {r["id"]: r for r in await db.fetch("SELECT * FROM clicks WHERE account_id = $1", tenant.account_id)}
    assert set(stored) == {old["id"], new["id"]}
    row = stored[old["id"]]
    assert (row["clicked_at"], row["country_code"], row["params"], row["link_id"]) == (old["at"], "GB", {"sub1": "x"}, "Ab3kX9")
    assert await redis.xlen(edge.CLICK_STREAM) == 0


async def test_entries_of_a_dead_consumer_are_claimed(db: asyncpg.Pool, redis: Any, tenant: Tenant) -> None:
    await drain_all(db, redis)
    await ensure_group(redis)
    c = click(tenant, at=T0)
    await xadd(redis, [c])
    # A consumer whose worker is alive (its heartbeat is there) reads the entry and gets stuck.
    await beat(redis, ["ghost"])
    taken = await redis.xreadgroup(edge.CLICK_GROUP, "ghost", {edge.CLICK_STREAM: ">"}, count=10)
    assert taken and taken[0][1]
    # Not yet idle long enough: left alone.
    assert await drain_once(db, redis, consumer="rescuer", min_idle_ms=60_000) == 0
    assert await db.fetchval("SELECT count(*) FROM clicks WHERE id = $1", c["id"]) == 0
    # Idle past the limit: claimed and stored, heartbeat or not.
    assert await drain_once(db, redis, consumer="rescuer", min_idle_ms=0) >= 1
    assert await db.fetchval("SELECT count(*) FROM clicks WHERE id = $1", c["id"]) == 1
    pending = await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP)
    assert pending["pending"] == 0


async def test_entries_of_a_consumer_without_a_heartbeat_are_claimed_at_once(
    db: asyncpg.Pool, redis: Any, tenant: Tenant
) -> None:
    """A worker that is gone stops beating: what its consumer holds is claimed as soon as the
    heartbeat has expired, not after CLAIM_IDLE_MS."""
    await drain_all(db, redis)
    await ensure_group(redis)
    await beat(redis, ["gone"])
    c = click(tenant, at=T0)
    await xadd(redis, [c])
    assert (await redis.xreadgroup(edge.CLICK_GROUP, "gone", {edge.CLICK_STREAM: ">"}, count=10))[0][1]
    await asyncio.sleep(RESCUE_IDLE_MS / 1000 + 0.1)
    assert await drain_once(db, redis, consumer="heir", min_idle_ms=60_000) == 0  # still beating
    await redis.delete(HEARTBEAT_PREFIX + "gone")  # as when its TTL runs out
    assert await drain_once(db, redis, consumer="heir", min_idle_ms=60_000) >= 1
    assert await db.fetchval("SELECT count(*) FROM clicks WHERE id = $1", c["id"]) == 1
    assert (await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP))["pending"] == 0


DRAINER = """
import asyncio, sys
from services.worker.clicks import run_drainer
from shared import db
from shared.redis_client import create_redis

async def main():
    pool = await db.create_pool(sys.argv[1], max_size=2)
    await run_drainer({"db": pool, "redis_client": create_redis(sys.argv[2]), "click_consumer": "doomed"})

asyncio.run(main())
"""


async def test_a_killed_workers_clicks_are_stored_within_seconds(
    db: asyncpg.Pool, redis: Any, tenant: Tenant, settings: Settings
) -> None:
    """A real drainer process, killed with -9 while its consumer holds an entry: another drainer
    stores the entry once the dead one's heartbeat has expired (a few seconds), well before the
    CLAIM_IDLE_MS that would otherwise free it."""
    await drain_all(db, redis)
    await ensure_group(redis)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DRAINER, settings.database_url or "", settings.redis_url or "",
        cwd=REPO, preexec_fn=die_with_parent(),
    )
    doomed = "doomed-0"
    try:
        for _ in range(200):
            if await redis.exists(HEARTBEAT_PREFIX + doomed):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the drainer never beat")
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert await redis.exists(HEARTBEAT_PREFIX + doomed)  # a kill -9 leaves the key to expire
    # What it had read when it died (read here in its name: the timing of a real kill is luck).
    c = click(tenant, at=T0)
    await xadd(redis, [c])
    assert (await redis.xreadgroup(edge.CLICK_GROUP, doomed, {edge.CLICK_STREAM: ">"}, count=10))[0][1]
    heir = asyncio.create_task(run_drainer({"db": db, "redis_client": redis, "click_consumer": "heir"}))
    try:
        started = asyncio.get_running_loop().time()
        while not await db.fetchval("SELECT count(*) FROM clicks WHERE id = $1", c["id"]):
            assert asyncio.get_running_loop().time() - started < HEARTBEAT_TTL_MS / 1000 + 5, "not claimed in time"
            await asyncio.sleep(0.1)
        assert not await redis.exists(HEARTBEAT_PREFIX + doomed)
    finally:
        heir.cancel()
        await asyncio.gather(heir, return_exceptions=True)


async def test_a_failed_transaction_is_retried_from_the_pending_list(
    db: asyncpg.Pool, redis: Any, tenant: Tenant, settings: Settings
) -> None:
    await drain_all(db, redis)
    c = click(tenant, at=T0)
    await xadd(redis, [c])
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    await pool.close()  # a closed pool: the store fails after the entry was delivered
    try:
        await drain_once(pool, redis, consumer="flaky")
    except Exception:  # noqa: BLE001 - the failure is the point
        pass
    else:
        raise AssertionError("drain_once on a closed pool should fail")
    assert (await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP))["pending"] >= 1
    assert await drain_once(db, redis, consumer="flaky") >= 1  # its own pending entry first
    assert await db.fetchval("SELECT count(*) FROM clicks WHERE id = $1", c["id"]) == 1


async def test_the_drainer_stops_whenever_it_is_cancelled(settings: Settings, db: asyncpg.Pool) -> None:
    """The worker's shutdown cancels the drainer and waits for it. A cancel that lands inside a
    redis-py command (socket timeout set) could come out as ConnectionError and the loop went on:
    the worker never exited (this hung CI). Cancel the real drainer, on real Redis, at many points."""
    for n in range(30):
        redis = create_redis(settings.redis_url)
        task = asyncio.create_task(run_drainer({"db": db, "redis_client": redis, "click_consumer": f"cancel-{n}"}))
        await asyncio.sleep(0.001 * n)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        await redis.aclose()
        assert done, f"the drainer did not stop when cancelled after {n} ms"
        assert task.cancelled()


async def test_consumers_of_workers_that_are_gone_are_forgotten(db: asyncpg.Pool, redis: Any, tenant: Tenant) -> None:
    """Every worker restart leaves its consumers in the group: those idle long enough and holding
    nothing are removed; one still holding an entry stays until the entry is claimed."""
    from services.worker.clicks import forget_dead_consumers

    await drain_all(db, redis)
    await ensure_group(redis)
    await redis.xgroup_createconsumer(edge.CLICK_STREAM, edge.CLICK_GROUP, "gone-empty")  # holds nothing
    await xadd(redis, [click(tenant, at=T0)])
    taken = await redis.xreadgroup(edge.CLICK_GROUP, "gone-holding", {edge.CLICK_STREAM: ">"}, count=10)
    assert taken and taken[0][1]
    ours = {"gone-empty", "gone-holding"}

    def names(consumers: list[dict[str, Any]]) -> set[str]:
        return {c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers}

    assert ours & set(await forget_dead_consumers(redis)) == set()  # neither idle for an hour
    await asyncio.sleep(0.05)
    assert ours & set(await forget_dead_consumers(redis, idle_ms=10)) == {"gone-empty"}
    assert ours & names(await redis.xinfo_consumers(edge.CLICK_STREAM, edge.CLICK_GROUP)) == {"gone-holding"}
    assert await drain_once(db, redis, consumer="rescuer", min_idle_ms=0) >= 1  # claimed and stored
    await asyncio.sleep(0.05)
    assert "gone-holding" in await forget_dead_consumers(redis, idle_ms=10)
    # No group (or no stream) yet: nothing to forget, no error.
    await redis.xgroup_destroy(edge.CLICK_STREAM, edge.CLICK_GROUP)
    try:
        assert await forget_dead_consumers(redis, idle_ms=0) == []
    finally:
        await ensure_group(redis)


async def test_a_drain_pass_stores_a_bounded_size_of_entries_per_transaction(
    db: asyncpg.Pool, redis: Any, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A click may carry 32 query values of 1000 characters and a User-Agent of 1000, and a flood
    of them makes entries of up to ~32 MB: a pass of 100 entries could be gigabytes. Past 1 GB
    PostgreSQL closed the connection on the statement, every time (measured: 36 entries of 1000
    such clicks), and since the consumer's own pending entries come first the stream stopped for
    good. A transaction takes entries up to DRAIN_BYTES (one entry at least); each is acknowledged
    after its own commit. And the next pass reads only as many entries as DRAIN_BYTES holds at
    that size, half as many after a read that failed: the read of those 36 entries (1.2 GB) ran
    out of the 5 s socket timeout once in three tries here, and a read that always does (more
    entries, a slower link) would be tried again as it was, for good."""
    from services.worker import clicks

    await drain_all(db, redis)
    batches = [[click(tenant, at=T0, v="x" * 1000) for _ in range(3)] for _ in range(6)]
    for batch in batches:
        await xadd(redis, batch)
    entry = len(orjson.dumps([edge.click_from(c) for c in batches[0]]))
    monkeypatch.setattr(clicks, "DRAIN_BYTES", 2 * entry + 100, raising=False)  # two entries, not three
    assert await drain_once(db, redis, consumer="sizes", count=100) == 18
    ids_ = [c["id"] for batch in batches for c in batch]
    per_transaction = await db.fetch(
        "SELECT xmin::text, count(*) AS n FROM clicks WHERE id = ANY($1::text[]) GROUP BY 1", ids_)
    assert sorted(r["n"] for r in per_transaction) == [6, 6, 6]
    assert await redis.xlen(edge.CLICK_STREAM) == 0
    assert (await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP))["pending"] == 0
    for batch in batches:
        await xadd(redis, [dict(c, id=ids.click_id()) for c in batch])
    assert await drain_once(db, redis, consumer="sizes", count=100) == 6  # two entries read
    assert await redis.xlen(edge.CLICK_STREAM) == 4
    assert await drain_all(db, redis, consumer="sizes") == 12
    # A read that failed (one that outlasted the socket timeout, say) is not tried again as it was.
    counts: list[int] = []
    take = clicks._take

    async def timing_out_once(redis_: Any, consumer: str, count: int, *args: Any) -> Any:
        counts.append(count)
        if len(counts) == 1:
            raise TimeoutError("Timeout reading from redis")
        return await take(redis_, consumer, count, *args)

    monkeypatch.setattr(clicks, "_take", timing_out_once)
    with pytest.raises(TimeoutError):
        await drain_once(db, redis, consumer="halves", count=100)
    assert await drain_once(db, redis, consumer="halves", count=100) == 0
    assert counts == [100, 50]
