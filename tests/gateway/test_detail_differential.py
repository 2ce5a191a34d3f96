"""Differential test of message detail, the contact journey and the report by message, against a
model kept by the test itself (what it sent, clicked and posted), not the tables the endpoints read.

Two accounts share their recipients' phone numbers; messages carry one, two or no short links
(and ``{{sendId}}``), some are never clicked; clicks go through the real redirect (humans, bots,
HEAD) and ``/history/clicks``; postbacks (several conversion ids per click, status moves, restated
payouts, currencies, message ids for click ids, another account's click ids) are processed by a
real burst worker; revenue comes from ``/revenue`` and ``/history/revenue`` of every attribution
type. Each message's detail, each contact's journey (asked for with its phone in several forms)
and the rows of ``group_by=message`` must be what CONTRACT.md §3 "Metrics" makes of the model.

Seeds: ``TRACKLY_DETAIL_SEEDS`` (comma-separated) or the defaults below."""
from __future__ import annotations

import decimal
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from services.worker import attribution
from shared import ids
from tests.helpers import Tenant, make_link, make_offer, make_tenant
from tests.redirect.conftest import drain, running_edge
from tests.worker.conftest import burst_worker

SEEDS = [int(s) for s in os.environ.get("TRACKLY_DETAIL_SEEDS", "1,2").split(",") if s.strip()]
BOT_UA = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
RANK = {"pending": 0, "approved": 1, "rejected": 1, "reversed": 2}
DEST = "https://shop.example.com/?cid={click_id}&msg={{sendId}}"


def loads(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Click:
    id: str
    message: str | None
    offer: str
    bot: bool
    at: datetime | None = None  # the edge's time, read back by id


@dataclass
class Msg:
    id: str
    phone: str
    list_id: int
    offer: str | None
    body: str | None = None
    sent_at: datetime | None = None
    link_offer: str | None = None  # its first short link's offer, in body order
    clicks: list[Click] = field(default_factory=list)


@dataclass
class Conv:
    ref: str | None
    at: datetime
    posts: list[tuple[str, Decimal | None]] = field(default_factory=list)


@dataclass
class Account:
    tenant: Tenant
    offers: dict[str, dict[str, Any]] = field(default_factory=dict)  # internal id -> offer
    messages: dict[str, Msg] = field(default_factory=dict)
    clicks: dict[str, Click] = field(default_factory=dict)
    convs: dict[tuple[str, str], Conv] = field(default_factory=dict)
    revenue: list[tuple[str, str, Decimal, datetime, str]] = field(default_factory=list)  # msg, type, amount, at, offer


def first_human(m: Msg) -> Click | None:
    human = [k for k in m.clicks if not k.bot]
    return min(human, key=lambda k: (k.at, k.id)) if human else None


def final_state(posts: list[tuple[str, Decimal | None]]) -> tuple[str, Decimal | None]:
    status, payout = posts[0]
    for new_status, new_payout in posts[1:]:
        new_payout = payout if new_payout is None else new_payout
        if status == "reversed":
            continue
        if new_status == status:
            payout = new_payout
        elif RANK[new_status] >= RANK[status]:
            status, payout = new_status, new_payout
    return status, payout


def credit(acct: Account, conv: Conv) -> tuple[Msg | None, Click | None]:
    """The message and click a conversion is credited to (first-click rules), or (None, None)."""
    if conv.ref is None:
        return None, None
    k = acct.clicks.get(conv.ref)
    if k is None and conv.ref in acct.messages:
        k = first_human(acct.messages[conv.ref])
    if k is None or k.bot:
        return None, None
    window = acct.offers[k.offer]["click_window_days"]
    if conv.at < k.at.replace(microsecond=0) or conv.at > k.at + timedelta(days=window):
        return None, k
    return (acct.messages[k.message] if k.message else None), k


def expected(acct: Account) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, Any]]:
    """Per message its detail's metrics, per phone its journey, and the unattributed group."""
    detail = {mid: {"clicked": False, "first_clicked_at": None, "click_count": 0, "conversions": 0,
                    "revenue": Decimal(0)} for mid in acct.messages}
    journeys: dict[str, dict[str, Any]] = defaultdict(lambda: {"events": [], "conversions": 0,
                                                               "total_revenue": Decimal(0)})
    unattributed = {"conversions": 0, "revenue": Decimal(0)}
    for m in acct.messages.values():
        d = detail[m.id]
        j = journeys[m.phone]
        j["events"].append(("sent", m.sent_at, m.id, m.offer, None))
        d["click_count"] = sum(not k.bot for k in m.clicks)
        first = first_human(m)
        if first is not None:
            d["clicked"], d["first_clicked_at"] = True, first.at
            j["events"].append(("clicked", first.at, m.id, first.offer, None))
    for conv in acct.convs.values():
        status, payout = final_state(conv.posts)
        msg, click = credit(acct, conv)
        if payout is None:  # the credited click's offer's; none when not credited (no offer was named)
            payout = Decimal(acct.offers[click.offer]["payout"] or 0) if msg is not None else Decimal(0)
        worth = payout if status == "approved" else Decimal(0)
        target = detail[msg.id] if msg is not None else unattributed
        target["conversions"] += status == "approved"
        target["revenue"] += worth
        if msg is not None and status == "approved":
            j = journeys[msg.phone]
            j["events"].append(("converted", conv.at, msg.id, click.offer, worth))
            j["conversions"] += 1
            j["total_revenue"] += worth
    for mid, kind, amount, at, offer in acct.revenue:
        m = acct.messages[mid]
        detail[mid]["conversions"] += kind == "sale"
        detail[mid]["revenue"] += amount
        j = journeys[m.phone]
        j["events"].append(("converted", at, mid, offer, amount))
        j["conversions"] += kind == "sale"
        j["total_revenue"] += amount
    return detail, journeys, unattributed


