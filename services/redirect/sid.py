"""The signed ``sid`` a per-message short code hands to the tracker hop: ``<message id>.<signature>``.

The signature is an HMAC of the message and tracker ids under a key every redirect replica shares
through Redis (``shared.edge.SID_KEY``; the first replica to need one creates it), so a plain link
cannot claim a message (its click, its ``{{sendId}}``) by adding ``?sid=`` by hand.

Replicas re-read the key every ``REFRESH`` seconds and, when a signature does not verify, at most
once a second; the key they replaced still verifies. So if Redis loses the key (and one replica
makes a new one) the others follow within seconds, and a sid signed just before still counts.
"""
from __future__ import annotations

import base64
import hmac
import logging
import secrets
import time
from typing import Any

from redis.exceptions import RedisError

from shared import edge

log = logging.getLogger("trackly.redirect.sid")

SIGNATURE_CHARS = 16  # 96 bits, url-safe base64
REFRESH = 10.0
RETRY_AFTER_MISMATCH = 1.0


class KeyUnavailable(Exception):
    """No key is known yet and Redis cannot be asked for one."""


class SidSigner:
    def __init__(self, redis: Any, key_name: str = edge.SID_KEY) -> None:
        self._redis = redis
        self._key_name = key_name
        self._current: bytes | None = None
        self._previous: bytes | None = None
        self._loaded_at = float("-inf")

    async def refresh(self) -> None:
        """Read the shared key (creating it if there is none); keep the one it replaces."""
        self._loaded_at = time.monotonic()
        try:
            await self._redis.set(self._key_name, secrets.token_bytes(32), nx=True)
            key = await self._redis.get(self._key_name)
        except (RedisError, OSError) as exc:
            if self._current is None:
                raise KeyUnavailable(str(exc)) from exc
            log.warning("could not re-read the sid key (%s); keeping the one we have", exc)
            return
        if key and key != self._current:
            self._previous, self._current = self._current, key

    async def sign(self, message_id: bytes, tracker_id: str) -> bytes:
        if self._current is None or time.monotonic() - self._loaded_at > REFRESH:
            await self.refresh()
        assert self._current is not None
        return _signature(self._current, message_id, tracker_id)

    async def message_of(self, sid: str, tracker_id: str) -> str | None:
        """The message id of a well-formed ``sid`` signed for this tracker, else None."""
        message_id, signature = sid[:8].encode(), sid[9:].encode()
        if self._current is None:
            await self.refresh()
        if self._verifies(message_id, signature, tracker_id):
            return sid[:8]
        if time.monotonic() - self._loaded_at > RETRY_AFTER_MISMATCH:
            await self.refresh()  # the key may have changed under us
            if self._verifies(message_id, signature, tracker_id):
                return sid[:8]
        return None

    def _verifies(self, message_id: bytes, signature: bytes, tracker_id: str) -> bool:
        return any(
            key is not None and hmac.compare_digest(signature, _signature(key, message_id, tracker_id))
            for key in (self._current, self._previous)
        )


def _signature(key: bytes, message_id: bytes, tracker_id: str) -> bytes:
    mac = hmac.digest(key, message_id + b"/" + tracker_id.encode(), "sha256")
    return base64.urlsafe_b64encode(mac)[:SIGNATURE_CHARS]
