"""A real redirect on a private embedded Redis (AOF, ``appendfsync always``, as ``trackly run``'s)
under click load: Redis killed and restarted on its data, or the redirect killed while its Redis
has stopped answering. No click whose 302 was answered is lost."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
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


@dataclass
class Load:
    """CONCURRENCY clients clicking one tracker hop until ``done``: the click ids answered 302,
    how many were refused (503), and how many requests were sent."""

    tracker_path: str
    answered: list[str] = field(default_factory=list)
    refused: int = 0
    sent: int = 0
    done: bool = False

    async def client(self, client: httpx.AsyncClient) -> None:
        while not self.done:
            self.sent += 1
            try:
                resp = await client.get(self.tracker_path, headers={"host": "ct.localhost:8001", "user-agent": PHONE_UA})
            except httpx.TransportError:
                await asyncio.sleep(0.01)
                continue
            if resp.status_code == 302:
                self.answered.append(parse_qs(urlsplit(resp.headers["location"]).query)["click_id"][0])
            else:
                assert resp.status_code == 503, resp.text
                self.refused += 1
                await asyncio.sleep(0.01)

    async def until(self, predicate: Any) -> None:
        while not predicate():
            await asyncio.sleep(0.01)


@dataclass
class Edge:
    server: EmbeddedRedis
    redis: Any
    proc: subprocess.Popen
    port: int


@contextlib.asynccontextmanager
async def edge_on_private_redis(settings: Settings, db: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[Edge]:
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
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(600):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield Edge(server, redis, proc, port)
    finally:
        proc.kill()
        proc.wait(10)
        if server.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.process.pid, signal.SIGCONT)
        await redis.aclose()
        server.stop()


async def run_load(edge: Edge, load: Load, drive: Any) -> None:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge.port}", limits=limits, timeout=20) as client:
        await asyncio.wait_for(asyncio.gather(drive(), *(load.client(client) for _ in range(CONCURRENCY))), 150)


async def lost_clicks(db: asyncpg.Pool, edge: Edge, tenant: Tenant, load: Load) -> set[str]:
    """The answered clicks not in PostgreSQL once the private stream is drained."""
    while await drain_once(db, edge.redis, consumer="pytest", min_idle_ms=0):
        pass
    stored = {r["id"] for r in await db.fetch("SELECT id FROM clicks WHERE account_id = $1", tenant.account_id)}
    assert len(set(load.answered)) == len(load.answered)
    return set(load.answered) - stored


async def test_kill_9_of_redis_mid_load_loses_no_answered_click(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, settings: Settings, tmp_path: Path,
) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    load = Load(urlsplit(link["clickTrackerUrl"]).path)
    async with edge_on_private_redis(settings, db, tmp_path) as edge:

        async def drive() -> None:
            await load.until(lambda: len(load.answered) >= ANSWERED)
            assert edge.server.process is not None
            os.kill(edge.server.process.pid, signal.SIGKILL)
            edge.server.process.wait()
            before = load.refused  # (refused with 503 while it is down: no 302 without the click stored)
            await load.until(lambda: load.refused >= before + 20)
            edge.server.process = None
            edge.server.start()  # on its append-only file
            after = len(load.answered)
            await load.until(lambda: len(load.answered) >= after + ANSWERED)
            load.done = True

        await run_load(edge, load, drive)
        lost = await lost_clicks(db, edge, tenant, load)
    assert not lost, f"{len(lost)} of {len(load.answered)} answered clicks were lost"


async def test_kill_9_of_the_redirect_while_its_redis_hangs_loses_no_answered_click(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, settings: Settings, tmp_path: Path,
) -> None:
    """tests/redirect/test_kill.py kills the redirect under load, but on a Redis that answers in
    well under a millisecond its clicks reach Redis within moments of their 302 whatever the order:
    a redirect that answered 302 first and wrote the click after (as a task of its own) passed it
    every time. Here Redis stops answering (SIGSTOP) before the kill, so that clicks wait in the
    redirect: one answered before it is stored would be lost."""
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    load = Load(urlsplit(link["clickTrackerUrl"]).path)
    async with edge_on_private_redis(settings, db, tmp_path) as edge:

        async def drive() -> None:
            await load.until(lambda: len(load.answered) >= ANSWERED)
            assert edge.server.process is not None
            os.kill(edge.server.process.pid, signal.SIGSTOP)
            # Every client has sent a request since (each waits for its click to be stored, or,
            # answered anyway, goes on).
            sent = load.sent
            await load.until(lambda: load.sent >= sent + 2 * CONCURRENCY or load.refused)
            edge.proc.send_signal(signal.SIGKILL)
            edge.proc.wait(10)
            load.done = True
            os.kill(edge.server.process.pid, signal.SIGCONT)

        await run_load(edge, load, drive)
        lost = await lost_clicks(db, edge, tenant, load)
    assert not lost, f"{len(lost)} of {len(load.answered)} answered clicks were lost"
