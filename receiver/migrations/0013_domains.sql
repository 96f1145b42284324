-- Custom domains: a name attached to one app's production, served once its
-- DNS records were found, and its certificate from ACME.

CREATE TABLE domains (
    id              BIGSERIAL PRIMARY KEY,
    -- Lowercase, without a trailing dot; one app at most.
    name            TEXT NOT NULL UNIQUE,
    app_id          BIGINT NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    -- The value of the TXT record that proves the name is the app owner's.
    token           TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    verified_at     TIMESTAMPTZ,
    -- The certificate chain and its private key, sealed with the master key.
    cert_chain      BYTEA,
    cert_key        BYTEA,
    issuer          TEXT,
    expires_at      TIMESTAMPTZ,
    -- Obtaining or renewing: why the last attempt failed, how many failed in
    -- a row (the backoff), and when the next one is due.
    last_error      TEXT,
    failures        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ
);
CREATE INDEX domains_app ON domains (app_id);

-- ACME accounts, one per directory URL, their credentials sealed.
CREATE TABLE acme_accounts (
    directory   TEXT PRIMARY KEY,
    credentials BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