async def build(api, db, redis, settings, rng: random.Random) -> list[Account]:
    now = datetime.now(UTC)
    accts = [Account(await make_tenant(db)), Account(await make_tenant(db))]
    phones = [f"+1415557{rng.randint(0, 9999):04d}" for _ in range(3)]
    for acct in accts:
        t = acct.tenant
        for fields in ({"payout": "5.5"}, {"payout": "2.125", "click_window_days": 7, "currency": "EUR"}, {}):
            o = await make_offer(api, t, destination_url=DEST, **fields)
            acct.offers[o["id"]] = o
        oids = list(acct.offers)
        links = [await make_link(api, t, oid) for oid in oids[:2]]

        # Live sends: no link, one link, both links (either order), {{sendId}}.
        def live() -> dict[str, Any]:
            n = rng.choice([0, 1, 1, 2, 2])
            chosen = rng.sample(links, n)
            body = "Hi {{sendId}} " + " and ".join(
                rng.choice([ln["shortUrl"], ln["shortUrl"].split("://", 1)[1]]) for ln in chosen) + " bye"
            rec: dict[str, Any] = {"to": rng.choice(phones), "list_id": t.list_id, "body": body}
            if rng.random() < 0.25:
                rec["offer_id"] = oids[2]
            return rec

        sends = [live() for _ in range(rng.randint(3, 7))]
        given: dict[str, str | None] = {}  # message id -> the offer_id the send named
        for rec in sends[:2]:
            resp = await api.post("/api/v2/send", headers=t.headers, json=rec)
            assert resp.status_code == 201, resp.text
            given[resp.json()["message_id"]] = rec.get("offer_id")
        resp = await api.post("/api/v2/send/bulk", headers=t.headers, json={"messages": sends[2:]})
        assert resp.json()["error_count"] == 0, resp.text
        for item in resp.json()["messages"]:
            given[item["message_id"]] = sends[2 + item["index"]].get("offer_id")
        for r in await db.fetch("SELECT id, to_phone, list_id, offer_id, body, sent_at FROM messages WHERE account_id = $1",
                                t.account_id):
            assert r["body"].startswith(f"Hi {r['id']} ") and not any(ln["shortUrl"] in r["body"] for ln in links)
            # (offer_id checked below, once the message's codes are read)
            acct.messages[r["id"]] = Msg(r["id"], r["to_phone"], r["list_id"], given[r["id"]], r["body"], r["sent_at"])
        # History sends, days back.
        old = []
        for _ in range(rng.randint(3, 5)):
            mid = ids.message_id()
            at = now - timedelta(days=rng.randint(10, 40), seconds=rng.randint(0, 86399), microseconds=rng.randint(0, 999999))
            offer = rng.choice(oids)
            old.append({"message_id": mid, "to": rng.choice(phones), "list_id": t.list_id, "offer_id": offer,
                        "body": "old", "timestamp": iso(at)})
            acct.messages[mid] = Msg(mid, old[-1]["to"], t.list_id, offer, "old", at)
        resp = await api.post("/api/v2/history/sends", headers=t.headers, json={"records": old})
        assert resp.json()["success_count"] == len(old), resp.text

    # The message's offer when none was given: its first short link's, in body order.
    for acct in accts:
        for m in acct.messages.values():
            if m.body == "old":
                continue
            codes = await db.fetch("SELECT ml.code, l.offer_id FROM message_links ml JOIN links l ON l.id = ml.link_id"
                                   " WHERE ml.message_id = $1", m.id)
            found = sorted((m.body.find("/" + c["code"]), c["offer_id"]) for c in codes)
            m.offer = m.offer or (found[0][1] if found else None)
            m.link_offer = found[0][1] if found else None

    # Clicks through the redirect: every per-message URL, humans (1-3 times), bots, HEAD.
    await drain(db, redis)
    async with running_edge(settings) as e:
        for acct in accts:
            for m in list(acct.messages.values()):
                if m.body == "old":
                    continue
                codes = await db.fetch("SELECT ml.code, l.offer_id, l.domain_host FROM message_links ml"
                                       " JOIN links l ON l.id = ml.link_id WHERE ml.message_id = $1", m.id)
                for c in codes:
                    url = f"https://{c['domain_host']}/{c['code']}"
                    if rng.random() < 0.3:
                        continue  # never clicked
                    if rng.random() < 0.4:
                        first = await e.head(url)
                        assert first.status_code == 302
                        assert (await e.head(first.headers["location"])).status_code == 302
                    for _ in range(rng.choice([0, 1, 1, 2, 3])):
                        bot = rng.random() < 0.3
                        loc = await e.click(url, headers={"user-agent": BOT_UA} if bot else {})
                        q = parse_qs(urlsplit(loc).query)
                        assert q["msg"] == [m.id], loc
                        k = Click(q["cid"][0], m.id, c["offer_id"], bot)
                        m.clicks.append(k)
                        acct.clicks[k.id] = k
    await drain(db, redis)
    for acct in accts:
        rows = await db.fetch("SELECT id, clicked_at, is_bot FROM clicks WHERE id = ANY($1::text[])", list(acct.clicks))
        assert len(rows) == len(acct.clicks)
        for r in rows:
            acct.clicks[r["id"]].at = r["clicked_at"]
            assert r["is_bot"] == acct.clicks[r["id"]].bot

    # History clicks on most old messages (one per message), some on an offer with a 7-day window.
    for acct in accts:
        t = acct.tenant
        records = []
        for m in acct.messages.values():
            if m.body != "old" or rng.random() < 0.25:
                continue
            offer = rng.choice(list(acct.offers))
            at = m.sent_at + timedelta(hours=rng.randint(1, 48), microseconds=rng.randint(0, 999999))
            records.append({"message_id": m.id, "offer_id": offer, "phone_number": m.phone, "timestamp": iso(at)})
        if records:
            resp = await api.post("/api/v2/history/clicks", headers=t.headers, json={"records": records})
            assert resp.json()["success_count"] == len(records), resp.text
            for r in await db.fetch("SELECT id, message_id, offer_id, clicked_at FROM clicks WHERE account_id = $1"
                                    " AND message_id = ANY($2::text[])", t.account_id, [r["message_id"] for r in records]):
                k = Click(r["id"], r["message_id"], r["offer_id"], False, r["clicked_at"])
                acct.messages[k.message].clicks.append(k)
                acct.clicks[k.id] = k

    # Postbacks: several conversions per click, by click id or message id, status moves.
    seq = 0
    for acct, other in (accts, accts[::-1]):
        t = acct.tenant
        refs: list[tuple[str, datetime]] = [(k.id, k.at) for k in acct.clicks.values()]
        refs += [(m.id, first.at if (first := first_human(m)) else m.sent_at) for m in acct.messages.values()]
        refs += [(k.id, k.at) for k in rng.sample(list(other.clicks.values()), min(2, len(other.clicks)))]  # foreign
        plans = []
        for ref, at in refs:
            for _ in range(rng.choice([0, 1, 1, 2])):
                seq += 1
                shift = rng.choice([timedelta(seconds=rng.randint(0, 3 * 86400)), timedelta(seconds=rng.randint(0, 600)),
                                    -timedelta(hours=1), timedelta(days=8)])
                conv_at = (at + shift).replace(microsecond=0)
                amount = lambda: Decimal(rng.randint(0, 5000)) / 100  # noqa: E731
                moves = rng.choice([
                    [("approved", amount())], [("approved", None)], [("pending", amount()), ("approved", None)],
                    [("approved", amount()), ("reversed", None)], [("approved", amount()), ("approved", amount())],
                    [("pending", None), ("rejected", None), ("approved", amount())],
                    [("approved", amount()), ("pending", amount())], [("rejected", amount())],
                    [("approved", amount()), ("rejected", None), ("approved", None)],
                ])
                network = rng.choice(["tune", "everflow"])
                plans.append((network, f"c{seq}", ref, conv_at, moves))
        for rnd in range(3):
            for network, key, ref, conv_at, moves in plans:
                if rnd >= len(moves):
                    continue
                status, payout = moves[rnd]
                params = {"conversion_id": key, "network": network, "click_id": ref, "status": status,
                          "timestamp": rng.choice([iso(conv_at), str(int(conv_at.timestamp()))])}
                if payout is not None:
                    params["payout"] = str(payout)
                    if rng.random() < 0.2:
                        params["currency"] = rng.choice(["USD", "EUR"])
                resp = await api.get(f"/postback/{t.postback_token}", params=params)
                assert resp.status_code == 200, resp.text
                if resp.json()["status"] == "accepted":
                    acct.convs.setdefault((network, key), Conv(ref, conv_at)).posts.append((status, payout))
            await burst_worker(settings)

    # Postbacks ahead of their clicks: clicks answered at the edge but not drained yet, and
    # messages never clicked named by id, then clicked; all judged once the clicks land.
    async with running_edge(settings) as e:
        for acct in accts:
            t = acct.tenant
            fresh = [m for m in acct.messages.values() if m.body != "old" and "://" in m.body]
            late: list[tuple[str, Msg | None, str]] = []  # (ref, message to click, code url)
            ahead = [m for m in fresh if not m.clicks][:2]
            rest = [m for m in fresh if m not in ahead]
            for m in rng.sample(rest, min(4, len(rest))):
                code = await db.fetchrow("SELECT ml.code, l.offer_id, l.domain_host FROM message_links ml"
                                         " JOIN links l ON l.id = ml.link_id WHERE ml.message_id = $1 ORDER BY ml.code LIMIT 1",
                                         m.id)
                url = f"https://{code['domain_host']}/{code['code']}"
                bot = rng.random() < 0.2
                loc = await e.click(url, headers={"user-agent": BOT_UA} if bot else {})
                k = Click(parse_qs(urlsplit(loc).query)["cid"][0], m.id, code["offer_id"], bot)
                m.clicks.append(k)
                acct.clicks[k.id] = k
                late.append((rng.choice([k.id, m.id]), None, url))
            # A history click dated ahead (first, for now), then an earlier click at the edge takes
            # its place: conversions that name the message follow it, those naming the click stay.
            if ahead:
                at = datetime.now(UTC) + timedelta(hours=2)
                offer = list(acct.offers)[2]
                resp = await api.post("/api/v2/history/clicks", headers=t.headers, json={"records": [
                    {"message_id": m.id, "offer_id": offer, "phone_number": m.phone, "timestamp": iso(at)} for m in ahead]})
                assert resp.json()["success_count"] == len(ahead), resp.text
                for r in await db.fetch("SELECT id, message_id FROM clicks WHERE message_id = ANY($1::text[])",
                                        [m.id for m in ahead]):
                    k = Click(r["id"], r["message_id"], offer, False, at)
                    acct.messages[k.message].clicks.append(k)
                    acct.clicks[k.id] = k
                    late.append((rng.choice([k.id, k.message]), None, ""))
            for m in fresh:
                if m in ahead or (not m.clicks and rng.random() < 0.7):
                    code = await db.fetchrow("SELECT ml.code, l.domain_host FROM message_links ml JOIN links l"
                                             " ON l.id = ml.link_id WHERE ml.message_id = $1 LIMIT 1", m.id)
                    late.append((m.id, m, f"https://{code['domain_host']}/{code['code']}"))
            for ref, _, _ in late:
                for _ in range(rng.choice([1, 2])):
                    seq += 1
                    conv_at = (datetime.now(UTC) + rng.choice([timedelta(seconds=30), -timedelta(hours=1),
                                                               timedelta(hours=3)])).replace(microsecond=0)
                    moves = rng.choice([[("approved", None)], [("approved", Decimal("1.5"))], [("pending", None), ("approved", None)]])
                    conv = acct.convs.setdefault(("late", f"c{seq}"), Conv(ref, conv_at))
                    for status, payout in moves:
                        params = {"conversion_id": f"c{seq}", "network": "late", "click_id": ref, "status": status,
                                  "timestamp": iso(conv_at)}
                        if payout is not None:
                            params["payout"] = str(payout)
                        resp = await api.get(f"/postback/{t.postback_token}", params=params)
                        assert resp.json()["status"] == "accepted", resp.text
                        conv.posts.append((status, payout))
                        await burst_worker(settings)
            for _, m, url in late:
                if m is not None:
                    loc = await e.click(url)
                    # (the code's link may be another of the message's: its offer from the click row)
                    k = Click(parse_qs(urlsplit(loc).query)["cid"][0], m.id, "", False)
                    m.clicks.append(k)
                    acct.clicks[k.id] = k
    await drain(db, redis)
    async with db.acquire() as conn, conn.transaction():
        await attribution.rematch_stored(conn, window=None)
        await attribution.rematch_requested(conn)
    await burst_worker(settings)
    for acct in accts:
        for r in await db.fetch("SELECT id, clicked_at, is_bot, offer_id FROM clicks WHERE id = ANY($1::text[])",
                                [k for k, v in acct.clicks.items() if v.at is None]):
            acct.clicks[r["id"]].at, acct.clicks[r["id"]].offer = r["clicked_at"], r["offer_id"]
            assert r["is_bot"] == acct.clicks[r["id"]].bot
        assert all(k.at is not None for k in acct.clicks.values())

    # Revenue of each attribution type, live and imported.
    for acct in accts:
        t = acct.tenant
        some = rng.sample(list(acct.messages.values()), 5)
        for i, m in enumerate(some[:3]):
            kind = ["sale", "click", "send"][i]
            amount = Decimal(rng.randint(0, 9999)) / 100
            at = (m.sent_at + timedelta(minutes=rng.randint(0, 600))).replace(microsecond=rng.randint(0, 999999))
            body = {"message_id": m.id, "revenue": str(amount), "attribution_type": kind, "timestamp": iso(at)}
            offer = m.link_offer or m.offer  # README: "/revenue without offer_id takes the offer of the
            # message's first short link, else the offer the message was sent with"
            if rng.random() < 0.5:
                offer = body["offer_id"] = rng.choice(list(acct.offers))
            resp = await api.post("/api/v2/revenue", headers=t.headers, json=body)
            assert resp.status_code == 201, resp.text
            acct.revenue.append((m.id, kind, amount, at, offer))
        records = []
        for n, m in enumerate(some[3:]):
            kind = rng.choice(["sale", "click", "send"])
            at = m.sent_at + timedelta(days=1)
            offer = rng.choice(list(acct.offers))
            records.append({"message_id": m.id, "revenue": "3.75", "attribution_type": kind, "offer_id": offer,
                            "external_id": f"x{n}", "timestamp": iso(at)})
            acct.revenue.append((m.id, kind, Decimal("3.75"), at, offer))
        resp = await api.post("/api/v2/history/revenue", headers=t.headers, json={"records": records})
        assert resp.json()["success_count"] == len(records), resp.text
    return accts


