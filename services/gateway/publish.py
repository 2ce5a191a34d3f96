"""Writes what the redirect reads (the contract in ``shared/edge.py``).

Callers publish *before* committing the PostgreSQL transaction that creates the rows: if Redis is
down the API call fails and rolls back, so an acknowledged link always works at the edge. A key
left behind by a transaction that later fails points at rows that do not exist, which the worker
ignores.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

import redis.asyncio as aioredis

from shared import edge


async def publish_offer(redis: aioredis.Redis, offer: Mapping[str, object]) -> None:
    await redis.set(edge.offer_key(str(offer["id"])), edge.dumps(edge.offer_entry(offer)))


async def publish_link(
    redis: aioredis.Redis, *, link: Mapping[str, object], offer: Mapping[str, object]
) -> None:
    await redis.mset(dict([*edge.link_entries(link), (edge.offer_key(str(offer["id"])), edge.dumps(edge.offer_entry(offer)))]))


async def publish_message_codes(
    redis: aioredis.Redis, entries: Iterable[tuple[str, str, edge.MessageCodeEntry, datetime]], *, days: int = 0
) -> None:
    """``entries``: (host, code, MessageCodeEntry, the message's send time) for each per-message
    short URL. See ``edge.write_message_codes``."""
    await edge.write_message_codes(
        redis, ((edge.short_key(host, code), edge.dumps(entry), sent_at) for host, code, entry, sent_at in entries),
        days=days,
    )
