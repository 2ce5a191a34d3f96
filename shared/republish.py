"""Rebuild what the edge reads (``shared.edge``) from PostgreSQL, the system of record.

For an operator whose Redis lost its data or was replaced: every link's short code and tracker,
every per-message short code, every offer. Offers go first: the edge answers a link or a code
only with its offer's entry (404 without it), so each link answers as soon as it is written, not
once the whole pass (minutes for tens of millions of codes) is done. Offers do change (a pause
must reach the edge) and the gateway publishes a change after its UPDATE and before its commit,
so a read of the older row could overwrite it: each page of offers is read ``FOR SHARE`` and
written before its transaction ends, as the worker's offer check does, so a change in flight is
waited for and one that comes meanwhile publishes after this. Links and codes never change once
written, so they are then copied from one consistent snapshot, a thousand keys per ``MSET``.

The gateway publishes a link or a message's codes before its transaction commits. One that
published before Redis lost its data and commits after the snapshot would be in neither, so once
the pass is done it waits for every transaction that had written when it began (as ``CREATE INDEX
CONCURRENTLY`` waits), up to ``WRITERS_WAIT`` seconds, and writes the links, codes and offers
created (or changed) since the earliest of them began once more. (Waiting before the pass would
leave the edge answering 404 for as long as a transaction stays open.)
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from shared import edge

log = logging.getLogger("trackly.republish")

CHUNK = 1000
# Each fetch's bound, where a pool's command timeout (60 s, shared.db) would be the default: the
# codes' first fetch hashes every message before it returns a row (28 s for 15M messages on a
# shared 2-core machine), and the worker's pass, made on a connection of its pool, failed there
# from about 30M messages on, every time. An hour: only a pass stuck for good is given up.
FETCH_TIMEOUT = 3600.0
# The longest a pass waits, once done, for the transactions in progress when it began (a
# gateway's takes milliseconds; one left open by hand is waited for this long, then named in a
# warning).
WRITERS_WAIT = 60.0

_LINKS = "SELECT id, account_id, offer_id, list_id, domain_host, tracker_id, tracker_url FROM links"
_MESSAGE_CODES = """
SELECT ml.code, ml.message_id, ml.link_id, l.domain_host, m.creative_id, m.sent_at
FROM message_links ml
JOIN links l ON l.id = ml.link_id
JOIN messages m ON m.id = ml.message_id AND m.account_id = l.account_id
"""
_OFFERS = f"SELECT {edge.OFFER_ENTRY_COLUMNS} FROM offers WHERE id > $1"


async def _chunks(conn: asyncpg.Connection, query: str, *args: Any) -> AsyncIterator[list[asyncpg.Record]]:
    chunk: list[asyncpg.Record] = []
    async for row in conn.cursor(query, *args, prefetch=CHUNK, timeout=FETCH_TIMEOUT):
        chunk.append(row)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# Each transaction holds a lock on its own transaction id until it ends. (pg_current_snapshot()
# would not do: its list leaves out the newest ones, at or past its xmax.) pg_locks has every
# database's: only this one's can have published here.
_WRITERS = (
    "SELECT l.transactionid::text AS xid, a.xact_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND a.datname = current_database()"
    " AND l.pid <> pg_backend_pid()"
)


async def _wait_for(conn: asyncpg.Connection, writers: list[str], timeout: float) -> None:
    """Return once the transactions ``writers`` have ended, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while writers:
        writers = [r[0] for r in await conn.fetch(_WRITERS + " AND l.transactionid::text = ANY($1::text[])", writers)]
        if not writers:
            return
        if time.monotonic() >= deadline:
            log.warning("republished without waiting longer for %d transactions open for over %.0f s (ids %s):"
                        " a link or message they published before Redis lost its data may still be missing",
                        len(writers), timeout, ", ".join(writers[:10]))
            return
        await asyncio.sleep(0.05)


async def _links_and_codes(
    conn: asyncpg.Connection, redis: Any, counts: dict[str, int], *, code_days: int, since: Any = None
) -> None:
    """Every link and per-message code (``since``: those created since then) from one snapshot."""
    links, codes, args = _LINKS, _MESSAGE_CODES, ()
    if since is not None:
        links, codes, args = links + " WHERE created_at >= $1", codes + " WHERE ml.created_at >= $1", (since,)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for rows in _chunks(conn, links, *args):
            await redis.mset(dict(entry for row in rows for entry in edge.link_entries(row)))
            counts["links"] += len(rows)
        async for rows in _chunks(conn, codes, *args):
            counts["message_codes"] += await edge.write_message_codes(redis, (
                (edge.short_key(r["domain_host"], r["code"]),
                 edge.dumps(edge.message_code_entry(r["link_id"], r["message_id"], r["creative_id"])), r["sent_at"])
                for r in rows
            ), days=code_days)


async def _offers(conn: asyncpg.Connection, redis: Any, counts: dict[str, int], *, since: Any = None) -> None:
    """Every offer (``since``: those created or changed since then), a page at a time, each page
    read ``FOR SHARE`` and written before its transaction ends (as the gateway publishes a change):
    a change in flight is waited for and read as it committed, and one that comes meanwhile waits
    for the page and publishes after it. (Read without the locks, a change published and not yet
    committed was overwritten with the older row, and stayed so at the edge.)"""
    query, args = _OFFERS, ()
    if since is not None:
        query, args = query + " AND updated_at >= $3", (since,)
    after = ""
    while True:
        async with conn.transaction():
            rows = await conn.fetch(query + " ORDER BY id LIMIT $2 FOR SHARE", after, CHUNK, *args)
            if rows:
                await redis.mset({edge.offer_key(r["id"]): edge.dumps(edge.offer_entry(r)) for r in rows})
        counts["offers"] += len(rows)
        if len(rows) < CHUNK:
            return
        after = rows[-1]["id"]


async def republish(
    conn: asyncpg.Connection, redis: Any, *, code_days: int = 0, writers_wait: float = WRITERS_WAIT
) -> dict[str, int]:
    """Write every edge key again; returns how many links, message codes and offers it wrote.
    ``code_days``: settings.message_code_days (codes past it are not written again)."""
    counts = {"links": 0, "message_codes": 0, "offers": 0}
    writers = await conn.fetch(_WRITERS)
    await _offers(conn, redis, counts)
    await _links_and_codes(conn, redis, counts, code_days=code_days)
    if writers:
        # The links, codes and offers of the transactions open when the pass began, once they
        # have committed: their rows carry their start as created_at (updated_at), as do rows of
        # later ones, written twice. One scan each, of the tables as they stand then.
        await _wait_for(conn, [r["xid"] for r in writers], writers_wait)
        since = min(r["xact_start"] for r in writers)
        await _offers(conn, redis, {"offers": 0}, since=since)
        await _links_and_codes(conn, redis, {"links": 0, "message_codes": 0}, code_days=code_days, since=since)
    return counts
