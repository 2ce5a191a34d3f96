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
TTL, inside CONTRACT.md §4's 15 s.

Before each check, ``ensure_complete`` looks for ``edge.EDGE_MARK`` naming the Redis process's run
id: a Redis without it, or with another run id, was restarted (empty, or from a snapshot that lacks
what was published after it), replaced, or never filled, and every short link and message code it
lacks would answer 404 at the edge until an operator ran ``trackly admin republish``. The worker
runs that republish itself (one worker at a time): 200k links and 1M message codes took 7.5 s
(12 s with TRACKLY_MESSAGE_CODE_DAYS); a restart that lost nothing costs the same pass, harmlessly.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import asyncpg
from redis.exceptions import RedisError, ResponseError

from shared import edge, loops
from shared.republish import republish

log = logging.getLogger("trackly.worker.edge_offers")

CHECK_INTERVAL = 5.0
CHUNK = 1000

# One worker republishes at a time. Its lock lives REPUBLISH_LOCK_MS and the worker renews it
# every REPUBLISH_RENEW_S while its pass runs (at the rate measured below, 100M message codes take
# about 12 minutes): one not renewed in time is a dead worker's, and the next worker's check takes
# over, so a worker killed mid-pass holds the edge's repair up for at most a minute (it was 15).
REPUBLISH_LOCK = "trk:edge:republishing"
REPUBLISH_LOCK_MS = 60 * 1000
REPUBLISH_RENEW_S = 15.0
# The mark is set to "pending:<token>" before the pass and to "done" after it only if it still
# holds that token: a Redis emptied again during the pass lost the pending mark with everything
# else, and is filled again at the next check.
_MARK_DONE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2])
    return 1
end
return 0
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

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


async def _run_id(redis: Any) -> str:
    """The Redis process's run id (a new one at every restart); "" where INFO is not allowed."""
    try:
        return str((await redis.info("server")).get("run_id", ""))
    except ResponseError:
        return ""


async def _keep_lock(redis: Any, token: str) -> None:
    """Renew the republish lock every REPUBLISH_RENEW_S for as long as it is this pass's (until
    cancelled). A lock found gone or taken (this worker stalled past REPUBLISH_LOCK_MS) is not
    taken back: the pass goes on, harmlessly (every pass writes the same values), and only the
    pass holding the mark's token marks the edge complete."""
    while True:
        await asyncio.sleep(REPUBLISH_RENEW_S)
        try:
            if not await redis.eval(_RENEW, 1, REPUBLISH_LOCK, token, REPUBLISH_LOCK_MS):
                log.warning("the edge republish lost its lock (this worker stalled for over %d s):"
                            " another worker may be making the same pass", REPUBLISH_LOCK_MS // 1000)
                return
        except (RedisError, OSError) as exc:  # the pass itself fails on a Redis that stays down
            log.warning("could not renew the edge republish lock: %s", exc)


async def ensure_complete(db: asyncpg.Pool, redis: Any, *, code_days: int = 0) -> dict[str, int] | None:
    """If Redis does not hold ``edge.EDGE_MARK`` (it lost its data, or was never filled), write every
    edge key again from PostgreSQL (``shared.republish``); returns its counts, None if nothing was
    to do (or another worker is at it)."""
    done = f"done:{await _run_id(redis)}".encode()
    if await redis.get(edge.EDGE_MARK) == done:
        return None
    token = secrets.token_hex(16)
    if not await redis.set(REPUBLISH_LOCK, token, nx=True, px=REPUBLISH_LOCK_MS):
        return None
    keeper = asyncio.create_task(_keep_lock(redis, token))
    try:
        pending = f"pending:{token}"
        await redis.set(edge.EDGE_MARK, pending)
        log.warning("the edge's Redis lacks %s (it lost its data, or was never filled): publishing every "
                    "link, message code and offer again", edge.EDGE_MARK)
        async with db.acquire() as conn:
            counts = await republish(conn, redis, code_days=code_days)
        if await redis.eval(_MARK_DONE, 1, edge.EDGE_MARK, pending, done):
            log.warning("published the edge again: %s", counts)
        return counts
    finally:
        # Not awaited: a cancellation of this task (the worker stopping) that came during the
        # wait would be taken for the keeper's own and swallowed. A renewal still in flight
        # finds the lock gone or no longer ours and renews nothing.
        keeper.cancel()
        await redis.eval(_UNLOCK, 1, REPUBLISH_LOCK, token)


async def check_edge(ctx: dict[str, Any]) -> None:
    """One turn of the worker's check: the whole edge if Redis lost it, then every offer."""
    try:
        await ensure_complete(ctx["db"], ctx["redis_client"], code_days=ctx["settings"].message_code_days)
    finally:  # a republish that keeps failing must not hold up the offers' own check (CONTRACT §4)
        await check_offers(ctx["db"], ctx["redis_client"])


async def run_offer_check(ctx: dict[str, Any]) -> None:
    """Started by the worker: ``check_edge`` every ``CHECK_INTERVAL`` seconds until cancelled."""
    await loops.repeat(
        lambda: check_edge(ctx), log=log, failure="checking the edge failed",
        pause_after_failure=CHECK_INTERVAL, interval=CHECK_INTERVAL,
    )
