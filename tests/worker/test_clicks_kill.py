"""kill -9 of a drainer mid-drain: after another drainer takes over, every click is stored once
and nothing is counted twice."""
from __future__ import annotations

import asyncio
import random
import signal
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from shared import edge
from shared.process import die_with_parent
from shared.settings import Settings
from services.worker.clicks import HEARTBEAT_PREFIX, HEARTBEAT_TTL_MS, ensure_group, run_drainer
from tests.helpers import Tenant, lock_waiters, random_phone, row_held
from tests.worker.test_clicks import T0 as CLICKS_T0, click, drain_all, message, xadd

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
ENTRIES, PER_ENTRY, MESSAGES = 240, 25, 12

DOOMED = """
import asyncio, sys
from services.worker.clicks import drain_once
from shared import db
from shared.redis_client import create_redis

async def main():
    pool = await db.create_pool(sys.argv[1], max_size=2)
    redis = create_redis(sys.argv[2])
    while True:
        n = await drain_once(pool, redis, consumer="doomed", count=4)
        print(n, flush=True)

asyncio.run(main())
"""


async def test_kill_9_mid_drain_loses_and_double_counts_nothing(
    db: asyncpg.Pool, redis: Any, api: httpx.AsyncClient, tenant: Tenant, settings: Settings
) -> None:
    await drain_all(db, redis)
    phones = [random_phone() for _ in range(MESSAGES)]
    mids = [await message(api, tenant, p) for p in phones]
    rng = random.Random(4)
    all_clicks = []
    for e in range(ENTRIES):
        batch = []
        for i in range(PER_ENTRY):
            k = rng.randrange(MESSAGES)
            batch.append(click(tenant, at=T0 + timedelta(seconds=rng.randrange(100_000)), message_id=mids[k],
                               bot=rng.random() < 0.1))
        all_clicks += batch
        await xadd(redis, batch)
    total = len(all_clicks)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DOOMED, settings.database_url or "", settings.redis_url or "",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, preexec_fn=die_with_parent(),
    )
    drained_before_kill = 0
    try:
        assert proc.stdout is not None
        while drained_before_kill < total // 5:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, "the drainer exited"
            drained_before_kill += int(line)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert drained_before_kill < total, "the drainer finished before it could be killed"

    await drain_all(db, redis, consumer="rescuer")  # claims what "doomed" held (min_idle 0 here)

    stored = await db.fetch("SELECT id, message_id, is_bot FROM clicks WHERE account_id = $1", tenant.account_id)
    assert len(stored) == total
    assert {r["id"] for r in stored} == {c["id"] for c in all_clicks}

    humans = [c for c in all_clicks if not c["bot"]]
    first = {}
    for c in sorted(humans, key=lambda c: (c["at"], c["id"])):
        first.setdefault(c["m"], c["id"])
    got_first = dict(await db.fetch("SELECT message_id, click_id FROM message_clicks WHERE message_id = ANY($1)", mids))
    assert got_first == first

    per_message = Counter(c["m"] for c in humans)
    for mid, phone in zip(mids, phones):
        count = await db.fetchval(
            "SELECT click_count FROM contacts WHERE list_id = $1 AND phone_number = $2", tenant.list_id, phone
        )
        assert count == per_message[mid], mid
    pending = await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP)
    assert pending["pending"] == 0


