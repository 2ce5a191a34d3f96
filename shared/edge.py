"""The Redis contract between the gateway (publisher), the redirect (reader) and the worker.

Published link data — written by the gateway *before* its PostgreSQL transaction commits, so a
link answers at the edge as soon as its API call returns:

  ``trk:s:{host}:{code}``   short code on a short domain (orjson): a 6-char link id ->
                            ShortEntry; a 7-char per-message code -> MessageCodeEntry, which
                            names its link's code on the same host for the tracker and offer
                            (about 130 bytes of Redis memory per message, where a whole
                            ShortEntry took 220: one is written for every message sent).
                            Per-message codes written before this format hold a ShortEntry
                            with ``m`` set; the redirect still reads them.
  ``trk:t:{tracker_id}``    click tracker id -> TrackerEntry (orjson)
  ``trk:o:{offer_id}``      offer as the edge needs it -> OfferEntry (orjson); deleted offers
                            are written with status ``deleted`` rather than removed so that a
                            stale cache is replaced, not left to expire.

Clicks — appended by the redirect, drained by the worker:

  ``trk:clicks``            stream; each entry has one field ``c``: a JSON array of clicks (a
                            group-committed batch), each click a JSON array in the order of
                            ``CLICK_FIELDS`` (see ``Click``). Consumer group ``drain``.
                            Entries written before this format have a field ``b`` instead: a
                            JSON array of click objects (``LegacyClick``); the worker still
                            drains them.

The redirect's own key (created by the first replica that needs it, shared by all):

  ``trk:edge:sid-key``      32 random bytes: signs the ``sid`` a per-message code hands to the
                            tracker hop, so only a message's own short URL can claim the message.

Hosts are stored lower-case without a port (CONTRACT.md §4).
"""
from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict
from urllib.parse import urlsplit

import orjson

CLICK_STREAM = "trk:clicks"
CLICK_GROUP = "drain"
SID_KEY = "trk:edge:sid-key"
# Set by the worker once it has written every edge key from PostgreSQL into this Redis process
# (``done:<run_id>``, see services/worker/edge_offers.py): a Redis without it, or with another
# process's run id (restarted: empty, or from a snapshot older than the latest publishes; or
# replaced), is filled again, without an operator.
EDGE_MARK = "trk:edge:complete"


def short_key(host: str, code: str) -> str:
    return f"trk:s:{host}:{code}"


def tracker_key(tracker_id: str) -> str:
    return f"trk:t:{tracker_id}"


def offer_key(offer_id: str) -> str:
    return f"trk:o:{offer_id}"


@functools.lru_cache(maxsize=1024)  # a bulk send asks about the same few domains a thousand times
def host_of(url_or_host: str) -> str:
    """Hostname, lower-case, no port: ``https://SMS.Example.com:443/x`` -> ``sms.example.com``."""
    text = url_or_host.strip()
    if "//" not in text:
        text = "//" + text
    host = urlsplit(text).hostname or ""
    return ipv6_host(host) if ":" in host else host.lower().rstrip(".")


def ipv6_host(host: str) -> str:
    """An IPv6 literal (without brackets) in its one compressed, lower-case form, the form browsers
    send (``0:0::1`` and ``0000::0001`` are ``::1``); anything else lower-cased."""
    try:
        return ipaddress.IPv6Address(host).compressed
    except ValueError:
        return host.lower()


class _ShortEntryOptional(TypedDict, total=False):
    c: str            # the message's creative id (per-message codes of the earlier format)


class ShortEntry(_ShortEntryOptional):
    u: str            # click tracker URL, e.g. https://ct.example.com/c/<uuid>
    o: str            # offer id (its status is checked at the edge)
    m: str | None     # None (a message id in per-message codes of the earlier format)


class _MessageCodeEntryOptional(TypedDict, total=False):
    c: str            # the message's creative id, for {creative} (when it has one)


class MessageCodeEntry(_MessageCodeEntryOptional):
    k: str            # the link's code: its ShortEntry on the same host has the tracker and offer
    m: str            # message id


class TrackerEntry(TypedDict):
    h: str            # tracker host the id is valid on
    l: str            # link id
    o: str            # offer id
    a: int            # account id
    li: int           # list id


class OfferEntry(TypedDict):
    s: str            # active | paused | deleted
    d: str            # destination URL template
    af: str | None    # affiliate id
    a: int            # account id


# A click on the wire: positional, not an object. Half the bytes of an object with its keys in
# every click, cheaper to build at the edge (a list, no dict) and about a third cheaper for
# PostgreSQL to read (jsonb array elements by position, not a record per object).
CLICK_FIELDS = ("id", "l", "o", "a", "li", "m", "us", "ip", "ua", "cc", "bot", "q")
# id   click id, 128 bits hex, minted at the edge        ip   client IP or null
# l    link id                                           ua   User-Agent or null
# o    offer id                                          cc   country code or null
# a    account id (int)                                  bot  true for previews and crawlers
# li   list id (int)                                     q    {name: value} of the query
# m    message id claimed by the URL or null (checked by the worker)
# us   when, in microseconds since the Unix epoch, UTC (int)
Click = tuple[str, str, str, int, int, "str | None", int, "str | None", "str | None", "str | None", bool, dict[str, str]]
CLICK_BATCH_FIELD = "c"
LEGACY_BATCH_FIELD = "b"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# The times a click can have: years 1 to 9999, UTC (Python's datetime; PostgreSQL holds more).
MIN_MICROS = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // _MICROSECOND
MAX_MICROS = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - _EPOCH) // _MICROSECOND


