"""kill -9 of the real redirect (``python -m services.cli redirect``) under concurrent load loses
no click whose 302 was answered."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest

from shared.process import die_with_parent
from shared.settings import Settings
from tests.helpers import Tenant, free_port
from tests.redirect.conftest import PHONE_UA, drain, offer_and_link

REPO = Path(__file__).resolve().parents[2]
ANSWERED_BEFORE_KILL = 400
CONCURRENCY = 32


@pytest.fixture
def redirect_process(settings: Settings) -> Iterator[tuple[subprocess.Popen, int]]:
    port = free_port()
    env = dict(
        os.environ,
        TRACKLY_DATABASE_URL=settings.database_url or "",
        TRACKLY_REDIS_URL=settings.redis_url or "",
        TRACKLY_REDIRECT_PORT=str(port),
        TRACKLY_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "redirect"], env=env, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent(),
    )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def _wait_ready(port: int, proc: subprocess.Popen) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            assert proc.poll() is None, "the redirect exited during start-up"
            try:
                if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the redirect did not become ready")


async def test_kill_9_mid_load_loses_no_answered_click(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, redis: object,
    redirect_process: tuple[subprocess.Popen, int],
) -> None:
    proc, port = redirect_process
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    tracker_path = urlsplit(link["clickTrackerUrl"]).path
    await _wait_ready(port, proc)

    answered: list[str] = []
    killed = asyncio.Event()

    async def load(client: httpx.AsyncClient) -> None:
        while True:
            try:
                resp = await client.get(tracker_path, headers={"host": "ct.localhost:8001", "user-agent": PHONE_UA})
            except httpx.TransportError:
                if killed.is_set():
                    return
                raise
            assert resp.status_code == 302, resp.text
            answered.append(parse_qs(urlsplit(resp.headers["location"]).query)["click_id"][0])
            if len(answered) >= ANSWERED_BEFORE_KILL and not killed.is_set():
                os.kill(proc.pid, signal.SIGKILL)
                killed.set()

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=10) as client:
        await asyncio.wait_for(asyncio.gather(*(load(client) for _ in range(CONCURRENCY))), 120)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL

    await drain(db, redis)
    stored = {r["id"] for r in await db.fetch("SELECT id FROM clicks WHERE account_id = $1", tenant.account_id)}
    assert len(answered) >= ANSWERED_BEFORE_KILL
    assert len(set(answered)) == len(answered)
    missing = set(answered) - stored
    assert not missing, f"{len(missing)} of {len(answered)} answered clicks were lost"
    # Clicks recorded but never answered (killed between the write and the 302) may exist; no others.
    assert len(stored) <= len(answered) + CONCURRENCY
