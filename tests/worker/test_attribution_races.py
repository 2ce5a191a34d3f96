"""A conversion that names a message (aff_sub={{sendId}}) while the message's clicks are still being
drained, out of order: it is judged again once the earlier first click is in."""
from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta
from decimal import Decimal

import asyncpg
import orjson
import pytest
from arq import create_pool
from arq.connections import RedisSettings

from services.worker import attribution
from services.worker.clicks import beat, drain_once, store_entries
from shared import db as shared_db
from shared import edge, ids
from tests.helpers import make_offer
from tests.worker.test_attribution import T0, conversion, postback, send_message


def _click(tenant, message_id: str, offer_id: str, at) -> tuple[str, bytes]:
    """One human click of the message: its id, and a stream entry's batch of it."""
    click = {"id": ids.click_id(), "l": "Ab3kX9", "o": offer_id, "a": tenant.account_id, "li": tenant.list_id,
             "m": message_id, "at": at, "ip": None, "ua": "Mozilla/5.0", "cc": None, "bot": False, "q": {}}
    return click["id"], orjson.dumps([edge.click_from(click)])


async def _drain_click(db, redis, tenant, message_id: str, offer_id: str, at) -> str:
    """One human click of the message, through the stream and the drainer (which re-matches)."""
    click_id, batch = _click(tenant, message_id, offer_id, at)
    await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: batch})
    while await drain_once(db, redis, consumer="pytest-races", min_idle_ms=0):
        pass
    return click_id


async def test_a_before_click_verdict_racing_an_earlier_first_click_is_judged_again(api, db, redis, tenant, settings):
    # The message's first click so far is at 14:00; the conversion, at 13:00, is judged
    # before_click. While that batch is open the drainer stores the real first click, 12:00; its
    # re-match cannot see the uncommitted conversion. Both commit: the sweeper judges it again.
    offer = await make_offer(api, tenant)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    await _drain_click(db, redis, tenant, mid, offer["id"], T0 + timedelta(hours=2))
    await postback(api, tenant, aff_sub=mid, conversion_id="raced", timestamp=(T0 + timedelta(hours=1)).isoformat())
    pid = await db.fetchval("SELECT id FROM postbacks WHERE account_id = $1 AND conversion_key = 'raced'", tenant.account_id)

    batch = await asyncpg.connect(settings.database_url)
    try:
        transaction = batch.transaction()
        await transaction.start()
        assert await attribution.process_batch(batch, pid, limit=0) == (1, 0)  # before_click, not committed
        await _drain_click(db, redis, tenant, mid, offer["id"], T0)
        await transaction.commit()
    finally:
        await batch.close()
    assert (await conversion(db, tenant, "raced"))["unattributed_reason"] == "before_click"

    async with db.acquire() as conn, conn.transaction():  # what the sweeper does each turn
        await attribution.rematch_requested(conn)
    conv = await conversion(db, tenant, "raced")
    assert (conv["attributed"], conv["unattributed_reason"], conv["clicked_at"]) == (True, None, T0)


async def test_a_conversion_credited_by_a_first_click_follows_an_earlier_one_drained_later(
    api, db, redis, tenant, run_worker
):
    # The 14:00 click on offer X was drained first and the conversion (15:00) credited by it; then
    # the real first click, 12:00 on offer Y, is drained: it becomes the message's first click (the
    # report's click moves to offer Y), and the conversion follows it (offer Y's payout too).
    x = await make_offer(api, tenant, payout=3)
    y = await make_offer(api, tenant, payout=4)
    mid = await send_message(api, tenant, offer_id=x["id"])
    await _drain_click(db, redis, tenant, mid, x["id"], T0 + timedelta(hours=2))
    await postback(api, tenant, aff_sub=mid, conversion_id="named", timestamp=(T0 + timedelta(hours=3)).isoformat())
    await run_worker()
    conv = await conversion(db, tenant, "named")
    assert (conv["attributed"], conv["offer_id"], conv["payout"]) == (True, x["id"], 3)
    first = await _drain_click(db, redis, tenant, mid, y["id"], T0)
    assert await db.fetchval("SELECT click_id FROM message_clicks WHERE message_id = $1", mid) == first
    conv = await conversion(db, tenant, "named")
    assert (conv["attributed"], conv["offer_id"], conv["clicked_at"], conv["payout"]) == (True, y["id"], T0, 4)
    assert await db.fetchval("SELECT sum(amount) FROM conversion_adjustments WHERE conversion_id = $1", conv["id"]) == 4
    report = (await api.get("/api/v2/reports/performance?group_by=offer", headers=tenant.headers)).json()
    rows = {r["key"]: (r["clicks"], r["conversions"], r["revenue"]) for r in report["rows"]}
    assert rows[y["id"]] == (1, 1, 4) and rows.get(x["id"], (0, 0, 0))[1:] == (0, 0)


