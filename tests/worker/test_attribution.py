"""First-click attribution by a real burst worker: windows, late clicks, storms, status machine."""
from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.worker import attribution
from tests.helpers import make_offer
from tests.worker.conftest import store_click

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


async def send_message(api, tenant, **fields):
    body = {"to": "+14155550100", "list_id": tenant.list_id, "body": "hi", **fields}
    resp = await api.post("/api/v2/send", headers=tenant.headers, json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["message_id"]


async def postback(api, tenant, method="GET", **params):
    if method == "GET":
        resp = await api.get(f"/postback/{tenant.postback_token}", params=params)
    else:
        resp = await api.post(f"/postback/{tenant.postback_token}", data=params)
    assert resp.status_code == 200, resp.text
    return resp.json()["status"]


async def conversion(db, tenant, key):
    return await db.fetchrow(
        "SELECT * FROM conversions WHERE account_id = $1 AND conversion_key = $2", tenant.account_id, key
    )


async def ledger(db, conversion_id):
    return [
        (r["from_status"], r["to_status"], r["amount"])
        for r in await db.fetch(
            "SELECT from_status, to_status, amount FROM conversion_adjustments WHERE conversion_id = $1 ORDER BY id",
            conversion_id,
        )
    ]


async def clicked_message(api, db, tenant, offer=None, at=T0, **fields):
    offer = offer or await make_offer(api, tenant, payout=5)
    mid = await send_message(api, tenant, offer_id=offer["id"], **fields)
    click_id = await store_click(db, tenant.account_id, mid, at, offer_id=offer["id"])
    return offer, mid, click_id


async def test_attributed_conversion_credits_message_creative_offer_contact_campaign(api, db, tenant, run_worker):
    offer, mid, click_id = await clicked_message(api, db, tenant, creative_id="cr1", schedule_id="sch1")
    ts = (T0 + timedelta(hours=5)).isoformat()
    assert await postback(api, tenant, click_id=click_id, payout="24.99", conversion_id="c1", timestamp=ts) == "accepted"
    await run_worker()
    conv = await conversion(db, tenant, "c1")
    assert conv["attributed"] and conv["unattributed_reason"] is None
    assert (conv["message_id"], conv["creative_id"], conv["schedule_id"], conv["offer_id"]) == (mid, "cr1", "sch1", offer["id"])
    assert conv["contact_phone"] == "+14155550100" and conv["list_id"] == tenant.list_id
    assert conv["clicked_at"] == T0 and conv["converted_at"] == T0 + timedelta(hours=5)
    assert conv["status"] == "approved" and conv["payout"] == Decimal("24.99") and conv["currency"] == "USD"
    assert await ledger(db, conv["id"]) == [(None, "approved", Decimal("24.99"))]
    pb = await db.fetchrow("SELECT * FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert pb["processed_at"] is not None and pb["process_error"] is None
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert detail["conversions"] == 1 and detail["revenue"] == 24.99


async def test_window_edge(api, db, tenant, run_worker):
    offer = await make_offer(api, tenant, click_window_days=7)
    _, _, at_edge = await clicked_message(api, db, tenant, offer=offer)
    _, _, past_edge = await clicked_message(api, db, tenant, offer=offer)
    edge = T0 + timedelta(days=7)
    await postback(api, tenant, click_id=at_edge, conversion_id="edge", timestamp=edge.isoformat())
    await postback(api, tenant, click_id=past_edge, conversion_id="past",
                   timestamp=(edge + timedelta(seconds=1)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "edge"))["attributed"] is True
    past = await conversion(db, tenant, "past")
    assert past["attributed"] is False and past["unattributed_reason"] == "expired" and past["message_id"] is None


async def test_the_named_click_wins_over_the_contacts_earlier_click(api, db, tenant, run_worker):
    # CONTRACT.md §5: "the click named by click_id". One contact clicks message A on Monday and
    # message B on Wednesday, same offer; Friday's conversion credits the message whose click the
    # network names. A later click on A itself is no new engagement: naming it credits A.
    offer, a, a_click = await clicked_message(api, db, tenant, at=T0)
    _, b, b_click = await clicked_message(api, db, tenant, offer=offer, at=T0 + timedelta(days=2))
    later_a = await store_click(db, tenant.account_id, a, T0 + timedelta(days=3), offer_id=offer["id"], first=False)
    friday = (T0 + timedelta(days=4)).isoformat()
    await postback(api, tenant, click_id=b_click, conversion_id="names-b", payout="20", timestamp=friday)
    await postback(api, tenant, click_id=a_click, conversion_id="names-a", payout="5", timestamp=friday)
    await postback(api, tenant, click_id=later_a, conversion_id="names-a-again", payout="1", timestamp=friday)
    await run_worker()
    named_b = await conversion(db, tenant, "names-b")
    assert named_b["attributed"] and named_b["message_id"] == b and named_b["click_id"] == b_click
    assert named_b["clicked_at"] == T0 + timedelta(days=2)
    assert (await conversion(db, tenant, "names-a"))["message_id"] == a
    again = await conversion(db, tenant, "names-a-again")  # judged by the click it names
    assert again["message_id"] == a and again["click_id"] == later_a and again["clicked_at"] == T0 + timedelta(days=3)
    for mid, conversions, revenue in ((a, 2, 6), (b, 1, 20)):
        detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
        assert (detail["conversions"], detail["revenue"]) == (conversions, revenue)


async def test_window_edges_for_a_click_within_a_second(api, db, tenant, run_worker):
    # The click is at T0 + 0.4 s; networks stamp whole seconds (its {datetime} is T0). The click's
    # second is not before it; the window ends exactly 7 days after it.
    offer = await make_offer(api, tenant, click_window_days=7)
    at = T0 + timedelta(milliseconds=400)
    stamps = {
        "same-second": T0, "second-before": T0 - timedelta(seconds=1),
        "edge-of-its-second": T0 + timedelta(days=7), "exact-edge": at + timedelta(days=7),
        "second-past-its-second": T0 + timedelta(days=7, seconds=1), "just-past": at + timedelta(days=7, milliseconds=1),
        "second-past": at + timedelta(days=7, seconds=1),
    }
    for key, stamp in stamps.items():
        _, _, click_id = await clicked_message(api, db, tenant, offer=offer, at=at)
        await postback(api, tenant, click_id=click_id, conversion_id=key, timestamp=stamp.isoformat())
    await run_worker()
    verdicts = {key: (await conversion(db, tenant, key))["unattributed_reason"] for key in stamps}
    assert verdicts == {
        "same-second": None, "second-before": "before_click", "edge-of-its-second": None, "exact-edge": None,
        "second-past-its-second": "expired", "just-past": "expired", "second-past": "expired",
    }


async def test_unencoded_plus_in_a_timestamp_offset_is_an_offset(api, db, tenant, run_worker):
    _, mid, click_id = await clicked_message(api, db, tenant)
    # As curl or a network sends it: the "+" unencoded, so the query decodes it to a space.
    resp = await api.get(f"/postback/{tenant.postback_token}?click_id={click_id}&txid=plus&payout=3"
                         "&timestamp=2026-03-01T17:30:00+05:00")
    assert resp.json()["status"] == "accepted"
    await run_worker()
    conv = await conversion(db, tenant, "plus")
    assert conv["converted_at"] == T0 + timedelta(minutes=30) and conv["attributed"] and conv["message_id"] == mid


async def test_default_window_is_90_days(api, db, tenant, run_worker):
    offer, _, click_id = await clicked_message(api, db, tenant)
    offer_less = await send_message(api, tenant)
    no_offer_click = await store_click(db, tenant.account_id, offer_less, T0)
    await postback(api, tenant, click_id=click_id, conversion_id="d90", timestamp=str(int((T0 + timedelta(days=90)).timestamp())))
    await postback(api, tenant, click_id=no_offer_click, conversion_id="d91",
                   timestamp=(T0 + timedelta(days=90, seconds=1)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "d90"))["attributed"] is True
    assert (await conversion(db, tenant, "d91"))["unattributed_reason"] == "expired"


async def test_conversion_before_click_is_not_attributed(api, db, tenant, run_worker):
    _, _, click_id = await clicked_message(api, db, tenant)
    await postback(api, tenant, click_id=click_id, conversion_id="early", timestamp=(T0 - timedelta(seconds=1)).isoformat())
    await run_worker()
    conv = await conversion(db, tenant, "early")
    assert (conv["attributed"], conv["unattributed_reason"]) == (False, "before_click")


async def test_conversion_in_the_clicks_second_is_attributed(api, db, tenant, run_worker):
    """A network echoing {datetime} (whole seconds) stamps the conversion with the click's second."""
    _, _, click_id = await clicked_message(api, db, tenant, at=T0 + timedelta(microseconds=700_000))
    await postback(api, tenant, click_id=click_id, conversion_id="same-second", timestamp="2026-03-01T12:00:00Z")
    await postback(api, tenant, click_id=click_id, conversion_id="unix-second", timestamp=str(int(T0.timestamp())))
    await run_worker()
    for key in ("same-second", "unix-second"):
        conv = await conversion(db, tenant, key)
        assert (conv["attributed"], conv["unattributed_reason"]) == (True, None), key


async def test_unknown_missing_foreign_and_bot_clicks(api, db, tenant, run_worker):
    from tests.helpers import make_tenant

    other = await make_tenant(db)
    other_mid = await send_message(api, other)
    foreign_click = await store_click(db, other.account_id, other_mid, T0)
    mid = await send_message(api, tenant)
    bot_click = await store_click(db, tenant.account_id, mid, T0, is_bot=True)
    await postback(api, tenant, click_id="nope" + secrets.token_hex(4), conversion_id="unknown")
    await postback(api, tenant, click_id=foreign_click, conversion_id="foreign")
    await postback(api, tenant, click_id=bot_click, conversion_id="bot", timestamp=(T0 + timedelta(minutes=1)).isoformat())
    await postback(api, tenant, conversion_id="nocid", payout="3")
    await run_worker()
    reasons = {k: (await conversion(db, tenant, k))["unattributed_reason"] for k in ("unknown", "foreign", "bot", "nocid")}
    assert reasons == {"unknown": "click_not_found", "foreign": "click_not_found", "bot": "bot_click", "nocid": "no_click_id"}
    # Unattributed conversions still count: kept with their payout in the ledger.
    assert (await conversion(db, tenant, "nocid"))["payout"] == Decimal(3)


async def test_late_postback_attributes_once_the_click_is_stored(api, db, tenant, run_worker):
    offer = await make_offer(api, tenant)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    click_id = secrets.token_hex(16)
    await postback(api, tenant, click_id=click_id, conversion_id="late", payout="7.5",
                   timestamp=(T0 + timedelta(minutes=3)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "late"))["unattributed_reason"] == "click_not_found"
    # The drainer stores the click and calls rematch_for_clicks in its transaction.
    await store_click(db, tenant.account_id, mid, T0, offer_id=offer["id"], click_id=click_id)
    async with db.acquire() as conn, conn.transaction():
        assert await attribution.rematch_for_clicks(conn, [click_id]) == 1
        assert await attribution.rematch_for_clicks(conn, [click_id]) == 0
    conv = await conversion(db, tenant, "late")
    assert conv["attributed"] and conv["message_id"] == mid and conv["offer_id"] == offer["id"]
    assert conv["clicked_at"] == T0


async def test_late_click_credits_its_own_message_over_the_contacts_earlier_click(api, db, tenant, run_worker):
    # The conversion names B's click before the drainer has stored it; the contact clicked A (same
    # offer) earlier. Once B's click lands, the credit is B's, as for a click already stored.
    offer, a, _ = await clicked_message(api, db, tenant, at=T0)
    b = await send_message(api, tenant, offer_id=offer["id"])
    b_click = secrets.token_hex(16)
    await postback(api, tenant, click_id=b_click, conversion_id="late-b", timestamp=(T0 + timedelta(days=4)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "late-b"))["unattributed_reason"] == "click_not_found"
    await store_click(db, tenant.account_id, b, T0 + timedelta(days=2), offer_id=offer["id"], click_id=b_click)
    async with db.acquire() as conn, conn.transaction():
        assert await attribution.rematch_for_clicks(conn, [b_click]) == 1
    conv = await conversion(db, tenant, "late-b")
    assert conv["attributed"] and conv["message_id"] == b and conv["clicked_at"] == T0 + timedelta(days=2)


async def test_late_click_still_judged_by_the_window(api, db, tenant):
    mid = await send_message(api, tenant)
    click_id = secrets.token_hex(16)
    async with db.acquire() as conn:
        await conn.execute(
            "INSERT INTO conversions (account_id, network, conversion_key, click_id, status, converted_at, unattributed_reason)"
            " VALUES ($1, 'default', 'waiting', $2, 'approved', $3, 'click_not_found')",
            tenant.account_id, click_id, T0 - timedelta(hours=1),
        )
    await store_click(db, tenant.account_id, mid, T0, click_id=click_id)
    async with db.acquire() as conn, conn.transaction():
        assert await attribution.rematch_for_clicks(conn, [click_id]) == 0
    assert (await conversion(db, tenant, "waiting"))["unattributed_reason"] == "before_click"


async def test_sweeper_rematches_clicks_stored_meanwhile(api, db, tenant, redis):
    mid = await send_message(api, tenant)
    click_id = secrets.token_hex(16)
    await postback(api, tenant, click_id=click_id, conversion_id="raced", timestamp=(T0 + timedelta(hours=1)).isoformat())
    for _ in range(50):  # batches until it is in (earlier tests may leave postbacks waiting)
        async with db.acquire() as conn, conn.transaction():
            await attribution.process_batch(conn)
        if await conversion(db, tenant, "raced") is not None:
            break
    assert (await conversion(db, tenant, "raced"))["attributed"] is False
    await store_click(db, tenant.account_id, mid, T0, click_id=click_id)  # no rematch call: the race
    for _ in range(50):  # pages, as sweeps take them (earlier tests may leave thousands waiting)
        async with db.acquire() as conn, conn.transaction():
            if await attribution.rematch_stored(conn) < 1000:
                break
    assert (await conversion(db, tenant, "raced"))["attributed"] is True


async def test_the_sweeps_rematch_runs_while_redis_is_down(api, db, tenant, settings, tmp_path):
    """Enqueuing waiting postbacks needs Redis; the re-match needs only PostgreSQL and must not
    wait for Redis (its window is a day: an outage of Redis would leave conversions behind)."""
    from arq import create_pool
    from arq.connections import RedisSettings

    from shared.embedded import EmbeddedRedis

    mid = await send_message(api, tenant)
    click_id = secrets.token_hex(16)
    await db.execute(
        "INSERT INTO postbacks (account_id, received_at, method, params, conversion_key, click_id, status, payout,"
        " converted_at, dedupe_key) VALUES ($1, now() - interval '1 minute', 'GET', '{}', 'unsent', $2, 'approved', 1,"
        " $3, 'unsent-key')", tenant.account_id, click_id, T0 + timedelta(hours=1),
    )
    await db.execute(
        "INSERT INTO conversions (account_id, network, conversion_key, click_id, status, converted_at, unattributed_reason)"
        " VALUES ($1, 'default', 'raced-down', $2, 'approved', $3, 'click_not_found')",
        tenant.account_id, click_id, T0 + timedelta(hours=1),
    )
    await store_click(db, tenant.account_id, mid, T0, click_id=click_id)  # no rematch call: the race
    private = EmbeddedRedis(tmp_path / "redis")
    private.start()
    pool = await create_pool(RedisSettings.from_dsn(private.url))
    private.stop()  # Redis goes away: enqueuing the waiting postback fails
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever redis-py raises for a server that is gone
            await attribution.sweep_once(db, pool)
    finally:
        await pool.aclose()
        await db.execute("UPDATE postbacks SET processed_at = now() WHERE conversion_key = 'unsent' AND account_id = $1",
                         tenant.account_id)  # (not for the next tests' sweeps)
    assert (await conversion(db, tenant, "raced-down"))["attributed"] is True


async def test_the_sweepers_rematch_looks_back_a_day_only(api, db, tenant):
    """Click ids that never arrive pile up for good: the sweeper re-matches only conversions
    judged click_not_found (created, or named their click late) within REMATCH_WINDOW (the drainer itself re-matches a click stored later), and finds
    them by an index rather than by reading every waiting conversion of every account. A worker
    that starts looks back without limit once (its sweeper may have been down longer)."""
    mid = await send_message(api, tenant)
    old, recent = secrets.token_hex(16), secrets.token_hex(16)
    for key, click_id, age in (("old-wait", old, timedelta(days=1, hours=1)), ("new-wait", recent, timedelta(0))):
        await db.execute(
            "INSERT INTO conversions (account_id, network, conversion_key, click_id, status, converted_at,"
            " unattributed_reason, created_at) VALUES ($1, 'default', $2, $3, 'approved', $4, 'click_not_found', now() - $5::interval)",
            tenant.account_id, key, click_id, T0 + timedelta(hours=1), age,
        )
        await store_click(db, tenant.account_id, mid, T0, click_id=click_id)  # no rematch call: the race
    async with db.acquire() as conn, conn.transaction():
        await attribution.rematch_stored(conn)
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch(
            f"EXPLAIN SELECT id FROM conversions c {attribution.waiting_for_a_click(attribution.REMATCH_WINDOW)}"))
    assert (await conversion(db, tenant, "new-wait"))["attributed"] is True
    assert (await conversion(db, tenant, "old-wait"))["unattributed_reason"] == "click_not_found"
    assert "conversions_waiting_click_since" in plan, plan
    await attribution.rematch_all(db, limit=1)  # pages of one: it goes on until none is left
    assert (await conversion(db, tenant, "old-wait"))["attributed"] is True


async def test_the_start_up_rematch_is_tried_again_until_it_succeeds(api, db, tenant, monkeypatch):
    # A conversion older than the sweeps' day, whose click is stored: only the start-up re-match
    # (without a window) finds it. Its first attempt fails (a deadlock, a statement timeout).
    mid = await send_message(api, tenant)
    click_id = secrets.token_hex(16)
    await db.execute(
        "INSERT INTO conversions (account_id, network, conversion_key, click_id, status, converted_at,"
        " unattributed_reason, created_at) VALUES ($1, 'default', 'startup-wait', $2, 'approved', $3,"
        " 'click_not_found', now() - interval '3 days')",
        tenant.account_id, click_id, T0 + timedelta(hours=1),
    )
    await store_click(db, tenant.account_id, mid, T0, click_id=click_id)
    real, attempts = attribution.rematch_all, []

    async def failing_once(pool, *args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("deadlock detected")
        await real(pool, *args, **kwargs)

    async def no_sweep(*_):
        return 0

    monkeypatch.setattr(attribution, "rematch_all", failing_once)
    monkeypatch.setattr(attribution, "sweep_once", no_sweep)
    monkeypatch.setattr(attribution, "REMATCH_ALL_RETRY", 0.05)
    sweeper = asyncio.ensure_future(attribution.run_sweeper({"db": db, "redis": None}))
    try:
        for _ in range(100):
            if (await conversion(db, tenant, "startup-wait"))["attributed"]:
                break
            await asyncio.sleep(0.05)
        assert (await conversion(db, tenant, "startup-wait"))["attributed"] is True
        assert len(attempts) == 2
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)


async def test_duplicate_storm_makes_one_conversion(api, db, tenant, run_worker):
    _, _, click_id = await clicked_message(api, db, tenant)
    params = {"click_id": click_id, "conversion_id": "storm", "payout": "10", "timestamp": (T0 + timedelta(hours=1)).isoformat()}
    answers = await asyncio.gather(*(postback(api, tenant, **params) for _ in range(100)))
    assert answers.count("accepted") == 1 and answers.count("duplicate") == 99
    stored = await db.fetch("SELECT is_duplicate, dedupe_key FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert len(stored) == 100 and sum(1 for r in stored if not r["is_duplicate"]) == 1
    await run_worker()
    rows = await db.fetch("SELECT id, status, payout FROM conversions WHERE account_id = $1", tenant.account_id)
    assert len(rows) == 1
    assert await ledger(db, rows[0]["id"]) == [(None, "approved", Decimal(10))]


async def test_concurrent_batches_on_one_conversion(api, db, tenant):
    """Distinct postbacks of one conversion processed by concurrent transactions: one row, and
    the ledger sums to the final value whatever the interleaving. A batch that finds an older
    postback of its conversion still waiting leaves its own for later, and is taken again, as the
    worker's job and sweeper do."""
    _, _, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=1)).isoformat()
    for status in ("pending", "approved"):
        await postback(api, tenant, click_id=click_id, conversion_id="race", status=status, payout="4.25", timestamp=ts)
    ids = [r["id"] for r in await db.fetch("SELECT id FROM postbacks WHERE account_id = $1 ORDER BY id", tenant.account_id)]

    async def one(pid):
        async with db.acquire() as conn, conn.transaction():
            await attribution.process_batch(conn, pid, limit=0)

    await asyncio.gather(*(one(pid) for pid in ids))
    for _ in range(5):
        waiting = [r["id"] for r in await db.fetch(
            "SELECT id FROM postbacks WHERE account_id = $1 AND processed_at IS NULL ORDER BY id", tenant.account_id)]
        if not waiting:
            break
        for pid in waiting:
            await one(pid)
    assert not waiting
    rows = await db.fetch("SELECT id, status FROM conversions WHERE account_id = $1", tenant.account_id)
    assert len(rows) == 1 and rows[0]["status"] == "approved"
    assert sum(a for *_, a in await ledger(db, rows[0]["id"])) == Decimal("4.25")


