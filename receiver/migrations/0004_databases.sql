-- A pull-request preview may get its own database (the app's preview mode
-- `empty` or `copy`): its name doubles as its role, the password is sealed.
ALTER TABLE deployments ADD COLUMN db_name TEXT;
ALTER TABLE deployments ADD COLUMN db_password BYTEA;

-- Backups kept in the object store; `verified_at` is set once the dump was
-- restored into a scratch database without error.
CREATE TABLE backups (
    id          BIGSERIAL PRIMARY KEY,
    app_id      BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    object_key  TEXT NOT NULL UNIQUE,
    size        BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    verified_at TIMESTAMPTZ
);
CREATE INDEX backups_app ON backups (app_id, created_at DESC);
