"""Reports on a big account: what each report reads must follow its page and range, not the
account. Checked on plans and on rows read, never on time (tests/worker/test_batch_plans.py does
the same for the worker's batches)."""
from __future__ import annotations

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
