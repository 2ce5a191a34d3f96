"""Reports on a big account: what each report reads must follow its page and range, not the
account. Checked on plans and on rows read, never on time (tests/worker/test_batch_plans.py does
the same for the worker's batches)."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from services.gateway.attribution_sql import report_page
from shared import ids
from tests.gateway.test_reports import GROUPS, build_history
from tests.helpers import Tenant, make_tenant, table_reads


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
    the page walked off the primary key in order (here the account's messages come first in it,
    as a big account's fill most of any stretch of it), a page of 10 reads a few rows of messages."""
    n = 3000
    mids = sorted("01" + ids.message_id()[2:] for _ in range(n))
    t0 = datetime(2026, 2, 1, 8, 0, tzinfo=UTC)
    async with db.acquire() as conn:
        await conn.copy_records_to_table(
            "messages", columns=("id", "account_id", "list_id", "to_phone", "body", "sent_at"),
            records=[(m, tenant.account_id, tenant.list_id, "+14155550100", "x", t0 + timedelta(hours=i))
                     for i, m in enumerate(mids)],
        )
        await conn.execute("ANALYZE messages")
        async with conn.transaction():
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


T0 = datetime(2026, 2, 1, 8, 0, tzinfo=UTC)
_MID = "$2 || lpad((i * 7919 % 1000000)::text, 6, '0')"  # the i-th message's id: in no relation to its time


async def _history(conn, tenant: Tenant, prefix: str, n: int) -> None:
    """n messages of the tenant a minute apart from T0 (ids: ``prefix`` and six digits), each with
    a first click an hour later, one in three with an approved conversion and its ledger entry two
    hours later, one in five with a revenue record three hours later. (The rollup's triggers count
    them all.)"""
    args = (tenant.account_id, prefix, T0, n)
    await conn.execute(
        "INSERT INTO messages (id, account_id, list_id, to_phone, body, offer_id, sent_at)"
        f" SELECT {_MID}, $1, $5, '+1415' || lpad(i::text, 7, '0'), 'x', 'of1', $3::timestamptz + i * interval '1 minute'"
        " FROM generate_series(0, $4 - 1) i", *args, tenant.list_id)
    await conn.execute(
        "INSERT INTO message_clicks (message_id, click_id, account_id, clicked_at)"
        f" SELECT {_MID}, 'k' || $2 || i, $1, $3::timestamptz + i * interval '1 minute' + interval '1 hour'"
        " FROM generate_series(0, $4 - 1) i", *args)
    await conn.execute(
        "INSERT INTO conversions (account_id, network, conversion_key, status, converted_at, message_id, attributed)"
        f" SELECT $1, 'tune', $2 || i, 'approved', $3::timestamptz + i * interval '1 minute' + interval '2 hours', {_MID},"
        " true FROM generate_series(0, $4 - 1, 3) i", *args)
    await conn.execute(
        "INSERT INTO conversion_adjustments (conversion_id, to_status, amount)"
        " SELECT id, 'approved', 2.5 FROM conversions WHERE account_id = $1", tenant.account_id)
    await conn.execute(
        "INSERT INTO revenue (id, account_id, message_id, amount, attribution_type, occurred_at)"
        f" SELECT 'rv' || $2 || i, $1, {_MID}, 1.25, 'sale', $3::timestamptz + i * interval '1 minute' + interval '3 hours'"
        " FROM generate_series(0, $4 - 1, 5) i", *args)


_SOURCES = ("message_clicks", "conversions", "conversion_adjustments", "revenue")


@contextlib.asynccontextmanager
async def _small_by_statistics(db, tenant: Tenant, prefix: str, n: int) -> AsyncIterator[object]:
    """A connection on which another account's history of 3n messages has been analyzed, then the
    tenant's of n written: statistics that call the tenant small. All in a transaction rolled back
    at the end, statistics included (ANALYZE is transactional): other tests' plans are made from
    their own (conversions analyzed with these rows turned another test's index scan around)."""
    other = await make_tenant(db)
    async with db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await _history(conn, other, "r" + prefix[1], 3 * n)
            for table in ("messages", *_SOURCES):
                await conn.execute(f"ANALYZE {table}")
            await _history(conn, tenant, prefix, n)
            yield conn
        finally:
            await tx.rollback()


