"""The gateway's /metrics says whether what it accepted is being worked off: postbacks stored and
not yet attributed (how many, and how long the oldest has waited) and the jobs queued for the
workers, read at each scrape. Workers down or behind show here long before missing revenue does."""
from __future__ import annotations

import asyncio
import re

from tests.helpers import metric_value
from tests.worker.conftest import burst_worker


async def test_postbacks_waiting_for_a_worker_show_in_the_gateways_metrics(api, db, settings, tenant):
    await burst_worker(settings)  # whatever earlier tests left is worked off first
    before = (await api.get("/metrics")).text
    assert metric_value(before, "trackly_postbacks_waiting") == 0
    assert metric_value(before, "trackly_postbacks_waiting_oldest_seconds") == 0
    assert metric_value(before, "trackly_worker_queue_jobs") == 0

    for n in range(3):
        resp = await api.get(f"/postback/{tenant.postback_token}", params={"click_id": "nope", "conversion_id": f"pm-{n}"})
        assert resp.json()["status"] == "accepted"
    duplicate = await api.get(f"/postback/{tenant.postback_token}", params={"click_id": "nope", "conversion_id": "pm-0"})
    assert duplicate.json()["status"] == "duplicate"  # stored, but nothing for a worker to do
    await asyncio.sleep(0.3)
    waiting = (await api.get("/metrics")).text
    assert metric_value(waiting, "trackly_postbacks_waiting") == 3
    assert 0.3 <= metric_value(waiting, "trackly_postbacks_waiting_oldest_seconds") < 60
    assert metric_value(waiting, "trackly_worker_queue_jobs") >= 1  # the attribution window's job
    pool = re.findall(r'^trackly_gateway_db_connections\{state="(busy|idle)"\} (\S+)$', waiting, re.MULTILINE)
    assert {state for state, _ in pool} == {"busy", "idle"} and sum(float(n) for _, n in pool) >= 1

    await burst_worker(settings)
    after = (await api.get("/metrics")).text
    assert metric_value(after, "trackly_postbacks_waiting") == 0
    assert metric_value(after, "trackly_postbacks_waiting_oldest_seconds") == 0
    assert metric_value(after, "trackly_worker_queue_jobs") == 0
    assert await db.fetchval(
        "SELECT count(*) FROM postbacks WHERE account_id = $1 AND NOT is_duplicate AND processed_at IS NOT NULL", tenant.account_id) == 3
