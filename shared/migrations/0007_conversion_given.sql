-- Whether a postback the conversion applied gave its payout, and whether its first gave its
-- currency. A conversion made before its click was stored, from postbacks that gave neither, had
-- no offer to take them from (0, USD): when the click lands it gets its click's offer's. Rows from
-- before this are taken as given and left as they are.
ALTER TABLE conversions
    ADD COLUMN payout_given boolean NOT NULL DEFAULT true,
    ADD COLUMN currency_given boolean NOT NULL DEFAULT true;
