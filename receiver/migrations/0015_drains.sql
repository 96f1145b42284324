-- Log drains: where an app's output, platform events and access log lines
-- are shipped (syslog over TCP/TLS, or NDJSON POSTed over HTTPS). A NULL
-- app_id is a platform-wide drain (the admin's), which gets every app's.
-- The URL may hold credentials, so it is sealed under the master key;
-- `shown` is the form with them masked, which is all the API ever echoes.
CREATE TABLE drains (
    id          TEXT PRIMARY KEY,
    app_id      BIGINT REFERENCES apps(id) ON DELETE CASCADE,
    url_sealed  BYTEA NOT NULL,
    shown       TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_by  TEXT NOT NULL
);
CREATE INDEX drains_app ON drains (app_id);
