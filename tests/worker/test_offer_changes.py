"""Offers edited while their clicks' conversions are still coming in."""
from __future__ import annotations

import secrets
from datetime import timedelta

from services.worker import attribution
from tests.helpers import make_offer
from tests.worker.conftest import store_click
from tests.worker.test_attribution import T0, conversion, ledger, postback, send_message


async def test_a_window_edit_does_not_take_back_the_credit_of_a_conversion_that_names_a_message(
    api, db, tenant, run_worker
):
    """Credited 10 days after its message's first click under a 90-day window; the window is cut
    to 7; a new conversion of the message leaves the sweeper a re-match request (a click being
    drained may be an earlier first click). The first click is the same: the old conversion keeps
    its credit, as one that names the click itself does (found by review: the re-match judged it
    again by the new window, and the message lost its revenue)."""
    offer = await make_offer(api, tenant, payout=5)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    click_id = await store_click(db, tenant.account_id, mid, T0, offer_id=offer["id"])
    late = (T0 + timedelta(days=10)).isoformat()
    await postback(api, tenant, aff_sub=mid, conversion_id="by-message", timestamp=late)
    await postback(api, tenant, click_id=click_id, conversion_id="by-click", timestamp=late)
    await run_worker()
    resp = await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"click_window_days": 7})
    assert resp.status_code == 200, resp.text
    await postback(api, tenant, aff_sub=mid, conversion_id="new", timestamp=(T0 + timedelta(days=1)).isoformat())
    await run_worker()
    async with db.acquire() as conn, conn.transaction():
        await attribution.rematch_requested(conn)
    for key in ("by-message", "by-click", "new"):
        conv = await conversion(db, tenant, key)
        assert (conv["attributed"], conv["message_id"], conv["clicked_at"]) == (True, mid, T0), key
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (3, 15)


async def test_an_external_id_that_only_deleted_offers_held_names_the_last_one_on_every_path(
    api, db, tenant, run_worker
):
    """An external id held by offers deleted one after another (a network offer recreated, an
    older offer given its id, retired again): a postback, /revenue, /history/revenue and
    /history/sends that name it all take the offer that held it last (found by review: the worker
    took whichever PostgreSQL returned first, the oldest, and the gateway whichever came last, the
    newest made, so one network offer's money was split between two offers in reports by offer)."""

    async def delete(offer):
        assert (await api.delete(f"/api/v2/offers/{offer['id']}", headers=tenant.headers)).status_code == 200

    await delete(await make_offer(api, tenant, payout=1, external_id="NET-X"))
    relabelled = await make_offer(api, tenant, payout=2)
    await delete(await make_offer(api, tenant, payout=3, external_id="NET-X"))
    resp = await api.patch(f"/api/v2/offers/{relabelled['id']}", headers=tenant.headers, json={"external_id": "NET-X"})
    assert resp.status_code == 200, resp.text
    await delete(relabelled)
    last = relabelled["id"]
    mid = await send_message(api, tenant)
    assert await postback(api, tenant, conversion_id="named", offer_id="NET-X") == "accepted"
    await run_worker()
    conv = await conversion(db, tenant, "named")
    assert (conv["offer_id"], conv["payout"]) == (last, 2)
    record = {"message_id": mid, "revenue": 1, "attribution_type": "sale", "offer_id": "NET-X"}
    resp = await api.post("/api/v2/revenue", headers=tenant.headers, json=record)
    assert resp.status_code == 201, resp.text
    resp = await api.post("/api/v2/history/revenue", headers=tenant.headers,
                          json={"records": [{**record, "timestamp": T0.isoformat()}]})
    assert resp.json()["success_count"] == 1, resp.text
    resp = await api.post("/api/v2/history/sends", headers=tenant.headers, json={"records": [
        {"to": "+14155550100", "list_id": tenant.list_id, "offer_id": "NET-X", "timestamp": T0.isoformat()}]})
    assert resp.json()["success_count"] == 1, resp.text
    assert await db.fetchval("SELECT array_agg(DISTINCT offer_id) FROM revenue WHERE account_id = $1",
                             tenant.account_id) == [last]
    assert await db.fetchval("SELECT offer_id FROM messages WHERE account_id = $1 AND id <> $2",
                             tenant.account_id, mid) == last


