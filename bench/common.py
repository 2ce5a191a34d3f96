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


def ratio(value: float, floor: float) -> str:
    return f"{value / floor:.2f}x floor" if floor else "n/a"
