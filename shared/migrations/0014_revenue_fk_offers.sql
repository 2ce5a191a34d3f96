-- See 0012: revenue's foreign key to offers.
ALTER TABLE revenue DROP CONSTRAINT IF EXISTS revenue_offer_id_fkey;
