"""How long an ``Idempotency-Key`` is remembered (``idempotency_keys``, migration 0019), for the
gateway that answers by it and the worker that forgets it."""
from __future__ import annotations

from datetime import timedelta

import asyncpg

# A retry after this long is a new request. A day covers a client's retries, and one that waits
# for an outage to pass.
KEEP = timedelta(hours=24)
PURGE_BATCH = 10_000


async def purge(db: asyncpg.Pool | asyncpg.Connection) -> int:
    """Delete keys older than KEEP, a batch at a time (short transactions); returns how many."""
    total = 0
    while True:
        status = await db.execute(
            "DELETE FROM idempotency_keys WHERE ctid = ANY (ARRAY("
            " SELECT ctid FROM idempotency_keys WHERE created_at < now() - $1::interval LIMIT $2))",
            KEEP, PURGE_BATCH,
        )
        deleted = int(status.rsplit(" ", 1)[1])
        total += deleted
        if deleted < PURGE_BATCH:
            return total
