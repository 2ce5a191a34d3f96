"""GET|POST /postback/{token}: storage first, aliases, duplicates, parse errors, Redis down."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from shared.postback_fields import accepts_move, normalise
from tests.gateway.test_api_basics import assert_error

NOW = datetime(2026, 5, 1, tzinfo=UTC)


async def stored(db, tenant):
    return await db.fetch("SELECT * FROM postbacks WHERE account_id = $1 ORDER BY id", tenant.account_id)


async def test_unknown_token_is_401(api):
    for method in ("GET", "POST"):
        resp = await api.request(method, "/postback/not-a-token", params={"click_id": "x"})
        assert_error(resp, 401, "unauthorized")


async def test_get_stores_raw_and_normalised(api, db, tenant):
    resp = await api.get(
        f"/postback/{tenant.postback_token}",
        params={"clickid": "abc", "payout_amount": "24.99", "txid": "T-1", "status": "PENDING", "currency": "eur",
                "offer_id": "ext-1", "timestamp": "2026-02-08T12:00:00Z", "network": "tune", "extra": "kept"},
    )
    assert resp.status_code == 200
    assert resp.json() == {"success": True, "status": "accepted"}
    [row] = await stored(db, tenant)
    assert row["method"] == "GET"
    assert row["params"] == {"clickid": "abc", "payout_amount": "24.99", "txid": "T-1", "status": "PENDING",
                             "currency": "eur", "offer_id": "ext-1", "timestamp": "2026-02-08T12:00:00Z",
                             "network": "tune", "extra": "kept"}
    assert (row["click_id"], row["payout"], row["conversion_key"], row["status"], row["currency"], row["offer_ref"]) == (
        "abc", Decimal("24.99"), "T-1", "pending", "EUR", "ext-1")
    assert row["converted_at"] == datetime(2026, 2, 8, 12, tzinfo=UTC) and row["network"] == "tune"
    assert row["parse_error"] is None and row["dedupe_key"] is not None and not row["is_duplicate"]


async def test_post_form_with_defaults(api, db, tenant):
    resp = await api.post(f"/postback/{tenant.postback_token}", data={"cid": "c9", "amount": "3"})
    assert resp.json() == {"success": True, "status": "accepted"}
    [row] = await stored(db, tenant)
    assert row["method"] == "POST" and row["params"] == {"cid": "c9", "amount": "3"}
    assert (row["status"], row["network"], row["conversion_key"], row["payout"]) == ("approved", "default", "click:c9", 3)
    assert abs((row["converted_at"] - row["received_at"]).total_seconds()) < 1


async def test_post_multipart_and_query_together(api, db, tenant):
    resp = await api.post(f"/postback/{tenant.postback_token}?network=everflow", files={"x": (None, "1")},
                          data={"transaction_id": "t1", "sum": "1.5", "event_id": "ev"})
    assert resp.json()["status"] == "accepted"
    [row] = await stored(db, tenant)
    assert (row["network"], row["click_id"], row["payout"], row["conversion_key"]) == ("everflow", "t1", Decimal("1.5"), "ev")


async def test_form_bodies_are_held_to_the_5_mb_limit(api, db, tenant):
    # Starlette's form parser alone would take a thousand fields of 1 MB each.
    big = {f"f{i}": "x" * 1_000_000 for i in range(6)}
    for files in (None, {"x": (None, "1")}):  # urlencoded, then multipart
        resp = await api.post(f"/postback/{tenant.postback_token}?click_id=c1", data=big, files=files)
        assert_error(resp, 413, "payload_too_large")
    assert await stored(db, tenant) == []


async def test_an_unreadable_or_oversized_form_is_stored_not_refused(api, db, tenant):
    # A multipart body without its boundary, one whose part passes the parser's 1 MB, and an
    # urlencoded body of 3000 fields (over the 1000 either parser reads): each postback is kept,
    # its query fields too, and answered 200.
    token = tenant.postback_token
    bodies = [
        ({"content-type": "multipart/form-data"}, b"click_id=nope"),
        ({"content-type": "multipart/form-data; boundary=b"},
         b'--b\r\nContent-Disposition: form-data; name="big"\r\n\r\n' + b"x" * 1_100_000 + b"\r\n--b--\r\n"),
        ({"content-type": "application/x-www-form-urlencoded"}, "&".join(f"k{i}=v" for i in range(3000)).encode()),
    ]
    for n, (headers, body) in enumerate(bodies):
        resp = await api.post(f"/postback/{token}?click_id=c{n}&conversion_id=k{n}&payout=5", content=body, headers=headers)
        assert resp.status_code == 200 and resp.json()["status"] == "accepted", resp.text
    rows = await stored(db, tenant)
    assert [(r["click_id"], r["conversion_key"]) for r in rows] == [("c0", "k0"), ("c1", "k1"), ("c2", "k2")]
    assert [r["parse_error"] is not None for r in rows] == [True, True, True]
    assert rows[0]["parse_error"].startswith("body: not a readable multipart form") and rows[0]["params"]["_body"] == "click_id=nope"
    assert rows[2]["parse_error"] == "body: more than 1000 form fields" and rows[2]["params"]["_body"].startswith("k0=v&k1=v")


async def test_repeated_form_fields_are_kept_in_order(api, db, tenant):
    body = "&".join(["sub=a", "click_id=r1", *(f"sub={i}" for i in range(900))]).encode()
    resp = await api.post(f"/postback/{tenant.postback_token}?sub=q", content=body,
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert resp.json()["status"] == "accepted"
    [row] = await stored(db, tenant)
    assert row["params"]["sub"] == ["q", "a", *map(str, range(900))] and row["click_id"] == "r1"


async def test_post_json_body_keeps_numbers_exact(api, db, tenant):
    resp = await api.post(f"/postback/{tenant.postback_token}", content=b'{"aff_sub": "j1", "payout": 0.10}',
                          headers={"content-type": "application/json"})
    assert resp.json()["status"] == "accepted"
    [row] = await stored(db, tenant)
    assert row["payout"] == Decimal("0.10") and row["click_id"] == "j1"
    assert await db.fetchval("SELECT params->>'payout' FROM postbacks WHERE id = $1", row["id"]) == "0.1"  # exact, never a float


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream"])
async def test_a_body_of_another_declared_type_is_read_or_kept(api, db, tenant, content_type):
    """Networks mislabel JSON; whatever the body, nothing they sent is lost."""
    headers = {"content-type": content_type} if content_type else {}
    token = f"/postback/{tenant.postback_token}"
    resp = await api.post(token, content=b'{"aff_sub": "j2", "payout": "2.5", "txid": "t9"}', headers=headers)
    assert resp.json()["status"] == "accepted"
    # The fields in the query, anything in the body: a postback like any other, the body kept.
    resp = await api.post(token + "?click_id=raw&payout=7&txid=qb", content=b"OK", headers=headers)
    assert resp.json()["status"] == "accepted"
    read, kept = sorted(await stored(db, tenant), key=lambda r: r["id"])
    assert (read["click_id"], read["payout"], read["conversion_key"], read["parse_error"]) == ("j2", Decimal("2.5"), "t9", None)
    params = await db.fetchval("SELECT params FROM postbacks WHERE id = $1", kept["id"])
    assert params == {"click_id": "raw", "payout": "7", "txid": "qb", "_body": "OK"}
    assert (kept["payout"], kept["conversion_key"], kept["parse_error"]) == (Decimal(7), "qb", None)


@pytest.mark.parametrize("params, error", [
    ({"click_id": "a", "payout": "abc"}, "payout"),
    ({"click_id": "a", "payout": "-1"}, "payout"),
    ({"click_id": "a", "status": "maybe"}, "status"),
    ({"click_id": "a", "timestamp": "yesterday"}, "timestamp"),
])
async def test_unparseable_fields_are_recorded_and_still_200(api, db, tenant, params, error):
    for _ in range(2):  # never deduplicated: each is kept as sent
        resp = await api.get(f"/postback/{tenant.postback_token}", params=params)
        assert resp.json() == {"success": True, "status": "accepted"}
    rows = await stored(db, tenant)
    assert len(rows) == 2
    for row in rows:
        assert row["parse_error"].startswith(error) and row["dedupe_key"] is None
        assert row["processed_at"] is not None and row["process_error"] == "unparseable"
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE account_id = $1", tenant.account_id) == 0


async def test_duplicates(api, db, tenant):
    url = f"/postback/{tenant.postback_token}"
    base = {"click_id": "d1", "conversion_id": "X", "payout": "5"}
    assert (await api.get(url, params=base)).json()["status"] == "accepted"
    assert (await api.post(url, data=base)).json()["status"] == "duplicate"
    assert (await api.get(url, params={**base, "payout": "5.00"})).json()["status"] == "duplicate"  # same amount
    assert (await api.get(url, params={**base, "status": "reversed"})).json()["status"] == "accepted"
    assert (await api.get(url, params={**base, "payout": "6"})).json()["status"] == "accepted"
    assert (await api.get(url, params={**base, "network": "tune"})).json()["status"] == "accepted"
    # No conversion id and no click id: every postback is its own conversion, never a duplicate.
    for _ in range(2):
        assert (await api.get(url, params={"payout": "1"})).json()["status"] == "accepted"
    rows = await stored(db, tenant)
    assert [r["is_duplicate"] for r in rows] == [False, True, True, False, False, False, False, False]
    assert all(r["dedupe_key"] is None for r in rows if r["is_duplicate"])
    assert rows[1]["params"] == base and rows[1]["method"] == "POST"


async def test_other_accounts_are_not_duplicates(api, db, tenant):
    from tests.helpers import make_tenant

    other = await make_tenant(db)
    for t in (tenant, other):
        resp = await api.get(f"/postback/{t.postback_token}", params={"click_id": "same", "conversion_id": "same"})
        assert resp.json()["status"] == "accepted"


async def test_enqueues_one_job_per_window(api, db, tenant, redis):
    from shared.jobs import ATTRIBUTION_WINDOW

    before = time.time()
    for n in range(3):
        await api.get(f"/postback/{tenant.postback_token}", params={"click_id": f"q{n}", "txid": f"w{n}"})
    after = time.time()
    rows = await stored(db, tenant)
    windows = range(int(before / ATTRIBUTION_WINDOW), int(after / ATTRIBUTION_WINDOW) + 1)
    jobs = [w for w in windows if await redis.exists(f"arq:job:attribute:{w}")]
    assert 1 <= len(jobs) <= min(3, len(windows))  # shared, not one per postback
    queued = {int(job_id.decode().rpartition(":")[2]): score for job_id, score in await redis.zrange("arq:queue", 0, -1, withscores=True)
              if job_id.startswith(b"attribute:")}
    for w in jobs:  # each runs when its window has closed (arq scores are unix ms)
        assert queued[w] == round((w + 1) * ATTRIBUTION_WINDOW * 1000)
    assert len(rows) == 3


async def test_a_window_job_is_enqueued_once_per_process(api, db, tenant, gateway_app, monkeypatch):
    """After this process has enqueued a window's job, the window's other postbacks do not ask arq
    again; an enqueue that failed is tried again by the window's next postback."""
    from types import SimpleNamespace

    from services.gateway.routes import postbacks as route
    from shared.jobs import ATTRIBUTION_WINDOW

    real, calls, failures = gateway_app.state.arq.enqueue_job, [], iter([ConnectionError("a blip")])

    async def enqueue(*args, **kwargs):
        calls.append(kwargs["_job_id"])
        if (failure := next(failures, None)) is not None:
            raise failure
        return await real(*args, **kwargs)

    monkeypatch.setattr(gateway_app.state.arq, "enqueue_job", enqueue)
    now = [time.time() - 10_000]  # windows no other test has used (past: their jobs run at once)
    monkeypatch.setattr(route, "time", SimpleNamespace(time=lambda: now[0], monotonic=time.monotonic))
    for n in range(5):
        resp = await api.get(f"/postback/{tenant.postback_token}", params={"click_id": f"e{n}", "txid": f"e{n}"})
        assert resp.json()["status"] == "accepted"
    assert len(calls) == 2 and calls[0] == calls[1]  # failed, then enqueued; the other three asked nothing
    now[0] += ATTRIBUTION_WINDOW
    await api.get(f"/postback/{tenant.postback_token}", params={"click_id": "next", "txid": "next"})
    assert len(calls) == 3 and calls[2] != calls[1]
    assert len(await stored(db, tenant)) == 6


