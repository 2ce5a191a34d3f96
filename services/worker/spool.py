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
# PostgreSQL refusing the row itself, not being unavailable (which only delays the pass).
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


async def drain_spool_once(db: asyncpg.Pool, redis: aioredis.Redis, arq: Any = None, count: int = SPOOL_COUNT) -> int:
    """Store up to ``count`` spooled postbacks, oldest first, and enqueue each one's job on ``arq``
    (if given; the sweeper enqueues what it could not); returns how many entries it took off the
    spool. PostgreSQL unavailable: raised, and the entries stay for the next pass."""
    entries = await redis.xrange(SPOOL_STREAM, count=count)
    stored_ids: list[int] = []
    for entry_id, fields in entries:
        spool_id = text(entry_id)
        try:
            spooled = read_spool_entry(fields)
        except (KeyError, TypeError, ValueError) as exc:
            await _refuse(redis, entry_id, fields, f"unreadable: {type(exc).__name__}: {exc}")
            continue
        account_id = spooled.account_id
        if account_id is None:
            account_id = await db.fetchval(ACCOUNT_OF_TOKEN, spooled.token_digest, spooled.received_at)
            if account_id is None:
                log.warning("spooled postback %s names no account (an unknown postback token): dropped", spool_id)
                await redis.xdel(SPOOL_STREAM, entry_id)
                continue
        try:
            stored = await store(db, account_id, spooled.received_at, spooled.method, spooled.params,
                                 spooled.postback(), spool_id=spool_id)
            if stored.processable:
                stored_ids.append(stored.postback_id)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != SPOOL_ID_INDEX:
                await _refuse(redis, entry_id, fields, f"refused by postgresql: {exc}")
                continue
            # Stored before: only its delete was missing.
        except _REFUSED as exc:
            await _refuse(redis, entry_id, fields, f"refused by postgresql: {type(exc).__name__}: {exc}")
            continue
        await redis.xdel(SPOOL_STREAM, entry_id)
    if entries:
        log.info("stored %d spooled postbacks", len(entries))
    if arq is not None:
        try:
            for postback_id in stored_ids:
                await arq.enqueue_job(PROCESS_POSTBACK, postback_id, _job_id=postback_job_id(postback_id))
        except Exception:
            log.warning("could not enqueue the spooled postbacks' jobs; the sweeper will", exc_info=True)
    return len(entries)


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
