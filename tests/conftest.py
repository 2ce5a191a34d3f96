"""Real PostgreSQL and Redis for every test: embedded ones by default, or the servers named by
TRACKLY_DATABASE_URL / TRACKLY_REDIS_URL (a fresh database is created there for the run).

Tests isolate themselves by creating their own account (the product's own scoping); tests that
read the shared click stream drain it first.
"""
from __future__ import annotations


import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from services.gateway.app import create_app
from shared import db as shared_db
from shared import settings as settings_mod
from shared.migrate import migrate
from shared.redis_client import create_redis
from shared.runtime import with_backends
from shared.settings import Settings
from tests.helpers import Tenant, make_tenant


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _run_sql(dsn: str, sql: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    base = settings_mod.load()
    data_dir = tmp_path_factory.mktemp("trackly")
    base = replace(base, data_dir=data_dir, geoip_db=None, default_tracker_domain="http://ct.localhost:8001")
    created_db = None
    admin_dsn = base.database_url
    if base.database_url:
        created_db = f"trackly_test_{secrets.token_hex(4)}"
        _run_sql(admin_dsn, f'CREATE DATABASE "{created_db}"')
        base = replace(base, database_url=_with_database(admin_dsn, created_db))
    base, embedded = with_backends(base)
    asyncio.run(migrate(base.database_url))
    # A fresh database on a Redis that earlier runs used (TRACKLY_REDIS_URL set): arq keeps a job's
    # result for a while under a job id made from the postback's id (shared.jobs), so postback ids
    # start where no earlier run's did, or a sweeper's job could be taken for one that already ran.
    _run_sql(base.database_url, f"SELECT setval('postbacks_id_seq', {secrets.randbelow(2**50) + 2**40})")
    try:
        yield base
    finally:
        if embedded is not None:
            embedded.stop()
        if created_db is not None:
            _run_sql(admin_dsn, f'DROP DATABASE IF EXISTS "{created_db}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def db(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await shared_db.create_pool(settings.database_url, max_size=5)
    yield pool
    await shared_db.close_pool(pool)


@pytest.fixture(scope="session")
async def redis(settings: Settings) -> AsyncIterator[object]:
    client = create_redis(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def gateway_app(settings: Settings) -> AsyncIterator[object]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def api(gateway_app: object) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=gateway_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        yield client


@pytest.fixture
async def tenant(db: asyncpg.Pool) -> Tenant:
    """A fresh account with one active list on https://sms.example.com."""
    return await make_tenant(db)


