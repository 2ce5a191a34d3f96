"""``trackly worker``: arq worker settings, the pools it owns, and the background loops it runs.

Jobs (arq): ``process_postback`` (see ``shared/jobs.py``).
Loops started on start-up, for work that arq's one-job-per-message model would make slow:
the click drainer (Redis stream -> PostgreSQL in batches) and the postback sweeper (re-enqueues
stored postbacks whose job was never enqueued, e.g. Redis was down when they arrived), the
postback spool (postbacks the gateway kept in Redis while PostgreSQL was down, ``spool.py``), the
folding of the counting tables that triggers keep (``folding.py``), the expiry of old
Idempotency-Keys (``expiry.py``), and the check that the edge's offers are PostgreSQL's
(``edge_offers.py``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

import asyncpg
from arq import Worker
from arq.connections import ArqRedis, RedisSettings
from redis.exceptions import RedisError

from services.worker import attribution, clicks, edge_offers, expiry, folding, spool
from shared import db
from shared.logs import Throttled
from shared.migrate import SchemaBehind, migrate, require_current
from shared.redis_client import create_redis
from shared.runtime import exit_on_sigterm, with_backends
from shared.settings import Settings

log = logging.getLogger("trackly.worker")


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    # The pool first: its refusals (PostgreSQL full, the database missing) are DatabaseUnavailable,
    # a start failure tried again; shutdown closes it when the check below fails the start.
    ctx["db"] = await db.create_pool(settings.database_url, max_size=8)
    # A worker of a new release started before `trackly migrate` ran would fail its jobs on what
    # the migrations add: it waits for them, as for a server that is not there yet.
    async with ctx["db"].acquire() as conn:
        await require_current(conn)
        # The worker's batch plans, as the gateway's reports, are only as good as the statistics.
        ctx["postgres_problem"] = await db.warn_if_statistics_stale(conn)
    # The click drainer's own connections: arq runs up to 50 jobs at once, and after an outage (the
    # sweeper queues a job per waiting postback) they held every connection of the pool above,
    # batch after batch, while the drainer waited behind them (clicks drained ~60 times slower).
    ctx["click_db"] = await db.create_pool(settings.database_url, max_size=clicks.DRAIN_LOOPS)
    ctx["redis_client"] = create_redis(settings.redis_url)
    ctx["loops"] = [
        asyncio.create_task(clicks.run_drainer(ctx), name="click-drainer"),
        asyncio.create_task(attribution.run_sweeper(ctx), name="postback-sweeper"),
        asyncio.create_task(spool.run_spool_drainer(ctx), name="postback-spool"),
        asyncio.create_task(folding.run_folder(ctx), name="folder"),
        asyncio.create_task(expiry.run_expiry(ctx), name="expiry"),
        asyncio.create_task(edge_offers.run_offer_check(ctx), name="edge-offer-check"),
    ]
    ctx["up"] = True  # (run_until_stopped: a failure from here on is no failed start)


# How long shutdown waits for its loops to stop; they stop at once unless something is badly wrong,
# and then closing the pools below is still better than a worker that never exits. With the pool's
# close (db.CLOSE_TIMEOUT) it stays within trackly run's CHILD_STOP_TIMEOUT.
LOOP_STOP_TIMEOUT = 4.0


async def shutdown(ctx: dict[str, Any]) -> None:
    """Stop the loops, close the pools; a second call finds nothing left to do."""
    tasks: list[asyncio.Task[None]] = ctx.pop("loops", [])
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
        await ctx.pop("redis_client").aclose()
    # Both at once: each may wait its CLOSE_TIMEOUT (PostgreSQL hung), and one after the other
    # would take the stop past trackly run's limit.
    await asyncio.gather(*(db.close_pool(ctx.pop(name)) for name in ("click_db", "db") if name in ctx))


# Redis failing under arq's poll loop: a refused connection, a reset, a timeout, "loading the
# dataset" after a restart. A RedisError or an OSError.
REDIS_DOWN = (RedisError, OSError)
# A start that failed for want of a server (PostgreSQL refusing, or still starting, included), or
# of the migrations of its release.
START_FAILURES = (*REDIS_DOWN, asyncpg.CannotConnectNowError, SchemaBehind)
# How long the poll loop waits after a failed poll; how long between attempts to start at all.
POLL_RETRY_PAUSE = 1.0
# How long a stopping worker waits for each of arq's Redis calls (then the shutdown goes on).
REDIS_CLOSE_TIMEOUT = 3.0
START_RETRY_PAUSES = (1, 2, 4, 8, 15, 30)


class TracklyWorker(Worker):
    """arq's worker, riding out a Redis outage instead of exiting with it.

    arq lets an error of its poll loop end ``main`` (and the process): a worker on its own, with
    no supervisor to start it again, stayed down after a two-second Redis restart, and the clicks
    and postbacks it drains waited (safe in Redis and PostgreSQL) until someone noticed. Here a
    failed poll is logged (throttled) and tried again a second later; the background loops
    (clicks, sweeper, folding) already retry on their own. Jobs a failed poll did not start stay
    queued in Redis and are taken by a later poll."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._report_poll_failure = Throttled(log, logging.ERROR, "redis unavailable to the job poller (%s); polling again")

    async def close(self) -> None:
        """arq's close (arq 0.28), with its two Redis calls bounded and allowed to fail: with
        Redis down, deleting the health key raised and the worker's own shutdown (its loops, its
        pools) never ran; with Redis hung (it takes connections and answers nothing), arq's
        commands, which have no socket timeout, waited forever and the worker never exited."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        # The jobs (cancelled by the signal): arq's run_job then records the outcome through its
        # pool, which waits forever on a hung Redis; past the timeout the stop goes on without them
        # (a job not marked done is run again by the next worker: jobs are idempotent).
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks.values()), timeout=REDIS_CLOSE_TIMEOUT)
            if pending:
                log.warning("%d jobs had not finished when the worker stopped", len(pending))
        try:
            if self.ctx.get("up"):  # (a start that failed wrote no health key)
                await asyncio.wait_for(self.pool.delete(self.health_check_key), REDIS_CLOSE_TIMEOUT)
        except (*REDIS_DOWN, asyncio.TimeoutError) as exc:
            log.warning("redis unavailable while the worker stops (%s: %s)", type(exc).__name__, exc)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        pool, self._pool = self._pool, None
        with contextlib.suppress(*REDIS_DOWN, asyncio.TimeoutError):
            await asyncio.wait_for(pool.aclose(close_connection_pool=True), REDIS_CLOSE_TIMEOUT)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's, one job at a time, giving the job's slot back when Redis fails between taking
        it and starting the job: arq gives a slot back only on a WATCH conflict, so each outage
        that landed there took one of the worker's ``max_jobs`` slots for good (a worker that
        outlived 50 of them would start no job). Any error escaping a single job's start comes
        after its slot was taken (and before a task would own it)."""
        for job_id in job_ids:
            try:
                await super().start_jobs([job_id])
            except REDIS_DOWN:
                self.job_counter -= 1
                self.sem.release()
                raise

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except REDIS_DOWN as exc:
            self._report_poll_failure(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(POLL_RETRY_PAUSE)


def job_redis(url: str) -> ArqRedis:
    """arq's client built as every other Redis client here (``shared.redis_client``, its timeouts):
    arq makes its own without a socket timeout, and after a partition or a Redis host that vanished
    (a failover, a VM gone: no reset reaches the worker) the job poller waited on an unanswered
    command until the kernel gave up on the connection, ~15 minutes without a job although Redis
    answered again. Now the command fails within seconds and the next poll takes a new connection.
    Unbounded, as arq's own (50 jobs at once each write their result)."""
    return create_redis(url, max_connections=None, client_class=ArqRedis)  # type: ignore[return-value]


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker`` (tests build burst-mode workers from the same)."""
    return {
        "functions": attribution.FUNCTIONS,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "redis_pool": job_redis(settings.redis_url),
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
        run_until_stopped(settings)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def run_until_stopped(settings: Settings) -> None:
    """Run the worker until a signal stops it. One that cannot start because Redis (or
    PostgreSQL) is not there yet is started again, after 1, 2,
    4... up to 30 s: a worker that comes up before its Redis, or during a Redis restart, waits for
    it instead of exiting. A SIGINT or SIGTERM at any moment stops it."""
    attempt = 0
    stop: list[int] = []
    while True:
        worker = TracklyWorker(**worker_settings(settings))
        worker.on_stop = stop.append  # arq's handlers call it: a signal while a failed start closes
        started = time.monotonic()
        try:
            worker.run()
            return
        except START_FAILURES as exc:
            if worker.ctx.get("up"):
                raise  # it was up and running: not a start that failed
            reason = f"{type(exc).__name__}: {exc}"
        if stop:
            return
        attempt = 0 if time.monotonic() - started > 60 else attempt
        pause = START_RETRY_PAUSES[min(attempt, len(START_RETRY_PAUSES) - 1)]
        attempt += 1
        log.error("the worker could not start (%s); trying again in %d s", reason, pause)
        if _pause_unless_stopped(worker.loop, pause):
            return


def _pause_unless_stopped(loop: asyncio.AbstractEventLoop, seconds: float) -> bool:
    """Sleep on the worker's loop with SIGINT/SIGTERM handlers of our own (in place of arq's,
    which only cancel a run that is over): a signal during the pause, or one that arrived since
    the run ended and waits in the loop's signal pipe, ends it. True if a signal did."""
    sleeper = loop.create_task(asyncio.sleep(seconds))
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        signalled.append(signum)
        sleeper.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        loop.run_until_complete(sleeper)
    except asyncio.CancelledError:
        pass
    return bool(signalled)
