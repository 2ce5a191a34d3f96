-- The report rollup's triggers (0016) look up each new row's message (or conversion) with a plain
-- join. Planned for each statement, that join read the whole messages table whenever a seq scan
-- and hash looked cheaper than one index probe per new row, which it does until messages holds a
-- few hundred thousand rows: at 60,000 messages the rollup of a 1000-click import took 15-20 ms
-- against 4-7 ms for the probes (EXPLAIN ANALYZE), and the cost grew with the table, not with the statement. Each
-- lookup is now a LATERAL subquery with LIMIT 1 (the key is unique, so it changes no result; a
-- subquery with a LIMIT is never flattened into a join), so a trigger reads one index entry per
-- row of its own statement, whatever the size of the table. The subquery has the key alone: a
-- message's account is compared outside it (no condition is pushed into a subquery with a LIMIT).
-- Inside, the planner may read the account's messages through their own index instead, all of
-- them per row, when statistics call the account small: the gateway's lookups of the same shape
-- did, 0.8 s per 1000 rows for an account of 6,500 messages analyzed when it had none.
--
-- The function the triggers call, as 0016 defines it: 0016 as first released gave each trigger a
-- function of its own and had no report_rollup_count, so on a database migrated then this
-- migration failed and none after it could be applied. (Its other triggers keep their functions.)
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

CREATE OR REPLACE TRIGGER message_clicks_report_rollup_insert AFTER INSERT ON message_clicks
    REFERENCING NEW TABLE AS new_clicks FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT n.account_id, n.clicked_at, coalesce(n.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
               1, 0, 1, 0, 0::numeric
        FROM new_clicks n
        CROSS JOIN LATERAL (
            SELECT offer_id, creative_id, schedule_id, list_id, account_id FROM messages
            WHERE id = n.message_id LIMIT 1
        ) m
        WHERE m.account_id = n.account_id
    $q$);

CREATE OR REPLACE TRIGGER message_clicks_report_rollup_update AFTER UPDATE ON message_clicks
    REFERENCING OLD TABLE AS old_clicks NEW TABLE AS new_clicks
    FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT x.account_id, x.clicked_at, coalesce(x.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
               x.sign, 0, x.sign, 0, 0::numeric
        FROM (SELECT account_id, clicked_at, offer_id, message_id, -1 FROM old_clicks
              UNION ALL SELECT account_id, clicked_at, offer_id, message_id, 1 FROM new_clicks)
            AS x(account_id, clicked_at, offer_id, message_id, sign)
        CROSS JOIN LATERAL (
            SELECT offer_id, creative_id, schedule_id, list_id, account_id FROM messages
            WHERE id = x.message_id LIMIT 1
        ) m
        WHERE m.account_id = x.account_id
    $q$);

CREATE OR REPLACE TRIGGER conversion_adjustments_report_rollup AFTER INSERT ON conversion_adjustments
    REFERENCING NEW TABLE AS new_adjustments FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT c.account_id, c.converted_at, c.offer_id, c.creative_id, c.schedule_id, c.list_id, 0, 0, 0, 0, n.amount
        FROM new_adjustments n
        CROSS JOIN LATERAL (
            SELECT account_id, converted_at, offer_id, creative_id, schedule_id, list_id FROM conversions
            WHERE id = n.conversion_id LIMIT 1
        ) c
    $q$);

CREATE OR REPLACE TRIGGER revenue_report_rollup AFTER INSERT ON revenue
    REFERENCING NEW TABLE AS new_revenue FOR EACH STATEMENT EXECUTE FUNCTION report_rollup_count($q$
        SELECT n.account_id, n.occurred_at, coalesce(n.offer_id, m.offer_id), m.creative_id, m.schedule_id, m.list_id,
               1, 0, 0, (n.attribution_type = 'sale')::int, n.amount
        FROM new_revenue n
        CROSS JOIN LATERAL (
            SELECT offer_id, creative_id, schedule_id, list_id FROM messages WHERE id = n.message_id LIMIT 1
        ) m
    $q$);
