"""`trackly worker` on its own (no `trackly run` to start it again) through Redis outages."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from arq import create_pool
from arq.connections import RedisSettings

from shared.embedded import EmbeddedRedis
from shared.process import die_with_parent
from tests.helpers import Link


async def _a_job_runs(redis_url: str, timeout: float = 40) -> bool:
    """A job enqueued now is run by the worker (a postback id that names nothing: it returns)."""
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        job = await pool.enqueue_job("process_postback", 0)
        assert job is not None
        return await job.result(timeout=timeout) is not None
    finally:
        await pool.aclose()


@contextlib.contextmanager
def _worker(settings, redis: EmbeddedRedis, log: Path, redis_url: str | None = None) -> Iterator[subprocess.Popen]:
    """`trackly worker` as its own process on ``redis`` (reached at ``redis_url`` if given), its
    output in ``log``; killed if still running at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKLY_")}
    env.update(TRACKLY_DATABASE_URL=settings.database_url, TRACKLY_REDIS_URL=redis_url or redis.url,
               TRACKLY_DATA_DIR=str(log.parent / "data"), TRACKLY_LOG_LEVEL="info")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "worker"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent())
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for_a_failed_start(log: Path) -> None:
    """Until arq has given up once and the worker says it will try again."""
    deadline = time.monotonic() + 30
    while "the worker could not start" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_worker_waits_for_redis_and_rides_out_its_restart(tmp_path: Path, settings) -> None:
    redis = EmbeddedRedis(tmp_path / "redis")
    log = tmp_path / "worker.log"
    try:
        with _worker(settings, redis, log) as proc:
            # Started before its Redis: the start fails, and the worker tries again.
            _wait_for_a_failed_start(log)
            time.sleep(1)
            assert proc.poll() is None, log.read_text()
            redis.start()
            assert asyncio.run(_a_job_runs(redis.url)), log.read_text()
            # Redis stops (a restart, an outage) while the worker polls: it stays up and carries on.
            redis.stop()
            time.sleep(3)
            assert proc.poll() is None, log.read_text()
            redis.start()
            assert asyncio.run(_a_job_runs(redis.url)), log.read_text()
            text = log.read_text()
            assert "the worker could not start" in text and "redis unavailable to the job poller" in text, text
            # And a stop is still a stop, with Redis up or down.
            redis.stop()
            time.sleep(1.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) in (0, 143), log.read_text()
    finally:
        redis.stop()


def test_a_worker_waiting_for_redis_stops_on_a_signal(tmp_path: Path, settings) -> None:
    redis = EmbeddedRedis(tmp_path / "redis")  # never started
    for signum in (signal.SIGINT, signal.SIGTERM):
        log = tmp_path / f"worker-{signum}.log"
        with _worker(settings, redis, log) as proc:
            _wait_for_a_failed_start(log)
            assert proc.poll() is None, log.read_text()
            proc.send_signal(signum)  # during its pause before trying again
            assert proc.wait(10) == 0, log.read_text()
            assert "Traceback" not in log.read_text()


def test_a_worker_stops_on_a_signal_while_its_redis_hangs(tmp_path: Path, settings) -> None:
    """A Redis that takes connections but answers nothing (stopped with SIGSTOP: a frozen VM, a
    partition): arq's own commands have no socket timeout, and its close waited on one forever."""
    redis = EmbeddedRedis(tmp_path / "redis")
    redis.start()
    log = tmp_path / "worker.log"
    try:
        with _worker(settings, redis, log) as proc:
            assert asyncio.run(_a_job_runs(redis.url)), log.read_text()
            assert redis.process is not None
            os.kill(redis.process.pid, signal.SIGSTOP)
            try:
                time.sleep(1)
                proc.send_signal(signal.SIGTERM)
                started = time.monotonic()
                assert proc.wait(30) in (0, 143), log.read_text()
                assert time.monotonic() - started < 20, log.read_text()  # trackly run's stop limit
            finally:
                os.kill(redis.process.pid, signal.SIGCONT)
    finally:
        redis.stop()


