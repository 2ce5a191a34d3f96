"""kill -9 of a real gateway (``python -m services.cli gateway``) in the middle of a keyed write:
before its transaction ends (nothing is kept, and the key is free for the retry), and once its
COMMIT is on its way but before any answer reaches the client (the retry is answered as the
first request was, and nothing is stored twice). The same request retried without a key is a
new one, stored again, except where the records carry their own identity (a history click is
one per message, a history revenue record has its external_id)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from shared.process import die_with_parent
from shared.settings import Settings
from tests.helpers import Tenant, free_port, lock_waiters, make_link, make_offer, random_phone, row_held

REPO = Path(__file__).resolve().parents[2]


class Gateway:
    """One gateway process on the test database and Redis."""

    def __init__(self, settings: Settings, *, idle_in_transaction: float | None = None) -> None:
        self.port = free_port()
        env = dict(
            os.environ, TRACKLY_DATABASE_URL=settings.database_url or "", TRACKLY_REDIS_URL=settings.redis_url or "",
            TRACKLY_GATEWAY_PORT=str(self.port), TRACKLY_DATA_DIR=str(settings.data_dir), TRACKLY_LOG_LEVEL="warning",
        )
        # With ``idle_in_transaction``, its pool's limit on a session idle in a transaction is that
        # (seconds) instead of its own, so that a test need not wait that long.
        patch = "" if idle_in_transaction is None else f"shared.db.IDLE_IN_TRANSACTION_TIMEOUT = {idle_in_transaction}; "
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys, shared.db; {patch}from services.cli import main; sys.exit(main(['gateway']))"],
            env=env, cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent(),
        )
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(600):
                assert self.proc.poll() is None, "the gateway exited during start-up"
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise AssertionError("the gateway did not become ready")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
async def start_gateway(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    started: list[Gateway] = []

    async def start(**kwargs: Any) -> Gateway:
        gateway = Gateway(settings, **kwargs)
        started.append(gateway)
        await gateway.ready()
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            gateway.kill()


async def _backends_gone(db: asyncpg.Pool, pids: list[int]) -> None:
    """Until PostgreSQL has ended these sessions (a dead client's, once it notices)."""
    for _ in range(400):
        if not await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"sessions {pids} of the killed gateway are still there")


async def _waiting_pids(db: asyncpg.Pool, n: int) -> list[int]:
    await lock_waiters(db, n)
    return [r["pid"] for r in await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")]


async def _post_unread(gateway: Gateway, path: str, headers: dict[str, str], body: bytes) -> asyncio.StreamWriter:
    """Send a request and never read its answer (the client that timed out, or whose gateway died)."""
    _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    head = f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    return writer


# Each keyed endpoint: (path, body made for the tenant, what it stores: a count query by account,
# the rows it stores, the rows the same request stores again without a key).
Case = tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str, int, int]

MESSAGES = "SELECT count(*) FROM messages WHERE account_id = $1"
REVENUE = "SELECT count(*) FROM revenue WHERE account_id = $1"
CLICKS = "SELECT count(*) FROM clicks WHERE account_id = $1"
LINKS = "SELECT count(*) FROM links WHERE account_id = $1"
OFFERS = "SELECT count(*) FROM offers WHERE account_id = $1"

