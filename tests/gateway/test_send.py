"""POST /send and /send/bulk: validation codes, short-URL rewriting, {{sendId}}, message detail."""
import asyncio
import time
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest

from services.gateway.sending import MAX_BODY_CHARS, _overlapped, insert_messages, parse_send, resolve, short_urls
from shared import ids
from shared.edge import short_key
from tests.gateway.test_api_basics import assert_error
from tests.helpers import add_list, make_link, make_offer, make_tenant, random_phone, table_reads


async def send(api, tenant, **body):
    return await api.post("/api/v2/send", headers=tenant.headers, json={"to": "+14155551234", "list_id": tenant.list_id, "body": "hi", **body})


async def test_send_by_list_number_and_detail(api, tenant):
    resp = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": "+14155551234", "list_number": tenant.list_phone, "body": "Hello!", "creative_id": "c1"})
    assert resp.status_code == 201
    body = resp.json()
    assert body["success"] is True and body["status"] == "queued" and len(body["message_id"]) == 8 and body["message_id"].isalnum()
    msg = (await api.get(f"/api/v2/messages/{body['message_id']}", headers=tenant.headers)).json()
    assert msg["to"] == "+14155551234" and msg["list_id"] == tenant.list_id and msg["body"] == "Hello!"
    assert msg["status"] == "queued" and msg["sent_at"].endswith("Z") and msg["offer_id"] is None
    assert (msg["clicked"], msg["first_clicked_at"], msg["click_count"], msg["conversions"], msg["revenue"]) == (False, None, 0, 0, 0)


@pytest.mark.parametrize("body, status, code", [
    ({"to": "+1invalid"}, 400, "invalid_phone"),
    ({"to": None}, 400, "invalid_phone"),
    ({"list_id": None}, 400, "missing_list_identifier"),
    ({"list_id": "", "list_number": " "}, 400, "missing_list_identifier"),
    ({"list_id": None, "list_number": "123"}, 400, "invalid_phone"),
    ({"list_id": 987654321}, 404, "list_not_found"),
    ({"list_id": "abc"}, 404, "list_not_found"),
    ({"list_id": -1}, 404, "list_not_found"),
    ({"list_id": 2**70}, 404, "list_not_found"),
    ({"list_id": True}, 400, "validation_error"),  # a malformed field, not an unknown list
    ({"list_id": 1.0}, 400, "validation_error"),
    ({"list_id": [1]}, 400, "validation_error"),
    ({"offer_id": True}, 400, "validation_error"),  # never dropped in silence
    ({"creative_id": False}, 400, "validation_error"),
    ({"schedule_id": True}, 400, "validation_error"),
    ({"creative_id": 1.5}, 400, "validation_error"),
    ({"body": ""}, 400, "validation_error"),
    ({"body": 5}, 400, "validation_error"),
    ({"offer_id": "nope"}, 404, "offer_not_found"),
])
async def test_send_errors(api, tenant, body, status, code):
    assert_error(await send(api, tenant, **body), status, code)


async def test_a_blank_list_id_is_no_list_id(api, tenant):
    # As for /links: the list is the one the other field names.
    resp = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": "+14155551234", "list_id": "", "list_number": tenant.list_phone, "body": "Hi"})
    assert resp.status_code == 201, resp.text
    msg = (await api.get(f"/api/v2/messages/{resp.json()['message_id']}", headers=tenant.headers)).json()
    assert msg["list_id"] == tenant.list_id


@pytest.mark.parametrize("macro", ["{{sendId}}", "{{ sendId }}", "{{sendid}}", "{{SENDID}}", "{{\tSendId  }}"])
async def test_send_id_in_a_body_is_read_as_in_a_destination(api, tenant, macro):
    # Any case, blanks inside the braces (as shared.macros reads {{sendId}} in a destination);
    # a lookalike with a non-ASCII letter, or single braces, is left as written.
    resp = await send(api, tenant, body=f"Ref {macro} and {{{{send\u0131d}}}} {{sendId}} reply STOP")
    assert resp.status_code == 201, resp.text
    mid = resp.json()["message_id"]
    body = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()["body"]
    assert body == f"Ref {mid} and {{{{send\u0131d}}}} {{sendId}} reply STOP"


