"""Behaviour of the worker that mutation testing found no test pinning down (CONTRACT.md §5)."""
from __future__ import annotations

import secrets
from datetime import timedelta
from decimal import Decimal

from services.worker import attribution
from shared import edge
from tests.helpers import make_offer
from tests.worker.conftest import store_click
from tests.worker.test_attribution import T0, clicked_message, conversion, ledger, postback, send_message


async def test_a_job_for_a_postback_already_processed_changes_nothing(api, db, tenant, run_worker):
    """A job runs again for a postback that is already processed (arq redelivers a job whose worker
    died after the commit; a window's job runs after another job took its postbacks): the
    conversion keeps what its later postbacks made it, and nothing is counted twice."""
    _, mid, click_id = await clicked_message(api, db, tenant)
    common = {"click_id": click_id, "conversion_id": "again", "payout": "8", "timestamp": (T0 + timedelta(hours=1)).isoformat()}
    await postback(api, tenant, status="approved", **common)
    await run_worker()
    await postback(api, tenant, status="rejected", **common)
    await run_worker()
    first, second = [r["id"] for r in await db.fetch(
        "SELECT id FROM postbacks WHERE account_id = $1 ORDER BY id", tenant.account_id)]
    for pid in (first, second):
        async with db.acquire() as conn, conn.transaction():
            assert await attribution.process_batch(conn, pid, limit=0) == (0, 0)
    conv = await conversion(db, tenant, "again")
    assert conv["status"] == "rejected"
    assert await ledger(db, conv["id"]) == [(None, "approved", Decimal(8)), ("approved", "rejected", Decimal(-8))]
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (0, 0)


async def test_a_payout_given_before_a_move_without_one_survives_a_late_click(api, db, tenant, run_worker):
    """pending with a payout, then approved without one, both before the click is stored: the
    payout the network gave stays when the click lands (the offer's is only for what no postback
    gave)."""
    offer = await make_offer(api, tenant, payout=7)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    click_id = secrets.token_hex(16)
    ts = (T0 + timedelta(minutes=3)).isoformat()
    await postback(api, tenant, click_id=click_id, conversion_id="given-then-moved", status="pending", payout="3", timestamp=ts)
    await run_worker()
    await postback(api, tenant, click_id=click_id, conversion_id="given-then-moved", status="approved", timestamp=ts)
    await run_worker()
    conv = await conversion(db, tenant, "given-then-moved")
    assert (conv["status"], conv["payout"], conv["unattributed_reason"]) == ("approved", Decimal(3), "click_not_found")
    await store_click(db, tenant.account_id, mid, T0, offer_id=offer["id"], click_id=click_id)
    async with db.acquire() as conn, conn.transaction():
        assert await attribution.rematch_for_clicks(conn, [click_id]) == 1
    conv = await conversion(db, tenant, "given-then-moved")
    assert conv["attributed"] and conv["payout"] == Decimal(3)
    assert sum(a for *_, a in await ledger(db, conv["id"])) == Decimal(3)


async def test_the_clicked_offer_is_credited_over_the_offer_a_postback_names(api, db, tenant, run_worker):
    """CONTRACT §5: credit flows to the offer that was clicked. A postback naming another offer
    (offer_id) without a payout still takes the clicked offer and its payout."""
    clicked_offer, mid, click_id = await clicked_message(api, db, tenant)  # payout 5
    other = await make_offer(api, tenant, payout=9, external_id="NET-OTHER")
    ts = (T0 + timedelta(hours=1)).isoformat()
    for key, ref in (("by-id", other["id"]), ("by-external-id", "NET-OTHER")):
        await postback(api, tenant, click_id=click_id, conversion_id=key, offer_id=ref, timestamp=ts)
    await run_worker()
    for key in ("by-id", "by-external-id"):
        conv = await conversion(db, tenant, key)
        assert conv["attributed"] and conv["message_id"] == mid, key
        assert (conv["offer_id"], conv["payout"]) == (clicked_offer["id"], Decimal(5)), key
        assert sum(a for *_, a in await ledger(db, conv["id"])) == Decimal(5), key


