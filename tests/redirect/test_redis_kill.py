"""kill -9 of the edge's Redis (the embedded one: AOF, ``appendfsync always``) under click load,
then a restart on the same data: no click whose 302 was answered is lost."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx

from services.worker.clicks import drain_once
from shared.embedded import EmbeddedRedis
from shared.process import die_with_parent
from shared.redis_client import create_redis
from shared.republish import republish
from shared.settings import Settings
from tests.helpers import Tenant, free_port
from tests.redirect.conftest import PHONE_UA, offer_and_link

REPO = Path(__file__).resolve().parents[2]
CONCURRENCY = 32
ANSWERED = 300


async def test_kill_9_of_redis_mid_load_loses_no_answered_click(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, settings: Settings, tmp_path: Path,
) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    tracker_path = urlsplit(link["clickTrackerUrl"]).path
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    redis = create_redis(server.url)
    port = free_port()
    env = dict(os.environ, TRACKLY_DATABASE_URL=settings.database_url or "", TRACKLY_REDIS_URL=server.url,
               TRACKLY_REDIRECT_PORT=str(port), TRACKLY_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "redirect"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent())
    try:
        async with db.acquire() as conn:
            await republish(conn, redis)
        answered: list[str] = []
        refused = 0
        phase = {"done": False}

        async def load(client: httpx.AsyncClient) -> None:
            nonlocal refused
            while not phase["done"]:
                try:
                    resp = await client.get(tracker_path, headers={"host": "ct.localhost:8001", "user-agent": PHONE_UA})
                except httpx.TransportError:
                    await asyncio.sleep(0.01)
                    continue
                if resp.status_code == 302:
                    answered.append(parse_qs(urlsplit(resp.headers["location"]).query)["click_id"][0])
                else:
                    assert resp.status_code == 503, resp.text
                    refused += 1
                    await asyncio.sleep(0.01)

        async def drive() -> None:
            while len(answered) < ANSWERED:
                await asyncio.sleep(0.01)
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait()
            before = refused  # (refused with 503 while it is down: no 302 without the click stored)
            while refused < before + 20:
                await asyncio.sleep(0.01)
            server.process = None
            server.start()  # on its append-only file
            after = len(answered)
            while len(answered) < after + ANSWERED:
                await asyncio.sleep(0.01)
            phase["done"] = True

        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=20) as client:
            for _ in range(300):
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            await asyncio.wait_for(asyncio.gather(drive(), *(load(client) for _ in range(CONCURRENCY))), 150)
        while await drain_once(db, redis, consumer="pytest", min_idle_ms=0):
            pass
        stored = {r["id"] for r in await db.fetch("SELECT id FROM clicks WHERE account_id = $1", tenant.account_id)}
        assert len(set(answered)) == len(answered)
        missing = set(answered) - stored
        assert not missing, f"{len(missing)} of {len(answered)} answered clicks were lost"
    finally:
        proc.kill()
        proc.wait(10)
        await redis.aclose()
        server.stop()