def test_a_batch_of_many_links_is_not_looked_for_link_by_link_in_every_body():
    # A bulk send with a link per recipient names 1000 links: looking for each in every body cost
    # links x length (a second for 1000 bodies of 4800 characters). Counted, not timed.
    class Counted(dict):
        looked = 0

        def __iter__(self):
            for key in super().__iter__():
                Counted.looked += 1
                yield key

    wanted = Counted((f"L{i:05d}", None) for i in range(1000))
    body = "Hi, deal https://sms.example.com/L00500 " + "word " * 1000
    assert [m[3] for m in short_urls(body, wanted)] == ["L00500"]
    assert Counted.looked == 0
    few = Counted((f"L{i:05d}", None) for i in range(3))  # a few: looked for one by one (cheapest)
    assert list(short_urls("no link here", few)) == [] and Counted.looked == 3


async def test_inactive_list_is_not_found(api, db, tenant):
    inactive = await add_list(db, tenant, active=False)
    assert_error(await send(api, tenant, list_id=inactive["list_id"]), 404, "list_not_found")


async def test_short_urls_are_rewritten_per_message(api, tenant, redis):
    offer = await make_offer(api, tenant)
    other_offer = await make_offer(api, tenant)
    link = await make_link(api, tenant, offer["id"])
    link2 = await make_link(api, tenant, other_offer["id"])
    text = (f"A {link['shortUrl']}?sub1=x and again {link['shortUrl']}. B {link2['shortUrl']} "
            f"foreign https://other.example.com/{link['linkId']} id={{{{sendId}}}}")
    mids = []
    for _ in range(2):
        resp = await send(api, tenant, body=text)
        mids.append(resp.json()["message_id"])
    bodies = [(await api.get(f"/api/v2/messages/{m}", headers=tenant.headers)).json() for m in mids]
    for mid, msg in zip(mids, bodies):
        b = msg["body"]
        assert f"https://sms.example.com/{link['linkId']}" not in b
        assert f"https://other.example.com/{link['linkId']}" in b  # another domain is not ours: untouched
        assert f"id={mid}" in b and "{{sendId}}" not in b
        assert msg["offer_id"] == offer["id"]  # the first short link's offer
        codes = [w.split("/")[-1].split("?")[0].rstrip(".") for w in b.split() if w.startswith("https://sms.example.com/")]
        assert len(codes) == 3 and codes[0] == codes[1] != codes[2]  # one code per (message, link)
        assert "?sub1=x" in b
        entry = orjson.loads(await redis.get(short_key("sms.example.com", codes[0])))
        assert entry == {"k": link["linkId"], "m": mid}  # the link's own entry has its tracker and offer
        entry2 = orjson.loads(await redis.get(short_key("sms.example.com", codes[2])))
        assert entry2 == {"k": link2["linkId"], "m": mid}
    assert bodies[0]["body"] != bodies[1]["body"]


async def test_short_urls_without_scheme_are_rewritten(api, tenant, redis):
    link = await make_link(api, tenant, (await make_offer(api, tenant))["id"])
    bare = f"sms.example.com/{link['linkId']}"
    text = f"Deal: {bare} or SMS.Example.com/{link['linkId']}?sub1=a, not xsms.example.com/{link['linkId']}"
    mid = (await send(api, tenant, body=text)).json()["message_id"]
    body = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()["body"]
    words = body.split()
    assert words[1].startswith("sms.example.com/") and words[1] != bare
    assert words[3].startswith("SMS.Example.com/") and words[3].endswith("?sub1=a,")
    code = words[1].split("/")[1]
    assert words[3].split("/")[1].split("?")[0] == code  # one code per (message, link)
    assert f"xsms.example.com/{link['linkId']}" in body  # another host: untouched
    # A scheme glued to the word before it is still a URL.
    glued = (await send(api, tenant, body=f"Click{link['shortUrl']} now")).json()["message_id"]
    glued_body = (await api.get(f"/api/v2/messages/{glued}", headers=tenant.headers)).json()["body"]
    assert glued_body.startswith("Clickhttps://sms.example.com/") and link["shortUrl"] not in glued_body
    assert orjson.loads(await redis.get(short_key("sms.example.com", code)))["m"] == mid