async def test_a_drainer_killed_inside_its_transaction_leaves_its_entries_to_the_next(
    db: asyncpg.Pool, redis: Any, tenant: Tenant, settings: Settings
) -> None:
    """The kill above lands wherever the drainer happens to be once it has said how far it got,
    which is seldom inside a transaction: a drainer that acknowledged its entries before storing
    them passed it every time. Here the drainer is held inside its transaction (the first click's
    row held by another session, so its insert waits) and killed there: its entries must still be
    pending, and the next drainer stores every click."""
    await drain_all(db, redis)
    batch = [click(tenant, at=CLICKS_T0 + timedelta(seconds=n)) for n in range(5)]
    await xadd(redis, batch)
    async with row_held(settings.database_url or "",
                        "INSERT INTO clicks (id, account_id, clicked_at) VALUES ($1, $2, $3)",
                        batch[0]["id"], tenant.account_id, CLICKS_T0) as held:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DOOMED, settings.database_url or "", settings.redis_url or "",
            cwd=REPO, stdout=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent(),
        )
        try:
            await lock_waiters(db, 1)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await held.rollback()
    assert (await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP))["pending"] == 1
    await drain_all(db, redis, consumer="rescuer")
    stored = await db.fetchval("SELECT count(*) FROM clicks WHERE id = ANY($1::text[])", [c["id"] for c in batch])
    assert stored == len(batch)
    assert (await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP))["pending"] == 0

FROZEN = """
import asyncio, sys
import shared.db
shared.db.IDLE_IN_TRANSACTION_TIMEOUT = 2  # (its own is 30 s: a test need not wait that long)
from services.worker.clicks import run_drainer
from shared.redis_client import create_redis

async def main():
    pool = await shared.db.create_pool(sys.argv[1], max_size=2)
    await run_drainer({"db": pool, "redis_client": create_redis(sys.argv[2]), "click_consumer": "frozen"})

asyncio.run(main())
"""


async def test_a_drainer_frozen_mid_transaction_does_not_hold_its_clicks_for_good(
    db: asyncpg.Pool, redis: Any, tenant: Tenant, settings: Settings
) -> None:
    """A worker whose machine died (or whose process froze) in the middle of a drain sends
    PostgreSQL neither its COMMIT nor a FIN: its session sat idle in its transaction with the
    batch's clicks inserted, for as long as TCP keepalive took to notice (over two hours by
    default; never for a frozen process). Another worker claimed the entries once the heartbeat
    expired, and its insert waited on those rows until its command timeout, and again at every
    try: the clicks stayed out of PostgreSQL. Now PostgreSQL ends a session idle in a transaction
    after db.IDLE_IN_TRANSACTION_TIMEOUT (2 s in the frozen drainer), and the heir stores them."""
    await drain_all(db, redis)
    await ensure_group(redis)
    c = click(tenant, at=CLICKS_T0)
    await xadd(redis, [c])
    proc = None
    # The click's row held by another session: the drainer's insert waits there, inside its
    # transaction; frozen meanwhile, it never gets the insert's answer, nor sends its COMMIT.
    async with row_held(settings.database_url or "",
                        "INSERT INTO clicks (id, account_id, clicked_at) VALUES ($1, $2, $3)",
                        c["id"], tenant.account_id, CLICKS_T0) as held:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FROZEN, settings.database_url or "", settings.redis_url or "",
            cwd=REPO, preexec_fn=die_with_parent(),
        )
        try:
            for _ in range(1200):  # started (a loaded machine may take a while)
                if await redis.exists(HEARTBEAT_PREFIX + "frozen-0"):
                    break
                await asyncio.sleep(0.05)
            await lock_waiters(db, 1)
            proc.send_signal(signal.SIGSTOP)
            await held.rollback()
            heir = asyncio.create_task(run_drainer({"db": db, "redis_client": redis, "click_consumer": "heir"}))
            try:
                started = asyncio.get_running_loop().time()
                while not await db.fetchval("SELECT count(*) FROM clicks WHERE id = $1", c["id"]):
                    assert asyncio.get_running_loop().time() - started < HEARTBEAT_TTL_MS / 1000 + 15, \
                        "the frozen drainer's clicks were never stored"
                    await asyncio.sleep(0.1)
                while (await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP))["pending"]:
                    assert asyncio.get_running_loop().time() - started < HEARTBEAT_TTL_MS / 1000 + 25
                    await asyncio.sleep(0.1)
            finally:
                heir.cancel()
                await asyncio.gather(heir, return_exceptions=True)
        finally:
            proc.kill()
            await proc.wait()
    assert await db.fetchval("SELECT count(*) FROM clicks WHERE id = $1", c["id"]) == 1
