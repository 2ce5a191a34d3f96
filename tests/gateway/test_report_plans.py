"""Reports on a big account: what each report reads must follow its page and range, not the
account. Checked on plans and on rows read, never on time (tests/worker/test_batch_plans.py does
the same for the worker's batches)."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.gateway.attribution_sql import report_page
from shared import ids
from tests.gateway.test_reports import GROUPS, build_history


async def _report_plans(gateway_app) -> list[tuple[int, int]]:
    """(custom plans, generic plans) of every report statement prepared on any connection of the
    gateway's pool (asyncpg prepares each query once per connection)."""
    pool = gateway_app.state.db
    conns = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        plans = []
        for conn in conns:
            plans += [(r["custom_plans"], r["generic_plans"]) for r in await conn.fetch(
                "SELECT custom_plans, generic_plans FROM pg_prepared_statements"
                " WHERE statement LIKE '%FROM report_rollup%' AND statement NOT LIKE '%pg_prepared_statements%'")]
        return plans
    finally:
        for conn in conns:
            await pool.release(conn)


async def test_every_report_is_planned_for_its_own_account_and_range(api, db, settings, tenant, gateway_app):
    """From its sixth run on a connection, PostgreSQL may run a prepared statement with a generic
    plan, made for no account and no range in particular. For a report that plan sorted every
    message of a 3M-message account on disk to find a page of 100 (2.4 s instead of 0.4 s), and
    the rollup groupings took 2-3 times as long. A report is planned for its values every time."""
    await build_history(api, db, settings, tenant)
    for group in GROUPS:
        for params in ({}, {"start": "2026-01-02", "end": "2026-01-03"}):
            for page in range(1, 9):
                resp = await api.get("/api/v2/reports/performance", headers=tenant.headers,
                                     params={"group_by": group, "per_page": 1, "page": page, **params})
                assert resp.status_code == 200, resp.text
    plans = await _report_plans(gateway_app)
    assert sum(custom for custom, _ in plans) >= len(GROUPS) * 2 * 8, plans
    assert [generic for _, generic in plans if generic] == [], plans


async def _messages_rows_read(conn) -> int:
    """Rows this transaction has read from messages so far: by sequential scans, and index entries
    returned by any of its indexes."""
    return await conn.fetchval(
        "SELECT pg_stat_get_xact_tuples_returned('messages'::regclass)"
        " + (SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(indexrelid)), 0) FROM pg_index"
        "    WHERE indrelid = 'messages'::regclass)")


async def test_a_page_by_message_over_all_time_reads_the_page_not_the_account(db, tenant):
    """Its number of groups counted every message of the account (0.23 s a page at 3M messages,
    growing with the account): they are the account's sends, which the rollup has summed. With
    the page read off the primary key in order (as the planner does for a big account; here
    sorting is ruled out to make it choose so), a page of 10 reads a few rows of messages."""
    n = 3000
    mids = sorted(ids.message_id() for _ in range(n))
    t0 = datetime(2026, 2, 1, 8, 0, tzinfo=UTC)
    async with db.acquire() as conn:
        await conn.copy_records_to_table(
            "messages", columns=("id", "account_id", "list_id", "to_phone", "body", "sent_at"),
            records=[(m, tenant.account_id, tenant.list_id, "+14155550100", "x", t0 + timedelta(hours=i))
                     for i, m in enumerate(mids)],
        )
        await conn.execute("ANALYZE messages")
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_sort = off")
            before = await _messages_rows_read(conn)
            rows = await conn.fetch(report_page("message", all_time=True), tenant.account_id, None, None, 10, 0)
            read = await _messages_rows_read(conn) - before
    assert [r["key"] for r in rows] == mids[:10]
    assert {(r["sends"], r["total_groups"], r["total_sends"]) for r in rows} == {(1, n, n)}
    assert read < n // 2, read


async def test_a_report_is_not_compiled(api, tenant, monkeypatch):
    """A plan costed above jit_above_cost is compiled before it runs (50-200 ms), which a report,
    reading a page's rows and a rollup, never earned back; and without statistics any plan may be
    costed so. A report's statement runs with JIT off (here one that says so)."""
    from services.gateway.routes import reports

    monkeypatch.setattr(reports, "report_page", lambda *args, **kwargs: (
        "SELECT current_setting('jit') AS key, 0 AS sends, 0 AS clicks, 0 AS conversions, 0 AS revenue,"
        " 1 AS total_groups, 0 AS total_sends, 0 AS total_clicks, 0 AS total_conversions, 0 AS total_revenue"
        " WHERE $1::bigint > 0 AND $2::timestamptz IS NULL AND $3::timestamptz IS NULL AND $4::bigint > 0"
        " AND $5::bigint >= 0"))
    resp = await api.get("/api/v2/reports/performance", headers=tenant.headers, params={"group_by": "offer"})
    assert resp.status_code == 200, resp.text
    assert [r["key"] for r in resp.json()["rows"]] == ["off"]
