"""Redirect edge and click drainer, each against a floor measured in the same run.

* HTTP: a bare uvicorn ASGI app answering a fixed 302 (the floor) and the real redirect
  (``python -m services.cli redirect``), each pinned to core 0 with the same uvicorn options,
  driven by ``wrk -t1 -c50`` pinned to core 1, in interleaved rounds. Short hop (cached) and
  tracker hop (click durably in the Redis stream before the 302) as ratios of the floor's
  requests/s and p99; with no goal, the two hops of per-message clicks (the short hop of 200k
  per-message codes, each a cache miss, and the tracker hop with each message's signed sid). While the tracker hop runs, the stream is trimmed as the drainer would
  (see ``_drained_stream``).
* Drain: ``drain_once`` over 50k clicks (some of them message clicks, so message_clicks and
  contacts are written too) against a plain ``COPY`` of the same rows into the clicks table
  itself, rolled back, just before: the same indexes at the same size. The median of the rounds'
  ratios is the figure.
* Memory: redirect RSS after 1M links are published in Redis and a sample of them is clicked.
"""
from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit
from collections.abc import Iterator

import asyncpg
import httpx
import orjson

from bench import wrk
from bench.common import BenchEnv, ratio
from services.worker.clicks import DRAIN_LOOPS, drain_once
from shared import db as shared_db
from shared import edge, ids
from shared.accounts import create_account, create_list
from shared.redis_client import create_redis

REPO = Path(__file__).resolve().parents[1]
SERVER_CPU, LOAD_CPU = "0", "1"
SECONDS = 6
SHORT_HOST, TRACKER_HOST = "sms.bench.test", "ct.bench.test"
DRAIN_CLICKS, CLICKS_PER_ENTRY = 50_000, 100
PUBLISHED_LINKS, SAMPLE_LINKS = 1_000_000, 20_000
# Per-message short codes published for the message hop, each requested in turn: a per-message URL
# is mostly clicked once, so its lookup is a cache miss (and a turn starts again from the first
# code when its entry has expired: a refresh from Redis all the same).
MESSAGE_CODES = 200_000
# The tracker hop of per-message clicks: that many messages' signed tracker URLs, each requested in
# turn (the tracker and offer are cached; the sid's signature is checked on every click).
SIGNED_CLICKS = 5_000
# The HTTP measures are short (SECONDS each) and the noisiest: each is taken HTTP_ROUNDS times and
# the best kept, floors and products alike (other processes on a shared machine only ever make a
# run slower), so that the best of each is as likely to have met a quiet moment as the others'.
HTTP_ROUNDS = 5
# The drain is compared with the COPY of its own round (same rows, same table size), and the
# median of those ratios reported: the table grows from round to round, so a best-of would pit a
# COPY into the smallest table against a drain into a bigger one.
DRAIN_ROUNDS = 5

FLOOR_APP = """
import sys, uvicorn

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 302,
                "headers": [(b"location", b"https://example.com/"), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
            access_log=False, proxy_headers=False, log_level="warning", lifespan="on")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited with {proc.returncode}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd} did not start") from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _redirect_env(env: BenchEnv, port: int) -> dict[str, str]:
    return dict(
        os.environ,
        TRACKLY_DATABASE_URL=env.settings.database_url or "",
        TRACKLY_REDIS_URL=env.settings.redis_url or "",
        TRACKLY_REDIRECT_PORT=str(port),
        TRACKLY_LOG_LEVEL="warning",
    )


def _pin_redis(env: BenchEnv) -> str:
    """Move the embedded redis-server onto the load core: it stands in for another machine, so the
    server's core measures the server alone. Returns a note for the report."""
    url = env.settings.redis_url or ""
    if not url.startswith("unix://"):
        return "redis: external, not pinned"
    socket_path = url.removeprefix("unix://").encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"redis-server" in cmdline and socket_path in cmdline:
            os.sched_setaffinity(int(proc.name), {int(LOAD_CPU)})
            return f"redis-server pinned to core {LOAD_CPU} (with wrk)"
    return "redis: embedded server not found, not pinned"


