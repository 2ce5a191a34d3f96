"""The postback spool: postbacks the gateway received while PostgreSQL could not store them, kept
in a Redis stream (``shared.postback_store``), stored here once PostgreSQL is back.

Each pass reads the oldest entries and stores each one in PostgreSQL as the receiver would have
(its receipt time, its account: looked up by its token's digest as of that time when the gateway
could not), then deletes it from the stream. An entry is stored once: its id is the row's
``spool_id``, unique, so one stored before (the worker died before deleting it, or another worker
took it at the same time) is only deleted. Each stored postback's job is enqueued then (or by the
sweeper, as for any stored postback whose job was never enqueued).

Entries the spool cannot hold as postbacks (unreadable, or PostgreSQL refuses the row: the account
deleted since) move to SPOOL_REFUSED for the operator, out of the way of the rest. One whose token
names no account is dropped with a warning: the gateway would have answered it 401.
"""
from __future__ import annotations

import logging
import secrets
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from shared import loops
from shared.jobs import PROCESS_POSTBACK, postback_job_id
from shared.postback_store import (
    ACCOUNT_OF_TOKEN, SPOOL_ID_INDEX, SPOOL_REFUSED, SPOOL_STREAM, read_spool_entry, store,
)
from shared.redis_client import text

log = logging.getLogger("trackly.worker.spool")

SPOOL_INTERVAL = 1.0  # seconds between passes over an empty spool
SPOOL_COUNT = 100  # entries per pass
# One worker drains at a time: it holds this key (a pass takes well under a second; a worker that
# dies holding it holds up the others this long at most).
SPOOL_LOCK = "trk:postback-spool:lock"
SPOOL_LOCK_MS = 30_000
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# PostgreSQL refusing the row itself, not being unavailable (which only delays the pass).
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


async def drain_spool_once(db: asyncpg.Pool, redis: aioredis.Redis, arq: Any = None, count: int = SPOOL_COUNT) -> int:
    """Store up to ``count`` spooled postbacks, oldest first, and enqueue each one's job on ``arq``
    (if given; the sweeper enqueues what it could not); returns how many entries it took off the
    spool (0 also while another worker holds the spool: one drains at a time, in order, rather
    than all storing the same oldest entries). PostgreSQL unavailable: raised, and the entries not
    yet stored stay for the next pass."""
    token = secrets.token_hex(8)
    if not await redis.set(SPOOL_LOCK, token, nx=True, px=SPOOL_LOCK_MS):
        return 0
    try:
        entries = await redis.xrange(SPOOL_STREAM, count=count)
        if not entries:
            return 0
        stored_ids: list[int] = []
        done: list[bytes] = []  # stored now or before, or dropped
        try:
            async with db.acquire() as conn:
                for entry_id, fields in entries:
                    outcome = await _store_entry(conn, redis, entry_id, fields)
                    if outcome is not None:
                        done.append(entry_id)
                        if outcome:
                            stored_ids.append(outcome)
        finally:
            if done:
                await redis.xdel(SPOOL_STREAM, *done)
        log.info("stored %d spooled postbacks", len(entries))
    finally:
        await redis.eval(_UNLOCK, 1, SPOOL_LOCK, token)
    if arq is not None:
        try:
            for postback_id in stored_ids:
                await arq.enqueue_job(PROCESS_POSTBACK, postback_id, _job_id=postback_job_id(postback_id))
        except Exception:
            log.warning("could not enqueue the spooled postbacks' jobs; the sweeper will", exc_info=True)
    return len(entries)


async def _store_entry(conn: asyncpg.Connection, redis: aioredis.Redis, entry_id: bytes,
                       fields: dict[bytes, bytes]) -> int | None:
    """Store one entry: the id of a postback stored now for a worker to process; 0 for one stored
    before, not to be processed, or dropped; None for one set aside (already off the spool)."""
    spool_id = text(entry_id)
    try:
        spooled = read_spool_entry(fields)
    except (KeyError, TypeError, ValueError) as exc:
        await _refuse(redis, entry_id, fields, f"unreadable: {type(exc).__name__}: {exc}")
        return None
    account_id = spooled.account_id
    if account_id is None:
        account_id = await conn.fetchval(ACCOUNT_OF_TOKEN, spooled.token_digest, spooled.received_at)
        if account_id is None:
            log.warning("spooled postback %s names no account (an unknown postback token): dropped", spool_id)
            return 0
    try:
        stored = await store(conn, account_id, spooled.received_at, spooled.method, spooled.params,
                             spooled.postback(), spool_id=spool_id)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != SPOOL_ID_INDEX:
            await _refuse(redis, entry_id, fields, f"refused by postgresql: {exc}")
            return None
        return 0  # stored before: only its delete was missing
    except _REFUSED as exc:
        await _refuse(redis, entry_id, fields, f"refused by postgresql: {type(exc).__name__}: {exc}")
        return None
    return stored.postback_id if stored.processable else 0


async def _refuse(redis: aioredis.Redis, entry_id: bytes, fields: dict[bytes, bytes], why: str) -> None:
    log.error("spooled postback %s moved to %s: %s", text(entry_id), SPOOL_REFUSED, why)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(SPOOL_REFUSED, {**fields, b"spool_id": entry_id, b"why": why.encode()})
        pipe.xdel(SPOOL_STREAM, entry_id)
        await pipe.execute()


async def run_spool_drainer(ctx: dict[str, Any]) -> None:
    """Started by the worker: a pass every SPOOL_INTERVAL, at once again after a full one."""

    async def step() -> None:
        while await drain_spool_once(ctx["db"], ctx["redis_client"], ctx.get("redis")) == SPOOL_COUNT:
            pass

    await loops.repeat(step, log=log, failure="storing spooled postbacks failed; retrying",
                       pause_after_failure=SPOOL_INTERVAL, interval=SPOOL_INTERVAL)
