"""Migrations: applied once, recorded, safe to run twice and concurrently."""
import asyncio
import contextlib
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from services.gateway.app import create_app
from shared import migrate as migrate_module
from shared.accounts import create_account, forget_postback_tokens, rotate_postback_token
from shared.migrate import _migrations, migrate
from tests.helpers import report_strays_and_the_events, scratch_database


async def test_migrations_are_recorded_and_idempotent(settings, db):
    versions = [v for v, _ in _migrations()]
    recorded = [r["version"] for r in await db.fetch("SELECT version FROM schema_migrations ORDER BY version")]
    assert recorded == versions
    assert await migrate(settings.database_url) == []


async def test_concurrent_migrations_on_a_fresh_database(settings, db):
    async with scratch_database(settings, db, "trackly_migrate_race") as dsn:
        results = await asyncio.gather(*(migrate(dsn) for _ in range(4)))
        applied = [r for r in results if r]
        assert len(applied) == 1 and applied[0] == [v for v, _ in _migrations()]
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(_migrations())
        finally:
            await conn.close()


async def test_references_to_message_and_link_ids_compare_as_the_ids_do(db):
    """messages.id and links.id are COLLATE "C": a column that refers to them must be too, or a
    join on the two cannot use the referring column's index (message detail and the revenue
    offer lookup scanned clicks, revenue, conversions and message_links whole, per message)."""
    rows = await db.fetch(
        "SELECT table_name, column_name, collation_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND data_type = 'text' AND column_name IN ('message_id', 'link_id')"
    )
    assert {r["table_name"] for r in rows} >= {"clicks", "message_clicks", "message_links", "conversions", "revenue"}
    assert [(r["table_name"], r["column_name"]) for r in rows if r["collation_name"] != "C"] == []


async def test_the_revenue_offer_lookup_uses_the_message_links_index(db):
    from services.gateway.routes.revenue import _MESSAGES

    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")  # tiny test tables: the plan the index allows
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + _MESSAGES, 1, ["abcdefgh"]))
    assert "Index Cond: (message_id = m.id)" in plan and "Filter: (message_id = m.id)" not in plan, plan


async def _plan_without_other_indexes(db, statements: list[str], explain: str, *args: object) -> str:
    """The plan of ``explain`` after ``statements`` (dropping the indexes the planner might prefer)
    and with sequential scans off, in a transaction rolled back: whether an index serves it at all."""
    conn = await db.acquire()
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("SET LOCAL enable_seqscan = off")
            return "\n".join(r[0] for r in await conn.fetch(explain, *args))
        finally:
            await tx.rollback()
    finally:
        await db.release(conn)


async def test_a_history_click_import_finds_waiting_conversions_by_their_index(db):
    """/history/clicks looks for conversions waiting for the messages it stored a first click of;
    message ids are COLLATE "C" and conversions.click_id is not: compared in "C", the lookup could
    not use conversions_click and read every waiting conversion of every account, per import."""
    from services.gateway.routes.history import _STORE_CLICKS

    # Whether it can use that index at all (which the planner prefers depends on the other tests' data).
    plan = await _plan_without_other_indexes(
        db, ["DROP INDEX conversions_account_at, conversions_contact",
             "ALTER TABLE conversions DROP CONSTRAINT conversions_account_id_network_conversion_key_key",
             "SET LOCAL enable_bitmapscan = off"],
        "EXPLAIN " + _STORE_CLICKS, 1, ["abcdefgh"], ["h0"], [None], [datetime(2026, 1, 1, tzinfo=UTC)], [1], ["+1"],
    )
    lookup = plan.partition("conversions_click")[2].splitlines()
    assert len(lookup) > 1 and lookup[1].strip().startswith("Index Cond: (click_id = "), plan


async def test_the_postback_log_finds_a_state_by_its_index(db):
    """GET /postbacks?state= filters on an expression: an index on that same expression can find
    a rare state (failed, pending) without walking every postback of every account. (Which index
    the planner prefers depends on the data; here the other indexes led by account_id are dropped,
    in a transaction rolled back, to see that this one serves the expression at all.)"""
    from services.gateway.routes.postback_log import _STATE

    plan = await _plan_without_other_indexes(
        db, ["DROP INDEX postbacks_by_account, postbacks_conversion_latest"],
        f"EXPLAIN SELECT count(*) FROM postbacks p WHERE p.account_id = $1 AND {_STATE} = $2", 1, "failed",
    )
    assert "postbacks_account_state" in plan and "Filter" not in plan, plan


