"""Per-message short URLs from /send: the click belongs to the message, {{sendId}} is its id,
only the first human click is the engagement, bots never count."""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import orjson

from shared import edge as edge_mod

from tests.helpers import Tenant, make_tenant, random_phone
from tests.redirect.conftest import Edge, drain, offer_and_link

CODE_RE = re.compile(r"https://sms\.example\.com/([A-Za-z0-9]{7})\b")
IMESSAGE_UA = "facebookexternalhit/1.1 Facebot Twitterbot/1.0"


async def send(api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, body: str, to: str | None = None) -> tuple[str, str]:
    """(message id, the rewritten per-message short URL)."""
    resp = await api.post(
        "/api/v2/send", json={"to": to or random_phone(), "list_id": tenant.list_id, "body": body}, headers=tenant.headers
    )
    assert resp.status_code == 201, resp.text
    message_id = resp.json()["message_id"]
    final_body = await db.fetchval("SELECT body FROM messages WHERE id = $1", message_id)
    match = CODE_RE.search(final_body)
    assert match, final_body
    return message_id, match.group(0)


async def test_only_links_own_codes_have_their_answers_remembered(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool
) -> None:
    # A per-message URL is mostly tapped once: remembering its answer would only crowd out (and,
    # at the table's bound, clear) the answers of the links' own codes, which are tapped again.
    _, link = await offer_and_link(api, tenant, "https://lp.example/offer?c={click_id}")
    assert (await edge.get(link["shortUrl"])).status_code == 302
    remembered = dict(edge.app._short_answers)
    assert len(remembered) == 1
    for _ in range(3):
        _, short_url = await send(api, tenant, db, f"Deal: {link['shortUrl']}")
        for _ in range(2):  # a repeat is answered the same, from the caches
            assert parse_qs(urlsplit((await edge.get(short_url)).headers["location"]).query)["sid"]
    assert edge.app._short_answers == remembered


async def test_send_body_link_carries_the_message_to_the_click(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool, redis: object
) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/offer?aff_sub={{sendId}}&c={click_id}")
    phone = random_phone()
    message_id, short_url = await send(api, tenant, db, f"Deal: {link['shortUrl']} reply STOP", to=phone)
    assert short_url != link["shortUrl"]

    tracker = await edge.get(short_url + "?sub1=x")
    assert tracker.status_code == 302
    q = parse_qs(urlsplit(tracker.headers["location"]).query)
    assert set(q) == {"sid", "sub1"} and q["sub1"] == ["x"]
    assert q["sid"][0].startswith(message_id + ".")  # the message id, signed by the edge
    dest = await edge.get(tracker.headers["location"])
    dq = parse_qs(urlsplit(dest.headers["location"]).query)
    assert dq["aff_sub"] == [message_id]
    click_id = dq["c"][0]

    await drain(db, redis)
    row = await db.fetchrow("SELECT message_id, is_bot, params FROM clicks WHERE id = $1", click_id)
    assert row["message_id"] == message_id
    assert "sid" not in row["params"]
    mc = await db.fetchrow("SELECT * FROM message_clicks WHERE message_id = $1", message_id)
    assert mc["click_id"] == click_id and mc["account_id"] == tenant.account_id
    contact = await db.fetchrow(
        "SELECT click_count, last_clicked_at FROM contacts WHERE list_id = $1 AND phone_number = $2", tenant.list_id, phone
    )
    assert contact["click_count"] == 1 and contact["last_clicked_at"] is not None


async def test_only_the_first_human_click_is_the_engagement(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool, redis: object
) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/offer?c={click_id}")
    phone = random_phone()
    message_id, short_url = await send(api, tenant, db, f"Go {link['shortUrl']}", to=phone)

    # The preview bot fetches first: redirected, stored as a bot, not the engagement.
    bot_location = await edge.click(short_url, headers={"user-agent": IMESSAGE_UA})
    assert bot_location.startswith("https://lp.example/offer?c=")
    await drain(db, redis)
    assert await db.fetchval("SELECT count(*) FROM message_clicks WHERE message_id = $1", message_id) == 0

    first = parse_qs(urlsplit(await edge.click(short_url)).query)["c"][0]
    await drain(db, redis)
    second = parse_qs(urlsplit(await edge.click(short_url)).query)["c"][0]
    await drain(db, redis)

    rows = await db.fetch("SELECT id, is_bot FROM clicks WHERE message_id = $1 ORDER BY clicked_at", message_id)
    assert [r["is_bot"] for r in rows] == [True, False, False]
    assert rows[1]["id"] == first and rows[2]["id"] == second
    assert await db.fetchval("SELECT click_id FROM message_clicks WHERE message_id = $1", message_id) == first
    count = await db.fetchval(
        "SELECT click_count FROM contacts WHERE list_id = $1 AND phone_number = $2", tenant.list_id, phone
    )
    assert count == 2  # human clicks only


