"""GET /reports/performance: metric definitions, equal totals across groupings, ranges, pages."""
from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal

import pytest

from shared import ids
from tests.gateway.test_api_basics import assert_error
from services.gateway.routes.reports import REPORT_SLOTS, REPORT_SLOTS_PER_ACCOUNT
from tests.helpers import add_list, make_offer, make_tenant
from tests.worker.conftest import burst_worker

GROUPS = ["offer", "creative", "message", "date", "campaign", "list"]
PHONE = "+12025550111"


async def build_history(api, db, settings, tenant):
    """Four messages over three days, three first clicks, postbacks (one reversed, one pending, one
    unattributed) and revenue records; returns the message ids and the second list."""
    offer_a = await make_offer(api, tenant, payout=10)
    offer_b = await make_offer(api, tenant)
    second = await add_list(db, tenant)
    m = [ids.message_id() for _ in range(4)]
    sends = [
        {"message_id": m[0], "to": PHONE, "list_id": tenant.list_id, "offer_id": offer_a["id"], "creative_id": "c1",
         "schedule_id": "s1", "timestamp": "2026-01-01T10:00:00Z"},
        {"message_id": m[1], "to": PHONE, "list_id": tenant.list_id, "offer_id": offer_a["id"], "creative_id": "c2",
         "timestamp": "2026-01-02T10:00:00Z"},
        {"message_id": m[2], "to": "+12025550222", "list_id": second["list_id"], "offer_id": offer_b["id"],
         "creative_id": "c1", "schedule_id": "s2", "timestamp": "2026-01-02T11:00:00Z"},
        {"message_id": m[3], "to": PHONE, "list_id": tenant.list_id, "timestamp": "2026-01-03T10:00:00Z"},
    ]
    body = (await api.post("/api/v2/history/sends", headers=tenant.headers, json={"records": sends})).json()
    assert body["success_count"] == 4, body
    clicks = [
        {"message_id": m[0], "offer_id": offer_a["id"], "phone_number": PHONE, "timestamp": "2026-01-01T11:00:00Z"},
        {"message_id": m[2], "offer_id": offer_b["id"], "phone_number": "+12025550222", "timestamp": "2026-01-02T12:00:00Z"},
        {"message_id": m[1], "offer_id": offer_a["id"], "phone_number": PHONE, "timestamp": "2026-01-03T01:00:00Z"},
    ]
    body = (await api.post("/api/v2/history/clicks", headers=tenant.headers, json={"records": clicks})).json()
    assert body["success_count"] == 3, body
    click = {r["message_id"]: r["click_id"] for r in await db.fetch(
        "SELECT message_id, click_id FROM message_clicks WHERE message_id = ANY($1::text[])", m)}
    url = f"/postback/{tenant.postback_token}"
    for params in (
        {"click_id": click[m[0]], "conversion_id": "p1", "payout": "0.1", "timestamp": "2026-01-01T12:00:00Z"},
        {"click_id": click[m[0]], "conversion_id": "p2", "payout": "0.2", "timestamp": "2026-01-02T00:00:00Z"},
        {"click_id": click[m[2]], "conversion_id": "p3", "payout": "5", "timestamp": "2026-01-02T13:00:00Z"},
        {"click_id": click[m[2]], "conversion_id": "p3", "status": "reversed", "timestamp": "2026-01-02T13:00:00Z"},
        {"click_id": "unknown-click", "conversion_id": "p4", "payout": "7", "timestamp": "2026-01-02T05:00:00Z"},
        {"click_id": click[m[1]], "conversion_id": "p5", "status": "pending", "payout": "3", "timestamp": "2026-01-03T02:00:00Z"},
    ):
        assert (await api.get(url, params=params)).json()["status"] == "accepted"
    await burst_worker(settings)
    for rec in (
        {"message_id": m[3], "revenue": "1.5", "attribution_type": "sale", "timestamp": "2026-01-03T11:00:00Z"},
        {"message_id": m[0], "revenue": "0.7", "attribution_type": "click", "timestamp": "2026-01-01T13:00:00Z"},
    ):
        assert (await api.post("/api/v2/revenue", headers=tenant.headers, json=rec)).status_code == 201
    return m, offer_a, offer_b, second


