"""Concurrent writers that take the same rows: each in one order, so that none waits crosswise."""
from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.helpers import lock_waiters, row_held

N = 40
HELD = N // 2


@pytest.mark.parametrize("turn, held_ends", [(0, "rollback"), (1, "commit"), (2, "commit"), (3, "commit")])
async def test_concurrent_keyed_history_sends_naming_the_same_message_ids_in_opposite_orders_both_succeed(
    api, db, settings, tenant, turn, held_ends
):
    """Two /history/sends imports under different Idempotency-Keys (each one transaction) give
    the same message ids in opposite orders, to a contact the account has already (so the
    contacts statement, in key order, does not put one behind the other), while a third import
    stores one of those ids. Made certain rather than rare: the third transaction holds the
    middle id until both imports wait on it, each with its own half inserted, then commits.

    Both batches then fail on that id and go record by record, each in its own order, holding
    every row it stores in its key's transaction: they met in the middle, each waiting on a row
    the other held, and PostgreSQL broke a deadlock about once a second, every one a save_error.
    Both requests answered 500 save_error after 16-20 s (three goes of three). Stored in message
    id order, one waits for the other, then skips what it stored.
    (Before, when the third transaction rolled back instead, the two deadlocked once, 1 s, and the one
    PostgreSQL aborted found every record stored by the other: no error.)"""
    phone = "+14155550199"
    first = await api.post("/api/v2/send", headers=tenant.headers,
                           json={"to": phone, "list_id": tenant.list_id, "body": "hi"})
    assert first.status_code == 201, first.text
    records = [{"to": phone, "list_id": tenant.list_id, "body": f"b{i}", "message_id": f"lock{turn}{i:03d}",
                "timestamp": "2026-01-02T00:00:00Z"} for i in range(N)]
    held_id = records[HELD]["message_id"]
    async with row_held(
        settings.database_url, "INSERT INTO messages (id, account_id, list_id, to_phone, body, sent_at, source)"
        " VALUES ($1, $2, $3, $4, 'x', now(), 'history')", held_id, tenant.account_id, tenant.list_id, phone,
    ) as held:

        def start(n: int, batch: list[dict]) -> asyncio.Future:
            return asyncio.ensure_future(api.post(
                "/api/v2/history/sends", json={"records": batch},
                headers={**tenant.headers, "Idempotency-Key": f"sends-{turn}-{n}"}))

        imports = [start(1, records[::-1])]
        await lock_waiters(db, 1)
        imports.append(start(0, records))
        await lock_waiters(db, 2)
        await (held.rollback() if held_ends == "rollback" else held.commit())
        answers = await asyncio.wait_for(asyncio.gather(*imports), 120)
    assert [a.status_code for a in answers] == [200, 200], [a.text[:300] for a in answers]
    bodies = [a.json() for a in answers]
    stored = N - (held_ends == "commit")  # the one the third transaction committed is a duplicate to both
    assert sum(b["success_count"] for b in bodies) == stored, bodies  # each stored once, by one or the other
    assert all(b["success_count"] + b["duplicates_skipped"] == N and b["error_count"] == 0 for b in bodies), bodies
    assert await db.fetchval(
        "SELECT count(*) FROM messages WHERE account_id = $1 AND id LIKE $2", tenant.account_id, f"lock{turn}%") == N



async def _blocked_by(db, pid: int) -> None:
    """Until a session waits on a lock that ``pid``'s transaction holds."""
    for _ in range(200):
        if await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                             " AND $1 = ANY(pg_blocking_pids(pid))", pid):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"nobody waits on {pid}")


