"""Postbacks as networks put them on the wire: fields repeated, in the query and the body at once."""
from __future__ import annotations

from decimal import Decimal

import pytest

from tests.worker.conftest import burst_worker


async def stored(db, tenant):
    return await db.fetch("SELECT * FROM postbacks WHERE account_id = $1 ORDER BY id", tenant.account_id)


async def test_a_blank_first_value_of_a_repeated_field_does_not_hide_the_next(api, db, tenant):
    # A network whose template leaves a field blank in the query (a macro it had no value for)
    # and sends it again with its value, repeated or in the body: blanks are absent, so the value
    # sent is the field's. It was read as no click id at all: the postback became a conversion
    # of its own, unattributed, and each retry of it another one (revenue counted twice).
    url = f"/postback/{tenant.postback_token}"
    for _ in range(2):  # the second is the network's retry
        resp = await api.get(url + "?click_id=&click_id=r1&payout=&payout=4")
        assert resp.status_code == 200
    assert resp.json() == {"success": True, "status": "duplicate"}
    resp = await api.post(url + "?click_id=&payout=", content=b'{"click_id": "r2", "payout": 5, "txid": "t2"}',
                          headers={"content-type": "application/json"})
    assert resp.json() == {"success": True, "status": "accepted"}
    rows = await stored(db, tenant)
    assert [(r["click_id"], r["conversion_key"], r["payout"], r["is_duplicate"]) for r in rows] == [
        ("r1", "click:r1", Decimal(4), False), ("r1", "click:r1", Decimal(4), True), ("r2", "t2", Decimal(5), False)]
    assert all(r["parse_error"] is None for r in rows)
    assert rows[0]["params"] == {"click_id": ["", "r1"], "payout": ["", "4"]}  # kept as sent


@pytest.mark.parametrize("content_type, body", [
    (None, b"click_id=a&payout=5"),  # a form sent without its type: not read as one
    ("text/plain", b"OK"),
    ("text/plain", b"[1, 2]"),  # JSON, but no object
    ("application/octet-stream", b"\x01\x02"),
])
async def test_a_body_that_holds_no_fields_and_nothing_else_is_never_a_conversion(api, db, tenant, settings,
                                                                                content_type, body):
    # The body is kept as text under _body, which is where we keep it, not a field the network
    # sent: such a postback sent nothing to record. It was an approved conversion of 0 (its own,
    # unattributed), counted in every report's conversions, one more per retry.
    headers = {"content-type": content_type} if content_type else {}
    resp = await api.post(f"/postback/{tenant.postback_token}", content=body, headers=headers)
    assert resp.json() == {"success": True, "status": "accepted"}
    await burst_worker(settings)
    [row] = await stored(db, tenant)
    assert row["params"] == {"_body": body.decode()}
    assert row["parse_error"] is not None and row["process_error"] == "unparseable"
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE account_id = $1", tenant.account_id) == 0
    report = (await api.get("/api/v2/reports/performance", params={"group_by": "offer"}, headers=tenant.headers)).json()
    assert report["totals"]["conversions"] == 0
    [listed] = (await api.get("/api/v2/postbacks", headers=tenant.headers)).json()["postbacks"]
    assert listed["state"] == "failed" and listed["error"].startswith("body:")


async def test_a_json_object_sent_with_a_forms_type_is_read_as_json(api, db, tenant):
    # `curl -d '{...}'` and PHP's curl given a string both label the body
    # application/x-www-form-urlencoded. Read as a form it was one field named by the whole JSON
    # text: the click id, payout and conversion id were lost, and the postback became an approved
    # conversion of 0 of its own (each retry another).
    url = f"/postback/{tenant.postback_token}?network=everflow"
    body = b'{"transaction_id": "f1", "payout": 12.5, "event_id": "E-1", "status": "pending"}'
    answers = [(await api.post(url, content=body, headers={"content-type": "application/x-www-form-urlencoded"})).json()
               for _ in range(2)]
    assert answers == [{"success": True, "status": "accepted"}, {"success": True, "status": "duplicate"}]
    first = (await stored(db, tenant))[0]
    assert (first["click_id"], first["payout"], first["conversion_key"], first["status"], first["network"]) == (
        "f1", Decimal("12.5"), "E-1", "pending", "everflow")
    assert first["parse_error"] is None
    assert first["params"] == {"network": "everflow", "transaction_id": "f1", "payout": 12.5, "event_id": "E-1",
                               "status": "pending"}
    # A form is still a form (a field may hold braces).
    resp = await api.post(url, content=b"click_id=f2&sub1={x}", headers={"content-type": "application/x-www-form-urlencoded"})
    assert resp.json()["status"] == "accepted"
    assert (await stored(db, tenant))[-1]["click_id"] == "f2"
