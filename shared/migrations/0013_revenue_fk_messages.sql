-- See 0012: revenue's foreign key to messages.
ALTER TABLE revenue DROP CONSTRAINT IF EXISTS revenue_message_id_fkey;
