-- GET /api/v2/postbacks lists an account's postbacks newest first.
CREATE INDEX postbacks_by_account ON postbacks (account_id, id DESC);
