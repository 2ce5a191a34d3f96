"""kill -9 of real workers, again and again, while clicks stream in from the edge and postbacks
that name them arrive before, during and after their drain: once a worker is left running,
every click is stored once, every conversion is credited to the click it names, once, and each
conversion's ledger is what it is worth."""
from __future__ import annotations

import asyncio
import random
import signal
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx

from shared import edge
from shared.settings import Settings
from tests.helpers import Tenant, make_offer, random_phone
from tests.worker.test_clicks import click, drain_all, message, xadd
from tests.worker.test_postbacks_kill import _start_worker, _stop

MESSAGES, CONVERSIONS, KILLS = 30, 150, 3


async def test_kill_9_of_workers_mid_pipeline_loses_and_doubles_nothing(
    api: httpx.AsyncClient, db: asyncpg.Pool, redis: Any, tenant: Tenant, settings: Settings
) -> None:
    await drain_all(db, redis)
    offer = await make_offer(api, tenant, payout=5)
    rng = random.Random(11)
    phones = [random_phone() for _ in range(MESSAGES)]
    mids = [await message(api, tenant, p) for p in phones]
    t0 = datetime.now(UTC) - timedelta(hours=3)
    clicks = []
    for mid in mids:
        for _ in range(rng.randint(1, 3)):
            clicks.append(dict(click(tenant, at=t0 + timedelta(seconds=rng.randrange(3600)), message_id=mid),
                               o=offer["id"]))
    rng.shuffle(clicks)
    plans = []  # (conversion id, what it names: a click id or a message id, payout given or None)
    for n in range(CONVERSIONS):
        named = rng.choice(clicks)["id"] if rng.random() < 0.7 else rng.choice(mids)
        plans.append((f"sale-{n}", named, rng.choice([None, Decimal("12.5")])))

    async def post(conv: str, named: str, payout: Decimal | None) -> None:
        params = {"click_id": named, "conversion_id": conv, "status": "approved", "network": "tune",
                  "timestamp": (t0 + timedelta(hours=2)).isoformat()}
        if payout is not None:
            params["payout"] = str(payout)
        r = await api.get(f"/postback/{tenant.postback_token}", params=params)
        assert r.status_code == 200 and r.json()["status"] == "accepted", r.text

    async def feed() -> None:
        """Clicks and postbacks in small slices, interleaved, a moment apart."""
        todo_clicks, todo_posts = list(clicks), list(plans)
        while todo_clicks or todo_posts:
            if todo_clicks:
                await xadd(redis, [todo_clicks.pop() for _ in range(min(5, len(todo_clicks)))])
            for _ in range(min(6, len(todo_posts))):
                await post(*todo_posts.pop())
            await asyncio.sleep(0.02)

    ids = [c["id"] for c in clicks]

    async def stored_clicks() -> int:
        return await db.fetchval("SELECT count(*) FROM clicks WHERE id = ANY($1::text[])", ids)

    async def progress() -> int:
        stored = await stored_clicks()
        done = await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1 AND processed_at IS NOT NULL",
                                 tenant.account_id)
        return stored + done

    workers = []
    feeding = asyncio.create_task(feed())
    try:
        for _ in range(KILLS):
            worker = await _start_worker(settings)
            workers.append(worker)
            goal = await progress() + rng.randint(1, 40)
            for _ in range(3000):  # until this worker has done something
                if await progress() >= goal:
                    break
                await asyncio.sleep(0.01)
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
        await feeding
        last = await _start_worker(settings)
        workers.append(last)
        for _ in range(900):
            waiting = await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1 AND processed_at IS NULL"
                                        " AND NOT is_duplicate", tenant.account_id)
            stored = await stored_clicks()
            unattributed = await db.fetchval("SELECT count(*) FROM conversions WHERE account_id = $1 AND NOT attributed",
                                             tenant.account_id)
            # (and the killed workers' entries claimed: stored by them or now, acknowledged now)
            pending = (await redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP))["pending"]
            if not waiting and stored == len(clicks) and not unattributed and not pending:
                break
            await asyncio.sleep(0.1)
        assert (waiting, stored, unattributed, pending) == (0, len(clicks), 0, 0)
    finally:
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        for worker in workers:
            await _stop(worker, signal.SIGTERM if worker is workers[-1] else signal.SIGKILL)
        async for key in redis.scan_iter(match="arq:in-progress:*"):
            await redis.delete(key)

    first: dict[str, dict[str, Any]] = {}
    for c in sorted(clicks, key=lambda c: (c["at"], c["id"])):
        first.setdefault(c["m"], c)
    assert dict(await db.fetch("SELECT message_id, click_id FROM message_clicks WHERE message_id = ANY($1)", mids)) == \
        {m: c["id"] for m, c in first.items()}
    for mid, phone in zip(mids, phones):
        assert await db.fetchval("SELECT click_count FROM contacts WHERE list_id = $1 AND phone_number = $2",
                                 tenant.list_id, phone) == sum(c["m"] == mid for c in clicks)
    by_id = {c["id"]: c for c in clicks}
    rows = {r["conversion_key"]: r for r in await db.fetch(
        "SELECT c.conversion_key, c.message_id, c.payout, c.status, coalesce(sum(a.amount), 0) AS ledger"
        " FROM conversions c LEFT JOIN conversion_adjustments a ON a.conversion_id = c.id"
        " WHERE c.account_id = $1 GROUP BY c.id", tenant.account_id)}
    assert len(rows) == CONVERSIONS
    for conv, named, payout in plans:
        r = rows[conv]
        expected_message = by_id[named]["m"] if named in by_id else named
        assert (r["message_id"], r["status"], r["payout"], r["ledger"]) == \
            (expected_message, "approved", payout or Decimal(5), payout or Decimal(5)), (conv, dict(r))
