"""The metric definitions of CONTRACT.md §3, as SQL, in one place.

Conversions: approved postback conversions (not reversed) plus revenue records of type ``sale``.
Revenue: the postback ledger (approvals net of reversals) plus every revenue record.
"""
from __future__ import annotations

# Per message: conversions and revenue. Parameter $1 is an array of message ids.
MESSAGE_OUTCOMES = """
SELECT m.id AS message_id,
       (SELECT count(*) FROM conversions c WHERE c.message_id = m.id AND c.status = 'approved')
     + (SELECT count(*) FROM revenue r WHERE r.message_id = m.id AND r.attribution_type = 'sale') AS conversions,
       coalesce((SELECT sum(a.amount) FROM conversion_adjustments a JOIN conversions c ON c.id = a.conversion_id
                  WHERE c.message_id = m.id), 0)
     + coalesce((SELECT sum(r.amount) FROM revenue r WHERE r.message_id = m.id), 0) AS revenue,
       (SELECT count(*) FROM clicks k WHERE k.message_id = m.id AND NOT k.is_bot) AS click_count,
       mc.clicked_at AS first_clicked_at
FROM messages m LEFT JOIN message_clicks mc ON mc.message_id = m.id
WHERE m.id = ANY($1::text[])
"""

# Every metric event of one account in a time range, each carrying every group key, so that any
# grouping sums the same events: a send at sent_at, a first human click at its clicked_at, a
# postback conversion (counted while approved; revenue = its ledger) at converted_at, a revenue
# record at occurred_at. Keys come from the message; a conversion carries the offer it was
# credited to (unattributed ones have no message, campaign, creative or list).
# $1 account id, $2 start (inclusive) or NULL, $3 end (exclusive) or NULL.
_IN_RANGE = "{at} >= coalesce($2::timestamptz, '-infinity') AND {at} < coalesce($3::timestamptz, 'infinity')"


def _conversion_events(only: str = "", source: str = "conversions c") -> str:
    return f"""
SELECT c.converted_at AS at, c.offer_id AS offer, c.creative_id AS creative, c.message_id AS message,
       c.schedule_id AS campaign, c.list_id AS list, 0 AS sends, 0 AS clicks, (c.status = 'approved')::int AS conversions,
       coalesce((SELECT sum(a.amount) FROM conversion_adjustments a WHERE a.conversion_id = c.id), 0) AS revenue
FROM {source}
WHERE c.account_id = $1 AND {_IN_RANGE.format(at="c.converted_at")}{only}"""


# Where each source's rows come from: a send is a message (m); a click (mc), a conversion (c) and a
# revenue record (r) take their message's keys (m) where they need them.
_SOURCES = {
    "sent": "messages m",
    "clicked": "message_clicks mc JOIN messages m ON m.id = mc.message_id AND m.account_id = mc.account_id",
    "converted": "conversions c",
    "revenue": "revenue r JOIN messages m ON m.id = r.message_id",
}


def _events(sources: dict[str, str] = _SOURCES) -> str:
    """EVENTS, each source's rows read from the FROM clause given for it (see _SOURCES)."""
    return f"""
SELECT m.sent_at AS at, m.offer_id AS offer, m.creative_id AS creative, m.id AS message,
       m.schedule_id AS campaign, m.list_id AS list,
       1 AS sends, 0 AS clicks, 0 AS conversions, 0::numeric AS revenue
FROM {sources["sent"]}
WHERE m.account_id = $1 AND {_IN_RANGE.format(at="m.sent_at")}
UNION ALL
SELECT mc.clicked_at, coalesce(mc.offer_id, m.offer_id), m.creative_id, m.id, m.schedule_id, m.list_id, 0, 1, 0, 0
FROM {sources["clicked"]}
WHERE mc.account_id = $1 AND {_IN_RANGE.format(at="mc.clicked_at")}
UNION ALL{_conversion_events(source=sources["converted"])}
UNION ALL
SELECT r.occurred_at, coalesce(r.offer_id, m.offer_id), m.creative_id, m.id, m.schedule_id, m.list_id, 0, 0,
       (r.attribution_type = 'sale')::int, r.amount
FROM {sources["revenue"]}
WHERE r.account_id = $1 AND {_IN_RANGE.format(at="r.occurred_at")}
"""


