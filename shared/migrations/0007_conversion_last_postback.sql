-- Postbacks move a conversion in the order they were received (their id). Two batches can take
-- postbacks of one conversion at once and commit in either order: each conversion keeps the id of
-- the latest postback applied to it, and an earlier one that comes after it is skipped, so the
-- final state never depends on which batch committed first.
ALTER TABLE conversions ADD COLUMN last_postback_id bigint;
