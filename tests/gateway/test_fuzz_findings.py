"""Findings of a fuzzing run: a wrong JSON type that passed as a default, and the postback log
listing numbers a network sent through binary floats."""
from __future__ import annotations

import pytest

from tests.gateway.test_api_basics import assert_error


@pytest.mark.parametrize("currency", [False, True, 0, 0.0, 1, [], {}, ["USD"], {"code": "USD"}])
async def test_offer_currency_of_the_wrong_type_is_refused(api, tenant, currency) -> None:
    """Absent, null and "" are the default (USD); a boolean, number, array or object is not a
    currency code and must not be stored as USD (it was, for every falsy one: false, 0, [], {})."""
    body = {"name": "n", "destination_url": "https://example.com", "currency": currency}
    resp = await api.post("/api/v2/offers", json=body, headers=tenant.headers)
    assert_error(resp, 400, "validation_error")
    listed = await api.get("/api/v2/offers", headers=tenant.headers)
    assert listed.json()["offers"] == []  # nothing written


async def test_postback_log_lists_json_numbers_as_sent(api, tenant) -> None:
    """GET /api/v2/postbacks lists params as the network sent them: a JSON number in a postback's
    body is stored exactly (jsonb numeric) and must be listed exactly, not rounded through a
    binary float (24.990000000000000001 was listed as 24.99 beside the exact payout column)."""
    raw = b'{"payout": 24.990000000000000001, "conversion_id": "exact-1", "big": 123456789012345678901234567e50}'
    resp = await api.post(f"/postback/{tenant.postback_token}", content=raw,
                          headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    listed = await api.get("/api/v2/postbacks", headers=tenant.headers)
    assert listed.status_code == 200, listed.text
    text = listed.text
    assert '"payout":24.990000000000000001' in text  # the parsed column (exact already)
    assert '"params":{' in text
    params = text[text.index('"params":{'):]
    params = params[: params.index("}") + 1]
    assert "24.990000000000000001" in params, params
    assert "12345678901234567890123456700000000000000000000000000000000000000000000000000" in params or \
        "1.23456789012345678901234567E+76" in params, params
