-- The gateway asks for a conversion's latest accepted postback on every postback (dedupe).
CREATE INDEX postbacks_conversion_latest ON postbacks (account_id, network, conversion_key, id DESC)
    WHERE dedupe_key IS NOT NULL;
