"""The signed sid between the hops: replicas share the key through Redis and follow a new one."""
from __future__ import annotations

import secrets
from typing import Any

import pytest

from services.redirect import sid

TRACKER = "11111111-2222-3333-4444-555555555555"


def as_sid(message: bytes, signature: bytes) -> str:
    return f"{message.decode()}.{signature.decode()}"


async def test_replicas_share_the_key_and_follow_a_new_one(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"test:sid:{secrets.token_hex(4)}"
    a, b = sid.SidSigner(redis, name), sid.SidSigner(redis, name)
    signed = as_sid(b"Msg00001", await a.sign(b"Msg00001", TRACKER))
    assert await b.message_of(signed, TRACKER) == "Msg00001"  # b read the key a created
    assert await b.message_of(signed, "99999999-2222-3333-4444-555555555555") is None  # another tracker's

    # Redis lost the key; b makes a new one. a still signs with the old one until it re-reads.
    await redis.delete(name)
    monkeypatch.setattr(sid, "RETRY_AFTER_MISMATCH", 0.0)
    await b.refresh()
    from_b = as_sid(b"Msg00002", await b.sign(b"Msg00002", TRACKER))
    assert await a.message_of(from_b, TRACKER) == "Msg00002"  # a mismatch makes a re-read the key
    assert await a.message_of(signed, TRACKER) == "Msg00001"  # and the key it replaced still verifies
    assert await a.message_of(as_sid(b"Msg00001", b"A" * sid.SIGNATURE_CHARS), TRACKER) is None
    await redis.delete(name)


async def test_without_redis_and_without_a_key_signing_is_unavailable() -> None:
    import redis.asyncio as aioredis

    nobody = aioredis.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=1)  # a closed port
    try:
        with pytest.raises(sid.KeyUnavailable):
            await sid.SidSigner(nobody).sign(b"Msg00001", TRACKER)
    finally:
        await nobody.aclose()