async def test_status_machine_and_reversal(api, db, tenant, run_worker):
    _, mid, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=1)).isoformat()
    common = {"click_id": click_id, "txid": "sm", "timestamp": ts}
    await postback(api, tenant, status="pending", payout="12.5", **common)
    await run_worker()
    conv = await conversion(db, tenant, "sm")
    assert conv["status"] == "pending"
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (0, 0)
    await postback(api, tenant, status="approved", payout="12.5", **common)
    await run_worker()
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (1, 12.5)
    # A late pending is an out-of-order downgrade: ignored.
    await postback(api, tenant, status="pending", payout="1", **common)
    await run_worker()
    assert (await conversion(db, tenant, "sm"))["status"] == "approved"
    await postback(api, tenant, status="reversed", **common)
    await run_worker()
    conv = await conversion(db, tenant, "sm")
    assert conv["status"] == "reversed"
    assert await ledger(db, conv["id"]) == [
        (None, "pending", Decimal(0)), ("pending", "approved", Decimal("12.5")), ("approved", "reversed", Decimal("-12.5")),
    ]
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (0, 0)
    # Reversed is final.
    await postback(api, tenant, status="approved", payout="12.5", **common)
    await run_worker()
    assert (await conversion(db, tenant, "sm"))["status"] == "reversed"