@contextmanager
def _drained_stream(env: BenchEnv) -> Iterator[None]:
    """Keep the click stream short while the tracker hop is measured, as the worker's drainer does
    in production (it XACKs and XDELs each batch once stored).

    Without it the stream grows to ~500k undrained clicks over the warm-up and rounds (~160 MB of
    AOF), and Redis (``appendfsync always``) rewrites that AOF during a measured round: a fork and
    a 1 s rewrite of a data set production never holds, which took the tracker p99 from ~3 ms to
    9-13 ms in the round it landed in. Trimming from a thread every 100 ms costs Redis a
    negligible command and leaves every click's durable XADD on the measured path unchanged."""
    import threading

    import redis as sync_redis

    client = sync_redis.Redis.from_url(env.settings.redis_url or "")
    stop = threading.Event()

    def trim() -> None:
        while not stop.wait(0.1):
            try:
                client.xtrim(edge.CLICK_STREAM, maxlen=1000, approximate=True)
            except sync_redis.RedisError:
                pass

    thread = threading.Thread(target=trim, name="bench-stream-drain", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        client.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


# -- data ------------------------------------------------------------------------------------


async def _setup(env: BenchEnv) -> dict:
    """An account, list and offer in PostgreSQL, 1000 messages, and one link published in Redis."""
    pool = await shared_db.create_pool(env.settings.database_url)
    async with pool.acquire() as conn:
        acct = await create_account(conn, "bench-redirect")
        lst = await create_list(conn, account_id=acct["account_id"], name="bench", phone="+18005550142",
                                short_domain=f"https://{SHORT_HOST}", tracker_domain=f"http://{TRACKER_HOST}")
        offer_id = ids.hex24()
        offer = await conn.fetchrow(
            "INSERT INTO offers (id, account_id, name, destination_url, affiliate_id) VALUES ($1, $2, 'bench', $3, 'aff1')"
            " RETURNING id, status, destination_url, affiliate_id, account_id",
            offer_id, acct["account_id"], "https://lp.example/land?cid={click_id}&s1={sub1}&m={{sendId}}",
        )
        messages = [(ids.message_id(), f"+1415555{i:04d}") for i in range(1000)]
        await conn.execute(
            "INSERT INTO messages (id, account_id, list_id, to_phone, body, offer_id, sent_at)"
            " SELECT id, $1, $2, phone, 'hi', $3, now() FROM unnest($4::text[], $5::text[]) AS t(id, phone)",
            acct["account_id"], lst["list_id"], offer_id, [m for m, _ in messages], [p for _, p in messages],
        )
        await conn.execute(
            "INSERT INTO contacts (account_id, list_id, phone_number)"
            " SELECT $1, $2, phone FROM unnest($3::text[]) AS t(phone)",
            acct["account_id"], lst["list_id"], [p for _, p in messages],
        )
    await pool.close()
    redis = create_redis(env.settings.redis_url)
    code, tracker = ids.link_id(), ids.tracker_id()
    await redis.mset({
        edge.short_key(SHORT_HOST, code): edge.dumps({"u": edge.tracker_url(f"http://{TRACKER_HOST}", tracker), "o": offer_id, "m": None}),
        edge.tracker_key(tracker): edge.dumps({"h": TRACKER_HOST, "l": code, "o": offer_id, "a": acct["account_id"], "li": lst["list_id"]}),
        edge.offer_key(offer_id): edge.dumps(edge.offer_entry(offer)),
    })
    message_codes = ids.message_link_codes(MESSAGE_CODES)
    for start in range(0, MESSAGE_CODES, 10_000):
        await redis.mset({
            edge.short_key(SHORT_HOST, c): edge.dumps(edge.message_code_entry(code, ids.message_id(), None))
            for c in message_codes[start : start + 10_000]
        })
    await redis.aclose()
    return {"account": acct["account_id"], "list": lst["list_id"], "offer": offer_id, "code": code,
            "tracker": tracker, "messages": [m for m, _ in messages], "message_codes": message_codes}


def _clicks(data: dict, n: int) -> list[edge.Click]:
    rng = random.Random(7)
    t0 = edge.micros(datetime.now(UTC) - timedelta(hours=1))
    out: list[edge.Click] = []
    for i in range(n):
        message = rng.choice(data["messages"]) if rng.random() < 0.3 else None
        out.append((
            ids.click_id(), data["code"], data["offer"], data["account"], data["list"], message, t0 + i * 1000,
            "203.0.113.7", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148", "US",
            rng.random() < 0.05, {"sub1": f"s{i % 50}"},
        ))
    return out


# -- drain -----------------------------------------------------------------------------------


async def _copy_floor(env: BenchEnv, clicks: list[edge.Click]) -> float:
    """Rows/s of a plain binary COPY of the clicks into the clicks table itself (so into the same
    indexes, at the same size, as the drain that follows), rolled back."""
    conn = await asyncpg.connect(env.settings.database_url)
    try:
        # COPY is binary: jsonb's binary form is a version byte, then the text.
        await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                                  encoder=lambda v: b"\x01" + orjson.dumps(v), decoder=lambda b: orjson.loads(b[1:]))
        rows = [(*c[:6], edge.from_micros(c[6]), *c[7:]) for c in clicks]  # edge.CLICK_FIELDS' order
        columns = ["id", "link_id", "offer_id", "account_id", "list_id", "message_id", "clicked_at", "ip",
                   "user_agent", "country_code", "is_bot", "params"]
        transaction = conn.transaction()
        await transaction.start()
        try:
            start = time.perf_counter()
            await conn.copy_records_to_table("clicks", records=rows, columns=columns)
            return len(rows) / (time.perf_counter() - start)
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


