-- Reports by message (services/gateway/attribution_sql.py, BY_MESSAGE) ask on every page whether
-- the range has conversions credited to no message (the NULL group) and sum them when the page
-- holds it: without this index, both read every conversion of the account in the range.
CREATE INDEX conversions_without_message ON conversions (account_id, converted_at) WHERE message_id IS NULL;
