"""Money on every path that writes revenue: forms of amounts not covered elsewhere, and races."""
from __future__ import annotations

from decimal import Decimal

import pytest


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
