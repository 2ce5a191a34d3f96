"""A real gateway whose PostgreSQL goes away (a partition, a failover: its link cut) keeps answering
postbacks 200; `kill -9`ed after, it loses none of them; a real worker stores and attributes them
all once PostgreSQL is reachable."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import replace

import httpx

from shared.postback_store import SPOOL_STREAM
from shared.process import die_with_parent
from tests.e2e.test_gateway_kill import REPO, Gateway
from tests.helpers import postgres_link


async def test_postbacks_through_a_postgresql_outage_are_all_stored_once(settings, db, redis, tenant, tmp_path):
    await redis.delete(SPOOL_STREAM)
    link, through = postgres_link(settings.database_url)
    await link.mend()
    gateway = Gateway(replace(settings, database_url=through(link.port)))
    worker = None
    try:
        await gateway.ready()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            first = await client.get(f"/postback/{tenant.postback_token}", params={"conversion_id": "e2e-0", "payout": "1.10"})
            assert first.json()["status"] == "accepted"
            await link.cut()  # its pooled connections now hang, new ones are refused
            answers = await asyncio.gather(*(
                client.get(f"/postback/{tenant.postback_token}", params={"conversion_id": f"e2e-{n}", "payout": "1.10"})
                for n in range(1, 21)
            ))
            assert [(a.status_code, a.json()["status"]) for a in answers] == [(200, "accepted")] * 20, answers[0].text
            assert (await client.get("/readyz/postbacks")).status_code == 200
        gateway.kill()  # kill -9: what it answered is in Redis already
        assert await redis.xlen(SPOOL_STREAM) == 20

        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKLY_")}
        env.update(TRACKLY_DATABASE_URL=settings.database_url, TRACKLY_REDIS_URL=settings.redis_url,
                   TRACKLY_DATA_DIR=str(tmp_path / "data"), TRACKLY_LOG_LEVEL="warning")
        with open(tmp_path / "worker.log", "w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "services.cli", "worker"], env=env, cwd=REPO, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent())
        for _ in range(300):
            processed = await db.fetchval(
                "SELECT count(*) FROM postbacks WHERE account_id = $1 AND processed_at IS NOT NULL", tenant.account_id)
            if processed == 21:
                break
            await asyncio.sleep(0.1)
        assert processed == 21, (tmp_path / "worker.log").read_text()
    finally:
        gateway.kill()
        link.close()
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    keys = await db.fetch("SELECT conversion_key FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert sorted(k["conversion_key"] for k in keys) == sorted(f"e2e-{n}" for n in range(21))
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE account_id = $1", tenant.account_id) == 21
    assert await redis.xlen(SPOOL_STREAM) == 0