def test_a_worker_of_a_newer_release_waits_for_its_migrations(tmp_path: Path, settings) -> None:
    """Started on a database that lacks one of its migrations (deployed before `trackly migrate`
    ran), the worker runs no job and says why; once the migration is in, it starts by itself."""
    import secrets
    from dataclasses import replace
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    from shared.migrate import _migrations, migrate

    name = f"trackly_worker_behind_{secrets.token_hex(4)}"
    dsn = urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}"))
    admin_dsn = settings.database_url
    latest = _migrations()[-1][0]

    async def sql(url: str, statement: str, *args) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(statement, *args)
        finally:
            await conn.close()

    asyncio.run(sql(admin_dsn, f"CREATE DATABASE {name}"))
    redis = EmbeddedRedis(tmp_path / "redis")
    log = tmp_path / "worker.log"
    try:
        asyncio.run(migrate(dsn))
        asyncio.run(sql(dsn, "DELETE FROM schema_migrations WHERE version = $1", latest))
        redis.start()
        with _worker(replace(settings, database_url=dsn), redis, log) as proc:
            _wait_for_a_failed_start(log)
            text = log.read_text()
            assert f"SchemaBehind: 1 not applied ({latest}): run trackly migrate" in text, text
            with pytest.raises(asyncio.TimeoutError):  # no job runs meanwhile
                asyncio.run(_a_job_runs(redis.url, timeout=1.5))
            assert proc.poll() is None, log.read_text()
            asyncio.run(sql(dsn, "INSERT INTO schema_migrations (version) VALUES ($1)", latest))
            assert asyncio.run(_a_job_runs(redis.url)), log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) in (0, 143), log.read_text()
    finally:
        redis.stop()
        asyncio.run(sql(admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def test_a_worker_started_before_its_database_exists_waits_for_it(tmp_path: Path, settings) -> None:
    """A database not there yet is a server not there yet (db.DatabaseUnavailable: PostgreSQL
    down, starting, full, or the database missing): the worker tries again instead of exiting, and
    runs jobs once the database is created and migrated. The schema check that waits for the
    migrations connected on its own, and such a refusal ended the worker."""
    import secrets
    from dataclasses import replace
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    from shared.migrate import migrate

    name = f"trackly_worker_nodb_{secrets.token_hex(4)}"
    dsn = urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}"))

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    redis = EmbeddedRedis(tmp_path / "redis")
    log = tmp_path / "worker.log"
    try:
        redis.start()
        with _worker(replace(settings, database_url=dsn), redis, log) as proc:
            _wait_for_a_failed_start(log)
            assert proc.poll() is None, log.read_text()
            asyncio.run(sql(f"CREATE DATABASE {name}"))
            asyncio.run(migrate(dsn))
            assert asyncio.run(_a_job_runs(redis.url)), log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) in (0, 143), log.read_text()
    finally:
        redis.stop()
        asyncio.run(sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))



async def test_a_worker_whose_redis_vanished_without_a_word_runs_jobs_once_redis_is_back(tmp_path: Path, settings) -> None:
    """arq's own Redis connections had no socket timeout (every other client here has 5 s): after a
    partition or a lost Redis host, the job poller waited on its unanswered command until the
    kernel gave up on the connection (~15 minutes), running no postback job all along although
    Redis answered again; now its command fails within seconds and it polls on a new connection."""
    redis = EmbeddedRedis(tmp_path / "redis")
    redis.start()
    link = Link(str(redis.socket))
    await link.mend()
    log = tmp_path / "worker.log"
    try:
        with _worker(settings, redis, log, redis_url=f"redis://127.0.0.1:{link.port}/0") as proc:
            assert await _a_job_runs(redis.url), log.read_text()
            await link.cut()
            await asyncio.sleep(1)
            await link.mend()
            try:
                assert await _a_job_runs(redis.url, timeout=15), log.read_text()
            except asyncio.TimeoutError:
                raise AssertionError("no job ran once Redis was back:\n" + log.read_text()) from None
            assert proc.poll() is None, log.read_text()
    finally:
        link.close()
        redis.stop()
