"""The worker's batch statements read the big tables by key, whatever their size.

Planned for each statement, a join of a batch (an array of ~1000 ids or keys) with a table had the
planner read the whole table (seq scan and hash) until it held a few hundred thousand rows, so a
batch cost grew with the table instead of with the batch. Here the tables hold a few thousand rows
of the test's own account with fresh statistics, the worker's real code runs in a transaction on a
connection the test holds, and the transaction's statistics must show no seq scan of them; the
results are checked too. (The transaction is rolled back: other tests see none of it.)
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from services.worker import attribution
from tests.helpers import Tenant, table_reads

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
N = 6000
BIG = ("postbacks", "conversions", "clicks", "messages", "message_clicks")


async def _seed(conn: asyncpg.Connection, tenant: Tenant, prefix: str) -> tuple[str, list[str], list[str]]:
    """An offer, N messages with a first human click each, and N processed postbacks with their
    conversions (keys ``<prefix>old<i>``, the first half without a click id, payout not given)."""
    offer = f"{prefix}offer"
    await conn.execute(
        "INSERT INTO offers (id, account_id, name, destination_url, payout, currency)"
        " VALUES ($1, $2, 'o', 'https://x', 5, 'EUR')", offer, tenant.account_id,
    )
    mids = [f"{prefix}{i:06d}" for i in range(N)]
    kids = [f"{prefix}k{i:06d}" for i in range(N)]
    await conn.copy_records_to_table(
        "messages", columns=("id", "account_id", "list_id", "to_phone", "body", "sent_at", "creative_id"),
        records=[(m, tenant.account_id, tenant.list_id, f"+1417{i:07d}", "x", T0, "cr") for i, m in enumerate(mids)],
    )
    await conn.copy_records_to_table(
        "clicks", columns=("id", "account_id", "list_id", "message_id", "offer_id", "clicked_at"),
        records=[(k, tenant.account_id, tenant.list_id, m, offer, T0) for k, m in zip(kids, mids)],
    )
    await conn.copy_records_to_table(
        "message_clicks", columns=("message_id", "click_id", "account_id", "offer_id", "clicked_at"),
        records=[(m, k, tenant.account_id, offer, T0) for k, m in zip(kids, mids)],
    )
    await conn.copy_records_to_table(
        "conversions", columns=("account_id", "network", "conversion_key", "click_id", "status", "converted_at",
                                "unattributed_reason", "payout_given", "currency_given"),
        records=[(tenant.account_id, "tune", f"{prefix}old{i}", kids[i] if i >= N // 2 else None, "pending",
                  T0 + timedelta(hours=1), "no_click_id" if i < N // 2 else "click_not_found", False, False)
                 for i in range(N)],
    )
    await conn.execute(
        "INSERT INTO postbacks (account_id, received_at, method, params, network, conversion_key, status, converted_at,"
        " dedupe_key, processed_at)"
        " SELECT $1, $2::timestamptz, 'GET', '{}', 'tune', $3 || 'old' || i, 'pending', $2::timestamptz + interval '1 hour',"
        " $3 || 'd' || i, $2::timestamptz"
        " FROM generate_series(0, $4 - 1) AS i",
        tenant.account_id, T0, prefix, N,
    )
    return offer, mids, kids


async def _analyze(conn: asyncpg.Connection) -> None:
    for table in BIG:
        await conn.execute(f"ANALYZE {table}")


async def test_a_postback_batch_reads_each_row_by_its_key_whatever_the_table_size(db: asyncpg.Pool, tenant: Tenant) -> None:
    """process_batch over 1000 postbacks: 300 that approve old conversions (half of them name a
    click they had not: a late click, judged and given the click's offer's payout), 300 new
    conversions named by click id, 300 by message id, 100 naming no click. No seq scan of
    postbacks (_TAKE, _DONE), conversions (_LOCK, _MOVE, the late click's updates,
    _ATTRIBUTE, _DEFAULTS), clicks and messages (_CLICKS) or message_clicks."""
    async with db.acquire() as conn:
        _, mids, kids = await _seed(conn, tenant, "bq")
        # The batch: received before anything else waiting (other tests' leftovers), so _TAKE takes it.
        old = T0 - timedelta(days=3650)
        batch = (
            [(f"bqold{i}", kids[i], "approved") for i in range(N // 2 - 150, N // 2 + 150)]  # late click: first 150
            + [(f"bqnew{i}", kids[i], "approved") for i in range(300)]
            + [(f"bqmsg{i}", mids[300 + i], "pending") for i in range(300)]
            + [(f"bqnone{i}", None, "approved") for i in range(100)]
        )
        await conn.execute(
            "INSERT INTO postbacks (account_id, received_at, method, params, network, conversion_key, click_id, status,"
            " payout, converted_at, dedupe_key)"
            " SELECT $1, $2::timestamptz + n * interval '1 microsecond', 'GET', '{}', 'tune', key, click, status, payout,"
            " $7::timestamptz, 'bqb' || n"
            " FROM unnest($3::text[], $4::text[], $5::text[], $6::numeric[]) WITH ORDINALITY AS t(key, click, status, payout, n)",
            tenant.account_id, old, [key for key, _, _ in batch], [click for _, click, _ in batch],
            [status for _, _, status in batch], [None if key.startswith("bqold") else Decimal(2) for key, _, _ in batch],
            T0 + timedelta(hours=2),
        )
        await _analyze(conn)
        tx = conn.transaction()
        await tx.start()
        try:
            taken, reads = await table_reads(conn, lambda: attribution.process_batch(conn, None, len(batch)), *BIG)
            rows = await conn.fetch(
                "SELECT conversion_key, status, attributed, unattributed_reason, message_id, creative_id, payout,"
                " currency FROM conversions WHERE account_id = $1 AND conversion_key = ANY($2::text[])",
                tenant.account_id, [key for key, _, _ in batch],
            )
            waiting = await conn.fetchval(
                "SELECT count(*) FROM postbacks WHERE account_id = $1 AND processed_at IS NULL", tenant.account_id)
        finally:
            await tx.rollback()
    assert {table: scans for table, (scans, _) in reads.items()} == dict.fromkeys(BIG, 0)
    assert taken == (len(batch), 0) and waiting == 0
    by_key = {r["conversion_key"]: r for r in rows}
    assert len(by_key) == len(batch)
    late = [by_key[f"bqold{i}"] for i in range(N // 2 - 150, N // 2)]
    assert all(r["attributed"] and r["message_id"] == mids[i] and (r["payout"], r["currency"]) == (5, "EUR")
               for i, r in zip(range(N // 2 - 150, N // 2), late))
    assert all(by_key[f"bqold{i}"]["status"] == "approved" for i in range(N // 2 - 150, N // 2 + 150))
    assert all(by_key[f"bqnew{i}"]["message_id"] == mids[i] and by_key[f"bqnew{i}"]["creative_id"] == "cr"
               for i in range(300))
    assert all(by_key[f"bqmsg{i}"]["attributed"] and by_key[f"bqmsg{i}"]["message_id"] == mids[300 + i]
               for i in range(300))
    assert all(by_key[f"bqnone{i}"]["unattributed_reason"] == "no_click_id" for i in range(100))


async def test_the_rematch_reads_each_row_by_its_key_whatever_the_table_size(db: asyncpg.Pool, tenant: Tenant) -> None:
    """The sweeper's re-match with 3000 conversions waiting for a click (created within its day),
    1000 of them for a click stored by now: no seq scan of clicks or message_clicks (finding the
    stored ones), nor of conversions (rematch_for_clicks' lock, _ATTRIBUTE, _DEFAULTS), nor of
    clicks and messages (_CLICKS). Each of the 1000 is attributed, with its click's offer's payout."""
    async with db.acquire() as conn:
        _, mids, kids = await _seed(conn, tenant, "br")
        # The seeded conversions waiting for a click are not recent; these are.
        await conn.copy_records_to_table(
            "conversions", columns=("account_id", "network", "conversion_key", "click_id", "status", "converted_at",
                                    "unattributed_reason", "payout_given", "currency_given"),
            records=[(tenant.account_id, "tune", f"brwait{i}", kids[i] if i < 1000 else f"brnever{i}", "approved",
                      T0 + timedelta(hours=1), "click_not_found", False, False) for i in range(3000)],
        )
        await _analyze(conn)
        tx = conn.transaction()
        await tx.start()
        try:
            # Other tests' waiting conversions may come first: a page big enough for every one.
            found, reads = await table_reads(conn, lambda: attribution.rematch_stored(conn, 100_000), *BIG)
            rows = await conn.fetch(
                "SELECT conversion_key, attributed, message_id, payout, currency FROM conversions"
                " WHERE account_id = $1 AND conversion_key LIKE 'brwait%'", tenant.account_id,
            )
        finally:
            await tx.rollback()
    assert {table: scans for table, (scans, _) in reads.items()} == dict.fromkeys(BIG, 0)
    assert found >= 1000
    attributed = {r["conversion_key"]: r for r in rows if r["attributed"]}
    assert sorted(attributed) == sorted(f"brwait{i}" for i in range(1000))
    assert all(attributed[f"brwait{i}"]["message_id"] == mids[i] for i in range(1000))
    assert all((r["payout"], r["currency"]) == (5, "EUR") for r in attributed.values())


async def test_a_batch_looks_for_older_waiting_postbacks_of_its_own_conversions_only(
    db: asyncpg.Pool, tenant: Tenant
) -> None:
    """_BEHIND with 6000 postbacks waiting (a backlog) and a batch of 1000 conversions, 10 of which
    have an older postback waiting outside the batch: those 10, found by one probe of the
    conversion index per conversion. With EXISTS the planner hashed every waiting postback (no seq
    scan, but the whole backlog through its index, per batch)."""
    async with db.acquire() as conn:
        insert = (
            "INSERT INTO postbacks (account_id, method, params, network, conversion_key, status, converted_at, dedupe_key)"
            " SELECT $1, 'GET', '{}', 'tune', key, 'approved', $2, $4 || key || '/' || n"
            " FROM unnest($3::text[]) WITH ORDINALITY AS t(key, n) RETURNING id, conversion_key"
        )
        await conn.fetch(insert, tenant.account_id, T0, [f"bwwait{i}" for i in range(N)], "backlog")
        await conn.fetch(insert, tenant.account_id, T0, [f"bwb{i}" for i in range(10)], "older")  # older, outside the batch
        batch = await conn.fetch(insert, tenant.account_id, T0, [f"bwb{i}" for i in range(1000)], "batch")
        await _analyze(conn)
        behind, reads = await table_reads(conn, lambda: conn.fetch(
            attribution._BEHIND, [tenant.account_id] * len(batch), ["tune"] * len(batch),
            [r["conversion_key"] for r in batch], [r["id"] for r in batch], [r["id"] for r in batch],
        ), "postbacks")
    assert sorted(r["conversion_key"] for r in behind) == sorted(f"bwb{i}" for i in range(10))
    scans, fetched = reads["postbacks"]
    assert scans == 0 and fetched < 100
