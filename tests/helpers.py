"""Factories for tests: accounts, lists, offers and links made through the real code paths."""
from __future__ import annotations

import asyncio
import re
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from shared import accounts
from shared.embedded import EmbeddedRedis
from shared.redis_client import create_redis


@dataclass
class Tenant:
    account_id: int
    api_key: str
    postback_token: str
    list_id: int
    list_phone: str
    short_domain: str = "https://sms.example.com"
    extra: dict = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Api-Key": self.api_key}


def random_phone(prefix: str = "+1415") -> str:
    return prefix + "".join(secrets.choice("0123456789") for _ in range(7))


async def make_tenant(
    db: asyncpg.Pool,
    *,
    offer_management: bool = True,
    short_domain: str | None = "https://sms.example.com",
    tracker_domain: str | None = None,
) -> Tenant:
    async with db.acquire() as conn:
        acct = await accounts.create_account(conn, "test", offer_management=offer_management)
        phone = random_phone("+1800")
        lst = await accounts.create_list(
            conn, account_id=acct["account_id"], name="main", phone=phone,
            short_domain=short_domain, tracker_domain=tracker_domain,
        )
    return Tenant(acct["account_id"], acct["api_key"], acct["postback_token"], lst["list_id"], lst["phone_number"],
                  short_domain or "")


async def add_list(db: asyncpg.Pool, tenant: Tenant, **kwargs: object) -> dict:
    async with db.acquire() as conn:
        return await accounts.create_list(
            conn, account_id=tenant.account_id, name=str(kwargs.pop("name", "extra")),
            phone=str(kwargs.pop("phone", random_phone("+1888"))), **kwargs,  # type: ignore[arg-type]
        )


async def make_offer(api: httpx.AsyncClient, tenant: Tenant, **fields: object) -> dict:
    body = {"name": "Summer", "destination_url": "https://example.com/offer?aff_sub={{sendId}}", **fields}
    resp = await api.post("/api/v2/offers", json=body, headers=tenant.headers)
    assert resp.status_code == 201, resp.text
    return resp.json()["offer"]


async def make_link(api: httpx.AsyncClient, tenant: Tenant, offer_id: str, **fields: object) -> dict:
    resp = await api.post("/api/v2/links", json={"offerId": offer_id, "listId": tenant.list_id, **fields}, headers=tenant.headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


async def fold_while_writing(
    dsn: str, db: asyncpg.Pool, write: Callable[[asyncpg.Connection], Awaitable[object]],
    fold: Callable[[Any], Awaitable[int]],
) -> None:
    """The races a fold of a counting table meets: ``write`` runs in a transaction left open while
    one worker folds (uncommitted), and a second worker's fold starts meanwhile (it waits for the
    first's deleted rows); then the first fold commits, the second ends, and the write commits."""
    writer, folder = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        pending = writer.transaction()
        await pending.start()
        await write(writer)
        folding = folder.transaction()
        await folding.start()
        await fold(folder)
        racing = asyncio.create_task(fold(db))
        await asyncio.sleep(0.2)
        assert not racing.done()
        await folding.commit()
        await racing
        await pending.commit()
    finally:
        await writer.close()
        await folder.close()


def services_up(gateway_port: int, redirect_port: int) -> bool:
    """Whether a ``trackly run`` on these ports answers: the gateway ready, the redirect alive."""
    try:
        return httpx.get(f"http://127.0.0.1:{gateway_port}/readyz").status_code == 200 and \
            httpx.get(f"http://127.0.0.1:{redirect_port}/healthz").status_code == 200
    except httpx.TransportError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports() -> tuple[int, int]:
    """Two free ports, distinct (two free_port() calls can hand out the same one)."""
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return int(a.getsockname()[1]), int(b.getsockname()[1])


async def table_reads(conn: asyncpg.Connection, run: Callable[[], Awaitable[Any]], *tables: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    """``run()``'s result and, per table, the sequential scans and index-fetched rows it made
    (triggers included). A backend's counts wait up to a second to be reported and earlier
    statements on the same connection are in them too: counted before and after, in one
    transaction (nothing is reported in the middle of one)."""

    async def counts() -> dict[str, tuple[int, int]]:
        rows = await conn.fetch(
            "SELECT relname, seq_scan, idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = ANY($1::text[])",
            list(tables),
        )
        return {r["relname"]: (r["seq_scan"], r["idx_tup_fetch"]) for r in rows}

    async with conn.transaction():
        before = await counts()
        result = await run()
        after = await counts()
    return result, {t: (after[t][0] - before[t][0], after[t][1] - before[t][1]) for t in tables}


@pytest.fixture(scope="module")
def own_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Redis server of the module's own (the embedded one), for tests that fill it (``redis_full``):
    ``maxmemory`` is the server's, every database's, so on a Redis the suite shares with others
    (TRACKLY_REDIS_URL) their writes failed with OOM meanwhile. A module imports it with
    ``redis_on_own_server``, which makes its ``redis`` a client of this server."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("own-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="redis")
async def redis_on_own_server(own_redis_server: EmbeddedRedis) -> AsyncIterator[Any]:
    client = create_redis(own_redis_server.url)
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def redis_full(redis: Any) -> AsyncIterator[None]:
    """This Redis refuses writes that need memory, as a full one with ``noeviction`` does. The
    setting is the whole server's: give it only a server of the test's own (``own_redis_server``)."""
    before = await redis.config_get("maxmemory*")
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", "1")
    try:
        yield
    finally:
        await redis.config_set("maxmemory", before["maxmemory"])
        await redis.config_set("maxmemory-policy", before["maxmemory-policy"])


@contextlib.asynccontextmanager
async def scratch_database(settings: Any, db: Any, prefix: str) -> AsyncIterator[str]:
    """A new, empty database beside the test one (its DSN), dropped afterwards. Its name is the
    prefix and a random suffix: two suites on one server (a developer's and a helper's) must not
    create, or drop, each other's."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    await db.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}"))
    finally:
        await db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def lock_waiters(db: Any, n: int) -> None:
    """Until ``n`` sessions of this database wait on a lock. Ask with a connection outside any
    transaction: pg_stat_activity is a snapshot per transaction."""
    for _ in range(200):
        if await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                             " AND wait_event_type = 'Lock'") == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {n} sessions waiting on a lock")


@contextlib.asynccontextmanager
async def row_held(dsn: str, insert: str, *args: object) -> AsyncIterator[Any]:
    """A row inserted by another session in a transaction left open (yielded: commit or roll it
    back), so that writers of the same key wait on it; closed, and so rolled back, at the end."""
    conn = await asyncpg.connect(dsn)
    try:
        held = conn.transaction()
        await held.start()
        await conn.execute(insert, *args)
        yield held
    finally:
        await conn.close()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus text page (``labels`` as written: '{hop="short"}')."""
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


class Link:
    """A TCP port in front of a server (``(host, port)``, or a unix socket's path). ``cut()`` is a
    network partition, or a host that vanished (a failover, a VM gone): what was sent on an open
    connection is never answered and nothing says so (no reset reaches the client: the kernel
    retransmits for ~15 minutes before it gives up), and a new connection is refused. ``mend()``
    lets new connections through again; those open during the cut stay dead, as a vanished
    host's do."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self._target = target
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._held: list[asyncio.StreamWriter] = []
        self._frozen = False
        self.port = 0

    async def mend(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in self._pipes:
            pipe.cancel()  # the sockets stay open: nothing is answered, nothing is closed

    async def freeze(self) -> None:
        """A server that stopped answering (its processes frozen, its host hung): what was sent on an
        open connection is never answered, and new connections are taken but never answered either
        (as a frozen server's kernel still completes the handshake)."""
        self._frozen = True
        for pipe in self._pipes:
            pipe.cancel()

    def close(self) -> None:
        for writer in self._held:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._frozen:
            self._held.append(writer)
            return
        if isinstance(self._target, str):
            up_reader, up_writer = await asyncio.open_unix_connection(self._target)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._held += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):  # (closed by close())
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()

        for task in (asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))):
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


