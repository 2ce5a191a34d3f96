-- A performance report grouped by offer, creative, campaign, list or date summed every event of the
-- account in the range (services/gateway/attribution_sql.py, EVENTS): 5-7 s over all time for an
-- account with 1.6M messages. Those groupings now sum report_rollup: per account, UTC day and
-- (offer, creative, campaign, list), how many events, sends, clicks, conversions and how much
-- revenue. (Grouped by message, a report still reads the events: a message is its own group.)
--
-- Kept by statement-level triggers with transition tables on every table an event comes from,
-- each appending its statement's deltas, grouped (so a send of 1000 messages adds a row or a few):
--   messages                INSERT          a send, at sent_at, under the message's keys
--   message_clicks          INSERT, UPDATE  a first human click, at clicked_at, under the click's
--                                           offer (else the message's) and the message's other keys;
--                                           an earlier click that replaces it moves it
--   conversions             INSERT, UPDATE  a conversion, at converted_at, under its own keys;
--                                           counted while approved, worth its ledger; an update
--                                           takes the old row out and puts the new one in
--                                           (attribution changes its keys, a status move its count)
--   conversion_adjustments  INSERT          its amount, under its conversion's keys of the moment
--   revenue                 INSERT          a record, at occurred_at, under its offer (else the
--                                           message's) and the message's keys; a sale is a conversion
-- A ledger entry is written in a statement of its own, after the one that creates or changes its
-- conversion (a conversion's trigger counts the ledger as it stands, an entry's trigger adds the
-- entry: the same statement doing both would count it twice). A conversion's ledger and its keys
-- are written under the conversion's row lock (the worker locks it FOR UPDATE first), so an
-- adjustment always lands under the keys its conversion has when it commits, and a change of keys
-- moves the whole ledger. Messages are never updated or
-- deleted, nor are clicks, adjustments or revenue records deleted: nothing counts that.
--
-- events is how many events a row stands for: a group is in a report when it has any (a pending
-- conversion is an event worth nothing). The worker folds each (account, day)'s new rows into one
-- per key now and then (services/worker/folding.py); `folded` marks the rows it wrote.
-- Written to run again (shared/migrate.py) if the backfill failed after this part committed: what
-- the triggers counted meanwhile is emptied below, and the backfill starts over. Replacing rather
-- than dropping: dropping a trigger would lock its table against readers too.
CREATE TABLE IF NOT EXISTS report_rollup (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint  NOT NULL,
    day         date    NOT NULL,  -- UTC
    offer       text,
    creative    text,
    campaign    text,
    list        bigint,
    events      bigint  NOT NULL,
    sends       bigint  NOT NULL,
    clicks      bigint  NOT NULL,
    conversions bigint  NOT NULL,
    revenue     numeric NOT NULL,
    folded      boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS report_rollup_account_day ON report_rollup (account_id, day);
CREATE INDEX IF NOT EXISTS report_rollup_unfolded ON report_rollup (account_id, day) WHERE NOT folded;

-- One trigger function for every table: each trigger gives, as its argument, the query of its
-- statement's deltas, rows of (account, time, keys, events, sends, clicks, conversions, revenue);
-- they are added grouped by account, UTC day and keys, rows that come to nothing dropped. Run with
-- EXECUTE, so planned for each statement's own rows: a plan kept from a connection's first call is
-- sized for that call's transition table (after a first drain of 30,000 clicks, every later drain
-- on the connection merge-joined all of messages: 230 ms for one click at 1.5M messages).
CREATE OR REPLACE FUNCTION report_rollup_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format($f$
        INSERT INTO report_rollup (account_id, day, offer, creative, campaign, list, events, sends, clicks, conversions, revenue)
        SELECT account_id, (at AT TIME ZONE 'UTC')::date, offer, creative, campaign, list,
               sum(events), sum(sends), sum(clicks), sum(conversions), sum(revenue)
        FROM (%s) AS d(account_id, at, offer, creative, campaign, list, events, sends, clicks, conversions, revenue)
        GROUP BY 1, 2, 3, 4, 5, 6
        HAVING sum(events) <> 0 OR sum(sends) <> 0 OR sum(clicks) <> 0 OR sum(conversions) <> 0 OR sum(revenue) <> 0
    $f$, TG_ARGV[0]);
    RETURN NULL;
END
$$;

-- Creating the triggers locks each table against writers until this part commits; the runner
-- exports this transaction's snapshot before it does. The backfill below reads that snapshot, on
-- another connection, after the commit: exactly the rows from before the triggers (nothing could
-- write in between), while writers go on and the triggers count theirs. So writers wait for the
-- DDL only, not for the backfill (about 3 s per million events); reports read the rollup once the
-- backfill has committed and recorded this version (before that, the events).

-- A send.
CREATE OR REPLACE TRIGGER messages_report_rollup AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_messages FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT account_id, sent_at, offer_id, creative_id, schedule_id, list_id, 1, 1, 0, 0, 0::numeric
        FROM new_messages
    $q$);

-- A message's first human click.
CREATE OR REPLACE TRIGGER message_clicks_report_rollup_insert AFTER INSERT ON message_clicks
    REFERENCING NEW TABLE AS new_clicks FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT n.account_id, n.clicked_at, coalesce(n.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
               1, 0, 1, 0, 0::numeric
        FROM new_clicks n JOIN messages m ON m.id = n.message_id AND m.account_id = n.account_id
    $q$);

-- A first click replaced by an earlier one: the old out, the new in.
CREATE OR REPLACE TRIGGER message_clicks_report_rollup_update AFTER UPDATE ON message_clicks
    REFERENCING OLD TABLE AS old_clicks NEW TABLE AS new_clicks
    FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT x.account_id, x.clicked_at, coalesce(x.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
               x.sign, 0, x.sign, 0, 0::numeric
        FROM (SELECT account_id, clicked_at, offer_id, message_id, -1 FROM old_clicks
              UNION ALL SELECT account_id, clicked_at, offer_id, message_id, 1 FROM new_clicks)
            AS x(account_id, clicked_at, offer_id, message_id, sign)
        JOIN messages m ON m.id = x.message_id AND m.account_id = x.account_id
    $q$);

-- A conversion: counted while approved, worth its ledger.
CREATE OR REPLACE TRIGGER conversions_report_rollup_insert AFTER INSERT ON conversions
    REFERENCING NEW TABLE AS new_conversions FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT n.account_id, n.converted_at, n.offer_id, n.creative_id, n.schedule_id, n.list_id,
               1, 0, 0, (n.status = 'approved')::int,
               coalesce((SELECT sum(a.amount) FROM conversion_adjustments a WHERE a.conversion_id = n.id), 0)
        FROM new_conversions n
    $q$);