async def test_a_message_of_another_account_is_not_claimed(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool, redis: object
) -> None:
    other = await make_tenant(db)
    _, other_link = await offer_and_link(api, other, "https://lp.example/x")
    other_message, _ = await send(api, other, db, f"Hi {other_link['shortUrl']}")

    _, link = await offer_and_link(api, tenant, "https://lp.example/offer?c={click_id}&m={{sendId}}")
    tracker = (await edge.get(link["shortUrl"])).headers["location"]
    # A forged sid naming the other account's message.
    dest = await edge.get(tracker + f"?sid={other_message}")
    click_id = parse_qs(urlsplit(dest.headers["location"]).query)["c"][0]
    await drain(db, redis)
    assert await db.fetchval("SELECT message_id FROM clicks WHERE id = $1", click_id) is None
    assert await db.fetchval("SELECT count(*) FROM message_clicks WHERE message_id = $1", other_message) == 0


async def test_a_plain_link_cannot_claim_a_message_by_adding_sid(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool, redis: object
) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/offer?c={click_id}&m={{sendId}}")
    message_id, short_url = await send(api, tenant, db, f"Hi {link['shortUrl']}")
    _, other_link = await offer_and_link(api, tenant, "https://lp.example/other?c={click_id}&m={{sendId}}")
    _, other_short = await send(api, tenant, db, f"Hi {other_link['shortUrl']}")
    genuine = parse_qs(urlsplit((await edge.get(short_url)).headers["location"]).query)["sid"][0]
    other_sid = parse_qs(urlsplit((await edge.get(other_short)).headers["location"]).query)["sid"][0]
    plain_tracker = link["clickTrackerUrl"]
    forged = [
        f"{message_id}.{'A' * 16}",                  # well-formed, wrong signature
        message_id,                                    # the bare message id
        genuine[:-1] + ("B" if genuine[-1] != "B" else "C"),  # one character off
        other_sid.replace(other_sid[:8], message_id),  # another message's signature
    ]
    # The plain shared link, with a hand-made sid: through the short hop and straight at the tracker.
    attempts = [await edge.get(link["shortUrl"] + f"?sid={forged[0]}")]
    attempts[0] = await edge.get(attempts[0].headers["location"])
    attempts += [await edge.get(f"{plain_tracker}?sid={sid}") for sid in forged]
    clicks = []
    for dest in attempts:
        q = parse_qs(urlsplit(dest.headers["location"]).query, keep_blank_values=True)
        assert q["m"] == [""]  # {{sendId}} is empty outside a message
        clicks.append(q["c"][0])
    # A genuine sid replayed on the same tracker is the message's own URL's click, as before.
    replayed = parse_qs(urlsplit((await edge.get(f"{plain_tracker}?sid={genuine}")).headers["location"]).query)
    assert replayed["m"] == [message_id]
    await drain(db, redis)
    stored = await db.fetch("SELECT message_id FROM clicks WHERE id = ANY($1::text[])", clicks)
    assert len(stored) == len(clicks) and all(r["message_id"] is None for r in stored)


async def test_the_message_creative_fills_the_creative_macro(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool
) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/offer?cr={creative}&m={{sendId}}")
    resp = await api.post("/api/v2/send", headers=tenant.headers, json={
        "to": random_phone(), "list_id": tenant.list_id, "body": f"Hi {link['shortUrl']}", "creative_id": "summer 20%&more"})
    message_id = resp.json()["message_id"]
    short_url = CODE_RE.search(await db.fetchval("SELECT body FROM messages WHERE id = $1", message_id)).group(0)
    for query, expected in (("", "summer 20%&more"), ("?creative=given", "given")):  # one on the link itself wins
        dest = await edge.get((await edge.get(short_url + query)).headers["location"])
        q = parse_qs(urlsplit(dest.headers["location"]).query)
        assert q["cr"] == [expected] and q["m"] == [message_id]