async def test_a_page_by_message_reads_its_own_events_when_statistics_call_the_account_small(db, tenant):
    """The page's groups are summed from their own events. Found by the account's indexes and
    joined to the page, they were all the account's events whenever statistics called the account
    small (before ANALYZE has run, every account is): 2.1-2.9 s a page at 3M messages, 1.5M first
    clicks, 90k conversions. Here another account's history is analyzed, then this one's is
    written: a page of 10 reads no more than 10 rows of each source (its own), with no sequential
    scan, and is the page of the events' report."""
    n = 3000
    async with _small_by_statistics(db, tenant, "0a", n) as conn:
        every = [dict(r) for r in await conn.fetch(
            report_page("message", from_events=True), tenant.account_id, None, None, n + 1, 0)]
        for offset in (0, 2000):
            async with conn.transaction():
                await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL jit = off")
                rows, reads = await table_reads(conn, lambda: conn.fetch(
                    report_page("message", all_time=True), tenant.account_id, None, None, 10, offset), *_SOURCES)
            assert [dict(r) for r in rows] == every[offset:offset + 10]
            assert all(scans == 0 and fetched <= 10 for scans, fetched in reads.values()), (offset, reads)


async def test_a_page_by_message_is_walked_or_sorted_whatever_the_statistics(db, tenant):
    """Finding the page, the planner sorted all the messages of the account sent in the range
    whenever statistics called the account small (0.7-1.1 s for a first page over all time at 3M
    messages, ANALYZE never run). The page is walked off the messages' primary key when the
    account has enough of it (here its messages come first in key order, as a big account's fill
    most of any stretch of it): with another account's history analyzed, then this one's written,
    a first page reads offset + limit messages and the page's probes. A page too deep for the walk,
    or that the walk finds too few for, is sorted. Over all time and over a day with strays
    (messages sent the day before with a click, a conversion or a revenue record in it), each page,
    walked or sorted, is the events' report's."""
    n = 3000
    async with _small_by_statistics(db, tenant, "00", n) as conn:
        day = datetime(2026, 2, 2, tzinfo=UTC)
        for start, end, pages in ((None, None, {0: True, 200: True, 2000: False}),
                                  (day, day + timedelta(days=1), {0: True, 10: True, 100: False, 1000: False})):
            every = [dict(r) for r in await conn.fetch(
                report_page("message", from_events=True), tenant.account_id, start, end, n + 1, 0)]
            assert start is None or any(r["sends"] == 0 for r in every[10:20]), "no stray on the second page"
            for offset, walked in pages.items():
                async with conn.transaction():
                    await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL jit = off")
                    sorted_by = (  # messages read but by their key: sequential scans, their other indexes
                        "SELECT pg_stat_get_xact_numscans('messages'::regclass) + (SELECT sum(pg_stat_get_xact_numscans("
                        "indexrelid)) FROM pg_index WHERE indrelid = 'messages'::regclass AND NOT indisprimary)")
                    before = await conn.fetchval(sorted_by)
                    rows, reads = await table_reads(conn, lambda: conn.fetch(
                        report_page("message", all_time=start is None), tenant.account_id, start, end, 10, offset),
                        "messages")
                    sorted_ = await conn.fetchval(sorted_by) > before
                assert [dict(r) for r in rows] == every[offset:offset + 10], (start, offset)
                assert sorted_ == (not walked), (start, offset)
                if start is None and walked:
                    assert reads["messages"][0] == 0 and reads["messages"][1] <= offset + 10 + 30, (offset, reads)


async def test_a_page_by_message_over_a_range_finds_its_strays_without_reading_the_ranges_events(db, tenant):
    """The strays of a range (messages with an event in it, sent outside it) were found by reading
    every first click, conversion and revenue record of the account in the range and the message
    of each: a month of an account with 1M messages among 1.2M hashed every account's messages
    (190 ms of a 200 ms report). They are read from report_strays (migration 0029), the events of
    messages sent another day: over a day, a page of 10 reads no more than 10 rows of each source
    (its own groups'), and each page, strays included, is the events' report's."""
    n = 3000
    async with _small_by_statistics(db, tenant, "0c", n) as conn:
        day = datetime(2026, 2, 2, tzinfo=UTC)
        every = [dict(r) for r in await conn.fetch(
            report_page("message", from_events=True), tenant.account_id, day, day + timedelta(days=1), n + 1, 0)]
        assert sum(r["sends"] == 0 for r in every) >= 60, "too few strays"
        for offset in (0, 10, 1000):
            async with conn.transaction():
                await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL jit = off")
                rows, reads = await table_reads(conn, lambda: conn.fetch(
                    report_page("message"), tenant.account_id, day, day + timedelta(days=1), 10, offset), *_SOURCES)
            assert [dict(r) for r in rows] == every[offset:offset + 10], offset
            assert all(scans == 0 and fetched <= 10 for scans, fetched in reads.values()), (offset, reads)
