"""The two hops end to end: short link -> click tracker -> destination, with real Redis."""
from __future__ import annotations

import asyncio
from typing import Any
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import orjson
import pytest

from shared import edge as edge_keys
from shared.settings import Settings
from tests.helpers import Tenant, make_link, make_offer, make_tenant
from tests.redirect.conftest import PHONE_UA, Edge, drain, offer_and_link, running_edge

ALL_MACROS = (
    "https://lp.example/land?cid={click_id}&tid={transaction_id}&aff={affiliate_id}&off={offer_id}"
    "&acct={account_id}&s1={sub1}&s2={sub2}&s3={sub3}&s4={sub4}&s5={sub5}&src={source}&cr={creative}"
    "&cost={cost}&ip={ip}&ua={user_agent}&dt={datetime}&cc={country_code}&send={{sendId}}&unk={mystery}"
)


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


async def test_short_hop_forwards_the_query_to_the_tracker(api: httpx.AsyncClient, tenant: Tenant, edge: Edge) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    resp = await edge.get(link["shortUrl"] + "?sub1=campaign_a&sub2=user%20123&source=sms")
    assert resp.status_code == 302
    assert resp.headers["location"] == link["clickTrackerUrl"] + "?sub1=campaign_a&sub2=user%20123&source=sms"
    assert resp.headers["cache-control"] == "private, no-store"
    bare = await edge.get(link["shortUrl"])
    assert bare.headers["location"] == link["clickTrackerUrl"]


async def test_tracker_hop_records_the_click_and_redirects(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool, redis: object
) -> None:
    offer, link = await offer_and_link(api, tenant, "https://lp.example/land?c={click_id}&s={sub1}")
    tracker = await edge.get(link["shortUrl"] + "?sub1=abc&foo=bar")
    resp = await edge.get(tracker.headers["location"])
    assert resp.status_code == 302
    assert resp.headers["cache-control"] == "private, no-store"
    q = query_of(resp.headers["location"])
    click_id = q["c"][0]
    assert len(click_id) == 32 and int(click_id, 16) >= 0
    assert q["s"] == ["abc"]

    await drain(db, redis)
    row = await db.fetchrow("SELECT * FROM clicks WHERE id = $1", click_id)
    assert row is not None
    assert row["account_id"] == tenant.account_id
    assert row["link_id"] == link["linkId"]
    assert row["offer_id"] == offer["id"]
    assert row["list_id"] == tenant.list_id
    assert row["message_id"] is None
    assert row["ip"] == "198.51.100.7"
    assert row["user_agent"] == PHONE_UA
    assert row["is_bot"] is False
    assert row["country_code"] is None
    assert row["params"] == {"sub1": "abc", "foo": "bar"}
    assert abs(row["clicked_at"] - datetime.now(UTC)) < timedelta(minutes=5)


async def test_hosts_match_case_insensitively_and_ignore_the_port(api: httpx.AsyncClient, tenant: Tenant, edge: Edge) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    resp = await edge.get(f"https://SMS.Example.COM:8443/{link['linkId']}")
    assert resp.status_code == 302
    tracker_path = urlsplit(link["clickTrackerUrl"]).path
    resp = await edge.head(f"http://CT.LocalHost{tracker_path}")
    assert resp.status_code == 302


async def test_wrong_host_and_unknown_codes_are_404(api: httpx.AsyncClient, tenant: Tenant, edge: Edge) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    tracker_path = urlsplit(link["clickTrackerUrl"]).path
    for url in (
        f"https://other.example.com/{link['linkId']}",      # right code, another short domain
        f"https://ct.localhost:8001/{link['linkId']}",      # the tracker domain is not a short domain
        f"https://sms.example.com{tracker_path}",           # tracker id on the short domain
        "https://sms.example.com/Zz9Zz9",                   # unknown code
        "https://sms.example.com/a",                        # not a code at all
        "http://ct.localhost:8001/c/00000000-0000-4000-8000-000000000000",
        "http://ct.localhost:8001/c/not-a-tracker",
    ):
        resp = await edge.get(url)
        assert resp.status_code == 404, url
        assert resp.headers["content-type"].startswith("text/html")
        assert "Not found" in resp.text


