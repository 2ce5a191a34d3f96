"""Group commit: concurrent clicks share XADDs, and every click is in the stream when answered."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from services.redirect.clickwriter import ClickNotRecorded, ClickWriter
from services.redirect.rawredis import RawRedis
from shared import edge
from shared.settings import Settings

STREAM = "trk:test:group-commit"


def fake_click(n: int) -> edge.Click:
    return (f"{n:032x}", "l", "o", 1, 1, None, 1_795_456_800_000_000, None, None, None, False, {})


def stored_ids(entries: list[Any]) -> list[str]:
    return [c[0] for _, fields in entries for c in orjson.loads(fields[edge.CLICK_BATCH_FIELD.encode()])]


async def test_concurrent_clicks_share_writes_and_are_durable_when_answered(settings: Settings, redis: Any) -> None:
    await redis.delete(STREAM)
    conn = RawRedis(settings.redis_url or "")
    writer = ClickWriter(conn, stream=STREAM, max_inflight=1)
    try:
        answered: list[str] = []

        async def one(n: int) -> None:
            click = fake_click(n)
            await writer.write(click)
            # Answered only now: the click must already be in the stream.
            answered.append(click[0])

        await asyncio.gather(*(one(n) for n in range(200)))
        entries = await redis.xrange(STREAM)
        stored = stored_ids(entries)
        assert sorted(stored) == sorted(answered) and len(stored) == 200
        assert len(entries) < 20  # one write per batch, not per click
        assert writer.recorded == 200 and writer.batches == len(entries)
    finally:
        await writer.close()
        await conn.close()
        await redis.delete(STREAM)


async def test_a_failed_write_fails_every_click_of_the_batch(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    conn = RawRedis(f"unix://{tmp_path}/nothing-listens-here.sock", connect_timeout=0.5)
    writer = ClickWriter(conn, stream=STREAM)
    try:
        with caplog.at_level(logging.ERROR, logger="trackly.redirect.clicks"):
            results = await asyncio.gather(*(writer.write(fake_click(n)) for n in range(5)), return_exceptions=True)
            assert all(isinstance(r, ClickNotRecorded) for r in results)
            assert writer.failed == 5 and writer.recorded == 0
            for n in range(3):  # three more failed batches: an outage is reported once, not per batch
                with pytest.raises(ClickNotRecorded):
                    await writer.write(fake_click(10 + n))
        assert writer.failed == 8 and len([r for r in caplog.records if r.name == "trackly.redirect.clicks"]) == 1
    finally:
        await writer.close()
        await conn.close()
    with pytest.raises(ClickNotRecorded):
        await writer.write(fake_click(9))  # closed


async def test_batches_are_capped_and_each_request_waits_for_its_own_batch(settings: Settings, redis: Any) -> None:
    """Clicks beyond ``max_batch`` form the next batch; a request is answered once its own batch
    is in the stream, not the one before it."""
    await redis.delete(STREAM)
    conn = RawRedis(settings.redis_url or "")
    writer = ClickWriter(conn, stream=STREAM, max_batch=7, max_inflight=1)
    try:
        async def one(n: int) -> None:
            click = fake_click(n)
            await writer.write(click)
            entries = await redis.xrange(STREAM)
            assert click[0] in set(stored_ids(entries))

        await asyncio.gather(*(one(n) for n in range(50)))
        sizes = [len(orjson.loads(fields[edge.CLICK_BATCH_FIELD.encode()])) for _, fields in await redis.xrange(STREAM)]
        assert sum(sizes) == 50 and max(sizes) == 7 and len(sizes) >= 8
    finally:
        await writer.close()
        await conn.close()
        await redis.delete(STREAM)


async def test_a_cancelled_request_does_not_fail_the_others_of_its_batch(settings: Settings, redis: Any) -> None:
    """Requests of one batch wait independently: cancelling one (a timeout around it, a shutdown)
    leaves the others to be answered once the batch is written."""
    await redis.delete(STREAM)
    conn = RawRedis(settings.redis_url or "")
    writer = ClickWriter(conn, stream=STREAM, max_inflight=1)
    try:
        await writer.write(fake_click(0))  # connected: the next clicks go out as one batch
        cancelled = asyncio.ensure_future(writer.write(fake_click(1)))
        others = [asyncio.ensure_future(writer.write(fake_click(n))) for n in range(2, 6)]
        await asyncio.sleep(0)
        cancelled.cancel()
        assert await asyncio.gather(*others) == [None] * 4
        stored = stored_ids(await redis.xrange(STREAM))
        assert {fake_click(n)[0] for n in range(2, 6)} <= set(stored)
    finally:
        await writer.close()
        await conn.close()
        await redis.delete(STREAM)


async def test_a_batch_that_cannot_be_sent_fails_its_requests_instead_of_leaving_them_waiting(
    settings: Settings, redis: Any
) -> None:
    conn = RawRedis(settings.redis_url or "")
    writer = ClickWriter(conn, stream=STREAM)
    try:
        unencodable = (*fake_click(1)[:8], "\ud800", *fake_click(1)[9:])  # a lone surrogate: not UTF-8, orjson refuses it
        with pytest.raises(ClickNotRecorded):
            await asyncio.wait_for(writer.write(unencodable), 5)  # type: ignore[arg-type]
        assert writer.failed == 1
        await asyncio.wait_for(writer.write(fake_click(2)), 5)  # the writer carries on
    finally:
        await writer.close()
        await conn.close()
        await redis.delete(STREAM)


class _HungRedis:
    """A server that takes connections and commands and answers only the first ``answered``
    commands of each connection with +PONG: a Redis that hangs (SIGSTOP, a partition)."""

    def __init__(self, answered: int = 0) -> None:
        self.answered = answered
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            left = self.answered
            try:
                while data := await reader.read(65536):
                    for _ in range(min(left, data.count(b"*"))):
                        writer.write(b"+PONG\r\n")
                        left -= 1
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_hung_redis_fails_the_connect_and_calls_fail_fast_meanwhile() -> None:
    """Without AUTH or SELECT nothing on connect waited for an answer: a hung Redis took the TCP
    connection, and every call waited out its timeout on it (found by the redirect review)."""
    async with _HungRedis() as url:
        conn = RawRedis(url, timeout=0.2, reconnect_pause=5)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(ConnectionError):
                await conn.execute("PING")
            assert asyncio.get_running_loop().time() - started < 1
            started = asyncio.get_running_loop().time()
            with pytest.raises(ConnectionError):  # within the pause: at once, no connect
                await conn.execute("PING")
            assert asyncio.get_running_loop().time() - started < 0.05
        finally:
            await conn.close()


async def test_clicks_queued_behind_a_hung_redis_fail_within_a_timeout_and_the_queue_is_bounded() -> None:
    """A hang after the connection was up: only two batches are in flight, each failing after the
    timeout, while clicks keep coming. The queue behind a timed-out batch fails with it, and past
    max_queued a click is refused at once: a 503 never waits much past the timeout, and the
    memory held is bounded (a 60 s hang at 2,000 clicks/s held ~72k requests before)."""
    timeout = 0.2
    async with _HungRedis(answered=1) as url:  # the connect's PING, then nothing
        conn = RawRedis(url, timeout=timeout)
        writer = ClickWriter(conn, stream=STREAM, max_batch=10, max_queued=300)
        waits: list[float] = []
        outcomes: list[BaseException | None] = []
        loop = asyncio.get_running_loop()

        async def one(n: int) -> None:
            started = loop.time()
            try:
                await writer.write(fake_click(n))
                outcomes.append(None)
            except ClickNotRecorded as exc:
                outcomes.append(exc)
            waits.append(loop.time() - started)

        try:
            tasks = []
            for n in range(150):  # 1.5 s of 100 clicks every 10 ms: 7.5 timeouts
                tasks += [asyncio.create_task(one(n * 100 + i)) for i in range(100)]
                await asyncio.sleep(0.01)
                assert len(writer._clicks) <= 300
            await asyncio.gather(*tasks)
        finally:
            await writer.close()
            await conn.close()
    assert len(outcomes) == 15_000 and all(isinstance(o, ClickNotRecorded) for o in outcomes)
    assert max(waits) < 3 * timeout + 0.3, max(waits)


async def test_big_clicks_waiting_on_a_hung_redis_are_bounded_by_bytes(api: Any, tenant: Any, settings: Settings) -> None:
    """Clicks of 32 query values of 1000 characters (~35 KB each as kept) behind a hung Redis:
    past the writer's byte bound a click is refused at once (503), not queued up to max_queued
    (20,000 of them: 700 MB) until the timeout fails them all."""
    from tests.redirect.conftest import offer_and_link, running_edge

    _, link = await offer_and_link(api, tenant, "https://shop.example/?c={click_id}")
    query = "&".join(f"p{i}={'v' * 1000}" for i in range(32))
    async with running_edge(settings) as edge_app, _HungRedis(answered=1) as url:
        tracker = (await edge_app.get(link["shortUrl"])).headers["location"]
        real_writer = edge_app.app.writer
        # With Redis answering, what a batch took is no longer counted as waiting.
        assert [(await edge_app.get(f"{tracker}?{query}")).status_code for _ in range(3)] == [302] * 3
        assert real_writer._queued_bytes == 0 and real_writer.recorded >= 3
        conn = RawRedis(url, timeout=1.0)
        edge_app.app.writer = ClickWriter(conn, stream=STREAM, max_batch=1, max_inflight=1, max_queued_bytes=200_000)
        loop = asyncio.get_running_loop()

        async def click() -> tuple[int, float]:
            started = loop.time()
            resp = await edge_app.get(f"{tracker}?{query}")
            return resp.status_code, loop.time() - started

        try:
            answers = await asyncio.gather(*(click() for _ in range(40)))
        finally:
            await edge_app.app.writer.close()
            edge_app.app.writer = real_writer
            await conn.close()
    assert {status for status, _ in answers} == {503}
    at_once = [took for _, took in answers if took < 0.5]
    # One in flight, five of ~35 KB within 200 KB queued behind it: the other 34 refused at once.
    assert len(at_once) >= 30, sorted(took for _, took in answers)


def _big_click(n: int) -> edge.Click:
    query = {f"p{i}": f"{n:08d}" + "v" * 992 for i in range(32)}  # 32 values of 1000 characters
    return (f"{n:032x}", "l", "o", 1, 1, None, 1_795_456_800_000_000, None, "ua", None, False, query)


async def test_the_byte_bound_counts_the_batches_in_flight_too() -> None:
    """Behind a hung Redis, the batches in flight hold their clicks and their encoded XADDs until
    the timeout: counted only while queued, the memory held was about 5 times the bound (found by
    review: 325 MiB with the default 64 MiB). Measured with tracemalloc, in bursts as under load."""
    import tracemalloc

    bound = 8 << 20
    async with _HungRedis(answered=1) as url:
        conn = RawRedis(url, timeout=30)
        writer = ClickWriter(conn, stream=STREAM, max_queued_bytes=bound)
        futures, refused = [], 0
        tracemalloc.start()
        try:
            for burst in range(6):
                for i in range(500):
                    try:
                        futures.append(writer.submit(_big_click(burst * 500 + i), 32 * 1100))
                    except ClickNotRecorded:
                        refused += 1
                for _ in range(3):
                    await asyncio.sleep(0)  # the writer starts a batch of what is ready
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            for future in futures:
                future.cancel()
            await conn.close()
            await writer.close()
    assert refused > 0 and held < bound * 1.5, (held >> 20, refused)
