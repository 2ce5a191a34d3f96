"""The worker's purge of old Idempotency-Keys reads the expired keys, not the table, on every run.

asyncpg prepares the purge once per connection, and from its sixth run PostgreSQL may run it with
a generic plan, made for no cutoff in particular. With the age a parameter ("created_at < now() -
$1") that plan cannot tell how many keys are expired (it takes a third of the table), and with the
LIMIT a parameter too (a tenth of that) a sequential scan looks ten times cheaper than the index
the purge is planned with for its own cutoff: it read every key of the last day to find the few
expired ones (30 ms instead of 0.24 ms at 300k keys, growing with the table, every ten minutes).
Checked on the transaction's statistics, never on time (as tests/worker/test_batch_plans.py).
"""
from __future__ import annotations

from shared import idempotency
from tests.helpers import Tenant, table_reads

KEYS = 20_000
EXPIRED = 60  # per run


async def test_every_purge_reads_the_expired_keys_only(db, tenant: Tenant) -> None:
    """Eight purges on one connection, each after EXPIRED more keys have expired. The table holds
    KEYS keys of the last day, stored in no order of time (space freed by earlier purges is
    reused), 1% of them expired when the statistics were taken (between two purges some always
    are): no sequential scan of the keys, the expired ones gone, the others kept. The transaction
    is rolled back."""
    async with db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(
                "INSERT INTO idempotency_keys (account_id, key, fingerprint, status, response, created_at)"
                " SELECT $1, 'k' || i, '\\x00', 201, '\\x7b7d',"
                "        now() - CASE WHEN i % 100 = 0 THEN $3::interval + interval '1 second' ELSE interval '0' END"
                "              - (i * 7919 % $2) * interval '1 second'"
                " FROM generate_series(1, $2) AS i",
                tenant.account_id, KEYS, idempotency.KEEP,
            )
            await conn.execute("ANALYZE idempotency_keys")
            scans = []
            for run in range(8):
                await conn.execute(
                    "INSERT INTO idempotency_keys (account_id, key, fingerprint, status, response, created_at)"
                    " SELECT $1, 'old' || $2 || '/' || i, '\\x00', 201, '\\x7b7d',"
                    "        now() - $3::interval - i * interval '1 second'"
                    " FROM generate_series(1, $4) AS i",
                    tenant.account_id, str(run), idempotency.KEEP, EXPIRED,
                )
                deleted, reads = await table_reads(conn, lambda: idempotency.purge(conn), "idempotency_keys")
                assert deleted >= EXPIRED + (KEYS // 100 if run == 0 else 0)
                scans.append(reads["idempotency_keys"][0])
            left = await conn.fetchval(
                "SELECT count(*) FROM idempotency_keys WHERE account_id = $1", tenant.account_id)
        finally:
            await tx.rollback()
    assert scans == [0] * 8
    assert left == KEYS - KEYS // 100