async def test_a_trailing_slash_names_the_same_link(api: httpx.AsyncClient, tenant: Tenant, edge: Edge) -> None:
    """SMS copy often ends a URL with "/": /Ab3kX9/ is /Ab3kX9, on both hops; two slashes are not."""
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    resp = await edge.get(link["shortUrl"] + "/?sub1=a")
    assert resp.status_code == 302 and resp.headers["location"] == link["clickTrackerUrl"] + "?sub1=a"
    resp = await edge.get(link["clickTrackerUrl"] + "/")
    assert resp.status_code == 302 and resp.headers["location"].startswith("https://lp.example/land?click_id=")
    assert (await edge.get(link["shortUrl"] + "//")).status_code == 404


async def test_every_macro_is_filled_from_the_click_offer_and_query(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge
) -> None:
    offer, link = await offer_and_link(api, tenant, ALL_MACROS, affiliate_id="aff-77")
    before = datetime.now(UTC).replace(microsecond=0)
    location = await edge.click(
        link["shortUrl"] + "?sub1=a1&sub2=b2&sub3=c3&sub4=d4&sub5=e5&source=sms&creative=cr-9&cost=0.05"
    )
    q = query_of(location)
    assert q["cid"] == q["tid"] and len(q["cid"][0]) == 32
    assert q["aff"] == ["aff-77"]
    assert q["off"] == [offer["id"]]
    assert q["acct"] == [str(tenant.account_id)]
    assert [q[f"s{i}"][0] for i in range(1, 6)] == ["a1", "b2", "c3", "d4", "e5"]
    assert q["src"] == ["sms"] and q["cr"] == ["cr-9"] and q["cost"] == ["0.05"]
    assert q["ip"] == ["198.51.100.7"]
    assert q["ua"] == [PHONE_UA]
    at = datetime.fromisoformat(q["dt"][0].replace("Z", "+00:00"))
    assert at.tzinfo is not None and before <= at <= datetime.now(UTC)
    assert q["cc"] == [""]      # no GeoIP database configured
    assert q["send"] == [""]    # not a message's link
    assert q["unk"] == [""]     # unknown macros become empty
    assert location.startswith("https://lp.example/land?cid=")


async def test_values_are_url_encoded_and_cannot_inject(api: httpx.AsyncClient, tenant: Tenant, edge: Edge) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/p/{sub2}?s={sub1}&x=1")
    evil = "a&admin=1#frag"
    location = await edge.click(link["shortUrl"] + "?sub1=a%26admin%3D1%23frag&sub2=..%2F..%2Fetc")
    parts = urlsplit(location)
    assert parts.path == "/p/..%2F..%2Fetc"
    assert parts.fragment == ""
    assert parse_qs(parts.query) == {"s": [evil], "x": ["1"]}


async def test_no_macros_appends_click_id_and_subs(api: httpx.AsyncClient, tenant: Tenant, edge: Edge) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/land?k=v")
    location = await edge.click(link["shortUrl"] + "?sub1=x&sub3=z&source=ignored")
    q = query_of(location)
    assert set(q) == {"k", "click_id", "sub1", "sub3"}
    assert q["sub1"] == ["x"] and q["sub3"] == ["z"] and len(q["click_id"][0]) == 32


async def test_paused_or_deleted_offer_stops_answering(api: httpx.AsyncClient, tenant: Tenant, settings: Settings) -> None:
    offer, link = await offer_and_link(api, tenant, "https://lp.example/land")
    ttl = 0.05
    async with running_edge(settings, link_cache_ttl=ttl) as edge:
        tracker_url = (await edge.get(link["shortUrl"])).headers["location"]
        assert (await edge.head(tracker_url)).status_code == 302

        resp = await api.patch(f"/api/v2/offers/{offer['id']}", json={"status": "paused"}, headers=tenant.headers)
        assert resp.status_code == 200, resp.text
        await asyncio.sleep(ttl * 3)
        assert (await edge.get(link["shortUrl"])).status_code == 404
        assert (await edge.get(tracker_url)).status_code == 404

        resp = await api.patch(f"/api/v2/offers/{offer['id']}", json={"status": "active"}, headers=tenant.headers)
        assert resp.status_code == 200, resp.text
        await asyncio.sleep(ttl * 3)
        assert (await edge.get(link["shortUrl"])).status_code == 302

        resp = await api.delete(f"/api/v2/offers/{offer['id']}", headers=tenant.headers)
        assert resp.status_code in (200, 204), resp.text
        await asyncio.sleep(ttl * 3)
        assert (await edge.get(link["shortUrl"])).status_code == 404
        assert (await edge.head(tracker_url)).status_code == 404


