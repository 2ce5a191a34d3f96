"""What every benchmark shares: backends to run against, and the PostgreSQL insert floor."""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared import settings as settings_mod
from shared.migrate import migrate
from shared.runtime import exit_on_sigterm, with_backends
from shared.settings import Settings


@dataclass
class BenchEnv:
    settings: Settings  # database_url and redis_url resolved
    work_dir: Path

    @classmethod
    @contextlib.contextmanager
    def start(cls) -> Iterator["BenchEnv"]:
        """Embedded PostgreSQL and Redis in a temporary directory unless TRACKLY_*_URL are set; the
        directory (a run leaves hundreds of MB of data there) is removed afterwards."""
        exit_on_sigterm()  # a bench stopped with SIGTERM (a timeout, CI) still stops its servers below
        work = Path(tempfile.mkdtemp(prefix="trackly-bench-"))
        embedded = None
        try:
            settings, embedded = with_backends(replace(settings_mod.load(), data_dir=work))
            asyncio.run(migrate(settings.database_url))
            yield cls(settings, work)
        finally:
            if embedded is not None:
                embedded.stop()
            shutil.rmtree(work, ignore_errors=True)


async def unnest_floor(dsn: str, rows: int = 1000, rounds: int = 20) -> float:
    """Rows/s of a plain asyncpg ``INSERT ... SELECT FROM unnest`` of ``rows`` message-shaped rows
    (every column of ``messages``, its indexes, no foreign keys) prepared in Python beforehand, into
    a regular (logged) table, each batch committed — durable, like the product's own writes: the
    best a set-based insert of the same rows can do on this machine."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_floor_rows")
        await conn.execute("CREATE TABLE bench_floor_rows (LIKE messages INCLUDING DEFAULTS INCLUDING INDEXES)")
        best = 0.0
        for r in range(rounds):
            ids = [f"{r:02d}{i:06d}" for i in range(rows)]
            phones = [f"+1415555{i:04d}" for i in range(rows)]
            bodies = [f"Deal https://sms.bench.test/Ab3kX9{i} now" for i in range(rows)]
            nulls = [None] * rows
            start = time.perf_counter()
            await conn.execute(
                "INSERT INTO bench_floor_rows (id, account_id, list_id, to_phone, body, offer_id, creative_id, schedule_id, sent_at)"
                " SELECT id, 1, 1, to_phone, body, offer_id, creative_id, schedule_id, now()"
                " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])"
                " AS t(id, to_phone, body, offer_id, creative_id, schedule_id)",
                ids, phones, bodies, nulls, nulls, nulls,
            )
            best = max(best, rows / (time.perf_counter() - start))
        await conn.execute("DROP TABLE bench_floor_rows")
        return best
    finally:
        await conn.close()


async def send_rows_floor(dsn: str, rows: int = 1000, rounds: int = 20) -> float:
    """Messages/s of plain set-based inserts of what a bulk send of ``rows`` messages stores, into
    scratch copies of the tables (their indexes, no foreign keys), one committed transaction per
    batch: ``rows`` messages, one per-message code each (message_links) and a contact row each
    (contacts). Everything the product does besides these inserts (HTTP, JSON, validation, ids,
    rewriting, lookups, Redis) is what a ratio against this floor measures."""
    conn = await asyncpg.connect(dsn)
    tables = ("messages", "message_links", "contacts")
    try:
        for table in tables:
            await conn.execute(f"DROP TABLE IF EXISTS bench_floor_{table}")
            await conn.execute(f"CREATE TABLE bench_floor_{table} (LIKE {table} INCLUDING DEFAULTS INCLUDING INDEXES)")
        best = 0.0
        for r in range(rounds):
            ids = [f"{r:02d}{i:06d}" for i in range(rows)]
            codes = [f"c{r:02d}{i:04d}" for i in range(rows)]
            phones = [f"+1415{r:02d}5{i:04d}" for i in range(rows)]
            bodies = [f"Deal https://sms.bench.test/{c} now" for c in codes]
            start = time.perf_counter()
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO bench_floor_messages (id, account_id, list_id, to_phone, body, sent_at)"
                    " SELECT id, 1, 1, to_phone, body, now() FROM unnest($1::text[], $2::text[], $3::text[])"
                    " AS t(id, to_phone, body)", ids, phones, bodies,
                )
                await conn.execute(
                    "INSERT INTO bench_floor_message_links (code, message_id, link_id)"
                    " SELECT code, id, 'Ab3kX9' FROM unnest($1::text[], $2::text[]) AS t(code, id)", codes, ids,
                )
                await conn.execute(
                    "INSERT INTO bench_floor_contacts (account_id, list_id, phone_number)"
                    " SELECT 1, 1, phone FROM unnest($1::text[]) AS t(phone)", phones,
                )
            best = max(best, rows / (time.perf_counter() - start))
        for table in tables:
            await conn.execute(f"DROP TABLE bench_floor_{table}")
        return best
    finally:
        await conn.close()


async def stack_ceiling(dsn: str, rows: int = 1000, rounds: int = 8) -> float:
    """Rows/s of the least a bulk endpoint on this stack can do: a Starlette endpoint, driven
    through the same in-process httpx client as the product, that parses a request of ``rows``
    send records, takes a pooled connection and inserts them, in a transaction, as ``unnest_floor``
    does (message-shaped rows into a copy of messages; no validation, no ids worth the name, no
    other table, no Redis), then answers each record's id. Best of ``rounds``: give it as many
    as the figure it is compared with. What separates it from ``unnest_floor`` is HTTP, JSON and
    a pool checkout; a ratio against it is what everything a real endpoint does on top costs."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        await pool.execute("DROP TABLE IF EXISTS bench_ceiling_rows")
        await pool.execute("CREATE TABLE bench_ceiling_rows (LIKE messages INCLUDING DEFAULTS INCLUDING INDEXES)")
        batch = 0

        async def bulk(request: Request) -> Response:
            nonlocal batch
            records = orjson.loads(await request.body())["messages"]
            batch += 1
            ids = [f"{batch:02d}{i:06d}" for i in range(len(records))]
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO bench_ceiling_rows (id, account_id, list_id, to_phone, body, sent_at)"
                    " SELECT id, 1, $1, to_phone, body, now() FROM unnest($2::text[], $3::text[], $4::text[])"
                    " AS t(id, to_phone, body)",
                    records[0]["list_id"], ids, [r["to"] for r in records], [r["body"] for r in records],
                )
            return Response(orjson.dumps({"queued_count": len(ids), "messages": [
                {"index": i, "to": r["to"], "message_id": m} for i, (r, m) in enumerate(zip(records, ids))]}),
                media_type="application/json")

        app = Starlette(routes=[Route("/bulk", bulk, methods=["POST"])])
        best = 0.0
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as client:
            for r in range(rounds):
                messages = [{"to": f"+1415{r:02d}7{i:04d}", "list_id": 1,
                             "body": f"Hi #{i}, deal https://sms.bench.test/Ab3kX9 {{{{sendId}}}}"} for i in range(rows)]
                start = time.perf_counter()
                resp = await client.post("/bulk", json={"messages": messages})
                elapsed = time.perf_counter() - start
                assert resp.json()["queued_count"] == rows
                best = max(best, rows / elapsed)
        return best
    finally:
        await pool.execute("DROP TABLE IF EXISTS bench_ceiling_rows")
        await pool.close()


def bare_asgi(status: int, body: bytes = b""):
    """The request floor: an ASGI app that answers a fixed response and does nothing else."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"location", b"https://example.com/")] if status == 302 else [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def request_rate(client: httpx.AsyncClient, make_request, *, concurrency: int = 20, seconds: float = 4.0,
                       ok: int | None = None) -> float:
    """Requests/s that ``concurrency`` loops of ``make_request(client)`` complete in ``seconds``.
    Every answer must be ``ok`` (when given) or below 400."""
    done = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            resp = await make_request(client)
            assert (resp.status_code == ok) if ok is not None else resp.status_code < 400, resp.text
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


def ratio(value: float, floor: float) -> str:
    return f"{value / floor:.2f}x floor" if floor else "n/a"
