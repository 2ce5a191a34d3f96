"""Click drainer: the Redis click stream -> PostgreSQL, in batches, at least once, idempotently.

The redirect appends group-committed batches of clicks to ``shared.edge.CLICK_STREAM``. Here a
consumer of group ``shared.edge.CLICK_GROUP``:

1. takes its own unacknowledged entries first (a transaction that failed last time), else claims
   the entries of a consumer whose worker is gone (its heartbeat key, refreshed every second by a
   live worker, has expired: a few seconds after a ``kill -9``), else those another consumer has
   left pending for longer than ``min_idle_ms`` (a worker alive but stuck), else reads new ones;
2. stores them in ONE transaction and ONE statement (per ``DRAIN_BYTES`` of entries: see
   ``drain_once``). PostgreSQL parses the entries' JSON itself (``jsonb_array_elements``), so
   Python never decodes a click on the normal path; if an entry is malformed that statement
   fails (inside a savepoint) and the batch is decoded and checked click by click in Python
   instead, dropping only the bad clicks, so nothing can block the stream.
   (Entries in the legacy format, click objects under field ``b``, always go the checked way.
   Both ways refuse a click of another shape or with a time outside years 1-9999; on value types
   the fast way is looser, as PostgreSQL's casts are: a number where text is expected is stored
   as its text. The edge writes well-typed clicks; the checks are for what else could get in.)
   The insert is a plain one, inside a savepoint: a click stored before (a redelivered entry, or
   one the batch holds twice, or one another drainer is storing right now) makes it fail on the
   primary key, and the batch is then stored again with ``ON CONFLICT (id) DO NOTHING``. Only the
   rows the statement really inserted go on to message_clicks (first human click per message; an
   earlier click replaces a later one even if batches arrive out of order) and contacts
   (click_count, last_clicked_at). A batch drained twice therefore stores each click once and
   counts nothing twice;
3. calls ``attribution.rematch_for_clicks`` with the new clicks (human and bot), in the same transaction;
4. acknowledges (and deletes) the entries only after their commit.

A click's claimed message id is kept only if that message exists and belongs to the click's
account. Clicks of an account that does not exist are dropped (a stale edge key).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError

from services.worker import attribution
from shared import edge, jsonio, loops
from shared.redis_client import text

log = logging.getLogger("trackly.worker.clicks")

DEFAULT_CONSUMER = f"{socket.gethostname()}-{os.getpid()}"
DEFAULT_COUNT = 100  # stream entries per pass; each entry is a batch of clicks
# Stream entry bytes per transaction (one entry at least). A click may carry 32 query values of
# 1000 characters, and a flood of such clicks makes entries of up to ~32 MB: 100 of them in one
# statement went past PostgreSQL's 1 GB message limit, which failed the same entries for good.
DRAIN_BYTES = 64 << 20
# How many entries each consumer reads next: as many as DRAIN_BYTES holds at the size of those it
# read last (at most its ``count``), so that a backlog of big entries is not read 100 at a time
# (gigabytes, more than a socket timeout's worth of reading); half as many after a read that
# failed, which such a read does again and again as it was (the same entries, pending, come first).
_read_counts: dict[str, int] = {}
# Concurrent drain loops per worker: one decodes while another's transaction runs in PostgreSQL.
DRAIN_LOOPS = 2
CLAIM_IDLE_MS = 30_000
# Each drain loop's consumer has a heartbeat key (HEARTBEAT_PREFIX + name) that its worker sets
# every HEARTBEAT_INTERVAL seconds to expire after HEARTBEAT_TTL_MS. A consumer holding entries
# without one is a worker that is gone (or one from before heartbeats): its entries are claimed
# once they have been idle for RESCUE_IDLE_MS (so that two rescuers do not both take them).
HEARTBEAT_PREFIX = "trk:drainer:"
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TTL_MS = 5_000
RESCUE_IDLE_MS = 500

# The input rows, two ways. Fast: PostgreSQL parses the stream entries' JSON itself (no decoding
# in Python); each click is an array in the order of edge.CLICK_FIELDS. Checked: Python validated
# and decoded every click (used when the fast way fails on a malformed entry, so that one bad
# click cannot block the stream, and for entries in the legacy format of click objects).
_INPUT_JSON = """
    SELECT CASE WHEN jsonb_array_length(x) = {width} THEN x->>0 END AS id,  -- another shape: NOT NULL fails
           (x->>3)::bigint AS account_id, x->>1 AS link_id, x->>2 AS offer_id,
           (x->>4)::bigint AS list_id, x->>5 AS message_id,
           -- Exact for any bigint (bigint * interval would go through float8); out of range: NULL.
           CASE WHEN t.us BETWEEN {min_us} AND {max_us}
                THEN 'epoch'::timestamptz + (t.us / 1000000) * interval '1 second'
                                          + (t.us % 1000000) * interval '1 microsecond' END AS clicked_at,
           x->>7 AS ip, x->>8 AS user_agent, x->>9 AS country_code,
           coalesce((x->>10)::boolean, false) AS is_bot,
           CASE WHEN jsonb_typeof(x->11) = 'object' THEN x->11 ELSE '{{}}' END AS params
    FROM unnest($1::bytea[]) AS e(batch),
         LATERAL jsonb_array_elements(convert_from(e.batch, 'UTF8')::jsonb) AS x,
         LATERAL (SELECT (x->>6)::bigint AS us) AS t