async def _waiter_blocked_by_none_of(db, pids: list[int]) -> None:
    """Until a session waits on a lock held by a session not in ``pids`` (for 2 s at most)."""
    for _ in range(100):
        rows = await db.fetch("SELECT pg_blocking_pids(pid) AS b FROM pg_stat_activity"
                              " WHERE datname = current_database() AND wait_event_type = 'Lock'")
        if any(r["b"] and not set(r["b"]) & set(pids) for r in rows):
            return
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("turn", range(3))
async def test_keyed_history_sends_record_by_record_and_another_import_to_the_same_new_contacts_both_succeed(
    api, db, settings, tenant, turn
):
    """A keyed /history/sends import whose batch failed (an id it gives was stored meanwhile)
    goes record by record in its key's transaction: each record's new contact, then its message.
    Another keyed import of the same records takes all its new contacts first (in number order),
    then its messages. With numbers that go the other way than the ids, the first held the
    contacts of its early records and waited on the next one's, which the second held, while the
    second went on to the first's: PostgreSQL aborted the first's record, a save_error, and the
    first answered 500.

    Made certain: a third transaction commits the first record's id while the first import's batch
    waits on it; a fourth holds the middle record's message while the first goes record by record;
    a fifth holds a contact of the second's, between the two halves, so that the second holds the
    contacts of the late records when the first comes to them, and comes to the first's contacts
    only then. (Before the fix: the first answered 500 save_error in three goes of three.)"""
    n = 20
    records = [{"to": f"+1415{turn}{(n - i) * 10:06d}", "list_id": tenant.list_id, "body": f"b{i}",
                "message_id": f"xo{turn}{i:05d}", "timestamp": "2026-01-02T00:00:00Z"} for i in range(n)]
    between = f"+1415{turn}{(n - n // 2 - 1) * 10 + 5:06d}"  # after the late records' numbers, before the middle one's
    extra = {**records[0], "to": between, "message_id": f"xo{turn}00099"}
    middle = n // 2
    taker, holder, blocker = [await asyncpg.connect(settings.database_url) for _ in range(3)]

    def insert(conn, i: int):
        return conn.execute(
            "INSERT INTO messages (id, account_id, list_id, to_phone, body, sent_at, source)"
            " VALUES ($1, $2, $3, '+14150000000', 'x', now(), 'history')",
            records[i]["message_id"], tenant.account_id, tenant.list_id)

    def start(n: int, batch: list[dict]) -> asyncio.Future:
        return asyncio.ensure_future(api.post(
            "/api/v2/history/sends", json={"records": batch},
            headers={**tenant.headers, "Idempotency-Key": f"xo-{turn}-{n}"}))

    try:
        taken, held, blocked = taker.transaction(), holder.transaction(), blocker.transaction()
        for t in (taken, held, blocked):
            await t.start()
        await insert(taker, 0)
        await insert(holder, middle)
        await blocker.execute("INSERT INTO contacts (account_id, list_id, phone_number) VALUES ($1, $2, $3)",
                              tenant.account_id, tenant.list_id, between)
        imports = [start(0, records)]
        await _blocked_by(db, taker.get_server_pid())  # its batch, on the first id
        await taken.commit()
        await _blocked_by(db, holder.get_server_pid())  # record by record, on the middle one
        imports.append(start(1, records + [extra]))
        await lock_waiters(db, 2)  # the second, holding the late records' contacts, on the fifth (or on the first)
        await held.rollback()
        await _waiter_blocked_by_none_of(db, [blocker.get_server_pid(), holder.get_server_pid()])  # one on the other
        await blocked.rollback()
        answers = await asyncio.wait_for(asyncio.gather(*imports), 120)
    finally:
        for conn in (taker, holder, blocker):
            await conn.close()
    assert [a.status_code for a in answers] == [200, 200], [a.text[:300] for a in answers]
    bodies = [a.json() for a in answers]
    assert sum(b["success_count"] for b in bodies) == n, bodies  # the first id is the third's; one extra
    assert all(b["error_count"] == 0 for b in bodies), bodies
    # No contact for the record not stored (the third's message went to another number), and the
    # list's size counts the contacts there are.
    contacts = await db.fetchval("SELECT count(*) FROM contacts WHERE list_id = $1 AND phone_number = ANY($2::text[])",
                                 tenant.list_id, [r["to"] for r in records + [extra]])
    assert contacts == n
    assert not await db.fetchval("SELECT count(*) FROM contacts WHERE list_id = $1 AND phone_number = $2",
                                 tenant.list_id, records[0]["to"])
    assert await db.fetchval("SELECT sum(contacts) FROM list_contact_counts WHERE list_id = $1", tenant.list_id) == \
        await db.fetchval("SELECT count(*) FROM contacts WHERE list_id = $1", tenant.list_id)