async def test_redis_down_still_200_and_stored(api, db, tenant, gateway_app, monkeypatch):
    async def broken(*args, **kwargs):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(gateway_app.state.arq, "enqueue_job", broken)
    resp = await api.get(f"/postback/{tenant.postback_token}", params={"click_id": "down"})
    assert resp.json() == {"success": True, "status": "accepted"}
    [row] = await stored(db, tenant)
    assert row["processed_at"] is None  # the worker's sweeper picks it up



async def _asgi_get(app, path: str, query: bytes, sent: list[dict]) -> None:
    """A GET through the app as uvicorn makes it, every message it sends kept in ``sent``."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": [(b"host", b"gw")], "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000)}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)


async def test_a_stored_postback_cut_short_by_the_gateways_shutdown_still_answers_200(db, tenant, gateway_app, monkeypatch):
    """uvicorn cancels what still runs when a graceful shutdown runs out (6 s): a postback stored
    and waiting on its job's enqueue (Redis slow to answer, up to ENQUEUE_TIMEOUT) was answered
    uvicorn's 500, and the network sent it again. Stored, it is answered 200; the sweeper enqueues it."""
    entered = asyncio.Event()

    async def slow(*args, **kwargs):
        entered.set()
        await asyncio.Event().wait()  # Redis not answering

    monkeypatch.setattr(gateway_app.state.arq, "enqueue_job", slow)
    gateway_app.state.window_job = None  # (this window's job not yet enqueued by this process)
    sent: list[dict] = []
    request = asyncio.ensure_future(_asgi_get(gateway_app, f"/postback/{tenant.postback_token}", b"click_id=cut&txid=cut", sent))
    await asyncio.wait_for(entered.wait(), 30)
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    [row] = await stored(db, tenant)
    assert row["conversion_key"] == "cut"
    assert sent and sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200, sent
    assert json.loads(sent[1]["body"]) == {"success": True, "status": "accepted"}