async def _drain_round(env: BenchEnv, data: dict, pool: asyncpg.Pool, redis: object) -> tuple[float, float, int]:
    """(drain clicks/s, COPY rows/s, clicks drained) for one fresh set of clicks."""
    clicks = _clicks(data, DRAIN_CLICKS)
    copy_rate = await _copy_floor(env, clicks)
    for i in range(0, len(clicks), CLICKS_PER_ENTRY):
        await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: orjson.dumps(clicks[i : i + CLICKS_PER_ENTRY])})  # type: ignore[attr-defined]
    drained = 0

    async def loop(consumer: str) -> None:
        nonlocal drained
        while n := await drain_once(pool, redis, consumer=consumer):  # type: ignore[arg-type]
            drained += n

    # As the worker runs it: DRAIN_LOOPS concurrent loops, one decoding while another's
    # transaction runs in PostgreSQL.
    start = time.perf_counter()
    await asyncio.gather(*(loop(f"bench-{i}") for i in range(DRAIN_LOOPS)))
    drain_s = time.perf_counter() - start
    return drained / drain_s, copy_rate, drained


async def _drain_bench(env: BenchEnv, data: dict) -> list[str]:
    redis = create_redis(env.settings.redis_url)
    pool = await shared_db.create_pool(env.settings.database_url, max_size=DRAIN_LOOPS)
    try:
        rounds = [await _drain_round(env, data, pool, redis) for _ in range(DRAIN_ROUNDS)]
        stored = await pool.fetchval("SELECT count(*) FROM clicks WHERE account_id = $1", data["account"])
        firsts = await pool.fetchval("SELECT count(*) FROM message_clicks WHERE account_id = $1", data["account"])
    finally:
        await pool.close()
        await redis.aclose()  # type: ignore[attr-defined]
    drain_rate = max(r[0] for r in rounds)
    copy_rate = max(r[1] for r in rounds)
    per_round = [d / c for d, c, _ in rounds]
    return [
        f"floor: plain COPY of the same {DRAIN_CLICKS:,} click rows into the clicks table (rolled back), just before each"
        f" drain, {DRAIN_ROUNDS} rounds: {', '.join(f'{c:,.0f}' for _, c, _ in rounds)} rows/s",
        f"drain_once x{DRAIN_LOOPS} loops over {DRAIN_CLICKS:,} clicks (30% message clicks: message_clicks and contacts"
        f" written too): {', '.join(f'{d:,.0f}' for d, _, _ in rounds)} clicks/s; {stored:,} stored, {firsts:,} first"
        " message clicks",
        f"  drain / the COPY of its own round: {', '.join(f'{r:.2f}' for r in per_round)}:"
        f" median {statistics.median(per_round):.2f}x (goal >= 0.50)",
        # Best against best mixes rounds: the COPY's best is usually round 1's, into the smallest
        # table (each round leaves 50k more clicks and the COPY's 50k dead rows behind).
        f"  best drain / best COPY, across rounds: {ratio(drain_rate, copy_rate)}",
    ]