""".format(width=len(edge.CLICK_FIELDS), min_us=edge.MIN_MICROS, max_us=edge.MAX_MICROS)
_INPUT_ARRAYS = """
    SELECT id, account_id, link_id, offer_id, list_id, message_id, clicked_at, ip, user_agent,
           country_code, is_bot, params::jsonb AS params
    FROM unnest(
        $1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[],
        $7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::boolean[], $12::text[]
    ) AS t(id, account_id, link_id, offer_id, list_id, message_id, clicked_at, ip, user_agent,
           country_code, is_bot, params)
"""
_STORE = """
WITH input AS ({input}),
stored AS (
    -- The claimed message is kept only if it exists and is the click's account's (one primary
    -- key probe per click that names one).
    INSERT INTO clicks (id, account_id, link_id, offer_id, list_id, message_id, clicked_at, ip,
                        user_agent, country_code, is_bot, params)
    SELECT i.id, i.account_id, i.link_id, i.offer_id, i.list_id,
           (SELECT m.id FROM messages m WHERE m.id = i.message_id AND m.account_id = i.account_id),
           i.clicked_at, i.ip, i.user_agent, i.country_code, i.is_bot, i.params
    FROM input i
    WHERE EXISTS (SELECT 1 FROM accounts a WHERE a.id = i.account_id)
    {skip_stored}
    RETURNING id, account_id, offer_id, message_id, clicked_at, is_bot
),
human AS (
    -- One primary key probe per stored message click (LATERAL with LIMIT, never flattened into a
    -- join): a join let the planner read the whole messages table for each batch until it held a
    -- few hundred thousand rows (25 ms per 10k-click batch at 77k messages, growing with them).
    SELECT s.*, m.list_id, m.to_phone
    FROM stored s
    CROSS JOIN LATERAL (SELECT list_id, to_phone FROM messages WHERE id = s.message_id LIMIT 1) m
    WHERE NOT s.is_bot
),
first_clicks AS (
    INSERT INTO message_clicks (message_id, click_id, account_id, offer_id, clicked_at, source)
    SELECT DISTINCT ON (message_id) message_id, id, account_id, offer_id, clicked_at, 'edge'
    FROM human
    ORDER BY message_id, clicked_at, id
    ON CONFLICT (message_id) DO UPDATE
        SET click_id = excluded.click_id, offer_id = excluded.offer_id,
            clicked_at = excluded.clicked_at, source = excluded.source
        WHERE excluded.clicked_at < message_clicks.clicked_at
    RETURNING message_id
),
contact_counts AS (
    INSERT INTO contacts (account_id, list_id, phone_number, click_count, last_clicked_at)
    SELECT min(account_id), list_id, to_phone, count(*), max(clicked_at)
    FROM human
    GROUP BY list_id, to_phone
    ORDER BY list_id, to_phone
    ON CONFLICT (list_id, phone_number) DO UPDATE
        SET click_count = contacts.click_count + excluded.click_count,
            last_clicked_at = greatest(contacts.last_clicked_at, excluded.last_clicked_at)
    RETURNING 1
)
SELECT (SELECT count(*) FROM input) AS seen,
       (SELECT coalesce(array_agg(id), '{{}}') FROM stored) AS new_clicks,
       (SELECT count(*) FROM first_clicks) AS first_clicks,
       (SELECT coalesce(array_agg(message_id), '{{}}') FROM first_clicks) AS first_messages,
       (SELECT count(*) FROM contact_counts) AS contacts