def micros(at: datetime) -> int:
    """An aware datetime -> microseconds since the epoch, exactly (no float on the way)."""
    return (at - _EPOCH) // _MICROSECOND


def from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def click_from(fields: Mapping[str, object]) -> Click:
    """A click given by name (``id``, ``l``... ``at`` as an aware datetime instead of ``us``) in
    its wire form. For tests and tools; the redirect builds the tuple itself."""
    at = fields["at"]
    assert isinstance(at, datetime)
    return tuple(micros(at) if name == "us" else fields.get(name) for name in CLICK_FIELDS)  # type: ignore[return-value]


class LegacyClick(TypedDict):
    """A click as the stream held it before ``CLICK_FIELDS`` (field ``b``)."""

    id: str
    t: str            # tracker id (never stored)
    l: str
    o: str
    a: int
    li: int
    m: str | None
    at: str           # ISO 8601 UTC
    ip: str | None
    ua: str | None
    cc: str | None
    bot: bool
    q: dict[str, str]


def dumps(value: object) -> bytes:
    return orjson.dumps(value)


def loads(raw: bytes | str) -> object:
    return orjson.loads(raw)


# The columns of an offers row that offer_entry reads.
OFFER_ENTRY_COLUMNS = "id, account_id, status, destination_url, affiliate_id"


def offer_entry(row: Mapping[str, object]) -> OfferEntry:
    return {
        "s": str(row["status"]),
        "d": str(row["destination_url"]),
        "af": row["affiliate_id"],  # type: ignore[typeddict-item]
        "a": int(row["account_id"]),  # type: ignore[arg-type]
    }


def link_entries(link: Mapping[str, object]) -> list[tuple[str, bytes]]:
    """(key, value) of a link's short code and its click tracker; ``link`` is a ``links`` row."""
    short: ShortEntry = {"u": str(link["tracker_url"]), "o": str(link["offer_id"]), "m": None}
    tracker: TrackerEntry = {
        "h": host_of(str(link["tracker_url"])),
        "l": str(link["id"]),
        "o": str(link["offer_id"]),
        "a": int(link["account_id"]),  # type: ignore[call-overload]
        "li": int(link["list_id"]),  # type: ignore[call-overload]
    }
    return [
        (short_key(str(link["domain_host"]), str(link["id"])), dumps(short)),
        (tracker_key(str(link["tracker_id"])), dumps(tracker)),
    ]


def message_code_entry(link_id: str, message_id: str, creative_id: str | None) -> MessageCodeEntry:
    """A per-message short code: its link (by code), the message (and its creative)."""
    entry = MessageCodeEntry(k=link_id, m=message_id)
    if creative_id:
        entry["c"] = creative_id
    return entry


# SET each key with what is left of its lifetime (PX, milliseconds), or delete it when nothing is
# left, a whole chunk in one command: MSET cannot give keys an expiry.
_SET_EACH_PX = """
for i, key in ipairs(KEYS) do
  local left = tonumber(ARGV[2 * i])
  if left > 0 then
    redis.call('SET', key, ARGV[2 * i - 1], 'PX', left)
  else
    redis.call('DEL', key)
  end
end
"""
CODES_PER_COMMAND = 1000


async def write_message_codes(redis: Any, codes: Iterable[tuple[str, bytes, datetime]], *, days: int = 0) -> int:
    """Write per-message short codes, given as (key, value, the message's send time), a thousand
    per command. With ``days`` (settings.message_code_days) each expires that many days after its
    message's send (a send dated in the future counts from now), and one already past that is
    deleted instead: so a republish applies a new setting to the codes already in Redis. Without,
    each is kept for good (an expiry it had is removed). Returns how many were written."""
    if not days:
        written = 0
        chunk: dict[str, bytes] = {}
        for key, value, _ in codes:
            chunk[key] = value
            written += 1
            if len(chunk) == CODES_PER_COMMAND:
                await redis.mset(chunk)
                chunk = {}
        if chunk:
            await redis.mset(chunk)
        return written
    set_each = redis.register_script(_SET_EACH_PX)
    lifetime, now = timedelta(days=days), datetime.now(UTC)
    keys: list[str] = []
    args: list[bytes | int] = []
    live = 0
    for key, value, sent_at in codes:
        left = (min(sent_at, now) + lifetime - now) // timedelta(milliseconds=1)
        live += left > 0
        keys.append(key)
        args += (value, max(left, 0))
        if len(keys) == CODES_PER_COMMAND:
            await set_each(keys=keys, args=args)
            keys, args = [], []
    if keys:
        await set_each(keys=keys, args=args)
    return live


def tracker_url(tracker_domain: str, tracker: str) -> str:
    return f"{tracker_domain.rstrip('/')}/c/{tracker}"
