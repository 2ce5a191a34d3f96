"""A real gateway (``python -m services.cli gateway``, pool of 10) against clients that take their
time or go away: a body that trickles in holds no pooled connection (it is read before one is
taken), and clients that hang up while their requests wait for a connection, or inside their
transaction, leave the pool whole once what held it lets go."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import asyncpg
import httpx

from shared.settings import Settings
from tests.e2e.test_gateway_kill import Gateway, start_gateway  # noqa: F401 (a fixture)
from tests.helpers import Tenant, lock_waiters, make_link, make_offer, metric_value, random_phone, row_held

POOL = 10  # the gateway's (app.create_app)


async def _open(gateway: Gateway, method: str, path: str, headers: dict[str, str], body: bytes, *,
                sent: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request on its own connection: its head and the first ``sent`` bytes of its body (all of it
    by default)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    head = f"{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(head.encode() + body[:sent])
    await writer.drain()
    return reader, writer


async def _status(reader: asyncio.StreamReader) -> int:
    return int((await reader.readline()).split()[1])


async def _pool_settled(gateway: Gateway) -> None:
    """Until the gateway's pool has no connection in use (its /metrics, read after its own query);
    30 s at most."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        try:
            async with asyncio.timeout(30):
                while metric_value((await client.get("/metrics")).text, "trackly_gateway_db_connections",
                                   '{state="busy"}') > 0:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError("the gateway's pool still has connections in use") from None


async def test_bodies_that_trickle_in_hold_no_pooled_connection(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, start_gateway: Callable[..., Awaitable[Gateway]],
) -> None:
    """More sends than the pool has connections, each with its head and half its body sent: the
    gateway still answers other requests (it would wait for a connection a trickling body held,
    for as long as the body takes), and each send is stored once its body is whole."""
    gateway = await start_gateway()
    bodies = [json.dumps({"to": random_phone(), "list_id": tenant.list_id, "body": f"slow {n} " + "x" * 2000}).encode()
              for n in range(POOL + 2)]
    slow = [await _open(gateway, "POST", "/api/v2/send", tenant.headers, body, sent=len(body) // 2) for body in bodies]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for _ in range(3):  # (a send that had not yet reached its body's read is there by then)
            listed = await asyncio.wait_for(client.get("/api/v2/offers", headers=tenant.headers), 30)
            assert listed.status_code == 200, listed.text
    for (reader, writer), body in zip(slow, bodies):
        writer.write(body[len(body) // 2:])
    assert [await asyncio.wait_for(_status(reader), 30) for reader, _ in slow] == [201] * len(slow)
    for _, writer in slow:
        writer.close()
    assert await db.fetchval("SELECT count(*) FROM messages WHERE account_id = $1 AND body LIKE 'slow %'",
                             tenant.account_id) == len(slow)
    await _pool_settled(gateway)


async def test_clients_gone_while_their_requests_wait_for_the_pool_leave_it_whole(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, settings: Settings,
    start_gateway: Callable[..., Awaitable[Gateway]],
) -> None:
    """Every pooled connection in a transaction waiting on an offer's row (locked by another
    session), sends and postbacks waiting for a connection behind them, then every client of the
    sends and postbacks and half of the offer changes hangs up. Once the row is let go the rest
    are answered, the pool has every connection back, none left in a transaction, and the
    gateway serves."""
    gateway = await start_gateway()
    offer = await make_offer(api, tenant)
    link = await make_link(api, tenant, offer["id"])
    async with row_held(settings.database_url or "", "SELECT 1 FROM offers WHERE id = $1 FOR UPDATE", offer["id"]) as held:
        changes = [await _open(gateway, "PATCH", f"/api/v2/offers/{offer['id']}", tenant.headers,
                               json.dumps({"name": f"Change {n}"}).encode()) for n in range(POOL)]
        await lock_waiters(db, POOL)
        behind = [await _open(gateway, "POST", "/api/v2/send", tenant.headers, json.dumps(
            {"to": random_phone(), "list_id": tenant.list_id, "body": f"Deal {link['shortUrl']}"}).encode())
            for _ in range(20)]
        behind += [await _open(gateway, "GET", f"/postback/{tenant.postback_token}?click_id=x&conversion_id=gone-{n}",
                               {}, b"") for n in range(20)]
        await asyncio.sleep(0.5)  # (their requests reach the pool's queue; nothing is asserted on time)
        for _, writer in behind + changes[: POOL // 2]:
            writer.transport.abort()
        await held.rollback()
    assert [await asyncio.wait_for(_status(reader), 30) for reader, _ in changes[POOL // 2:]] == [200] * (POOL - POOL // 2)
    for _, writer in changes:
        writer.close()
    await _pool_settled(gateway)
    assert await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
    ) == 0
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        sent = await client.post("/api/v2/send", headers=tenant.headers,
                                 json={"to": random_phone(), "list_id": tenant.list_id, "body": "after"})
        assert sent.status_code == 201, sent.text