# -- HTTP ------------------------------------------------------------------------------------


def _warm(url: str, host: str | None = None) -> None:
    wrk.run(url, host=host, seconds=1, cpu=LOAD_CPU)


def _http_bench(env: BenchEnv, data: dict) -> list[str]:
    if not wrk.available():
        return [wrk.INSTALL_HINT, "skipped: HTTP floor, short hop and tracker hop"]
    lines: list[str] = [_pin_redis(env)]
    floor_port, port = _free_port(), _free_port()
    # Both servers up at once (an idle one costs its core nothing) and measured in turns, floor,
    # short, tracker, HTTP_ROUNDS times: drift on a shared machine lands on floor and product alike.
    with _server([sys.executable, "-c", FLOOR_APP, str(floor_port)], floor_port) as floor_proc, \
            _server([sys.executable, "-m", "services.cli", "redirect"], port, _redirect_env(env, port)) as proc:
        base = f"http://127.0.0.1:{port}"
        codes = wrk.paths_script([f"/{c}" for c in data["message_codes"]])
        signed = wrk.paths_script(asyncio.run(_signed_tracker_paths(base, data["message_codes"][:SIGNED_CLICKS])))
        urls = {
            "floor": (f"http://127.0.0.1:{floor_port}/", None, None),
            "short": (f"{base}/{data['code']}?sub1=x", SHORT_HOST, None),
            "tracker": (f"{base}/c/{data['tracker']}?sub1=x", TRACKER_HOST, None),
            "message": (f"{base}/", SHORT_HOST, codes),
            "message tracker": (f"{base}/", TRACKER_HOST, signed),
        }
        for url, host, _ in urls.values():
            _warm(url, host)
        results: dict[str, list[wrk.WrkResult]] = {name: [] for name in urls}
        cpu_per_request: dict[str, list[float]] = {name: [] for name in urls}  # server CPU s per answered request
        before = httpx.get(f"{base}/metrics").text
        for _ in range(HTTP_ROUNDS):
            for name, (url, host, script) in urls.items():
                pid = floor_proc.pid if name == "floor" else proc.pid
                cpu = _cpu_seconds(pid)
                with _drained_stream(env) if name in ("tracker", "message tracker") else nullcontext():
                    result = wrk.run(url, host=host, seconds=SECONDS, cpu=LOAD_CPU, script=script)
                results[name].append(result)
                cpu_per_request[name].append((_cpu_seconds(pid) - cpu) / max(result.requests - result.bad, 1))
        after = httpx.get(f"{base}/metrics").text
    codes.unlink()  # a few MB of Lua in the temporary directory
    signed.unlink()
    floor, short, tracker, message, message_tracker = (max(results[name], key=lambda r: r.rps) for name in urls)
    lines.append(
        f"floor: bare uvicorn ASGI fixed 302 (core {SERVER_CPU}; wrk -t1 -c50 on core {LOAD_CPU}, best of {HTTP_ROUNDS},"
        f" rounds interleaved with the product's): {floor.describe()}"
    )
    recorded = _metric(after, "trackly_redirect_clicks_recorded_total") - _metric(before, "trackly_redirect_clicks_recorded_total")
    batches = _metric(after, "trackly_redirect_click_batches_total") - _metric(before, "trackly_redirect_click_batches_total")
    lines.append(
        f"short hop, cached: {short.describe()} = {ratio(short.rps, floor.rps)} rps (goal >= 0.80),"
        f" p99 {short.p99_ms / floor.p99_ms:.2f}x floor p99"
    )
    lines.append(
        f"tracker hop, click durable in Redis before the 302: {tracker.describe()} = {ratio(tracker.rps, floor.rps)} rps"
        f" (goal >= 0.60), p99 {tracker.p99_ms / floor.p99_ms:.2f}x floor p99 (goal <= 3)"
    )
    lines.append(
        f"short hop of per-message codes, each a cache miss read from Redis ({MESSAGE_CODES:,} codes in turn;"
        f" no goal: the realistic SMS case): {message.describe()} = {ratio(message.rps, floor.rps)} rps,"
        f" p99 {message.p99_ms / floor.p99_ms:.2f}x floor p99"
    )
    lines.append(
        f"tracker hop of a per-message click, its signed sid verified ({SIGNED_CLICKS:,} messages' tracker URLs, as"
        f" the short hop answered them, in turn; no goal): {message_tracker.describe()} ="
        f" {ratio(message_tracker.rps, floor.rps)} rps, p99 {message_tracker.p99_ms / floor.p99_ms:.2f}x floor p99"
    )
    lines.append(
        f"  group commit: {recorded:,.0f} clicks in {batches:,.0f} XADDs = {recorded / max(batches, 1):.1f} clicks per batch"
        " (stream trimmed every 100 ms meanwhile, as the drainer keeps it short)"
    )
    misses = _metric(after, "trackly_redirect_cache_misses_total") - _metric(before, "trackly_redirect_cache_misses_total")
    mgets = _metric(after, "trackly_redirect_lookup_batches_total") - _metric(before, "trackly_redirect_lookup_batches_total")
    lines.append(f"  cache misses: {misses:,.0f} lookups in {mgets:,.0f} MGETs = {misses / max(mgets, 1):.1f} per read")
    # The spread, for judging the best-of figures on a noisy machine: each turn against its own floor.
    for name in ("short", "tracker", "message", "message tracker"):
        turns = [p.rps / f.rps for p, f in zip(results[name], results["floor"], strict=True)]
        lines.append(f"  {name} hop / floor, turn by turn: {', '.join(f'{t:.2f}' for t in turns)}"
                     f" (median {statistics.median(turns):.2f})")
        # Each turn's tail against the floor's in the same round: one 6 s turn's p99 can carry a
        # single stall (an fsync of Redis's AOF on a shared disk), which the best-rps turn may be.
        tails = [p.p99_ms / f.p99_ms for p, f in zip(results[name], results["floor"], strict=True)]
        lines.append(f"  {name} hop p99 / floor p99, turn by turn: {', '.join(f'{t:.2f}' for t in tails)}"
                     f" (median {statistics.median(tails):.2f})")
    # Requests/s on this shared machine move with whatever else runs (turns of one run differ by
    # 2x); the server CPU each request costs moves less (it still does: caches and clock are
    # shared), and 1 / that is the rate of a core of its own. Medians of the turns. The redirect
    # process only: the Redis its clicks are written to runs on the load core, as it would on a
    # machine of its own.
    per_request = {name: statistics.median(v) for name, v in cpu_per_request.items()}
    lines.append(
        "  redirect process CPU per answered request, median of turns (range; Redis not counted): "
        + ", ".join(f"{name} {per_request[name] * 1e6:.1f} us ({min(v) * 1e6:.0f}-{max(v) * 1e6:.0f})"
                    for name, v in cpu_per_request.items())
        + "; capacity vs floor: "
        + ", ".join(f"{name} {per_request['floor'] / per_request[name]:.2f}x" for name in urls if name != "floor")
    )
    return lines


