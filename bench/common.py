"""What every benchmark shares: backends to run against, and the PostgreSQL insert floor."""
from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg

from shared import settings as settings_mod
from shared.embedded import Embedded
from shared.migrate import migrate
from shared.settings import Settings


@dataclass
class BenchEnv:
    settings: Settings  # database_url and redis_url resolved
    work_dir: Path

    @classmethod
    @contextlib.contextmanager
    def start(cls) -> Iterator["BenchEnv"]:
        """Embedded PostgreSQL and Redis in a temporary directory unless TRACKLY_*_URL are set."""
        work = Path(tempfile.mkdtemp(prefix="trackly-bench-"))
        settings = replace(settings_mod.load(), data_dir=work)
        embedded = None
        if settings.embedded:
            embedded = Embedded(work)
            db_url, redis_url = embedded.start(need_db=settings.database_url is None, need_redis=settings.redis_url is None)
            settings = replace(settings, database_url=settings.database_url or db_url, redis_url=settings.redis_url or redis_url)
        asyncio.run(migrate(settings.database_url))
        try:
            yield cls(settings, work)
        finally:
            if embedded is not None:
                embedded.stop()


async def unnest_floor(dsn: str, rows: int = 1000, rounds: int = 20) -> float:
    """Rows/s of a plain asyncpg ``INSERT ... SELECT FROM unnest`` of ``rows`` narrow rows into an
    unlogged-free, index-light scratch table: the best a set-based insert can do here."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TEMP TABLE floor_rows (id text PRIMARY KEY, account_id bigint, phone text, body text, at timestamptz)"
        )
        best = 0.0
        for r in range(rounds):
            ids = [f"{r}-{i}" for i in range(rows)]
            start = time.perf_counter()
            await conn.execute(
                "INSERT INTO floor_rows SELECT id, 1, '+14155551234', 'hello', now() FROM unnest($1::text[]) AS t(id)", ids
            )
            best = max(best, rows / (time.perf_counter() - start))
        return best
    finally:
        await conn.close()


def ratio(value: float, floor: float) -> str:
    return f"{value / floor:.2f}x floor" if floor else "n/a"