EVENTS = _events()

# The group key of each report grouping; date is the event's UTC day (text).
GROUP_KEYS = {
    "offer": "offer",
    "creative": "creative",
    "message": "message",
    "campaign": "campaign",
    "list": "list",  # a number: ordered as one (as text, list 10 came before 9)
    "date": "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}

_SUMS = "sum(sends)::bigint AS sends, sum(clicks)::bigint AS clicks, sum(conversions)::bigint AS conversions," \
        " coalesce(sum(revenue), 0) AS revenue"


# The same sums from report_rollup (migration 0016: the events summed per account, UTC day and
# keys, kept by triggers), for every grouping but by message. A group is there when it has any
# event. $2 and $3 as for EVENTS, but they must be UTC midnights (the rollup has whole UTC days;
# reports.py's range is days): another time would be taken to its day.
ROLLUP = """
SELECT {key} AS key, sum(sends)::bigint AS sends, sum(clicks)::bigint AS clicks,
       sum(conversions)::bigint AS conversions, sum(revenue) AS revenue
FROM report_rollup
WHERE account_id = $1 AND day >= coalesce(($2::timestamptz AT TIME ZONE 'UTC')::date, '-infinity')
  AND day < coalesce(($3::timestamptz AT TIME ZONE 'UTC')::date, 'infinity')
GROUP BY 1
HAVING sum(events) > 0
"""
ROLLUP_VERSION = "0016_report_rollup"  # recorded once its backfill has committed: the rollup is whole
ROLLUP_KEYS = {
    "offer": "offer",
    "creative": "creative",
    "campaign": "campaign",
    "list": "list",
    "date": "to_char(day, 'YYYY-MM-DD')",
}


# By message, one page without summing every event of the range (5-5.6 s over all time for an
# account with 1.6M messages): the groups are the messages with an event in the range, found
# without their sums: the messages sent in it, the "strays" (messages with another event in it but
# sent outside it) and the NULL group (conversions credited to no message), which sorts last. Over
# all time there are no strays (every send is in it; every event's message is the account's). How
# the strays are found: _STRAYS; the page's keys: _WALK_SHARE. Only the page's groups are summed,
# from their own events (EVENTS with each source read for the page's keys, _PAGE_SOURCES); the
# totals come from the rollup, which sums the same events. tests/worker/test_report_rollup.py checks every page against
# EVENTS. $1-$5 as for report_page.
#
# The page's events: each source probed by message id, one page key at a time, by a LATERAL
# subquery with a LIMIT (never flattened into a join; OFFSET 0 where a message has any number of
# rows) holding the key alone, the account and the range compared outside it, as migration 0021's
# triggers do (the page's keys are distinct: the join gives the rows "IN" gave). Narrowed by
# "IN (SELECT key FROM page)", each source was read by its account index and joined to the page
# whenever statistics called the account small, as they call every account before ANALYZE has
# run: a page of 100 over all time of an account of 3M messages read all its messages and first
# clicks, compared its 90k conversions with each key of the page and looked up the message of
# each of its 30k revenue records (2.1-2.9 s; 0.8-1.2 s with the probes, the rest finding the page).
_PAGE_SOURCES = {
    "sent": "page p CROSS JOIN LATERAL (SELECT id, account_id, sent_at, offer_id, creative_id, schedule_id, list_id"
            " FROM messages WHERE id = p.key LIMIT 1) m",
    "clicked": "page p CROSS JOIN LATERAL (SELECT message_id, account_id, clicked_at, offer_id FROM message_clicks"
               " WHERE message_id = p.key LIMIT 1) mc"
               " JOIN LATERAL (SELECT id, account_id, offer_id, creative_id, schedule_id, list_id FROM messages"
               " WHERE id = mc.message_id LIMIT 1) m ON m.account_id = mc.account_id",
    "converted": "page p CROSS JOIN LATERAL (SELECT id, account_id, converted_at, status, offer_id, creative_id,"
                 " message_id, schedule_id, list_id FROM conversions WHERE message_id = p.key OFFSET 0) c",
    "revenue": "page p CROSS JOIN LATERAL (SELECT account_id, occurred_at, offer_id, attribution_type, amount,"
               " message_id FROM revenue WHERE message_id = p.key OFFSET 0) r"
               " CROSS JOIN LATERAL (SELECT id, offer_id, creative_id, schedule_id, list_id FROM messages"
               " WHERE id = r.message_id LIMIT 1) m",
}
# The page's keys are the first offset + limit of the messages sent in the range (with the strays),
# in key order. Walking the messages' primary key from its start and keeping the account's in the
# range reads (offset + limit) / their share of the table's messages; reading all of them (their
# account's index) and sorting them reads all of them. Which is cheaper depends on that share,
# which the planner knows only from statistics: without any (ANALYZE never run) it took an account
# of 3M messages for a small one and sorted them all for a first page (0.7-1.1 s; walked: a few
# ms), and with them it walked 2M keys for page 20,001 (5.4-5.9 s; sorted: 2 s). So it does not
# choose. The walk ("walked") goes first, over at most 1/_WALK_SHARE as many keys as the range has
# sends (the rollup's count): a key walked costs 4-10 sorted (its row is read at random, theirs in
# the order they were stored), so a walk that finds too few has cost less than the sort that
# follows. If it finds offset + limit, they are the first, and any key below the last of them is
# among them or a stray. If not (a deep page; an account with a thin share of the table), the
# messages sent in the range are all read and sorted ("sent": OFFSET 0 keeps the planner from
# walking them itself). The page is the same either way. (Between 1/10 and about 1/4 of the sends
# deep, walking would still have been quicker: page 3,001 at 3M messages, 0.9 s walked by the
# planner, is 2 s sorted.)
_WALK_SHARE = 10
_SENT_KEYS = f"SELECT m.id AS key FROM messages m WHERE m.account_id = $1 AND {_IN_RANGE.format(at='m.sent_at')}"
# The strays: the messages with an event in the range (first click, conversion, revenue record) but
# sent outside it. Read from report_strays (migration 0029: per account, UTC day and message, the
# events of messages sent on another day, kept by the rollup's triggers): the events of the range
# whose message was sent another day, those of a message sent outside it kept. They were found by
# reading every event of the range and the message of each (_STRAYS_SCANNED, still used until
# 0029's backfill is recorded): probed one by one, or, whenever the planner counted enough of
# them, every account's messages read and hashed. An account of 1M messages among 1.2M: a month
# 200-290 ms, 8-11 ms now; a week 26-37 ms probed, 260-290 ms hashed (the same data, after writes
# had grown the tables' estimates), 5.5-7.5 ms now. Whole UTC days, as the rollup's range.
_DAYS = "{col} >= coalesce(($2::timestamptz AT TIME ZONE 'UTC')::date, '-infinity')" \
        " AND {col} < coalesce(($3::timestamptz AT TIME ZONE 'UTC')::date, 'infinity')"
_STRAYS = f"""strays AS MATERIALIZED (
    SELECT message_id AS key FROM report_strays
    WHERE account_id = $1 AND {_DAYS.format(col="day")} AND NOT ({_DAYS.format(col="sent_day")})
    GROUP BY message_id
    HAVING sum(events) > 0  -- a (day, message)'s deltas never sum below 0: above 0 where it has an event
),"""
_STRAYS_SCANNED = f"""strays AS MATERIALIZED (
    SELECT DISTINCT m.id AS key FROM (
        SELECT mc.message_id AS id FROM message_clicks mc
        WHERE mc.account_id = $1 AND {_IN_RANGE.format(at="mc.clicked_at")}
        UNION ALL
        SELECT c.message_id FROM conversions c
        WHERE c.account_id = $1 AND c.message_id IS NOT NULL AND {_IN_RANGE.format(at="c.converted_at")}
        UNION ALL
        SELECT r.message_id FROM revenue r WHERE r.account_id = $1 AND {_IN_RANGE.format(at="r.occurred_at")}
    ) x JOIN messages m ON m.id = x.id
    WHERE NOT ({_IN_RANGE.format(at="m.sent_at")})
),"""
STRAYS_VERSION = "0029_report_strays"  # recorded once its backfill has committed: report_strays is whole
_BY_MESSAGE = f"""
WITH {{strays}}
rolled AS (
    SELECT sum(sends)::bigint AS sends, sum(clicks)::bigint AS clicks, sum(conversions)::bigint AS conversions,
           sum(revenue) AS revenue
    FROM report_rollup
    WHERE account_id = $1 AND day >= coalesce(($2::timestamptz AT TIME ZONE 'UTC')::date, '-infinity')
      AND day < coalesce(($3::timestamptz AT TIME ZONE 'UTC')::date, 'infinity')
),
counts AS (
    -- The messages sent in the range are its sends, which the rollup has summed (its days are the
    -- range's, whole UTC days): counting them read every message of the account in the range
    -- (0.23 s per page over all time at 3M messages, growing with the account).
    SELECT (SELECT coalesce(sends, 0) FROM rolled){{count_strays}} AS messages, EXISTS (
        SELECT 1 FROM conversions c
        WHERE c.account_id = $1 AND c.message_id IS NULL AND {_IN_RANGE.format(at="c.converted_at")}
    ) AS unattributed
),
walked AS MATERIALIZED (
    SELECT m.id AS key FROM (
        SELECT id, account_id, sent_at FROM messages ORDER BY id
        LIMIT (SELECT coalesce(sends, 0) / {_WALK_SHARE} FROM rolled)
    ) m
    WHERE m.account_id = $1 AND {_IN_RANGE.format(at="m.sent_at")}
      AND (SELECT sends FROM rolled) >= {_WALK_SHARE} * ($4::bigint + $5::bigint)
    ORDER BY m.id  -- (the walk's own order: no sort; said, so the LIMIT keeps the first)
    LIMIT $4 + $5
),
page AS (
    (SELECT key FROM (
        SELECT key FROM walked WHERE (SELECT count(*) FROM walked) >= $4 + $5
        UNION ALL
        SELECT key FROM ({_SENT_KEYS} OFFSET 0) sent WHERE (SELECT count(*) FROM walked) < $4 + $5{{union_strays}}
    ) keys ORDER BY key LIMIT $4 OFFSET $5)
    UNION ALL  -- the NULL group, last
    SELECT NULL FROM counts WHERE unattributed AND messages >= $5 AND messages < $5 + $4
),
ev AS ({_events(_PAGE_SOURCES)}
UNION ALL  -- the NULL group's, when the page holds it{_conversion_events(
    " AND c.message_id IS NULL AND EXISTS (SELECT 1 FROM page WHERE key IS NULL)"
)}
),
totals AS (
    SELECT (SELECT messages + unattributed::int FROM counts) AS total_groups, sends AS total_sends,
           clicks AS total_clicks, conversions AS total_conversions, revenue AS total_revenue
    FROM rolled
)
SELECT g.*, totals.* FROM (SELECT message AS key, {_SUMS} FROM ev GROUP BY 1) g CROSS JOIN totals
ORDER BY key NULLS LAST
"""
BY_MESSAGE_ALL_TIME = _BY_MESSAGE.format(strays="", count_strays="", union_strays="")
_WITH_STRAYS = {"count_strays": " + (SELECT count(*) FROM strays)", "union_strays": " UNION ALL SELECT key FROM strays"}
BY_MESSAGE = _BY_MESSAGE.format(strays=_STRAYS, **_WITH_STRAYS)
BY_MESSAGE_SCANNED = _BY_MESSAGE.format(strays=_STRAYS_SCANNED, **_WITH_STRAYS)


def report_page(group_by: str, *, from_events: bool = False, all_time: bool = False,
                strays_kept: bool = True) -> str:
    """Groups in key order (no key last), one page; $4 limit, $5 offset. Each row also carries
    the number of groups and the totals (total_sends...: the sums over every group, which are the
    sums over every event), so one pass serves the page and the totals. Summed from the rollup
    where it has the grouping, by message as BY_MESSAGE says, and with ``from_events`` from the
    events themselves. ``all_time``: $2 and $3 will be NULL (by message, a cheaper query).
    ``strays_kept``: report_strays is whole (0029 recorded); if not, by message over a range finds
    its strays from the events (_STRAYS_SCANNED)."""
    if group_by == "message" and not from_events:
        return BY_MESSAGE_ALL_TIME if all_time else BY_MESSAGE if strays_kept else BY_MESSAGE_SCANNED
    if group_by in ROLLUP_KEYS and not from_events:
        groups = ROLLUP.format(key=ROLLUP_KEYS[group_by])
    else:
        groups = f"WITH ev AS ({EVENTS}) SELECT {GROUP_KEYS[group_by]} AS key, {_SUMS} FROM ev GROUP BY 1"
    return (
        f"WITH g AS ({groups})"
        " SELECT *, count(*) OVER () AS total_groups, (sum(sends) OVER ())::bigint AS total_sends,"
        " (sum(clicks) OVER ())::bigint AS total_clicks, (sum(conversions) OVER ())::bigint AS total_conversions,"
        " sum(revenue) OVER () AS total_revenue"
        " FROM g ORDER BY key NULLS LAST LIMIT $4 OFFSET $5"
    )


# A contact's journey across the account's lists, oldest first; at one instant sent < clicked <
# converted. Converted events are approved postback conversions credited to the contact (revenue:
# their ledger) and revenue records of the contact's messages. $1 account id, $2 phone.
# A message's first click and revenue records are probed by its id (LATERAL: a LIMIT, or OFFSET 0
# where it has any number), never joined: for a contact with a few hundred messages the planner
# hashed the whole message_clicks and revenue tables, every account's (155-170 ms for 1000
# messages among 1.2M, 240k first clicks and 24k revenue records; 40-85 ms probed).
JOURNEY = """
SELECT * FROM (
    SELECT 'sent' AS type, 0 AS rank, m.sent_at AS at, m.id AS message_id, m.offer_id, NULL::numeric AS revenue,
           NULL::text AS attribution_type, 0 AS conversions
    FROM messages m WHERE m.account_id = $1 AND m.to_phone = $2
    UNION ALL
    SELECT 'clicked', 1, mc.clicked_at, m.id, coalesce(mc.offer_id, m.offer_id), NULL, NULL, 0
    FROM messages m
    CROSS JOIN LATERAL (SELECT clicked_at, offer_id FROM message_clicks WHERE message_id = m.id LIMIT 1) mc
    WHERE m.account_id = $1 AND m.to_phone = $2
    UNION ALL
    SELECT 'converted', 2, c.converted_at, c.message_id, c.offer_id,
           coalesce((SELECT sum(a.amount) FROM conversion_adjustments a WHERE a.conversion_id = c.id), 0),
           NULL, 1
    FROM conversions c WHERE c.account_id = $1 AND c.contact_phone = $2 AND c.status = 'approved'
    UNION ALL
    SELECT 'converted', 2, r.occurred_at, r.message_id, coalesce(r.offer_id, m.offer_id), r.amount,
           r.attribution_type, (r.attribution_type = 'sale')::int
    FROM messages m
    CROSS JOIN LATERAL (SELECT account_id, occurred_at, offer_id, amount, attribution_type, message_id FROM revenue
                        WHERE message_id = m.id OFFSET 0) r
    WHERE r.account_id = $1 AND m.account_id = $1 AND m.to_phone = $2
) events
ORDER BY at, rank, message_id
"""
