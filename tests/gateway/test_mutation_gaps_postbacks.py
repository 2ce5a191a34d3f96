"""Behaviour of the postback receiver, Idempotency-Key and reports that mutation testing found
unpinned: an unparseable postback between a postback and its retry, a key's path in its
fingerprint, refused requests (every record unresolvable) not remembered, 0 for epc and
revenue_per_send where the divisor is 0 whatever the revenue, the offer of journey events, and
the journey's sent < clicked < converted at one instant across messages."""
from __future__ import annotations

import secrets
from urllib.parse import quote

from shared import ids
from tests.gateway.test_api_basics import assert_error
from tests.gateway.test_idempotency import keyed
from tests.gateway.test_reports import build_history, report
from tests.helpers import make_offer, random_phone
from tests.worker.conftest import burst_worker


async def test_an_unparseable_postback_in_between_does_not_make_a_retry_new(api, db, tenant):
    url = f"/postback/{tenant.postback_token}"
    base = {"click_id": "u1", "conversion_id": "U", "payout": "5"}
    assert (await api.get(url, params=base)).json()["status"] == "accepted"
    assert (await api.get(url, params={**base, "payout": "abc"})).json()["status"] == "accepted"  # kept, unparseable
    assert (await api.get(url, params=base)).json()["status"] == "duplicate"
    rows = await db.fetch("SELECT is_duplicate, parse_error FROM postbacks WHERE account_id = $1 ORDER BY id", tenant.account_id)
    assert [(r["is_duplicate"], r["parse_error"] is not None) for r in rows] == [(False, False), (False, True), (True, False)]


async def test_a_key_used_on_another_path_with_the_same_body_is_refused(api, db, tenant):
    sent = await api.post("/api/v2/send", headers=tenant.headers, json={"to": random_phone(), "list_id": tenant.list_id, "body": "a"})
    message_id = sent.json()["message_id"]
    key = secrets.token_hex(8)
    body = {"records": [{"message_id": message_id, "revenue": "3", "attribution_type": "sale"}]}
    first = await api.post("/api/v2/revenue/bulk", headers=keyed(tenant, key), json=body)
    assert first.status_code == 200 and first.json()["success_count"] == 1, first.text
    # /history/revenue takes the very same body: the key was used for another request.
    assert_error(await api.post("/api/v2/history/revenue", headers=keyed(tenant, key), json=body), 422, "idempotency_key_reused")
    assert await db.fetchval("SELECT count(*) FROM revenue WHERE message_id = $1", message_id) == 1


async def test_a_bulk_send_whose_every_record_is_unresolvable_is_not_remembered(api, db, tenant):
    key, phone = secrets.token_hex(8), random_phone()
    refused = await api.post("/api/v2/send/bulk", headers=keyed(tenant, key),
                             json={"messages": [{"to": phone, "list_id": 2_000_000_000, "body": "x"}]})
    assert refused.status_code == 200 and refused.json()["queued_count"] == 0
    assert refused.json()["errors"][0]["code"] == "list_not_found"
    fixed = await api.post("/api/v2/send/bulk", headers=keyed(tenant, key),
                           json={"messages": [{"to": phone, "list_id": tenant.list_id, "body": "x"}]})
    assert fixed.status_code == 200 and fixed.json()["queued_count"] == 1, fixed.text
    assert "idempotent-replayed" not in fixed.headers


async def test_revenue_and_history_requests_whose_every_record_is_unresolvable_are_not_remembered(api, db, tenant):
    sent = await api.post("/api/v2/send", headers=tenant.headers, json={"to": random_phone(), "list_id": tenant.list_id, "body": "a"})
    message_id = sent.json()["message_id"]
    for url in ("/api/v2/revenue/bulk", "/api/v2/history/revenue"):
        key = secrets.token_hex(8)
        refused = await api.post(url, headers=keyed(tenant, key),
                                 json={"records": [{"message_id": "zzzzzzzz", "revenue": "1", "attribution_type": "sale"}]})
        assert refused.status_code == 200 and refused.json()["success_count"] == 0, refused.text
        fixed = await api.post(url, headers=keyed(tenant, key),
                               json={"records": [{"message_id": message_id, "revenue": "1", "attribution_type": "sale"}]})
        assert fixed.status_code == 200 and fixed.json()["success_count"] == 1, (url, fixed.text)
    key, phone = secrets.token_hex(8), random_phone()
    refused = await api.post("/api/v2/history/sends", headers=keyed(tenant, key), json={"records": [
        {"to": phone, "list_id": 2_000_000_000, "timestamp": "2026-01-01T00:00:00Z"}]})
    assert refused.status_code == 200 and refused.json()["success_count"] == 0, refused.text
    fixed = await api.post("/api/v2/history/sends", headers=keyed(tenant, key), json={"records": [
        {"to": phone, "list_id": tenant.list_id, "timestamp": "2026-01-01T00:00:00Z"}]})
    assert fixed.status_code == 200 and fixed.json()["success_count"] == 1, fixed.text
    assert await db.fetchval("SELECT count(*) FROM messages WHERE account_id = $1 AND to_phone = $2", tenant.account_id, phone) == 1