async def test_a_credited_conversion_whose_earlier_first_click_is_past_its_window_expires(api, db, redis, tenant, run_worker):
    offer = await make_offer(api, tenant, click_window_days=1)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    await _drain_click(db, redis, tenant, mid, offer["id"], T0 + timedelta(days=2))
    await postback(api, tenant, aff_sub=mid, conversion_id="window", timestamp=(T0 + timedelta(days=2, hours=1)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "window"))["attributed"] is True
    await _drain_click(db, redis, tenant, mid, offer["id"], T0)  # the first click: two days before
    conv = await conversion(db, tenant, "window")
    assert (conv["attributed"], conv["unattributed_reason"], conv["message_id"]) == (False, "expired", None)


async def test_an_expired_conversion_is_credited_by_an_earlier_first_click_on_an_offer_with_a_longer_window(
    api, db, redis, tenant, run_worker
):
    # The first click so far is on offer Y (a one-day window) and the conversion two days later
    # is expired; the real first click, an hour before, is on offer X (90 days): it credits it.
    x = await make_offer(api, tenant, payout=3)
    y = await make_offer(api, tenant, payout=4, click_window_days=1)
    mid = await send_message(api, tenant, offer_id=x["id"])
    await _drain_click(db, redis, tenant, mid, y["id"], T0 + timedelta(hours=1))
    await postback(api, tenant, aff_sub=mid, conversion_id="longer", timestamp=(T0 + timedelta(days=2)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "longer"))["unattributed_reason"] == "expired"
    await _drain_click(db, redis, tenant, mid, x["id"], T0)
    conv = await conversion(db, tenant, "longer")
    assert (conv["attributed"], conv["offer_id"], conv["clicked_at"], conv["payout"]) == (True, x["id"], T0, 3)
    assert await db.fetchval("SELECT sum(amount) FROM conversion_adjustments WHERE conversion_id = $1", conv["id"]) == 3

@pytest.mark.parametrize(("converted_hours", "later_window"), [(3, 90), (1, 90), (48, 1)],
                         ids=["credited", "before_click", "expired"])
