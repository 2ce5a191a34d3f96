"""Money on every path that writes revenue: forms of amounts not covered elsewhere, and races."""
from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from tests.helpers import lock_waiters, row_held


@pytest.mark.parametrize("number, value", [
    (b"1e2", Decimal(100)), (b"2.5E3", Decimal(2500)), (b"0.0000001", Decimal("0.0000001")),
    (b"1E-2", Decimal("0.01")),
])
async def test_a_json_postback_payout_of_any_number_form_is_read(api, db, tenant, number, value):
    # A JSON number is parsed to a Decimal; as a field it was read through str(), which writes
    # 1e2 as "1E+2" and 0.0000001 as "1E-7": forms a decimal string may not take, so the postback
    # was kept unparseable and never counted.
    resp = await api.post(f"/postback/{tenant.postback_token}", content=b'{"click_id": "j1", "payout": %s}' % number,
                          headers={"content-type": "application/json"})
    assert resp.json()["status"] == "accepted"
    row = await db.fetchrow("SELECT payout, parse_error FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert (row["payout"], row["parse_error"]) == (value, None)


async def _send(api, tenant) -> str:
    resp = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": "+14155550123", "list_id": tenant.list_id, "body": "hi"})
    assert resp.status_code == 201, resp.text
    return resp.json()["message_id"]


# An exponent past what Python's Decimal can hold (its limit is 999999999999999999): the JSON
# parser's Decimal raised InvalidOperation, which is no ValueError, so nothing caught it.
BEYOND = b"1e99999999999999999999"


@pytest.mark.parametrize("path", ["/api/v2/revenue", "/api/v2/revenue/bulk", "/api/v2/history/revenue"])
async def test_a_number_beyond_decimals_exponent_is_a_bad_request_not_a_500(api, db, tenant, path):
    mid = (await _send(api, tenant)).encode()
    record = b'{"message_id": "%s", "revenue": %s, "attribution_type": "sale"}' % (mid, BEYOND)
    body = record if path == "/api/v2/revenue" else b'{"records": [%s]}' % record
    resp = await api.post(path, headers=tenant.headers, content=body)
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json()["code"] == "invalid_json"
    offer = await api.post("/api/v2/offers", headers=tenant.headers,
                           content=b'{"name": "x", "destination_url": "https://example.com/", "payout": %s}' % BEYOND)
    assert (offer.status_code, offer.json()["code"]) == (400, "invalid_json")


async def test_a_json_postback_with_a_number_beyond_decimals_exponent_is_stored(api, db, tenant):
    # The postback was lost: a 500 before anything was stored, and the same on every retry.
    resp = await api.post(f"/postback/{tenant.postback_token}?click_id=c1&conversion_id=k1&payout=5",
                          content=b'{"payout": %s, "sub1": "x"}' % BEYOND, headers={"content-type": "application/json"})
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json()["status"] == "accepted"
    row = await db.fetchrow("SELECT payout, parse_error, params FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert row["params"]["_body"] == '{"payout": %s, "sub1": "x"}' % BEYOND.decode()
    assert row["payout"] == Decimal(5) and row["parse_error"] == "body: not a JSON object"


@pytest.mark.parametrize("turn", range(3))  # which import PostgreSQL aborts varies: three goes at it
async def test_concurrent_keyed_imports_sharing_external_ids_in_opposite_orders_both_succeed(api, db, settings, tenant, turn):
    """Two imports under different Idempotency-Keys (each one transaction) name the same external
    ids in opposite orders. Each inserted its first half and then waited on a row the other had
    inserted: PostgreSQL broke the deadlock, and both requests failed (500 save_error, or 503
    after a minute's wait). Rows now go in external_id order: one waits for the other to end, then
    skips what it stored.

    Made likely rather than rare: a third transaction holds the middle id until both imports wait
    on it, each with its own half inserted. (Before the fix, a go failed two times in three, some
    after many seconds: record by record, one deadlock a second.)"""
    mid = await _send(api, tenant)
    records = [{"message_id": mid, "revenue": "1.10", "attribution_type": "sale", "external_id": f"race-{i:03d}",
                "timestamp": "2026-01-02T00:00:00Z"} for i in range(300)]
    async with row_held(
        settings.database_url,
        "INSERT INTO revenue (id, account_id, message_id, amount, attribution_type, occurred_at, external_id, source)"
        " VALUES ('f00000000000000000000150', $1, $2, 1, 'sale', now(), 'race-150', 'history')", tenant.account_id, mid,
    ) as held:

        def start(n: int, batch: list[dict]) -> asyncio.Future:
            return asyncio.ensure_future(api.post(
                "/api/v2/history/revenue", json={"records": batch}, headers={**tenant.headers, "Idempotency-Key": f"race-{turn}-{n}"}))

        imports = [start(1, records[::-1])]
        await lock_waiters(db, 1)
        imports.append(start(0, records))
        await lock_waiters(db, 2)
        await held.rollback()
        answers = await asyncio.wait_for(asyncio.gather(*imports), 30)
    assert [a.status_code for a in answers] == [200, 200], [a.text[:200] for a in answers]
    bodies = [a.json() for a in answers]
    assert sum(b["success_count"] for b in bodies) == 300  # each stored once, by one or the other
    assert all(b["success_count"] + b["duplicates_skipped"] == 300 and b["error_count"] == 0 for b in bodies)
    assert await db.fetchval(
        "SELECT count(*) FROM revenue WHERE account_id = $1 AND external_id LIKE 'race-%'", tenant.account_id) == 300