async def report(api, tenant, **params):
    resp = await api.get("/api/v2/reports/performance", headers=tenant.headers, params={"per_page": 100, **params})
    assert resp.status_code == 200, resp.text
    return resp.json()


def metrics(sends, clicks, conversions, revenue):
    return {"sends": sends, "clicks": clicks, "conversions": conversions, "revenue": revenue}


def core(row):
    return {k: row[k] for k in ("sends", "clicks", "conversions", "revenue")}


async def test_report_metrics_and_equal_totals(api, db, settings, tenant):
    m, offer_a, offer_b, second = await build_history(api, db, settings, tenant)
    reports = {g: await report(api, tenant, group_by=g) for g in GROUPS}
    expected_totals = {**metrics(4, 3, 4, 9.5), "ctr": 0.75, "conversion_rate": 4 / 3,
                       "epc": 9.5 / 3, "revenue_per_send": 2.375}
    for group, rep in reports.items():
        assert rep["group_by"] == group
        assert rep["totals"] == expected_totals, group
        rows = rep["rows"]
        for name in ("sends", "clicks", "conversions"):
            assert sum(r[name] for r in rows) == expected_totals[name], (group, name)
        assert sum(Decimal(str(r["revenue"])) for r in rows) == Decimal("9.5"), group
    by_offer = {r["key"]: core(r) for r in reports["offer"]["rows"]}
    assert by_offer == {
        offer_a["id"]: metrics(2, 2, 2, 1), offer_b["id"]: metrics(1, 1, 0, 0), None: metrics(1, 0, 2, 8.5)}
    a_row = next(r for r in reports["offer"]["rows"] if r["key"] == offer_a["id"])
    assert (a_row["ctr"], a_row["conversion_rate"], a_row["epc"], a_row["revenue_per_send"]) == (1, 1, 0.5, 0.5)
    by_message = {r["key"]: core(r) for r in reports["message"]["rows"]}
    assert by_message[m[0]] == metrics(1, 1, 2, 1)  # 0.1 + 0.2 + 0.7, exactly
    assert by_message[m[2]] == metrics(1, 1, 0, 0)  # reversed: nets out, not counted
    assert by_message[m[1]] == metrics(1, 1, 0, 0)  # pending: not yet
    assert by_message[None] == metrics(0, 0, 1, 7)  # unattributed
    by_date = {r["key"]: core(r) for r in reports["date"]["rows"]}
    assert by_date == {"2026-01-01": metrics(1, 1, 1, 0.8), "2026-01-02": metrics(2, 1, 2, 7.2),
                       "2026-01-03": metrics(1, 1, 1, 1.5)}
    by_list = {r["key"]: core(r) for r in reports["list"]["rows"]}
    assert by_list == {tenant.list_id: metrics(3, 2, 3, 2.5), second["list_id"]: metrics(1, 1, 0, 0), None: metrics(0, 0, 1, 7)}
    by_creative = {r["key"]: core(r) for r in reports["creative"]["rows"]}
    assert by_creative == {"c1": metrics(2, 2, 2, 1), "c2": metrics(1, 1, 0, 0), None: metrics(1, 0, 2, 8.5)}
    by_campaign = {r["key"]: core(r) for r in reports["campaign"]["rows"]}
    assert by_campaign == {"s1": metrics(1, 1, 2, 1), "s2": metrics(1, 1, 0, 0), None: metrics(2, 1, 2, 8.5)}
    # Message detail agrees with the report.
    detail = (await api.get(f"/api/v2/messages/{m[0]}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (2, 1)


async def test_report_range(api, db, settings, tenant):
    await build_history(api, db, settings, tenant)
    for group in GROUPS:
        rep = await report(api, tenant, group_by=group, start="2026-01-02", end="2026-01-02")
        assert core(rep["totals"]) == metrics(2, 1, 2, 7.2), group
    only_start = await report(api, tenant, group_by="date", start="2026-01-03")
    assert core(only_start["totals"]) == metrics(1, 1, 1, 1.5)
    only_end = await report(api, tenant, group_by="offer", end="2026-01-01")
    assert core(only_end["totals"]) == metrics(1, 1, 1, 0.8)
    empty = await report(api, tenant, group_by="offer", start="2030-01-01")
    assert empty["rows"] == [] and core(empty["totals"]) == metrics(0, 0, 0, 0)
    assert empty["totals"]["ctr"] == 0 and empty["totals"]["epc"] == 0 and empty["pagination"]["total"] == 0


async def test_report_pages(api, db, settings, tenant):
    await build_history(api, db, settings, tenant)
    first = await report(api, tenant, group_by="message", per_page=2)
    second = await report(api, tenant, group_by="message", per_page=2, page=3)
    assert first["pagination"] == {"page": 1, "per_page": 2, "total": 5, "total_pages": 3}
    assert len(first["rows"]) == 2 and len(second["rows"]) == 1 and second["rows"][0]["key"] is None
    assert first["totals"] == second["totals"]
    beyond = await report(api, tenant, group_by="message", per_page=2, page=9)
    assert beyond["rows"] == [] and beyond["pagination"]["total"] == 5
    assert beyond["totals"] == first["totals"]  # (asked for separately: no row carries them)


async def test_report_is_account_scoped(api, db, settings, tenant):
    from tests.helpers import make_tenant

    await build_history(api, db, settings, tenant)
    other = await make_tenant(db)
    rep = await report(api, other, group_by="offer")
    assert rep["rows"] == [] and core(rep["totals"]) == metrics(0, 0, 0, 0)


@pytest.mark.parametrize("params", [
    {}, {"group_by": "country"}, {"group_by": "offer", "start": "yesterday"},
    {"group_by": "offer", "start": "2026-01-02", "end": "2026-01-01"}, {"group_by": "offer", "per_page": "0"},
])
async def test_report_validation(api, tenant, params):
    resp = await api.get("/api/v2/reports/performance", headers=tenant.headers, params=params)
    assert_error(resp, 400, "validation_error")


async def test_report_needs_a_key(api):
    assert_error(await api.get("/api/v2/reports/performance", params={"group_by": "offer"}), 401, "unauthorized")


async def test_reports_beyond_their_slots_wait_without_holding_up_other_calls(api, gateway_app, tenant):
    """Heavy reports must not take every pooled connection: with every report slot taken, a
    report waits, and other calls still get a connection and answer."""

    slots = gateway_app.state.report_slots.all
    for _ in range(REPORT_SLOTS):
        await slots.acquire()
    report = asyncio.ensure_future(api.get("/api/v2/reports/performance", params={"group_by": "offer"}, headers=tenant.headers))
    try:
        offers = await asyncio.wait_for(api.get("/api/v2/offers", headers=tenant.headers), 10)
        assert offers.status_code == 200
        await asyncio.sleep(0.3)
        assert not report.done()
    finally:
        for _ in range(REPORT_SLOTS):
            slots.release()
    assert (await asyncio.wait_for(report, 10)).status_code == 200


async def test_one_accounts_reports_leave_a_slot_to_the_others(api, gateway_app, db, tenant):
    """An account running REPORT_SLOTS_PER_ACCOUNT reports waits for one of them to end; another
    account's report goes ahead meanwhile (a slot is left)."""
    other = await make_tenant(db)
    slots = gateway_app.state.report_slots
    held = contextlib.AsyncExitStack()
    for _ in range(REPORT_SLOTS_PER_ACCOUNT):
        await held.enter_async_context(slots.hold(tenant.account_id))
    mine = asyncio.ensure_future(api.get("/api/v2/reports/performance", params={"group_by": "offer"}, headers=tenant.headers))
    try:
        theirs = await asyncio.wait_for(
            api.get("/api/v2/reports/performance", params={"group_by": "offer"}, headers=other.headers), 10)
        assert theirs.status_code == 200, theirs.text
        await asyncio.sleep(0.3)
        assert not mine.done()
    finally:
        await held.aclose()
    assert (await asyncio.wait_for(mine, 10)).status_code == 200
    assert slots._accounts == {}  # nothing kept per account once its reports are done


async def test_a_report_that_gets_no_slot_in_time_is_refused_with_retry_after(api, gateway_app, tenant, monkeypatch):
    slots = gateway_app.state.report_slots
    monkeypatch.setattr(slots, "_wait", 0.2)
    async with contextlib.AsyncExitStack() as held:
        for _ in range(REPORT_SLOTS_PER_ACCOUNT):
            await held.enter_async_context(slots.hold(tenant.account_id))
        resp = await asyncio.wait_for(
            api.get("/api/v2/reports/performance", params={"group_by": "offer"}, headers=tenant.headers), 10)
        assert_error(resp, 503, "reports_busy")
        assert resp.headers["retry-after"] == "5"
    assert (await api.get("/api/v2/reports/performance", params={"group_by": "offer"}, headers=tenant.headers)).status_code == 200
    assert slots._accounts == {} and slots.all._value == REPORT_SLOTS


async def test_a_report_that_runs_too_long_is_stopped_and_says_so(api, db, tenant, monkeypatch):
    """With its tables locked (or a range too wide for the account), a report ends at its
    statement timeout in PostgreSQL with report_timeout, not after the pool's 60 s as if the
    database were down; the next one runs."""
    from services.gateway.routes import reports

    monkeypatch.setattr(reports, "REPORT_TIMEOUT_MS", 300)
    async with db.acquire() as locker, locker.transaction():
        await locker.execute("LOCK TABLE report_rollup IN ACCESS EXCLUSIVE MODE")
        resp = await asyncio.wait_for(
            api.get("/api/v2/reports/performance", params={"group_by": "offer"}, headers=tenant.headers), 10)
        assert_error(resp, 503, "report_timeout")
    assert (await api.get("/api/v2/reports/performance", params={"group_by": "offer"}, headers=tenant.headers)).status_code == 200


async def test_reports_read_the_rollup_only_once_its_backfill_has_committed(api, db, tenant, gateway_app):
    """Migration 0016 records itself with its backfill (shared/migrate.py); until then, a report
    sums the events. A row only the rollup has shows which one answered."""
    await db.execute(
        "INSERT INTO report_rollup (account_id, day, offer, events, sends, clicks, conversions, revenue)"
        " VALUES ($1, '2026-03-01', 'only-in-the-rollup', 1, 7, 0, 0, 0)", tenant.account_id)
    try:
        gateway_app.state.rollup_ready = False
        await db.execute("UPDATE schema_migrations SET version = 'pending_0016' WHERE version = '0016_report_rollup'")
        try:
            keys = [r["key"] for r in (await api.get("/api/v2/reports/performance?group_by=offer", headers=tenant.headers)).json()["rows"]]
            assert keys == []
        finally:
            await db.execute("UPDATE schema_migrations SET version = '0016_report_rollup' WHERE version = 'pending_0016'")
        keys = [r["key"] for r in (await api.get("/api/v2/reports/performance?group_by=offer", headers=tenant.headers)).json()["rows"]]
        assert keys == ["only-in-the-rollup"]
    finally:
        await db.execute("DELETE FROM report_rollup WHERE account_id = $1", tenant.account_id)


async def test_reports_by_message_read_the_strays_table_only_once_its_backfill_has_committed(api, db, tenant, gateway_app):
    """Migration 0029 records itself with its backfill, as 0016 does; until then a report by
    message over a range finds its strays (messages with an event in it, sent before it) from the
    events. A stray report_strays lacks shows which one answered."""
    mid = ids.message_id()
    await db.execute("INSERT INTO messages (id, account_id, list_id, to_phone, body, sent_at)"
                     " VALUES ($1, $2, $3, $4, 'x', '2026-03-01T10:00Z')", mid, tenant.account_id, tenant.list_id, PHONE)
    await db.execute("INSERT INTO message_clicks (message_id, click_id, account_id, clicked_at)"
                     " VALUES ($1, 'k-stray', $2, '2026-03-05T10:00Z')", mid, tenant.account_id)
    await db.execute("DELETE FROM report_strays WHERE account_id = $1", tenant.account_id)
    url = "/api/v2/reports/performance?group_by=message&start=2026-03-05&end=2026-03-05"
    gateway_app.state.strays_ready = False
    await db.execute("UPDATE schema_migrations SET version = 'pending_0029' WHERE version = '0029_report_strays'")
    try:
        rows = (await api.get(url, headers=tenant.headers)).json()["rows"]
        assert [(r["key"], r["sends"], r["clicks"]) for r in rows] == [(mid, 0, 1)]
    finally:
        await db.execute("UPDATE schema_migrations SET version = '0029_report_strays' WHERE version = 'pending_0029'")
    assert (await api.get(url, headers=tenant.headers)).json()["rows"] == []