def journey_urls(phone: str) -> list[str]:
    return [f"/api/v2/contacts/{quote(phone)}/journey", f"/api/v2/contacts/{phone}/journey",
            f"/api/v2/contacts/{phone[1:]}/journey"]


async def compare(api, accts: list[Account]) -> int:
    checked = 0
    for acct in accts:
        t = acct.tenant
        detail, journeys, unattributed = expected(acct)
        for mid, m in acct.messages.items():
            resp = await api.get(f"/api/v2/messages/{mid}", headers=t.headers)
            assert resp.status_code == 200, resp.text
            got = loads(resp.text)
            want = detail[mid]
            assert (got["to"], got["list_id"], got["offer_id"]) == (m.phone, m.list_id, m.offer), mid
            assert datetime.fromisoformat(got["sent_at"]) == m.sent_at, mid
            assert got["clicked"] == want["clicked"], mid
            assert (datetime.fromisoformat(got["first_clicked_at"]) if got["first_clicked_at"] else None) == \
                want["first_clicked_at"], mid
            assert (got["click_count"], got["conversions"], Decimal(got["revenue"])) == \
                (want["click_count"], want["conversions"], want["revenue"]), (mid, got, want)
            checked += 1
        for phone, j in journeys.items():
            bodies = [loads((await api.get(url, headers=t.headers)).text) for url in journey_urls(phone)]
            assert bodies[1:] == bodies[:1] * 2, phone
            got = bodies[0]
            assert got["phone_number"] == phone
            got_ev = [(e["type"], datetime.fromisoformat(e["at"]), e["message_id"], e["offer_id"],
                       Decimal(e["revenue"]) if "revenue" in e else None) for e in got["events"]]
            rank = {"sent": 0, "clicked": 1, "converted": 2}
            assert [(e[1], rank[e[0]]) for e in got_ev] == sorted((e[1], rank[e[0]]) for e in got_ev), phone
            assert sorted(got_ev, key=repr) == sorted(j["events"], key=repr), (phone, got_ev, j["events"])
            assert got["messages_received"] == sum(e[0] == "sent" for e in j["events"])
            assert got["clicks"] == sum(e[0] == "clicked" for e in j["events"])
            assert (got["conversions"], Decimal(got["total_revenue"])) == (j["conversions"], j["total_revenue"]), phone
            checked += 1
        # The report by message: each row is its message's detail (sends 1, clicks 0/1).
        resp = await api.get("/api/v2/reports/performance", headers=t.headers,
                             params={"group_by": "message", "per_page": "100"})
        body = loads(resp.text)
        rows = {r["key"]: r for r in body["rows"]}
        assert set(rows) - {None} == set(acct.messages), body
        for mid, want in detail.items():
            r = rows[mid]
            assert (r["sends"], r["clicks"], r["conversions"], Decimal(r["revenue"])) == \
                (1, int(want["clicked"]), want["conversions"], want["revenue"]), (mid, r, want)
        null = rows.get(None, {"conversions": 0, "revenue": 0})
        assert (null["conversions"], Decimal(null["revenue"])) == (unattributed["conversions"], unattributed["revenue"])
        totals = body["totals"]
        assert totals["sends"] == len(acct.messages)
        assert totals["clicks"] == sum(d["clicked"] for d in detail.values())
        assert totals["conversions"] == sum(r["conversions"] for r in body["rows"])
        assert Decimal(totals["revenue"]) == sum((Decimal(r["revenue"]) for r in body["rows"]), Decimal(0))
    return checked


@pytest.mark.parametrize("seed", SEEDS)
async def test_detail_and_journey_agree_with_the_model(api, db, redis, settings, seed):
    decimal.getcontext().prec = 100
    rng = random.Random(seed)
    accts = await build(api, db, redis, settings, rng)
    assert await compare(api, accts) > 10