async def test_an_earlier_first_click_on_the_same_offer_keeps_the_payout_a_conversion_took(
    api, db, redis, tenant, run_worker
):
    """A conversion that names a message took its offer's payout (5) when it was credited by the
    message's first click; the offer's payout is then raised to 8, and an earlier first click of
    the message, on the same offer, is drained late. The conversion is judged again by it and
    ends as if that click had come first: credited at 5, the ledger untouched (found by review:
    it took the offer's payout as it is now, 8, and the message earned 3 more after the fact)."""
    import orjson

    from services.worker.clicks import drain_once
    from shared import edge, ids

    async def drain(at):
        click = {"id": ids.click_id(), "l": "Ab3kX9", "o": offer["id"], "a": tenant.account_id, "li": tenant.list_id,
                 "m": mid, "at": at, "ip": None, "ua": "Mozilla/5.0", "cc": None, "bot": False, "q": {}}
        await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: orjson.dumps([edge.click_from(click)])})
        while await drain_once(db, redis, consumer="pytest-offer-changes", min_idle_ms=0):
            pass

    offer = await make_offer(api, tenant, payout=5)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    await drain(T0 + timedelta(hours=1))
    await postback(api, tenant, aff_sub=mid, conversion_id="sale", timestamp=(T0 + timedelta(hours=2)).isoformat())
    await run_worker()
    assert (await conversion(db, tenant, "sale"))["payout"] == 5
    resp = await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"payout": 8})
    assert resp.status_code == 200, resp.text
    await drain(T0)
    conv = await conversion(db, tenant, "sale")
    assert (conv["attributed"], conv["clicked_at"], conv["offer_id"], conv["payout"]) == (True, T0, offer["id"], 5)
    assert [amount for _, _, amount in await ledger(db, conv["id"])] == [5]


async def test_a_click_credits_a_conversion_on_the_offer_it_named_and_keeps_the_payout_it_took(
    api, db, tenant, run_worker
):
    """The first postbacks name the offer (its external id), one no click and one a click not
    stored yet: each conversion takes the offer's payout, 5. The offer's payout is raised to 8;
    then a later postback names the first one's click, and the other's click is stored. Both are
    credited by clicks on that same offer and keep 5, as if the click had come first (found by
    review: they took the offer's payout as it is now, 8, after the fact)."""
    offer = await make_offer(api, tenant, payout=5, external_id="NET-5")
    mid = await send_message(api, tenant, offer_id=offer["id"])
    click_id = await store_click(db, tenant.account_id, mid, T0, offer_id=offer["id"])
    unstored = secrets.token_hex(16)
    ts = (T0 + timedelta(hours=2)).isoformat()
    assert await postback(api, tenant, conversion_id="named-late", offer_id="NET-5", status="pending",
                          timestamp=ts) == "accepted"
    assert await postback(api, tenant, conversion_id="waiting", offer_id="NET-5", click_id=unstored,
                          timestamp=ts) == "accepted"
    await run_worker()
    assert [(await conversion(db, tenant, key))["payout"] for key in ("named-late", "waiting")] == [5, 5]
    resp = await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"payout": 8})
    assert resp.status_code == 200, resp.text
    assert await postback(api, tenant, conversion_id="named-late", click_id=click_id, status="approved",
                          timestamp=ts) == "accepted"
    await run_worker()
    await store_click(db, tenant.account_id, mid, T0 + timedelta(hours=1), offer_id=offer["id"], click_id=unstored,
                      first=False)
    async with db.acquire() as conn, conn.transaction():
        await attribution.rematch_for_clicks(conn, [unstored])  # as the drainer does with the clicks it stored
    for key in ("named-late", "waiting"):
        conv = await conversion(db, tenant, key)
        assert (conv["attributed"], conv["offer_id"], conv["status"], conv["payout"]) == (True, offer["id"], "approved", 5)
        assert sum(amount for _, _, amount in await ledger(db, conv["id"])) == 5
