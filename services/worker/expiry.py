"""Forgets what is kept only for a while: Idempotency-Keys past ``shared.idempotency.KEEP``."""
from __future__ import annotations

import logging
from typing import Any

from shared import idempotency, loops

log = logging.getLogger("trackly.worker.expiry")

EXPIRY_INTERVAL = 600.0


async def expire_once(db: Any) -> int:
    deleted = await idempotency.purge(db)
    if deleted:
        log.info("forgot %d idempotency keys older than %s", deleted, idempotency.KEEP)
    return deleted


async def run_expiry(ctx: dict[str, Any]) -> None:
    """Started by the worker: ``expire_once`` every ``EXPIRY_INTERVAL`` seconds until cancelled."""
    await loops.repeat(
        lambda: expire_once(ctx["db"]), log=log, failure="forgetting old idempotency keys failed",
        pause_after_failure=EXPIRY_INTERVAL, interval=EXPIRY_INTERVAL,
    )
