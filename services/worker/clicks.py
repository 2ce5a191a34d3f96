"""Click drainer: Redis stream -> PostgreSQL in batches. (Being written: see issue 4.)"""
from __future__ import annotations

import asyncio
from typing import Any


async def run_drainer(ctx: dict[str, Any]) -> None:
    while True:
        await asyncio.sleep(3600)
