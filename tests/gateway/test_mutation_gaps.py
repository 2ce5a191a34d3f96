"""Behaviour of the gateway API that mutation testing found unpinned: account scoping of short
links, lists and journeys, the 5 MB limit without a Content-Length, the money ceiling, E.164's
"+", bots in click_count, and the contact stats and duplicates of /history/clicks."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import quote

from shared import ids
from tests.gateway.test_api_basics import assert_error
from tests.helpers import add_list, make_link, make_offer, make_tenant
from tests.worker.conftest import store_click

PHONE = "+12025550777"


async def _send(api, tenant, **fields):
    body = {"to": PHONE, "list_id": tenant.list_id, "body": "hi", **fields}
    resp = await api.post("/api/v2/send", headers=tenant.headers, json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["message_id"]


async def _detail(api, tenant, message_id):
    resp = await api.get(f"/api/v2/messages/{message_id}", headers=tenant.headers)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_a_body_over_5mb_without_content_length_is_413(api, tenant):
    """The limit holds for a streamed (chunked) body too, to the byte: 5,000,001 bytes is too many."""
    big = b'{"name": "' + b"x" * (5_000_001 - 12) + b'"}'
    assert len(big) == 5_000_001

    async def chunks():
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    resp = await api.post("/api/v2/offers", headers=tenant.headers, content=chunks())
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert_error(resp, 413, "payload_too_large")


async def test_another_accounts_short_url_in_a_body_is_left_alone(api, db, tenant):
    """Only this account's short URLs are rewritten; another account's link on the same short
    domain stays as written and gives the message no offer."""
    other = await make_tenant(db)  # same default short domain https://sms.example.com
    foreign = await make_link(api, other, (await make_offer(api, other))["id"])
    body = f"See {foreign['shortUrl']} now {{{{sendId}}}}"
    mid = await _send(api, tenant, body=body)
    detail = await _detail(api, tenant, mid)
    assert detail["body"] == f"See {foreign['shortUrl']} now {mid}"
    assert detail["offer_id"] is None
    assert await db.fetchval("SELECT count(*) FROM message_links WHERE message_id = $1", mid) == 0


async def test_links_with_another_accounts_list_are_not_found(api, db, tenant):
    other = await make_tenant(db)
    offer = await make_offer(api, tenant)
    resp = await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": other.list_id})
    assert_error(resp, 404, "list_not_found")
    resp = await api.post("/api/v2/links", headers=tenant.headers,
                          json={"offerId": offer["id"], "phoneNumber": other.list_phone})
    assert_error(resp, 404, "list_not_found")
    assert await db.fetchval("SELECT count(*) FROM links WHERE account_id = $1", tenant.account_id) == 0


async def test_revenue_up_to_the_money_ceiling_and_not_past_it(api, db, tenant):
    """Less than 10^12 is stored exactly; 10^12 and more is invalid_revenue, never a 500."""
    mid = await _send(api, tenant)
    ok = await api.post("/api/v2/revenue", headers=tenant.headers,
                        json={"message_id": mid, "revenue": "999999999999.999999", "attribution_type": "sale"})
    assert ok.status_code == 201, ok.text
    assert await db.fetchval("SELECT amount FROM revenue WHERE id = $1", ok.json()["revenue_id"]) == Decimal("999999999999.999999")
    for too_big in ("1000000000000", 1000000000000, "1000000000000.5"):
        resp = await api.post("/api/v2/revenue", headers=tenant.headers,
                              json={"message_id": mid, "revenue": too_big, "attribution_type": "sale"})
        assert_error(resp, 400, "invalid_revenue")
    bulk = await api.post("/api/v2/revenue/bulk", headers=tenant.headers, json={"records": [
        {"message_id": mid, "revenue": "1000000000000", "attribution_type": "sale"},
        {"message_id": mid, "revenue": "1", "attribution_type": "sale"},
    ]})
    assert bulk.status_code == 200, bulk.text
    body = bulk.json()
    assert (body["success_count"], body["error_count"]) == (1, 1)
    assert [(e["index"], e["code"]) for e in body["errors"]] == [(0, "invalid_revenue")]


async def test_a_recipient_without_the_plus_is_not_e164(api, tenant):
    # (E.164 numbers written without their "+": a US, a French and a German mobile)
    for to in ("14155551234", "33612345678", "4915112345678"):
        resp = await api.post("/api/v2/send", headers=tenant.headers,
                              json={"to": to, "list_id": tenant.list_id, "body": "hi"})
        assert_error(resp, 400, "invalid_phone")
    resp = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": "+14155551234", "list_number": tenant.list_phone.lstrip("+"), "body": "hi"})
    assert_error(resp, 400, "invalid_phone")


async def test_bot_clicks_never_count_in_message_click_count(api, db, tenant):
    mid = await _send(api, tenant)
    at = datetime(2026, 3, 1, 12, tzinfo=UTC)
    await store_click(db, tenant.account_id, mid, at, is_bot=True)
    await store_click(db, tenant.account_id, mid, at + timedelta(minutes=1))
    await store_click(db, tenant.account_id, mid, at + timedelta(minutes=2), first=False)
    await store_click(db, tenant.account_id, mid, at + timedelta(minutes=3), is_bot=True)
    detail = await _detail(api, tenant, mid)
    assert detail["clicked"] is True and detail["click_count"] == 2
    assert detail["first_clicked_at"] == "2026-03-01T12:01:00Z"


async def test_journey_never_shows_another_accounts_revenue(api, db, tenant):
    """Two accounts that both texted one phone: each journey holds only its own account's events."""
    other = await make_tenant(db)
    mine = await _send(api, tenant)
    theirs = await _send(api, other)
    for t, mid, amount in ((tenant, mine, "2"), (other, theirs, "40")):
        resp = await api.post("/api/v2/revenue", headers=t.headers,
                              json={"message_id": mid, "revenue": amount, "attribution_type": "sale"})
        assert resp.status_code == 201, resp.text
    resp = await api.get(f"/api/v2/contacts/{quote(PHONE)}/journey", headers=tenant.headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert {e["message_id"] for e in body["events"]} == {mine}
    assert (body["messages_received"], body["conversions"], body["total_revenue"]) == (1, 1, 2)


async def test_history_clicks_duplicate_in_a_batch_is_one_click_and_the_first_wins(api, db, tenant):
    offer = await make_offer(api, tenant)
    mid = await _send(api, tenant)
    rec = {"message_id": mid, "offer_id": offer["id"], "phone_number": PHONE, "timestamp": "2025-11-15T14:35:22Z"}
    resp = await api.post("/api/v2/history/clicks", headers=tenant.headers,
                          json={"records": [rec, {**rec, "timestamp": "2025-11-15T14:00:00Z"}]})
    body = resp.json()
    assert (body["success_count"], body["duplicates_skipped"], body["error_count"]) == (1, 1, 0)
    detail = await _detail(api, tenant, mid)
    assert detail["click_count"] == 1 and detail["first_clicked_at"] == "2025-11-15T14:35:22Z"
    assert await db.fetchval("SELECT count(*) FROM clicks WHERE message_id = $1", mid) == 1
    assert await db.fetchval(
        "SELECT click_count FROM contacts WHERE list_id = $1 AND phone_number = $2", tenant.list_id, PHONE) == 1


async def test_history_clicks_add_up_the_contacts_click_count_and_keep_its_latest_click(api, db, tenant):
    """spec/history-clicks.txt: importing clicks updates the contact's click_count and last_clicked_at,
    across requests (a later import of an older click does not move last_clicked_at back)."""
    offer = await make_offer(api, tenant)
    first, second = await _send(api, tenant), await _send(api, tenant)
    for mid, at in ((first, "2025-11-15T14:35:22Z"), (second, "2025-11-10T08:00:00Z")):
        resp = await api.post("/api/v2/history/clicks", headers=tenant.headers, json={"records": [
            {"message_id": mid, "offer_id": offer["id"], "phone_number": PHONE, "timestamp": at}]})
        assert resp.json()["success_count"] == 1, resp.text
    row = await db.fetchrow(
        "SELECT click_count, last_clicked_at FROM contacts WHERE list_id = $1 AND phone_number = $2",
        tenant.list_id, PHONE)
    assert row["click_count"] == 2
    assert row["last_clicked_at"] == datetime(2025, 11, 15, 14, 35, 22, tzinfo=UTC)


async def test_history_sends_may_name_a_list_inactive_since(api, db, tenant):
    """History records what happened: a list deactivated since still takes its old sends
    (unlike /send, where an inactive list is list_not_found)."""
    inactive = await add_list(db, tenant, active=False)
    mid = ids.message_id()
    resp = await api.post("/api/v2/history/sends", headers=tenant.headers, json={"records": [
        {"message_id": mid, "to": PHONE, "list_id": inactive["list_id"], "timestamp": "2025-10-01T09:00:00Z"}]})
    assert resp.json() == {"success_count": 1, "error_count": 0, "duplicates_skipped": 0, "errors": []}
    assert (await _detail(api, tenant, mid))["list_id"] == inactive["list_id"]


async def test_an_internal_offer_id_wins_over_another_offers_external_id(api, tenant):
    """offerId takes the internal id first: an offer whose external_id happens to equal another
    offer's internal id does not capture it (links and sends resolve the same way)."""
    target = await make_offer(api, tenant)
    await make_offer(api, tenant, external_id=target["id"])
    link = await make_link(api, tenant, target["id"])
    assert link["offerId"] == target["id"]
    mid = await _send(api, tenant, offer_id=target["id"])
    assert (await _detail(api, tenant, mid))["offer_id"] == target["id"]


async def test_pages_default_to_50_per_page(api, tenant):
    """spec/api-v2-overview.txt: per_page defaults to 50."""
    for n in range(51):
        await make_offer(api, tenant, name=f"o{n}")
    resp = await api.get("/api/v2/offers", headers=tenant.headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["pagination"] == {"page": 1, "per_page": 50, "total": 51, "total_pages": 2}
    assert len(body["offers"]) == 50
    second = (await api.get("/api/v2/offers", headers=tenant.headers, params={"page": 2})).json()
    assert len(second["offers"]) == 1


async def test_a_revenue_bulk_whose_every_record_is_invalid_lists_every_error(api, tenant):
    resp = await api.post("/api/v2/revenue/bulk", headers=tenant.headers, json={"records": [
        {"revenue": 1, "attribution_type": "sale"},
        {"message_id": "a1b2c3d4", "revenue": "-1", "attribution_type": "sale"},
        {"message_id": "a1b2c3d4", "revenue": 1, "attribution_type": "refund"},
    ]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["success_count"], body["error_count"]) == (0, 3)
    assert [(e["index"], e["code"]) for e in body["errors"]] == [
        (0, "missing_message_id"), (1, "invalid_revenue"), (2, "invalid_attribution_type")]
