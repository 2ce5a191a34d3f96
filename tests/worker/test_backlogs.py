"""The worker after an outage, with clicks and postbacks both waiting."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import asyncpg

from services.worker import main as worker_main
from shared import db
from shared.settings import Settings
from tests.helpers import Tenant, postgres_link
from tests.worker.test_clicks import T0, click, drain_all, xadd


async def test_clicks_drain_while_jobs_hold_every_connection_of_the_workers_pool(
    db: asyncpg.Pool, redis: Any, settings: Settings, tenant: Tenant
) -> None:
    """After an outage the sweeper queues a job per waiting postback; 50 run at once, and each
    holds one of the pool's connections, batch after batch. The drainer queued for a connection
    behind them: with 100,000 postbacks and 300,000 clicks waiting, 10,000 clicks were drained in
    the 18 s the postbacks took (300,000 take 5 s alone), and the stream's age grew by as much.
    The drainer has connections of its own."""
    await drain_all(db, redis)
    ctx: dict[str, Any] = {"settings": settings}
    await worker_main.startup(ctx)
    held: list[Any] = []
    try:
        held = [await ctx["db"].acquire() for _ in range(ctx["db"].get_max_size())]  # busy jobs
        c = click(tenant, at=T0)
        await xadd(redis, [c])
        for _ in range(100):
            if await db.fetchval("SELECT count(*) FROM clicks WHERE id = $1", c["id"]):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the click waited for the jobs' connections")
    finally:
        for conn in held:
            await ctx["db"].release(conn)
        await worker_main.shutdown(ctx)


async def test_a_job_stops_taking_batches_before_arq_would_time_it_out(
    api: Any, db: asyncpg.Pool, settings: Settings, tenant: Tenant, monkeypatch: Any
) -> None:
    """After an outage 50 jobs work off the postbacks that waited, each taking batch after batch
    until one comes back short: with 500,000 waiting every one of them ran into arq's job_timeout
    (60 s) and was cancelled mid-batch (rolled back), 50 "process_postback failed, TimeoutError"
    tracebacks a minute. A job takes no further batch after JOB_SECONDS; the other jobs, the
    gateway's and the sweeper's, go on with what waits. (Here arq's timeout and the batches are
    made small.)"""
    from services.worker import attribution
    from tests.worker.conftest import burst_worker
    from tests.worker.test_attribution import postback

    for n in range(400):
        await postback(api, tenant, click_id=f"gone-{n}", conversion_id=f"backlog-{n}", payout="1")
    monkeypatch.setattr(attribution, "BATCH_SIZE", 1)
    monkeypatch.setattr(attribution, "JOB_SECONDS", 0.1, raising=False)
    worker = await burst_worker(settings, job_timeout=0.5)
    assert worker.jobs_complete >= 1 and worker.jobs_failed == 0
    assert await db.fetchval(
        "SELECT count(*) FROM postbacks WHERE account_id = $1 AND processed_at IS NOT NULL", tenant.account_id) > 0


async def test_a_worker_stops_in_time_while_postgresql_hangs(settings: Settings) -> None:
    """Each pool's close waits up to db.CLOSE_TIMEOUT for a PostgreSQL that answers nothing (a
    partition, a frozen VM) before it cuts the connections. The drainer's pool is closed beside
    the jobs', not after it: one after the other they would take the stop past trackly run's
    CHILD_STOP_TIMEOUT (12 s), which then kills the worker."""
    link, through = postgres_link(settings.database_url)
    await link.mend()
    ctx: dict[str, Any] = {"settings": replace(settings, database_url=through(link.port))}
    await worker_main.startup(ctx)
    try:
        await asyncio.sleep(0.5)
        await link.cut()
        started = time.monotonic()
        await worker_main.shutdown(ctx)
        assert time.monotonic() - started < db.CLOSE_TIMEOUT + 2
    finally:
        link.close()
