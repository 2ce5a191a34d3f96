"""Keeps every offer at the edge as PostgreSQL has it: the repair for a change whose publish and
commit came apart.

The gateway publishes an offer's change to Redis just before it commits (so a pause it
acknowledges is at the edge at once). If the request fails after that (the commit, or a publish
whose reply was lost after Redis applied it), the edge may hold a change PostgreSQL rolled back: a
paused offer answering again, a destination that never was. The gateway publishes the committed
row once more at once, but that can fail too (the same network blip) or never run (the gateway
died). So every ``CHECK_INTERVAL`` seconds each offer's edge entry is compared with its committed
row, and one that differs is published again from the row read ``FOR SHARE``, as the gateway
publishes a change: a change in flight (published, not yet committed) is waited for, so this never
undoes it. A paused offer then stops answering within ``CHECK_INTERVAL`` plus the edge's cache
TTL, inside CONTRACT.md §4's 15 s. It also brings back offers a Redis that lost its data no longer
has (links and message codes need ``trackly republish``).
"""
from __future__ import annotations

import logging
from typing import Any

import asyncpg

from shared import edge, loops

log = logging.getLogger("trackly.worker.edge_offers")

CHECK_INTERVAL = 5.0
CHUNK = 1000

_PAGE = f"SELECT {edge.OFFER_ENTRY_COLUMNS} FROM offers WHERE id > $1 ORDER BY id LIMIT $2"
_LOCKED = f"SELECT {edge.OFFER_ENTRY_COLUMNS} FROM offers WHERE id = ANY($1::text[]) ORDER BY id FOR SHARE"


def _differs(row: asyncpg.Record, held: bytes | None) -> bool:
    if held is None:
        return True
    try:
        return edge.loads(held) != edge.offer_entry(row)
    except ValueError:  # not JSON at all: written over
        return True


async def check_offers(db: asyncpg.Pool, redis: Any) -> int:
    """Compare every offer's edge entry with its committed row; publish again those that differ.
    Returns how many it published."""
    published = 0
    after = ""
    while True:
        rows = await db.fetch(_PAGE, after, CHUNK)
        if not rows:
            return published
        after = rows[-1]["id"]
        held = await redis.mget([edge.offer_key(r["id"]) for r in rows])
        suspects = [r["id"] for r, raw in zip(rows, held) if _differs(r, raw)]
        if suspects:
            async with db.acquire() as conn, conn.transaction():
                locked = await conn.fetch(_LOCKED, suspects)
                # Read again under the locks: a change that was in flight has committed (and is
                # at the edge as it committed) or rolled back (and its publish is still there).
                held = await redis.mget([edge.offer_key(r["id"]) for r in locked])
                stale = [r for r, raw in zip(locked, held) if _differs(r, raw)]
                if stale:
                    await redis.mset({edge.offer_key(r["id"]): edge.dumps(edge.offer_entry(r)) for r in stale})
                    log.warning("published %d offers again whose edge entry was not what PostgreSQL holds: %s",
                                len(stale), ", ".join(r["id"] for r in stale[:10]))
                    published += len(stale)
        if len(rows) < CHUNK:
            return published


async def run_offer_check(ctx: dict[str, Any]) -> None:
    """Started by the worker: ``check_offers`` every ``CHECK_INTERVAL`` seconds until cancelled."""
    await loops.repeat(
        lambda: check_offers(ctx["db"], ctx["redis_client"]), log=log, failure="checking the edge's offers failed",
        pause_after_failure=CHECK_INTERVAL, interval=CHECK_INTERVAL,
    )