"""
# Clicks are usually new: a plain insert (no check) is about a quarter cheaper than ON CONFLICT's
# speculative insertion per row. It fails on a click stored before (a redelivered entry), one the
# batch holds twice, or one another drainer is storing right now; the batch is then stored with
# ON CONFLICT DO NOTHING, which is right in every case. (An anti-join against clicks, tried
# before, let the planner hash the whole clicks table once it held a few hundred thousand rows:
# 0.5 s per 10k-click batch at 200k stored clicks, and growing with the table.)
_ON_CONFLICT = "ON CONFLICT (id) DO NOTHING"
STORE_JSON_FRESH = _STORE.format(input=_INPUT_JSON, skip_stored="")
STORE_JSON = _STORE.format(input=_INPUT_JSON, skip_stored=_ON_CONFLICT)
STORE_ARRAYS = _STORE.format(input=_INPUT_ARRAYS, skip_stored=_ON_CONFLICT)


# A consumer idle this long is a worker that is gone: a live drain loop reads every second.
DEAD_CONSUMER_IDLE_MS = 3_600_000
FORGET_INTERVAL = 600.0


# Check and delete in one step (a script runs atomically): a consumer that woke up and read
# entries between an XINFO and a separate DELCONSUMER would have them dropped from the pending list,
# where nobody could claim them again.
_FORGET = """
local gone = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local info = {}
    for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
    if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
        table.insert(gone, info['name'])
    end
end
return gone
"""


# Acknowledge and delete in one step, as a script rather than MULTI: a full Redis refuses every
# command queued in a MULTI, and these two are what free it (neither needs memory).
_DONE = """
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
"""


async def forget_dead_consumers(redis: aioredis.Redis, idle_ms: int = DEAD_CONSUMER_IDLE_MS) -> list[str]:
    """Remove from the group the consumers of workers that are gone (every restart leaves its
    consumers behind). Only one idle for ``idle_ms`` and holding no pending entry: deleting a
    consumer drops its pending entries, which must be claimed (and stored) first."""
    try:
        names = await redis.eval(_FORGET, 1, edge.CLICK_STREAM, edge.CLICK_GROUP, str(idle_ms))
    except ResponseError as exc:
        if "no such key" in str(exc).lower() or "nogroup" in str(exc).lower():
            return []  # no stream or group yet
        raise
    gone = [text(n) for n in names]
    if gone:
        log.info("forgot %d click consumers of workers that are gone: %s", len(gone), ", ".join(gone))
    return gone


async def ensure_group(redis: aioredis.Redis) -> None:
    # Looked up first: a full Redis refuses XGROUP CREATE (it may need memory) even for a group
    # that exists, and draining, which deletes what it stores, is what frees a full Redis.
    with contextlib.suppress(ResponseError):  # no stream yet
        if any(text(group["name"]) == edge.CLICK_GROUP for group in await redis.xinfo_groups(edge.CLICK_STREAM)):
            return
    try:
        await redis.xgroup_create(edge.CLICK_STREAM, edge.CLICK_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREADGROUP reply ([[stream, entries]]) -> entries (a deleted one has fields None: it is
    still acknowledged, so that it leaves the pending list)."""
    if not reply:
        return []
    return [(entry_id, fields) for entry_id, fields in reply[0][1] if entry_id is not None]