async def test_head_answers_the_same_location_and_records_nothing(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool, redis: object
) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/land?s={sub1}")
    await drain(db, redis)
    short_head = await edge.head(link["shortUrl"] + "?sub1=q")
    short_get = await edge.get(link["shortUrl"] + "?sub1=q")
    assert short_head.status_code == short_get.status_code == 302
    assert short_head.headers["location"] == short_get.headers["location"]
    tracker = short_get.headers["location"]
    head = await edge.head(tracker)
    assert head.status_code == 302
    assert head.headers["location"] == "https://lp.example/land?s=q"
    assert head.headers["cache-control"] == "private, no-store"
    await drain(db, redis)
    assert await db.fetchval("SELECT count(*) FROM clicks WHERE account_id = $1", tenant.account_id) == 0
    get = await edge.get(tracker)
    assert get.headers["location"] == head.headers["location"]
    await drain(db, redis)
    assert await db.fetchval("SELECT count(*) FROM clicks WHERE account_id = $1", tenant.account_id) == 1


async def test_other_methods_are_refused(api: httpx.AsyncClient, tenant: Tenant, edge: Edge) -> None:
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    resp = await edge.client.post(link["shortUrl"])
    assert resp.status_code == 405
    assert resp.headers["allow"] == "GET, HEAD"


async def test_two_links_of_one_offer_are_distinct(api: httpx.AsyncClient, tenant: Tenant, edge: Edge) -> None:
    offer = await make_offer(api, tenant, destination_url="https://lp.example/land")
    one, two = await make_link(api, tenant, offer["id"]), await make_link(api, tenant, offer["id"])
    assert (await edge.get(one["shortUrl"])).headers["location"] == one["clickTrackerUrl"]
    assert (await edge.get(two["shortUrl"])).headers["location"] == two["clickTrackerUrl"]


def test_host_header_parsing_agrees_with_the_edge_contract() -> None:
    from services.redirect.app import hostname
    from shared.edge import host_of

    for raw in ("SMS.Example.com", "sms.example.com:8443", "sms.example.com.", "[2001:DB8::1]:8001", "ct.localhost:8001",
                "[::1]", "sms.example.com:"):
        assert hostname(raw.encode()) == host_of(raw), raw
    for raw in ("sms.example.com:junk", "[::1]junk", "[::1]:x", "a" * 300):  # no link's host
        assert hostname(raw.encode()) == "", raw


async def test_an_offer_url_with_control_characters_in_redis_still_redirects(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, redis: Any
) -> None:
    """The gateway refuses such URLs now; one already published (an older gateway) is
    percent-encoded at the edge instead of breaking every click's response (found by fuzzing:
    the connection closed with no answer, the click already recorded)."""
    offer, link = await offer_and_link(api, tenant, "https://lp.example/ok?c={click_id}")
    entry = orjson.loads(await redis.get(edge_keys.offer_key(offer["id"])))
    await redis.set(edge_keys.offer_key(offer["id"]), orjson.dumps({**entry, "d": "https://lp.example/a\x01b c\x7f?c={click_id}"}))
    location = await edge.click(link["shortUrl"])
    assert location.startswith("https://lp.example/a%01b%20c%7F?c=") and len(parse_qs(urlsplit(location).query)["c"][0]) == 32


async def test_a_destination_beyond_ascii_is_sent_as_a_browser_would(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge
) -> None:
    """A Location header is ASCII: a host in another script goes out in its IDNA form, the rest
    percent-encoded as UTF-8, and the macros are filled (a space inside {{ }} is allowed)."""
    _, link = await offer_and_link(api, tenant, "https://Bücher.example/été?q=€ 1&c={click_id}&m={{ sendId }}&s={sub1}")
    location = await edge.click(link["shortUrl"] + "?sub1=ü")
    assert location.isascii(), location
    split = urlsplit(location)
    assert (split.netloc, split.path) == ("xn--bcher-kva.example", "/%C3%A9t%C3%A9")
    query = parse_qs(split.query)
    assert query["q"] == ["€ 1"] and len(query["c"][0]) == 32 and query["s"] == ["ü"] and "m" not in query


