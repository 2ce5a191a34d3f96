-- The worker resolves a postback's offer_id by internal id, else by external id, deleted offers
-- included (a conversion may name an offer deleted since). The unique index on external ids
-- covers live offers only, so that lookup read every offer of the account: 2.5 s for a batch of
-- 1000 postbacks in an account of 50,000 offers, its postbacks' row locks held meanwhile.
-- (offers is small next to the event tables: a plain CREATE INDEX takes a moment.)
CREATE INDEX offers_account_external_id ON offers (account_id, external_id) WHERE external_id IS NOT NULL;
