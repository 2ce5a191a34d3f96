"""Amounts whose value fits but whose written form does not (PostgreSQL's numeric holds at most
16,383 places; asyncpg refuses to send more): stored as their value, never a 500, and in a bulk
request never a failure of the whole request."""
from __future__ import annotations

import secrets
from decimal import Decimal

import pytest

from tests.helpers import make_offer, random_phone

# 1, written with 16,400 zeros after the point: 0 places that count.
LONG_ONE = "1." + "0" * 16400


async def _send(api, tenant) -> str:
    resp = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": random_phone(), "list_id": tenant.list_id, "body": "hi"})
    assert resp.status_code == 201, resp.text
    return resp.json()["message_id"]


@pytest.mark.parametrize("amount, value", [
    (LONG_ONE.encode(), Decimal(1)), (f'"{LONG_ONE}"'.encode(), Decimal(1)),
    (b"0e-20000", Decimal(0)), (b"0e999999999", Decimal(0)), (b"2.5e3", Decimal(2500)),
])
async def test_revenue_stores_the_value_of_any_form(api, db, tenant, amount, value):
    mid = await _send(api, tenant)
    resp = await api.post("/api/v2/revenue", headers=tenant.headers, content=(
        b'{"message_id": "%s", "revenue": %s, "attribution_type": "sale"}' % (mid.encode(), amount)))
    assert resp.status_code == 201, resp.text[:300]
    assert await db.fetchval("SELECT amount FROM revenue WHERE id = $1", resp.json()["revenue_id"]) == value


@pytest.mark.parametrize("path", ["/api/v2/revenue/bulk", "/api/v2/history/revenue"])
@pytest.mark.parametrize("keyed", [True, False])
async def test_a_bulk_record_of_a_long_form_is_stored_with_the_others(api, db, tenant, path, keyed):
    # With an Idempotency-Key, a record that could not be sent to PostgreSQL failed the whole
    # request (500, and the same again on every retry with the key); without one, as save_error.
    mid = await _send(api, tenant)
    records = [
        {"message_id": mid, "revenue": "1.25", "attribution_type": "sale"},
        {"message_id": mid, "revenue": LONG_ONE, "attribution_type": "sale"},
    ]
    headers = {**tenant.headers, **({"Idempotency-Key": secrets.token_hex(8)} if keyed else {})}
    resp = await api.post(path, headers=headers, json={"records": records})
    assert resp.status_code == 200, resp.text[:300]
    assert (resp.json()["success_count"], resp.json()["error_count"]) == (2, 0)
    assert await db.fetchval("SELECT sum(amount) FROM revenue WHERE message_id = $1", mid) == Decimal("2.25")


async def test_an_offer_payout_of_a_long_form(api, tenant):
    resp = await api.post("/api/v2/offers", headers=tenant.headers,
                          json={"name": "x", "destination_url": "https://example.com/", "payout": LONG_ONE})
    assert resp.status_code == 201, resp.text[:300]
    assert resp.json()["offer"]["payout"] == 1
    offer = await make_offer(api, tenant)
    resp = await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, content=b'{"payout": 0e-20000}')
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json()["offer"]["payout"] == 0


async def test_a_postback_with_a_payout_of_a_long_form_is_stored(api, db, tenant):
    resp = await api.get(f"/postback/{tenant.postback_token}",
                         params={"click_id": "c" * 32, "payout": LONG_ONE, "conversion_id": "cv1"})
    assert resp.status_code == 200, resp.text[:300]
    assert await db.fetchval("SELECT payout FROM postbacks WHERE account_id = $1", tenant.account_id) == 1