@pytest.mark.parametrize("template, location", [
    ("https://faß.de/x", "https://xn--fa-hia.de/x"),  # UTS #46 as browsers: IDNA 2003 would say fass.de
    ("https://ü:pw@[::1]:8443/p", "https://%C3%BC:pw@[::1]:8443/p"),  # an IPv6 host keeps its brackets
    ("https://shop{sub1}ü.example/", "https://shop{sub1}%C3%BC.example/"),  # a macro in the host: left to fill
    # Offers published before the gateway checked hosts: never an error at the edge.
    ("https://lp.example]/a", "https://lp.example]/a"),
    ("https://[foo]/é", "https://[foo]/%C3%A9"),
    ("https://bücher.example:99999/", "https://b%C3%BCcher.example:99999/"),
    ("https://lp.example/%C3%A9?a=1#f", "https://lp.example/%C3%A9?a=1#f"),  # already encoded: as it is
])
def test_location_templates(template: str, location: str) -> None:
    from services.redirect.app import location_template

    assert location_template(template) == location


async def test_an_offer_with_a_macro_in_its_host_in_redis_answers_404(
    api: httpx.AsyncClient, tenant: Tenant, settings: Settings, redis: Any
) -> None:
    """The gateway refuses a macro in the destination's host (it would let any visitor bounce
    through our domain to a host of their choosing); an offer published before that check is
    refused at the edge instead of being followed."""
    offer, link = await offer_and_link(api, tenant, "https://lp.example/ok?c={click_id}")
    ttl = 0.05
    async with running_edge(settings, link_cache_ttl=ttl) as edge:
        tracker = (await edge.get(link["shortUrl"])).headers["location"]
        assert (await edge.get(tracker + "?sub1=.evil.example")).status_code == 302
        entry = orjson.loads(await redis.get(edge_keys.offer_key(offer["id"])))
        await redis.set(edge_keys.offer_key(offer["id"]), orjson.dumps({**entry, "d": "https://lp.example{sub1}/?c={click_id}"}))
        await asyncio.sleep(ttl * 3)
        assert (await edge.get(link["shortUrl"])).status_code == 404
        assert (await edge.get(tracker + "?sub1=.evil.example")).status_code == 404


@pytest.mark.parametrize("url, takes", [
    ("https://lp.example/?c={click_id}&s={sub1}", False),
    ("https://lp.example:8443/{sub1}/x#{sub2}", False),
    ("https://lp.example{sub1}/", True),
    ("https://{sub1}.lp.example/", True),
    ("https://u{sub1}@lp.example/", True),
    ("https://lp.example{sub1}", True),
    ("https://lp.example{sub1}?a=1", True),
    ("https://lp.example}\\{sub1}", True),
    ("{sub1}://lp.example/", True),
    ("https:{sub1}", True),
])
def test_which_destinations_put_a_macro_in_the_host(url: str, takes: bool) -> None:
    from services.redirect.app import _host_takes_a_macro

    assert _host_takes_a_macro(url) is takes


async def test_a_host_header_no_host_name_could_fill_is_404_and_not_remembered(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge
) -> None:
    """uvicorn bounds no header: a 5 MB Host header was kept as a key (the host memo and, with a
    junk "port" still matching the link, the short-hop answers), 5 MB a request (found by review)."""
    from services.redirect import app as redirect_app

    _, link = await offer_and_link(api, tenant, "https://lp.example/x")
    path = "/" + link["linkId"]
    tracker = (await edge.get(link["shortUrl"])).headers["location"]
    tracker_path = urlsplit(tracker).path
    answers = len(edge.app._short_answers)
    for host in ("sms.example.com:" + "9" * 300, "sms.example.com" + " " * 300, "x" * 100_000):
        assert (await edge.get(f"http://sms.example.com{path}", headers={"host": host})).status_code == 404
        assert (await edge.get(f"http://ct.localhost:8001{tracker_path}", headers={"host": host})).status_code == 404
        assert host.encode() not in redirect_app._hostnames
    for host in ("sms.example.com:junk", "sms.example.com:80x", "sms.example.com:"):
        expected = 302 if host.endswith(":") else 404
        assert (await edge.get(f"http://sms.example.com{path}", headers={"host": host})).status_code == expected, host
    assert len(edge.app._short_answers) <= answers + 1
    assert (await edge.get(f"http://sms.example.com{path}", headers={"host": "SMS.example.com:8443"})).status_code == 302


