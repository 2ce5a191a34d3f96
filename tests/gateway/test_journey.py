"""GET /contacts/{phone}/journey: events oldest first, ties sent < clicked < converted, scoping."""
from __future__ import annotations

from decimal import Decimal
from urllib.parse import quote

from shared import ids
from tests.gateway.test_api_basics import assert_error
from tests.gateway.test_reports import PHONE, build_history
from tests.helpers import make_offer, make_tenant
from tests.worker.conftest import burst_worker


async def journey(api, tenant, phone):
    return await api.get(f"/api/v2/contacts/{quote(phone)}/journey", headers=tenant.headers)


async def test_journey(api, db, settings, tenant):
    m, offer_a, _, _ = await build_history(api, db, settings, tenant)
    resp = await journey(api, tenant, PHONE)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["phone_number"] == PHONE
    assert (body["messages_received"], body["clicks"], body["conversions"], body["total_revenue"]) == (3, 2, 3, 2.5)
    events = [(e["type"], e["at"], e["message_id"], e.get("revenue")) for e in body["events"]]
    assert events == [
        ("sent", "2026-01-01T10:00:00Z", m[0], None),
        ("clicked", "2026-01-01T11:00:00Z", m[0], None),
        ("converted", "2026-01-01T12:00:00Z", m[0], 0.1),
        ("converted", "2026-01-01T13:00:00Z", m[0], 0.7),
        ("converted", "2026-01-02T00:00:00Z", m[0], 0.2),
        ("sent", "2026-01-02T10:00:00Z", m[1], None),
        ("clicked", "2026-01-03T01:00:00Z", m[1], None),
        ("sent", "2026-01-03T10:00:00Z", m[3], None),
        ("converted", "2026-01-03T11:00:00Z", m[3], 1.5),
    ]
    assert all(e["offer_id"] == offer_a["id"] for e in body["events"] if e["message_id"] in m[:2])
    # The other contact of the history sees only its own (its conversion was reversed).
    other = (await journey(api, tenant, "+12025550222")).json()
    assert [e["type"] for e in other["events"]] == ["sent", "clicked"]
    assert (other["conversions"], other["total_revenue"]) == (0, 0)


async def test_same_instant_orders_sent_clicked_converted(api, db, settings, tenant):
    offer = await make_offer(api, tenant)
    phone = "+12025550333"
    at = "2026-02-02T02:02:02Z"
    mid = ids.message_id()
    resp = await api.post("/api/v2/history/sends", headers=tenant.headers, json={"records": [
        {"message_id": mid, "to": phone, "list_id": tenant.list_id, "offer_id": offer["id"], "timestamp": at}]})
    assert resp.json()["success_count"] == 1
    await api.post("/api/v2/revenue", headers=tenant.headers,
                   json={"message_id": mid, "revenue": "2", "attribution_type": "sale", "timestamp": at})
    await api.post("/api/v2/history/clicks", headers=tenant.headers, json={"records": [
        {"message_id": mid, "offer_id": offer["id"], "phone_number": phone, "timestamp": at}]})
    click_id = await db.fetchval("SELECT click_id FROM message_clicks WHERE message_id = $1", mid)
    await api.get(f"/postback/{tenant.postback_token}", params={"click_id": click_id, "payout": "3", "timestamp": at})
    await burst_worker(settings)
    body = (await journey(api, tenant, phone)).json()
    assert [e["type"] for e in body["events"]] == ["sent", "clicked", "converted", "converted"]
    assert {e["at"] for e in body["events"]} == {at}
    assert (body["conversions"], body["total_revenue"]) == (2, 5)


async def test_journey_total_is_the_exact_sum(api, tenant):
    # Two amounts of 42 digits: their sum (43) is what Python's default 28-digit context would round.
    phone = "+12025550555"
    resp = await api.post("/api/v2/send", headers=tenant.headers, json={"to": phone, "list_id": tenant.list_id, "body": "x"})
    mid = resp.json()["message_id"]
    for amount in ("999999999999.123456789012345678901234567891", "999999999999.000000000000000000000000000009"):
        resp = await api.post("/api/v2/revenue", headers=tenant.headers, content=(
            f'{{"message_id": "{mid}", "revenue": {amount}, "attribution_type": "sale"}}').encode())
        assert resp.status_code == 201, resp.text
    body = (await journey(api, tenant, phone)).json(parse_float=Decimal)
    assert body["total_revenue"] == Decimal("1999999999998.1234567890123456789012345679")  # (…567900, trailing zeros dropped)


async def test_journey_errors_and_scoping(api, db, tenant):
    assert_error(await journey(api, tenant, "not-a-phone"), 400, "invalid_phone")
    other = await make_tenant(db)
    resp = await api.post("/api/v2/send", headers=other.headers, json={"to": "+12025550444", "list_id": other.list_id, "body": "x"})
    assert resp.status_code == 201
    assert_error(await journey(api, tenant, "+12025550444"), 404, "not_found")
    assert (await journey(api, other, "+12025550444")).json()["messages_received"] == 1
    assert_error(await api.get("/api/v2/contacts/%2B12025550444/journey"), 401, "unauthorized")
