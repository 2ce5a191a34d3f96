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