async def test_a_short_url_after_an_ellipsis_is_rewritten(api, tenant):
    # SMS copy glues a URL to "..." to save a character; no hostname holds "..", so the host starts
    # after it. A hyphen may be in a hostname: "deal--sms.example.com" is another host, untouched.
    link = await make_link(api, tenant, (await make_offer(api, tenant))["id"])
    text = f"Ends tonight...sms.example.com/{link['linkId']} or deal--sms.example.com/{link['linkId']}"
    mid = (await send(api, tenant, body=text)).json()["message_id"]
    body = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()["body"]
    assert body.startswith("Ends tonight...sms.example.com/") and f"tonight...sms.example.com/{link['linkId']}" not in body
    assert body.endswith(f" or deal--sms.example.com/{link['linkId']}")


async def test_given_offer_wins_and_accepts_external_id(api, tenant):
    offer = await make_offer(api, tenant)
    chosen = await make_offer(api, tenant, external_id="E-1")
    link = await make_link(api, tenant, offer["id"])
    mid = (await send(api, tenant, body=f"go {link['shortUrl']}", offer_id="E-1")).json()["message_id"]
    assert (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()["offer_id"] == chosen["id"]


async def test_bulk_partial_success(api, tenant, db):
    messages = [
        {"to": "+14155550101", "list_id": tenant.list_id, "body": "one"},
        {"to": "+1invalid", "list_id": tenant.list_id, "body": "bad"},
        {"to": "+14155550102", "list_number": tenant.list_phone, "body": "two"},
        {"to": "+14155550103", "list_id": 987654321, "body": "no list"},
        "not an object",
    ]
    resp = await api.post("/api/v2/send/bulk", headers=tenant.headers, json={"messages": messages})
    assert resp.status_code == 200
    body = resp.json()
    assert body["queued_count"] == 2 and body["error_count"] == 3
    assert [(e["index"], e["code"]) for e in body["errors"]] == [(1, "invalid_phone"), (3, "list_not_found"), (4, "validation_error")]
    assert body["errors"][0]["to"] == "+1invalid"
    assert [(m["index"], m["to"]) for m in body["messages"]] == [(0, "+14155550101"), (2, "+14155550102")]
    stored = await db.fetchval("SELECT count(*) FROM messages WHERE account_id = $1", tenant.account_id)
    assert stored == 2


async def test_bulk_limits(api, tenant):
    too_many = [{"to": "+14155550101", "list_id": tenant.list_id, "body": "x"}] * 1001
    assert_error(await api.post("/api/v2/send/bulk", headers=tenant.headers, json={"messages": too_many}), 413, "too_many_records")
    assert_error(await api.post("/api/v2/send/bulk", headers=tenant.headers, json={"messages": []}), 400, "validation_error")
    assert_error(await api.post("/api/v2/send/bulk", headers=tenant.headers, json={}), 400, "validation_error")


async def test_bulk_of_1000_with_links(api, tenant, db, redis):
    offer = await make_offer(api, tenant)
    link = await make_link(api, tenant, offer["id"])
    messages = [{"to": f"+1415555{i:04d}", "list_id": tenant.list_id, "body": f"deal {link['shortUrl']} {{{{sendId}}}}"} for i in range(1000)]
    body = (await api.post("/api/v2/send/bulk", headers=tenant.headers, json={"messages": messages})).json()
    assert body["queued_count"] == 1000 and body["error_count"] == 0
    assert len({m["message_id"] for m in body["messages"]}) == 1000
    codes = {r["message_id"]: r["code"] for r in await db.fetch(
        "SELECT ml.code, ml.message_id FROM message_links ml JOIN messages m ON m.id = ml.message_id WHERE m.account_id = $1",
        tenant.account_id)}
    assert len(codes) == 1000 and len(set(codes.values())) == 1000
    for row in await db.fetch("SELECT id, body FROM messages WHERE account_id = $1", tenant.account_id):
        # One body cut once, filled per message: its own code and id in each.
        assert row["body"] == f"deal https://sms.example.com/{codes[row['id']]} {row['id']}"
    sample = next(iter(codes))
    assert orjson.loads(await redis.get(short_key("sms.example.com", codes[sample])))["m"] == sample
    assert await db.fetchval("SELECT count(*) FROM contacts WHERE list_id = $1", tenant.list_id) == 1000


async def test_message_not_found(api, tenant):
    assert_error(await api.get("/api/v2/messages/AAAAAAAA", headers=tenant.headers), 404, "message_not_found")
    assert_error(await api.get("/api/v2/messages/bad", headers=tenant.headers), 404, "message_not_found")


async def test_a_colliding_code_never_overwrites_another_messages_code_at_the_edge(api, db, redis, tenant, monkeypatch):
    """A fresh code (or message id) that is already taken fails on its primary key before
    anything is published: the send is retried with fresh ones, the other message keeps its code."""
    link = await make_link(api, tenant, (await make_offer(api, tenant))["id"])
    first = (await send(api, tenant, body=f"A {link['shortUrl']}")).json()["message_id"]
    taken = await db.fetchval("SELECT code FROM message_links WHERE message_id = $1", first)
    published = await redis.get(short_key("sms.example.com", taken))
    other = await make_tenant(db)  # another account on the same short domain
    other_link = await make_link(api, other, (await make_offer(api, other))["id"])
    real_codes, real_ids = ids.message_link_codes, ids.message_ids
    codes, message_ids = iter([[taken]]), iter([[first]])
    monkeypatch.setattr(ids, "message_link_codes", lambda n: next(codes, None) or real_codes(n))
    resp = await send(api, other, body=f"B {other_link['shortUrl']}")
    assert resp.status_code == 201, resp.text
    monkeypatch.setattr(ids, "message_ids", lambda n: next(message_ids, None) or real_ids(n))
    resp2 = await send(api, other, body=f"C {other_link['shortUrl']}")
    assert resp2.status_code == 201, resp2.text
    assert first not in (resp.json()["message_id"], resp2.json()["message_id"])
    assert await redis.get(short_key("sms.example.com", taken)) == published


@pytest.mark.parametrize("body", [
    "Deal https://sms.example.com/Ab3kX9 {{sendId}}",
    "A https://sms.example.com/Ab3kX9?sub1=x and again https://sms.example.com/Ab3kX9. B sms.example.com/Zz9Yy8",
    "foreign https://other.example.com/Ab3kX9 glued{{sendId}}https://sms.example.com/Ab3kX9{{sendId}}",
    "Clickhttps://SMS.Example.com/Zz9Yy8 xsms.example.com/Ab3kX9 sms.example.com/Ab3kX9x {{sendId}}{{sendId}}",
    "pasted https://sms.example.com/Pq7Rs8t and its link sms.example.com/Ab3kX9 {{sendId}}",
    "no links at all",
    "",
])
def test_a_repeated_body_is_filled_exactly_as_the_first_time(body):
    """A bulk send cuts each distinct body once and fills the cut for each message: every fill
    gives the same message for the same codes, with the message id in place of {{sendId}}."""
    from services.gateway import sending

    links = {"Ab3kX9": {"id": "Ab3kX9", "domain_host": "sms.example.com", "offer_id": "o1"},
             "Zz9Yy8": {"id": "Zz9Yy8", "domain_host": "sms.example.com", "offer_id": "o2"},
             "Pq7Rs8t": {"id": "Ab3kX9", "domain_host": "sms.example.com", "offer_id": "o1"}}  # a message's code
    cut = sending.cut_bodies([body, body], links)[body]  # type: ignore[arg-type]
    outcomes = []
    for _ in range(3):
        record = sending.SendRecord(index=0, to="+14155551234", list_id=1, list_number=None, body=body,
                                    offer_ref=None, creative_id=None, schedule_id=None, message_id="Mid12345")
        sending._fill(record, links, cut, ["c000001", "c000002", "c000003"][: len(cut.links)])  # type: ignore[arg-type]
        outcomes.append((record.final_body, record.codes, record.offer_id))
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert "{{sendId}}" not in outcomes[0][0] and (body.count("{{sendId}}") == 0 or "Mid12345" in outcomes[0][0])


async def test_a_body_that_rewriting_would_take_past_the_limit_is_refused(api, tenant):
    # Each rewritten link takes one more character: a body of 10,000 with a link was stored as
    # 10,001 (and refused when sent again as read back).
    link = await make_link(api, tenant, (await make_offer(api, tenant))["id"])
    head = f"Deal {link['shortUrl']} "
    over = await send(api, tenant, body=head + "x" * (MAX_BODY_CHARS - len(head)))
    assert_error(over, 400, "validation_error")
    assert "once its short links are rewritten" in over.json()["error"]
    fits = await send(api, tenant, body=head + "x" * (MAX_BODY_CHARS - len(head) - 1))
    assert fits.status_code == 201, fits.text
    stored = (await api.get(f"/api/v2/messages/{fits.json()['message_id']}", headers=tenant.headers)).json()["body"]
    assert len(stored) == MAX_BODY_CHARS
    assert (await send(api, tenant, body="x" * MAX_BODY_CHARS)).status_code == 201  # no link: the whole limit


def test_a_pasted_per_message_url_stands_for_its_link():
    from services.gateway import sending

    links = {"Ab3kX9": {"id": "Ab3kX9", "domain_host": "sms.example.com", "offer_id": "o1"},
             "Pq7Rs8t": {"id": "Ab3kX9", "domain_host": "sms.example.com", "offer_id": "o1"}}
    body = "A https://sms.example.com/Pq7Rs8t. B sms.example.com/Ab3kX9 C sms.example.com/Pq7Rs8tx"
    cut = sending.cut_bodies([body], links)[body]  # type: ignore[arg-type]
    assert cut.links == ("Ab3kX9",) and cut.first_offer == "o1"
    record = sending.SendRecord(index=0, to="+14155551234", list_id=1, list_number=None, body=body,
                                offer_ref=None, creative_id=None, schedule_id=None, message_id="Mid12345")
    sending._fill(record, links, cut, ["New0001"])  # type: ignore[arg-type]
    assert record.final_body == "A https://sms.example.com/New0001. B sms.example.com/New0001 C sms.example.com/Pq7Rs8tx"
    assert record.codes == [("sms.example.com", "New0001", "Ab3kX9")]


# What random bodies are made of: every part of a short URL with its near misses, and characters
# that a case-insensitive or Unicode-aware pattern would take for ASCII letters or digits.
_SCHEMES = ["", "", "http://", "https://", "HTTPS://", "hTtP://", "htp://", "https:/", "://", "//", "xhttps://"]
_HOSTS = ["", "sms.example.com", "SMS.Example.com", "x", "a-b.c", ".", "\u017fms.com", "\u212a", "@x", "/x", "8",
          "...sms.example.com", "a..b", "-x", "x.", "..", "x..-y"]
_PORTS = ["", "", "", ":80", ":", ":8080", ":\u0661\u0662", "::80"]
_IDS = ["Ab3kX9", "Ab3kX9", "Zz9Yy8", "Qq1Ww2", "Ab3kX9x", "Ab3kX", "Ab3k\u0131X", ""]
_OTHER = [" ", "", "", "?", ".", "-", "@", ":", "/", "x", "7", "\u00e9", "\n", "{{sendId}}", "\u0131", "\u017f", "..", "..."]


def _random_body(rng) -> str:
    parts = []
    for _ in range(rng.randint(0, 5)):
        parts += [rng.choice(_OTHER), rng.choice(_SCHEMES), rng.choice(_HOSTS), rng.choice(_PORTS)]
        parts += ["/" if rng.random() < 0.9 else "", rng.choice(_IDS), rng.choice(_OTHER)]
    return "".join(parts)


def test_short_urls_finds_exactly_what_the_pattern_matches():
    """``short_urls`` (found from each link id back) against SHORT_URL_RE's own left-to-right scan,
    on 30k random bodies built from URL parts, for the account's link ids only."""
    import random

    from services.gateway.sending import SHORT_URL_RE, short_urls

    rng = random.Random(20261123)
    wanted = {"Ab3kX9", "Zz9Yy8", "Ab3kX9x"}  # two link ids and a per-message code
    found, schemes, ports = 0, 0, 0
    for _ in range(30_000):
        body = _random_body(rng)
        expected = [(m.start(), m.start(3) - 1, m.group(2), m.group(3))
                    for m in SHORT_URL_RE.finditer(body) if m.group(3) in wanted]
        assert list(short_urls(body, wanted)) == expected, body
        found += len(expected)
        schemes += sum(body[start] in "hH" and ":" not in host for start, _, host, _ in expected)
        ports += sum(":" in host for _, _, host, _ in expected)
    # The bodies held short URLs of every form: with and without a scheme, with a port.
    assert found > 10_000 and schemes > 1_000 and ports > 1_000, (found, schemes, ports)


async def test_a_committed_send_is_acknowledged_even_if_its_connection_cannot_be_reset(api, db, tenant, gateway_app, settings):
    """PostgreSQL dying just after a send's commit broke the connection's reset on release: the
    committed message was answered 500 (a black-box audit), and a retry would have sent it twice."""
    from shared import db as shared_db
    from tests.shared.test_db_release import _unresettable

    failing = await shared_db.create_pool(settings.database_url, max_size=2, reset=_unresettable)
    pool, gateway_app.state.db = gateway_app.state.db, failing
    try:
        resp = await api.post("/api/v2/send", headers=tenant.headers,
                              json={"to": "+14155550188", "list_id": tenant.list_id, "body": "hi"})
        bulk = await api.post("/api/v2/send/bulk", headers=tenant.headers, json={"messages": [
            {"to": "+14155550189", "list_id": tenant.list_id, "body": "hi"}]})
    finally:
        gateway_app.state.db = pool
        await shared_db.close_pool(failing)
    assert resp.status_code == 201, resp.text
    assert bulk.status_code == 200 and bulk.json()["queued_count"] == 1, bulk.text
    sent = [resp.json()["message_id"], bulk.json()["messages"][0]["message_id"]]
    assert await db.fetchval("SELECT count(*) FROM messages WHERE id = ANY($1::text[])", sent) == 2


async def test_a_send_that_races_another_for_a_new_contact_is_stored_once(api, db, tenant, settings):
    """Another transaction inserts the recipient's contact, not yet committed, while the send runs:
    the send's insert waits for it, fails on the contact's key once it commits, and goes again."""
    phone = random_phone()
    other = await asyncpg.connect(settings.database_url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("INSERT INTO contacts (account_id, list_id, phone_number) VALUES ($1, $2, $3)",
                            tenant.account_id, tenant.list_id, phone)
        send = asyncio.create_task(api.post("/api/v2/send", headers=tenant.headers,
                                            json={"to": phone, "list_id": tenant.list_id, "body": "hi"}))
        await asyncio.sleep(0.3)
        assert not send.done()
        await tx.commit()
        resp = await send
    finally:
        await other.close()
    assert resp.status_code == 201, resp.text
    assert await db.fetchval("SELECT count(*) FROM messages WHERE account_id = $1 AND to_phone = $2", tenant.account_id, phone) == 1
    lists = (await api.get("/api/v2/lists", headers=tenant.headers)).json()["lists"]
    assert [lst["contact_count"] for lst in lists if lst["id"] == tenant.list_id] == [1]


async def test_a_send_probes_each_recipient_by_key_whatever_the_number_of_contacts(db, redis, tenant):
    """A bulk send looks up whether each recipient is a contact already by its key: as an
    anti-join, the planner read every contact of every account per send until the table held a
    few hundred thousand. 6000 contacts with fresh statistics, a send of 1000 of which half are
    new: no scan of contacts, and exactly the new ones added."""
    known = [f"+1415{i:07d}" for i in range(6000)]
    async with db.acquire() as conn:
        await conn.copy_records_to_table("contacts", columns=("account_id", "list_id", "phone_number"),
                                         records=[(tenant.account_id, tenant.list_id, p) for p in known])
        await conn.execute("ANALYZE contacts")
        records = [parse_send(i, {"to": known[i] if i % 2 else f"+1628{i:07d}", "list_id": tenant.list_id, "body": "hi"})
                   for i in range(1000)]
        resolved = await resolve(conn, tenant.account_id, records)
        assert len(resolved.good) == 1000
        _, reads = await table_reads(
            conn, lambda: insert_messages(conn, redis, tenant.account_id, resolved.good, resolved.links), "contacts")
        assert reads["contacts"][0] == 0
        assert await conn.fetchval("SELECT count(*) FROM contacts WHERE list_id = $1", tenant.list_id) == 6500


async def test_concurrent_sends_to_the_same_new_recipients_both_succeed(db, redis, settings, tenant):
    """A send that meets contacts another send is inserting waits for it, fails on contacts_pkey
    once that commits, and goes again skipping them: both sends stored, each contact once."""
    phones = [random_phone() for _ in range(5)]
    first, second = await asyncpg.connect(settings.database_url), await asyncpg.connect(settings.database_url)

    async def send_all(conn: asyncpg.Connection) -> None:
        records = [parse_send(i, {"to": p, "list_id": tenant.list_id, "body": "hi"}) for i, p in enumerate(phones)]
        resolved = await resolve(conn, tenant.account_id, records)
        await insert_messages(conn, redis, tenant.account_id, resolved.good, resolved.links)

    try:
        held = first.transaction()
        await held.start()
        await send_all(first)
        waiting = asyncio.create_task(send_all(second))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # on the first send's uncommitted contacts
        await held.commit()
        await waiting
    finally:
        await first.close()
        await second.close()
    assert await db.fetchval("SELECT count(*) FROM messages WHERE to_phone = ANY($1::text[])", phones) == 10
    assert await db.fetchval(
        "SELECT count(*) FROM contacts WHERE list_id = $1 AND phone_number = ANY($2::text[])", tenant.list_id, phones) == 5


async def test_the_contacts_statement_runs_in_postgresql_while_the_bodies_are_cut(db):
    """``_overlapped`` puts the statement on the wire before ``work`` holds the event loop: the
    server starts it before ``work`` ends (sent only after, it could not start before)."""
    async with db.acquire() as conn:
        await conn.execute("CREATE TEMP TABLE overlap_probe (started timestamptz)")
        # With an argument, as the contacts statement: asyncpg prepares it once and then sends it
        # at once from its statement cache (a statement without arguments would skip that path).
        statement = "INSERT INTO overlap_probe SELECT statement_timestamp() FROM pg_sleep($1)"
        await conn.execute(statement, 0.05)
        await conn.execute("TRUNCATE overlap_probe")
        ended = []

        def work() -> str:
            time.sleep(0.2)  # CPU held, as cutting a thousand bodies holds it
            ended.append(datetime.now(UTC))
            return "cut"

        assert await _overlapped(conn.execute(statement, 0.05), work) == "cut"
        started = await conn.fetchval("SELECT started FROM overlap_probe")
        assert started < ended[0]
        await conn.execute("DROP TABLE overlap_probe")


async def test_overlapped_raises_the_statements_error_and_waits_for_it_when_work_fails(db):
    async with db.acquire() as conn:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await _overlapped(conn.execute("SELECT 1 / 0"), lambda: "cut")

        def failing_work() -> str:
            raise ValueError("a bug in the cutting")

        with pytest.raises(ValueError, match="a bug"):
            await _overlapped(conn.execute("SELECT pg_sleep(0.05)"), failing_work)
        # The statement was waited for: the connection takes the next one at once.
        assert await conn.fetchval("SELECT 2") == 2
