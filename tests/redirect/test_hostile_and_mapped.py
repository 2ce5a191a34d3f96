"""Found by review of the edge: IPv4-mapped proxies, queries and X-Forwarded-For of a million
parts, a Redis that hangs with commands still unsent, and a redirect that started PostgreSQL."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from services.redirect.app import MAX_QUERY_PARAMS, _query_values
from services.redirect.client_ip import ClientIP
from services.redirect.rawredis import RawRedis, RedisTimeout
from shared.process import die_with_parent
from tests.helpers import free_port
from tests.redirect.conftest import offer_and_link, running_edge


def test_a_trusted_hop_written_as_an_ipv4_mapped_address_is_trusted():
    # A dual-stack proxy writes an IPv4 peer as ::ffff:a.b.c.d; an IPv6 address is never "in" an
    # IPv4 network, so the walk took such a hop of our own network for the client.
    resolve = ClientIP([ipaddress.ip_network("10.0.0.0/8")])
    assert resolve("10.0.0.9", b"198.51.100.23, ::ffff:10.0.0.5") == "198.51.100.23"
    assert resolve("::ffff:10.0.0.9", b"198.51.100.23") == "198.51.100.23"
    assert resolve("10.0.0.9", b"::ffff:198.51.100.23") == "198.51.100.23"  # stored in its IPv4 form
    assert resolve("198.51.100.7", b"203.0.113.1") == "198.51.100.7"  # an untrusted peer: as before


async def test_forwarded_for_through_an_ipv4_mapped_hop_at_the_edge(api, tenant, settings):
    _, link = await offer_and_link(api, tenant, "https://lp.example/land?c={click_id}&ip={ip}")
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)
    async with running_edge(settings, client_ip="10.0.0.9", trusted_proxies=proxies) as edge:
        location = await edge.click(link["shortUrl"], headers={"x-forwarded-for": "198.51.100.23, ::ffff:10.0.0.5"})
    assert parse_qs(urlsplit(location).query)["ip"] == ["198.51.100.23"]


@pytest.mark.parametrize("query", [b"a&" * 500_000, b"a%20&" * 200_000, b"s=1&" + b"x" * 100_000 + b"&a" * 300_000])
def test_reading_a_hostile_query_allocates_little_more_than_the_query(query):
    tracemalloc.start()
    try:
        values, _ = _query_values(query)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(values) <= MAX_QUERY_PARAMS
    assert peak < 4 * len(query), f"peak {peak} bytes for a {len(query)}-byte query"  # was ~37x


def test_the_first_values_of_a_long_query_are_kept():
    query = b"sub1=a&sub2=b&" + b"&".join(b"p%d=%d" % (i, i) for i in range(5000))
    values, _ = _query_values(query)
    assert values["sub1"] == "a" and values["sub2"] == "b" and len(values) == MAX_QUERY_PARAMS


def test_a_forwarded_for_of_a_million_hops_allocates_little():
    resolve = ClientIP([ipaddress.ip_network("10.0.0.0/8")])
    header = b"1.2.3.4," * 1_000_000 + b"10.0.0.5"
    tracemalloc.start()
    try:
        client = resolve("10.0.0.9", header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert client == "1.2.3.4" and peak < 4 * len(header), peak


async def test_a_command_sent_after_a_timeout_never_reaches_the_connection_given_up_on():
    # A Redis that hangs with a big batch unsent: close() kept the connection until that data was
    # flushed, so the next commands went onto it, each waited out the timeout, and a Redis that
    # came back ran them although their callers had failed (a click answered 503, stored anyway).
    resume, finished = asyncio.Event(), asyncio.Event()
    received = bytearray()
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:  # a new connection: hung as well
            while await reader.read(1 << 16):
                pass
            writer.close()
            return
        answered = 0
        while answered < 2:  # the connect's PING and the test's
            data = await reader.read(100)
            if not data:
                return
            for _ in range(data.count(b"PING")):
                writer.write(b"+PONG\r\n")
                answered += 1
        await resume.wait()  # hung: reads nothing
        try:
            while chunk := await reader.read(1 << 20):
                received.extend(chunk)
                if b"after-timeout" in received:
                    break
        except ConnectionError:
            pass
        finished.set()
        writer.close()

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(handle, sock=listener)
    conn = RawRedis(f"redis://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3)
    try:
        assert await conn.execute("PING") == b"PONG"
        with pytest.raises(RedisTimeout):  # a batch the hung server does not take in
            await conn.request("XADD", "trk:test:phantom", "*", "c", b"x" * (8 << 20))
        late = conn.request("XADD", "trk:test:phantom", "*", "c", b"after-timeout")
        with pytest.raises(ConnectionError):
            await late
        resume.set()
        await asyncio.wait_for(finished.wait(), 10)
        assert b"after-timeout" not in received
    finally:
        await conn.close()
        server.close()


def test_the_redirect_starts_no_postgresql(settings, tmp_path: Path):
    # A redirect-only host: Redis configured, no database. It used to start an embedded PostgreSQL.
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKLY_")}
    env.update(TRACKLY_DATA_DIR=str(tmp_path), TRACKLY_REDIS_URL=settings.redis_url or "", TRACKLY_REDIRECT_PORT=str(port))
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "redirect"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent())
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the redirect did not start"
            time.sleep(0.1)
        assert not (tmp_path / "pg").exists()
    finally:
        proc.terminate()
        proc.wait(15)
