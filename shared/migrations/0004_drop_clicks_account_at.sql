-- Nothing reads raw clicks by (account, time): reports count first clicks (message_clicks), and
-- attribution finds clicks by id. The index cost every drained click an extra index insert on
-- the hottest write path; a future reader of raw clicks by time brings it back with itself.
DROP INDEX IF EXISTS clicks_account_at;
