-- contacts.messages_received and last_sent_at have not been written or read since 0005, which
-- left them for one release so that code from before it could still run beside the new. Dropped
-- now (a change to the catalog only: the rows are not rewritten).
ALTER TABLE contacts DROP COLUMN IF EXISTS messages_received, DROP COLUMN IF EXISTS last_sent_at;
