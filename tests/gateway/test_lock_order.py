"""Concurrent writers that take the same rows: each in one order, so that none waits crosswise."""
from __future__ import annotations

import asyncio

import asyncpg
import pytest

N = 40
HELD = N // 2


async def _lock_waiters(db, n: int) -> None:
    """Until ``n`` sessions of this database wait on a lock (asked outside any transaction:
    pg_stat_activity is a snapshot per transaction)."""
    for _ in range(200):
        if await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                             " AND wait_event_type = 'Lock'") == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {n} sessions waiting")


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
    holder = await asyncpg.connect(settings.database_url)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute(
            "INSERT INTO messages (id, account_id, list_id, to_phone, body, sent_at, source)"
            " VALUES ($1, $2, $3, $4, 'x', now(), 'history')", held_id, tenant.account_id, tenant.list_id, phone)

        def start(n: int, batch: list[dict]) -> asyncio.Future:
            return asyncio.ensure_future(api.post(
                "/api/v2/history/sends", json={"records": batch},
                headers={**tenant.headers, "Idempotency-Key": f"sends-{turn}-{n}"}))

        imports = [start(1, records[::-1])]
        await _lock_waiters(db, 1)
        imports.append(start(0, records))
        await _lock_waiters(db, 2)
        await (held.rollback() if held_ends == "rollback" else held.commit())
        answers = await asyncio.wait_for(asyncio.gather(*imports), 120)
    finally:
        await holder.close()
    assert [a.status_code for a in answers] == [200, 200], [a.text[:300] for a in answers]
    bodies = [a.json() for a in answers]
    stored = N - (held_ends == "commit")  # the one the third transaction committed is a duplicate to both
    assert sum(b["success_count"] for b in bodies) == stored, bodies  # each stored once, by one or the other
    assert all(b["success_count"] + b["duplicates_skipped"] == N and b["error_count"] == 0 for b in bodies), bodies
    assert await db.fetchval(
        "SELECT count(*) FROM messages WHERE account_id = $1 AND id LIKE $2", tenant.account_id, f"lock{turn}%") == N
