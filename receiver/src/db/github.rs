//! The metadata of the GitHub integration: installations, webhook
//! deliveries, what was reported where, and the labels that opt forks'
//! pull requests in.

use sqlx::types::Json;

use super::{AppRow, Db};

/// A label that opts a fork's pull request in, or was refused.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ForkLabel {
    pub labeled_by: String,
    /// What GitHub said `labeled_by` may do on the repository.
    pub permission: String,
    pub allowed: bool,
    /// Whether a push took this allowance already: each serves one.
    pub used: bool,
}

/// What was reported about one deployment.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct ReportRow {
    pub state: Option<String>,
    pub check_run_id: Option<i64>,
    pub preview_deployment: Option<i64>,
    pub production_deployment: Option<i64>,
}

impl Db {
    pub async fn github_installation(&self, account: &str) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT id FROM github_installations WHERE lower(account) = lower($1) ORDER BY created_at DESC LIMIT 1",
        )
        .bind(account)
        .fetch_optional(self.pool())
        .await
    }

    pub async fn add_github_installation(&self, id: i64, account: &str) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO github_installations (id, account) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET account = EXCLUDED.account")
            .bind(id)
            .bind(account)
            .execute(self.pool())
            .await
            .map(|_| ())
    }

    /// Forgets an installation; returns its account, if it was known.
    pub async fn remove_github_installation(&self, id: i64) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("DELETE FROM github_installations WHERE id = $1 RETURNING account")
            .bind(id)
            .fetch_optional(self.pool())
            .await
    }

    /// Remembers a webhook delivery; `false` when it was seen before.
    pub async fn record_delivery(&self, id: &str, event: &str) -> Result<bool, sqlx::Error> {
        let r = sqlx::query("INSERT INTO github_deliveries (id, event) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(id)
            .bind(event)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Forgets a delivery whose work failed, so GitHub's redelivery (which
    /// keeps the delivery id) is taken.
    pub async fn forget_delivery(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM github_deliveries WHERE id = $1").bind(id).execute(self.pool()).await.map(|_| ())
    }

    /// The delivery that already acted on the event `key`, if one did.
    pub async fn github_event(&self, key: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT delivery FROM github_events WHERE key = $1")
            .bind(key)
            .fetch_optional(self.pool())
            .await
    }

    /// Remembers that `delivery` acted on the event `key`.
    pub async fn record_github_event(&self, key: &str, delivery: &str) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO github_events (key, delivery) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(key)
            .bind(delivery)
            .execute(self.pool())
            .await
            .map(|_| ())
    }

    /// The permission on its repository GitHub gave the author of a review.
    pub async fn review_permission(&self, review_id: i64) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT permission FROM github_review_permissions WHERE review_id = $1")
            .bind(review_id)
            .fetch_optional(self.pool())
            .await
    }

    pub async fn save_review_permission(
        &self,
        review_id: i64,
        repository_id: i64,
        login: &str,
        permission: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO github_review_permissions (review_id, repository_id, login, permission) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (review_id) DO NOTHING",
        )
        .bind(review_id)
        .bind(repository_id)
        .bind(login)
        .bind(permission)
        .execute(self.pool())
        .await
        .map(|_| ())
    }

    /// Forgets the events acted on and the review permissions older than
    /// `older_than_days`.
    pub async fn expire_github_events(&self, older_than_days: i32) -> Result<u64, sqlx::Error> {
        let events = sqlx::query("DELETE FROM github_events WHERE handled_at < now() - make_interval(days => $1)")
            .bind(older_than_days)
            .execute(self.pool())
            .await?;
        let reviews =
            sqlx::query("DELETE FROM github_review_permissions WHERE checked_at < now() - make_interval(days => $1)")
                .bind(older_than_days)
                .execute(self.pool())
                .await?;
        Ok(events.rows_affected() + reviews.rows_affected())
    }

    /// The newest deployment pushed for pull request `pr` and its commit:
    /// the one an approval must be about.
    pub async fn latest_preview(&self, app_id: i64, pr: i64) -> Result<Option<(String, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, git_sha FROM deployments WHERE app_id = $1 AND pr_number = $2 AND git_sha IS NOT NULL \
             ORDER BY created_at DESC LIMIT 1",
        )
        .bind(app_id)
        .bind(pr)
        .fetch_optional(self.pool())
        .await
    }

    /// Forgets deliveries older than GitHub ever redelivers.
    pub async fn expire_deliveries(&self, older_than_days: i32) -> Result<u64, sqlx::Error> {
        let r = sqlx::query("DELETE FROM github_deliveries WHERE received_at < now() - make_interval(days => $1)")
            .bind(older_than_days)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected())
    }

    /// The apps linked to the repository with this numeric id.
    pub async fn apps_of_repository(&self, repository_id: i64) -> Result<Vec<AppRow>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM apps WHERE (settings -> 'github' ->> 'id')::bigint = $1 ORDER BY name")
            .bind(repository_id)
            .fetch_all(self.pool())
            .await
    }

    /// Records an app's link to a repository, leaving the rest of its
    /// settings as they are.
    pub async fn link_repository(&self, app_id: i64, link: &nx_protocol::api::GitHubLink) -> Result<(), sqlx::Error> {
        self.set_link(app_id, Some(link)).await
    }

    /// Records the repository's current name, id and owner's id in an app's
    /// link, leaving its trust (which the admin may be changing) as it is now.
    pub async fn pin_repository(
        &self,
        app_id: i64,
        proved: &nx_protocol::api::VerifiedGitHub,
    ) -> Result<(), sqlx::Error> {
        let identity = serde_json::json!({
            "repository": proved.repository,
            "id": proved.repository_id,
            "owner_id": proved.repository_owner_id,
        });
        sqlx::query(
            "UPDATE apps SET settings = jsonb_set(settings, '{github}', (settings -> 'github') || $2) \
             WHERE id = $1 AND jsonb_typeof(settings -> 'github') = 'object'",
        )
        .bind(app_id)
        .bind(Json(identity))
        .execute(self.pool())
        .await
        .map(|_| ())
    }

    /// Sets or (with `None`) removes an app's link, leaving the rest of its
    /// settings as they are.
    pub async fn set_link(&self, app_id: i64, link: Option<&nx_protocol::api::GitHubLink>) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE apps SET settings = jsonb_set(settings, '{github}', $2) WHERE id = $1")
            .bind(app_id)
            .bind(Json(link))
            .execute(self.pool())
            .await
            .map(|_| ())
    }

    /// Records that `by`, who has `permission` on the repository, labeled
    /// head commit `head_sha` of pull request `pr` for a fork preview of
    /// `app_id`; `allowed` says whether that opts it in. A later label of the
    /// same commit replaces it.
    pub async fn record_fork_label(
        &self,
        app_id: i64,
        pr: i64,
        head_sha: &str,
        by: &str,
        permission: &str,
        allowed: bool,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO fork_preview_labels (app_id, pr_number, head_sha, labeled_by, permission, allowed) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (app_id, pr_number, head_sha) DO UPDATE \
             SET labeled_by = $4, permission = $5, allowed = $6, labeled_at = now(), used_at = NULL",
        )
        .bind(app_id)
        .bind(pr)
        .bind(head_sha.to_ascii_lowercase())
        .bind(by)
        .bind(permission)
        .bind(allowed)
        .execute(self.pool())
        .await
        .map(|_| ())
    }

    /// The label of head commit `head_sha` of pull request `pr`, if any.
    pub async fn fork_label(&self, app_id: i64, pr: i64, head_sha: &str) -> Result<Option<ForkLabel>, sqlx::Error> {
        sqlx::query_as(
            "SELECT labeled_by, permission, allowed, used_at IS NOT NULL AS used FROM fork_preview_labels \
             WHERE app_id = $1 AND pr_number = $2 AND head_sha = $3",
        )
        .bind(app_id)
        .bind(pr)
        .bind(head_sha.to_ascii_lowercase())
        .fetch_optional(self.pool())
        .await
    }

    /// Takes the allowance of head commit `head_sha` of pull request `pr`
    /// for one push; false when it is gone or was taken already.
    pub async fn use_fork_label(&self, app_id: i64, pr: i64, head_sha: &str) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(
            "UPDATE fork_preview_labels SET used_at = now() \
             WHERE app_id = $1 AND pr_number = $2 AND head_sha = $3 AND allowed AND used_at IS NULL",
        )
        .bind(app_id)
        .bind(pr)
        .bind(head_sha.to_ascii_lowercase())
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Withdraws every label of pull request `pr`; how many there were.
    pub async fn withdraw_fork_labels(&self, app_id: i64, pr: i64) -> Result<u64, sqlx::Error> {
        let r = sqlx::query("DELETE FROM fork_preview_labels WHERE app_id = $1 AND pr_number = $2")
            .bind(app_id)
            .bind(pr)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected())
    }

    /// The newest healthy deployment of `app` built from commit `sha`.
    pub async fn newest_healthy_of_commit(&self, app_id: i64, sha: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar(
            // A fork's preview never becomes production (see Deployer::promote).
            "SELECT id FROM deployments WHERE app_id = $1 AND git_sha = $2 AND state = 'healthy' \
             AND COALESCE(github ->> 'event_name', '') <> 'pull_request_target' ORDER BY created_at DESC LIMIT 1",
        )
        .bind(app_id)
        .bind(sha)
        .fetch_optional(self.pool())
        .await
    }

    pub async fn github_comment(&self, app_id: i64, repository_id: i64, pr: i64) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT comment_id FROM github_comments WHERE app_id = $1 AND repository_id = $2 AND pr = $3",
        )
        .bind(app_id)
        .bind(repository_id)
        .bind(pr)
        .fetch_optional(self.pool())
        .await
    }

    pub async fn set_github_comment(
        &self,
        app_id: i64,
        repository_id: i64,
        pr: i64,
        comment_id: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO github_comments (app_id, repository_id, pr, comment_id) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (app_id, repository_id, pr) DO UPDATE SET comment_id = EXCLUDED.comment_id",
        )
        .bind(app_id)
        .bind(repository_id)
        .bind(pr)
        .bind(comment_id)
        .execute(self.pool())
        .await
        .map(|_| ())
    }

    pub async fn github_report(&self, deployment: &str) -> Result<ReportRow, sqlx::Error> {
        Ok(sqlx::query_as(
            "SELECT state, check_run_id, preview_deployment, production_deployment FROM github_reports WHERE deployment_id = $1",
        )
        .bind(deployment)
        .fetch_optional(self.pool())
        .await?
        .unwrap_or_default())
    }

    pub async fn save_github_report(&self, deployment: &str, r: &ReportRow) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO github_reports (deployment_id, state, check_run_id, preview_deployment, production_deployment) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (deployment_id) DO UPDATE SET state = EXCLUDED.state, \
             check_run_id = EXCLUDED.check_run_id, preview_deployment = EXCLUDED.preview_deployment, \
             production_deployment = EXCLUDED.production_deployment, updated_at = now()",
        )
        .bind(deployment)
        .bind(&r.state)
        .bind(r.check_run_id)
        .bind(r.preview_deployment)
        .bind(r.production_deployment)
        .execute(self.pool())
        .await
        .map(|_| ())
    }
}
