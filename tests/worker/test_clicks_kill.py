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
from tests.helpers import Tenant, random_phone
from tests.worker.test_clicks import click, drain_all, message, xadd

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
