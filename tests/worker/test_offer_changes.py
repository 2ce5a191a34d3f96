"""Offers edited while their clicks' conversions are still coming in."""
from __future__ import annotations

from datetime import timedelta

from services.worker import attribution
from tests.helpers import make_offer
from tests.worker.conftest import store_click
from tests.worker.test_attribution import T0, conversion, postback, send_message


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