async def test_a_sweep_between_the_batch_and_an_earlier_first_clicks_drain_judges_by_the_drained_click(
    api, db, redis, tenant, settings, converted_hours, later_window
):
    # The message's first click so far is at 14:00; the batch judges the conversion by it (15:00:
    # credited; 13:00: before_click; two days later, its offer's window one day: expired) and leaves
    # a request. Meanwhile a drainer stores the real first click, 12:00 (an offer of 90 days), and
    # its re-match misses the uncommitted conversion. The batch commits, and the sweeper takes the
    # request while the drain is still open: the conversion must end up credited by the 12:00 click
    # all the same (nothing else would judge it again).
    offer = await make_offer(api, tenant)
    later = await make_offer(api, tenant, click_window_days=later_window)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    await _drain_click(db, redis, tenant, mid, later["id"], T0 + timedelta(hours=2))
    await postback(api, tenant, aff_sub=mid, conversion_id="swept",
                   timestamp=(T0 + timedelta(hours=converted_hours)).isoformat())
    pid = await db.fetchval(
        "SELECT id FROM postbacks WHERE account_id = $1 AND conversion_key = 'swept'", tenant.account_id)

    batch, drain, sweep = [await asyncpg.connect(settings.database_url) for _ in range(3)]
    try:
        batch_transaction, drain_transaction = batch.transaction(), drain.transaction()
        await batch_transaction.start()
        assert await attribution.process_batch(batch, pid, limit=0) == (1, 0)  # judged by 14:00, not committed
        await drain_transaction.start()
        _, earlier = _click(tenant, mid, offer["id"], T0)
        await store_entries(drain, [(b"0-1", {edge.CLICK_BATCH_FIELD.encode(): earlier})])  # its re-match misses it
        await batch_transaction.commit()

        async def sweep_once() -> None:  # what the sweeper does each turn
            async with sweep.transaction():
                await attribution.rematch_requested(sweep)

        swept = asyncio.create_task(sweep_once())
        # The sweep either finishes with the drain still open or waits for it: either way the drain
        # commits only then.
        for _ in range(500):
            if swept.done() or await db.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", sweep.get_server_pid()
            ):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the sweep neither finished nor waited for a lock")
        await drain_transaction.commit()
        await swept
    finally:
        for conn in (batch, drain, sweep):
            await conn.close()
    conv = await conversion(db, tenant, "swept")
    assert (conv["attributed"], conv["clicked_at"], conv["offer_id"]) == (True, T0, offer["id"])
    assert await db.fetchval("SELECT count(*) FROM rematch_requests WHERE account_id = $1", tenant.account_id) == 0


STRESS_SECONDS = 5.0


