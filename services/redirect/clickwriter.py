"""Group commit of clicks into the Redis stream (``shared.edge.CLICK_STREAM``).

Every request hands its click to ``write`` and awaits the future of the batch it joined. One
write is in flight at a time; the clicks that arrive meanwhile form the next batch, which is sent
as a single ``XADD`` (field ``b`` = orjson list of Click dicts) as soon as the previous one
returns. Under load a batch holds as many clicks as arrived during one Redis round trip (plus its
fsync with ``appendfsync always``), so the cost per click falls as load rises, and a click is
durable before its 302 is sent. If the write fails every request of the batch gets
``ClickNotRecorded`` (the app answers 503): a 302 is never sent for a click that is not stored.
"""
from __future__ import annotations

import asyncio
import logging

import orjson
import redis.asyncio as aioredis

from shared import edge

log = logging.getLogger("trackly.redirect.clicks")


class ClickNotRecorded(Exception):
    pass


class ClickWriter:
    def __init__(self, redis: aioredis.Redis, *, max_batch: int = 2000, stream: str = edge.CLICK_STREAM) -> None:
        self._redis = redis
        self._stream = stream
        self._max_batch = max_batch
        self._clicks: list[edge.Click] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.recorded = 0
        self.batches = 0
        self.failed = 0

    async def write(self, click: edge.Click) -> None:
        """Returns once the click is durably in the stream; raises ClickNotRecorded otherwise."""
        if self._closed:
            raise ClickNotRecorded("the click writer is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._clicks.append(click)
        self._waiters.append(future)
        if self._flusher is None:
            # Started on the next loop iteration, so every request that is ready now joins this batch.
            self._flusher = asyncio.create_task(self._flush(), name="click-group-commit")
        await future

    async def _flush(self) -> None:
        try:
            while self._clicks:
                clicks, waiters = self._clicks[: self._max_batch], self._waiters[: self._max_batch]
                del self._clicks[: self._max_batch], self._waiters[: self._max_batch]
                try:
                    await self._redis.execute_command("XADD", self._stream, "*", "b", orjson.dumps(clicks))
                except Exception as exc:  # noqa: BLE001 - every failure means "not recorded"
                    self.failed += len(clicks)
                    log.error("could not record %d clicks: %s", len(clicks), exc)
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(ClickNotRecorded(str(exc)))
                else:
                    self.recorded += len(clicks)
                    self.batches += 1
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            self._flusher = None

    async def close(self) -> None:
        """Finish the batch in flight (and any queued behind it); refuse new clicks."""
        self._closed = True
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
