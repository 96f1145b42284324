-- GitHub: where a deployment's binary came from, what was reported about it,
-- and what GitHub sent.

-- The repository the GitHub Action pushed from (name and numeric id).
ALTER TABLE deployments ADD COLUMN repository TEXT;
ALTER TABLE deployments ADD COLUMN repository_id BIGINT;

-- Webhook deliveries seen, so a repeated delivery is ignored.
CREATE TABLE github_deliveries (
    id          TEXT PRIMARY KEY,
    event       TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX github_deliveries_received ON github_deliveries (received_at);

-- Installations of the GitHub App, by the account they belong to.
CREATE TABLE github_installations (
    id         BIGINT PRIMARY KEY,
    account    TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX github_installations_account ON github_installations (lower(account));

-- The one comment per app and pull request, edited as its previews change.
CREATE TABLE github_comments (
    app_id        BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    repository_id BIGINT NOT NULL,
    pr            BIGINT NOT NULL,
    comment_id    BIGINT NOT NULL,
    PRIMARY KEY (app_id, repository_id, pr)
);

-- What was reported about a deployment: the state last reported, its check
-- run, and its GitHub deployments (preview and production environments).
CREATE TABLE github_reports (
    deployment_id        TEXT PRIMARY KEY REFERENCES deployments(id) ON DELETE CASCADE,
    state                TEXT,
    check_run_id         BIGINT,
    preview_deployment   BIGINT,
    production_deployment BIGINT,
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