async def test_drains_batches_sweeps_and_history_imports_at_once_give_first_click_credit_without_deadlock(
    api, db, redis, tenant, settings
):
    # Two offers (one with a one-day window) and messages, twelve and more sent meanwhile; for a few
    # seconds at once: clicks drained by two drainers that hold their transaction a moment (a click
    # mostly earlier than the ones before it: first clicks keep moving), conversions naming the
    # messages processed by two batch loops that hold theirs too, sweeps, and /history/clicks
    # imports racing the drainers for a new message's first click. Nothing may deadlock, and once
    # all is drained and swept every conversion must be judged by its message's first human click
    # as recomputed here from the raw clicks.
    rng = random.Random(20261125)
    offers = [await make_offer(api, tenant, payout=3), await make_offer(api, tenant, payout=4, click_window_days=1)]
    mids = [await send_message(api, tenant, offer_id=offers[n % 2]["id"]) for n in range(12)]
    at = lambda: T0 + timedelta(microseconds=rng.randrange(3 * 86_400_000_000))  # noqa: E731
    while await drain_once(db, redis, consumer="pytest-stress-0", min_idle_ms=0):
        pass  # what earlier tests left in the stream
    consumers = ["pytest-stress-0", "pytest-stress-1"]
    pool = await shared_db.create_pool(settings.database_url, max_size=8)
    arq_pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    deadlocks_before = await db.fetchval(deadlocks)
    failures: list[BaseException] = []
    counts = {"clicks": 0, "conversions": 0, "batches": 0, "drains": 0, "sweeps": 0, "imports": 0}
    stop = time.monotonic() + STRESS_SECONDS

    async def until_stopped(step) -> None:
        while time.monotonic() < stop:
            try:
                await step()
            except Exception as exc:  # a deadlock (or anything else) is the finding: no retry
                failures.append(exc)
            await asyncio.sleep(rng.random() * 0.005)

    async def click() -> None:
        # Mostly earlier than the clicks before it: a message's first click keeps moving earlier.
        earlier = T0 + timedelta(days=3) * max(stop - time.monotonic(), 0) / STRESS_SECONDS
        at_about = earlier + timedelta(minutes=rng.random() * 60)
        _, batch = _click(tenant, rng.choice(mids), rng.choice(offers)["id"], at_about)
        await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: batch})
        counts["clicks"] += 1

    def drain(consumer: str):
        async def step() -> None:
            await beat(redis, consumers)
            async with pool.acquire() as conn, conn.transaction():
                await drain_once(conn, redis, consumer=consumer)  # (its transaction: a savepoint of this one)
                await asyncio.sleep(rng.random() * 0.01)  # a drain still open while batches and sweeps go on
            counts["drains"] += 1
        return step

    async def send() -> None:  # new messages, whose first click drains and imports race for
        if len(mids) < 40:
            mids.append(await send_message(api, tenant, offer_id=rng.choice(offers)["id"]))
        await asyncio.sleep(0.1)

    async def convert() -> None:
        counts["conversions"] += 1
        await postback(api, tenant, aff_sub=rng.choice(mids), conversion_id=f"stress-{counts['conversions']}",
                       timestamp=at().replace(microsecond=0).isoformat())

    async def batch() -> None:
        async with pool.acquire() as conn, conn.transaction():
            await attribution.process_batch(conn, None, rng.randint(1, 8))
            await asyncio.sleep(rng.random() * 0.01)  # a batch still open while drains and sweeps go on
        counts["batches"] += 1

    async def sweep() -> None:
        await attribution.sweep_once(pool, arq_pool)
        counts["sweeps"] += 1

    async def history() -> None:
        records = [{"message_id": mid, "offer_id": rng.choice(offers)["id"], "phone_number": "+14155550100",
                    "timestamp": at().isoformat()} for mid in rng.sample(mids, 3)]
        resp = await api.post("/api/v2/history/clicks", headers=tenant.headers, json={"records": records})
        assert resp.status_code == 200 and resp.json()["error_count"] == 0, resp.text
        counts["imports"] += 1

    try:
        await asyncio.gather(*(until_stopped(step) for step in (
            send, click, drain(consumers[0]), drain(consumers[1]), convert, batch, batch, sweep, history)))
        assert not failures, failures[:5]
        # Quiet now: what is left is drained, processed and swept, as the worker would.
        while sum([await drain_once(pool, redis, consumer=c) for c in consumers]):
            pass
        async with pool.acquire() as conn, conn.transaction():
            assert (await attribution.process_batch(conn, None, 10_000)).deferred == 0
        await attribution.sweep_once(pool, arq_pool)
    finally:
        await arq_pool.aclose()
        await shared_db.close_pool(pool)
    assert min(counts.values()) > 10, counts  # each went on all along

    # The first human click of each message, from the raw clicks; each conversion judged by it.
    first = {}
    for k in await db.fetch(
        "SELECT k.id, k.message_id, k.clicked_at, k.offer_id FROM clicks k WHERE k.account_id = $1 AND NOT k.is_bot"
        " ORDER BY k.clicked_at, k.id", tenant.account_id,
    ):
        first.setdefault(k["message_id"], k)
    stored = {r["message_id"]: r["click_id"] for r in await db.fetch(
        "SELECT message_id, click_id FROM message_clicks WHERE account_id = $1", tenant.account_id)}
    assert stored == {m: k["id"] for m, k in first.items()}
    window = {o["id"]: timedelta(days=d) for o, d in zip(offers, (90, 1))}
    payout = {o["id"]: Decimal(p) for o, p in zip(offers, (3, 4))}
    judged = {"attributed": 0, "before_click": 0, "expired": 0, "click_not_found": 0}
    for c in await db.fetch(
        "SELECT c.*, (SELECT sum(amount) FROM conversion_adjustments a WHERE a.conversion_id = c.id) AS revenue"
        " FROM conversions c WHERE account_id = $1", tenant.account_id,
    ):
        k = first.get(c["click_id"])
        if k is None:
            expected = (False, "click_not_found", None, None)
        elif c["converted_at"] < k["clicked_at"].replace(microsecond=0):
            expected = (False, "before_click", None, None)
        elif c["converted_at"] > k["clicked_at"] + window[k["offer_id"]]:
            expected = (False, "expired", None, None)
        else:
            expected = (True, None, k["clicked_at"], k["offer_id"])
        found = (c["attributed"], c["unattributed_reason"], c["clicked_at"], c["offer_id"] if c["attributed"] else None)
        assert found == expected, (c["conversion_key"], c["click_id"], c["converted_at"])
        if c["attributed"]:
            assert c["message_id"] == c["click_id"] and c["payout"] == c["revenue"] == payout[k["offer_id"]]
        judged["attributed" if c["attributed"] else c["unattributed_reason"]] += 1
    assert judged["attributed"] > 10 and judged["expired"] > 10, judged
    await asyncio.sleep(1.0)  # the stress pool's backends, gone, have published their statistics by now
    await db.execute("SELECT pg_stat_clear_snapshot()")
    assert await db.fetchval(deadlocks) == deadlocks_before
    # Its hundreds of conversions judged this minute, many still waiting for a click, tipped a later
    # test's plans (the sweeper's probe of recent waiting conversions, as a share of the table): gone.
    await db.execute("DELETE FROM conversion_adjustments WHERE conversion_id IN"
                     " (SELECT id FROM conversions WHERE account_id = $1)", tenant.account_id)
    await db.execute("DELETE FROM conversions WHERE account_id = $1", tenant.account_id)


