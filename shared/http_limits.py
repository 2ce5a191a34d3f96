"""uvicorn's httptools protocol with a bound on a request's head (request line and headers).

uvicorn with httptools bounds neither: the URL and every header are accumulated in memory until
the blank line that ends the head, so one unauthenticated request with a 200 MB header held
~220 MB of the process (two of them OOM-killed a 256 MiB redirect pod). Both public services
(the redirect edge and the gateway's postback receiver) are reachable by anyone, so the head is
bounded here, whatever proxy there is or is not in front: a client that sends more than
``MAX_HEAD_BYTES`` before its head is complete gets ``431`` and the connection is closed.
"""
from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Request line plus headers, as nginx's default large_client_header_buffers (4 x 8k) plus room:
# a real click or postback sends a few KB at most.
MAX_HEAD_BYTES = 64 * 1024

_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 32\r\n"
    b"connection: close\r\n\r\n"
    b"Request header fields too large\n"
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that refuses a request whose head exceeds ``max_head_bytes``.

    A read in which a head ends (uvicorn makes a new request cycle for it) costs an attribute read
    and a comparison more: the redirect's hot path. A read that carries body bytes (counted as
    httptools hands them over, ``on_body``) resets the count; every other read is counted: a head,
    a chunked body's trailers, and a next head after a body the app answered without reading
    (uvicorn then leaves that cycle's ``more_body`` True for good, so it cannot tell)."""

    max_head_bytes = MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # bytes received since the last head ended (or the connection began)
        self._body_bytes = 0  # body bytes httptools handed over on this connection

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def data_received(self, data: bytes) -> None:
        cycle, body_before = self.cycle, self._body_bytes
        super().data_received(data)
        if self.cycle is not cycle:  # a head ended in this read (a next one begun in it: at most a read's worth)
            if self._head_bytes:
                self._head_bytes = 0
        elif self._body_bytes != body_before:
            self._head_bytes = 0  # a body's bytes, bounded by the app (and what follows them in this read)
        else:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
                if cycle is None or cycle.response_complete:
                    self.transport.write(_TOO_LARGE)
                self.transport.close()
