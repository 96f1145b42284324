-- Wildcard certificates (`*.<domain>`) of the platform's own domains
-- (--domain, --preview-domain), obtained by ACME DNS-01 through a DNS
-- provider, so every app and preview host is HTTPS from its first request.

CREATE TABLE wildcard_certificates (
    -- The domain under the wildcard: `previews.example` for `*.previews.example`.
    domain          TEXT PRIMARY KEY,
    -- The certificate chain and its private key, sealed with the master key.
    cert_chain      BYTEA,
    cert_key        BYTEA,
    issuer          TEXT,
    expires_at      TIMESTAMPTZ,
    -- As for custom domains: why the last attempt failed, how many failed in
    -- a row (the backoff), and when the next one is due.
    last_error      TEXT,
    failures        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ
);
