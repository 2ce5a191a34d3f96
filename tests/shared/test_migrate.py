"""Migrations: applied once, recorded, safe to run twice and concurrently."""
import asyncio

import asyncpg

from shared.migrate import _migrations, migrate


async def test_migrations_are_recorded_and_idempotent(settings, db):
    versions = [v for v, _ in _migrations()]
    recorded = [r["version"] for r in await db.fetch("SELECT version FROM schema_migrations ORDER BY version")]
    assert recorded == versions
    assert await migrate(settings.database_url) == []


async def test_concurrent_migrations_on_a_fresh_database(settings, db):
    name = "trackly_migrate_race"
    await db.execute(f"DROP DATABASE IF EXISTS {name}")
    await db.execute(f"CREATE DATABASE {name}")
    dsn = settings.database_url.replace("/postgres?", f"/{name}?") if "/postgres?" in settings.database_url else None
    if dsn is None:
        from urllib.parse import urlsplit, urlunsplit
        dsn = urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}"))
    try:
        results = await asyncio.gather(*(migrate(dsn) for _ in range(4)))
        applied = [r for r in results if r]
        assert len(applied) == 1 and applied[0] == [v for v, _ in _migrations()]
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(_migrations())
        finally:
            await conn.close()
    finally:
        await db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