async def test_a_rewritten_url_ending_in_a_slash_works_as_written(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool
) -> None:
    """The gateway rewrites ``.../Ab3kX9/`` and leaves the slash; the URL in the message, slash and
    all, reaches the message's tracker."""
    _, link = await offer_and_link(api, tenant, "https://lp.example/offer?m={{sendId}}")
    message_id, short_url = await send(api, tenant, db, f"Deal: {link['shortUrl']}/ now")
    body = await db.fetchval("SELECT body FROM messages WHERE id = $1", message_id)
    assert f"{short_url}/ now" in body
    tracker = await edge.get(short_url + "/")
    assert tracker.status_code == 302
    dest = await edge.get(tracker.headers["location"])
    assert parse_qs(urlsplit(dest.headers["location"]).query)["m"] == [message_id]


async def test_a_per_message_code_is_stored_by_its_link_and_both_formats_redirect(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool, redis: Any
) -> None:
    """A per-message code names its link's code (the tracker and offer are read from the link's
    entry): about 130 bytes of Redis a message instead of 220. A code in the earlier format (the
    whole entry) still redirects as its message's, creative included; a code whose link entry is
    gone answers 404."""
    offer, link = await offer_and_link(api, tenant, "https://lp.example/offer?cr={creative}&m={{sendId}}")
    message_id, short_url = await send(api, tenant, db, f"Hi {link['shortUrl']}")
    code = short_url.rpartition("/")[2]
    key = edge_mod.short_key("sms.example.com", code)
    assert orjson.loads(await redis.get(key)) == {"k": link["linkId"], "m": message_id}
    assert await redis.memory_usage(key) < 150

    async def destination(url: str) -> dict[str, list[str]]:
        tracker = await edge.get(url)
        assert tracker.status_code == 302, tracker.text
        assert tracker.headers["location"].startswith(link["clickTrackerUrl"] + "?sid=" + message_id + ".")
        return parse_qs(urlsplit((await edge.get(tracker.headers["location"])).headers["location"]).query)

    assert (await destination(short_url))["m"] == [message_id]

    earlier = "Ear1ier"
    await redis.set(edge_mod.short_key("sms.example.com", earlier), orjson.dumps(
        {"u": link["clickTrackerUrl"], "o": offer["id"], "m": message_id, "c": "cr-7"}))
    q = await destination(f"https://sms.example.com/{earlier}")
    assert q["m"] == [message_id] and q["cr"] == ["cr-7"]

    orphan = "0rphan1"
    await redis.set(edge_mod.short_key("sms.example.com", orphan), orjson.dumps({"k": "Gone00", "m": message_id}))
    assert (await edge.get(f"https://sms.example.com/{orphan}")).status_code == 404


async def test_a_per_message_url_pasted_into_another_message_becomes_that_messages(api, tenant, edge, db, redis):
    # A marketer sends a test to their own phone, then pastes the URL it got into the campaign (or
    # re-sends a body read back from GET /messages): the 7-character per-message URL stands for its
    # link, and the new message gets its own code. It used to keep the old message's code: its
    # clicks, and its {{sendId}}, were the old message's.
    offer, link = await offer_and_link(api, tenant, "https://lp.example/o?m={{sendId}}&c={click_id}")

    async def sent(body: str) -> tuple[str, dict]:
        resp = await api.post("/api/v2/send", headers=tenant.headers, json={"to": random_phone(), "list_id": tenant.list_id, "body": body})
        assert resp.status_code == 201, resp.text
        mid = resp.json()["message_id"]
        return mid, (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()

    first, first_msg = await sent(f"Deal: {link['shortUrl']} reply STOP")
    second, second_msg = await sent(first_msg["body"] + " " + first_msg["body"].split()[1])  # pasted twice
    assert second_msg["body"] != first_msg["body"] and second_msg["offer_id"] == offer["id"]
    codes = re.findall(r"sms\.example\.com/([A-Za-z0-9]{7})\b", second_msg["body"])
    assert len(codes) == 2 and codes[0] == codes[1]  # one link: one code, as for a link named twice
    await drain(db, redis)
    destination = parse_qs(urlsplit(await edge.click(f"https://sms.example.com/{codes[0]}")).query)
    assert destination["m"] == [second]
    await drain(db, redis)
    detail = {m: (await api.get(f"/api/v2/messages/{m}", headers=tenant.headers)).json() for m in (first, second)}
    assert (detail[second]["clicked"], detail[first]["clicked"]) == (True, False)
    # Another account's per-message URL is left as it is.
    other = await make_tenant(db)
    resp = await api.post("/api/v2/send", headers=other.headers, json={"to": random_phone(), "list_id": other.list_id, "body": first_msg["body"]})
    other_body = (await api.get(f"/api/v2/messages/{resp.json()['message_id']}", headers=other.headers)).json()["body"]
    assert other_body == first_msg["body"]
