"""How long an ``Idempotency-Key`` is remembered (``idempotency_keys``, migration 0019), for the
gateway that answers by it and the worker that forgets it."""
from __future__ import annotations

from datetime import timedelta

import asyncpg

# A retry after this long is a new request. A day covers a client's retries, and one that waits
# for an outage to pass.
KEEP = timedelta(hours=24)
PURGE_BATCH = 10_000


# KEEP as a literal in the purge: a prepared statement runs with a generic plan from its sixth run
# on a connection, and with the age a parameter that plan took a third of the table to be expired
# (and a tenth of that for a LIMIT parameter): a sequential scan of every key, where the purge
# planned for its cutoff reads the expired keys through their index. With the literal the planner
# estimates the cutoff (now() included) in either plan.
_PURGE = (
    "DELETE FROM idempotency_keys WHERE ctid = ANY (ARRAY("
    " SELECT ctid FROM idempotency_keys WHERE created_at < now() - interval '{seconds} seconds' LIMIT $1))"
)


async def purge(db: asyncpg.Pool | asyncpg.Connection) -> int:
    """Delete keys older than KEEP, a batch at a time (short transactions); returns how many."""
    total = 0
    statement = _PURGE.format(seconds=int(KEEP.total_seconds()))
    while True:
        status = await db.execute(statement, PURGE_BATCH)
        deleted = int(status.rsplit(" ", 1)[1])
        total += deleted
        if deleted < PURGE_BATCH:
            return total
