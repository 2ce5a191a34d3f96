"""POST /revenue and /revenue/bulk: every spec code, offer resolution, exact money, partial bulk."""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from tests.gateway.test_api_basics import assert_error
from tests.helpers import make_offer, make_tenant


async def send_message(api, tenant, **fields):
    body = {"to": "+14155550123", "list_id": tenant.list_id, "body": "hi", **fields}
    resp = await api.post("/api/v2/send", headers=tenant.headers, json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["message_id"]


async def post_revenue(api, tenant, **body):
    return await api.post("/api/v2/revenue", headers=tenant.headers, json=body)


async def test_record_revenue(api, db, tenant):
    offer = await make_offer(api, tenant, external_id="offer_123")
    mid = await send_message(api, tenant)
    resp = await api.post("/api/v2/revenue", headers=tenant.headers, content=(
        f'{{"message_id": "{mid}", "revenue": 24.99, "offer_id": "offer_123", "attribution_type": "sale",'
        f' "timestamp": "2026-02-08T12:00:00Z"}}').encode())
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["success"] is True and body["message_id"] == mid and body["revenue"] == 24.99
    assert len(body["revenue_id"]) == 24 and int(body["revenue_id"], 16) >= 0
    assert b'"revenue":24.99' in resp.content
    row = await db.fetchrow("SELECT * FROM revenue WHERE id = $1", body["revenue_id"])
    assert (row["account_id"], row["offer_id"], row["amount"], row["attribution_type"], row["source"]) == (
        tenant.account_id, offer["id"], Decimal("24.99"), "sale", "api")
    assert row["occurred_at"] == datetime(2026, 2, 8, 12, tzinfo=UTC)
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (1, 24.99)


async def test_offer_defaults_to_the_messages_and_time_to_now(api, db, tenant):
    offer = await make_offer(api, tenant)
    mid = await send_message(api, tenant, offer_id=offer["id"])
    plain = await send_message(api, tenant)
    resp = await post_revenue(api, tenant, message_id=mid, revenue="1.50", attribution_type="click")
    assert resp.status_code == 201
    row = await db.fetchrow("SELECT offer_id, occurred_at, amount FROM revenue WHERE id = $1", resp.json()["revenue_id"])
    assert row["offer_id"] == offer["id"] and row["amount"] == Decimal("1.5")
    assert abs((row["occurred_at"] - datetime.now(UTC)).total_seconds()) < 10
    resp = await post_revenue(api, tenant, message_id=plain, revenue=0, attribution_type="send", offer_id=offer["id"],
                              timestamp="2026-01-02T03:04:05")  # naive is UTC
    row = await db.fetchrow("SELECT offer_id, occurred_at FROM revenue WHERE id = $1", resp.json()["revenue_id"])
    assert row["offer_id"] == offer["id"] and row["occurred_at"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    resp = await post_revenue(api, tenant, message_id=plain, revenue=2, attribution_type="sale")
    assert await db.fetchval("SELECT offer_id FROM revenue WHERE id = $1", resp.json()["revenue_id"]) is None


async def test_offer_defaults_to_the_messages_short_link(api, db, tenant):
    """Without offer_id the offer comes "from the message's short link": its first link's offer,
    even when the message was sent with another offer_id."""
    first, second, given = [await make_offer(api, tenant) for _ in range(3)]
    urls = [(await api.post("/api/v2/links", headers=tenant.headers,
                            json={"offerId": o["id"], "listId": tenant.list_id})).json()["shortUrl"] for o in (first, second)]
    for a, b, expected in ((0, 1, first), (1, 0, second)):  # either order: the link that comes first wins
        mid = await send_message(api, tenant, offer_id=given["id"], body=f"Deal {urls[a]} or {urls[b]}")
        resp = await post_revenue(api, tenant, message_id=mid, revenue="3", attribution_type="sale")
        assert resp.status_code == 201, resp.text
        bulk = await api.post("/api/v2/revenue/bulk", headers=tenant.headers,
                              json={"records": [{"message_id": mid, "revenue": 1, "attribution_type": "click"}]})
        assert bulk.json()["success_count"] == 1
        rows = await db.fetch("SELECT offer_id FROM revenue WHERE message_id = $1", mid)
        assert [r["offer_id"] for r in rows] == [expected["id"]] * 2


@pytest.mark.parametrize("body, code", [
    ({"revenue": 1, "attribution_type": "sale"}, "missing_message_id"),
    ({"message_id": "", "revenue": 1, "attribution_type": "sale"}, "missing_message_id"),
    ({"message_id": "MID", "attribution_type": "sale"}, "missing_revenue"),
    ({"message_id": "MID", "revenue": None, "attribution_type": "sale"}, "missing_revenue"),
    ({"message_id": "MID", "revenue": 1}, "missing_attribution_type"),
    ({"message_id": "MID", "revenue": -1, "attribution_type": "sale"}, "invalid_revenue"),
    ({"message_id": "MID", "revenue": "abc", "attribution_type": "sale"}, "invalid_revenue"),
    ({"message_id": "MID", "revenue": True, "attribution_type": "sale"}, "invalid_revenue"),
    ({"message_id": "MID", "revenue": [1], "attribution_type": "sale"}, "invalid_revenue"),
    ({"message_id": "MID", "revenue": 1, "attribution_type": "view"}, "invalid_attribution_type"),
    ({"message_id": "MID", "revenue": 1, "attribution_type": 3}, "invalid_attribution_type"),
    ({"message_id": "zzzzzzzz", "revenue": 1, "attribution_type": "sale"}, "message_not_found"),
    ({"message_id": "short", "revenue": 1, "attribution_type": "sale"}, "message_not_found"),
    ({"message_id": "MID", "revenue": 1, "attribution_type": "sale", "offer_id": "nope"}, "offer_not_found"),
    ({"message_id": "MID", "revenue": 1, "attribution_type": "sale", "timestamp": "soon"}, "invalid_timestamp"),
    # The ends of the calendar (a 500 before: the offset overflowed the conversion to UTC).
    ({"message_id": "MID", "revenue": 1, "attribution_type": "sale", "timestamp": "0001-01-01T00:00:00+01:00"}, "invalid_timestamp"),
    ({"message_id": "MID", "revenue": 1, "attribution_type": "sale", "timestamp": "9999-12-31T23:59:59-01:00"}, "invalid_timestamp"),
    ({"message_id": "MID", "revenue": 1, "attribution_type": "sale", "timestamp": "0001-01-01T00:00:00Z"}, "invalid_timestamp"),
])
async def test_errors(api, tenant, body, code):
    mid = await send_message(api, tenant)
    body = {k: (mid if v == "MID" else v) for k, v in body.items()}
    assert_error(await post_revenue(api, tenant, **body), 400, code)


async def test_errors_say_what_is_wrong(api, tenant):
    mid = await send_message(api, tenant)
    too_much = await post_revenue(api, tenant, message_id=mid, revenue="99999999999999.99", attribution_type="sale")
    assert_error(too_much, 400, "invalid_revenue")
    assert "less than 1000000000000" in too_much.json()["error"]
    too_late = await post_revenue(api, tenant, message_id=mid, revenue=1, attribution_type="sale", timestamp="2100-01-01T00:00:00Z")
    assert_error(too_late, 400, "invalid_timestamp")
    assert "1970 to 2099" in too_late.json()["error"]
    last = await post_revenue(api, tenant, message_id=mid, revenue=1, attribution_type="sale", timestamp="2099-12-31T23:59:59Z")
    assert last.status_code == 201, last.text


async def test_other_accounts_message_and_offer_are_not_found(api, db, tenant):
    other = await make_tenant(db)
    their_mid = await send_message(api, other)
    their_offer = await make_offer(api, other)
    mid = await send_message(api, tenant)
    assert_error(await post_revenue(api, tenant, message_id=their_mid, revenue=1, attribution_type="sale"), 400, "message_not_found")
    assert_error(await post_revenue(api, tenant, message_id=mid, revenue=1, attribution_type="sale", offer_id=their_offer["id"]),
                 400, "offer_not_found")


async def test_auth_and_json(api, tenant):
    assert_error(await api.post("/api/v2/revenue", json={}), 401, "unauthorized")
    assert_error(await api.post("/api/v2/revenue", headers=tenant.headers, content=b"nope"), 400, "invalid_json")


async def test_decimal_exactness(api, db, tenant):
    mid = await send_message(api, tenant)
    for amount in ("0.1", "0.2"):
        resp = await api.post("/api/v2/revenue", headers=tenant.headers,
                              content=f'{{"message_id": "{mid}", "revenue": {amount}, "attribution_type": "click"}}'.encode())
        assert resp.status_code == 201
    resp = await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)
    assert b'"revenue":0.3' in resp.content
    assert await db.fetchval("SELECT sum(amount) FROM revenue WHERE message_id = $1", mid) == Decimal("0.3")
    # Stored and answered exactly as sent, whatever its number of places (up to 30).
    for sent in ("0.30000000000000004", "12345678.123456789", "0.0000001", "999999999999.123456789012345678901234567891"):
        exact = await api.post("/api/v2/revenue", headers=tenant.headers, content=(
            f'{{"message_id": "{mid}", "revenue": {sent}, "attribution_type": "click"}}').encode())
        assert exact.status_code == 201, exact.text
        assert Decimal(exact.text.rpartition('"revenue":')[2].rstrip("}")) == Decimal(sent)
        assert await db.fetchval("SELECT amount FROM revenue WHERE id = $1", exact.json()["revenue_id"]) == Decimal(sent)
    # 0.3 + 0.30000000000000004 + 12345678.123456789 + 0.0000001 + 999999999999.123456789012345678901234567891,
    # summed by PostgreSQL: 43 digits, which Python's default 28-digit context would round.
    detail = await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)
    assert detail.json(parse_float=Decimal)["revenue"] == Decimal("1000012345677.846913678012345718901234567891")
    too_precise = await api.post("/api/v2/revenue", headers=tenant.headers, content=(
        f'{{"message_id": "{mid}", "revenue": 0.{"0" * 30}1, "attribution_type": "click"}}').encode())
    assert too_precise.status_code == 400 and too_precise.json()["code"] == "invalid_revenue"
    assert "30 decimal places" in too_precise.json()["error"]


