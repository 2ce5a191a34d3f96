"""PostgreSQL that takes no more connections (``max_connections`` reached by other clients, or the
role's or database's ``CONNECTION LIMIT``) while a pool already has some of its own.

asyncpg's pool opens a new connection whenever none of its open ones is free, and a refused
connect failed the request: a burst of 200 postbacks on a full server got 155-184 answers of 503
while the pool's three open connections were fine. The pool now waits for one of its own to be
released instead, as it does when it is at its size, and tries a new connection again only after
a pause, one caller at a time.

The limit here is a role's ``CONNECTION LIMIT`` (PostgreSQL refuses with the same SQLSTATE 53300,
too_many_connections, as at ``max_connections``); superusers are exempt from it, so the pools
connect as a role of the test's own.
"""
from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from services.gateway.app import create_app
from shared import db as shared_db
from shared.settings import Settings


def _as_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@pytest.fixture
async def limited_role(settings: Settings) -> AsyncIterator[Callable[[int], str]]:
    """``limit(n)``: a DSN of a role of this test's own that may hold ``n`` connections (a second
    call changes the limit)."""
    role = f"trackly_full_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(settings.database_url)
    await admin.execute(f"CREATE ROLE {role} LOGIN")
    await admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
    await admin.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")

    async def set_limit(n: int) -> str:
        await admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT {n}")
        return _as_user(settings.database_url, role)

    try:
        yield set_limit
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
        for _ in range(50):
            if not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role):
                break
            await asyncio.sleep(0.1)
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def _open(pool: asyncpg.Pool) -> int:
    return sum(h.is_connected() for h in pool._holders)


async def test_a_full_server_makes_callers_wait_for_the_pools_own_connections(limited_role) -> None:
    dsn = await limited_role(2)
    pool = await shared_db.create_pool(dsn, min_size=1, max_size=10)
    refused = shared_db._report_server_full.count
    try:
        # 80 callers at once, each holding its connection a moment: the pool can open two, and
        # the work lasts past SERVER_FULL_PAUSE.
        results = await asyncio.gather(*(pool.fetchval("SELECT $1::int FROM pg_sleep(0.04)", i) for i in range(80)))
        assert results == list(range(80))
        assert await _open(pool) == 2
        # Refused connects: the first burst's (at most one per free slot of the pool: 8), then one
        # caller's try per pause; not one per waiting caller each time a connection comes back.
        assert shared_db._report_server_full.count - refused <= 10
    finally:
        await shared_db.close_pool(pool)


async def test_a_full_server_with_none_of_the_pools_connections_open_is_unavailable(limited_role, settings) -> None:
    dsn = await limited_role(1)
    holder = await asyncpg.connect(dsn)  # the role's one connection, not the pool's
    try:
        pool = await shared_db.create_pool(dsn, min_size=0, max_size=5)
        try:
            with pytest.raises(shared_db.DatabaseUnavailable, match="TooManyConnections"):
                await pool.fetchval("SELECT 1")
        finally:
            await shared_db.close_pool(pool)
    finally:
        await holder.close()


async def test_waiting_for_a_connection_on_a_full_server_keeps_the_callers_timeout(limited_role) -> None:
    dsn = await limited_role(1)
    pool = await shared_db.create_pool(dsn, min_size=1, max_size=5)
    try:
        async with pool.acquire():
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                async with pool.acquire(timeout=0.5):
                    pass
            assert 0.4 < loop.time() - start < 3.0
    finally:
        await shared_db.close_pool(pool)


async def test_the_pool_grows_again_once_the_server_takes_connections(limited_role) -> None:
    dsn = await limited_role(1)
    pool = await shared_db.create_pool(dsn, min_size=1, max_size=4)
    try:
        await asyncio.gather(*(pool.fetchval("SELECT pg_sleep(0.05)") for _ in range(8)))
        assert await _open(pool) == 1
        await limited_role(-1)
        await asyncio.sleep(shared_db.SERVER_FULL_PAUSE + 0.2)
        await asyncio.gather(*(pool.fetchval("SELECT pg_sleep(0.2)") for _ in range(4)))
        assert await _open(pool) == 4
    finally:
        await shared_db.close_pool(pool)


async def test_postbacks_on_a_full_server_are_all_stored(limited_role, settings, db: asyncpg.Pool, tenant) -> None:
    """The burst that the gateway answered mostly 503: each is stored, and answered 200."""
    dsn = await limited_role(3)
    app = create_app(replace(settings, database_url=dsn))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            answers = await asyncio.gather(*(
                client.get(f"/postback/{tenant.postback_token}", params={"click_id": f"full-{i}", "payout": "1.00"})
                for i in range(120)
            ))
    assert [a.status_code for a in answers] == [200] * 120, {a.status_code: a.text for a in answers}
    stored = await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert stored == 120