async def test_payouts_are_exact_through_the_ledger(api, db, tenant, run_worker):
    # 42 digits: what Python's default 28-digit context would round in a difference or a negation.
    large, tiny = "999999999999.123456789012345678901234567891", "0.000000000000000000000000000001"
    _, mid, click_id = await clicked_message(api, db, tenant)
    common = {"click_id": click_id, "txid": "exact", "timestamp": (T0 + timedelta(hours=1)).isoformat()}
    # Approved, corrected down and back up, then reversed as the negative of its payout.
    for status, payout in (("approved", large), ("approved", tiny), ("approved", large), ("reversed", "-" + large)):
        await postback(api, tenant, status=status, payout=payout, **common)
        await run_worker()
    conv = await conversion(db, tenant, "exact")
    assert conv["status"] == "reversed" and conv["payout"] == Decimal(large)
    assert await ledger(db, conv["id"]) == [
        (None, "approved", Decimal(large)),
        ("approved", "approved", Decimal("-999999999999.123456789012345678901234567890")),
        ("approved", "approved", Decimal("999999999999.123456789012345678901234567890")),
        ("approved", "reversed", Decimal("-999999999999.123456789012345678901234567891")),
    ]
    assert await db.fetchval("SELECT sum(amount) FROM conversion_adjustments WHERE conversion_id = $1", conv["id"]) == 0