async def test_a_reversed_conversion_takes_no_later_payout(api, db, tenant, run_worker):
    """reversed is final: a later reversal naming another payout moves nothing (no ledger row)."""
    _, _, click_id = await clicked_message(api, db, tenant)
    common = {"click_id": click_id, "conversion_id": "rev-final", "timestamp": (T0 + timedelta(hours=1)).isoformat()}
    await postback(api, tenant, status="approved", payout="10", **common)
    await postback(api, tenant, status="reversed", **common)
    await run_worker()
    assert await postback(api, tenant, status="reversed", payout="4", **common) == "accepted"
    await run_worker()
    conv = await conversion(db, tenant, "rev-final")
    assert (conv["status"], conv["payout"]) == ("reversed", Decimal(10))
    assert await ledger(db, conv["id"]) == [(None, "approved", Decimal(10)), ("approved", "reversed", Decimal(-10))]


async def test_a_job_goes_on_past_a_full_batch(api, db, tenant, monkeypatch):
    """A job takes batch after batch until one comes back short: nothing waits for the sweeper."""
    _, _, click_id = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=1)).isoformat()
    for n in range(5):
        await postback(api, tenant, click_id=click_id, conversion_id=f"full-{n}", payout="1", timestamp=ts)
    first = await db.fetchval("SELECT min(id) FROM postbacks WHERE account_id = $1", tenant.account_id)
    monkeypatch.setattr(attribution, "BATCH_SIZE", 2)
    assert await attribution.process_postback({"db": db}, first) >= 5
    assert await db.fetchval(
        "SELECT count(*) FROM postbacks WHERE account_id = $1 AND processed_at IS NULL", tenant.account_id) == 0
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE account_id = $1", tenant.account_id) == 5


async def test_the_clicks_own_offer_is_credited_over_its_messages(api, db, tenant, run_worker):
    """A message sent for one offer whose click went to another (the link it carried): the
    conversion credits the offer that was clicked, and takes its payout."""
    message_offer = await make_offer(api, tenant, payout=5)
    clicked_offer = await make_offer(api, tenant, payout=9)
    mid = await send_message(api, tenant, offer_id=message_offer["id"])
    click_id = await store_click(db, tenant.account_id, mid, T0, offer_id=clicked_offer["id"])
    await postback(api, tenant, click_id=click_id, conversion_id="own-offer", timestamp=(T0 + timedelta(hours=1)).isoformat())
    await run_worker()
    conv = await conversion(db, tenant, "own-offer")
    assert conv["attributed"] and conv["message_id"] == mid
    assert (conv["offer_id"], conv["payout"]) == (clicked_offer["id"], Decimal(9))


async def test_a_correction_to_a_zero_payout_is_applied(api, db, tenant, run_worker):
    """approved at 5, then the network corrects the payout to 0: the conversion is worth 0."""
    _, mid, click_id = await clicked_message(api, db, tenant)
    common = {"click_id": click_id, "conversion_id": "to-zero", "timestamp": (T0 + timedelta(hours=1)).isoformat()}
    await postback(api, tenant, status="approved", payout="5", **common)
    assert await postback(api, tenant, status="approved", payout="0", **common) == "accepted"
    await run_worker()
    conv = await conversion(db, tenant, "to-zero")
    assert (conv["status"], conv["payout"]) == ("approved", Decimal(0))
    assert [a for *_, a in await ledger(db, conv["id"])] == [Decimal(5), Decimal(-5)]
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert detail["revenue"] == 0


async def test_a_postback_given_zero_payout_keeps_it_over_the_offers(api, db, tenant, run_worker):
    """payout=0 is a payout: not replaced by the (clicked) offer's."""
    _, _, click_id = await clicked_message(api, db, tenant)  # offer payout 5
    await postback(api, tenant, click_id=click_id, conversion_id="zero", payout="0",
                   timestamp=(T0 + timedelta(hours=1)).isoformat())
    await run_worker()
    conv = await conversion(db, tenant, "zero")
    assert conv["attributed"] and conv["payout"] == Decimal(0)
    assert sum(a for *_, a in await ledger(db, conv["id"])) == Decimal(0)