def test_normalise_aliases_order_and_unix_time():
    pb = normalise({"CID": "b", "clickid": "a", "timestamp": "1700000000", "SUM": "2"}, NOW)
    assert pb.click_id == "a"  # earlier alias wins; names are case-insensitive
    assert pb.payout == Decimal(2) and pb.converted_at == datetime.fromtimestamp(1700000000, UTC)
    assert normalise({"click_id": ["x", "y"]}, NOW).click_id == "x"
    assert normalise({"timestamp": "2026-01-01T00:00:00"}, NOW).converted_at == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("macro", ["{txid}", "{{transaction_id}}", "${event_id}", "[txid]", "[[txid]]", "#s2#", "%txid%", "%%txid%%"])
def test_an_unfilled_macro_names_nothing_and_values_nothing(macro):
    """A network's postback template whose macro it could not fill sends the macro itself. In a
    field that names something it is no value (the next alias or repeat is read; else the
    default); in status, payout, currency and timestamp it fails the postback (kept for the log):
    never a rejection counted as approved, nor a default payout or currency made up."""
    pb = normalise({"txid": macro, "click_id": [macro, "r1"], "offer_id": macro, "network": macro}, NOW)
    assert (pb.conversion_key, pb.click_id, pb.offer_ref, pb.network, pb.errors) == ("click:r1", "r1", None, "default", [])
    assert normalise({"txid": macro, "event_id": "e7"}, NOW).conversion_key == "e7"
    for field in ("status", "payout", "currency", "timestamp"):
        failed = normalise({"click_id": "r1", field: macro}, NOW)
        assert failed.errors and failed.errors[0].startswith(f"{field}:"), (field, failed.errors)
        if field != "status":
            # In a rejection or a reversal (worth 0 whatever its money or time) they are absent.
            for status in ("rejected", "Reversed"):
                taken = normalise({"click_id": "r1", "status": status, field: macro}, NOW)
                assert taken.errors == [] and (taken.payout, taken.currency, taken.converted_at) == (None, None, NOW)
            assert normalise({"click_id": "r1", "status": "pending", field: macro}, NOW).errors
    # Values that only look alike are values.
    for value in ("[123]", "{1}", "x{txid}", "{txid}x", "#12#", "{}"):
        assert normalise({"txid": value}, NOW).conversion_key == value


