"""Versioned SQL migrations: each ``migrations/NNNN_name.sql`` is applied once, in order, inside a
transaction, and recorded in ``schema_migrations``. A session-level advisory lock makes concurrent
runs (several replicas starting at once) safe; ``lock_timeout`` keeps a migration from queueing
behind long transactions forever.
"""
from __future__ import annotations

from importlib import resources

import asyncpg

# Arbitrary, fixed: "trackly" in ASCII, as one bigint.
_LOCK_ID = 0x747261636B6C79


def _migrations() -> list[tuple[str, str]]:
    files = resources.files("shared") / "migrations"
    found = sorted(f for f in files.iterdir() if f.name.endswith(".sql"))
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in found]


async def migrate(dsn: str) -> list[str]:
    """Bring the schema up to date; returns the versions applied by this call."""
    conn = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, sql in _migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute("SET LOCAL lock_timeout = '10s'")
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()
    return applied


async def pending(dsn: str) -> list[str] | None:
    """Versions not applied yet, read without writing anything; None when the database has no
    schema at all (``schema_migrations`` does not exist)."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
            return None
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    finally:
        await conn.close()
    return [version for version, _ in _migrations() if version not in done]
