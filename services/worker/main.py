"""``trackly worker``: arq worker settings, the pools it owns, and the background loops it runs.

Jobs (arq): ``process_postback`` (see ``shared/jobs.py``).
Loops started on start-up, for work that arq's one-job-per-message model would make slow:
the click drainer (Redis stream -> PostgreSQL in batches) and the postback sweeper (re-enqueues
stored postbacks whose job was never enqueued, e.g. Redis was down when they arrived), and the
folding of the counting tables that triggers keep (``folding.py``).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq import run_worker
from arq.connections import RedisSettings

from services.worker import attribution, clicks, folding
from shared import db
from shared.migrate import migrate
from shared.redis_client import create_redis
from shared.runtime import exit_on_sigterm, with_backends
from shared.settings import Settings

log = logging.getLogger("trackly.worker")


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["db"] = await db.create_pool(settings.database_url, max_size=8)
    ctx["redis_client"] = create_redis(settings.redis_url)
    ctx["loops"] = [
        asyncio.create_task(clicks.run_drainer(ctx), name="click-drainer"),
        asyncio.create_task(attribution.run_sweeper(ctx), name="postback-sweeper"),
        asyncio.create_task(folding.run_folder(ctx), name="folder"),
    ]


# How long shutdown waits for its loops to stop; they stop at once unless something is badly wrong,
# and then closing the pools below is still better than a worker that never exits. With the pool's
# close (db.CLOSE_TIMEOUT) it stays within trackly run's CHILD_STOP_TIMEOUT.
LOOP_STOP_TIMEOUT = 4.0


async def shutdown(ctx: dict[str, Any]) -> None:
    tasks: list[asyncio.Task[None]] = ctx.get("loops", [])
    for task in tasks:
        task.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=LOOP_STOP_TIMEOUT)
        for task in pending:
            log.error("background loop %s did not stop within %s s", task.get_name(), LOOP_STOP_TIMEOUT)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("background loop %s had failed", task.get_name(), exc_info=task.exception())
    if "redis_client" in ctx:
        await ctx["redis_client"].aclose()
    if "db" in ctx:
        await db.close_pool(ctx["db"])


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker`` (tests build burst-mode workers from the same)."""
    return {
        "functions": attribution.FUNCTIONS,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "ctx": {"settings": settings},
        "max_jobs": 50,
        "job_timeout": 60,
        "max_tries": 10,
        "keep_result": 60,
        "handle_signals": True,
    }


def serve(settings: Settings) -> int:
    exit_on_sigterm()
    settings, embedded = with_backends(settings)
    try:
        if embedded is not None:
            asyncio.run(migrate(settings.database_url))
        run_worker(worker_settings(settings))  # arq takes the settings as a dict too
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
