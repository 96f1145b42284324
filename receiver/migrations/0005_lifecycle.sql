-- The app's own environment variables, set with `nx env`: one row per variable,
-- the value sealed with the master key. Every start of a deployment reads them;
-- a deployment's own variables (nx push --env) override them.
CREATE TABLE app_env (
    app_id     BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    value      BYTEA NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, name)
);

-- When the router last saw a request for the deployment (as of the last
-- janitor round): previews idle for longer than the receiver allows stop.
ALTER TABLE deployments ADD COLUMN last_request_at TIMESTAMPTZ;

-- Apps that were removed: their uids are never handed out again, so no file or
-- process a removed app left behind can belong to a new one.
CREATE TABLE removed_apps (
    name       TEXT NOT NULL,
    uid        INTEGER NOT NULL UNIQUE,
    removed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