async def test_pending_then_approved_in_one_batch_and_rejected(api, db, tenant, run_worker):
    _, _, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=1)).isoformat()
    await postback(api, tenant, click_id=click_id, conversion_id="b1", status="pending", payout="2", timestamp=ts)
    await postback(api, tenant, click_id=click_id, conversion_id="b1", status="approved", payout="2", timestamp=ts)
    await postback(api, tenant, click_id=click_id, conversion_id="b2", status="pending", payout="3", timestamp=ts)
    await postback(api, tenant, click_id=click_id, conversion_id="b2", status="rejected", payout="3", timestamp=ts)
    await run_worker()
    b1, b2 = await conversion(db, tenant, "b1"), await conversion(db, tenant, "b2")
    assert (b1["status"], b2["status"]) == ("approved", "rejected")
    assert sum(a for *_, a in await ledger(db, b1["id"])) == Decimal(2)
    assert sum(a for *_, a in await ledger(db, b2["id"])) == Decimal(0)


async def test_many_conversions_per_click_and_payout_from_offer(api, db, tenant, run_worker):
    offer = await make_offer(api, tenant, payout="4.10")
    _, mid, click_id = await clicked_message(api, db, tenant, offer=offer)
    ts = (T0 + timedelta(hours=1)).isoformat()
    await postback(api, tenant, click_id=click_id, conversion_id="m1", payout="0.1", timestamp=ts)
    await postback(api, tenant, click_id=click_id, conversion_id="m2", payout="0.2", timestamp=ts)
    await postback(api, tenant, click_id=click_id, conversion_id="m3", timestamp=ts, currency="eur")
    await run_worker()
    m3 = await conversion(db, tenant, "m3")
    assert m3["payout"] == Decimal("4.10") and m3["currency"] == "EUR"
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert detail["conversions"] == 3
    revenue = await db.fetchval("SELECT sum(amount) FROM conversion_adjustments a JOIN conversions c ON c.id = a.conversion_id"
                                " WHERE c.message_id = $1 AND c.conversion_key IN ('m1', 'm2')", mid)
    assert revenue == Decimal("0.3")


async def test_without_conversion_id_the_click_is_the_key(api, db, tenant, run_worker):
    _, _, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=1)).isoformat()
    assert await postback(api, tenant, click_id=click_id, status="pending", timestamp=ts) == "accepted"
    assert await postback(api, tenant, click_id=click_id, status="approved", payout="1", timestamp=ts) == "accepted"
    await run_worker()
    conv = await conversion(db, tenant, f"click:{click_id}")
    assert conv["status"] == "approved" and conv["payout"] == Decimal(1)


async def test_networks_are_separate_conversions(api, db, tenant, run_worker):
    _, _, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=1)).isoformat()
    await postback(api, tenant, click_id=click_id, conversion_id="n", network="tune", timestamp=ts)
    await postback(api, tenant, click_id=click_id, conversion_id="n", network="everflow", timestamp=ts)
    await run_worker()
    rows = await db.fetch("SELECT network FROM conversions WHERE account_id = $1 ORDER BY network", tenant.account_id)
    assert [r["network"] for r in rows] == ["everflow", "tune"]


async def test_sweeper_enqueues_stored_postbacks_without_a_job(api, db, tenant, settings, run_worker):
    _, _, click_id = await clicked_message(api, db, tenant)
    async with db.acquire() as conn:
        pid = await conn.fetchval(
            "INSERT INTO postbacks (account_id, received_at, method, params, conversion_key, click_id, status, payout,"
            " converted_at, dedupe_key) VALUES ($1, now() - interval '1 minute', 'GET', '{}', 'swept', $2, 'approved', 1,"
            " $3, 'swept-key') RETURNING id",
            tenant.account_id, click_id, T0 + timedelta(hours=1),
        )
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        assert await attribution.sweep_once(db, pool) >= 1
    finally:
        await pool.aclose()
    await run_worker()
    assert (await db.fetchval("SELECT processed_at FROM postbacks WHERE id = $1", pid)) is not None
    assert (await conversion(db, tenant, "swept"))["attributed"] is True


@pytest.mark.parametrize("own_job", [True, False], ids=["own-job", "only-the-window-job"])
async def test_a_poison_postback_sinks_only_itself(api, db, tenant, run_worker, gateway_app, own_job):
    _, _, click_id = await clicked_message(api, db, tenant)
    async with db.acquire() as conn:
        poison = await conn.fetchval(
            "INSERT INTO postbacks (account_id, method, params, conversion_key, click_id, status, payout, converted_at,"
            " dedupe_key) VALUES ($1, 'GET', '{}', 'poison', $2, 'bogus', 1, now(), 'poison') RETURNING id",
            tenant.account_id, click_id,
        )
    if own_job:  # as the sweeper enqueues it; without it, the healthy postback's window job meets it
        await gateway_app.state.arq.enqueue_job("process_postback", poison, _job_id=f"postback:{poison}")
    await postback(api, tenant, click_id=click_id, conversion_id="healthy", timestamp=(T0 + timedelta(hours=1)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "healthy"))["attributed"] is True
    row = await db.fetchrow("SELECT processed_at, process_error FROM postbacks WHERE id = $1", poison)
    assert row["processed_at"] is not None and "CheckViolation" in row["process_error"]
    assert await conversion(db, tenant, "poison") is None