async def test_a_postback_cannot_name_another_accounts_offer(api, db, tenant, run_worker):
    """offer_id resolves within the postback's account only: another account's offer id or
    external id gives neither its offer nor its payout."""
    from tests.helpers import make_tenant

    other = await make_tenant(db)
    theirs = await make_offer(api, other, payout=9, currency="EUR", external_id="THEIRS-1")
    for key, ref in (("their-id", theirs["id"]), ("their-external-id", "THEIRS-1")):
        assert await postback(api, tenant, conversion_id=key, offer_id=ref) == "accepted"
    await run_worker()
    for key in ("their-id", "their-external-id"):
        conv = await conversion(db, tenant, key)
        assert (conv["offer_id"], conv["payout"], conv["currency"]) == (None, Decimal(0), "USD"), key


async def test_a_conversion_takes_the_first_click_id_its_later_postbacks_name(api, db, tenant, run_worker):
    """Made without a click id; two later postbacks, in one batch, name two different clicks: the
    first one named is the conversion's (as when they come in separate batches: once a
    conversion has a click id, a later one is not taken)."""
    _, first_mid, first_click = await clicked_message(api, db, tenant)
    _, _, second_click = await clicked_message(api, db, tenant)
    ts = (T0 + timedelta(hours=2)).isoformat()
    await postback(api, tenant, conversion_id="two-names", status="pending", payout="2", timestamp=ts)
    await run_worker()
    await postback(api, tenant, conversion_id="two-names", click_id=first_click, status="pending", payout="2", timestamp=ts)
    await postback(api, tenant, conversion_id="two-names", click_id=second_click, status="approved", payout="2", timestamp=ts)
    await run_worker()
    conv = await conversion(db, tenant, "two-names")
    assert (conv["click_id"], conv["message_id"], conv["status"]) == (first_click, first_mid, "approved")


async def test_an_earlier_click_replacing_a_first_click_brings_its_own_offer(api, db, redis, tenant):
    """A message whose later click (offer X) was drained first, then its earlier click (offer Y):
    the engagement is the earlier click, with everything of it, its offer included (reports count
    the click under it)."""
    from tests.worker.test_clicks import click, drain_all, message, xadd

    mid = await message(api, tenant, "+14155550123")
    later = dict(click(tenant, at=T0 + timedelta(minutes=5), message_id=mid), o="x" * 24)
    earlier = dict(click(tenant, at=T0, message_id=mid), o="y" * 24)
    await drain_all(db, redis)
    await xadd(redis, [later])
    await drain_all(db, redis)
    await xadd(redis, [earlier])
    await drain_all(db, redis)
    row = await db.fetchrow("SELECT click_id, offer_id, clicked_at FROM message_clicks WHERE message_id = $1", mid)
    assert (row["click_id"], row["offer_id"], row["clicked_at"]) == (earlier["id"], "y" * 24, T0)


async def test_a_bots_click_drained_the_checked_way_stays_a_bots(api, db, redis, tenant):
    """Clicks stored click by click in Python (an entry in the legacy format, or a batch beside a
    malformed entry) keep is_bot: a bot's click is no engagement and no contact click, whichever
    way its batch was stored."""
    from tests.worker.test_clicks import click, contact_clicks, drain_all, legacy, message, xadd, xadd_legacy

    phone = "+14155550177"
    mid = await message(api, tenant, phone)
    legacy_bot = click(tenant, at=T0 - timedelta(minutes=2), message_id=mid, bot=True)
    checked_bot = click(tenant, at=T0 - timedelta(minutes=1), message_id=mid, bot=True)
    human = click(tenant, at=T0, message_id=mid)
    await drain_all(db, redis)
    await xadd_legacy(redis, [legacy(legacy_bot)])
    await xadd(redis, [checked_bot, human])
    await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: b"not json"})  # the batch goes the checked way
    await drain_all(db, redis)
    bots = {r["id"]: r["is_bot"] for r in await db.fetch("SELECT id, is_bot FROM clicks WHERE message_id = $1", mid)}
    assert bots == {legacy_bot["id"]: True, checked_bot["id"]: True, human["id"]: False}
    assert await db.fetchval("SELECT click_id FROM message_clicks WHERE message_id = $1", mid) == human["id"]
    assert await contact_clicks(db, tenant, phone) == (1, T0)
