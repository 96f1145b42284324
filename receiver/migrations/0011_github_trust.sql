-- GitHub: what a webhook already did, and who may approve.

-- Events acted on, by the event's own ids (a review's id; a pull request's
-- number, head commit and closing time; a check run's id, button, head
-- commit and state), so a captured body replayed under a new delivery id
-- does nothing the first delivery did not. Kept as long as an event that old
-- is still taken (github::webhook::EVENT_RETENTION_DAYS).
CREATE TABLE github_events (
    key        TEXT PRIMARY KEY,
    delivery   TEXT NOT NULL,
    handled_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX github_events_handled ON github_events (handled_at);

-- The permission GitHub gave a review's author on the repository, asked
-- once per review.
CREATE TABLE github_review_permissions (
    review_id     BIGINT PRIMARY KEY,
    repository_id BIGINT NOT NULL,
    login         TEXT NOT NULL,
    permission    TEXT NOT NULL,
    checked_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX github_review_permissions_checked ON github_review_permissions (checked_at);