async def test_head_stores_nothing(api, db, tenant):
    resp = await api.head(f"/postback/{tenant.postback_token}", params={"click_id": "x"})
    assert resp.status_code == 200
    assert await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1", tenant.account_id) == 0
    assert (await api.head("/postback/unknown")).status_code == 401


async def test_late_postback_attributed_by_the_click_drainer(api, db, redis, tenant, run_worker):
    """The whole path: postback before its click, then the edge's click drained by the real drainer."""
    import orjson

    from services.worker.clicks import drain_once
    from shared import edge, ids

    async def drain_all():
        while await drain_once(db, redis, consumer="pytest-attribution", min_idle_ms=0):
            pass

    await drain_all()
    offer = await make_offer(api, tenant)
    mid = await send_message(api, tenant, offer_id=offer["id"], creative_id="late-cr")
    click_id = ids.click_id()
    await postback(api, tenant, click_id=click_id, conversion_id="drained", payout="9.99",
                   timestamp=(T0 + timedelta(minutes=10)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "drained"))["unattributed_reason"] == "click_not_found"
    click = {"id": click_id, "l": "Ab3kX9", "o": offer["id"], "a": tenant.account_id, "li": tenant.list_id, "m": mid,
             "at": T0, "ip": None, "ua": "Mozilla/5.0", "cc": None, "bot": False, "q": {}}
    await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: orjson.dumps([edge.click_from(click)])})
    await drain_all()
    conv = await conversion(db, tenant, "drained")
    assert conv["attributed"] and (conv["message_id"], conv["creative_id"], conv["offer_id"]) == (mid, "late-cr", offer["id"])
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["clicked"], detail["conversions"], detail["revenue"]) == (True, 1, 9.99)


async def _unprocessed(db, tenant):
    return [r["id"] for r in await db.fetch(
        "SELECT id FROM postbacks WHERE account_id = $1 AND processed_at IS NULL ORDER BY id", tenant.account_id)]


@pytest.mark.parametrize("earlier, older, newer, expected", [
    # (status, payout) of each postback, in the order received -> the conversion's (status, payout)
    ([("pending", "10")], ("approved", "10"), ("pending", None), ("approved", 10)),  # a late pending
    ([("approved", "10")], ("reversed", None), ("approved", "11"), ("reversed", 10)),  # reversed is final
    ([("pending", None)], ("approved", "10"), ("approved", None), ("approved", 10)),  # no payout: keeps 10
    ([("approved", "12"), ("rejected", "12")], ("approved", "12"), ("rejected", "12"), ("rejected", 12)),
    ([], ("pending", "10"), ("approved", None), ("approved", 10)),  # the older one creates it
])
async def test_a_conversions_postbacks_wait_for_an_older_one_another_batch_holds(
    api, db, tenant, earlier, older, newer, expected
):
    """Two workers' batches can take postbacks of one conversion at once: the one with the newer
    postback leaves it until the older one is committed, so the order received decides, whichever
    batch would have committed first."""
    _, mid, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=1)).isoformat()

    async def send(status, payout, **extra):
        params = {"click_id": click_id, "conversion_id": "k", "status": status, "timestamp": ts, **extra}
        await postback(api, tenant, **params, **({} if payout is None else {"payout": payout}))

    for status, payout in earlier:
        await send(status, payout)
        async with db.acquire() as conn, conn.transaction():
            await attribution.process_batch(conn)
    await send(*older)
    await send(*newer, click_id="")  # (a later postback may not name the click again)
    first, second = await _unprocessed(db, tenant)
    async with db.acquire() as holder, holder.transaction():
        assert await attribution.process_batch(holder, first, limit=0) == (1, 0)
        async with db.acquire() as conn, conn.transaction():  # meanwhile, another worker's batch
            assert await attribution.process_batch(conn, second, limit=0) == (0, 1)
    assert await _unprocessed(db, tenant) == [second]
    async with db.acquire() as conn, conn.transaction():
        assert await attribution.process_batch(conn, second, limit=0) == (1, 0)
    conv = await conversion(db, tenant, "k")
    assert (conv["status"], conv["payout"]) == (expected[0], Decimal(expected[1]))
    assert conv["attributed"] and conv["message_id"] == mid
    value = expected[1] if expected[0] == "approved" else 0
    assert sum(a for *_, a in await ledger(db, conv["id"])) == value


async def test_a_job_takes_again_what_its_batch_left_behind(api, db, tenant, settings, monkeypatch):
    """The job whose batch left postbacks behind an older one takes them again once that is done."""
    _, _, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=1)).isoformat()
    for status in ("pending", "approved"):
        await postback(api, tenant, click_id=click_id, conversion_id="again", status=status, payout="3", timestamp=ts)
    first, second = await _unprocessed(db, tenant)
    monkeypatch.setattr(attribution, "DEFERRED_PAUSE", 0.2)
    async with db.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        await attribution.process_batch(holder, first, limit=0)
        job = asyncio.ensure_future(attribution.process_postback({"db": db}, second))
        await asyncio.sleep(0.1)
        assert not job.done()  # pausing: its postback waits for the first
        await transaction.commit()
    assert await job == 1
    assert (await conversion(db, tenant, "again"))["status"] == "approved"
    assert await _unprocessed(db, tenant) == []


async def test_a_click_stored_after_its_postback_gives_what_its_offer_would_have(api, db, tenant, run_worker):
    """A postback without payout or currency, before its click is stored, has no offer to take
    them from (0, USD). Once the click lands the conversion ends as if the click had come first:
    the offer's payout and currency, the difference in the ledger. A payout a postback gave stays."""
    offer = await make_offer(api, tenant, payout=7, currency="EUR")
    mid = await send_message(api, tenant, offer_id=offer["id"])
    click_id = secrets.token_hex(16)
    ts = (T0 + timedelta(minutes=3)).isoformat()
    await postback(api, tenant, click_id=click_id, conversion_id="no-payout", timestamp=ts)
    await postback(api, tenant, click_id=click_id, conversion_id="pending-first", status="pending", timestamp=ts)
    await postback(api, tenant, click_id=click_id, conversion_id="given", payout="3", timestamp=ts)
    await run_worker()
    conv = await conversion(db, tenant, "no-payout")
    assert (conv["unattributed_reason"], conv["payout"], conv["currency"]) == ("click_not_found", 0, "USD")

    await store_click(db, tenant.account_id, mid, T0, offer_id=offer["id"], click_id=click_id)
    async with db.acquire() as conn, conn.transaction():
        assert await attribution.rematch_for_clicks(conn, [click_id]) == 3
    conv = await conversion(db, tenant, "no-payout")
    assert conv["attributed"] and (conv["payout"], conv["currency"]) == (Decimal(7), "EUR")
    assert await ledger(db, conv["id"]) == [(None, "approved", 0), ("approved", "approved", Decimal(7))]
    given = await conversion(db, tenant, "given")
    assert (given["payout"], given["currency"]) == (Decimal(3), "EUR")  # its payout stays; no currency was given
    assert sum(a for *_, a in await ledger(db, given["id"])) == Decimal(3)
    # pending (no payout) before the click, approved (no payout) after it: the offer's payout.
    await postback(api, tenant, click_id=click_id, conversion_id="pending-first", status="approved", timestamp=ts)
    await run_worker()
    conv = await conversion(db, tenant, "pending-first")
    assert (conv["status"], conv["payout"]) == ("approved", Decimal(7))
    assert sum(a for *_, a in await ledger(db, conv["id"])) == Decimal(7)
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (3, 17)


