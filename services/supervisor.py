"""``trackly run``: everything on one laptop.

Starts the embedded PostgreSQL and Redis when no URLs are configured, migrates, then runs the
gateway, redirect and worker as child processes (the same commands SREs run separately). On
SIGINT / SIGTERM / SIGHUP it stops the children, then the embedded servers, within 20 s, also
while it is still starting them or migrating.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from urllib.parse import unquote_plus, urlsplit

from shared.migrate import migrate
from shared.process import die_with_parent
from shared.runtime import one_line, with_backends
from shared.settings import Settings

# A child's own shutdown is bounded within this: uvicorn's graceful 6 s, or the worker's loops 4 s,
# then db.CLOSE_TIMEOUT (5 s) for its pool. Past it the child is killed.
CHILD_STOP_TIMEOUT = 12.0
RESTART_AFTER = 10.0
# Restarts in a row, each exiting within RESTART_AFTER, after which a child is given up on: it
# cannot start again (its port taken since, a setting it now fails on), as systemd's start limit.
RESTART_LIMIT = 5


def _child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["TRACKLY_DATABASE_URL"] = settings.database_url or ""
    env["TRACKLY_REDIS_URL"] = settings.redis_url or ""
    env["TRACKLY_GATEWAY_PORT"] = str(settings.gateway_port)
    env["TRACKLY_REDIRECT_PORT"] = str(settings.redirect_port)
    return env


def run_all(settings: Settings) -> int:
    stopping = False
    starting = True

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if starting and not stopping:
            # Starting the embedded servers or migrating (a migration may wait for its locks for
            # a minute and more): interrupt it; the finally below stops what did start. Only once:
            # a second signal (Ctrl-C again) raised in that finally, or in pgserver's at exit, and
            # left the embedded PostgreSQL running.
            stopping = True
            raise SystemExit(128 + signum)
        stopping = True

    # SIGHUP: the terminal it runs in was closed. Its children go anyway (they die with it), but
    # the embedded PostgreSQL is a daemon: only the finally below stops it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)

    children: dict[str, subprocess.Popen] = {}
    embedded = None
    code = 0
    try:
        settings, embedded = with_backends(settings)
        try:
            asyncio.run(migrate(settings.database_url))
        except Exception as exc:  # an unreachable database: one line, as `trackly migrate` says it
            print(f"error: migrate: {one_line(exc)}", file=sys.stderr, flush=True)
            return 2
        env = _child_env(settings)

        def start(name: str) -> subprocess.Popen:
            # Own sessions: Ctrl-C reaches only this process, which stops them in order. And they
            # get SIGTERM if this process is killed, so they never outlive it.
            return subprocess.Popen([sys.executable, "-m", "services.cli", name], env=env, start_new_session=True,
                                    preexec_fn=die_with_parent())

        starting = False  # from here on a signal stops the children in order (the loop below)
        for name in ("worker", "redirect", "gateway"):
            if stopping:
                break
            children[name] = start(name)
        gateway = f"http://{settings.gateway_host}:{settings.gateway_port}"
        redirect = f"http://{settings.redirect_host}:{settings.redirect_port}"
        print(  # (the API's base URL is no page: each service's /readyz is one to open)
            f"trackly: gateway  {gateway}/api/v2 (ready: {gateway}/readyz)\n"
            f"trackly: redirect {redirect} (ready: {redirect}/readyz)\n"
            f"trackly: database {_without_password(settings.database_url)}\n"
            f"trackly: redis    {_without_password(settings.redis_url)}\n"
            "trackly: Ctrl-C stops everything",
            flush=True,
        )
        restarts = _Restarts(time.monotonic())
        while not stopping:
            now = time.monotonic()
            dead = embedded.dead() if embedded is not None else None
            if dead is not None:
                # Restarting the services cannot help (the worker would be restarted forever), and
                # a process manager that restarts trackly run brings the server back with them.
                print(f"trackly: the embedded {dead} exited; stopping", file=sys.stderr, flush=True)
                code = 1
                break
            for name, proc in list(children.items()):
                if proc.poll() is None:
                    continue
                if restarts.waiting(name):
                    if restarts.due(name, now):
                        children[name] = start(name)
                        restarts.started(name, now)
                    continue
                delay = restarts.exited(name, now)
                if delay is None:
                    when = (f"again, within {RESTART_AFTER:.0f} s of each of {RESTART_LIMIT} restarts in a row"
                            if restarts.ran(name) else "while starting")
                    print(f"trackly: {name} exited with {proc.returncode} {when}; stopping",
                          file=sys.stderr, flush=True)
                    stopping = True
                    code = 1
                    break
                print(f"trackly: {name} exited with {proc.returncode}; restarting it in {delay:.0f} s",
                      file=sys.stderr, flush=True)
            time.sleep(0.2)
    finally:
        _stop_children(children)
        if embedded is not None:
            embedded.stop()
    return code


class _Restarts:
    """When a child that exited is started again, as a process manager would (a worker whose Redis
    restarted, say): a child that has run for RESTART_AFTER seconds is restarted after 1, 2, 4, 8
    and 16 s while it keeps failing; one that exits before ever running that long is failing to
    start (a port in use, a bad setting) and stops everything, and so does one whose RESTART_LIMIT
    restarts in a row all failed so, rather than being restarted every 30 s for good while the rest
    served without it."""

    def __init__(self, now: float) -> None:
        self._started: dict[str, float] = {}
        self._proven: set[str] = set()
        self._failures: dict[str, int] = {}
        self._due: dict[str, float] = {}
        self._first = now

    def started(self, name: str, now: float) -> None:
        self._started[name] = now
        self._due.pop(name, None)

    def waiting(self, name: str) -> bool:
        return name in self._due

    def due(self, name: str, now: float) -> bool:
        return name in self._due and now >= self._due[name]

    def ran(self, name: str) -> bool:
        """Whether it has once run for RESTART_AFTER seconds."""
        return name in self._proven

    def exited(self, name: str, now: float) -> float | None:
        """Seconds until it is started again, or None: it failed to start (again)."""
        ran = now - self._started.get(name, self._first)
        if ran >= RESTART_AFTER:
            self._proven.add(name)
            self._failures[name] = 0
        failures = self._failures.get(name, 0)
        if name not in self._proven or failures >= RESTART_LIMIT:
            return None
        delay = 2.0 ** failures
        self._failures[name] = failures + 1
        self._due[name] = now + delay
        return delay


_QUERY_PARAM = re.compile(r"([?&])([^=&#]*)=([^&#]*)")


def _without_password(url: str | None) -> str:
    """A URL fit to print: its password, in the authority or in a query parameter (libpq, asyncpg
    and redis-py read ``password``, ``sslpassword``), replaced by ***."""
    url = url or ""
    password = urlsplit(url).password
    if password:
        url = url.replace(f":{password}@", ":***@", 1)
    return _QUERY_PARAM.sub(_mask_password_param, url)


def _mask_password_param(match: re.Match[str]) -> str:
    """``password=``, ``sslpassword=``..., however it is percent-encoded (``pass%77ord``)."""
    if unquote_plus(match.group(2)).lower().endswith("password"):
        return f"{match.group(1)}{match.group(2)}=***"
    return match.group(0)


def _stop_children(children: dict[str, subprocess.Popen]) -> None:
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + CHILD_STOP_TIMEOUT
    for proc in children.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