async def test_a_dot_segment_in_a_query_value_does_not_move_the_destination_path(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge
) -> None:
    _, link = await offer_and_link(api, tenant, "https://shop.example/offers/{sub1}/landing?c={click_id}")
    for sub1 in ("..", "%2e%2e", "%2E.", "."):
        location = await edge.click(link["shortUrl"] + f"?sub1={sub1}")
        assert urlsplit(location).path == "/offers//landing", (sub1, location)


async def test_an_ipv6_literal_domain_matches_the_host_a_browser_sends(
    api: httpx.AsyncClient, db: asyncpg.Pool, edge: Edge
) -> None:
    """A list's domain written as an IPv6 literal in another form than the compressed one
    (``[0:0::1]``): browsers send the compressed form (``Host: [::1]:8001``), which is the same
    host; so is any other spelling of it (found by review: the match was textual, 404 on both hops)."""
    tenant = await make_tenant(db, short_domain="http://[0:0::1]:8001", tracker_domain="http://[0::0:1]:8001")
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    assert link["shortUrl"].startswith("http://[0:0::1]:8001/")
    tracker_path = urlsplit(link["clickTrackerUrl"]).path
    for host in ("[::1]:8001", "[0:0:0:0:0:0:0:1]", "[0:0::1]:8001", "[0000::0001]"):
        resp = await edge.get(f"http://{host}/{link['linkId']}")
        assert resp.status_code == 302, host
        assert resp.headers["location"] == link["clickTrackerUrl"]
        assert (await edge.head(f"http://{host}{tracker_path}")).status_code == 302, host
    assert (await edge.get(f"http://[::2]:8001/{link['linkId']}")).status_code == 404


async def test_whitespace_around_the_host_header_is_not_part_of_the_host(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge
) -> None:
    """HTTP allows blanks after a header's value, which are not part of it (RFC 9112 §5); uvicorn's
    httptools parser strips those before it, not after: "Host: sms.example.com " was another
    host, 404 on both hops (found by review)."""
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    tracker_path = urlsplit(link["clickTrackerUrl"]).path
    for host in ("sms.example.com ", "sms.example.com:443\t", " SMS.example.com \t "):
        resp = await edge.get(f"https://sms.example.com/{link['linkId']}", headers={"host": host})
        assert resp.status_code == 302, repr(host)
        assert resp.headers["location"] == link["clickTrackerUrl"]
        ct_host = host.replace("SMS.example.com", "ct.localhost").replace("sms.example.com", "ct.localhost")
        assert (await edge.head(f"http://ct.localhost:8001{tracker_path}", headers={"host": ct_host})).status_code == 302
    assert (await edge.get(f"https://sms.example.com/{link['linkId']}", headers={"host": "sms.example.com x"})).status_code == 404


async def test_the_punctuation_ending_a_sentence_is_no_part_of_the_code(
    api: httpx.AsyncClient, tenant: Tenant, edge: Edge, db: asyncpg.Pool
) -> None:
    """"Deal ends tonight: sms.example.com/Ab3kX9." A phone's linkifier, or a user copying the URL,
    may take the full stop (or a closing bracket, a comma, a quote) into it: that tap was a 404,
    a click lost. No code holds any of it; a link's code and a message's both redirect."""
    _, link = await offer_and_link(api, tenant, "https://lp.example/land")
    for tail in (".", ",", ")", ").", "!", ";", ":", "]", "'", '"', "*", "…", "”", "’", ").\u201d", "%2E"):
        resp = await edge.get(link["shortUrl"] + tail + "?sub1=a")
        assert (resp.status_code, resp.headers.get("location")) == (302, link["clickTrackerUrl"] + "?sub1=a"), tail
    sent = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": "+14155550177", "list_id": tenant.list_id, "body": f"Go {link['shortUrl']}."})
    body = await db.fetchval("SELECT body FROM messages WHERE id = $1", sent.json()["message_id"])
    code_url = body.removeprefix("Go ").removesuffix(".")
    resp = await edge.get(code_url + ").")
    assert resp.status_code == 302 and "sid=" + sent.json()["message_id"] in resp.headers["location"]
    # Only that: other characters, a code too short, and two slashes are still no link.
    for tail in ("-", "_", "x", "//", "(", ".x"):
        assert (await edge.get(link["shortUrl"] + tail)).status_code == 404, tail
    assert (await edge.get(link["shortUrl"][:-1] + ".")).status_code == 404
