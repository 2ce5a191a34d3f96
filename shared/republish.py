"""Rebuild what the edge reads (``shared.edge``) from PostgreSQL, the system of record.

For an operator whose Redis lost its data or was replaced: every link's short code and tracker,
every per-message short code, every offer. Links and codes never change once written, so they
are copied from one consistent snapshot, a thousand keys per ``MSET``. Offers do change (a pause
must reach the edge) and the gateway publishes a change just before committing it, so a read of
the older row could overwrite it: offers go last, from a fresh read, and those changed since
shortly before that read are read and written once more afterwards.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from shared import edge

CHUNK = 1000

_LINKS = "SELECT id, account_id, offer_id, list_id, domain_host, tracker_id, tracker_url FROM links"
_MESSAGE_CODES = """
SELECT ml.code, ml.message_id, ml.link_id, l.domain_host, m.creative_id, m.sent_at
FROM message_links ml
JOIN links l ON l.id = ml.link_id
JOIN messages m ON m.id = ml.message_id AND m.account_id = l.account_id
"""
_OFFERS = f"SELECT {edge.OFFER_ENTRY_COLUMNS} FROM offers"


async def _chunks(conn: asyncpg.Connection, query: str) -> AsyncIterator[list[asyncpg.Record]]:
    chunk: list[asyncpg.Record] = []
    async for row in conn.cursor(query, prefetch=CHUNK):
        chunk.append(row)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def republish(conn: asyncpg.Connection, redis: Any, *, code_days: int = 0) -> dict[str, int]:
    """Write every edge key again; returns how many links, message codes and offers it wrote.
    ``code_days``: settings.message_code_days (codes past it are not written again)."""
    counts = {"links": 0, "message_codes": 0, "offers": 0}
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for rows in _chunks(conn, _LINKS):
            await redis.mset(dict(entry for row in rows for entry in edge.link_entries(row)))
            counts["links"] += len(rows)
        async for rows in _chunks(conn, _MESSAGE_CODES):
            counts["message_codes"] += await edge.write_message_codes(redis, (
                (edge.short_key(r["domain_host"], r["code"]),
                 edge.dumps(edge.message_code_entry(r["link_id"], r["message_id"], r["creative_id"])), r["sent_at"])
                for r in rows
            ), days=code_days)
    started = await conn.fetchval("SELECT clock_timestamp()")
    async with conn.transaction(readonly=True):
        async for rows in _chunks(conn, _OFFERS):
            await redis.mset({edge.offer_key(r["id"]): edge.dumps(edge.offer_entry(r)) for r in rows})
            counts["offers"] += len(rows)
    # A change whose transaction began up to a minute before the pass (updated_at is its start)
    # and committed during it: written again from what is committed now.
    changed = await conn.fetch(_OFFERS + " WHERE updated_at >= $1::timestamptz - interval '1 minute'", started)
    if changed:
        await redis.mset({edge.offer_key(r["id"]): edge.dumps(edge.offer_entry(r)) for r in changed})
    return counts
