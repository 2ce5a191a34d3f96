"""TRACKLY_KEEPALIVE_SECONDS reaches the real gateway and redirect processes: an idle client
connection is kept that long, then closed (a load balancer in front must close its own first)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.process import die_with_parent
from shared.settings import Settings
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
PORT_VARIABLE = {"gateway": "TRACKLY_GATEWAY_PORT", "redirect": "TRACKLY_REDIRECT_PORT"}


@contextlib.contextmanager
def _service(settings: Settings, name: str, keepalive: int) -> Iterator[int]:
    port = free_port()
    env = dict(
        os.environ, TRACKLY_DATABASE_URL=settings.database_url or "", TRACKLY_REDIS_URL=settings.redis_url or "",
        TRACKLY_DATA_DIR=str(settings.data_dir), TRACKLY_LOG_LEVEL="warning", TRACKLY_KEEPALIVE_SECONDS=str(keepalive),
        **{PORT_VARIABLE[name]: str(port)},
    )
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", name], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent())
    try:
        for _ in range(600):
            assert proc.poll() is None, f"the {name} exited during start-up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(20)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return head.split(b"\r\n")[0]


@pytest.mark.parametrize("name", ["gateway", "redirect"])
async def test_an_idle_connection_is_kept_as_long_as_configured(settings: Settings, name: str) -> None:
    with _service(settings, name, keepalive=8) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await _get(reader, writer) == b"HTTP/1.1 200 OK"
            # Idle past uvicorn's own 5 s (which closed it, and a balancer sending on it got nothing):
            # still open, and answering on the same connection.
            await asyncio.sleep(5.5)
            assert await _get(reader, writer) == b"HTTP/1.1 200 OK"
        finally:
            writer.close()


async def test_an_idle_connection_is_closed_once_idle_that_long(settings: Settings) -> None:
    with _service(settings, "redirect", keepalive=1) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await _get(reader, writer) == b"HTTP/1.1 200 OK"
            start = time.monotonic()
            assert await asyncio.wait_for(reader.read(), timeout=10) == b""
            assert time.monotonic() - start < 4  # (1 s, not uvicorn's 5)
        finally:
            writer.close()
