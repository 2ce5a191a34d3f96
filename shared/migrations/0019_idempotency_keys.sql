-- Idempotency-Key on POST /send and /send/bulk (services/gateway/idempotency.py): the answer to
-- a request that stored messages, written in the same transaction as the messages, so a client
-- that retries after a timeout or a gateway crash gets that answer instead of a second send.
-- Kept for shared.idempotency.KEEP; the worker deletes older rows.
CREATE TABLE idempotency_keys (
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    key text NOT NULL,
    fingerprint bytea NOT NULL,  -- SHA-256 of the method, path and body of the request
    status smallint NOT NULL,
    response bytea NOT NULL,     -- the JSON body as it was sent
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
