"""Ways past the head bound of shared/http_limits.py that a review found (both fail without on_body counting)."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.redirect import main as redirect_main
from tests.shared.test_http_limits import _http_protocol_of, _serve


async def _answer_at_once(scope: dict, receive: Any, send: Any) -> None:
    """As the redirect does: answers without reading the request's body."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024


async def _flood(writer: asyncio.StreamWriter, total: int) -> int:
    chunk, sent = b"a" * 65536, 0
    try:
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    except (ConnectionError, OSError):
        pass
    return sent


@pytest.mark.parametrize("junk", [20_000_000])
async def test_a_head_after_a_body_the_app_did_not_read_is_still_bounded(monkeypatch, settings, junk):
    """A request with a 1-byte body, answered before its body arrived (the redirect never reads a
    body): uvicorn leaves that cycle's more_body True for good (on_message_complete returns early
    once the response is complete), so every later read on the connection counts as 'body' and the
    next head is never counted."""
    http = _http_protocol_of(redirect_main, monkeypatch, settings)
    server, task, port = await _serve(http, _answer_at_once)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n")
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        writer.write(b"a" + b"GET / HTTP/1.1\r\nHost: x\r\nX-Junk: ")
        before = _rss_mb()
        sent = await _flood(writer, junk)
        print("rss growth MB (server in this process):", _rss_mb() - before)
        try:
            writer.write(b"\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(200), 10)
        except (ConnectionError, OSError):
            answer = b""
        writer.close()
        # Bounded: refused (431) or hung up long before 20 MB were taken in.
        assert not answer.startswith(b"HTTP/1.1 200"), (answer[:60], sent)
    finally:
        server.should_exit = True
        await task


async def test_chunked_trailers_are_bounded_as_a_head_is(monkeypatch, settings):
    """A chunked body's trailer section is header fields too (httptools accumulates a field's
    value in memory until it ends); read while the body is 'in progress', it is never counted."""
    http = _http_protocol_of(redirect_main, monkeypatch, settings)
    server, task, port = await _serve(http, _answer_at_once)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\nX-Trailer: ")
        before = _rss_mb()
        sent = await _flood(writer, 20_000_000)
        await asyncio.sleep(0.2)
        print("rss growth MB (server in this process):", _rss_mb() - before)
        # The server took all 20 MB of one trailer value in (sent counts what the kernel accepted).
        closed = writer.transport.is_closing() or reader.at_eof()
        writer.close()
        assert sent < 5_000_000 or closed, sent
    finally:
        server.should_exit = True
        await task
