"""The click drainer and /history/clicks take the same rows in one order, whatever the database's
collation: on a database whose default collation is not byte order (PostgreSQL's Docker image,
which deploy/compose.yaml uses, makes en_US.utf8 databases), the two sorted message ids apart."""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from services.gateway.app import create_app
from services.worker import clicks as drainer
from shared import db as shared_db
from shared.migrate import migrate
from tests.helpers import make_offer, make_tenant


async def _blocked_by(db, pid: int) -> None:
    for _ in range(300):
        if await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"nobody waits on {pid}")


async def _blocked_by_both(db, waiter: int, holder: int, drain: int) -> None:
    """Until ``waiter`` waits on ``holder`` and someone waits on ``drain``."""
    for _ in range(300):
        if await db.fetchval("SELECT $2 = ANY(pg_blocking_pids($1))", waiter, holder) and await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", drain):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never both waiting")


@pytest.fixture
async def en_us(settings, db):
    """A database whose default collation orders "a" before "B" (en-US), migrated."""
    name = f"trackly_en_us_{secrets.token_hex(4)}"
    try:
        await db.execute(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
                         " LOCALE 'C.UTF-8'")
    except asyncpg.PostgresError as exc:  # (PostgreSQL before 15, or built without ICU)
        pytest.skip(f"no ICU database here: {exc}")
    try:
        dsn = settings.database_url.rsplit("/", 1)[0] + f"/{name}"
        await migrate(dsn)
        yield replace(settings, database_url=dsn)
    finally:
        await db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.parametrize("turn", range(3))
async def test_a_keyed_history_click_import_and_a_drain_on_the_same_messages_both_succeed(en_us, turn):
    """A drain stores first clicks (message_clicks) in message id order byte by byte (its ids are
    COLLATE "C" columns), /history/clicks in the order of the database's collation (its ids were
    plain text): on an en-US database, "a..." before "B..." for one, after for the other. The two
    deadlocked on them, and the import went record by record in its key's transaction, each
    record's message_clicks row then its contact, while the drain held the other message's
    row and came to that contact: a second deadlock, a save_error, and the import answered 500.

    Made certain: a transaction holds a third message's first click (between the two, byte by
    byte) until both wait, and another a contact the drain takes first, until the import has come
    round to the drain's rows record by record. (Before the fix: 500 save_error, three goes of three.)"""
    app = create_app(en_us)
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as api:
        pool = await shared_db.create_pool(en_us.database_url, max_size=3)
        conns: list[asyncpg.Connection] = []
        try:
            tenant = await make_tenant(pool)
            offer = await make_offer(api, tenant)
            tag = secrets.token_hex(2)
            ids = {"B": f"B{tag}001", "Q": f"Q{tag}001", "a": f"a{tag}001", "X": f"X{tag}001"}
            phones = {"B": "+14155550101", "Q": "+14155550102", "a": "+14155550103", "X": "+14155550103"}  # X: a's contact
            for k, mid in ids.items():
                await pool.execute("INSERT INTO contacts (account_id, list_id, phone_number) VALUES ($1, $2, $3)"
                                   " ON CONFLICT DO NOTHING", tenant.account_id, tenant.list_id, phones[k])
                await pool.execute("INSERT INTO messages (id, account_id, list_id, to_phone, body, sent_at)"
                                   " VALUES ($1, $2, $3, $4, 'hi', now() - interval '1 day')",
                                   mid, tenant.account_id, tenant.list_id, phones[k])
            now = datetime.now(UTC)
            edge = [{"id": f"e{tag}{k}", "a": tenant.account_id, "l": None, "o": offer["id"], "li": tenant.list_id,
                     "m": ids[k], "at": now, "ip": None, "ua": None, "cc": None, "bot": False, "q": {}}
                    for k in ("B", "Q", "a")]
            history = [{"message_id": ids[k], "offer_id": offer["id"], "phone_number": phones[k],
                        "timestamp": (now - timedelta(hours=1)).isoformat()} for k in ("X", "a", "B")]
            holder, contact_holder, drain = conns = [await shared_db.connect(en_us.database_url) for _ in range(3)]
            await holder.execute("BEGIN")
            await holder.execute("INSERT INTO message_clicks (message_id, click_id, account_id, clicked_at)"
                                 " VALUES ($1, 'held', $2, now())", ids["Q"], tenant.account_id)
            await contact_holder.execute("BEGIN")
            await contact_holder.execute("SELECT 1 FROM contacts WHERE list_id = $1 AND phone_number = $2 FOR UPDATE",
                                         tenant.list_id, phones["B"])

            async def drain_batch() -> None:
                async with drain.transaction():
                    await drainer.store(drain, edge)

            drained = asyncio.ensure_future(drain_batch())
            await _blocked_by(pool, holder.get_server_pid())  # the drain, on the third message
            imported = asyncio.ensure_future(api.post(
                "/api/v2/history/clicks", json={"records": history},
                headers={**tenant.headers, "Idempotency-Key": f"clicks-{tag}"}))
            await _blocked_by(pool, drain.get_server_pid())  # the import, on the drain
            await holder.execute("ROLLBACK")
            await _blocked_by_both(pool, drain.get_server_pid(), contact_holder.get_server_pid(), drain.get_server_pid())
            await contact_holder.execute("ROLLBACK")
            answer, drain_error = await asyncio.wait_for(asyncio.gather(imported, drained, return_exceptions=True), 60)
        finally:
            for conn in conns:
                await conn.close()
            await pool.close()
    assert not isinstance(answer, BaseException), answer
    assert answer.status_code == 200, answer.text
    assert drain_error is None, drain_error  # (a drain that fails goes again, later)
    body = answer.json()
    assert body["error_count"] == 0 and body["success_count"] + body["duplicates_skipped"] == 3, body