@pytest.mark.parametrize("guid", ["{D2B5A0A1-4F89-11D3-9A0C-0305E82C3301}", "{c9a646d3-9c61-4cb7-bfcd-ee2522c8f633}"])
def test_a_braced_guid_is_a_value_not_a_macro(guid):
    """A GUID in braces (the registry form, .NET's Guid.ToString("B")) is a real id a network may
    send as its conversion id: dropped as an unfilled macro, two conversions of one click were one
    (the second's money lost) and, without a click, a retried postback counted twice."""
    assert normalise({"txid": guid, "click_id": "r1"}, NOW).conversion_key == guid


def test_status_moves():
    d = Decimal
    assert accepts_move("pending", d(1), "approved", d(1))
    assert accepts_move("approved", d(1), "reversed", d(1))
    assert accepts_move("approved", d(1), "rejected", d(1))
    assert not accepts_move("approved", d(1), "pending", d(1))
    assert not accepts_move("reversed", d(1), "approved", d(1))
    assert not accepts_move("approved", d(1), "approved", d(1))
    assert accepts_move("approved", d(1), "approved", d(2))


def _incompressible(n: int) -> str:
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n))


@pytest.mark.parametrize("params", [
    {"click_id": 1500, "conversion_id": 1500, "network": 500},
    {"click_id": 1400, "conversion_id": 1400},
])
async def test_long_but_allowed_ids_are_stored_and_answered_200(api, db, tenant, params):
    # The fields of the deduplication key, joined, passed what a btree index entry may hold: the
    # insert failed, the postback was answered 500 and not stored, and so was every retry.
    sent = {name: _incompressible(n) for name, n in params.items()}
    resp = await api.get(f"/postback/{tenant.postback_token}", params={**sent, "payout": "1"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True, "status": "accepted"}
    again = await api.get(f"/postback/{tenant.postback_token}", params={**sent, "payout": "1"})
    assert again.json() == {"success": True, "status": "duplicate"}
    assert await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1", tenant.account_id) == 2


async def test_a_body_field_also_in_the_query_is_kept_in_the_stored_postback(api, db, tenant):
    # The query's value is the one read (as for a form); the body's was dropped from the record.
    resp = await api.post(f"/postback/{tenant.postback_token}?click_id=q1",
                          content=b'{"click_id": "b1", "payout": "2"}', headers={"content-type": "application/json"})
    assert resp.json()["status"] == "accepted"
    row = await db.fetchrow("SELECT params, click_id FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert row["click_id"] == "q1" and row["params"]["click_id"] == ["q1", "b1"]


async def test_a_multipart_part_sent_as_a_file_is_a_field(api, db, tenant):
    resp = await api.post(f"/postback/{tenant.postback_token}", data={"click_id": "m1"},
                          files={"payout": ("payout.txt", b"3", "text/plain")})
    assert resp.json()["status"] == "accepted"
    row = await db.fetchrow("SELECT params, payout FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert row["payout"] == 3 and row["params"]["payout"] == "3"
