-- Message and link ids are compared byte for byte ("C", as messages.id, links.id and
-- message_links.code are). The columns that refer to them had the database's default collation:
-- a comparison between the two takes the "C" side's, and the default-collation indexes on the
-- referring side could not serve it (message detail and the revenue offer lookup scanned
-- clicks, conversions, revenue and message_links whole, once per message). Same type, so no
-- table is rewritten; the indexes on these columns are rebuilt.
ALTER TABLE message_links
    ALTER COLUMN message_id TYPE text COLLATE "C",
    ALTER COLUMN link_id TYPE text COLLATE "C";
ALTER TABLE clicks
    ALTER COLUMN message_id TYPE text COLLATE "C",
    ALTER COLUMN link_id TYPE text COLLATE "C";
ALTER TABLE message_clicks
    ALTER COLUMN message_id TYPE text COLLATE "C";
ALTER TABLE conversions
    ALTER COLUMN message_id TYPE text COLLATE "C",
    ALTER COLUMN link_id TYPE text COLLATE "C";
ALTER TABLE revenue
    ALTER COLUMN message_id TYPE text COLLATE "C";