-- A conversion changed (attributed, moved): the old row out, the new one in; its ledger moves with
-- its keys.
CREATE OR REPLACE TRIGGER conversions_report_rollup_update AFTER UPDATE ON conversions
    REFERENCING OLD TABLE AS old_conversions NEW TABLE AS new_conversions
    FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT x.account_id, x.converted_at, x.offer_id, x.creative_id, x.schedule_id, x.list_id,
               x.sign, 0, 0, x.sign * (x.status = 'approved')::int,
               x.sign * coalesce((SELECT sum(a.amount) FROM conversion_adjustments a WHERE a.conversion_id = x.id), 0)
        FROM (SELECT id, account_id, converted_at, offer_id, creative_id, schedule_id, list_id, status, -1
              FROM old_conversions
              UNION ALL
              SELECT id, account_id, converted_at, offer_id, creative_id, schedule_id, list_id, status, 1
              FROM new_conversions)
            AS x(id, account_id, converted_at, offer_id, creative_id, schedule_id, list_id, status, sign)
    $q$);

-- A ledger entry: revenue under its conversion's keys.
CREATE OR REPLACE TRIGGER conversion_adjustments_report_rollup AFTER INSERT ON conversion_adjustments
    REFERENCING NEW TABLE AS new_adjustments FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT c.account_id, c.converted_at, c.offer_id, c.creative_id, c.schedule_id, c.list_id, 0, 0, 0, 0, n.amount
        FROM new_adjustments n JOIN conversions c ON c.id = n.conversion_id
    $q$);

-- A revenue record (a sale is a conversion).
CREATE OR REPLACE TRIGGER revenue_report_rollup AFTER INSERT ON revenue
    REFERENCING NEW TABLE AS new_revenue FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT n.account_id, n.occurred_at, coalesce(n.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
               1, 0, 0, (n.attribution_type = 'sale')::int, n.amount
        FROM new_revenue n JOIN messages m ON m.id = n.message_id
    $q$);

TRUNCATE report_rollup;  -- what triggers of a run whose backfill failed counted

-- trackly: backfill from the snapshot above
-- Everything stored before the triggers, as the events of attribution_sql.EVENTS, folded.
INSERT INTO report_rollup (account_id, day, offer, creative, campaign, list, events, sends, clicks, conversions, revenue, folded)
SELECT account_id, (at AT TIME ZONE 'UTC')::date, offer, creative, campaign, list,
       count(*), sum(sends), sum(clicks), sum(conversions), sum(revenue), true
FROM (
    SELECT m.account_id, m.sent_at, m.offer_id, m.creative_id, m.schedule_id, m.list_id, 1, 0, 0, 0::numeric
    FROM messages m
    UNION ALL
    SELECT mc.account_id, mc.clicked_at, coalesce(mc.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
           0, 1, 0, 0
    FROM message_clicks mc JOIN messages m ON m.id = mc.message_id AND m.account_id = mc.account_id
    UNION ALL
    SELECT c.account_id, c.converted_at, c.offer_id, c.creative_id, c.schedule_id, c.list_id, 0, 0,
           (c.status = 'approved')::int,
           coalesce((SELECT sum(a.amount) FROM conversion_adjustments a WHERE a.conversion_id = c.id), 0)
    FROM conversions c
    UNION ALL
    SELECT r.account_id, r.occurred_at, coalesce(r.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
           0, 0, (r.attribution_type = 'sale')::int, r.amount
    FROM revenue r JOIN messages m ON m.id = r.message_id
) AS e(account_id, at, offer, creative, campaign, list, sends, clicks, conversions, revenue)
GROUP BY 1, 2, 3, 4, 5, 6;
