-- contacts.messages_received and last_sent_at were kept up to date by every send and read by
-- nothing: a contact's journey counts its messages (indexed by account and phone). A send now
-- only creates the contact rows it does not have yet.
ALTER TABLE contacts DROP COLUMN IF EXISTS messages_received, DROP COLUMN IF EXISTS last_sent_at;
