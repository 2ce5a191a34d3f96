-- contacts.messages_received and last_sent_at were kept up to date by every send and read by
-- nothing: a contact's journey counts its messages (indexed by account and phone). Sends no longer
-- write them. They stay for one release, so that gateways still running the previous release
-- (which write them) keep working during a rolling deploy; a later migration drops them.
COMMENT ON COLUMN contacts.messages_received IS 'deprecated: no longer maintained; to be dropped';
COMMENT ON COLUMN contacts.last_sent_at IS 'deprecated: no longer maintained; to be dropped';
