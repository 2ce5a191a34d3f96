"""``trackly run``: everything on one laptop.

Starts the embedded PostgreSQL and Redis when no URLs are configured, migrates, then runs the
gateway, redirect and worker as child processes (the same commands SREs run separately). On
SIGINT / SIGTERM it stops the children, then the embedded servers, within 20 s.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from shared.migrate import migrate
from shared.runtime import with_backends
from shared.settings import Settings

CHILD_STOP_TIMEOUT = 12.0


def _child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["TRACKLY_DATABASE_URL"] = settings.database_url or ""
    env["TRACKLY_REDIS_URL"] = settings.redis_url or ""
    env["TRACKLY_GATEWAY_PORT"] = str(settings.gateway_port)
    env["TRACKLY_REDIRECT_PORT"] = str(settings.redirect_port)
    return env


def run_all(settings: Settings) -> int:
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    settings, embedded = with_backends(settings)
    children: dict[str, subprocess.Popen] = {}
    code = 0
    try:
        asyncio.run(migrate(settings.database_url))
        env = _child_env(settings)
        for name in ("worker", "redirect", "gateway"):
            children[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", name], env=env, start_new_session=True
            )
        print(
            f"trackly: gateway  http://{settings.gateway_host}:{settings.gateway_port}/api/v2\n"
            f"trackly: redirect http://{settings.redirect_host}:{settings.redirect_port}\n"
            f"trackly: database {settings.database_url}\ntrackly: redis    {settings.redis_url}\n"
            "trackly: Ctrl-C stops everything",
            flush=True,
        )
        while not stopping:
            for name, proc in children.items():
                if proc.poll() is not None:
                    print(f"trackly: {name} exited with {proc.returncode}; stopping", file=sys.stderr, flush=True)
                    stopping = True
                    code = 1
            time.sleep(0.2)
    finally:
        _stop_children(children)
        if embedded is not None:
            embedded.stop()
    return code


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


