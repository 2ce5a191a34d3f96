-- A report by message over a range lists the range's "strays": messages with an event in it (a
-- first click, a conversion, a revenue record) but sent outside it (services/gateway/attribution_sql.py,
-- BY_MESSAGE). Finding them read every event of the account in the range and the message of each,
-- to compare its sent_at with the range: one index probe per event, or, once the planner counted
-- enough events to prefer it, every account's messages read and hashed (with 1.2M messages, a
-- month of an account of 1M: 200-290 ms; a week, when the planner chose it, 260-290 ms).
--
-- report_strays keeps, per account, UTC day of the event and message, the events of that day whose
-- message was sent on another UTC day, with that day: the only events that can make a stray of
-- their message (an event on its message's send day is in a range of whole days with its send, or
-- not at all). A few rows per hundred messages. Rows are deltas, as report_rollup's: a first click
-- replaced by an earlier one, a conversion moved to another message or time take the old row out
-- (-1) and put the new one in; a statement that changes none of that (a status move) adds nothing.
-- The true count of a (day, message) is never negative, so a message has an event in a range when
-- its rows there sum above 0. Nothing folds them: a row per such event, and a pair per move.
--
-- Kept by the report rollup's triggers on message_clicks, conversions and revenue (0016, 0021), in
-- the same statement as the rollup: each trigger's query now also gives each row's message and its
-- sent_at. The message is the one the rollup and the report's events take (a first click's, with
-- its account; a revenue record's), and for a conversion its message_id's, looked up by primary key
-- (LATERAL with LIMIT 1: 0021 says why). The report reads report_strays once this migration is
-- recorded, with its backfill (attribution_sql.STRAYS_VERSION); before, it finds them as it did.
CREATE TABLE IF NOT EXISTS report_strays (
    account_id  bigint NOT NULL,
    day         date   NOT NULL,  -- the event's, UTC
    message_id  text   NOT NULL COLLATE "C",
    sent_day    date   NOT NULL,  -- its message's, UTC; never the same as day
    events      bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS report_strays_account_day ON report_strays (account_id, day);

CREATE OR REPLACE FUNCTION report_rollup_strays_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format($f$
        WITH d AS MATERIALIZED (
            SELECT account_id, at, offer, creative, campaign, list, events, sends, clicks, conversions, revenue,
                   message, (at AT TIME ZONE 'UTC')::date AS day, (sent_at AT TIME ZONE 'UTC')::date AS sent_day
            FROM (%s) AS d(account_id, at, offer, creative, campaign, list, events, sends, clicks, conversions,
                           revenue, message, sent_at)
        ), strays AS (
            INSERT INTO report_strays (account_id, day, message_id, sent_day, events)
            SELECT account_id, day, message, sent_day, sum(events)
            FROM d WHERE message IS NOT NULL AND day <> sent_day
            GROUP BY 1, 2, 3, 4
            HAVING sum(events) <> 0
        )
        INSERT INTO report_rollup (account_id, day, offer, creative, campaign, list, events, sends, clicks, conversions, revenue)
        SELECT account_id, day, offer, creative, campaign, list,
               sum(events), sum(sends), sum(clicks), sum(conversions), sum(revenue)
        FROM d
        GROUP BY 1, 2, 3, 4, 5, 6
        HAVING sum(events) <> 0 OR sum(sends) <> 0 OR sum(clicks) <> 0 OR sum(conversions) <> 0 OR sum(revenue) <> 0
    $f$, TG_ARGV[0]);
    RETURN NULL;
END
$$;

-- The rollup's triggers on the tables of those events, as 0016 and 0021 have them, each with the two
-- columns more. (Those of sends and ledger entries keep report_rollup_count: never a stray.)
CREATE OR REPLACE TRIGGER message_clicks_report_rollup_insert AFTER INSERT ON message_clicks
    REFERENCING NEW TABLE AS new_clicks FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_strays_count($q$
        SELECT n.account_id, n.clicked_at, coalesce(n.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
               1, 0, 1, 0, 0::numeric, n.message_id, m.sent_at
        FROM new_clicks n
        CROSS JOIN LATERAL (
            SELECT offer_id, creative_id, schedule_id, list_id, account_id, sent_at FROM messages
            WHERE id = n.message_id LIMIT 1
        ) m
        WHERE m.account_id = n.account_id
    $q$);

CREATE OR REPLACE TRIGGER message_clicks_report_rollup_update AFTER UPDATE ON message_clicks
    REFERENCING OLD TABLE AS old_clicks NEW TABLE AS new_clicks
    FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_strays_count($q$
        SELECT x.account_id, x.clicked_at, coalesce(x.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
               x.sign, 0, x.sign, 0, 0::numeric, x.message_id, m.sent_at
        FROM (SELECT account_id, clicked_at, offer_id, message_id, -1 FROM old_clicks
              UNION ALL SELECT account_id, clicked_at, offer_id, message_id, 1 FROM new_clicks)
            AS x(account_id, clicked_at, offer_id, message_id, sign)
        CROSS JOIN LATERAL (
            SELECT offer_id, creative_id, schedule_id, list_id, account_id, sent_at FROM messages
            WHERE id = x.message_id LIMIT 1
        ) m
        WHERE m.account_id = x.account_id
    $q$);

CREATE OR REPLACE TRIGGER conversions_report_rollup_insert AFTER INSERT ON conversions
    REFERENCING NEW TABLE AS new_conversions FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_strays_count($q$
        SELECT n.account_id, n.converted_at, n.offer_id, n.creative_id, n.schedule_id, n.list_id,
               1, 0, 0, (n.status = 'approved')::int,
               coalesce((SELECT sum(a.amount) FROM conversion_adjustments a WHERE a.conversion_id = n.id), 0),
               n.message_id, m.sent_at
        FROM new_conversions n
        LEFT JOIN LATERAL (SELECT sent_at FROM messages WHERE id = n.message_id LIMIT 1) m ON true
    $q$);

CREATE OR REPLACE TRIGGER conversions_report_rollup_update AFTER UPDATE ON conversions
    REFERENCING OLD TABLE AS old_conversions NEW TABLE AS new_conversions
    FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_strays_count($q$
        SELECT x.account_id, x.converted_at, x.offer_id, x.creative_id, x.schedule_id, x.list_id,
               x.sign, 0, 0, x.sign * (x.status = 'approved')::int,
               x.sign * coalesce((SELECT sum(a.amount) FROM conversion_adjustments a WHERE a.conversion_id = x.id), 0),
               x.message_id, m.sent_at
        FROM (SELECT id, account_id, converted_at, offer_id, creative_id, schedule_id, list_id, status, message_id, -1
              FROM old_conversions
              UNION ALL
              SELECT id, account_id, converted_at, offer_id, creative_id, schedule_id, list_id, status, message_id, 1
              FROM new_conversions)
            AS x(id, account_id, converted_at, offer_id, creative_id, schedule_id, list_id, status, message_id, sign)
        LEFT JOIN LATERAL (SELECT sent_at FROM messages WHERE id = x.message_id LIMIT 1) m ON true
    $q$);

CREATE OR REPLACE TRIGGER revenue_report_rollup AFTER INSERT ON revenue
    REFERENCING NEW TABLE AS new_revenue FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_strays_count($q$
        SELECT n.account_id, n.occurred_at, coalesce(n.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
               1, 0, 0, (n.attribution_type = 'sale')::int, n.amount, n.message_id, m.sent_at
        FROM new_revenue n
        CROSS JOIN LATERAL (
            SELECT offer_id, creative_id, schedule_id, list_id, sent_at FROM messages WHERE id = n.message_id LIMIT 1
        ) m
    $q$);

-- Written to run again if the backfill below failed after this part committed (as 0016).
TRUNCATE report_strays;

-- trackly: backfill from the snapshot above
-- Every event stored before the triggers whose message was sent another UTC day: a first click
-- (its message the account's, as the rollup and the report's events take it), a conversion with a
-- message (any status: each is an event), a revenue record.
INSERT INTO report_strays (account_id, day, message_id, sent_day, events)
SELECT account_id, day, message_id, sent_day, count(*)
FROM (
    SELECT mc.account_id, (mc.clicked_at AT TIME ZONE 'UTC')::date, m.id, (m.sent_at AT TIME ZONE 'UTC')::date
    FROM message_clicks mc JOIN messages m ON m.id = mc.message_id AND m.account_id = mc.account_id
    UNION ALL
    SELECT c.account_id, (c.converted_at AT TIME ZONE 'UTC')::date, m.id, (m.sent_at AT TIME ZONE 'UTC')::date
    FROM conversions c JOIN messages m ON m.id = c.message_id
    UNION ALL
    SELECT r.account_id, (r.occurred_at AT TIME ZONE 'UTC')::date, m.id, (m.sent_at AT TIME ZONE 'UTC')::date
    FROM revenue r JOIN messages m ON m.id = r.message_id
) AS e(account_id, day, message_id, sent_day)
WHERE day <> sent_day
GROUP BY 1, 2, 3, 4;
