-- Postbacks received while PostgreSQL was unavailable are spooled in Redis and stored later by the
-- worker (shared/postback_store.py). spool_id is the spool entry's id: unique, so a spooled
-- postback is stored once even if the worker dies between its commit and the entry's delete.
-- Adding a column without a default rewrites nothing; the index holds only spooled postbacks
-- (building it reads the table once).
ALTER TABLE postbacks ADD COLUMN spool_id text;
CREATE UNIQUE INDEX postbacks_spool_id ON postbacks (spool_id) WHERE spool_id IS NOT NULL;
