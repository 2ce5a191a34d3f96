"""The worker's job slots survive Redis failing while a job is being started (arq gives a slot
back only on a WATCH conflict; each such failure used to cost the worker a slot for good)."""
from __future__ import annotations

import asyncio

import pytest
from arq import create_pool
from arq.connections import RedisSettings
from redis.exceptions import ConnectionError as RedisConnectionError

from services.worker.main import TracklyWorker, worker_settings


async def test_a_failed_start_of_a_job_gives_its_slot_back(settings, redis) -> None:
    worker = TracklyWorker(**{**worker_settings(settings), "handle_signals": False, "max_jobs": 2})
    pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    worker._pool = pool
    job = await pool.enqueue_job("process_postback", 0)
    assert job is not None
    pipeline = pool.pipeline

    def broken(*args, **kwargs):
        raise RedisConnectionError("Connection closed by server.")

    try:
        pool.pipeline = broken  # Redis goes away between reading the queue and marking the job
        for _ in range(5):  # more failed starts than the worker has slots
            with pytest.raises(RedisConnectionError):  # (a leaked slot: the start would wait forever)
                await asyncio.wait_for(worker.start_jobs([job.job_id.encode()]), 5)
        assert worker.job_counter == 0
        pool.pipeline = pipeline  # Redis is back: the job starts
        await worker.start_jobs([job.job_id.encode()])
        assert list(worker.tasks) == [job.job_id] and worker.job_counter == 1
        await worker.tasks[job.job_id]  # (it fails: no on_startup ran here; starting it is the point)
    finally:
        pool.pipeline = pipeline
        await pool.delete(worker.queue_name)
        await pool.aclose()


async def test_a_stop_does_not_wait_forever_for_a_job_that_cannot_finish(settings) -> None:
    """On a stop arq cancels the jobs, and a cancelled job then records its outcome through arq's
    pool, which waits forever on a hung Redis (found by review): the close goes on after a bound,
    and the worker's own shutdown still runs."""
    from services.worker.main import REDIS_CLOSE_TIMEOUT

    worker = TracklyWorker(**{**worker_settings(settings), "handle_signals": False})
    pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    worker._pool = pool
    released = asyncio.Event()

    async def stuck_job() -> None:  # as arq's run_job in asyncio.shield(finish_job(...)) on a hung Redis
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                continue

    worker.tasks["stuck"] = asyncio.create_task(stuck_job())
    shut_down: list[bool] = []
    worker.on_shutdown = lambda ctx: _record(shut_down)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await asyncio.wait_for(worker.close(), REDIS_CLOSE_TIMEOUT * 3)
        assert loop.time() - started < REDIS_CLOSE_TIMEOUT * 2 and shut_down == [True]
    finally:
        released.set()
        await worker.tasks["stuck"]
        if worker._pool is not None:
            await pool.aclose()


async def _record(shut_down: list[bool]) -> None:
    shut_down.append(True)