async def test_a_late_click_gives_its_offers_payout_exactly(api, db, tenant, run_worker):
    large = "999999999999.123456789012345678901234567891"  # 42 digits: Python's default context keeps 28
    offer = await make_offer(api, tenant, payout=large)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    click_id = secrets.token_hex(16)
    await postback(api, tenant, click_id=click_id, conversion_id="late", timestamp=(T0 + timedelta(minutes=3)).isoformat())
    await run_worker()
    await store_click(db, tenant.account_id, mid, T0, offer_id=offer["id"], click_id=click_id)
    async with db.acquire() as conn, conn.transaction():
        assert await attribution.rematch_for_clicks(conn, [click_id]) == 1
    conv = await conversion(db, tenant, "late")
    assert conv["attributed"] and conv["payout"] == Decimal(large)
    assert await ledger(db, conv["id"]) == [(None, "approved", 0), ("approved", "approved", Decimal(large))]


async def test_a_payout_or_currency_a_later_postback_states_survives_a_late_click(api, db, tenant, run_worker):
    """The first postback names no payout or currency, before its click is stored: the conversion
    takes the named offer's (5 EUR) as defaults. A second postback states 5 and EUR in so many
    words, which moves nothing; they are the network's word from then on. When the click, on an
    offer paying 7 USD, lands, the conversion keeps 5 EUR (it took 7 USD, and the ledger +2)."""
    clicked = await make_offer(api, tenant, payout=7, currency="USD")
    named = await make_offer(api, tenant, payout=5, currency="EUR")
    mid = await send_message(api, tenant, offer_id=clicked["id"])
    click_id = secrets.token_hex(16)
    ts = (T0 + timedelta(minutes=3)).isoformat()
    await postback(api, tenant, click_id=click_id, conversion_id="stated", offer_id=named["id"], timestamp=ts)
    await run_worker()
    assert await postback(api, tenant, click_id=click_id, conversion_id="stated", payout="5", currency="EUR",
                          timestamp=ts) == "accepted"
    await run_worker()
    conv = await conversion(db, tenant, "stated")
    assert (conv["payout"], conv["currency"], conv["unattributed_reason"]) == (Decimal(5), "EUR", "click_not_found")
    assert (conv["payout_given"], conv["currency_given"]) == (True, True)

    await store_click(db, tenant.account_id, mid, T0, offer_id=clicked["id"], click_id=click_id)
    async with db.acquire() as conn, conn.transaction():
        await attribution.rematch_for_clicks(conn, [click_id])
    conv = await conversion(db, tenant, "stated")
    assert conv["attributed"] and (conv["payout"], conv["currency"]) == (Decimal(5), "EUR")
    assert await db.fetchval("SELECT sum(amount) FROM conversion_adjustments WHERE conversion_id = $1", conv["id"]) == 5


async def test_a_late_click_keeps_what_its_postbacks_gave_or_named(api, db, tenant, run_worker):
    """A click with no offer of its own leaves the payout of the offer the postback named; a payout
    a postback gave in a move that was refused was never the conversion's, so the offer's applies."""
    named = await make_offer(api, tenant, payout=7, currency="EUR", external_id="NET-7")
    plain = await make_offer(api, tenant, payout=4)
    no_offer = await send_message(api, tenant)
    with_offer = await send_message(api, tenant, offer_id=plain["id"])
    bare, refused = secrets.token_hex(16), secrets.token_hex(16)
    ts = (T0 + timedelta(minutes=3)).isoformat()
    await postback(api, tenant, click_id=bare, conversion_id="named", offer_id="NET-7", timestamp=ts)
    await postback(api, tenant, click_id=refused, conversion_id="refused", timestamp=ts)
    await run_worker()
    await postback(api, tenant, click_id=refused, conversion_id="refused", status="pending", payout="5", timestamp=ts)
    await run_worker()
    assert ((await conversion(db, tenant, "named"))["payout"], (await conversion(db, tenant, "refused"))["payout"]) == (7, 0)
    await store_click(db, tenant.account_id, no_offer, T0, click_id=bare)
    await store_click(db, tenant.account_id, with_offer, T0, offer_id=plain["id"], click_id=refused)
    async with db.acquire() as conn, conn.transaction():
        assert await attribution.rematch_for_clicks(conn, [bare, refused]) == 2
    conv = await conversion(db, tenant, "named")
    assert conv["attributed"] and (conv["payout"], conv["currency"], conv["offer_id"]) == (7, "EUR", named["id"])
    assert sum(a for *_, a in await ledger(db, conv["id"])) == 7
    conv = await conversion(db, tenant, "refused")
    assert (conv["status"], conv["payout"]) == ("approved", 4)
    assert sum(a for *_, a in await ledger(db, conv["id"])) == 4


async def test_a_bots_click_stored_after_its_postback_makes_it_bot_click(api, db, redis, tenant, run_worker):
    """Drained by the real drainer (which passes bots' clicks too), and found by the sweeper when
    the two committed without seeing each other."""
    import orjson

    from services.worker.clicks import drain_once
    from shared import edge, ids

    mid = await send_message(api, tenant)
    drained, raced = ids.click_id(), ids.click_id()
    ts = (T0 + timedelta(minutes=1)).isoformat()
    await postback(api, tenant, click_id=drained, conversion_id="bot-drained", timestamp=ts)
    await postback(api, tenant, click_id=raced, conversion_id="bot-raced", timestamp=ts)
    await run_worker()
    click = {"id": drained, "l": "Ab3kX9", "o": None, "a": tenant.account_id, "li": tenant.list_id, "m": mid,
             "at": T0, "ip": None, "ua": "facebookexternalhit/1.1", "cc": None, "bot": True, "q": {}}
    await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: orjson.dumps([edge.click_from(click)])})
    while await drain_once(db, redis, consumer="pytest-attribution", min_idle_ms=0):
        pass
    assert (await conversion(db, tenant, "bot-drained"))["unattributed_reason"] == "bot_click"
    await store_click(db, tenant.account_id, mid, T0, click_id=raced, is_bot=True)  # no rematch call: the race
    async with db.acquire() as conn, conn.transaction():
        await attribution.rematch_stored(conn)
    assert (await conversion(db, tenant, "bot-raced"))["unattributed_reason"] == "bot_click"