async def test_epc_and_revenue_per_send_are_0_where_the_divisor_is_0_whatever_the_revenue(api, db, settings, tenant):
    await build_history(api, db, settings, tenant)
    seen = 0
    for group in ("offer", "message", "list", "creative", "campaign"):
        for row in (await report(api, tenant, group_by=group))["rows"]:
            if row["revenue"] and not row["sends"]:
                assert row["revenue_per_send"] == 0, (group, row)
                seen += 1
            if row["revenue"] and not row["clicks"]:
                assert row["epc"] == 0, (group, row)
                seen += 1
    assert seen >= 5  # the unattributed conversion's groups (no send, no click) and the offer-less sale's


async def test_journey_events_carry_the_offer_of_the_click_and_of_the_revenue_record(api, db, tenant):
    offer = await make_offer(api, tenant)
    phone, mid = random_phone(), ids.message_id()
    resp = await api.post("/api/v2/history/sends", headers=tenant.headers, json={"records": [
        {"message_id": mid, "to": phone, "list_id": tenant.list_id, "timestamp": "2026-02-01T00:00:00Z"}]})
    assert resp.json()["success_count"] == 1
    resp = await api.post("/api/v2/history/clicks", headers=tenant.headers, json={"records": [
        {"message_id": mid, "offer_id": offer["id"], "phone_number": phone, "timestamp": "2026-02-01T01:00:00Z"}]})
    assert resp.json()["success_count"] == 1
    resp = await api.post("/api/v2/revenue", headers=tenant.headers, json={
        "message_id": mid, "offer_id": offer["id"], "revenue": "2", "attribution_type": "sale",
        "timestamp": "2026-02-01T02:00:00Z"})
    assert resp.status_code == 201, resp.text
    body = (await api.get(f"/api/v2/contacts/{quote(phone)}/journey", headers=tenant.headers)).json()
    assert [(e["type"], e["offer_id"]) for e in body["events"]] == [
        ("sent", None), ("clicked", offer["id"]), ("converted", offer["id"])]


async def test_journey_orders_sent_clicked_converted_at_one_instant_across_messages(api, db, settings, tenant):
    """At one instant: Z's send, M's click, A's postback conversion and A's revenue record, in
    that order, although the message ids sort A < M < Z."""
    offer = await make_offer(api, tenant)
    phone = random_phone()
    a, m, z = ("a" + ids.message_id()[1:], "m" + ids.message_id()[1:], "z" + ids.message_id()[1:])
    at = "2026-03-03T03:00:00Z"
    sends = [
        {"message_id": a, "to": phone, "list_id": tenant.list_id, "offer_id": offer["id"], "timestamp": "2026-03-03T01:00:00Z"},
        {"message_id": m, "to": phone, "list_id": tenant.list_id, "offer_id": offer["id"], "timestamp": "2026-03-03T02:00:00Z"},
        {"message_id": z, "to": phone, "list_id": tenant.list_id, "offer_id": offer["id"], "timestamp": at},
    ]
    assert (await api.post("/api/v2/history/sends", headers=tenant.headers, json={"records": sends})).json()["success_count"] == 3
    clicks = [
        {"message_id": a, "offer_id": offer["id"], "phone_number": phone, "timestamp": "2026-03-03T02:30:00Z"},
        {"message_id": m, "offer_id": offer["id"], "phone_number": phone, "timestamp": at},
    ]
    assert (await api.post("/api/v2/history/clicks", headers=tenant.headers, json={"records": clicks})).json()["success_count"] == 2
    click_id = await db.fetchval("SELECT click_id FROM message_clicks WHERE message_id = $1", a)
    resp = await api.get(f"/postback/{tenant.postback_token}", params={"click_id": click_id, "payout": "3", "timestamp": at})
    assert resp.json()["status"] == "accepted"
    await burst_worker(settings)
    resp = await api.post("/api/v2/revenue", headers=tenant.headers,
                          json={"message_id": a, "revenue": "2", "attribution_type": "sale", "timestamp": at})
    assert resp.status_code == 201, resp.text
    body = (await api.get(f"/api/v2/contacts/{quote(phone)}/journey", headers=tenant.headers)).json()
    same_instant = [(e["type"], e["message_id"], e.get("revenue")) for e in body["events"] if e["at"] == at]
    assert same_instant[:2] == [("sent", z, None), ("clicked", m, None)]
    assert sorted(same_instant[2:], key=lambda e: e[2]) == [("converted", a, 2), ("converted", a, 3)]
