-- Previews of pull requests from forks (`[preview] forks = "label"`): a
-- labeled webhook records here who labeled which head commit of which pull
-- request, with the permission GitHub gave them; a pull_request_target run's
-- token may push a preview of exactly that commit, and only if `allowed`.
-- Refusals are kept too, so the push can say why it was refused. An
-- unlabeled webhook deletes the pull request's rows.
CREATE TABLE fork_preview_labels (
    app_id     BIGINT NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    pr_number  BIGINT NOT NULL,
    head_sha   TEXT NOT NULL,
    labeled_by TEXT NOT NULL,
    permission TEXT NOT NULL,
    allowed    BOOLEAN NOT NULL,
    labeled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    used_at    TIMESTAMPTZ,
    PRIMARY KEY (app_id, pr_number, head_sha)
);
