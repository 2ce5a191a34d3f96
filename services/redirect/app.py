"""The redirect edge as a raw ASGI app: the least code between the socket and the 302.

Two hops, told apart by path (and checked against the Host header):

* ``GET /{code}`` on a list's short domain -> 302 to the link's click tracker URL, the query
  string forwarded. A per-message code carries its message id to the tracker as ``sid``.
* ``GET /c/{tracker id}`` on the tracker domain -> mint a click id, record the click (group
  commit to the Redis stream, before answering), 302 to the offer destination, macros filled.

Lookups come from the in-process cache (``cache.py``), then Redis; never PostgreSQL.
``HEAD`` answers the same ``Location`` and records nothing.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import idna
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from services.redirect import bots, sid
from services.redirect.cache import BatchedGets, EdgeCache, EdgeUnavailable
from services.redirect.client_ip import ClientIP
from services.redirect.clickwriter import ClickNotRecorded, ClickWriter
from services.redirect.geo import Geo
from services.redirect.metrics import RedirectMetrics
from services.redirect.rawredis import RawRedis
from shared import edge, macros
from shared.logs import Throttled
from shared.redis_client import warn_if_not_durable
from shared.settings import Settings

log = logging.getLogger("trackly.redirect")

Scope = dict[str, Any]

# The query parameter that carries a per-message code's message id, signed, from the short hop to
# the tracker (see sid.py).
SEND_ID_PARAM = "sid"
MAX_QUERY_PARAMS = 32
# Pairs of a query read at most (repeats and sid among them), in a query longer than _LONG_QUERY.
_QUERY_PAIRS = 4 * MAX_QUERY_PARAMS
_LONG_QUERY = 4096
MAX_VALUE_CHARS = 1000
MAX_UA_CHARS = 1000
# The most of a query a click keeps (MAX_QUERY_PARAMS names of up to 100 characters and values).
_HELD_QUERY = MAX_QUERY_PARAMS * (100 + MAX_VALUE_CHARS)
# Short-hop answers remembered (see _short_hop; links' own codes only): at most this many, for
# queries up to this long.
MAX_ANSWERS = 10_000
MAX_ANSWER_QUERY = 256

_CODE_RE = re.compile(r"[A-Za-z0-9]{6,7}")
# What may follow a short URL in a sentence and be taken into its path (not "/": two slashes are
# no link of ours).
_SENTENCE_END = ".,;:!)]}>'\"*\u2026\u201d\u2019"
_TRACKER_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SID_RE = re.compile(r"[A-Za-z0-9]{8}\.[A-Za-z0-9_-]{%d}" % sid.SIGNATURE_CHARS)

_NO_STORE = (b"cache-control", b"private, no-store")
_EMPTY = (b"content-length", b"0")
_HTML = (b"content-type", b"text/html; charset=utf-8")
_TEXT = (b"content-type", b"text/plain; charset=utf-8")
_JSON = (b"content-type", b"application/json")
_NOT_FOUND_BODY = b"<!doctype html><title>Not found</title><h1>Not found</h1>\n"
_UNAVAILABLE_BODY = b"<!doctype html><title>Unavailable</title><h1>Try again in a moment</h1>\n"
_NOT_FOUND_HEADERS = [_HTML, (b"content-length", str(len(_NOT_FOUND_BODY)).encode()), _NO_STORE]
_UNAVAILABLE_HEADERS = [
    _HTML, (b"content-length", str(len(_UNAVAILABLE_BODY)).encode()), _NO_STORE, (b"retry-after", b"1"),
]
_NOT_ALLOWED_HEADERS = [_EMPTY, (b"allow", b"GET, HEAD")]
_EMPTY_BODY = {"type": "http.response.body", "body": b""}


# The link caches hold exact tuples of str/bytes/int/None, not objects: the garbage collector stops
# tracking such tuples (exact tuples only: not NamedTuples, not dataclasses), so a full collection
# does not walk every cached link. With 200k cached links held as objects, a full collection
# stalled the event loop for well over 100 ms (see cache.py).
#
# A short link: (tracker URL, offer cache key, message id or None, tracker id, the message's creative
# as a query parameter to append, e.g. b"creative=cr1", or b""). A per-message code (edge.MessageCodeEntry)
# is a 3-tuple instead: (its link's code on the same host, message id, creative parameter); the rest
# comes from the link's own entry. Per-message codes of the earlier format are full 5-tuples.
ShortLink = tuple[bytes, str, "bytes | None", str, bytes]  # unpacked where used
MessageCode = tuple[str, bytes, bytes]
# A tracker link: (host, link id, offer id, account id, list id, offer cache key, account id as text).
TrackerLink = tuple[str, str, str, int, int, str, str]


@dataclass(frozen=True, slots=True)
class Offer:
    active: bool
    template: macros.Template
    affiliate_id: str | None


def _decode_short(raw: bytes) -> ShortLink | MessageCode:
    entry: edge.ShortEntry | edge.MessageCodeEntry = orjson.loads(raw)
    creative = entry.get("c")
    creative_param = b"creative=" + quote(creative, safe="").encode() if creative else b""
    if "k" in entry:
        return entry["k"], entry["m"].encode(), creative_param
    message = entry.get("m")
    url = entry["u"]
    return (
        url.encode(), edge.offer_key(entry["o"]), message.encode() if message else None, url.rpartition("/")[2],
        creative_param,
    )


def _decode_tracker(raw: bytes) -> TrackerLink:
    entry: edge.TrackerEntry = orjson.loads(raw)
    account = int(entry["a"])
    return (
        entry["h"].lower(), entry["l"], entry["o"], account, int(entry["li"]), edge.offer_key(entry["o"]), str(account)
    )


# Characters a Location header cannot hold (control characters), and those it should not (spaces,
# tabs, anything not ASCII): percent-encoded as UTF-8, as a browser would, once per offer load;
# the macros are left whole for macros.parse (a space inside {{ sendId }} is allowed there). The
# gateway refuses control characters in a destination URL; one in Redis anyway (an offer from
# before that check) must not fail every click with a broken response.
_MACRO_OR_UNSAFE = re.compile(f"({macros.MACRO_RE.pattern})|[\x00-\x20\x7f-\U0010ffff]")


def _ascii_host(url: str) -> str:
    """The URL with a host in another script in the form a browser sends (IDNA, UTS #46
    non-transitional, as the WHATWG URL standard has it): percent-encoding is for paths and
    queries, not host names. Anything it cannot convert is left as it is (then percent-encoded with
    the rest): an offer already in Redis must never fail its clicks."""
    try:
        split = urlsplit(url)
        host = split.hostname
        if split.netloc.isascii() or not host or "{" in host or ":" in host:  # a macro in the host; IPv6
            return url
        ascii_host = idna.encode(host, uts46=True, transitional=False).decode("ascii")
        port = f":{split.port}" if split.port is not None else ""
    except (ValueError, idna.IDNAError):  # IDNAError is a UnicodeError; urlsplit and port raise ValueError
        return url
    userinfo = split.netloc.rpartition("@")[0]
    return urlunsplit(split._replace(netloc=f"{userinfo}@{ascii_host}{port}" if userinfo else f"{ascii_host}{port}"))


def location_template(url: str) -> str:
    return _MACRO_OR_UNSAFE.sub(lambda m: m.group(1) or quote(m.group(), safe=""), _ascii_host(url))


_macro_in_host = Throttled(
    log, logging.WARNING,
    "an offer's destination puts a macro in its host (published before the gateway refused that):"
    " its links answer 404 until its destination_url is fixed: %.200s",
)


def _host_takes_a_macro(url: str) -> bool:
    """Whether a visitor's value could end up in the URL's host (``https://shop{sub1}/``, or a
    macro before the host): such a destination would send anyone anywhere from our domain."""
    scheme, sep, rest = url.partition("://")
    if not sep or "{" in scheme:
        return True
    # Browsers skip any further "/" and "\\" before the host ("https:///x/" is https://x/).
    rest = rest.lstrip("/\\")
    end = min((i for i in (rest.find(c) for c in "/?#\\") if i >= 0), default=len(rest))
    return "{" in rest[:end] or "}" in rest[:end]


def _decode_offer(raw: bytes) -> Offer:
    entry: edge.OfferEntry = orjson.loads(raw)
    url = entry["d"]
    active = entry["s"] == "active"
    if active and _host_takes_a_macro(url):
        _macro_in_host(url)
        active = False
    return Offer(active, macros.parse(location_template(url)), entry.get("af"))


_hostnames: dict[bytes, str] = {}


# A Host header longer than any host name (253 characters) and a port: the edge answers 404 and
# remembers nothing of it (uvicorn with httptools bounds no header: a 5 MB Host header, kept as a
# key here and in the short-hop answers, cost 5 MB each).
MAX_HOST_HEADER = 270


def hostname(raw: bytes) -> str:
    """Host header -> lower-case hostname without port (as ``shared.edge.host_of``, but cheaper);
    "" (no link's) for one too long or with a port that is not a number."""
    known = _hostnames.get(raw)
    if known is not None:
        return known
    if len(raw) > MAX_HOST_HEADER:
        return ""
    # Blanks after the value are not part of it (RFC 9112 §5), but httptools leaves them there.
    host = raw.decode("latin-1").strip(" \t").lower()
    if host.startswith("["):
        end = host.find("]")
        host, port = edge.ipv6_host(host[1:end]), host[end + 1 :]
        port = port[1:] if port.startswith(":") else ("" if not port else "x")
    else:
        host, _, port = host.partition(":")
        host = host.rstrip(".")
    if port and not port.isdigit():  # ("sms.example.com:<junk>" is not sms.example.com)
        host = ""
    if len(_hostnames) >= 1000:
        _hostnames.clear()
    _hostnames[raw] = host
    return host


_user_agents: dict[bytes, tuple[str, bool]] = {}


def _user_agent(raw: bytes) -> tuple[str, bool]:
    """User-Agent header -> (text as stored, whether it is a bot); remembered per raw header."""
    text = raw.decode("utf-8", "replace")[:MAX_UA_CHARS]
    known = (text, bots.is_bot(text))
    if len(raw) <= MAX_UA_CHARS:  # bounded: at most ~5k entries of at most ~2 KB each
        if len(_user_agents) >= 5_000:
            _user_agents.clear()
        _user_agents[raw] = known
    return known


def _safe_query(query: bytes) -> bytes:
    """The raw query string, fit for a Location header (the client may send non-ASCII bytes)."""
    if query.isascii():
        return query
    return quote(query, safe="!#$%&'()*+,/:;=?@[]~").encode()


def _query_values(query: bytes) -> tuple[dict[str, str], str | None]:
    """First value of each parameter (bounded), and the well-formed ``sid`` (not yet verified)."""
    values: dict[str, str] = {}
    send_id = None
    if not query:
        return values, None
    text = query.decode("utf-8", "replace")
    if len(text) > _LONG_QUERY and text.count("&") >= _QUERY_PAIRS:
        # Only the first pairs are read (a query of a million pairs must not become a list of
        # them all: uvicorn bounds no request line); the short hop puts sid first.
        text = "&".join(text.split("&", _QUERY_PAIRS)[:_QUERY_PAIRS])
    if "%" in text or "+" in text or ";" in text:
        pairs = parse_qsl(text, keep_blank_values=True)
    else:  # nothing to decode: a plain split is a few times faster
        if "&" not in text:  # one parameter (a short link's forwarded sub1=...): the common case
            name, _, value = text.partition("=")
            if name == SEND_ID_PARAM:
                return values, value if _SID_RE.fullmatch(value) else None
            values[name[:100]] = value[:MAX_VALUE_CHARS]
            return values, None
        pairs = [part.partition("=")[::2] for part in text.split("&") if part]
    for name, value in pairs:
        if name == SEND_ID_PARAM:
            if send_id is None:
                send_id = value
            continue
        if name not in values and len(values) < MAX_QUERY_PARAMS:
            values[name[:100]] = value[:MAX_VALUE_CHARS]
    if send_id is not None and not _SID_RE.fullmatch(send_id):
        send_id = None
    return values, send_id


# Queries seen at the tracker hop -> what _query_values made of them: a link's clicks mostly repeat
# a few queries (its sub ids), and a repeat costs a dict lookup instead of the parsing. Queries up
# to MAX_ANSWER_QUERY long, at most MAX_QUERIES of them (one of 256 bytes and 22 parameters holds
# ~3.5 KB: ~7 MB at most); a query with a sid (one per message) is not remembered. The values are
# shared by every click of that query: nothing changes them.
MAX_QUERIES = 2_000
_queries: dict[bytes, tuple[dict[str, str], str | None]] = {}


def _query_of(query: bytes) -> tuple[dict[str, str], str | None]:
    """``_query_values``, remembered per raw query."""
    known = _query_values(query)
    if known[1] is None and len(query) <= MAX_ANSWER_QUERY:
        if len(_queries) >= MAX_QUERIES:
            _queries.clear()
        _queries[query] = known
    return known


def _click_id_stream() -> Iterator[str]:
    """Click ids as ``ids.click_id`` mints them (128 bits from ``os.urandom``, 32 hex digits), read
    from the OS 256 ids at a time: one system call and one ``hex`` per 256 clicks, a slice per click."""
    while True:
        block = os.urandom(16 * 256).hex()
        for start in range(0, len(block), 32):
            yield block[start : start + 32]


# ``next_click_id()`` -> a fresh click id. A forked child must not hand out its parent's buffered ids.
next_click_id = _click_id_stream().__next__


def _reset_click_ids() -> None:
    global next_click_id
    next_click_id = _click_id_stream().__next__


os.register_at_fork(after_in_child=_reset_click_ids)


class _Clock:
    """Now, as microseconds since the epoch (the click's time) and as ISO 8601 UTC to the second
    (``{datetime}``), which is formatted once per second."""

    __slots__ = ("_second", "_zulu")

    def __init__(self) -> None:
        self._second = -1
        self._zulu = ""

    def now(self) -> tuple[int, str]:
        us = time.time_ns() // 1000
        second = us // 1_000_000
        if second != self._second:
            self._zulu = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._second = second
        return us, self._zulu


class RedirectApp:
    """ASGI app; ``startup``/``shutdown`` are run by the lifespan protocol (or by tests)."""

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise ValueError("the redirect needs a resolved redis URL")
        self.settings = settings
        self.metrics = RedirectMetrics()
        self.client_ip = ClientIP(settings.trusted_proxies)
        self.clock = _Clock()
        self.redis: aioredis.Redis | None = None
        self.redis_persistence_problem: str | None = None
        self.started = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        s = self.settings
        self.redis = aioredis.Redis.from_url(
            s.redis_url, max_connections=64, socket_timeout=5.0, socket_connect_timeout=2.0
        )
        size = max(1, s.link_cache_size)
        self.sid = sid.SidSigner(self.redis)
        try:
            await self.sid.refresh()
        except sid.KeyUnavailable as exc:  # asked again when a message's click needs it
            log.warning("redis unavailable at start (%s); the sid key will be read when needed", exc)
        else:
            # A 302 means the click is stored: only as true as Redis keeps what it acknowledges.
            self.redis_persistence_problem = await warn_if_not_durable(self.redis)
        # Cache misses are read in batches on a connection of their own (not behind click writes).
        self.lookup_conn = RawRedis(s.redis_url, timeout=5.0)
        self.lookups = BatchedGets(self.lookup_conn)
        get = self.lookups.get
        self.shorts: EdgeCache[ShortLink | MessageCode] = EdgeCache(get, _decode_short, ttl=s.link_cache_ttl, size=size)
        self.trackers: EdgeCache[TrackerLink] = EdgeCache(get, _decode_tracker, ttl=s.link_cache_ttl, size=size)
        self.offers: EdgeCache[Offer] = EdgeCache(get, _decode_offer, ttl=s.link_cache_ttl, size=max(1, size // 4))
        # (Host header, path, query) -> (monotonic expiry, response headers): never outlives the
        # link and offer entries it was built from.
        self._short_answers: dict[tuple[bytes, str, bytes], tuple[float, list[tuple[bytes, bytes]]]] = {}
        self.stream_conn = RawRedis(s.redis_url, timeout=5.0)
        self.writer = ClickWriter(self.stream_conn)
        self.geo = Geo(s.geoip_db)
        m = self.metrics
        m.counter("trackly_redirect_clicks_recorded", "Clicks durably written to the stream", lambda: self.writer.recorded)
        m.counter("trackly_redirect_click_batches", "Group-commit batches written", lambda: self.writer.batches)
        m.counter("trackly_redirect_clicks_failed", "Clicks refused (503) because Redis failed", lambda: self.writer.failed)
        m.counter(
            "trackly_redirect_cache_misses", "Link lookups that went to Redis",
            lambda: self.shorts.misses + self.trackers.misses + self.offers.misses,
        )
        m.counter("trackly_redirect_lookup_batches", "MGETs that read those lookups", lambda: self.lookups.batches)
        m.counter(
            "trackly_redirect_stale_served", "Lookups answered from an expired entry while Redis failed",
            lambda: self.shorts.stale_served + self.trackers.stale_served + self.offers.stale_served,
        )
        # What exists now lives as long as the process: keep it out of the collector's sight.
        gc.freeze()
        self.started = True

    async def shutdown(self) -> None:
        if not self.started:
            return
        self.started = False
        await self.writer.close()
        await self.stream_conn.close()
        await self.lookup_conn.close()
        self.geo.close()
        if self.redis is not None:
            await self.redis.aclose()

    # -- ASGI --------------------------------------------------------------------------------

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        # HTTP handled right here rather than in a nested coroutine: every await level costs on the hot path.
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        if path.endswith("/") and len(path) > 1:  # SMS copy often ends a URL with "/": /Ab3kX9/ is /Ab3kX9
            path = path[:-1]
        method: str = scope["method"]
        hop = "tracker" if path.startswith("/c/") else "short"
        try:
            if method != "GET" and method != "HEAD":
                status = 405
                await send({"type": "http.response.start", "status": 405, "headers": _NOT_ALLOWED_HEADERS})
                await send(_EMPTY_BODY)
            elif hop == "tracker":
                status = await self._tracker_hop(scope, method, path, send)
            elif path in ("/healthz", "/readyz", "/metrics"):
                hop = "ops"
                status = await self._ops(path, send)
            else:
                host = None
                for name, value in scope["headers"]:
                    if name == b"host":
                        host = value
                        break
                # A remembered answer (see _short_hop) is sent from here: no coroutine of its own.
                answer = self._short_answers.get((host, path, scope["query_string"]))
                if answer is not None and answer[0] > time.monotonic():
                    status = 302
                    await send({"type": "http.response.start", "status": 302, "headers": answer[1]})
                    await send(_EMPTY_BODY)
                else:
                    status = await self._short_hop(scope, path, host, send)
        except (EdgeUnavailable, ClickNotRecorded, sid.KeyUnavailable):
            status = 503
            await send({"type": "http.response.start", "status": 503, "headers": _UNAVAILABLE_HEADERS})
            await send({"type": "http.response.body", "body": _UNAVAILABLE_BODY})
        except Exception:
            log.exception("redirect failed for %s", path)
            status = 500
            await send({"type": "http.response.start", "status": 500, "headers": [_TEXT, _NO_STORE]})
            await send({"type": "http.response.body", "body": b"internal error\n"})
        self.metrics.observe(hop, status, time.perf_counter() - started)

    # -- the two hops ------------------------------------------------------------------------

    async def _short_hop(self, scope: Scope, path: str, host: bytes | None, send: Any) -> int:
        """``host``: the Host header's value. A fresh remembered answer was sent by ``__call__``."""
        code = path[1:]
        if host is None or len(host) > MAX_HOST_HEADER:
            return await _not_found(send)
        query: bytes = scope["query_string"]
        # The answer itself, while the link and offer it was built from are fresh: a repeat of a
        # request costs a dict lookup instead of two cache lookups and the Location assembly.
        answer_key = (host, path, query)
        host_name = hostname(host)
        key = f"trk:s:{host_name}:{code}"
        # Only a well-formed code is ever loaded into the cache: the pattern is checked on a miss.
        entry = self.shorts.fresh(key)
        if entry is None:
            if not _CODE_RE.fullmatch(code):
                # The punctuation that ends the sentence around a URL in an SMS ("...at
                # sms.example.com/Ab3kX9." or "(sms.example.com/Ab3kX9)"), taken into the link by
                # a phone's linkifier or a user's copy: no code holds any of it.
                code = code.rstrip(_SENTENCE_END)
                if not _CODE_RE.fullmatch(code):
                    return await _not_found(send)
                key = f"trk:s:{host_name}:{code}"
                entry = self.shorts.fresh(key)
            if entry is None:
                entry = await self.shorts.load(key)
        if entry is None:
            return await _not_found(send)
        expires = self.shorts.expires(key)
        if len(entry) == 3:  # a per-message code: the tracker and offer are its link's
            link_code, message_id, creative = entry  # type: ignore[misc]
            key = f"trk:s:{host_name}:{link_code}"
            link = self.shorts.fresh(key) or await self.shorts.load(key)
            if link is None or len(link) == 3:
                return await _not_found(send)
            tracker_url, offer_key, _, tracker_id, _ = link  # type: ignore[misc]
            expires = min(expires, self.shorts.expires(key))
        else:
            tracker_url, offer_key, message_id, tracker_id, creative = entry  # type: ignore[misc]
        offer = self.offers.fresh(offer_key) or await self.offers.load(offer_key)
        if offer is None or not offer.active:
            return await _not_found(send)
        location = tracker_url
        if message_id is not None:
            location += b"?sid=" + message_id + b"." + await self.sid.sign(message_id, tracker_id)
            if query:
                location += b"&" + _safe_query(query)
            if creative:  # after the query: a creative given on the link itself wins (first value)
                location += b"&" + creative
        elif query:
            location += b"?" + _safe_query(query)
        headers = [(b"location", location), _NO_STORE, _EMPTY]
        # Remembered for a link's own code, not a message's: a per-message URL is mostly tapped
        # once, and its answers would only fill the table (and clear the links' out of it).
        if message_id is None and len(query) <= MAX_ANSWER_QUERY:
            if len(self._short_answers) >= MAX_ANSWERS:
                self._short_answers.clear()
            self._short_answers[answer_key] = (min(expires, self.offers.expires(offer_key)), headers)
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send(_EMPTY_BODY)
        return 302

    async def _tracker_hop(self, scope: Scope, method: str, path: str, send: Any) -> int:
        tracker_id = path[3:]
        host = user_agent = None
        forwarded: list[bytes] | None = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"user-agent":
                user_agent = value
            elif name == b"x-forwarded-for":  # every one of them, joined only if a proxy is trusted
                if forwarded is None:
                    forwarded = [value]
                else:  # (a list: joining as they come took time quadratic in their number)
                    forwarded.append(value)
        if host is None:
            return await _not_found(send)
        key = f"trk:t:{tracker_id}"
        # Only a well-formed id is ever loaded into the cache: the pattern is checked on a miss.
        tracker = self.trackers.fresh(key)
        if tracker is None:
            if not _TRACKER_RE.fullmatch(tracker_id):
                return await _not_found(send)
            tracker = await self.trackers.load(key)
        if tracker is None:
            return await _not_found(send)
        tracker_host, link_id, offer_id, account_id, list_id, offer_key, account_str = tracker
        if tracker_host != (_hostnames.get(host) or hostname(host)):  # the memo first: no call
            return await _not_found(send)
        offer = self.offers.fresh(offer_key) or await self.offers.load(offer_key)
        if offer is None or not offer.active:
            return await _not_found(send)

        raw_query: bytes = scope["query_string"]
        query, send_id = _queries.get(raw_query) or _query_of(raw_query)
        if send_id is not None:
            send_id = await self.sid.message_of(send_id, tracker_id)
        click_id = next_click_id()
        us, at_second = self.clock.now()
        client = scope.get("client")
        ip = client[0] if client else None
        if forwarded is not None and self.client_ip.trusts_any:
            ip = self.client_ip(ip, b",".join(forwarded))
        if user_agent is None:
            ua, bot = None, False
        else:
            ua, bot = _user_agents.get(user_agent) or _user_agent(user_agent)
        country = self.geo.country(ip) if self.geo.enabled else None
        # The fields of macros.ClickFacts, as a plain tuple (a NamedTuple's constructor costs more).
        facts = (click_id, offer.affiliate_id, offer_id, account_str, ip, ua, at_second, country, send_id)
        location = macros.fill_facts(offer.template, facts, query)  # type: ignore[arg-type]
        if method == "GET":
            # edge.CLICK_FIELDS, in order.
            click: edge.Click = (
                click_id, link_id, offer_id, account_id, list_id, send_id, us, ip, ua, country, bot, query
            )
            # About what the click holds beyond a bare one (its query as kept, its user agent): the
            # writer bounds what waits in memory while Redis hangs by it.
            held = min(len(raw_query), _HELD_QUERY) + (len(ua) if ua else 0)
            await self.writer.submit(click, held)
        await send(
            {
                "type": "http.response.start",
                "status": 302,
                "headers": [(b"location", location.encode("utf-8")), _NO_STORE, _EMPTY],
            }
        )
        await send(_EMPTY_BODY)
        return 302

    # -- operations --------------------------------------------------------------------------

    async def _ops(self, path: str, send: Any) -> int:
        if path == "/healthz":
            return await _respond(send, 200, b'{"status":"ok"}', _JSON)
        if path == "/readyz":
            try:
                assert self.redis is not None
                await asyncio.wait_for(self.redis.execute_command("PING"), 2)
            except (RedisError, OSError, asyncio.TimeoutError, AssertionError) as exc:
                body = orjson.dumps({"status": "unavailable", "redis": f"error: {type(exc).__name__}"})
                return await _respond(send, 503, body, _JSON)
            return await _respond(send, 200, b'{"status":"ready","redis":"ok"}', _JSON)
        await self._refresh_stream_gauges()
        return await _respond(send, 200, self.metrics.render(), (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"))

    async def _refresh_stream_gauges(self) -> None:
        gauges = self.metrics.gauges
        gauges["trackly_redirect_cached_links"] = ("Links and offers held in the in-process cache", float(
            len(self.shorts) + len(self.trackers) + len(self.offers)))
        try:
            assert self.redis is not None
            length = await asyncio.wait_for(self.redis.execute_command("XLEN", edge.CLICK_STREAM), 2)
            gauges["trackly_click_stream_length"] = ("Click batches in the stream not yet drained and deleted", float(length))
            try:
                pending = (await asyncio.wait_for(self.redis.xpending(edge.CLICK_STREAM, edge.CLICK_GROUP), 2))["pending"]
            except ResponseError as exc:
                # No group (yet): no worker has drained this Redis since it came back empty, or
                # ever. Nobody holds a batch, and the stream's length and age still say what waits.
                if not str(exc).startswith("NOGROUP"):
                    raise
                pending = 0
            gauges["trackly_click_stream_pending"] = (
                "Click batches delivered to a drainer, not yet acknowledged", float(pending)
            )
            # A drained batch is deleted: the first entry is the oldest not yet stored in
            # PostgreSQL, and its id is the millisecond Redis took it. The drain's lag, which
            # CONTRACT.md's "a click shows in reports within 5 s" depends on.
            first = await asyncio.wait_for(self.redis.xrange(edge.CLICK_STREAM, count=1), 2)
            oldest = 0.0
            if first:
                oldest = max(0.0, time.time() - int(first[0][0].split(b"-")[0]) / 1000)
            gauges["trackly_click_stream_oldest_seconds"] = (
                "Age of the oldest click batch not yet drained into PostgreSQL (0 when none waits)", oldest
            )
        except Exception as exc:  # noqa: BLE001 - the group may not exist yet; Redis may be down
            log.debug("stream gauges unavailable: %s", exc)
            # Not the last values read, which would say all is well: no value (a scrape sees them go).
            for name in ("trackly_click_stream_length", "trackly_click_stream_pending", "trackly_click_stream_oldest_seconds"):
                gauges.pop(name, None)


async def _respond(send: Any, status: int, body: bytes, content_type: tuple[bytes, bytes]) -> int:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [content_type, (b"content-length", str(len(body)).encode()), _NO_STORE],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return status


async def _not_found(send: Any) -> int:
    await send({"type": "http.response.start", "status": 404, "headers": _NOT_FOUND_HEADERS})
    await send({"type": "http.response.body", "body": _NOT_FOUND_BODY})
    return 404


def create_app(settings: Settings) -> RedirectApp:
    return RedirectApp(settings)