async def _migrate_before(conn: asyncpg.Connection, version: str) -> None:
    """Apply the migrations before ``version``, as the runner would."""
    await conn.execute("CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
    for name, sql in _migrations():
        if name >= version:
            break
        await conn.execute(sql)
        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", name)


async def test_a_migration_waiting_for_a_lock_gives_way_and_tries_again(settings, db, monkeypatch):
    """0013 drops revenue's foreign key to messages, which locks messages: while a long read holds
    messages, the migration keeps giving up its place in the lock queue (reads of accounts, which
    0012 locked, are not held at all), and it is applied once the read ends."""
    monkeypatch.setattr(migrate_module, "LOCK_TIMEOUT", 0.2)
    monkeypatch.setattr(migrate_module, "LOCK_RETRY_PAUSE", 0.1)
    async with scratch_database(settings, db, "trackly_migrate_locks") as dsn:
        setup, reader, other = [await asyncpg.connect(dsn) for _ in range(3)]
        running: asyncio.Task | None = None
        try:
            await _migrate_before(setup, "0013")
            long_read = reader.transaction()
            await long_read.start()
            await reader.fetchval("SELECT count(*) FROM messages")
            running = asyncio.create_task(migrate(dsn))
            await asyncio.sleep(1.0)
            assert not running.done()
            await asyncio.wait_for(other.fetchval("SELECT count(*) FROM accounts"), 0.5)
            await asyncio.wait_for(other.fetchval("SELECT count(*) FROM messages"), 0.5)  # between two tries
            await long_read.rollback()
            assert await asyncio.wait_for(running, 5) == [v for v, _ in _migrations() if v >= "0013"]
            fks = await setup.fetchval("SELECT count(*) FROM pg_constraint WHERE conrelid = 'revenue'::regclass AND contype = 'f'")
            assert fks == 0
        finally:
            if running is not None and not running.done():
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
            for conn in (setup, reader, other):
                await conn.close()


async def test_a_migration_that_never_gets_its_lock_fails_unrecorded(settings, db, monkeypatch):
    monkeypatch.setattr(migrate_module, "LOCK_TIMEOUT", 0.1)
    monkeypatch.setattr(migrate_module, "LOCK_RETRY_PAUSE", 0.05)
    monkeypatch.setattr(migrate_module, "LOCK_ATTEMPTS", 3)
    async with scratch_database(settings, db, "trackly_migrate_nolock") as dsn:
        setup, reader = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            await _migrate_before(setup, "0013")
            async with reader.transaction():
                await reader.fetchval("SELECT count(*) FROM messages")
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await migrate(dsn)
            assert await setup.fetchval("SELECT max(version) FROM schema_migrations") < "0013"
        finally:
            await setup.close()
            await reader.close()


async def test_list_contact_counts_start_from_the_contacts_already_stored(settings, db):
    """Migration 0010 on a database that has contacts: each list's count starts at its contacts."""
    async with scratch_database(settings, db, "trackly_migrate_counts") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await _migrate_before(conn, "0010")
            await conn.execute(
                "INSERT INTO contacts (account_id, list_id, phone_number)"
                " SELECT 1, l, '+1415555' || lpad(i::text, 4, '0') FROM generate_series(1, 2) l, generate_series(1, 3 * l) i")
            assert "0010_list_contact_counts" in await migrate(dsn)
            counts = await conn.fetch("SELECT list_id, sum(contacts) AS n FROM list_contact_counts GROUP BY list_id ORDER BY 1")
            assert [(r["list_id"], r["n"]) for r in counts] == [(1, 3), (2, 6)]
        finally:
            await conn.close()


async def test_money_goes_exact_without_reading_its_tables_under_the_exclusive_lock(settings, db):
    """0022 drops the money columns' scale on a database with revenue and offers stored: no table
    is read under its ACCESS EXCLUSIVE lock (a type change checks the column's CHECK constraints
    again, a read of every row: they are dropped and put back NOT VALID); 0023 validates them."""
    async with scratch_database(settings, db, "trackly_migrate_money") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await _migrate_before(conn, "0022")
            account = await conn.fetchval(
                "INSERT INTO accounts (name, api_key_hash, postback_token) VALUES ('a', 'h', 't') RETURNING id")
            await conn.execute(
                "INSERT INTO revenue (id, account_id, message_id, amount, attribution_type, occurred_at)"
                " SELECT md5(g::text), $1, 'm' || g, 1.25, 'sale', $2 FROM generate_series(1, 5000) g",
                account, datetime(2026, 1, 1, tzinfo=UTC))
            await conn.execute(
                "INSERT INTO offers (id, account_id, name, destination_url, payout)"
                " SELECT substr(md5(g::text), 1, 24), $1, 'o', 'https://example.com/', 2 FROM generate_series(1, 100) g",
                account)
            sql = dict(_migrations())["0022_money_exact"]
            async with conn.transaction():
                scans = "SELECT sum(seq_scan) FROM pg_stat_xact_user_tables WHERE relname IN ('revenue', 'offers')"
                before = await conn.fetchval(scans)
                await conn.execute(sql)
                assert await conn.fetchval(scans) == before
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ('0022_money_exact')")
            with pytest.raises(asyncpg.CheckViolationError):  # not valid yet, and enforced all the same
                await conn.execute("UPDATE revenue SET amount = -1 WHERE id = md5('1')")
            assert (await migrate(dsn))[0] == "0023_money_checks_validated"
            validated = await conn.fetch(
                "SELECT conname, convalidated FROM pg_constraint WHERE conname IN ('revenue_amount_check', 'offers_payout_check')")
            assert sorted((r["conname"], r["convalidated"]) for r in validated) == [
                ("offers_payout_check", True), ("revenue_amount_check", True)]
            types = await conn.fetch(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attname IN ('amount', 'payout')"
                " AND attrelid IN ('revenue'::regclass, 'offers'::regclass, 'conversions'::regclass,"
                " 'conversion_adjustments'::regclass, 'postbacks'::regclass)")
            assert [r[0] for r in types] == ["numeric"] * 5
            assert await conn.fetchval("SELECT sum(amount) FROM revenue") == 6250
        finally:
            await conn.close()


async def test_bulk_written_tables_carry_no_foreign_keys(db):
    """The tables bulk requests and the click drainer write 1000s of rows into at once check
    their references in code (README): a foreign key's per-row trigger doubled the revenue insert."""
    rows = await db.fetch(
        "SELECT conrelid::regclass::text AS tbl, conname FROM pg_constraint WHERE contype = 'f'"
        " AND conrelid::regclass::text = ANY($1::text[])",
        ["messages", "message_links", "contacts", "clicks", "message_clicks", "revenue", "list_contact_counts"],
    )
    assert [(r["tbl"], r["conname"]) for r in rows] == []


async def test_contacts_leave_room_for_their_click_updates(db):
    options = await db.fetchval("SELECT reloptions FROM pg_class WHERE oid = 'contacts'::regclass")
    assert "fillfactor=85" in (options or [])


async def test_the_report_rollup_starts_from_the_events_already_stored(settings, db):
    """Migration 0016 on a database with events of every kind: each rollup report is the events'."""
    async with scratch_database(settings, db, "trackly_migrate_rollup") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await _migrate_before(conn, "0016")
            await conn.execute(_EVENTS_OF_EVERY_KIND)
            assert "0016_report_rollup" in await migrate(dsn)
            await _assert_rollup_is_the_events(conn)
        finally:
            await conn.close()


# Account 1's events of every kind, in a database migrated up to before 0016.
_EVENTS_OF_EVERY_KIND = """
INSERT INTO accounts (id, name, api_key_hash, postback_token) VALUES (1, 'a', 'h', 't');
INSERT INTO messages (id, account_id, list_id, to_phone, body, offer_id, creative_id, schedule_id, sent_at)
SELECT 'm' || lpad(i::text, 7, '0'), 1, 1 + i % 2, '+1415555' || lpad(i::text, 4, '0'), 'x',
       'o' || i % 3, CASE WHEN i % 4 > 0 THEN 'c' || i % 2 END, 's' || i % 5,
       timestamptz '2026-03-01 10:00Z' + i * interval '7 hours'
FROM generate_series(1, 60) i;
INSERT INTO message_clicks (message_id, click_id, account_id, offer_id, clicked_at)
SELECT id, 'k' || id, 1, CASE WHEN right(id, 1) = '3' THEN 'o9' END, sent_at + interval '20 hours'
FROM messages WHERE right(id, 1) IN ('1', '3', '5');
INSERT INTO conversions (account_id, network, conversion_key, click_id, status, payout, converted_at,
                         offer_id, attributed, message_id, creative_id, schedule_id, list_id)
SELECT 1, 'default', 'v' || m.id, mc.click_id, CASE right(m.id, 1) WHEN '1' THEN 'approved' WHEN '3' THEN 'pending' ELSE 'reversed' END,
       2, mc.clicked_at + interval '1 day', m.offer_id, true, m.id, m.creative_id, m.schedule_id, m.list_id
FROM message_clicks mc JOIN messages m ON m.id = mc.message_id;
INSERT INTO conversion_adjustments (conversion_id, from_status, to_status, amount)
SELECT id, NULL, 'approved', 2 FROM conversions;
INSERT INTO conversion_adjustments (conversion_id, from_status, to_status, amount)
SELECT id, 'approved', 'reversed', -2 FROM conversions WHERE status = 'reversed';
INSERT INTO revenue (id, account_id, message_id, offer_id, amount, attribution_type, occurred_at)
SELECT md5(id), 1, id, CASE WHEN right(id, 1) = '2' THEN 'o7' END, 1.5, 'sale', sent_at + interval '2 days'
FROM messages WHERE right(id, 1) IN ('2', '4');
"""


@contextlib.asynccontextmanager
async def _before_the_rollup(settings, db, name: str) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """(dsn, a connection to it): a scratch database migrated up to before 0016, with events."""
    async with scratch_database(settings, db, name) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await _migrate_before(conn, "0016")
            await conn.execute(_EVENTS_OF_EVERY_KIND)
            yield dsn, conn
        finally:
            await conn.close()


async def _assert_rollup_is_the_events(conn: asyncpg.Connection) -> None:
    from services.gateway.attribution_sql import ROLLUP_KEYS, report_page

    for group_by in ROLLUP_KEYS:
        rolled, summed = [
            [dict(r) for r in await conn.fetch(report_page(group_by, from_events=e), 1, None, None, 1000, 0)]
            for e in (False, True)
        ]
        assert rolled == summed and len(rolled) > 1, group_by


async def _write_events(dsn: str) -> None:
    """A send and a status move, from another connection, each within a second: nothing holds them."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET statement_timeout = '1s'")  # a connection of its own, closed below
        await conn.execute(
            "INSERT INTO messages (id, account_id, list_id, to_phone, body, offer_id, sent_at)"
            " SELECT 'late' || i, 1, 1, '+14155550000', 'x', 'o1', timestamptz '2026-03-02 10:00Z' FROM generate_series(1, 5) i")
        await conn.execute("UPDATE conversions SET status = 'approved' WHERE status = 'pending'")
    finally:
        await conn.close()


async def test_writes_go_on_while_the_rollup_is_backfilled_and_count_once(settings, db, monkeypatch):
    """The backfill runs after the triggers' DDL has committed, on the snapshot taken under its
    locks: writes made meanwhile are not held, and are counted by the triggers, not again by it;
    until it commits, the version is not recorded (reports sum the events)."""
    async with _before_the_rollup(settings, db, "trackly_migrate_backfill") as (dsn, conn):

        async def meanwhile(version: str) -> None:
            if version != "0016_report_rollup":
                return  # (0029's backfill: test_writes_go_on_while_the_strays_are_backfilled_and_count_once)
            assert not await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version = $1", version)
            await _write_events(dsn)

        monkeypatch.setattr(migrate_module, "before_backfill", meanwhile)
        assert "0016_report_rollup" in await migrate(dsn)
        assert await conn.fetchval("SELECT count(*) FROM messages WHERE id LIKE 'late%'") == 5
        await _assert_rollup_is_the_events(conn)


async def _assert_strays_are_the_events(conn: asyncpg.Connection) -> None:
    """Reports by message over ranges of days (strays: messages sent before or after the range
    with an event in it) are the events', and report_strays holds each event once."""
    from services.gateway.attribution_sql import report_page

    day = lambda n: datetime(2026, 3, 1, tzinfo=UTC) + timedelta(days=n)  # noqa: E731
    ranges = [(day(n), day(n + 1)) for n in range(20)] + [(day(2), day(5)), (None, day(4)), (day(9), None)]
    strays = 0
    for start, end in ranges:
        kept, summed = [[dict(r) for r in await conn.fetch(report_page("message", from_events=e), 1, start, end, 1000, 0)]
                        for e in (False, True)]
        assert kept == summed, (start, end)
        strays += sum(r["sends"] == 0 and r["key"] is not None for r in kept)
    assert strays > 20, strays
    kept, events = await report_strays_and_the_events(conn, 1)
    assert kept == events and len(kept) > 20


async def test_writes_go_on_while_the_strays_are_backfilled_and_count_once(settings, db, monkeypatch):
    """Migration 0029 fills report_strays from the events already stored, on the snapshot taken
    under its triggers' locks, as 0016 does the rollup: events written during the backfill (a first
    click and a revenue record days after their sends, a conversion moved to another message) are
    counted by the triggers, not again by it; every report by message over a range is the events'."""
    async with _before_the_rollup(settings, db, "trackly_migrate_strays") as (dsn, conn):

        async def meanwhile(version: str) -> None:
            if version != "0029_report_strays":
                return
            writer = await asyncpg.connect(dsn)
            try:
                await writer.execute("SET statement_timeout = '1s'")
                await writer.execute(
                    "INSERT INTO message_clicks (message_id, click_id, account_id, clicked_at)"
                    " VALUES ('m0000004', 'late-click', 1, timestamptz '2026-03-09 08:00Z')")
                await writer.execute(
                    "INSERT INTO revenue (id, account_id, message_id, amount, attribution_type, occurred_at)"
                    " VALUES ('late-revenue', 1, 'm0000006', 2, 'sale', timestamptz '2026-03-09 09:00Z'),"
                    " ('late-revenue-2', 1, 'm0000006', 1, 'send', timestamptz '2026-03-09 10:00Z')")
                await writer.execute("UPDATE conversions SET message_id = 'm0000008' WHERE message_id = 'm0000011'")
            finally:
                await writer.close()

        monkeypatch.setattr(migrate_module, "before_backfill", meanwhile)
        assert "0029_report_strays" in await migrate(dsn)
        assert await conn.fetchval("SELECT count(*) FROM conversions WHERE message_id = 'm0000008'") == 1
        await _assert_strays_are_the_events(conn)


async def test_a_backfill_that_fails_is_done_again_from_the_start(settings, db, monkeypatch):
    async with _before_the_rollup(settings, db, "trackly_migrate_refill") as (dsn, conn):

        async def fail(version: str) -> None:
            raise RuntimeError("the backfill's connection died")

        monkeypatch.setattr(migrate_module, "before_backfill", fail)
        with pytest.raises(RuntimeError):
            await migrate(dsn)
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") < "0016"
        await _write_events(dsn)  # counted by the triggers of the failed attempt
        assert await conn.fetchval("SELECT count(*) FROM report_rollup") > 0
        monkeypatch.setattr(migrate_module, "before_backfill", _no_pause)
        assert "0016_report_rollup" in await migrate(dsn)
        await _assert_rollup_is_the_events(conn)


async def _no_pause(version: str) -> None:
    pass


async def test_a_write_in_flight_when_the_migration_starts_is_counted_once(settings, db):
    """The snapshot is taken once the DDL holds its locks: a revenue record inserted before, and
    committed while the migration waits for its lock on revenue, is in the backfill."""
    async with _before_the_rollup(settings, db, "trackly_migrate_inflight") as (dsn, conn):
        writer = await asyncpg.connect(dsn)
        try:
            async with writer.transaction():
                await writer.execute(
                    "INSERT INTO revenue (id, account_id, message_id, amount, attribution_type, occurred_at)"
                    " VALUES ('inflight', 1, 'm0000001', 9.5, 'sale', timestamptz '2026-03-03 08:00Z')")
                running = asyncio.create_task(migrate(dsn))
                await asyncio.sleep(0.5)
                assert not running.done()  # waiting for the writer's lock on revenue
            assert "0016_report_rollup" in await asyncio.wait_for(running, 10)
        finally:
            await writer.close()
        await _assert_rollup_is_the_events(conn)


async def test_a_run_that_lost_its_connection_mid_backfill_is_not_undone(settings, db, monkeypatch):
    """The first run's connection (and with it the migration lock) dies during its backfill; a
    second run waits for that backfill, sees its version, and leaves the rollup alone."""
    async with _before_the_rollup(settings, db, "trackly_migrate_lost") as (dsn, conn):
        second: asyncio.Task | None = None

        async def lose_the_connection(version: str) -> None:
            nonlocal second
            if second is not None:
                return  # the second run's own backfill, if it ever got there
            holder = await conn.fetchval(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                " AND classid::bigint * 4294967296 + objid::bigint = $1", migrate_module._LOCK_ID)
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", holder)
            second = asyncio.create_task(migrate(dsn))
            await asyncio.sleep(0.5)
            assert not second.done()  # waiting for this backfill

        monkeypatch.setattr(migrate_module, "before_backfill", lose_the_connection)
        assert "0016_report_rollup" in await migrate(dsn)
        assert second is not None
        await asyncio.wait_for(second, 10)
        # The first run went on with the migrations after 0016 on a new connection (the second
        # run may have applied them first).
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(_migrations())
        await _write_events(dsn)
        await _assert_rollup_is_the_events(conn)


async def test_a_run_whose_connection_dies_mid_migration_fails_unrecorded(settings, db, monkeypatch):
    """The connection (and the lock) dies inside a migration: the run fails, the migration is rolled
    back and not recorded (an operator's pg_terminate_backend stops it for good), and the next run
    applies it once."""
    slow = ("9999_slow", "CREATE TABLE migrate_slow (n int); SELECT pg_sleep(0.5); INSERT INTO migrate_slow VALUES (1);")
    monkeypatch.setattr(migrate_module, "_migrations", lambda: [*_migrations(), slow])
    async with scratch_database(settings, db, "trackly_migrate_dies") as dsn:
        setup = await asyncpg.connect(dsn)
        try:
            await _migrate_before(setup, "9999")
            running = asyncio.create_task(migrate(dsn))
            for _ in range(100):
                pid = await setup.fetchval("SELECT pid FROM pg_stat_activity WHERE query LIKE 'CREATE TABLE migrate_slow%'")
                if pid is not None:
                    break
                await asyncio.sleep(0.02)
            assert await setup.fetchval("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
                await asyncio.wait_for(running, 10)
            assert await setup.fetchval("SELECT to_regclass('migrate_slow')") is None
            assert await setup.fetchval("SELECT count(*) FROM schema_migrations WHERE version = '9999_slow'") == 0
            assert await migrate(dsn) == ["9999_slow"]
            assert await setup.fetchval("SELECT count(*) FROM migrate_slow") == 1
        finally:
            await setup.close()


async def test_a_conversion_waiting_for_its_click_across_0007_gets_its_offers_payout_when_it_lands(settings, db):
    """Before 0007 nothing recorded whether a postback gave the payout (the worker looked at the
    conversion's postbacks when its click landed). A conversion that waited for its click across
    the upgrade, made from a postback that gave no payout or currency (so 0, USD), gets its click's
    offer's once the click lands, as on a database that had 0007 all along; one whose postback
    gave a payout keeps it, one whose only payout came in a move the status machine refused (a
    pending after its approval) does not."""
    from services.worker import attribution

    async with scratch_database(settings, db, "trackly_migrate_given") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await _migrate_before(conn, "0007")
            # As the worker before 0007 wrote them: two postbacks, their conversions still waiting.
            await conn.execute("""
                INSERT INTO accounts (id, name, api_key_hash, postback_token) VALUES (1, 'a', 'h', 't');
                INSERT INTO lists (id, account_id, name, phone_number) VALUES (1, 1, 'l', '+14155550000');
                INSERT INTO offers (id, account_id, name, destination_url, payout, currency)
                VALUES ('offer7', 1, 'o', 'https://example.com/', 7, 'EUR');
                INSERT INTO messages (id, account_id, list_id, to_phone, offer_id, sent_at)
                VALUES ('msg00001', 1, 1, '+14155550001', 'offer7', timestamptz '2026-03-01 10:00Z');
                INSERT INTO postbacks (account_id, method, params, conversion_key, click_id, status, payout,
                                       currency, converted_at, dedupe_key, processed_at)
                VALUES (1, 'GET', '{}', 'silent', 'k1', 'approved', NULL, NULL, timestamptz '2026-03-01 10:05Z', 'd1', now()),
                       (1, 'GET', '{}', 'given', 'k1', 'approved', 3, 'USD', timestamptz '2026-03-01 10:05Z', 'd2', now()),
                       (1, 'GET', '{}', 'refused', 'k1', 'approved', NULL, NULL, timestamptz '2026-03-01 10:05Z', 'd3', now()),
                       (1, 'GET', '{}', 'refused', 'k1', 'pending', 5, NULL, timestamptz '2026-03-01 10:05Z', 'd4', now());
                INSERT INTO conversions (account_id, network, conversion_key, click_id, status, payout, currency,
                                         converted_at, attributed, unattributed_reason)
                VALUES (1, 'default', 'silent', 'k1', 'approved', 0, 'USD', timestamptz '2026-03-01 10:05Z', false, 'click_not_found'),
                       (1, 'default', 'given', 'k1', 'approved', 3, 'USD', timestamptz '2026-03-01 10:05Z', false, 'click_not_found'),
                       (1, 'default', 'refused', 'k1', 'approved', 0, 'USD', timestamptz '2026-03-01 10:05Z', false, 'click_not_found');
                INSERT INTO conversion_adjustments (conversion_id, postback_id, to_status, amount)
                SELECT c.id, p.id, 'approved', c.payout FROM conversions c
                JOIN postbacks p ON p.conversion_key = c.conversion_key AND p.status = 'approved';
            """)
            assert "0007_conversion_given" in await migrate(dsn)
            await conn.execute(
                "INSERT INTO clicks (id, account_id, message_id, offer_id, list_id, clicked_at)"
                " VALUES ('k1', 1, 'msg00001', 'offer7', 1, timestamptz '2026-03-01 10:01Z')")
            async with conn.transaction():
                assert await attribution.rematch_for_clicks(conn, ["k1"]) == 3
            rows = await conn.fetch(
                "SELECT conversion_key, payout, currency, (SELECT sum(amount) FROM conversion_adjustments a"
                " WHERE a.conversion_id = c.id) AS ledger FROM conversions c ORDER BY conversion_key")
            assert [tuple(r) for r in rows] == [("given", 3, "USD", 3), ("refused", 7, "EUR", 7), ("silent", 7, "EUR", 7)]
        finally:
            await conn.close()


async def test_0021_applies_where_0016_gave_each_trigger_a_function_of_its_own(settings, db, monkeypatch):
    """0016 as first released gave each rollup trigger a function of its own (report_rollup_sends,
    report_rollup_new_clicks...) and had no report_rollup_count, which 0021's triggers call: on a
    database migrated then, 0021 failed (function does not exist) and no later migration could be
    applied. (Here the function is renamed away, its triggers keep it, as such a database has them.)"""
    async with _before_the_rollup(settings, db, "trackly_migrate_first_rollup") as (dsn, conn):
        every = _migrations()
        monkeypatch.setattr(migrate_module, "_migrations", lambda: [m for m in every if m[0] < "0021"])
        assert (await migrate(dsn))[-1] == "0020_offers_by_external_id"
        await conn.execute("ALTER FUNCTION report_rollup_count() RENAME TO report_rollup_sends")
        monkeypatch.setattr(migrate_module, "_migrations", lambda: every)
        assert "0021_rollup_triggers_per_row_lookups" in await migrate(dsn)
        await conn.execute(
            "INSERT INTO message_clicks (message_id, click_id, account_id, clicked_at)"
            " VALUES ('m0000002', 'late', 1, timestamptz '2026-03-04 08:00Z')")
        await _write_events(dsn)
        await _assert_rollup_is_the_events(conn)


async def test_an_applied_migration_edited_since_is_reported(settings, db, monkeypatch, caplog):
    """Each version's checksum is recorded; a file changed after the database applied it (the
    change will never run there) is reported at every run. Versions applied before checksums were
    recorded get theirs at the next run."""
    async with scratch_database(settings, db, "trackly_migrate_checksums") as dsn:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
            assert [(r["version"], r["checksum"]) for r in rows] == [
                (version, migrate_module.checksum(sql)) for version, sql in _migrations()]
            await conn.execute("UPDATE schema_migrations SET checksum = NULL WHERE version = '0003_postback_latest'")
            assert await migrate(dsn) == [] and "changed after" not in caplog.text
            assert await conn.fetchval(
                "SELECT checksum FROM schema_migrations WHERE version = '0003_postback_latest'"
            ) == migrate_module.checksum(dict(_migrations())["0003_postback_latest"])

            every = _migrations()
            edited = [(v, sql + "\nCREATE TABLE edited_after (id int);" if v == "0002_attribution" else sql) for v, sql in every]
            monkeypatch.setattr(migrate_module, "_migrations", lambda: edited)
            assert await migrate(dsn) == []
            assert "migration 0002_attribution was changed after this database applied it" in caplog.text
            assert await conn.fetchval("SELECT to_regclass('edited_after')") is None
        finally:
            await conn.close()


async def test_postback_tokens_stored_in_plain_by_a_release_before_0026_keep_working_as_digests(settings, db):
    """0026 keeps postback tokens as digests. Tokens of accounts from before it (a replaced one in
    its grace period among them) still work after it, and so do those a gateway or CLI of the
    previous release writes in plain during a rolling deploy (the trigger); forget-postback-tokens
    then empties the plaintext columns, and every token still works."""
    async with scratch_database(settings, db, "trackly_migrate_token_digests") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await _migrate_before(conn, "0026")
            old = await conn.fetchval(
                "INSERT INTO accounts (name, api_key_hash, postback_token) VALUES ('old', 'h1', 'tok-old-1') RETURNING id")
            # Rotated by the previous release: tok-rot-1 replaced by tok-rot-2, in its grace period.
            rotated = await conn.fetchval(
                "INSERT INTO accounts (name, api_key_hash, postback_token, previous_postback_token,"
                " previous_postback_token_until) VALUES ('rot', 'h2', 'tok-rot-2', 'tok-rot-1', now() + interval '1 day')"
                " RETURNING id")
            await migrate(dsn)
            app = create_app(replace(settings, database_url=dsn))
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"
            ) as api:

                async def owner(token: str) -> int | None:
                    app.state.postback_tokens = {}  # (a gateway trusts a token it looked up for 30 s)
                    resp = await api.get(f"/postback/{token}", params={"click_id": "c", "conversion_id": secrets.token_hex(4)})
                    if resp.status_code == 401:
                        return None
                    assert resp.status_code == 200, resp.text
                    return await conn.fetchval("SELECT account_id FROM postbacks ORDER BY id DESC LIMIT 1")

                assert [await owner(t) for t in ("tok-old-1", "tok-rot-2", "tok-rot-1", "tok-none")] == [
                    old, rotated, rotated, None]

                # The previous release, still running: an account it creates, a rotation it makes
                # (of an account made by this release too: it copies an empty plaintext column).
                made_old = await conn.fetchval(
                    "INSERT INTO accounts (name, api_key_hash, postback_token) VALUES ('o2', 'h3', 'tok-old-2') RETURNING id")
                made_new = await create_account(conn, "new")
                for account_id, token in ((old, "tok-old-1b"), (made_new["account_id"], "tok-new-b")):
                    await conn.execute(
                        "UPDATE accounts SET previous_postback_token = postback_token, postback_token = $2,"
                        " previous_postback_token_until = now() + make_interval(secs => 3600) WHERE id = $1",
                        account_id, token)
                expected = {"tok-old-2": made_old, "tok-old-1b": old, "tok-old-1": old, "tok-new-b": made_new["account_id"],
                            made_new["postback_token"]: made_new["account_id"], "tok-rot-2": rotated, "tok-rot-1": rotated}
                assert {t: await owner(t) for t in expected} == expected

                assert await forget_postback_tokens(conn) == {"accounts": 4}
                assert await conn.fetchval(
                    "SELECT count(*) FROM accounts WHERE postback_token IS NOT NULL OR previous_postback_token IS NOT NULL") == 0
                assert {t: await owner(t) for t in expected} == expected
                # A rotation by this release after all that: the replaced token in its grace period.
                again = await rotate_postback_token(conn, rotated, grace_hours=1)
                assert [await owner(t) for t in (again["postback_token"], "tok-rot-2", "tok-rot-1")] == [rotated, rotated, None]
        finally:
            await conn.close()


# The previous release's gateway looks a postback token up in the plaintext columns (its query, verbatim).
_PREVIOUS_RELEASE_TOKEN_LOOKUP = """
SELECT id FROM accounts WHERE postback_token = $1
UNION ALL
SELECT id FROM accounts WHERE previous_postback_token = $1 AND previous_postback_token_until > now()
LIMIT 1
"""


async def test_a_rotation_by_this_release_keeps_the_replaced_token_working_on_a_gateway_of_the_previous_one(
        settings, db):
    """During a rolling deploy a gateway of the previous release still runs next to this one's. A
    token from before 0026 that this release's rotate-postback-token replaces is in its grace period:
    it must keep working there too, as the plaintext copies are kept for such a gateway until
    forget-postback-tokens (the rotation emptied both, and that gateway answered 401 to a valid
    token, found by the rolling-upgrade drill). A grace period of 0 still ends it at once there."""
    async with scratch_database(settings, db, "trackly_migrate_token_rotation_mixed") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await _migrate_before(conn, "0026")
            graced, leaked = [await conn.fetchval(
                "INSERT INTO accounts (name, api_key_hash, postback_token) VALUES ($1, $2, $3) RETURNING id",
                name, f"h-{name}".encode(), f"tok-{name}") for name in ("graced", "leaked")]
            await migrate(dsn)

            new_graced = (await rotate_postback_token(conn, graced, grace_hours=1))["postback_token"]
            new_leaked = (await rotate_postback_token(conn, leaked, grace_hours=0))["postback_token"]
            made = await create_account(conn, "made during the deploy")

            def previous_release_finds(token: str):
                return conn.fetchval(_PREVIOUS_RELEASE_TOKEN_LOOKUP, token)

            assert await previous_release_finds("tok-graced") == graced
            assert await previous_release_finds("tok-leaked") is None
            # The tokens this release made while such a gateway may run: a network given one could
            # reach either gateway.
            assert [await previous_release_finds(t) for t in (new_graced, new_leaked, made["postback_token"])] == [
                graced, leaked, made["account_id"]]
            # forget-postback-tokens, once no such gateway runs, empties the copies kept; from then
            # on a new token has none.
            assert await forget_postback_tokens(conn) == {"accounts": 3}
            after = await rotate_postback_token(conn, graced, grace_hours=1)
            later = await create_account(conn, "made after the deploy")
            assert [await previous_release_finds(t) for t in (after["postback_token"], later["postback_token"])] == [None, None]
            assert await conn.fetchval(
                "SELECT count(*) FROM accounts WHERE postback_token IS NOT NULL OR previous_postback_token IS NOT NULL") == 0
        finally:
            await conn.close()
