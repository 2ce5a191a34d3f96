"""The report rollup (migration 0016) against the events it sums: every grouping it serves, over
every kind of range, gives exactly the report the events give, before and after folding, after a
workload through the real paths (sends, history imports, the click drainer with an earlier click
replacing a first one, postbacks through the worker with status moves, reversals, late clicks and
message-id postbacks, revenue records)."""
from __future__ import annotations

import random
from decimal import Decimal
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from services.gateway.attribution_sql import ROLLUP_KEYS, report_page
from services.worker.folding import fold_report_rollup
from services.worker.clicks import drain_once
from shared import edge, ids
from tests.helpers import (add_list, fold_while_writing, make_offer, make_tenant, report_strays_and_the_events,
                           table_reads)
from tests.worker.test_attribution import postback

DAY0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


async def _report(db, account_id: int, group_by: str, start: datetime | None, end: datetime | None,
                  *, from_events: bool, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
    query = report_page(group_by, from_events=from_events, all_time=start is None and end is None)
    rows = await db.fetch(query, account_id, start, end, limit, offset)
    return [dict(r) for r in rows]


async def _assert_same_reports(db, account_id: int) -> int:
    """Every rollup grouping over every range equals the events' report; returns the rows compared."""
    day = lambda n: datetime(2026, 3, 1, tzinfo=UTC) + timedelta(days=n)  # noqa: E731
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    ranges = [(None, None), (day(1), day(3)), (day(0), day(1)), (None, day(2)), (day(2), None),
              (today, today + timedelta(days=1)), (day(40), day(41))]
    compared = 0
    for group_by in [*ROLLUP_KEYS, "message"]:  # by message: the page's groups summed, the totals rolled up
        for start, end in ranges:
            rolled = await _report(db, account_id, group_by, start, end, from_events=False)
            summed = await _report(db, account_id, group_by, start, end, from_events=True)
            assert rolled == summed, (group_by, start, end)
            compared += len(rolled)
        paged = await _report(db, account_id, group_by, None, None, from_events=False, limit=2, offset=1)
        assert paged == await _report(db, account_id, group_by, None, None, from_events=True, limit=2, offset=1)
    # Every page by message, over all time and a range with messages sent before it (their clicks,
    # conversions and revenue are in it), up to past the last: the group of conversions credited to
    # no message (the NULL key, last) on a page of its own, with others, and not at all.
    groups = [await _report(db, account_id, "message", start, end, from_events=True) for start, end in ranges[:2]]
    assert groups[0][-1]["key"] is None and len(groups[0]) > 20
    assert any(r["key"] is not None and r["sends"] == 0 for r in groups[1]), "no message sent before the range"
    for (start, end), every in zip(ranges[:2], groups):
        for limit in (1, 3, 7):
            for offset in range(0, len(every) + limit, limit):
                page = await _report(db, account_id, "message", start, end, from_events=False, limit=limit, offset=offset)
                assert page == every[offset : offset + limit], (start, end, limit, offset)
    kept, events = await report_strays_and_the_events(db, account_id)  # what the strays are read from
    assert kept == events and kept
    return compared


async def test_the_rollup_gives_the_events_reports(api, db, redis, tenant, run_worker):
    rng = random.Random(16)
    extra = await add_list(db, tenant, name="second", short_domain="https://sms2.example.com")
    offers = [await make_offer(api, tenant, payout=5), await make_offer(api, tenant, payout=2, external_id="ext-b")]
    lists = [tenant.list_id, extra["list_id"]]

    # Sends over five days (history) and today (API), keys drawn at random (some missing).
    def record(i: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"to": f"+1415555{i:04d}", "list_id": rng.choice(lists), "body": "hi"}
        for name, values in (("offer_id", [o["id"] for o in offers] + ["ext-b"]), ("creative_id", ["c1", "c2"]),
                             ("schedule_id", ["s1", "s2"])):
            if rng.random() < 0.8:
                fields[name] = rng.choice(values)
        return fields

    history = [{**record(i), "timestamp": (DAY0 + timedelta(days=i % 5, hours=i)).isoformat()} for i in range(40)]
    resp = await api.post("/api/v2/history/sends", headers=tenant.headers, json={"records": history})
    assert resp.json()["success_count"] == 40, resp.text
    resp = await api.post("/api/v2/send/bulk", headers=tenant.headers, json={"messages": [record(100 + i) for i in range(10)]})
    assert resp.json()["queued_count"] == 10, resp.text
    messages = [dict(r) for r in await db.fetch(
        "SELECT id, sent_at, offer_id, list_id FROM messages WHERE account_id = $1 ORDER BY sent_at, to_phone",
        tenant.account_id)]  # (not by id: ids are random, and the sample below must not change from run to run)

    async def drain(clicks: list[dict[str, Any]]) -> None:
        await redis.xadd(edge.CLICK_STREAM, {edge.CLICK_BATCH_FIELD: orjson.dumps([edge.click_from(c) for c in clicks])})
        while await drain_once(db, redis, consumer="pytest-rollup", min_idle_ms=0):
            pass

    def click(message: dict[str, Any], at: datetime, *, bot: bool = False) -> dict[str, Any]:
        return {"id": ids.click_id(), "l": "Ab3kX9", "o": rng.choice([message["offer_id"], offers[0]["id"]]),
                "a": tenant.account_id, "li": message["list_id"], "m": message["id"], "at": at, "ip": None,
                "ua": "Mozilla/5.0", "cc": None, "bot": bot, "q": {}}

    while await drain_once(db, redis, consumer="pytest-rollup", min_idle_ms=0):
        pass
    clicked = rng.sample(messages, 28)
    first = [click(m, m["sent_at"] + timedelta(hours=rng.randint(1, 40))) for m in clicked[:22]]
    await drain(first + [click(m, m["sent_at"] + timedelta(hours=2), bot=True) for m in clicked[22:25]])
    # Earlier clicks than the stored first ones, some on another day: they take their place.
    await drain([click(c_msg, c["at"] - timedelta(hours=30)) for c_msg, c in zip(clicked[:5], first[:5])])
    resp = await api.post("/api/v2/history/clicks", headers=tenant.headers, json={"records": [
        {"message_id": m["id"], "offer_id": offers[1]["id"], "phone_number": "+14155550000",
         "timestamp": (m["sent_at"] + timedelta(hours=3)).isoformat()} for m in clicked[25:]]})
    assert resp.json()["success_count"] == 3, resp.text

    # Postbacks: approvals, status moves, reversals, unknown and late clicks, a message named.
    click_ids = [c["id"] for c in first]
    conv_at = lambda c: (c["at"] + timedelta(hours=5)).isoformat()  # noqa: E731
    for n, c in enumerate(first[5:15]):
        await postback(api, tenant, click_id=c["id"], conversion_id=f"a{n}", payout=f"{n}.25", timestamp=conv_at(c))
    for n, c in enumerate(first[15:19]):
        await postback(api, tenant, click_id=c["id"], conversion_id=f"p{n}", status="pending", timestamp=conv_at(c))
    await postback(api, tenant, click_id=first[20]["id"], conversion_id="stays", status="pending", timestamp=conv_at(first[20]))
    await postback(api, tenant, click_id="nope", conversion_id="lost", payout="9", timestamp=DAY0.isoformat())
    await postback(api, tenant, aff_sub=clicked[19]["id"], conversion_id="by-message", payout="4",
                   timestamp=(DAY0 + timedelta(days=6)).isoformat())
    late = [click(m, m["sent_at"] + timedelta(hours=1)) for m in messages if m not in clicked][:3]
    for n, c in enumerate(late):
        # Paid: when the late click attributes it, a ledger that is not 0 moves with its keys.
        await postback(api, tenant, click_id=c["id"], conversion_id=f"late{n}", payout="6.5", timestamp=conv_at(c))
    await run_worker()
    for n, c in enumerate(first[15:19]):
        await postback(api, tenant, click_id=c["id"], conversion_id=f"p{n}", status=["approved", "rejected"][n % 2],
                       payout="3", timestamp=conv_at(c))
    for n in (0, 1):
        await postback(api, tenant, click_id=click_ids[5 + n], conversion_id=f"a{n}", status="reversed")
    await run_worker()
    await drain(late)  # the drainer attributes the waiting conversions (keys, payout, ledger)

    # Revenue records, through the API and imported, on several days.
    for n, m in enumerate(messages[:6]):
        body = {"message_id": m["id"], "revenue": f"1.{n}", "attribution_type": ["sale", "click"][n % 2]}
        if n % 3 == 0:
            body["offer_id"] = "ext-b"
        assert (await api.post("/api/v2/revenue", headers=tenant.headers, json=body)).status_code == 201
    resp = await api.post("/api/v2/history/revenue", headers=tenant.headers, json={"records": [
        {"message_id": m["id"], "revenue": "2.5", "attribution_type": "sale", "external_id": f"h{n}",
         "timestamp": (DAY0 + timedelta(days=n)).isoformat()} for n, m in enumerate(messages[10:14])]})
    assert resp.json()["success_count"] == 4, resp.text

    conversions = await db.fetch("SELECT status, attributed FROM conversions WHERE account_id = $1", tenant.account_id)
    assert {r["status"] for r in conversions} == {"approved", "pending", "rejected", "reversed"}
    late_paid = await db.fetch("SELECT c.attributed, (SELECT sum(amount) FROM conversion_adjustments a WHERE a.conversion_id = c.id)"
                               " AS ledger FROM conversions c WHERE account_id = $1 AND conversion_key LIKE 'late%'", tenant.account_id)
    assert [(r["attributed"], r["ledger"]) for r in late_paid] == [(True, 6.5)] * 3
    assert sum(r["attributed"] for r in conversions) >= 15
    compared = await _assert_same_reports(db, tenant.account_id)
    assert compared > 50
    unfolded = await db.fetchval("SELECT count(*) FROM report_rollup WHERE account_id = $1", tenant.account_id)
    assert await fold_report_rollup(db) > 0
    assert await db.fetchval("SELECT count(*) FROM report_rollup WHERE account_id = $1 AND NOT folded", tenant.account_id) == 0
    assert await db.fetchval("SELECT count(*) FROM report_rollup WHERE account_id = $1", tenant.account_id) < unfolded
    assert await _assert_same_reports(db, tenant.account_id) == compared
    # And a report through the API is the rollup's.
    body = (await api.get("/api/v2/reports/performance?group_by=offer", headers=tenant.headers)).json()
    events = await _report(db, tenant.account_id, "offer", None, None, from_events=True)
    assert [(r["key"], r["sends"], r["clicks"], r["conversions"], r["revenue"]) for r in body["rows"]] == [
        (r["key"], r["sends"], r["clicks"], r["conversions"], float(r["revenue"])) for r in events]
    # By message over a range with messages sent before it (the API picks the query for a range).
    body = (await api.get("/api/v2/reports/performance?group_by=message&start=2026-03-02&end=2026-03-03&per_page=100",
                          headers=tenant.headers)).json()
    events = await _report(db, tenant.account_id, "message", datetime(2026, 3, 2, tzinfo=UTC),
                           datetime(2026, 3, 4, tzinfo=UTC), from_events=True)
    assert any(r["sends"] == 0 and r["key"] is not None for r in events)
    assert [(r["key"], r["sends"], r["clicks"], r["conversions"], r["revenue"]) for r in body["rows"]] == [
        (r["key"], r["sends"], r["clicks"], r["conversions"], float(r["revenue"])) for r in events]


async def test_folding_keeps_what_is_written_meanwhile(api, db, tenant, settings):
    """A send not yet committed while one worker folds, and a second worker folding at once:
    every send is counted once."""
    async def send(n: int) -> None:
        resp = await api.post("/api/v2/send/bulk", headers=tenant.headers, json={"messages": [
            {"to": f"+1415666{i:04d}", "list_id": tenant.list_id, "body": "hi"} for i in range(n)]})
        assert resp.json()["queued_count"] == n

    for n in (3, 4):
        await send(n)
    await fold_while_writing(settings.database_url, db, lambda conn: conn.execute(
        "INSERT INTO messages (id, account_id, list_id, to_phone, body, sent_at)"
        " SELECT 'rf' || lpad(i::text, 6, '0'), $1, $2, '+14157770000', 'x', now() FROM generate_series(1, 5) i",
        tenant.account_id, tenant.list_id), fold_report_rollup)
    sends = await db.fetchval("SELECT sum(sends) FROM report_rollup WHERE account_id = $1", tenant.account_id)
    assert sends == 12
    await fold_report_rollup(db)
    assert await db.fetchval("SELECT sum(sends) FROM report_rollup WHERE account_id = $1", tenant.account_id) == 12
    assert await db.fetchval("SELECT count(*) FROM report_rollup WHERE account_id = $1", tenant.account_id) == 1


async def test_the_triggers_look_up_each_row_by_index_whatever_the_table_size(db, tenant):
    """Migration 0021: each rollup trigger reads the message (or conversion) of each of its
    statement's rows through the primary key. With plain joins the planner read the whole table
    for a batch of 1000 rows until it held a few hundred thousand: here, with 18,000 messages of
    another account analyzed, then 6000 of this one, a first click, its replacement, a revenue
    record and a ledger entry per message for 1000 messages must scan neither messages nor
    conversions, and read no more of them than the probes."""
    n, batch = 6000, 1000
    mids = [f"rx{i:06d}" for i in range(n)]
    at = datetime(2026, 3, 5, 12, tzinfo=UTC)
    other = await make_tenant(db)
    async with db.acquire() as conn:
        for owner, ids_ in ((other, [f"ry{i:06d}" for i in range(3 * n)]), (tenant, mids)):
            await conn.copy_records_to_table(
                "messages", columns=("id", "account_id", "list_id", "to_phone", "body", "offer_id", "sent_at"),
                records=[(m, owner.account_id, owner.list_id, f"+1415{i:07d}", "x", "of1", at) for i, m in enumerate(ids_)],
            )
            conversion_ids = await conn.fetch(
                "INSERT INTO conversions (account_id, network, conversion_key, status, converted_at, message_id)"
                " SELECT $1, 'tune', 'rx' || m, 'approved', $2, m FROM unnest($3::text[]) AS t(m) RETURNING id",
                owner.account_id, at, ids_,
            )
            if owner is other:  # this account's rows come after: statistics that call it small
                await conn.execute("ANALYZE messages")
                await conn.execute("ANALYZE conversions")
        some, conversions = mids[:batch], [r["id"] for r in conversion_ids[:batch]]
        before = await conn.fetchval("SELECT coalesce(sum(clicks), 0) FROM report_rollup WHERE account_id = $1",
                                     tenant.account_id)
        async def write() -> None:
            await conn.execute(
                "INSERT INTO message_clicks (message_id, click_id, account_id, clicked_at)"
                " SELECT m, 'c' || m, $1, $2 FROM unnest($3::text[]) AS t(m)", tenant.account_id, at, some,
            )
            await conn.execute(
                "UPDATE message_clicks SET clicked_at = clicked_at - interval '1 minute'"
                " WHERE message_id = ANY($1::text[])", some,
            )
            await conn.execute(
                "INSERT INTO revenue (id, account_id, message_id, amount, attribution_type, occurred_at)"
                " SELECT md5(m), $1, m, 1.5, 'sale', $2 FROM unnest($3::text[]) AS t(m)", tenant.account_id, at, some,
            )
            await conn.execute(
                "INSERT INTO conversion_adjustments (conversion_id, to_status, amount)"
                " SELECT c, 'approved', 2 FROM unnest($1::bigint[]) AS t(c)", conversions,
            )

        _, reads = await table_reads(conn, write, "messages", "conversions")
        # One message read per first click, two per replacement (old and new), one per revenue
        # record; one conversion per ledger entry, and its foreign key's check.
        assert reads == {"messages": (0, 4000), "conversions": (0, 2000)}
        # And they counted every row (the rest of this file checks the sums in detail).
        rolled = await conn.fetchrow(
            "SELECT sum(clicks) AS clicks, sum(revenue) AS revenue FROM report_rollup WHERE account_id = $1",
            tenant.account_id,
        )
        assert rolled["clicks"] - before == batch
        assert rolled["revenue"] >= batch * Decimal("3.5")
