"""kill -9 of a real worker (``trackly worker``) while postbacks stream in and are processed: after
a second worker takes over, every postback is processed once, and every conversion's ledger sums
to exactly what its final status and payout are worth (no move written twice or lost)."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from shared.process import die_with_parent
from shared.settings import Settings
from tests.helpers import Tenant, make_offer, random_phone
from tests.worker.conftest import store_click
from tests.worker.test_clicks import message

REPO = Path(__file__).resolve().parents[2]
CONVERSIONS = 2500


async def _start_worker(settings: Settings) -> asyncio.subprocess.Process:
    env = {**os.environ, "TRACKLY_DATABASE_URL": settings.database_url or "", "TRACKLY_REDIS_URL": settings.redis_url or "",
           "TRACKLY_DATA_DIR": str(settings.data_dir)}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "worker", cwd=REPO, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent(),
    )


async def _stop(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        await asyncio.wait_for(proc.wait(), 25)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


async def test_kill_9_of_a_worker_mid_postbacks_moves_every_conversion_once(
    api: httpx.AsyncClient, db: asyncpg.Pool, redis: Any, tenant: Tenant, settings: Settings
) -> None:
    offer = await make_offer(api, tenant, payout=7)
    t0 = datetime.now(UTC) - timedelta(hours=1)
    mids = [await message(api, tenant, random_phone()) for _ in range(20)]
    clicks = [await store_click(db, tenant.account_id, m, t0, offer_id=offer["id"]) for m in mids]
    rng = random.Random(7)
    plans = []  # (conversion id, [(status, payout or None)], click ref)
    for n in range(CONVERSIONS):
        steps = [("pending", None)] if rng.random() < 0.5 else []
        steps.append(("approved", rng.choice([None, Decimal("3.5"), Decimal("12.25")])))
        if rng.random() < 0.3:
            steps.append(rng.choice([("reversed", None), ("rejected", None), ("approved", Decimal("1.01"))]))
        ref = rng.choice([clicks[n % len(clicks)], mids[n % len(mids)], "nope" + str(n)])
        plans.append((f"sale-{n}", steps, ref))

    async def post(round_: int) -> None:
        async def one(conv: str, status: str, payout: Decimal | None, ref: str) -> None:
            params = {"click_id": ref, "conversion_id": conv, "status": status, "network": "tune",
                      "timestamp": (t0 + timedelta(minutes=5)).isoformat()}
            if payout is not None:
                params["payout"] = str(payout)
            r = await api.get(f"/postback/{tenant.postback_token}", params=params)
            assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
        todo = [(conv, *steps[round_], ref) for conv, steps, ref in plans if round_ < len(steps)]
        for i in range(0, len(todo), 50):
            await asyncio.gather(*(one(*t) for t in todo[i:i + 50]))

    await post(0)
    await post(1)
    total = await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1", tenant.account_id)
    first = await _start_worker(settings)
    second = None
    try:
        done = 0
        for _ in range(3000):
            done = await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1"
                                     " AND processed_at IS NOT NULL", tenant.account_id)
            if done:
                break
            await asyncio.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        assert 0 < done < total, "the kill did not land mid-way"
        await post(2)
        second = await _start_worker(settings)
        for _ in range(600):
            waiting = await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1 AND processed_at IS NULL"
                                        " AND NOT is_duplicate", tenant.account_id)
            if not waiting:
                break
            await asyncio.sleep(0.1)
        assert waiting == 0
    finally:
        await _stop(first, signal.SIGKILL)
        if second is not None:
            await _stop(second, signal.SIGTERM)
        # The killed worker's job stays marked in progress until arq's timeout (about 70 s): no
        # worker of the run's later tests could take it, and each would wait for the queue to empty.
        # Its postbacks are the second worker's (the sweeper's); the job itself would change nothing.
        async for key in redis.scan_iter(match="arq:in-progress:*"):
            await redis.delete(key)

    assert await db.fetchval("SELECT count(*) FROM conversions WHERE account_id = $1", tenant.account_id) == CONVERSIONS
    # No postback wrote two ledger entries; each conversion's ledger is what it is worth.
    assert await db.fetchval(
        "SELECT count(*) FROM (SELECT postback_id FROM conversion_adjustments a JOIN conversions c ON c.id = a.conversion_id"
        " WHERE c.account_id = $1 AND postback_id IS NOT NULL GROUP BY postback_id HAVING count(*) > 1) d",
        tenant.account_id) == 0
    rows = await db.fetch(
        "SELECT c.conversion_key, c.status, c.payout, coalesce(sum(a.amount), 0) AS ledger FROM conversions c"
        " LEFT JOIN conversion_adjustments a ON a.conversion_id = c.id WHERE c.account_id = $1"
        " GROUP BY c.id", tenant.account_id)
    for r in rows:
        worth = r["payout"] if r["status"] == "approved" else Decimal(0)
        assert r["ledger"] == worth, dict(r)
    expected = {}
    for conv, steps, _ in plans:
        status = steps[0][0]
        for s, _p in steps[1:]:
            if status != "reversed":
                status = s if not (s == "pending" and status != "pending") else status
        expected[conv] = status
    assert {r["conversion_key"]: r["status"] for r in rows} == expected
