-- Money is stored exactly as it was given: NUMERIC without a scale, where it was NUMERIC(18,6),
-- which rounded every amount to the millionth (CONTRACT.md: "stored exactly"). shared/money.py
-- bounds what is accepted (less than 10^12, at most 30 places). Dropping a numeric's scale is a
-- change of type modifier only: PostgreSQL neither rewrites the tables nor rebuilds their indexes,
-- so this takes each table's lock for a moment. The CHECK constraints stay as they were.
ALTER TABLE offers ALTER COLUMN payout TYPE numeric;
ALTER TABLE postbacks ALTER COLUMN payout TYPE numeric;
ALTER TABLE conversions ALTER COLUMN payout TYPE numeric;
ALTER TABLE conversion_adjustments ALTER COLUMN amount TYPE numeric;
ALTER TABLE revenue ALTER COLUMN amount TYPE numeric;