async def _signed_tracker_paths(base: str, codes: list[str]) -> list[str]:
    """The tracker path and query (with its signed ``sid``) the short hop answers for each of
    ``codes``: the second hop of a per-message click, as a phone follows it."""
    paths: list[str] = []
    queue = list(codes)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            resp = await client.get(f"{base}/{queue.pop()}", headers={"host": SHORT_HOST})
            if resp.status_code != 302:
                raise RuntimeError(f"short hop answered {resp.status_code}")
            location = urlsplit(resp.headers["location"])
            paths.append(f"{location.path}?{location.query}")

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(20)))
    return paths


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- memory ----------------------------------------------------------------------------------


async def _publish_links(env: BenchEnv, data: dict, n: int) -> list[str]:
    """n links (short + tracker keys) in Redis; returns a sample of their short codes."""
    redis = create_redis(env.settings.redis_url)
    sample: list[str] = []
    try:
        chunk: dict[str, bytes] = {}
        for i in range(n):
            code, tracker = f"m{i:06d}", ids.tracker_id()
            chunk[edge.short_key(SHORT_HOST, code)] = edge.dumps(
                {"u": edge.tracker_url(f"http://{TRACKER_HOST}", tracker), "o": data["offer"], "m": None})
            chunk[edge.tracker_key(tracker)] = edge.dumps(
                {"h": TRACKER_HOST, "l": code, "o": data["offer"], "a": data["account"], "li": data["list"]})
            if i % (n // SAMPLE_LINKS) == 0 and len(sample) < SAMPLE_LINKS:
                sample.append(code)
            if len(chunk) >= 20_000:
                await redis.mset(chunk)
                chunk = {}
        if chunk:
            await redis.mset(chunk)
    finally:
        await redis.aclose()
    return sample


async def _click_sample(base: str, sample: list[str]) -> int:
    ok = 0
    queue = list(sample)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal ok
        while queue:
            code = queue.pop()
            try:
                short = await client.get(f"{base}/{code}?sub1=rss", headers={"host": SHORT_HOST})
                if short.status_code != 302:
                    continue
                tracker = short.headers["location"].split("/c/", 1)[1]
                resp = await client.get(f"{base}/c/{tracker}", headers={"host": TRACKER_HOST})
            except httpx.TransportError:
                # A kept-alive connection the server closed as the request went out (seen once on a
                # loaded machine): this link is not counted as clicked, the run goes on.
                continue
            ok += resp.status_code == 302

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(20)))
    return ok


