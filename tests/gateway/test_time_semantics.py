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