CASES: dict[str, Case] = {
    "send": ("/api/v2/send", lambda c: {"to": random_phone(), "list_id": c["list"], "body": f"Deal {c['short']}"},
             MESSAGES, 1, 1),
    "send_bulk": ("/api/v2/send/bulk", lambda c: {"messages": [
        {"to": random_phone(), "list_id": c["list"], "body": f"Deal {n} {c['short']}"} for n in range(3)]}, MESSAGES, 3, 3),
    "revenue": ("/api/v2/revenue", lambda c: {"message_id": c["message"], "revenue": "2.5", "attribution_type": "sale"},
                REVENUE, 1, 1),
    "revenue_bulk": ("/api/v2/revenue/bulk", lambda c: {"records": [
        {"message_id": c["message"], "revenue": str(n + 1), "attribution_type": "sale"} for n in range(3)]}, REVENUE, 3, 3),
    "history_sends": ("/api/v2/history/sends", lambda c: {"records": [
        {"to": random_phone(), "list_id": c["list"], "body": f"Old {c['short']}", "timestamp": "2026-01-01T00:00:00Z"}
        for _ in range(3)]}, MESSAGES, 3, 3),
    "history_clicks": ("/api/v2/history/clicks", lambda c: {"records": [
        {"message_id": c["message"], "offer_id": c["offer"], "phone_number": c["phone"],
         "timestamp": "2026-01-01T01:00:00Z"}]}, CLICKS, 1, 0),
    "history_revenue": ("/api/v2/history/revenue", lambda c: {"records": [
        {"message_id": c["message"], "revenue": "3", "attribution_type": "sale", "external_id": f"ext-{n}"}
        for n in range(3)]}, REVENUE, 3, 0),
    "links": ("/api/v2/links", lambda c: {"offerId": c["offer"], "listId": c["list"]}, LINKS, 1, 1),
    "offers": ("/api/v2/offers", lambda c: {"name": "Retried", "destination_url": "https://example.com/"}, OFFERS, 1, 1),
}


async def _context(api: httpx.AsyncClient, tenant: Tenant) -> dict[str, Any]:
    offer = await make_offer(api, tenant)
    link = await make_link(api, tenant, offer["id"])
    phone = random_phone()
    sent = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": phone, "list_id": tenant.list_id, "body": "first"})
    assert sent.status_code == 201, sent.text
    return {"list": tenant.list_id, "short": link["shortUrl"], "offer": offer["id"], "phone": phone,
            "message": sent.json()["message_id"]}


async def _keyed(case: str, api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, prefix: str
                 ) -> tuple[bytes, str, dict[str, str], int]:
    """Case ``case``'s request body (as sent), a new Idempotency-Key, the headers that carry it,
    and the case's row count before it."""
    body = CASES[case][1](await _context(api, tenant))
    raw = httpx.Request("POST", "http://x", json=body).content
    key = prefix + secrets.token_hex(8)
    before = await db.fetchval(CASES[case][2], tenant.account_id)
    return raw, key, {"X-Api-Key": tenant.api_key, "Idempotency-Key": key}, before


@pytest.mark.parametrize("case", list(CASES))
async def test_killed_before_its_commit_keeps_nothing_and_frees_the_key(
    case: str, api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, settings: Settings,
    start_gateway: Callable[..., Awaitable[Gateway]],
) -> None:
    path, _, count, rows, _ = CASES[case]
    raw, key, headers, before = await _keyed(case, api, tenant, db, "crash-")
    gateway = await start_gateway()
    # The key's row held by another session: the gateway's transaction has stored everything else
    # and waits there to remember its answer.
    async with row_held(settings.database_url or "",
                        "INSERT INTO idempotency_keys (account_id, key, fingerprint, status, response)"
                        " VALUES ($1, $2, '\\x00', 200, '{}')", tenant.account_id, key) as held:
        writer = await _post_unread(gateway, path, headers, raw)
        pids = await _waiting_pids(db, 1)
        gateway.kill()
        await held.rollback()
    writer.close()
    await _backends_gone(db, pids)
    assert await db.fetchval(count, tenant.account_id) == before
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE account_id = $1 AND key = $2",
                             tenant.account_id, key) == 0
    second = await start_gateway()
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as client:
        retry = await client.post(path, headers=headers, content=raw)
        assert retry.status_code in (200, 201), retry.text
        assert "idempotent-replayed" not in retry.headers
        again = await client.post(path, headers=headers, content=raw)
        assert (again.status_code, again.content, again.headers.get("idempotent-replayed")) == \
            (retry.status_code, retry.content, "true")
    assert await db.fetchval(count, tenant.account_id) - before == rows


HOLD = "hold_commit_{n}"