async def test_the_rematch_locks_conversions_in_the_batches_order(api, db, tenant):
    """process_batch locks conversions in key order; the rematch must too, or the two deadlock.
    Two conversions wait for one click, their ids in the other order than their keys: while 'a' is
    held, the rematch waits for it before it takes 'b'."""
    mid = await send_message(api, tenant)
    click_id = secrets.token_hex(16)
    for key in ("b", "a"):
        await db.execute(
            "INSERT INTO conversions (account_id, network, conversion_key, click_id, status, converted_at,"
            " unattributed_reason) VALUES ($1, 'default', $2, $3, 'approved', $4, 'click_not_found')",
            tenant.account_id, key, click_id, T0 + timedelta(hours=1),
        )
    await store_click(db, tenant.account_id, mid, T0, click_id=click_id)
    lock = "SELECT 1 FROM conversions WHERE account_id = $1 AND conversion_key = $2 FOR UPDATE"

    async def rematch():
        async with db.acquire() as conn, conn.transaction():
            return await attribution.rematch_for_clicks(conn, [click_id])

    async with db.acquire() as holder, holder.transaction():
        await holder.execute(lock, tenant.account_id, "a")
        task = asyncio.ensure_future(rematch())
        await asyncio.sleep(0.5)  # (it is waiting for 'a' by now)
        assert not task.done()
        async with db.acquire() as probe, probe.transaction():
            await probe.execute(lock + " NOWAIT", tenant.account_id, "b")  # free: raises if the rematch took it
    assert await task == 2


async def test_a_batch_with_a_gap_in_a_conversions_postbacks_waits_for_it(api, db, tenant):
    """Another job holds the middle one of three postbacks of a conversion (its own, locked): a
    batch that takes the other two applies neither until the middle one is done."""
    _, _, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=1)).isoformat()
    for payout in ("1", "2", "3"):
        await postback(api, tenant, click_id=click_id, conversion_id="gap", payout=payout, timestamp=ts)
    first, middle, last = await _unprocessed(db, tenant)
    async with db.acquire() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM postbacks WHERE id = $1 FOR UPDATE", middle)
        async with db.acquire() as conn, conn.transaction():
            assert (await attribution.process_batch(conn)).deferred >= 2  # (other tests' waiting postbacks too)
        assert await _unprocessed(db, tenant) == [first, middle, last]
        assert await conversion(db, tenant, "gap") is None
    async with db.acquire() as conn, conn.transaction():
        await attribution.process_batch(conn)
    assert await _unprocessed(db, tenant) == []
    conv = await conversion(db, tenant, "gap")
    assert (conv["status"], conv["payout"]) == ("approved", Decimal(3))
    assert [a for *_, a in await ledger(db, conv["id"])] == [1, 1, 1]


async def test_a_postback_naming_a_message_credits_its_first_click(api, db, tenant, run_worker):
    """An offer whose destination passes {{sendId}} (aff_sub={{sendId}}, as spec/links.txt shows)
    gets the message id back as click_id: the message's first human click is the one named."""
    from tests.helpers import make_tenant

    offer, mid, first = await clicked_message(api, db, tenant, creative_id="cr-sid")
    await store_click(db, tenant.account_id, mid, T0 + timedelta(hours=1), offer_id=offer["id"], first=False)  # a later click
    unclicked = await send_message(api, tenant, offer_id=offer["id"])
    bot_only = await send_message(api, tenant, offer_id=offer["id"])
    await store_click(db, tenant.account_id, bot_only, T0, is_bot=True)
    other = await make_tenant(db)
    other_offer, theirs, _ = await clicked_message(api, db, other)
    ts = (T0 + timedelta(hours=2)).isoformat()
    await postback(api, tenant, aff_sub=mid, conversion_id="by-message", payout="3", timestamp=ts)
    await postback(api, tenant, aff_sub=unclicked, conversion_id="unclicked", timestamp=ts)
    await postback(api, tenant, aff_sub=bot_only, conversion_id="bot-only", timestamp=ts)
    await postback(api, tenant, aff_sub=theirs, conversion_id="theirs", timestamp=ts)
    await postback(api, tenant, aff_sub=mid, conversion_id="too-early", timestamp=(T0 - timedelta(hours=1)).isoformat())
    await run_worker()
    conv = await conversion(db, tenant, "by-message")
    assert conv["attributed"] and (conv["message_id"], conv["creative_id"], conv["offer_id"]) == (mid, "cr-sid", offer["id"])
    assert conv["clicked_at"] == T0  # the first click's, not the later one's
    reasons = {k: (await conversion(db, tenant, k))["unattributed_reason"] for k in ("unclicked", "bot-only", "theirs", "too-early")}
    assert reasons == {"unclicked": "click_not_found", "bot-only": "click_not_found", "theirs": "click_not_found",
                       "too-early": "before_click"}
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (1, 3)


async def test_a_postback_naming_a_message_before_its_click_is_drained(api, db, redis, tenant, run_worker):
    """The message's first click arrives after the postback that names the message: the drainer
    attributes it as it stores the click; the sweeper does when the two raced."""
    import orjson

    from services.worker.clicks import drain_once
    from shared import edge, ids

    async def drain_all():
        while await drain_once(db, redis, consumer="pytest-attribution", min_idle_ms=0):
            pass

    await drain_all()
    offer = await make_offer(api, tenant)
    drained = await send_message(api, tenant, offer_id=offer["id"])
    raced = await send_message(api, tenant, offer_id=offer["id"])
    for key, mid in (("drained", drained), ("raced", raced)):
        await postback(api, tenant, aff_sub=mid, conversion_id=key, timestamp=(T0 + timedelta(minutes=10)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "drained"))["unattributed_reason"] == "click_not_found"
    click = {"id": ids.click_id(), "l": "Ab3kX9", "o": offer["id"], "a": tenant.account_id, "li": tenant.list_id,
             "m": drained, "at": T0, "ip": None, "ua": "Mozilla/5.0", "cc": None, "bot": False, "q": {}}
    await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: orjson.dumps([edge.click_from(click)])})
    await drain_all()
    conv = await conversion(db, tenant, "drained")
    assert conv["attributed"] and conv["message_id"] == drained and conv["click_id"] == drained
    await store_click(db, tenant.account_id, raced, T0, offer_id=offer["id"])  # no rematch call: the race
    async with db.acquire() as conn, conn.transaction():
        await attribution.rematch_stored(conn)
    assert (await conversion(db, tenant, "raced"))["attributed"] is True


async def test_a_conversion_naming_a_message_is_judged_again_when_an_earlier_click_lands(api, db, redis, tenant, run_worker):
    """Clicked at 12:00 (drained first), converted at 11:00, and the real first click, from 10:00,
    drained late: the conversion is not before the message's first click after all."""
    import orjson

    from services.worker.clicks import drain_once
    from shared import edge, ids

    async def drain(at: datetime) -> None:
        click = {"id": ids.click_id(), "l": "Ab3kX9", "o": offer["id"], "a": tenant.account_id, "li": tenant.list_id,
                 "m": mid, "at": at, "ip": None, "ua": "Mozilla/5.0", "cc": None, "bot": False, "q": {}}
        await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: orjson.dumps([edge.click_from(click)])})
        while await drain_once(db, redis, consumer="pytest-attribution", min_idle_ms=0):
            pass

    offer = await make_offer(api, tenant)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    await drain(T0 + timedelta(hours=2))
    await postback(api, tenant, aff_sub=mid, conversion_id="early", timestamp=(T0 + timedelta(hours=1)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "early"))["unattributed_reason"] == "before_click"
    await drain(T0)
    conv = await conversion(db, tenant, "early")
    assert conv["attributed"] and conv["clicked_at"] == T0