def _memory_bench(env: BenchEnv, data: dict) -> list[str]:
    start = time.perf_counter()
    sample = asyncio.run(_publish_links(env, data, PUBLISHED_LINKS))
    publish_s = time.perf_counter() - start
    port = _free_port()
    with _server([sys.executable, "-m", "services.cli", "redirect"], port, _redirect_env(env, port)) as proc:
        idle = _rss_mb(proc.pid)
        clicked = asyncio.run(_click_sample(f"http://127.0.0.1:{port}", sample))
        rss = _rss_mb(proc.pid)
    return [
        f"published {PUBLISHED_LINKS:,} links in Redis ({publish_s:.0f} s); redirect RSS {idle:.0f} MB at start,"
        f" {rss:.0f} MB after clicking {clicked:,} distinct links through both hops (goal <= 150 MB)",
    ]


async def _drop_stream(env: BenchEnv) -> None:
    redis = create_redis(env.settings.redis_url)
    try:
        await redis.delete(edge.CLICK_STREAM)  # the load test's clicks are not worth draining
    finally:
        await redis.aclose()


def run(env: BenchEnv) -> Iterator[str]:
    """Each part's lines as soon as it is done (a later part that fails does not lose them)."""
    data = asyncio.run(_setup(env))
    yield from _http_bench(env, data)
    asyncio.run(_drop_stream(env))
    yield from asyncio.run(_drain_bench(env, data))
    yield from _memory_bench(env, data)