@pytest.mark.parametrize("names", ["click", "message"])
async def test_a_click_id_named_late_on_an_old_conversion_while_its_click_is_being_drained_is_matched(
    api, db, redis, tenant, settings, names
):
    # A conversion made two days ago named no click; today a postback of it names one (a raw click
    # id, or a message with no first click yet) whose drain is open: the batch judges it
    # click_not_found (the click is not visible) and the drain's re-match cannot see the named id
    # (the batch is not committed). The batch commits; a sweep runs while the drain is still open
    # (nothing to wait for: the click's row is not visible to it); the drain commits. The next
    # sweeps must find the stored click all the same, though the conversion was created more than
    # the sweeper's window ago.
    offer = await make_offer(api, tenant)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    converted = T0 + timedelta(hours=3)
    await postback(api, tenant, conversion_id="old", timestamp=converted.isoformat())
    async with db.acquire() as conn, conn.transaction():
        assert await attribution.process_batch(conn, None, limit=10) == (1, 0)
    await db.execute("UPDATE conversions SET created_at = now() - interval '2 days'"
                     " WHERE account_id = $1 AND conversion_key = 'old'", tenant.account_id)
    assert (await conversion(db, tenant, "old"))["unattributed_reason"] == "no_click_id"

    click_id, entry = _click(tenant, mid, offer["id"], T0)
    named = click_id if names == "click" else mid
    await postback(api, tenant, **({"click_id": named} if names == "click" else {"aff_sub": named}),
                   conversion_id="old", timestamp=converted.isoformat())
    pid = await db.fetchval("SELECT max(id) FROM postbacks WHERE account_id = $1 AND conversion_key = 'old'",
                            tenant.account_id)
    batch, drain = [await asyncpg.connect(settings.database_url) for _ in range(2)]
    try:
        batch_transaction, drain_transaction = batch.transaction(), drain.transaction()
        await batch_transaction.start()
        assert await attribution.process_batch(batch, pid, limit=0) == (1, 0)  # click_not_found, not committed
        await drain_transaction.start()
        await store_entries(drain, [(b"0-1", {edge.CLICK_BATCH_FIELD.encode(): entry})])  # its re-match misses it
        await batch_transaction.commit()
        async with db.acquire() as conn, conn.transaction():  # a sweep, the drain still open
            await attribution.rematch_stored(conn)
            await attribution.rematch_requested(conn)
        await drain_transaction.commit()
    finally:
        for conn in (batch, drain):
            await conn.close()
    assert (await conversion(db, tenant, "old"))["unattributed_reason"] == "click_not_found"

    async with db.acquire() as conn, conn.transaction():  # the next sweep
        await attribution.rematch_stored(conn)
        await attribution.rematch_requested(conn)
    conv = await conversion(db, tenant, "old")
    assert (conv["attributed"], conv["message_id"], conv["clicked_at"]) == (True, mid, T0)
