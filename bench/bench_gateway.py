"""Gateway: POST /links requests/s and /send/bulk rows/s, against floors from the same run.

Floors: a bare ASGI app answering a fixed 302 through the same in-process client (requests/s),
and a plain asyncpg ``unnest`` insert of 1000 rows (rows/s).
"""
from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg
import httpx
import orjson

from bench.common import BenchEnv, bare_asgi, ratio, request_rate, send_rows_floor, stack_ceiling, unnest_floor
from services.gateway import sending
from services.gateway.app import create_app
from services.gateway.publish import publish_message_codes
from shared import db as shared_db
from shared import ids
from shared.accounts import create_account, create_list

CONCURRENCY = 20
SEND_ROUNDS = 8


async def send_statements_rate(dsn: str, account_id: int, list_id: int, link: dict, round_: int) -> float:
    """Messages/s of the bulk send's own database statements alone, as it runs them for 1000 new
    recipients with one short link each (the new-contacts insert, then COPY into messages and
    message_links, one committed transaction), with the rows made beforehand: no HTTP, JSON,
    validation, rewriting or Redis. What the send's ratio could reach if all of that were free."""
    host = link["shortUrl"].split("//", 1)[1].split("/", 1)[0]
    records = []
    for i, (message_id, code) in enumerate(zip(ids.message_ids(1000), ids.message_link_codes(1000))):
        record = sending.SendRecord(i, f"+1415{round_:02d}8{i:04d}", list_id, None, "", None, None, None,
                                    message_id=message_id, list_row={"id": list_id},
                                    final_body=f"Hi #{i}, deal {host}/{code} {message_id}",
                                    codes=[(host, code, link["linkId"])])
        records.append(record)
    conn = await asyncpg.connect(dsn)
    try:
        start = time.perf_counter()
        async with conn.transaction():
            await sending._insert_contacts(conn, account_id, records, raced=False)
            await sending._insert(conn, account_id, records, datetime.now(UTC), "api")
        return 1000 / (time.perf_counter() - start)
    finally:
        await conn.close()


async def send_python_rate(account_list_id: int, link: dict, round_: int, redis=None) -> float:
    """Messages/s of the bulk send's own Python work alone, for the same 1000 records as the send
    (parsed JSON in hand): each record checked (phone number, list, body), the bodies cut where
    their short links go, ids and codes drawn, each body filled, the edge entries made. No HTTP,
    no SQL, no Redis. A write-behind send (rows journaled in Redis, stored later) would still do
    all of this before it answers. With ``redis``: and then what such a send would write before it
    answers instead of its SQL: the codes published as the send publishes them, and the rows
    journaled (one XADD of them all, to a scratch stream)."""
    host = link["shortUrl"].split("//", 1)[1].split("/", 1)[0]
    links = {link["linkId"]: {"id": link["linkId"], "domain_host": host, "offer_id": None}}
    items = [{"to": f"+1415{round_:02d}5{i:04d}", "list_id": account_list_id,
              "body": f"Hi #{i}, deal {link['shortUrl']} {{{{sendId}}}}"} for i in range(1000)]
    start = time.perf_counter()
    records = [sending.parse_send(i, item) for i, item in enumerate(items)]
    cuts = sending.cut_bodies([r.body for r in records], links)
    now = datetime.now(UTC)
    entries = sending.fill_batch(records, links, cuts, now, redraw=False)
    assert len(entries) == 1000
    if redis is not None:
        await publish_message_codes(redis, entries)
        rows = [(r.message_id, r.to, r.final_body, r.offer_id, r.creative_id, r.schedule_id, c) for r in records for _, c, _ in r.codes]
        await redis.xadd("bench:send-journal", {"rows": orjson.dumps(rows)})
    return 1000 / (time.perf_counter() - start)


