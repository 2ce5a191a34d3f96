"""Group commit of clicks into the Redis stream (``shared.edge.CLICK_STREAM``).

Every request hands its click to ``write`` and awaits the future of the batch it joined. Clicks
that arrive while ``max_inflight`` writes are already in flight wait and form the next batch,
which is sent as a single ``XADD`` (field ``c``: a JSON array of clicks, see ``shared.edge``) as soon as one of
those returns. Under load a batch holds as many clicks as arrived during a Redis round trip (plus
its fsync with ``appendfsync always``), so the cost per click falls as load rises, and a click is
durable before its 302 is sent. If the write fails, every request of the batch gets
``ClickNotRecorded`` (the app answers 503): a 302 is never sent for a click that is not stored.

A Redis that hangs (takes the command, answers nothing) fails a batch only after the connection's
timeout, while clicks keep arriving: when a batch fails on a timeout, the clicks queued behind it
fail too (they would wait out the same timeout, one batch at a time), and past ``max_queued``
waiting clicks, or past ``max_queued_bytes`` of them (as ``submit`` is told their sizes: a click
can carry 32 query values of 1000 characters; counted twice, for the click and its encoded XADD,
until its batch is answered or failed), a new one is refused at once. Either way the wait
for a 503 and the memory held stay bounded, however long the hang.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from services.redirect.rawredis import Executor, RedisTimeout
from shared import edge
from shared.logs import Throttled

log = logging.getLogger("trackly.redirect.clicks")


class ClickNotRecorded(Exception):
    pass


class ClickWriter:
    def __init__(
        self, redis: Executor, *, max_batch: int = 2000, max_inflight: int = 2, max_queued: int = 20_000,
        max_queued_bytes: int = 64 << 20, stream: str = edge.CLICK_STREAM,
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        self._sizes: list[int] = []  # per queued click, as submitted
        self._clicks: list[edge.Click] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._scheduled = False
        self._inflight: set[asyncio.Future[Any]] = set()
        self._closed = False
        # Made on the serving loop (the app's startup). Kept: asyncio.get_running_loop() makes a
        # getpid() system call every time (CPython's check against a forked child), about a
        # microsecond per click here.
        self._loop = asyncio.get_running_loop()
        self.recorded = 0
        self.batches = 0
        self._report_failure = Throttled(
            log, logging.ERROR, "could not record clicks (answered 503), %d in the latest batch: %s"
        )

    @property
    def failed(self) -> int:
        """Clicks refused (their requests answered 503) because the write failed."""
        return self._report_failure.count

    async def write(self, click: edge.Click) -> None:
        """Returns once the click is durably in the stream; raises ClickNotRecorded otherwise."""
        await self.submit(click)

    def submit(self, click: edge.Click, size: int = 0) -> asyncio.Future[None]:
        """``write`` without its coroutine (the hot path awaits this directly): a future resolved
        once the click is durably in the stream, failed with ClickNotRecorded otherwise. ``size``:
        about how many bytes the click holds beyond a bare one (its query and user agent)."""
        if self._closed:
            raise ClickNotRecorded("the click writer is closed")
        size += size  # the click, and its encoded XADD once its batch is in flight
        if len(self._clicks) >= self._max_queued or self._queued_bytes + size > self._max_queued_bytes:
            self._report_failure(1, "too many clicks waiting for redis")
            raise ClickNotRecorded("too many clicks waiting for redis")
        loop = self._loop
        future: asyncio.Future[None] = loop.create_future()
        self._clicks.append(click)
        self._waiters.append(future)
        self._sizes.append(size)
        self._queued_bytes += size
        if not self._scheduled and len(self._inflight) < self._max_inflight:
            # On the next loop iteration, so every request that is ready now joins this batch.
            self._scheduled = True
            loop.call_soon(self._start_batch)
        return future

    def _schedule(self) -> None:
        if not self._scheduled and len(self._inflight) < self._max_inflight:
            # On the next loop iteration, so every request that is ready now joins this batch.
            self._scheduled = True
            self._loop.call_soon(self._start_batch)

    def _start_batch(self) -> None:
        self._scheduled = False
        if not self._clicks:
            return
        clicks, waiters = self._clicks[: self._max_batch], self._waiters[: self._max_batch]
        # A batch in flight still holds its clicks, and its encoded XADD besides (submit counted
        # both), until Redis answers or the timeout fails it: counted until then (_finish).
        held = sum(self._sizes[: self._max_batch])
        del self._clicks[: self._max_batch], self._waiters[: self._max_batch], self._sizes[: self._max_batch]
        try:
            reply = self._redis.request("XADD", self._stream, "*", edge.CLICK_BATCH_FIELD, orjson.dumps(clicks))
        except Exception as exc:  # noqa: BLE001 - a batch that cannot be encoded: these requests must not wait forever
            reply = self._loop.create_future()
            reply.set_exception(exc)
        self._inflight.add(reply)
        reply.add_done_callback(lambda done: self._finish(done, clicks, waiters, held))

    def _finish(
        self, reply: asyncio.Future[Any], clicks: list[edge.Click], waiters: list[asyncio.Future[None]], held: int,
    ) -> None:
        self._inflight.discard(reply)
        self._queued_bytes -= held
        if reply.cancelled():
            exc: BaseException | None = ClickNotRecorded("cancelled")
        else:
            exc = reply.exception()
        if exc is not None:
            if isinstance(exc, RedisTimeout):  # the queue would wait out the same hang: fail it now
                clicks, waiters = clicks + self._clicks, waiters + self._waiters
                self._queued_bytes -= sum(self._sizes)  # a batch still in flight stays counted
                self._clicks, self._waiters, self._sizes = [], [], []
            self._report_failure(len(clicks), exc, times=len(clicks))
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(ClickNotRecorded(str(exc)))
        else:
            self.recorded += len(clicks)
            self.batches += 1
            for waiter in waiters:
                try:  # one call per click rather than two: only a cancelled request's waiter is done
                    waiter.set_result(None)
                except asyncio.InvalidStateError:
                    pass
        if self._clicks:
            self._schedule()

    async def close(self) -> None:
        """Finish the batches in flight (and any queued behind them); refuse new clicks."""
        self._closed = True
        while self._inflight or self._clicks:
            if self._clicks and not self._inflight:
                self._start_batch()
            await asyncio.gather(*self._inflight, return_exceptions=True)
