-- A message's per-message short codes derive from its id (shared.ids.message_code): the code of
-- the k-th short link in its body (from 0) is the message id, then k from the second link on.
-- link_ids lists those links in that order (NULL: none). A send used to store a random 7-char code
-- per (message, link) in message_links: a second table, heap and two indexes on the bulk-send
-- path. message_links stays for the messages sent before, which republish still reads.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS link_ids text[];
COMMENT ON TABLE message_links IS 'per-message codes of messages sent before migration 0006; later ones derive from messages.link_ids';
