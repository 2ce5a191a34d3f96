"""GET /contacts/{phone}/journey: events oldest first, ties sent < clicked < converted, scoping."""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import quote

from services.gateway.attribution_sql import JOURNEY
from shared import ids
from tests.gateway.test_api_basics import assert_error
from tests.gateway.test_reports import PHONE, build_history
from tests.helpers import make_offer, make_tenant, table_reads
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


async def test_a_journey_reads_the_contacts_own_clicks_and_revenue_whatever_the_tables_hold(db, tenant):
    """A contact's first clicks and revenue records were joined to its messages, which the planner
    did by reading the whole message_clicks and revenue tables (every account's) once a contact
    had a few hundred messages: 155-170 ms for a contact with 1000 messages among 1.2M messages,
    240k first clicks and 24k revenue records, growing with the tables, not the contact. Each is
    now one probe per message of the contact (as the batch statements do): no sequential scan,
    and no more rows than the contact's own (here among ten times as many of its account's and
    of another account's)."""
    other = await make_tenant(db)
    n, phone = 300, "+14155550177"
    t0 = datetime(2026, 2, 1, 8, 0, tzinfo=UTC)
    async with db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            for account, list_id, prefix, count, to in ((other.account_id, other.list_id, "j1", 10 * n, None),
                                                        (tenant.account_id, tenant.list_id, "j2", 10 * n, None),
                                                        (tenant.account_id, tenant.list_id, "j3", n, phone)):
                await conn.execute(
                    "INSERT INTO messages (id, account_id, list_id, to_phone, body, sent_at)"
                    " SELECT $2 || lpad(i::text, 6, '0'), $1, $3, coalesce($5, '+1415' || lpad(i::text, 7, '0')), 'x',"
                    " $4::timestamptz + i * interval '1 minute' FROM generate_series(0, $6 - 1) i",
                    account, prefix, list_id, t0, to, count)
                await conn.execute(
                    "INSERT INTO message_clicks (message_id, click_id, account_id, clicked_at)"
                    " SELECT $2 || lpad(i::text, 6, '0'), 'k' || $2 || i, $1, $3::timestamptz + i * interval '1 minute'"
                    " + interval '1 hour' FROM generate_series(0, $4 - 1) i", account, prefix, t0, count)
                await conn.execute(
                    "INSERT INTO revenue (id, account_id, message_id, amount, attribution_type, occurred_at)"
                    " SELECT 'rv' || $2 || i, $1, $2 || lpad(i::text, 6, '0'), 1.25, 'sale',"
                    " $3::timestamptz + i * interval '1 minute' + interval '2 hours' FROM generate_series(0, $4 - 1, 2) i",
                    account, prefix, t0, count)
            for table in ("messages", "message_clicks", "revenue"):
                await conn.execute(f"ANALYZE {table}")
            rows, reads = await table_reads(
                conn, lambda: conn.fetch(JOURNEY, tenant.account_id, phone), "message_clicks", "revenue")
        finally:
            await tx.rollback()
    kinds = [r["type"] for r in rows]
    assert (kinds.count("sent"), kinds.count("clicked"), kinds.count("converted")) == (n, n, n // 2)
    assert sum(r["revenue"] for r in rows if r["revenue"] is not None) == Decimal("1.25") * (n // 2)
    assert all(scans == 0 and fetched <= n for scans, fetched in reads.values()), reads
