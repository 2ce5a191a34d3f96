-- Messages whose first click a history import (POST /history/clicks) stored while a conversion
-- naming the message (its click_id is the message id: aff_sub={{sendId}}) waited for one. The
-- import writes the request in its own transaction; the worker's sweeper re-matches and deletes
-- it in one transaction (services/worker/attribution.py, rematch_requested). The sweeper's own
-- re-match looks back a day only, and a history import is typically about messages and
-- conversions older than that.
CREATE TABLE rematch_requests (
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL,
    click_id text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now()
);
