"""A real arq worker in burst mode on the test Redis and PostgreSQL, and click factories."""
from __future__ import annotations

import secrets
import warnings
from collections.abc import Awaitable, Callable
from typing import Any
from datetime import datetime

import arq
import asyncpg
import pytest

from services.worker.main import worker_settings
from shared.settings import Settings


async def burst_worker(settings: Settings, **overrides: Any) -> arq.Worker:
    """Run a real arq worker in burst mode until the queue is empty (every job enqueued so far ran);
    ``overrides``: arq.Worker arguments in place of ``worker_settings``'."""
    kwargs = {**worker_settings(settings), "handle_signals": False, **overrides}
    worker = arq.Worker(**kwargs, burst=True, poll_delay=0.05)
    try:
        await worker.main()
    finally:
        with warnings.catch_warnings():
            # arq 0.28 closes its pool with redis-py's deprecated close(); nothing of ours.
            warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
            await worker.close()
    return worker


@pytest.fixture
def run_worker(settings: Settings) -> Callable[[], Awaitable[None]]:
    return lambda: burst_worker(settings)


async def store_click(
    db: asyncpg.Pool, account_id: int, message_id: str | None, clicked_at: datetime, *, is_bot: bool = False,
    offer_id: str | None = None, click_id: str | None = None, first: bool = True,
) -> str:
    """A click as the drainer stores it: the raw row and, for a message's first human click, its
    message_clicks row."""
    click_id = click_id or secrets.token_hex(16)
    async with db.acquire() as conn, conn.transaction():
        list_id = await conn.fetchval("SELECT list_id FROM messages WHERE id = $1", message_id) if message_id else None
        await conn.execute(
            "INSERT INTO clicks (id, account_id, message_id, offer_id, list_id, clicked_at, is_bot)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            click_id, account_id, message_id, offer_id, list_id, clicked_at, is_bot,
        )
        if message_id and first and not is_bot:
            await conn.execute(
                "INSERT INTO message_clicks (message_id, click_id, account_id, offer_id, clicked_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                message_id, click_id, account_id, offer_id, clicked_at,
            )
    return click_id
