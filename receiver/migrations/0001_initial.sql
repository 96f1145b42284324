-- The metadata of NX Sandbox: apps, artifacts, deployments, keys, the audit log
-- and the nonces that make signed requests single-use.

CREATE TABLE apps (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    -- The host uid (and gid) the app's sandboxes run as; never reused.
    uid           INTEGER NOT NULL UNIQUE,
    db_name       TEXT NOT NULL,
    db_role       TEXT NOT NULL,
    -- Sealed with the master key (see secrets.rs); never stored in clear.
    db_password   BYTEA NOT NULL,
    settings      JSONB NOT NULL DEFAULT '{}',
    production_id TEXT,
    previous_production_id TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE artifacts (
    sha256     TEXT PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size       BIGINT NOT NULL,
    -- What the inspector found: format, architecture and linkage.
    format     TEXT NOT NULL,
    arch       TEXT NOT NULL,
    linkage    TEXT NOT NULL CHECK (linkage IN ('static', 'dynamic')),
    object_key TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE deployments (
    id              TEXT PRIMARY KEY,
    app_id          BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    artifact_sha256 TEXT NOT NULL REFERENCES artifacts(sha256),
    state           TEXT NOT NULL CHECK (state IN ('pending', 'starting', 'healthy', 'failed', 'stopped')),
    port            INTEGER NOT NULL,
    args            JSONB NOT NULL DEFAULT '[]',
    -- The deployment's own variables as sealed JSON.
    env             BYTEA,
    filename        TEXT,
    git_sha         TEXT,
    git_ref         TEXT,
    pr_number       BIGINT,
    source          TEXT NOT NULL,
    error           TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    promoted_at     TIMESTAMPTZ,
    stopped_at      TIMESTAMPTZ
);
CREATE INDEX deployments_app ON deployments (app_id, created_at DESC);
-- Two running deployments never share a port.
CREATE UNIQUE INDEX deployments_live_port ON deployments (port) WHERE state IN ('pending', 'starting', 'healthy');

ALTER TABLE apps ADD FOREIGN KEY (production_id) REFERENCES deployments(id) ON DELETE SET NULL;
ALTER TABLE apps ADD FOREIGN KEY (previous_production_id) REFERENCES deployments(id) ON DELETE SET NULL;

CREATE TABLE keys (
    id           TEXT PRIMARY KEY,
    -- NULL for the admin token, which may act on every app.
    app_id       BIGINT REFERENCES apps(id) ON DELETE CASCADE,
    kind         TEXT NOT NULL CHECK (kind IN ('admin', 'deploy')),
    secret       BYTEA NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ,
    CHECK ((kind = 'admin') = (app_id IS NULL))
);

CREATE TABLE nonces (
    nonce   TEXT PRIMARY KEY,
    key_id  TEXT NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX nonces_seen ON nonces (seen_at);

CREATE TABLE events (
    id            BIGSERIAL PRIMARY KEY,
    at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    app           TEXT,
    deployment_id TEXT,
    kind          TEXT NOT NULL,
    actor         TEXT NOT NULL,
    detail        JSONB NOT NULL DEFAULT '{}'
);
CREATE INDEX events_app ON events (app, at DESC);
