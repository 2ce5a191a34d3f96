-- A postback token can be replaced (trackly admin rotate-postback-token) while the one it replaces
-- keeps working for a while: networks hold the token in the postback URLs they were given, and are
-- moved to the new one one by one. Adding nullable columns without defaults rewrites nothing.
ALTER TABLE accounts ADD COLUMN previous_postback_token text;
ALTER TABLE accounts ADD COLUMN previous_postback_token_until timestamptz;
CREATE UNIQUE INDEX accounts_previous_postback_token_key ON accounts (previous_postback_token)
    WHERE previous_postback_token IS NOT NULL;