async def test_bulk_partial_success(api, db, tenant):
    offer = await make_offer(api, tenant, external_id="bulk-ext")
    mid = await send_message(api, tenant)
    records = [
        {"message_id": mid, "revenue": "1.10", "attribution_type": "sale"},
        {"message_id": mid, "attribution_type": "sale"},
        {"message_id": "zzzzzzzz", "revenue": 1, "attribution_type": "sale"},
        {"message_id": mid, "revenue": 2, "attribution_type": "click", "offer_id": "bulk-ext"},
        {"message_id": mid, "revenue": 2, "attribution_type": "sale", "offer_id": "missing"},
        "not an object",
        {"message_id": mid, "revenue": 1, "attribution_type": "bogus"},
    ]
    resp = await api.post("/api/v2/revenue/bulk", headers=tenant.headers, json={"records": records})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["success_count"] == 2 and body["error_count"] == 5
    assert [(e["index"], e["code"]) for e in body["errors"]] == [
        (1, "missing_revenue"), (2, "message_not_found"), (4, "offer_not_found"), (5, "validation_error"),
        (6, "invalid_attribution_type"),
    ]
    assert all(e["error"] for e in body["errors"])
    rows = await db.fetch("SELECT amount, offer_id FROM revenue WHERE message_id = $1 ORDER BY amount", mid)
    assert [(r["amount"], r["offer_id"]) for r in rows] == [(Decimal("1.1"), None), (Decimal(2), offer["id"])]


async def test_bulk_limits(api, tenant):
    assert_error(await api.post("/api/v2/revenue/bulk", headers=tenant.headers, json={"records": []}), 400, "missing_records")
    assert_error(await api.post("/api/v2/revenue/bulk", headers=tenant.headers, json={}), 400, "missing_records")
    records = [{"message_id": "x", "revenue": 1, "attribution_type": "sale"}] * 1001
    assert_error(await api.post("/api/v2/revenue/bulk", headers=tenant.headers, json={"records": records}), 413, "too_many_records")


async def test_bulk_of_1000_in_one_go(api, db, tenant):
    mid = await send_message(api, tenant)
    records = [{"message_id": mid, "revenue": "0.01", "attribution_type": "send"} for _ in range(1000)]
    body = (await api.post("/api/v2/revenue/bulk", headers=tenant.headers, json={"records": records})).json()
    assert (body["success_count"], body["error_count"]) == (1000, 0)
    assert await db.fetchval("SELECT sum(amount) FROM revenue WHERE message_id = $1", mid) == Decimal(10)
