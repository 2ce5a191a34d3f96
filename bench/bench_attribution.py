"""Attribution: postbacks accepted/s at the gateway, conversions attributed/s by one worker, and
history imports rows/s — each next to a floor measured in the same run.

Floors: a bare ASGI app through the same in-process client (requests/s), and a plain asyncpg
``unnest`` insert of 1000 rows (rows/s).
"""
from __future__ import annotations

import asyncio
import secrets
import time
import warnings
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import arq
import asyncpg
import httpx
from arq import create_pool
from arq.connections import RedisSettings

from bench.common import BenchEnv, bare_asgi, ratio, request_rate, stack_ceiling, unnest_floor
from services.gateway.app import create_app
from services.gateway.routes import history
from services.worker.main import worker_settings
from services.worker.spool import drain_spool_once
from shared import db as shared_db
from shared import ids
from shared.accounts import create_account, create_list
from shared.jobs import ATTRIBUTION_WINDOW, PROCESS_POSTBACK
from shared.postback_store import SPOOL_STREAM

CONCURRENCY = 20
CONVERSIONS = 20_000
ROUNDS = 6


async def _clear_jobs(redis_url: str) -> None:
    """Forget the jobs the gateway figure enqueued (their postbacks are marked processed)."""
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        keys = [k async for k in pool.scan_iter(match="arq:job:attribute:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await pool.delete(*keys[i:i + 1000])
        await pool.delete("arq:queue")
    finally:
        await pool.aclose()


async def _seed_clicked_postbacks(pool, account_id: int, list_id: int, n: int) -> list[int]:
    """n messages, each with a first human click, and one stored postback naming each click."""
    now = datetime.now(UTC)
    mids = [f"b{i:07d}" for i in range(n)]
    clicks = [secrets.token_hex(16) for _ in range(n)]
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(
            "messages", columns=("id", "account_id", "list_id", "to_phone", "body", "sent_at"),
            records=[(m, account_id, list_id, f"+1415{i:07d}", "x", now - timedelta(hours=2)) for i, m in enumerate(mids)],
        )
        await conn.copy_records_to_table(
            "clicks", columns=("id", "account_id", "list_id", "message_id", "clicked_at"),
            records=[(c, account_id, list_id, m, now - timedelta(hours=1)) for c, m in zip(clicks, mids)],
        )
        await conn.copy_records_to_table(
            "message_clicks", columns=("message_id", "click_id", "account_id", "clicked_at"),
            records=[(m, c, account_id, now - timedelta(hours=1)) for c, m in zip(clicks, mids)],
        )
        rows = await conn.fetch(
            "INSERT INTO postbacks (account_id, method, params, conversion_key, click_id, status, payout, converted_at, dedupe_key)"
            " SELECT $1, 'GET', '{}', 'bc' || i, c, 'approved', 1.25, now(), 'bench' || i"
            " FROM unnest($2::text[]) WITH ORDINALITY AS t(c, i) RETURNING id",
            account_id, clicks,
        )
    return [r["id"] for r in rows]


async def _worker_rate(env: BenchEnv, pool, account_id: int, list_id: int) -> tuple[float, float]:
    ids = await _seed_clicked_postbacks(pool, account_id, list_id, CONVERSIONS)
    # The jobs the gateway enqueues when these postbacks arrive within one second: one per
    # ATTRIBUTION_WINDOW (each job takes what is waiting, a batch at a time).
    windows = round(1 / ATTRIBUTION_WINDOW)
    arq_pool = await create_pool(RedisSettings.from_dsn(env.settings.redis_url))
    try:
        for w in range(windows):
            first = ids[w * len(ids) // windows]
            await arq_pool.enqueue_job(PROCESS_POSTBACK, first, _job_id=f"bench-window:{w}")
    finally:
        await arq_pool.aclose()
    worker = arq.Worker(**{**worker_settings(env.settings), "handle_signals": False}, burst=True, poll_delay=0.05)
    all_done = 0.0
    start = time.perf_counter()

    async def watch() -> None:
        nonlocal all_done
        while await pool.fetchval("SELECT count(*) FROM postbacks WHERE processed_at IS NULL AND NOT is_duplicate"):
            await asyncio.sleep(0.02)
        all_done = time.perf_counter() - start

    watcher = asyncio.create_task(watch())
    try:
        await worker.main()
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
            await worker.close()
    burst = time.perf_counter() - start
    await watcher
    attributed = await pool.fetchval("SELECT count(*) FROM conversions WHERE account_id = $1 AND attributed", account_id)
    assert attributed == CONVERSIONS, attributed
    return attributed / all_done, attributed / burst


async def _history_rate(
    api: httpx.AsyncClient, dsn: str, account_id: int, list_id: int, offer_id: str
) -> tuple[float, float, float, float, float, float]:
    """Best rows/s of each import, of the click import's own statement, of the unnest floor and of
    the stack ceiling, over ROUNDS turns of all six (drift on a shared machine lands on all of them
    alike)."""
    best_sends = best_clicks = best_revenue = best_click_sql = best_floor = best_ceiling = 0.0
    for r in range(ROUNDS):
        sends = [{"to": f"+1415{r:02d}{i:05d}", "list_id": list_id, "offer_id": offer_id, "body": "old",
                  "timestamp": "2025-11-15T14:30:00Z"} for i in range(1000)]
        start = time.perf_counter()
        resp = await api.post("/api/v2/history/sends", json={"records": sends})
        best_sends = max(best_sends, 1000 / (time.perf_counter() - start))
        assert resp.json()["success_count"] == 1000, resp.text
        resp = await api.post("/api/v2/send/bulk", json={"messages": [{**s, "body": "x"} for s in sends]})
        mids = [(m["message_id"], m["to"]) for m in resp.json()["messages"]]
        clicks = [{"message_id": m, "offer_id": offer_id, "phone_number": to, "timestamp": "2025-11-15T14:35:22Z"}
                  for m, to in mids]
        start = time.perf_counter()
        resp = await api.post("/api/v2/history/clicks", json={"records": clicks})
        best_clicks = max(best_clicks, 1000 / (time.perf_counter() - start))
        assert resp.json()["success_count"] == 1000, resp.text
        revenue = [{"message_id": m, "revenue": "1.10", "attribution_type": "sale", "external_id": f"r{r}-{i}",
                    "timestamp": "2025-11-16T00:00:00Z"} for i, (m, _) in enumerate(mids)]
        start = time.perf_counter()
        resp = await api.post("/api/v2/history/revenue", json={"records": revenue})
        best_revenue = max(best_revenue, 1000 / (time.perf_counter() - start))
        assert resp.json()["success_count"] == 1000, resp.text
        # The click import's own statement alone, for another 1000 messages' first clicks.
        resp = await api.post("/api/v2/send/bulk", json={"messages": [
            {"to": f"+1415{r:02d}9{i:04d}", "list_id": list_id, "body": "x"} for i in range(1000)]})
        records = [history.ClickRecord(i, m["message_id"], offer_id, {}, datetime(2025, 11, 15, 14, 35, tzinfo=UTC),
                                       offer_id, "h" + c, list_id, m["to"])
                   for i, (m, c) in enumerate(zip(resp.json()["messages"], ids.click_ids(1000)))]
        conn = await asyncpg.connect(dsn)
        try:
            start = time.perf_counter()
            assert len(await history._store_clicks(conn, account_id, records)) == 1000
            best_click_sql = max(best_click_sql, 1000 / (time.perf_counter() - start))
        finally:
            await conn.close()
        best_floor = max(best_floor, await unnest_floor(dsn, rounds=2))  # (its first statement prepares)
        best_ceiling = max(best_ceiling, await stack_ceiling(dsn, rounds=2))
    return best_sends, best_clicks, best_revenue, best_click_sql, best_floor, best_ceiling


async def _spool_rates(settings, pool, token: str) -> tuple[float, float]:
    """Postbacks/s a gateway whose PostgreSQL is unreachable answers (each spooled), and postbacks/s
    one worker's drain then stores from the spool."""
    down = create_app(replace(settings, database_url="postgresql://postgres@127.0.0.1:1/unreachable"))
    async with down.router.lifespan_context(down):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=down), base_url="http://g") as client:
            rps = await request_rate(client, lambda c: c.get(f"/postback/{token}", params={
                "click_id": secrets.token_hex(16), "txid": secrets.token_hex(8), "payout": "2.50"}),
                concurrency=CONCURRENCY, ok=200)
        redis = down.state.redis
        waiting = await redis.xlen(SPOOL_STREAM)
        start = time.perf_counter()
        stored = 0
        while n := await drain_spool_once(pool, redis):
            stored += n
        assert stored == waiting
    return rps, stored / (time.perf_counter() - start)


async def _main(env: BenchEnv) -> list[str]:
    settings = env.settings
    pool = await shared_db.create_pool(settings.database_url)
    async with pool.acquire() as conn:
        acct = await create_account(conn, "bench-attribution")
        lst = await create_list(conn, account_id=acct["account_id"], name="bench", phone="+18005550198",
                                short_domain="https://sms.bench-attr.test")
    headers = {"X-Api-Key": acct["api_key"]}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=bare_asgi(200, b'{"success":true,"status":"accepted"}')), base_url="http://b") as bare:
        floor_rps = await request_rate(bare, lambda c: c.get("/postback/x?click_id=1"), concurrency=CONCURRENCY, ok=200)

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g", headers=headers) as api:
            url = f"/postback/{acct['postback_token']}"
            postback_rps = await request_rate(api, lambda c: c.get(url, params={
                "click_id": secrets.token_hex(16), "txid": secrets.token_hex(8), "payout": "2.50"}),
                concurrency=CONCURRENCY, ok=200)
            offer = (await api.post("/api/v2/offers", json={"name": "b", "destination_url": "https://e.com/"})).json()["offer"]
            sends_rps, clicks_rps, revenue_rps, click_sql, floor_rows, ceiling = await _history_rate(
                api, settings.database_url, acct["account_id"], lst["list_id"], offer["id"])

    spooled_rps, drained_rate = await _spool_rates(settings, pool, acct["postback_token"])
    # The gateway figures' postbacks are not part of the worker figure.
    await pool.execute("UPDATE postbacks SET processed_at = now() WHERE processed_at IS NULL")
    await _clear_jobs(settings.redis_url)
    all_done_rate, burst_rate = await _worker_rate(env, pool, acct["account_id"], lst["list_id"])
    await pool.close()
    return [
        f"floor: bare ASGI 200, in-process client x{CONCURRENCY}: {floor_rps:,.0f} req/s",
        f"GET /postback (stored, deduplicated, job enqueued): {postback_rps:,.0f} req/s = {ratio(postback_rps, floor_rps)}",
        f"floor: asyncpg unnest insert of 1000 rows (best of {ROUNDS} turns interleaved with the imports'):"
        f" {floor_rows:,.0f} rows/s",
        f"worker, {CONVERSIONS:,} postbacks with their clicks (jobs as the gateway enqueues them: one per"
        f" {ATTRIBUTION_WINDOW * 1000:.0f} ms window), one arq worker in burst mode: "
        f"{all_done_rate:,.0f} conversions attributed/s until all were processed = {ratio(all_done_rate, floor_rows)} "
        f"(goal >= 5,000/s); {burst_rate:,.0f}/s until the worker had run every job",
        f"GET /postback with PostgreSQL unreachable (spooled in Redis; the token's account unknown): {spooled_rps:,.0f}"
        f" req/s = {ratio(spooled_rps, floor_rps)}; the spool then stored in PostgreSQL by one worker:"
        f" {drained_rate:,.0f} postbacks/s = {ratio(drained_rate, floor_rows)}",
        f"POST /history/sends x1000: {sends_rps:,.0f} rows/s = {ratio(sends_rps, floor_rows)} (goal >= 0.50)",
        f"POST /history/clicks x1000: {clicks_rps:,.0f} rows/s = {ratio(clicks_rps, floor_rows)} (goal >= 0.50)",
        f"POST /history/revenue x1000: {revenue_rps:,.0f} rows/s = {ratio(revenue_rps, floor_rows)} (goal >= 0.50)",
        f"  /history/clicks' own SQL alone (its one statement: first clicks, raw clicks, contacts' click counts,"
        f" re-match requests, with the report rollup; rows made beforehand): {click_sql:,.0f} rows/s ="
        f" {ratio(click_sql, floor_rows)}; the import = {clicks_rps / click_sql:.2f} of it",
        f"  ceiling of the stack: a Starlette endpoint that only parses 1000 message records and runs the floor's"
        f" insert (same client): {ceiling:,.0f} rows/s = {ratio(ceiling, floor_rows)};"
        f" history sends / clicks / revenue ="
        f" {sends_rps / ceiling:.2f} / {clicks_rps / ceiling:.2f} / {revenue_rps / ceiling:.2f} of it",
    ]


def run(env: BenchEnv) -> list[str]:
    return asyncio.run(_main(env))