async def _rescue(redis: aioredis.Redis, consumer: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Claim up to ``count`` entries of one consumer that holds some and has no heartbeat."""
    stream, group = edge.CLICK_STREAM, edge.CLICK_GROUP
    holding = [
        name for info in await redis.xinfo_consumers(stream, group)
        if info["pending"] and (name := text(info["name"])) != consumer
    ]
    if not holding:
        return []
    beats = await redis.mget([HEARTBEAT_PREFIX + name for name in holding])
    for name, beat in zip(holding, beats):
        if beat is not None:
            continue
        pending = await redis.xpending_range(stream, group, min="-", max="+", count=count, consumername=name)
        if not pending:
            continue
        claimed = await redis.xclaim(
            stream, group, consumer, min_idle_time=RESCUE_IDLE_MS, message_ids=[p["message_id"] for p in pending]
        )
        entries = [(entry_id, fields) for entry_id, fields in claimed if entry_id is not None]
        if entries:
            log.warning("claimed %d click batches of consumer %s, whose worker is gone", len(entries), name)
            return entries
    return []


async def beat(redis: aioredis.Redis, consumers: list[str]) -> None:
    """Say that these consumers' worker is alive, for the next HEARTBEAT_TTL_MS."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in consumers:
            pipe.set(HEARTBEAT_PREFIX + name, b"1", px=HEARTBEAT_TTL_MS)
        await pipe.execute()


async def _take(
    redis: aioredis.Redis, consumer: str, count: int, min_idle_ms: int, block_ms: int | None
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    stream, group = edge.CLICK_STREAM, edge.CLICK_GROUP
    # 1. Ours, delivered before but never acknowledged (the last transaction failed).
    mine = await redis.xreadgroup(group, consumer, {stream: "0"}, count=count)
    entries = _entries(mine)
    if entries:
        return entries
    # 2. Those of a consumer whose worker is gone.
    entries = await _rescue(redis, consumer, count)
    if entries:
        return entries
    # 3. Those a consumer has held for too long (its worker alive but stuck).
    claimed = await redis.xautoclaim(stream, group, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count)
    entries = [(entry_id, fields) for entry_id, fields in claimed[1] if entry_id is not None]
    if entries:
        return entries
    # 4. New ones.
    fresh = await redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
    return _entries(fresh)


def _columns(clicks: list[dict[str, Any]]) -> list[list[Any]]:
    cols: list[list[Any]] = [[] for _ in range(12)]
    for c in clicks:
        cols[0].append(c["id"])
        cols[1].append(int(c["a"]))
        cols[2].append(c.get("l"))
        cols[3].append(c.get("o"))
        cols[4].append(c.get("li"))
        cols[5].append(c.get("m"))
        cols[6].append(c["at"])
        cols[7].append(c.get("ip"))
        cols[8].append(c.get("ua"))
        cols[9].append(c.get("cc"))
        cols[10].append(bool(c.get("bot")))
        cols[11].append(orjson.dumps(c.get("q") or {}).decode())
    return cols


_TEXT_FIELDS = ("l", "o", "m", "ip", "ua", "cc")
# What PostgreSQL (or asyncpg, encoding) says of a value it cannot store: the data's fault.
_BAD_DATA = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError)
_BATCH = edge.CLICK_BATCH_FIELD.encode()
_BIGINT = 2**63


def _valid(click: Any) -> bool:
    """Whether a click can be stored as it is (anything else would fail the whole batch)."""
    if not isinstance(click, dict):
        return False
    account, list_id = click.get("a"), click.get("li")
    return (
        isinstance(click.get("id"), str)
        and 0 < len(click["id"]) <= 200
        and isinstance(account, int) and not isinstance(account, bool) and -_BIGINT <= account < _BIGINT
        and (list_id is None or (isinstance(list_id, int) and not isinstance(list_id, bool) and -_BIGINT <= list_id < _BIGINT))
        and all(click.get(name) is None or isinstance(click[name], str) for name in _TEXT_FIELDS)
        and isinstance(click.get("bot", False), bool)
    )


def _without_nul(click: dict[str, Any]) -> dict[str, Any]:
    """PostgreSQL text cannot hold NUL characters."""
    for name in ("id", *_TEXT_FIELDS):
        value = click.get(name)
        if isinstance(value, str) and "\x00" in value:
            click[name] = value.replace("\x00", "")
    query = click.get("q")
    if not isinstance(query, dict):
        click["q"] = {}
    elif "\\u0000" in orjson.dumps(query).decode():
        click["q"] = jsonio.storable(query)
    return click


def _named(entry_id: bytes, fields: dict[bytes, bytes] | None) -> list[Any]:
    """An entry's clicks as dicts by name (``at`` still to be read), whichever format it has;
    [] (logged) if it cannot be read."""
    if fields is None:  # deleted from the stream while pending: nothing to store
        return []
    try:
        if _BATCH in fields:
            rows = orjson.loads(fields[_BATCH])
            width = len(edge.CLICK_FIELDS)
            # A row of another shape becomes None: _valid refuses it, and only it (as the fast way
            # refuses it, by failing).
            return [
                dict(zip(edge.CLICK_FIELDS, row)) if isinstance(row, list) and len(row) == width else None
                for row in (rows if isinstance(rows, list) else [])
            ]
        batch = orjson.loads(fields[edge.LEGACY_BATCH_FIELD.encode()])  # type: ignore[index]
        return batch if isinstance(batch, list) else []
    except (KeyError, TypeError, orjson.JSONDecodeError):
        log.error("dropping malformed click stream entry %r", entry_id)
        return []


def _time(click: dict[str, Any]) -> datetime | None:
    """When a click was made: ``us`` (microseconds since the epoch) or, in the legacy format,
    ``at`` (ISO 8601 with an offset)."""
    try:
        if "us" in click:
            us = click["us"]
            if isinstance(us, int) and not isinstance(us, bool) and edge.MIN_MICROS <= us <= edge.MAX_MICROS:
                return edge.from_micros(us)
            return None
        at = datetime.fromisoformat(click["at"]) if isinstance(click.get("at"), str) else None
        # In UTC it must still be a date (PostgreSQL and asyncpg refuse what is not).
        return at if at is None or edge.MIN_MICROS <= edge.micros(at.astimezone(UTC)) <= edge.MAX_MICROS else None
    except (ValueError, OverflowError):
        return None


def _decode(entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> list[dict[str, Any]]:
    """Every well-formed click of the entries, once each (a retried XADD may repeat a click)."""
    clicks: dict[str, dict[str, Any]] = {}
    for entry_id, fields in entries:
        for click in _named(entry_id, fields):
            if not _valid(click):
                log.error("dropping malformed click in entry %r: %r", entry_id, click)
                continue
            at = _time(click)
            if at is None:
                log.error("dropping click with a bad timestamp in entry %r", entry_id)
                continue
            click["at"] = at
            clicks.setdefault(click["id"], _without_nul(click))
    return list(clicks.values())


async def store(conn: asyncpg.Connection, clicks: list[dict[str, Any]]) -> list[str]:
    """Store decoded, validated clicks and their effects in the caller's transaction; the ids of
    the clicks that were new."""
    if not clicks:
        return []
    row = await conn.fetchrow(STORE_ARRAYS, *_columns(clicks))
    return await _after_store(conn, row)


async def store_entries(conn: asyncpg.Connection, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> int:
    """Store the clicks of raw stream entries in the caller's transaction; how many they held."""
    payloads = [fields[_BATCH] for _, fields in entries if fields and _BATCH in fields]
    # An entry in the legacy format (or in none) sends the whole batch the checked way.
    fast = len(payloads) == sum(1 for _, fields in entries if fields)
    for statement in (STORE_JSON_FRESH, STORE_JSON) if fast else ():
        try:
            async with conn.transaction():  # a savepoint: a failure only undoes this try
                row = await conn.fetchrow(statement, payloads)
        except asyncpg.UniqueViolationError:
            continue  # a click twice in the batch, or being stored by another drainer: ON CONFLICT
        except asyncpg.PostgresError as exc:
            if isinstance(exc, (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)):
                raise
            log.warning("click batch needs checking click by click (%s)", exc)
            break
        else:
            await _after_store(conn, row)
            return int(row["seen"])
    clicks = _decode(entries)
    try:
        async with conn.transaction():
            await store(conn, clicks)
    except _BAD_DATA as exc:
        # _valid cannot foresee everything PostgreSQL refuses: one click at a time, so that only
        # the ones it refuses are dropped and the stream never stops on them. (Anything else, a
        # lost connection, a full disk, is raised: the entries stay pending and are tried again.)
        log.warning("click batch needs storing click by click (%s)", exc)
        refused = 0
        for click in clicks:
            try:
                async with conn.transaction():
                    await store(conn, [click])
            except _BAD_DATA as exc:
                refused += 1
                log.error("dropping click %r that PostgreSQL refuses (%s): %r", click.get("id"), exc, click)
        return len(clicks) - refused
    return len(clicks)


async def _after_store(conn: asyncpg.Connection, row: asyncpg.Record) -> list[str]:
    new_clicks = list(row["new_clicks"])
    if new_clicks:
        # Bots' too: a conversion waiting for a bot's click learns it is one (bot_click); and the
        # messages that got their first click, for a conversion that names its message.
        await attribution.rematch_for_clicks(conn, new_clicks + list(row["first_messages"]))
    return new_clicks


async def drain_once(
    db: asyncpg.Pool | asyncpg.Connection,
    redis: aioredis.Redis,
    *,
    consumer: str = DEFAULT_CONSUMER,
    count: int = DEFAULT_COUNT,
    min_idle_ms: int = CLAIM_IDLE_MS,
    block_ms: int | None = None,
) -> int:
    """Drain up to ``count`` stream entries, in one transaction per ``DRAIN_BYTES`` of them; returns
    how many well-formed clicks they held (stored now or already stored before). 0: nothing was
    there for this consumer (or only malformed entries, which are acknowledged and dropped)."""
    await ensure_group(redis)
    take = min(count, _read_counts.get(consumer, count))
    try:
        entries = await _take(redis, consumer, take, min_idle_ms, block_ms)
    except Exception:
        _read_counts[consumer] = max(1, take // 2)
        raise
    sizes = [_size(entry) for entry in entries]
    if entries:
        _read_counts[consumer] = max(1, DRAIN_BYTES * len(entries) // max(1, sum(sizes)))
    seen = 0
    for part in _up_to(DRAIN_BYTES, entries, sizes):
        if isinstance(db, asyncpg.Pool):
            async with db.acquire() as conn, conn.transaction():
                seen += await store_entries(conn, part)
        else:
            async with db.transaction():
                seen += await store_entries(db, part)
        entry_ids = [entry_id for entry_id, _ in part]
        await redis.eval(_DONE, 1, edge.CLICK_STREAM, edge.CLICK_GROUP, *entry_ids)
    return seen


def _up_to(
    size: int, entries: list[tuple[bytes, dict[bytes, bytes] | None]], sizes: list[int]
) -> list[list[tuple[bytes, dict[bytes, bytes] | None]]]:
    """The entries in runs of at most ``size`` bytes of fields (an entry bigger than that alone);
    ``sizes``: each entry's (``_size``)."""
    parts: list[list[tuple[bytes, dict[bytes, bytes] | None]]] = []
    total = 0
    for entry, n in zip(entries, sizes):
        if not parts or total + n > size:
            parts.append([])
            total = 0
        parts[-1].append(entry)
        total += n
    return parts


def _size(entry: tuple[bytes, dict[bytes, bytes] | None]) -> int:
    return sum(len(name) + len(value) for name, value in (entry[1] or {}).items())


async def run_drainer(ctx: dict[str, Any]) -> None:
    """Started by the worker: ``DRAIN_LOOPS`` loops drain forever, each as its own consumer, with
    their heartbeat (the first one set before they read anything: another worker must not take
    their entries for a dead consumer's)."""
    consumers = [f"{ctx.get('click_consumer', DEFAULT_CONSUMER)}-{n}" for n in range(DRAIN_LOOPS)]
    redis: aioredis.Redis = ctx["redis_client"]
    await loops.until_done(
        lambda: _first_beat(redis, consumers), log=log, failure="the drainer's first heartbeat failed; retrying",
        pause_after_failure=1.0,
    )
    tasks = [asyncio.create_task(_heartbeat_loop(redis, consumers), name="click-drain-heartbeat")]
    tasks += [asyncio.create_task(_drain_loop(ctx, name), name=f"click-drain-{n}") for n, name in enumerate(consumers)]
    tasks.append(asyncio.create_task(_forget_loop(redis), name="click-consumers-forget"))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        # (The heartbeat is left to expire: a Redis call here could hold up the worker's stop.)
        await asyncio.gather(*tasks, return_exceptions=True)


async def _first_beat(redis: aioredis.Redis, consumers: list[str]) -> None:
    """``beat``, except on a full Redis (maxmemory, noeviction), which refuses the SET: the drain
    starts all the same, since draining (it deletes what it stores) is what frees Redis. Meanwhile
    another worker may take this one's entries for a dead consumer's: drained twice, stored once."""
    try:
        await beat(redis, consumers)
    except OutOfMemoryError:
        log.warning("redis is full (it refuses the drainer's heartbeat): draining without one, which frees it")


async def _heartbeat_loop(redis: aioredis.Redis, consumers: list[str]) -> None:
    await loops.repeat(
        lambda: beat(redis, consumers), log=log, failure="the drainer's heartbeat failed",
        pause_after_failure=HEARTBEAT_INTERVAL, interval=HEARTBEAT_INTERVAL,
    )


async def _forget_loop(redis: aioredis.Redis) -> None:
    await loops.repeat(
        lambda: forget_dead_consumers(redis), log=log, failure="forgetting dead click consumers failed",
        pause_after_failure=FORGET_INTERVAL, interval=FORGET_INTERVAL,
    )


async def _drain_loop(ctx: dict[str, Any], consumer: str) -> None:
    """On any failure wait a moment and go again: nothing is acknowledged unless it was committed,
    so a failure only delays (the entries stay in this consumer's pending list)."""
    db: asyncpg.Pool = ctx.get("click_db", ctx["db"])  # the worker gives the drainer a pool of its own
    redis: aioredis.Redis = ctx["redis_client"]
    await loops.repeat(
        lambda: drain_once(db, redis, consumer=consumer, block_ms=1000),
        log=log, failure="click drain failed; retrying", pause_after_failure=1.0,
    )
