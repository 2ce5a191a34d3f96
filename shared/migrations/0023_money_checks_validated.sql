-- The CHECK constraints 0022 put back NOT VALID, validated: a read of each table under SHARE
-- UPDATE EXCLUSIVE, which lets reads and writes go on (0022 held ACCESS EXCLUSIVE; this runs in a
-- transaction of its own, after 0022's has committed and released it).
ALTER TABLE offers VALIDATE CONSTRAINT offers_payout_check;
ALTER TABLE revenue VALIDATE CONSTRAINT revenue_amount_check;