@contextlib.asynccontextmanager
async def commit_held(db: asyncpg.Pool, settings: Settings, key: str) -> AsyncIterator[asyncpg.Connection]:
    """Until the block ends, a transaction that remembers ``key`` waits at its COMMIT (a deferred
    trigger takes an advisory lock this holds): its client has sent COMMIT, and has no answer."""
    n = secrets.randbelow(2**31)
    name = HOLD.format(n=n)
    await db.execute(f"""
        CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_advisory_xact_lock({n}); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER {name} AFTER INSERT ON idempotency_keys DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW WHEN (NEW.key = '{key}') EXECUTE FUNCTION {name}();
    """)
    holder = await asyncpg.connect(settings.database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", n)
        yield holder
    finally:
        await holder.close()
        await db.execute(f"DROP TRIGGER {name} ON idempotency_keys; DROP FUNCTION {name}()")


@pytest.mark.parametrize("case", list(CASES))
async def test_killed_after_its_commit_the_retry_is_answered_not_repeated(
    case: str, api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, settings: Settings,
    start_gateway: Callable[..., Awaitable[Gateway]],
) -> None:
    path, _, count, rows, unkeyed = CASES[case]
    raw, key, headers, before = await _keyed(case, api, tenant, db, "crash-")
    gateway = await start_gateway()
    async with commit_held(db, settings, key):
        writer = await _post_unread(gateway, path, headers, raw)
        pids = await _waiting_pids(db, 1)
        gateway.kill()
    writer.close()
    await _backends_gone(db, pids)  # (its COMMIT went through: the client is gone, not the statement)
    assert await db.fetchval(count, tenant.account_id) - before == rows
    second = await start_gateway()
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as client:
        retry = await client.post(path, headers=headers, content=raw)
        assert retry.status_code in (200, 201), retry.text
        assert retry.headers.get("idempotent-replayed") == "true", retry.text
        # The answer the killed gateway made, stored with what it stored.
        assert retry.content == await db.fetchval(
            "SELECT response FROM idempotency_keys WHERE account_id = $1 AND key = $2", tenant.account_id, key)
        assert await db.fetchval(count, tenant.account_id) - before == rows
        # Without the key the same request is a new one.
        plain = await client.post(path, headers={"X-Api-Key": tenant.api_key}, content=raw)
        assert plain.status_code == retry.status_code, plain.text
    assert await db.fetchval(count, tenant.account_id) - before == rows + unkeyed


async def test_a_gateway_frozen_mid_transaction_does_not_hold_its_key_for_good(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, settings: Settings,
    start_gateway: Callable[..., Awaitable[Gateway]],
) -> None:
    """A gateway whose machine died (or whose process froze: a paused VM, a partition) in the
    middle of a keyed send sends PostgreSQL neither its next statement nor a FIN: its session sat
    idle in its transaction, holding the key's row (and the new contact's), for as long as TCP
    keepalive took to notice (over two hours by default; never for a frozen process). The client's
    retry through another gateway waited on that row until the pool's command timeout, answered
    503, and so on at every retry. Now a session idle in a transaction is ended by PostgreSQL after
    db.IDLE_IN_TRANSACTION_TIMEOUT (2 s here): the retry sends, once."""
    path, _, count, _, _ = CASES["send"]
    raw, key, headers, before = await _keyed("send", api, tenant, db, "frozen-")
    frozen = await start_gateway(idle_in_transaction=2)
    try:
        async with row_held(settings.database_url or "",
                            "INSERT INTO idempotency_keys (account_id, key, fingerprint, status, response)"
                            " VALUES ($1, $2, '\\x00', 200, '{}')", tenant.account_id, key) as held:
            writer = await _post_unread(frozen, path, headers, raw)
            [pid] = await _waiting_pids(db, 1)
            frozen.proc.send_signal(signal.SIGSTOP)
            await held.rollback()
        # Its INSERT of the key went through; its next statement never comes.
        for _ in range(200):
            state = await db.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
            if state != "active":
                break
            await asyncio.sleep(0.05)
        second = await start_gateway()
        async with httpx.AsyncClient(base_url=second.url, timeout=20) as client:
            retry = await client.post(path, headers=headers, content=raw)
        assert retry.status_code == 201, retry.text
        assert "idempotent-replayed" not in retry.headers
        assert await db.fetchval(count, tenant.account_id) - before == 1
        writer.close()
    finally:
        frozen.kill()