async def test_a_history_click_for_a_message_an_old_conversion_names(api, db, tenant, settings, run_worker):
    """A conversion that named a message (aff_sub={{sendId}}) days before the message's click was
    imported: the import leaves a re-match request, and the sweep attributes it (its own re-match
    looks back a day only)."""
    from arq import create_pool
    from arq.connections import RedisSettings

    offer = await make_offer(api, tenant)
    named = await send_message(api, tenant, offer_id=offer["id"])
    unnamed = await send_message(api, tenant, offer_id=offer["id"])
    await postback(api, tenant, aff_sub=named, conversion_id="imported", payout="7",
                   timestamp=(T0 + timedelta(hours=1)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "imported"))["unattributed_reason"] == "click_not_found"
    await db.execute("UPDATE conversions SET created_at = now() - interval '3 days' WHERE account_id = $1", tenant.account_id)
    records = [{"message_id": mid, "offer_id": offer["id"], "phone_number": "+14155550100", "timestamp": T0.isoformat()}
               for mid in (named, unnamed)]
    resp = await api.post("/api/v2/history/clicks", headers=tenant.headers, json={"records": records})
    assert resp.json()["success_count"] == 2, resp.text
    assert await db.fetchval("SELECT array_agg(click_id) FROM rematch_requests WHERE account_id = $1", tenant.account_id) == [named]
    pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        await attribution.sweep_once(db, pool)
    finally:
        await pool.aclose()
    conv = await conversion(db, tenant, "imported")
    assert conv["attributed"] and conv["message_id"] == named and conv["clicked_at"] == T0
    assert await db.fetchval("SELECT count(*) FROM rematch_requests WHERE account_id = $1", tenant.account_id) == 0
    detail = (await api.get(f"/api/v2/messages/{named}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (1, 7)


@pytest.mark.parametrize("first_status", ["pending", "approved"])
async def test_a_click_id_that_comes_with_a_later_postback_attributes_the_conversion(
    api, db, tenant, run_worker, first_status
):
    """A network that learns the click id late (a manual approval, say): the first postback
    names no click, a later one does. That one is news, not a duplicate, and the conversion is
    judged by its click (found by code review: it stayed no_click_id forever)."""
    offer, mid, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=2)).isoformat()
    assert await postback(api, tenant, conversion_id="late-cid", status=first_status, timestamp=ts) == "accepted"
    await run_worker()
    conv = await conversion(db, tenant, "late-cid")
    assert (conv["attributed"], conv["unattributed_reason"]) == (False, "no_click_id")
    assert await postback(api, tenant, conversion_id="late-cid", click_id=click_id, status="approved", timestamp=ts) == "accepted"
    # Sent again, and again without the click id: repeats.
    assert await postback(api, tenant, conversion_id="late-cid", click_id=click_id, status="approved", timestamp=ts) == "duplicate"
    assert await postback(api, tenant, conversion_id="late-cid", status="approved", timestamp=ts) == "duplicate"
    await run_worker()
    conv = await conversion(db, tenant, "late-cid")
    assert (conv["attributed"], conv["click_id"], conv["message_id"], conv["offer_id"]) == (True, click_id, mid, offer["id"])
    # The payout no postback gave is the click's offer's (5), as if the click id had come first.
    assert (conv["status"], conv["payout"]) == ("approved", Decimal(5))
    assert sum(amount for _, _, amount in await ledger(db, conv["id"])) == Decimal(5)
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (1, 5)
    report = (await api.get("/api/v2/reports/performance?group_by=offer", headers=tenant.headers)).json()
    assert report["totals"]["conversions"] == 1 and report["totals"]["revenue"] == 5


async def test_a_click_id_that_comes_first_in_a_batch_after_a_click_less_one(api, db, tenant, run_worker):
    """Both postbacks in one batch: the conversion is made from the first (no click), and the
    second's click id still attributes it."""
    _, mid, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=2)).isoformat()
    assert await postback(api, tenant, conversion_id="one-batch", status="pending", payout="3", timestamp=ts) == "accepted"
    assert await postback(api, tenant, conversion_id="one-batch", click_id=click_id, status="approved", payout="3",
                          timestamp=ts) == "accepted"
    await run_worker()
    conv = await conversion(db, tenant, "one-batch")
    assert (conv["attributed"], conv["message_id"], conv["status"], conv["payout"]) == (True, mid, "approved", Decimal(3))


async def test_a_postbacks_offer_id_resolves_as_id_then_live_then_deleted_external_id(api, db, tenant, run_worker):
    """offer_id is the internal id, else a live offer's external id, else a deleted offer's (a
    conversion may name an offer deleted since): the worker's lookup, by index (migration 0020)."""
    gone = await make_offer(api, tenant, external_id="NET-1")
    assert (await api.delete(f"/api/v2/offers/{gone['id']}", headers=tenant.headers)).status_code == 200
    live = await make_offer(api, tenant, external_id="NET-1")  # the same external id, reused
    only_gone = await make_offer(api, tenant, external_id="NET-2")
    assert (await api.delete(f"/api/v2/offers/{only_gone['id']}", headers=tenant.headers)).status_code == 200
    shadow = await make_offer(api, tenant, external_id=live["id"])  # an external id that is another's id
    for key, ref in (("r-live", "NET-1"), ("r-gone", "NET-2"), ("r-id", live["id"]), ("r-none", "NET-3")):
        assert await postback(api, tenant, conversion_id=key, offer_id=ref, payout="1") == "accepted"
    await run_worker()
    found = {key: (await conversion(db, tenant, key))["offer_id"] for key in ("r-live", "r-gone", "r-id", "r-none")}
    assert found == {"r-live": live["id"], "r-gone": only_gone["id"], "r-id": live["id"], "r-none": None}
    assert shadow["id"] not in found.values()


async def test_a_late_click_id_on_an_old_conversion_is_matched_when_its_click_lands_unseen(api, db, tenant, run_worker):
    """The late click id's click is stored at the same moment by a drainer that cannot see it
    (here: stored directly, as if that drainer's transaction missed the conversion). The
    conversion is older than the sweeper's window, but it was judged click_not_found only now:
    the sweeper's re-match goes by that (waiting_since), and matches it."""
    offer = await make_offer(api, tenant, payout=5)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    ts = (T0 + timedelta(hours=2)).isoformat()
    assert await postback(api, tenant, conversion_id="old-late", status="pending", timestamp=ts) == "accepted"
    await run_worker()
    await db.execute("UPDATE conversions SET created_at = now() - interval '3 days' WHERE account_id = $1",
                     tenant.account_id)
    click_id = secrets.token_hex(16)
    assert await postback(api, tenant, conversion_id="old-late", click_id=click_id, status="approved",
                          timestamp=ts) == "accepted"
    await run_worker()
    assert (await conversion(db, tenant, "old-late"))["unattributed_reason"] == "click_not_found"
    await store_click(db, tenant.account_id, mid, T0, offer_id=offer["id"], click_id=click_id)
    async with db.acquire() as conn, conn.transaction():
        await attribution.rematch_stored(conn)  # the sweeper's windowed re-match
    conv = await conversion(db, tenant, "old-late")
    assert (conv["attributed"], conv["message_id"]) == (True, mid)