def postgres_link(dsn: str) -> tuple[Link, Callable[[int], str]]:
    """A Link to the PostgreSQL of a DSN (TCP, or a unix socket given as ``?host=/dir``), and the
    DSN through a port (the link's, once it has one)."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    port = parts.port or int(query.get("port", 5432))
    target: tuple[str, int] | str = (
        (parts.hostname, port) if parts.hostname else f"{query['host']}/.s.PGSQL.{port}")
    rest = urlencode({k: v for k, v in query.items() if k not in ("host", "port")})
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return Link(target), lambda p: urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{p}", query=rest))


async def report_strays_and_the_events(conn: asyncpg.Connection, account_id: int) -> tuple[list[tuple], list[tuple]]:
    """An account's report_strays (migration 0029), summed per (day, message), and the same
    computed from the events: per UTC day and message, the events of messages sent another day."""
    kept = await conn.fetch(
        "SELECT day, message_id, sent_day, sum(events) FROM report_strays WHERE account_id = $1"
        " GROUP BY 1, 2, 3 HAVING sum(events) <> 0 ORDER BY 1, 2", account_id)
    events = await conn.fetch(_STRAYS_OF_THE_EVENTS, account_id)
    return [tuple(r) for r in kept], [tuple(r) for r in events]


_STRAYS_OF_THE_EVENTS = """
SELECT day, message_id, sent_day, count(*) FROM (
    SELECT (mc.clicked_at AT TIME ZONE 'UTC')::date, m.id, (m.sent_at AT TIME ZONE 'UTC')::date
    FROM message_clicks mc JOIN messages m ON m.id = mc.message_id AND m.account_id = mc.account_id
    WHERE mc.account_id = $1
    UNION ALL
    SELECT (c.converted_at AT TIME ZONE 'UTC')::date, m.id, (m.sent_at AT TIME ZONE 'UTC')::date
    FROM conversions c JOIN messages m ON m.id = c.message_id WHERE c.account_id = $1
    UNION ALL
    SELECT (r.occurred_at AT TIME ZONE 'UTC')::date, m.id, (m.sent_at AT TIME ZONE 'UTC')::date
    FROM revenue r JOIN messages m ON m.id = r.message_id WHERE r.account_id = $1
) AS e(day, message_id, sent_day)
WHERE day <> sent_day GROUP BY 1, 2, 3 ORDER BY 1, 2
"""
