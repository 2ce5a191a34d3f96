"""A minimal pipelined Redis connection for the redirect's hot-path commands: the click batch's
``XADD`` and the cache misses' ``MGET`` (each on a connection of its own).

redis-py costs tens of microseconds per command (connection pool, a health check that yields to
the event loop, response callbacks); at tens of thousands of batches a second that is most of
the budget. This is an asyncio Protocol: ``execute`` writes the RESP command straight to the
transport and returns a future resolved, in order, by ``data_received`` (hiredis parses).

Several commands may be in flight at once. If the connection drops or a reply takes longer than
``timeout``, every command in flight fails (their outcome is unknown: the click writer answers
503, and the worker's idempotent drain absorbs any that did land) and the next call reconnects;
after a failed connect, calls fail at once for ``RECONNECT_PAUSE`` instead of each trying again.
"""
from __future__ import annotations

import asyncio
import collections
import ssl as ssl_module
import time
from typing import Any, Protocol

import hiredis
from redis.asyncio.connection import parse_url


RECONNECT_PAUSE = 0.25  # seconds calls fail at once after a failed connect


class RawRedisError(Exception):
    pass


class RedisTimeout(ConnectionError):
    """Redis took the command and did not answer in time (a hung server, a partition)."""


class Executor(Protocol):
    """What the hot path needs of a connection (``RawRedis``)."""

    def request(self, *args: bytes | str) -> asyncio.Future[Any]: ...


def _pack(args: tuple[bytes | str, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()  # made by the loop's create_connection
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, args: tuple[bytes | str, ...]) -> asyncio.Future[Any]:
        """Write a command; the future its reply (they come in order) resolves. Encoded before it
        takes a place in line: a command that cannot be sent must not shift the replies."""
        assert self.transport is not None
        command = _pack(args)
        future: asyncio.Future[Any] = self.loop.create_future()  # not get_running_loop(): a getpid() each time
        self.waiting.append(future)
        self.transport.write(command)
        return future

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.waiting:
                continue
            future = self.waiting.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RawRedisError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.fail(ConnectionError(f"redis connection lost: {exc or 'closed'}"))

    def fail(self, exc: Exception) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
                future.exception()  # the caller sees it raised; nobody else needs to retrieve it


class RawRedis:
    def __init__(
        self, url: str, *, timeout: float = 5.0, connect_timeout: float = 2.0, reconnect_pause: float = RECONNECT_PAUSE
    ) -> None:
        self._options = parse_url(url)
        self._tls = url.startswith("rediss://")
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False
        self._reconnect_pause = reconnect_pause
        self._failed: tuple[float, str] | None = None  # (until when, why) after a failed connect

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        opts = self._options
        if "path" in opts:
            connect = loop.create_unix_connection(_Protocol, opts["path"])
        else:
            ctx = ssl_module.create_default_context() if self._tls else None
            connect = loop.create_connection(_Protocol, opts.get("host", "localhost"), opts.get("port", 6379), ssl=ctx)
        _, protocol = await asyncio.wait_for(connect, self._connect_timeout)
        try:
            if opts.get("password"):
                auth = (opts["username"], opts["password"]) if opts.get("username") else (opts["password"],)
                await self._send(protocol, ("AUTH", *auth))
            if opts.get("db"):
                await self._send(protocol, ("SELECT", str(opts["db"])))
            if not opts.get("password") and not opts.get("db"):
                # Nothing above waited for an answer: a hung server (it takes connections and
                # answers nothing) must fail the connect, so that calls fail fast for a while
                # instead of each waiting out its timeout on the new connection.
                await self._send(protocol, ("PING",))
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.close()
            raise
        return protocol

    async def _protocol_ready(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.lost:
            return protocol
        if self._closed:
            raise ConnectionError("redis connection closed")
        if self._failed is not None and time.monotonic() < self._failed[0]:
            raise ConnectionError(f"redis unreachable: {self._failed[1]}")  # no connect per call
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            try:
                protocol = await self._connecting
            except Exception as exc:
                self._failed = (time.monotonic() + self._reconnect_pause, f"{type(exc).__name__}: {exc}")
                raise
            finally:
                self._connecting = None
            self._failed = None
            if self._closed:  # closed while connecting
                if protocol.transport is not None:
                    protocol.transport.close()
                raise ConnectionError("redis connection closed")
            self._protocol = protocol
            return protocol
        return await asyncio.shield(self._connecting)

    async def _send(self, protocol: _Protocol, args: tuple[bytes | str, ...]) -> Any:
        future = protocol.send(args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except asyncio.TimeoutError:
            self._expire(protocol, future)
            raise RedisTimeout("redis did not answer in time") from None

    async def execute(self, *args: bytes | str) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._protocol_ready()
        return await self._send(protocol, args)

    def submit(self, *args: bytes | str) -> asyncio.Future[Any] | None:
        """Send now, without a coroutine; the reply's future. None when not connected (then use
        ``execute``, which connects)."""
        protocol = self._protocol
        if protocol is None or protocol.lost or protocol.transport is None:
            return None
        future = protocol.send(args)
        timer = protocol.loop.call_later(self._timeout, self._expire, protocol, future)
        future.add_done_callback(lambda _: timer.cancel())
        return future

    def request(self, *args: bytes | str) -> asyncio.Future[Any]:
        """The reply's future, whatever happens: the command goes straight onto the connection
        when it is up (``submit``: no task), else once connected (``execute``); one that cannot
        even be sent gives a failed future. What the hot path's batches use."""
        try:
            reply = self.submit(*args)
            if reply is None:
                reply = asyncio.ensure_future(self.execute(*args))
        except Exception as exc:  # noqa: BLE001 - the callers' requests must not wait forever
            reply = asyncio.get_running_loop().create_future()
            reply.set_exception(exc)
        return reply

    @staticmethod
    def _expire(protocol: _Protocol, future: asyncio.Future[Any]) -> None:
        if not future.done():
            # Replies come in order: a late one would be taken for the next command's. Start over,
            # at once: close() would keep the connection (and take new commands) until its unsent
            # data was flushed, and a Redis that came back would then run commands whose callers
            # were told they failed (a click answered 503, stored all the same).
            protocol.lost = True
            protocol.fail(RedisTimeout("redis did not answer in time"))
            if protocol.transport is not None:
                protocol.transport.abort()

    async def close(self) -> None:
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
