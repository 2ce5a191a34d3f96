"""Postback processing and first-click attribution. (Being written: see issue 5.)"""
from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

FUNCTIONS: list[Any] = []


async def rematch_for_clicks(conn: asyncpg.Connection, click_ids: list[str]) -> int:
    """Attribute conversions that arrived before their click was drained. Called by the click
    drainer inside its transaction with the ids of clicks it just stored. Returns how many
    conversions were attributed. (Not implemented yet: issue 5.)"""
    return 0


async def run_sweeper(ctx: dict[str, Any]) -> None:
    """Re-enqueue stored postbacks that have no job. (Not implemented yet: issue 5.)"""
    while True:
        await asyncio.sleep(3600)
