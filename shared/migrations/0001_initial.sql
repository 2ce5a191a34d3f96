-- Trackly schema v1. Money is NUMERIC(18,6); every timestamp is timestamptz (UTC).
-- Configuration tables (accounts, lists, offers, links) and the money tables carry foreign keys.
-- The high-volume event tables (messages, message_links, clicks, message_clicks, contacts) do
-- not: their per-row FK triggers cost 2.5x on bulk inserts (measured: 1000 messages 9 ms -> 3.4 ms).
-- Their references are checked by the code that writes them (account-scoped lookups first).

CREATE TABLE accounts (
    id                 bigserial PRIMARY KEY,
    name               text        NOT NULL,
    api_key_hash       bytea       NOT NULL UNIQUE,          -- sha256 of the plain key
    postback_token     text        NOT NULL UNIQUE,
    offer_management   boolean     NOT NULL DEFAULT true,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE lists (
    id                 bigserial PRIMARY KEY,
    account_id         bigint      NOT NULL REFERENCES accounts(id),
    name               text        NOT NULL,
    phone_number       text        NOT NULL,
    status             text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    short_domain       text,
    tracker_domain     text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, phone_number)
);

CREATE TABLE offers (
    id                 text        PRIMARY KEY,
    account_id         bigint      NOT NULL REFERENCES accounts(id),
    name               text        NOT NULL,
    destination_url    text        NOT NULL,
    external_id        text,
    status             text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused', 'deleted')),
    payout             numeric(18,6) CHECK (payout >= 0),
    currency           text        NOT NULL DEFAULT 'USD',
    click_window_days  integer     NOT NULL DEFAULT 90 CHECK (click_window_days BETWEEN 1 AND 90),
    affiliate_id       text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX offers_external_id ON offers (account_id, external_id)
    WHERE external_id IS NOT NULL AND status <> 'deleted';
CREATE INDEX offers_account ON offers (account_id, created_at);

CREATE TABLE links (
    id                 text        PRIMARY KEY COLLATE "C",  -- 6 chars, case-sensitive
    account_id         bigint      NOT NULL REFERENCES accounts(id),
    offer_id           text        NOT NULL REFERENCES offers(id),
    list_id            bigint      NOT NULL REFERENCES lists(id),
    domain             text        NOT NULL,                 -- short domain as configured, e.g. https://sms.example.com
    domain_host        text        NOT NULL,                 -- lower-case hostname used for matching
    tracker_id         uuid        NOT NULL UNIQUE,
    tracker_url        text        NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX links_account_host ON links (account_id, domain_host);
CREATE INDEX links_offer ON links (offer_id);

CREATE TABLE messages (
    id                 text        PRIMARY KEY COLLATE "C",  -- 8 chars
    account_id         bigint      NOT NULL,
    list_id            bigint      NOT NULL,
    to_phone           text        NOT NULL,
    body               text,
    status             text        NOT NULL DEFAULT 'queued',
    offer_id           text,
    creative_id        text,
    schedule_id        text,                                 -- the campaign
    sent_at            timestamptz NOT NULL,
    source             text        NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'history')),
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_account_sent ON messages (account_id, sent_at);
CREATE INDEX messages_account_phone ON messages (account_id, to_phone);

-- One short code per (message, link in its body): the per-message short URL.
CREATE TABLE message_links (
    code               text        PRIMARY KEY COLLATE "C",  -- 7 chars
    message_id         text        NOT NULL,
    link_id            text        NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX message_links_message ON message_links (message_id);

-- Every raw click the edge recorded (and imported history clicks), bots included.
CREATE TABLE clicks (
    id                 text        PRIMARY KEY,              -- click id minted at the edge
    account_id         bigint      NOT NULL,
    link_id            text,
    offer_id           text,
    list_id            bigint,
    message_id         text,
    clicked_at         timestamptz NOT NULL,
    ip                 text,
    user_agent         text,
    country_code       text,
    is_bot             boolean     NOT NULL DEFAULT false,
    params             jsonb       NOT NULL DEFAULT '{}',
    source             text        NOT NULL DEFAULT 'edge' CHECK (source IN ('edge', 'history')),
    stored_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX clicks_message ON clicks (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX clicks_account_at ON clicks (account_id, clicked_at);

-- The engagement: a message's first human click. One row per message.
CREATE TABLE message_clicks (
    message_id         text        PRIMARY KEY,
    click_id           text        NOT NULL,
    account_id         bigint      NOT NULL,
    offer_id           text,
    clicked_at         timestamptz NOT NULL,
    source             text        NOT NULL DEFAULT 'edge'
);
CREATE INDEX message_clicks_account_at ON message_clicks (account_id, clicked_at);

CREATE TABLE contacts (
    account_id         bigint      NOT NULL,
    list_id            bigint      NOT NULL,
    phone_number       text        NOT NULL,
    messages_received  integer     NOT NULL DEFAULT 0,
    last_sent_at       timestamptz,
    click_count        integer     NOT NULL DEFAULT 0,
    last_clicked_at    timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (list_id, phone_number)
);
CREATE INDEX contacts_account_phone ON contacts (account_id, phone_number);

-- Raw postbacks, stored before anything else happens to them.
CREATE TABLE postbacks (
    id                 bigserial   PRIMARY KEY,
    account_id         bigint      NOT NULL REFERENCES accounts(id),
    received_at        timestamptz NOT NULL DEFAULT now(),
    method             text        NOT NULL,
    params             jsonb       NOT NULL,                 -- exactly what the network sent
    network            text        NOT NULL DEFAULT 'default',
    conversion_key     text,                                 -- conversion_id, else click:<click_id>
    click_id           text,
    status             text,
    payout             numeric(18,6),
    currency           text,
    offer_ref          text,
    converted_at       timestamptz,
    parse_error        text,
    dedupe_key         text,                                 -- NULL for duplicates
    is_duplicate       boolean     NOT NULL DEFAULT false,
    processed_at       timestamptz,
    process_error      text
);
CREATE UNIQUE INDEX postbacks_dedupe ON postbacks (account_id, dedupe_key) WHERE dedupe_key IS NOT NULL;
CREATE INDEX postbacks_unprocessed ON postbacks (received_at) WHERE processed_at IS NULL AND NOT is_duplicate;

CREATE TABLE conversions (
    id                 bigserial   PRIMARY KEY,
    account_id         bigint      NOT NULL REFERENCES accounts(id),
    network            text        NOT NULL,
    conversion_key     text        NOT NULL,
    click_id           text,
    status             text        NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'reversed')),
    payout             numeric(18,6) NOT NULL DEFAULT 0,
    currency           text        NOT NULL DEFAULT 'USD',
    converted_at       timestamptz NOT NULL,
    offer_id           text,
    attributed         boolean     NOT NULL DEFAULT false,
    unattributed_reason text,                                -- click_not_found | expired | before_click | bot_click | no_click_id
    message_id         text        REFERENCES messages(id),
    link_id            text,
    list_id            bigint,
    creative_id        text,
    schedule_id        text,
    contact_phone      text,
    clicked_at         timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, network, conversion_key)
);
CREATE INDEX conversions_click ON conversions (click_id) WHERE NOT attributed AND click_id IS NOT NULL;
CREATE INDEX conversions_message ON conversions (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX conversions_account_at ON conversions (account_id, converted_at);

-- Revenue ledger of postback conversions: every status move writes its delta; nothing is deleted.
CREATE TABLE conversion_adjustments (
    id                 bigserial   PRIMARY KEY,
    conversion_id      bigint      NOT NULL REFERENCES conversions(id),
    postback_id        bigint      REFERENCES postbacks(id),
    from_status        text,
    to_status          text        NOT NULL,
    amount             numeric(18,6) NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversion_adjustments_conversion ON conversion_adjustments (conversion_id);

-- Revenue recorded through /revenue, /revenue/bulk and /history/revenue.
CREATE TABLE revenue (
    id                 text        PRIMARY KEY,
    account_id         bigint      NOT NULL REFERENCES accounts(id),
    message_id         text        NOT NULL REFERENCES messages(id),
    offer_id           text        REFERENCES offers(id),
    amount             numeric(18,6) NOT NULL CHECK (amount >= 0),
    attribution_type   text        NOT NULL CHECK (attribution_type IN ('sale', 'click', 'send')),
    occurred_at        timestamptz NOT NULL,
    external_id        text,
    source             text        NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'history')),
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX revenue_external_id ON revenue (account_id, external_id) WHERE external_id IS NOT NULL;
CREATE INDEX revenue_message ON revenue (message_id);
CREATE INDEX revenue_account_at ON revenue (account_id, occurred_at);
