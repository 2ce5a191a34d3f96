"""Time is UTC, ISO 8601: every form a client may give a time in names the same instant."""
from __future__ import annotations

from datetime import UTC, datetime

from tests.worker.conftest import burst_worker


async def stored_times(db, tenant):
    rows = await db.fetch("SELECT conversion_key, converted_at FROM postbacks WHERE account_id = $1", tenant.account_id)
    return {r["conversion_key"]: r["converted_at"] for r in rows}


async def test_unix_seconds_finer_than_a_microsecond_are_cut_as_iso_8601_is(api, db, settings, tenant):
    # 2026-01-01T23:59:59.9999999Z, a tenth of a microsecond before midnight (Python's time.time()
    # prints seven digits): stored to the microsecond, it is still on January 1st, in every form.
    # Rounded (a binary float on the way), unix seconds moved it to January 2nd, 00:00:00.
    stamps = {"iso": "2026-01-01T23:59:59.9999999Z", "unix": "1767311999.9999999",
              "unix-ms": "1767311999999.9999", "unix-ns": "1767311999.999999999"}
    for key, stamp in stamps.items():
        resp = await api.get(f"/postback/{tenant.postback_token}",
                             params={"conversion_id": key, "payout": "1", "timestamp": stamp})
        assert resp.json()["status"] == "accepted", resp.text
    last = datetime(2026, 1, 1, 23, 59, 59, 999999, tzinfo=UTC)
    assert await stored_times(db, tenant) == dict.fromkeys(stamps, last)
    await burst_worker(settings)
    report = (await api.get("/api/v2/reports/performance?group_by=date", headers=tenant.headers)).json()
    assert [(r["key"], r["conversions"]) for r in report["rows"]] == [("2026-01-01", 4)]


async def test_unix_seconds_as_a_json_number_in_exponent_notation(api, db, tenant):
    # Java writes a double as 1.770552E9 (Jackson, Double.toString): the same number as 1770552000,
    # valid JSON, and unix seconds all the same. It was stored failed: the conversion was lost.
    url = f"/postback/{tenant.postback_token}"
    bodies = {"json-e9": b'{"conversion_id": "json-e9", "timestamp": 1.770552E9}',
              "json-ms": b'{"conversion_id": "json-ms", "timestamp": 1.7705520005E+12}',
              "json-frac": b'{"conversion_id": "json-frac", "timestamp": 17705520005e-1}'}
    for body in bodies.values():
        resp = await api.post(url, content=body, headers={"content-type": "application/json"})
        assert resp.json()["status"] == "accepted", resp.text
    resp = await api.get(url, params={"conversion_id": "query-e9", "timestamp": "1.770552e9"})
    assert resp.json()["status"] == "accepted", resp.text
    errors = await db.fetch("SELECT conversion_key, parse_error FROM postbacks WHERE account_id = $1 AND parse_error IS NOT NULL",
                            tenant.account_id)
    assert errors == []
    noon = datetime(2026, 2, 8, 12, tzinfo=UTC)
    assert await stored_times(db, tenant) == {
        "json-e9": noon, "json-ms": noon.replace(microsecond=500_000), "json-frac": noon.replace(microsecond=500_000),
        "query-e9": noon}
