"""The tracker hop's per-click helpers agree with the plain forms they stand in for."""
from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from typing import Any

from services.redirect import app
from shared import edge, ids


def test_click_ids_are_32_hex_digits_and_distinct_across_buffer_refills() -> None:
    minted = [app.next_click_id() for _ in range(2000)]  # several 256-id blocks
    assert all(re.fullmatch(r"[0-9a-f]{32}", c) for c in minted)
    assert len(set(minted)) == len(minted)


def test_a_forked_child_does_not_reuse_the_parents_buffered_ids() -> None:
    app.next_click_id()  # a block is buffered in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        os.write(write, "".join(app.next_click_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = "".join(app.next_click_id() for _ in range(4))
    assert len(child) == 128 and child != parent


def test_clock_gives_microseconds_since_the_epoch_and_the_second_in_iso_8601_utc() -> None:
    before = datetime.now(UTC)
    us, at_second = app._Clock().now()
    after = datetime.now(UTC)
    assert before <= edge.from_micros(us) <= after
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", at_second)
    assert at_second == edge.from_micros(us).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_query_values_single_parameter_fast_path_matches_the_general_path() -> None:
    sid = ids.message_id().encode() + b"." + b"A-_b" * 4
    assert app._query_values(b"sid=" + sid) == ({}, sid.decode())
    for query in (b"sub1=x", b"sub1", b"sub1=", b"=x", b"sid=bad", b"sid=" + ids.message_id().encode(), b"x=" + b"v" * 2000, b"n" * 300 + b"=1"):
        single = app._query_values(query)
        general = app._query_values(query + b"&zz=1")
        general[0].pop("zz", None)
        assert single == general, query


async def test_cached_links_are_not_tracked_by_the_garbage_collector(redis: Any) -> None:
    """A full collection walks every tracked object: cached links (up to link_cache_size of each
    kind) must be plain tuples the collector untracks, or every full collection stalls the loop."""
    import gc
    import secrets

    import orjson

    from services.redirect.cache import EdgeCache

    prefix = f"test:gc:{secrets.token_hex(4)}"
    await redis.set(f"{prefix}:s", orjson.dumps({"u": "http://ct.x/c/t", "o": "o" * 24, "m": "m1"}))
    await redis.set(f"{prefix}:t", orjson.dumps({"h": "CT.x", "l": "Ab3kX9", "o": "o" * 24, "a": 3, "li": 4}))
    shorts = EdgeCache(redis.get, app._decode_short, ttl=5, size=10)
    trackers = EdgeCache(redis.get, app._decode_tracker, ttl=5, size=10)
    short = await shorts.load(f"{prefix}:s")
    tracker = await trackers.load(f"{prefix}:t")
    await redis.delete(f"{prefix}:s", f"{prefix}:t")
    assert short == (b"http://ct.x/c/t", "trk:o:" + "o" * 24, b"m1", "t", b"")
    assert tracker is not None and tracker[0] == "ct.x" and tracker[3:5] == (3, 4) and tracker[6] == "3"
    gc.collect()
    for cache, key in ((shorts, f"{prefix}:s"), (trackers, f"{prefix}:t")):
        entry = cache._entries[key]
        assert type(entry) is tuple and type(entry[1]) is tuple
        assert not gc.is_tracked(entry[1]) and not gc.is_tracked(entry)


def test_user_agent_memo_matches_decoding_and_bot_detection() -> None:
    from services.redirect import bots

    for raw in (b"facebookexternalhit/1.1", b"Mozilla/5.0 (iPhone)", b"\xff\xfebad", b"x" * 3000, b"Cubot X30 bot"):
        text = raw.decode("utf-8", "replace")[: app.MAX_UA_CHARS]
        assert app._user_agent(raw) == (text, bots.is_bot(text))
        assert (app._user_agents.get(raw) or app._user_agent(raw)) == (text, bots.is_bot(text))
    assert b"x" * 3000 not in app._user_agents  # oversized headers are not remembered


def test_query_memo_matches_parsing_and_is_bounded() -> None:
    """The tracker hop's parsed queries, remembered per raw query: the same as parsing, never a
    query with a sid (one per message) or a long one, and at most MAX_QUERIES of them."""
    app._queries.clear()
    sid = b"sid=Ab3kX9Zz." + b"A" * app.sid.SIGNATURE_CHARS
    for raw in (b"", b"sub1=x", b"sub1=a&sub2=b%20c&sub1=z", sid + b"&sub1=x", b"sub1=" + b"y" * 300):
        assert app._query_of(raw) == app._query_values(raw)
        assert (app._queries.get(raw) or app._query_of(raw)) == app._query_values(raw)
    assert set(app._queries) == {b"", b"sub1=x", b"sub1=a&sub2=b%20c&sub1=z"}
    for n in range(app.MAX_QUERIES + 10):
        app._query_of(b"sub1=%d" % n)
    assert len(app._queries) <= app.MAX_QUERIES
    app._queries.clear()