async def _main(env: BenchEnv) -> list[str]:
    settings = env.settings
    pool = await shared_db.create_pool(settings.database_url)
    async with pool.acquire() as conn:
        acct = await create_account(conn, "bench")
        lst = await create_list(conn, account_id=acct["account_id"], name="bench", phone="+18005550199",
                                short_domain="https://sms.bench.test")
    await pool.close()
    headers = {"X-Api-Key": acct["api_key"]}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=bare_asgi(302)), base_url="http://b") as bare:
        floor_rps = await request_rate(bare, lambda c: c.get("/"), concurrency=CONCURRENCY)

    app = create_app(settings)
    lines: list[str] = []
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g", headers=headers) as api:
            offer = (await api.post("/api/v2/offers", json={"name": "b", "destination_url": "https://e.com/?c={click_id}"})).json()["offer"]
            body = {"offerId": offer["id"], "listId": lst["list_id"]}
            links_rps = await request_rate(api, lambda c: c.post("/api/v2/links", json=body), concurrency=CONCURRENCY)
            link = (await api.post("/api/v2/links", json=body)).json()
            # Turns of the send, then each floor, SEND_ROUNDS times: drift on a shared machine lands
            # on all of them alike. Each floor gets two tries a turn (its first statement prepares).
            sends: list[float] = []
            floors: list[float] = []
            send_floors: list[float] = []
            ceilings: list[float] = []
            statements: list[float] = []
            pythons: list[float] = []
            journaled: list[float] = []
            for r in range(SEND_ROUNDS):
                # New recipients each round (so their contacts are new, as in the floors) and a
                # personalised body each (so no two bodies are alike).
                messages = [{"to": f"+1415{r:02d}6{i:04d}", "list_id": lst["list_id"],
                             "body": f"Hi #{i}, deal {link['shortUrl']} {{{{sendId}}}}"} for i in range(1000)]
                start = time.perf_counter()
                resp = await api.post("/api/v2/send/bulk", json={"messages": messages})
                elapsed = time.perf_counter() - start
                assert resp.json()["queued_count"] == 1000
                sends.append(1000 / elapsed)
                floors.append(await unnest_floor(settings.database_url, rounds=2))
                send_floors.append(await send_rows_floor(settings.database_url, rounds=2))
                ceilings.append(await stack_ceiling(settings.database_url, rounds=2))
                statements.append(await send_statements_rate(settings.database_url, acct["account_id"], lst["list_id"], link, r))
                pythons.append(await send_python_rate(lst["list_id"], link, r))
                journaled.append(await send_python_rate(lst["list_id"], link, r + 50, app.state.redis))
            await app.state.redis.delete("bench:send-journal")
    best, floor_rows, send_floor, ceiling = max(sends), max(floors), max(send_floors), max(ceilings)
    own_sql, own_python, write_behind = max(statements), max(pythons), max(journaled)
    lines.append(f"floor: bare ASGI 302, in-process client x{CONCURRENCY}: {floor_rps:,.0f} req/s")
    lines.append(f"POST /links: {links_rps:,.0f} req/s = {ratio(links_rps, floor_rps)}")
    lines.append(f"floor: asyncpg unnest insert of 1000 rows (best of {SEND_ROUNDS} turns interleaved with the send's"
                 f" and the other floors'): {floor_rows:,.0f} rows/s")
    lines.append(f"POST /send/bulk x1000 (new recipients, personalised bodies with a short link rewritten per message,"
                 f" end to end over HTTP): "
                 f"{best:,.0f} rows/s = {ratio(best, floor_rows)} (goal >= 0.50)")
    lines.append(f"  like for like: plain unnest inserts of what it stores (messages, message_links, contacts),"
                 f" one transaction per 1000: {send_floor:,.0f} messages/s = {ratio(send_floor, floor_rows)};"
                 f" the bulk send = {best / send_floor:.2f} of it")
    lines.append(f"  the send's own SQL alone (new contacts, COPY messages and message_links, one transaction, rows made"
                 f" beforehand): {own_sql:,.0f} messages/s = {ratio(own_sql, floor_rows)}; the bulk send = {best / own_sql:.2f} of it")
    lines.append(f"  the send's own Python work alone (check each record, cut and fill the bodies, draw ids and codes;"
                 f" no HTTP, SQL or Redis): {own_python:,.0f} messages/s = {ratio(own_python, floor_rows)}"
                 f" (its time is {floor_rows / own_python:.2f} floor-batches: a send answered at 0.50 has 2.00 in all)")
    lines.append(f"  a write-behind send's least: that Python work, then the codes published and the rows journaled in"
                 f" Redis (one XADD), no SQL, no HTTP: {write_behind:,.0f} messages/s = {ratio(write_behind, floor_rows)}")
    lines.append(f"  ceiling of the stack: a Starlette endpoint that only parses the same 1000 records and runs the"
                 f" floor's insert (same client): {ceiling:,.0f} rows/s ="
                 f" {ratio(ceiling, floor_rows)};"
                 f" the bulk send = {best / ceiling:.2f} of it")
    lines.append("  bulk send / unnest floor, turn by turn: " + ", ".join(f"{p / f:.2f}" for p, f in zip(sends, floors)))
    return lines


def run(env: BenchEnv) -> list[str]:
    return asyncio.run(_main(env))
