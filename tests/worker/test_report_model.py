"""Reports, message detail, journeys and the postback log against a model of what the test sent.

One fixed history (no randomness), made to hit every postback rule at once: failed postbacks
(unfilled macros in status, payout, currency and timestamp; a postback naming nothing), repeats,
pending -> approved / rejected, a correction back, a payout correction, a reversal sent negative,
a late pending after approval, conversions with no message (click_not_found, expired,
before_click, bot_click, no_click_id), revenue records of each attribution_type (/revenue and
/history/revenue, a repeated external_id), an offer deleted before the reports are read, two
currencies, and events a microsecond either side of UTC midnights. The expected figures are
computed here from what was sent (CONTRACT.md §3 "Metrics"), never read back from the tables.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from shared import ids
from tests.helpers import add_list, make_offer
from tests.worker.conftest import burst_worker, store_click

D = datetime(2026, 3, 10, tzinfo=UTC)  # a UTC midnight
US = timedelta(microseconds=1)
GROUPS = ["offer", "creative", "message", "date", "campaign", "list"]
P1, P2, P3 = "+12025550101", "+12025550102", "+12025550103"


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def loads(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


@dataclass
class Event:
    at: datetime
    offer: str | None
    creative: str | None
    message: str | None
    campaign: str | None
    list: int | None
    sends: int = 0
    clicks: int = 0
    conversions: int = 0
    revenue: Decimal = Decimal(0)

    def key(self, group_by: str) -> Any:
        return self.at.date().isoformat() if group_by == "date" else getattr(self, group_by)


def expected(events: list[Event], group_by: str, start: date | None, end: date | None) -> tuple[dict, dict]:
    rows: dict[Any, dict[str, Any]] = defaultdict(lambda: {"sends": 0, "clicks": 0, "conversions": 0,
                                                           "revenue": Decimal(0)})
    for e in events:
        if (start and e.at.date() < start) or (end and e.at.date() > end):
            continue
        row = rows[e.key(group_by)]
        for name in ("sends", "clicks", "conversions", "revenue"):
            row[name] += getattr(e, name)
    totals = {"sends": 0, "clicks": 0, "conversions": 0, "revenue": Decimal(0)}
    for row in rows.values():
        for name in totals:
            totals[name] += row[name]
    return dict(rows), totals


def check(got: dict[str, Any], want: dict[str, Any], where: Any) -> None:
    for name in ("sends", "clicks", "conversions"):
        assert got[name] == want[name], (where, name, got, want)
    assert Decimal(got["revenue"]) == want["revenue"], (where, "revenue", got, want)
    for name, num, den in (("ctr", "clicks", "sends"), ("conversion_rate", "conversions", "clicks"),
                           ("epc", "revenue", "clicks"), ("revenue_per_send", "revenue", "sends")):
        ratio = Fraction(want[num]) / Fraction(want[den]) if want[den] else Fraction(0)
        assert abs(Fraction(got[name]) - ratio) <= Fraction(1, 10**20) * max(1, abs(ratio)), (where, name, got, want)


async def test_reports_detail_journeys_and_postback_log_match_a_model_of_what_was_sent(api, db, tenant, settings):
    headers = tenant.headers
    second = (await add_list(db, tenant, name="second"))["list_id"]
    L1 = tenant.list_id
    A = await make_offer(api, tenant, payout="10", external_id="ext-a")
    B = await make_offer(api, tenant, payout="4", currency="EUR", click_window_days=1)
    C = await make_offer(api, tenant, payout="2")  # deleted before the reports are read
    a, b, c = A["id"], B["id"], C["id"]

    # ---- sends (history), at and around UTC midnights
    m = {i: ids.message_id() for i in range(1, 8)}
    msg = {  # id -> (phone, list, offer, creative, campaign, sent_at)
        1: (P1, L1, a, "cr1", "s1", D - timedelta(seconds=1)),
        2: (P1, L1, a, "cr2", "s1", D),
        3: (P2, second, b, "cr1", "s2", D + timedelta(hours=12)),
        4: (P2, L1, c, None, None, D + timedelta(days=1) - US),
        5: (P3, second, None, "cr2", None, D + timedelta(days=1) + US),
        6: (P3, L1, a, "cr1", "s1", D + timedelta(days=1, hours=10)),
        7: (P1, L1, b, "cr3", "s2", D + timedelta(days=2, hours=9)),
    }
    records = []
    for i, (phone, lst, offer, creative, campaign, at) in msg.items():
        rec: dict[str, Any] = {"message_id": m[i], "to": phone, "list_id": lst, "timestamp": iso(at), "body": "hi"}
        for name, value in (("offer_id", offer), ("creative_id", creative), ("schedule_id", campaign)):
            if value is not None:
                rec[name] = value
        records.append(rec)
    resp = await api.post("/api/v2/history/sends", headers=headers, json={"records": records})
    assert resp.json()["success_count"] == 7, resp.text

    # ---- first clicks (history), and raw clicks besides
    clicks = {  # message -> (offer named by the click, clicked_at)
        1: (a, D),
        2: (a, D + timedelta(minutes=30)),
        3: (b, D + timedelta(hours=12, minutes=5)),
        4: (c, D + timedelta(days=1)),
        5: (a, D + timedelta(days=1, hours=1)),  # message 5 has no offer: the click's counts
    }
    resp = await api.post("/api/v2/history/clicks", headers=headers, json={"records": [
        {"message_id": m[i], "offer_id": offer, "phone_number": msg[i][0], "timestamp": iso(at)}
        for i, (offer, at) in clicks.items()
    ]})
    assert resp.json()["success_count"] == 5, resp.text
    click_of = {r["message_id"]: r["click_id"] for r in await db.fetch(
        "SELECT message_id, click_id FROM message_clicks WHERE account_id = $1", tenant.account_id)}
    await store_click(db, tenant.account_id, m[2], D + timedelta(hours=3), offer_id=a, first=False)  # a later one
    await store_click(db, tenant.account_id, m[2], D + timedelta(hours=4), offer_id=a, is_bot=True)
    bot = await store_click(db, tenant.account_id, m[7], D + timedelta(days=2, hours=9, minutes=1), offer_id=b,
                            is_bot=True)

    # ---- postbacks: (params, answer, final state in the log, error contains)
    def ts(at: datetime) -> str:
        return iso(at)

    k1, k2, k3, k4, k5 = (click_of[m[i]] for i in range(1, 6))
    sent: list[tuple[dict[str, str], str, str, str | None]] = [
        ({"click_id": k1, "txid": "t1", "payout": "12.50", "timestamp": ts(D + timedelta(hours=1))}, "accepted", "processed", None),
        ({"click_id": k1, "txid": "t1", "payout": "12.50", "timestamp": ts(D + timedelta(hours=1))}, "duplicate", "duplicate", None),
        ({"click_id": k2, "txid": "t2", "status": "pending", "payout": "7", "timestamp": ts(D + timedelta(days=1) - US)},
         "accepted", "processed", None),
        ({"click_id": k2, "txid": "t2", "status": "approved", "payout": "7", "timestamp": ts(D + timedelta(days=1, hours=5))},
         "accepted", "processed", None),
        ({"click_id": k3, "txid": "t3", "status": "pending", "payout": "4", "currency": "EUR",
          "timestamp": ts(D + timedelta(hours=13))}, "accepted", "processed", None),
        ({"click_id": k3, "txid": "t3", "status": "rejected", "payout": "4", "currency": "EUR"}, "accepted", "processed", None),
        ({"click_id": m[3], "txid": "t4", "payout": "20", "timestamp": ts(D + timedelta(hours=14))}, "accepted", "processed", None),
        ({"click_id": m[3], "txid": "t4", "status": "reversed", "payout": "-20"}, "accepted", "processed", None),
        ({"click_id": k4, "txid": "t5", "status": "{status}", "payout": "3"}, "accepted", "failed", "status"),
        ({"click_id": k4, "txid": "t6", "payout": "{payout}"}, "accepted", "failed", "payout"),
        ({"click_id": k4, "txid": "t6b", "payout": "3", "currency": "{currency}"}, "accepted", "failed", "currency"),
        ({"click_id": k4, "txid": "t6c", "payout": "3", "timestamp": "{timestamp}"}, "accepted", "failed", "timestamp"),
        ({"network": "tune", "status": "approved"}, "accepted", "failed", "nothing to record"),
        ({"click_id": "{clickid}", "txid": "{txid}", "payout": ""}, "accepted", "failed", "nothing to record"),
        ({"click_id": "no-such-click", "txid": "t7", "offer_id": "ext-a", "payout": "3",
          "timestamp": ts(D + timedelta(days=1, hours=2))}, "accepted", "processed", None),
        ({"click_id": k3, "txid": "t8", "payout": "6", "timestamp": ts(D + timedelta(days=2, hours=13))},
         "accepted", "processed", None),  # expired: B's window is 1 day
        ({"click_id": k5, "txid": "t9", "offer_id": c, "payout": "5", "timestamp": ts(D + timedelta(days=1, minutes=30))},
         "accepted", "processed", None),  # before its click
        ({"click_id": bot, "txid": "t10", "timestamp": ts(D + timedelta(days=2, hours=10))}, "accepted", "processed", None),
        ({"click_id": m[4], "txid": "{txid}", "payout": "2.25", "currency": "eur",
          "timestamp": ts(D + timedelta(days=1, hours=3))}, "accepted", "processed", None),  # keyed by its click
        ({"click_id": m[4], "txid": "{txid}", "payout": "2.25", "currency": "EUR"}, "duplicate", "duplicate", None),
        ({"click_id": k1, "txid": "t11", "payout": "1", "timestamp": ts(D + timedelta(hours=2))}, "accepted", "processed", None),
        ({"click_id": k1, "txid": "t11", "status": "rejected", "payout": "1"}, "accepted", "processed", None),
        ({"click_id": k1, "txid": "t11", "status": "approved", "payout": "1"}, "accepted", "processed", None),
        ({"click_id": k1, "txid": "t1", "payout": "13.00"}, "accepted", "processed", None),  # payout corrected
        ({"txid": "t12", "offer_id": a, "payout": "8", "timestamp": ts(D + timedelta(days=3) - US)},
         "accepted", "processed", None),  # no click named
        ({"click_id": k2, "txid": "t13", "status": "pending", "payout": "9", "timestamp": ts(D + timedelta(hours=6))},
         "accepted", "processed", None),
        ({"click_id": k1, "txid": "t14", "payout": "2", "timestamp": ts(D + timedelta(hours=7))}, "accepted", "processed", None),
        ({"click_id": k1, "txid": "t14", "status": "pending", "payout": "2"}, "accepted", "processed", None),  # ignored
        ({"click_id": k4, "txid": "t15", "offer_id": c, "network": "other", "timestamp": ts(D + timedelta(days=1, hours=4))},
         "accepted", "processed", None),  # no payout: offer C's 2
    ]
    url = f"/postback/{tenant.postback_token}"
    for params, answer, _, _ in sent:
        resp = await api.get(url, params=params)
        assert resp.status_code == 200 and resp.json()["status"] == answer, (params, resp.text)
        await burst_worker(settings)  # each in turn: the worker sees them in order either way

    # What each conversion ends as: (at, offer, message index or None, status, payout)
    conversions = {
        "t1": (D + timedelta(hours=1), a, 1, "approved", Decimal("13.00")),
        "t2": (D + timedelta(days=1) - US, a, 2, "approved", Decimal(7)),
        "t3": (D + timedelta(hours=13), b, 3, "rejected", Decimal(4)),
        "t4": (D + timedelta(hours=14), b, 3, "reversed", Decimal(20)),
        "t7": (D + timedelta(days=1, hours=2), a, None, "approved", Decimal(3)),  # click_not_found, offer named
        "t8": (D + timedelta(days=2, hours=13), None, None, "approved", Decimal(6)),  # expired: not B's
        "t9": (D + timedelta(days=1, minutes=30), c, None, "approved", Decimal(5)),  # before_click
        "t10": (D + timedelta(days=2, hours=10), None, None, "approved", Decimal(0)),  # bot_click
        "click:m4": (D + timedelta(days=1, hours=3), c, 4, "approved", Decimal("2.25")),
        "t11": (D + timedelta(hours=2), a, 1, "approved", Decimal(1)),
        "t12": (D + timedelta(days=3) - US, a, None, "approved", Decimal(8)),  # no_click_id
        "t13": (D + timedelta(hours=6), a, 2, "pending", Decimal(9)),
        "t14": (D + timedelta(hours=7), a, 1, "approved", Decimal(2)),
        "t15": (D + timedelta(days=1, hours=4), c, 4, "approved", Decimal(2)),
    }
    reasons = {"t7": "click_not_found", "t8": "expired", "t9": "before_click", "t10": "bot_click", "t12": "no_click_id"}
    got_conversions = {r["conversion_key"]: r for r in await db.fetch(
        "SELECT * FROM conversions WHERE account_id = $1", tenant.account_id)}
    assert len(got_conversions) == len(conversions), sorted(got_conversions)
    for key, (at, offer, index, status, payout) in conversions.items():
        row = got_conversions[f"click:{m[4]}" if key == "click:m4" else key]
        assert (row["converted_at"], row["offer_id"], row["message_id"], row["status"], row["payout"]) == (
            at, offer, m[index] if index else None, status, payout), (key, dict(row))
        assert row["unattributed_reason"] == reasons.get(key), (key, dict(row))

    # ---- revenue records
    revenue = [  # (message index, offer given, type, amount, at, external id)
        (5, None, "sale", Decimal("9.99"), D + timedelta(days=1), None),
        (2, None, "click", Decimal("1.00"), D + timedelta(days=1) - timedelta(milliseconds=1), None),
        (6, b, "send", Decimal("0.50"), D + timedelta(days=1, hours=11), None),
    ]
    for index, offer, kind, amount, at, _ in revenue:
        body = {"message_id": m[index], "revenue": str(amount), "attribution_type": kind, "timestamp": iso(at)}
        if offer:
            body["offer_id"] = offer
        resp = await api.post("/api/v2/revenue", headers=headers, json=body)
        assert resp.status_code == 201, resp.text
    resp = await api.delete(f"/api/v2/offers/{c}", headers=headers)
    assert resp.status_code == 200, resp.text
    history = [
        (3, None, "sale", Decimal("3.33"), D + timedelta(days=2), "x1"),
        (4, c, "sale", Decimal("1.11"), D + timedelta(days=2, hours=1), "x2"),  # C is deleted by now
    ]
    resp = await api.post("/api/v2/history/revenue", headers=headers, json={"records": [
        {"message_id": m[i], "revenue": str(amt), "attribution_type": kind, "timestamp": iso(at), "external_id": ext,
         **({"offer_id": offer} if offer else {})}
        for i, offer, kind, amt, at, ext in history
    ] + [{"message_id": m[3], "revenue": "100", "attribution_type": "sale", "timestamp": iso(D), "external_id": "x1"}]})
    assert resp.json()["success_count"] == 2, resp.text
    revenue += history

    # ---- the model's events
    events: list[Event] = []
    for i, (phone, lst, offer, creative, campaign, at) in msg.items():
        events.append(Event(at, offer, creative, m[i], campaign, lst, sends=1))
    for i, (offer, at) in clicks.items():
        _, lst, _, creative, campaign, _ = msg[i]
        events.append(Event(at, offer, creative, m[i], campaign, lst, clicks=1))
    for key, (at, offer, index, status, payout) in conversions.items():
        worth = payout if status == "approved" else Decimal(0)
        if index is None:
            events.append(Event(at, offer, None, None, None, None, conversions=int(status == "approved"), revenue=worth))
        else:
            _, lst, _, creative, campaign, _ = msg[index]
            events.append(Event(at, offer, creative, m[index], campaign, lst, conversions=int(status == "approved"),
                                revenue=worth))
    for index, offer, kind, amount, at, _ in revenue:
        _, lst, msg_offer, creative, campaign, _ = msg[index]
        events.append(Event(at, offer or msg_offer, creative, m[index], campaign, lst,
                            conversions=int(kind == "sale"), revenue=amount))

    # ---- every grouping, over ranges that start and end on each side of the midnights
    days = [None] + [(D + timedelta(days=n)).date() for n in range(-1, 4)]
    ranges = [(None, None)] + [(s, e) for s in days[1:] for e in days[1:] if s <= e] + [(days[1], None), (None, days[2])]
    for start, end in ranges:
        totals_seen = []
        for group_by in GROUPS:
            params: dict[str, Any] = {"group_by": group_by, "per_page": 100}
            if start:
                params["start"] = start.isoformat()
            if end:
                params["end"] = end.isoformat()
            resp = await api.get("/api/v2/reports/performance", headers=headers, params=params)
            assert resp.status_code == 200, resp.text
            body = loads(resp.text)
            want_rows, want_totals = expected(events, group_by, start, end)
            got_rows = {r["key"]: r for r in body["rows"]}
            assert set(got_rows) == set(want_rows), (group_by, start, end, sorted(got_rows, key=str), sorted(want_rows, key=str))
            for key, want in want_rows.items():
                check(got_rows[key], want, (group_by, start, end, key))
            check(body["totals"], want_totals, (group_by, start, end, "totals"))
            assert body["pagination"]["total"] == len(want_rows), (group_by, start, end, body["pagination"])
            totals_seen.append({k: body["totals"][k] for k in ("sends", "clicks", "conversions", "revenue")})
        assert all(t == totals_seen[0] for t in totals_seen), (start, end, totals_seen)

    # ---- message detail
    human_clicks = {m[2]: 2}
    for i in msg:
        resp = await api.get(f"/api/v2/messages/{m[i]}", headers=headers)
        assert resp.status_code == 200, resp.text
        detail = loads(resp.text)
        mine = [e for e in events if e.message == m[i]]
        assert detail["clicked"] is (i in clicks), (i, detail)
        first = detail["first_clicked_at"]
        assert (datetime.fromisoformat(first.replace("Z", "+00:00")) if first else None) == (
            clicks[i][1] if i in clicks else None), (i, detail)
        assert detail["click_count"] == human_clicks.get(m[i], int(i in clicks)), (i, detail)
        assert detail["conversions"] == sum(e.conversions for e in mine), (i, detail)
        assert Decimal(detail["revenue"]) == sum((e.revenue for e in mine), Decimal(0)), (i, detail)

    # ---- journeys: a contact's sends, first clicks, approved conversions credited to it, its revenue records
    for phone in (P1, P2, P3):
        mine = {m[i] for i, v in msg.items() if v[0] == phone}
        resp = await api.get(f"/api/v2/contacts/{phone}/journey", headers=headers)
        assert resp.status_code == 200, resp.text
        j = loads(resp.text)
        assert j["messages_received"] == len(mine)
        assert j["clicks"] == sum(1 for i in clicks if m[i] in mine)
        credited = [v for v in conversions.values() if v[2] is not None and m[v[2]] in mine and v[3] == "approved"]
        records = [r for r in revenue if m[r[0]] in mine]
        assert j["conversions"] == len(credited) + sum(1 for r in records if r[2] == "sale"), (phone, j)
        assert Decimal(j["total_revenue"]) == sum((v[4] for v in credited), Decimal(0)) + sum(
            (r[3] for r in records), Decimal(0)), (phone, j)
        ats = [datetime.fromisoformat(e["at"].replace("Z", "+00:00")) for e in j["events"]]
        assert ats == sorted(ats), (phone, j["events"])

    # ---- the postback log: each postback's outcome as it was
    resp = await api.get("/api/v2/postbacks", headers=headers, params={"per_page": 100})
    log = list(reversed(loads(resp.text)["postbacks"]))
    assert len(log) == len(sent), [p["params"] for p in log]
    for entry, (params, _, state, error) in zip(log, sent):
        assert entry["params"] == params, (entry, params)
        assert entry["state"] == state, (params, entry)
        if error:
            assert error in (entry["error"] or ""), (params, entry)
        else:
            assert entry["error"] is None, (params, entry)
    for state in ("processed", "failed", "duplicate", "pending"):
        resp = await api.get("/api/v2/postbacks", headers=headers, params={"state": state, "per_page": 100})
        body = loads(resp.text)
        assert body["pagination"]["total"] == sum(1 for s in sent if s[2] == state), (state, body["pagination"])
