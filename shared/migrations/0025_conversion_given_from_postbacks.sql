-- 0007 took every conversion stored before it as having been given its payout and currency by a
-- postback. A conversion still waiting for its click then, made from postbacks that gave neither
-- (0 and USD: no offer was known yet), kept 0 and USD when its click landed, where a database that
-- had 0007 all along gives it its click's offer's (services/worker/attribution.py,
-- _default_from_click_offers; the worker before 0007 looked at the postbacks then, as this does).
-- So for the conversions from before 0007 that a click can still attribute: whether a postback
-- the conversion applied (its ledger names it) or one that restated its status and payout gave
-- them, as the worker records it now. Rows written since 0007 are right as they are; a database
-- built with 0007 has none from before it. Row locks on those few rows only.
UPDATE conversions c
SET payout_given = EXISTS (
        SELECT 1 FROM postbacks p
        WHERE p.account_id = c.account_id AND p.network = c.network AND p.conversion_key = c.conversion_key
          AND p.dedupe_key IS NOT NULL AND NOT p.is_duplicate AND p.payout IS NOT NULL
          AND (EXISTS (SELECT 1 FROM conversion_adjustments a WHERE a.conversion_id = c.id AND a.postback_id = p.id)
               OR (p.status = c.status AND p.payout = c.payout))),
    currency_given = EXISTS (
        SELECT 1 FROM postbacks p
        WHERE p.account_id = c.account_id AND p.network = c.network AND p.conversion_key = c.conversion_key
          AND p.dedupe_key IS NOT NULL AND NOT p.is_duplicate AND p.currency IS NOT NULL
          AND (EXISTS (SELECT 1 FROM conversion_adjustments a WHERE a.conversion_id = c.id AND a.postback_id = p.id)
               OR (p.status = c.status AND coalesce(p.payout, c.payout) = c.payout)))
WHERE NOT c.attributed AND c.click_id IS NOT NULL
  AND c.created_at < (SELECT applied_at FROM schema_migrations WHERE version = '0007_conversion_given');
