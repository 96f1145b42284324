//! Log drains: where apps' logs are shipped (see `drains`).

use chrono::{DateTime, Utc};

use super::Db;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DrainRow {
    pub id: String,
    /// None for a platform-wide drain.
    pub app_name: Option<String>,
    pub url_sealed: Vec<u8>,
    pub shown: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

const DRAIN_COLUMNS: &str = "d.id, a.name AS app_name, d.url_sealed, d.shown, d.created_at, d.created_by \
     FROM drains d LEFT JOIN apps a ON a.id = d.app_id";

/// The new drain's fields.
#[derive(Debug)]
pub struct NewDrain<'a> {
    pub id: &'a str,
    /// None for a platform-wide drain.
    pub app_id: Option<i64>,
    pub url_sealed: &'a [u8],
    pub shown: &'a str,
    pub created_by: &'a str,
}

impl Db {
    /// Adds a drain unless its app (or the platform) has `cap` already:
    /// counted under the app's row lock (the platform's: a transaction-level
    /// advisory lock), so racing requests cannot pass the cap together.
    /// `Ok(None)` when full.
    pub async fn add_drain(&self, new: &NewDrain<'_>, cap: i64) -> Result<Option<DrainRow>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        match new.app_id {
            Some(app_id) => {
                sqlx::query("SELECT id FROM apps WHERE id = $1 FOR UPDATE").bind(app_id).execute(&mut *tx).await?;
            }
            None => {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext('nx.platform-drains'))").execute(&mut *tx).await?;
            }
        }
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM drains WHERE app_id IS NOT DISTINCT FROM $1")
            .bind(new.app_id)
            .fetch_one(&mut *tx)
            .await?;
        if count >= cap {
            return Ok(None);
        }
        sqlx::query("INSERT INTO drains (id, app_id, url_sealed, shown, created_by) VALUES ($1, $2, $3, $4, $5)")
            .bind(new.id)
            .bind(new.app_id)
            .bind(new.url_sealed)
            .bind(new.shown)
            .bind(new.created_by)
            .execute(&mut *tx)
            .await?;
        let row =
            sqlx::query_as(&format!("SELECT {DRAIN_COLUMNS} WHERE d.id = $1")).bind(new.id).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(row))
    }

    /// The drains of the app `app_id`, or the platform-wide ones (None), oldest first.
    pub async fn drains_of(&self, app_id: Option<i64>) -> Result<Vec<DrainRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DRAIN_COLUMNS} WHERE d.app_id IS NOT DISTINCT FROM $1 ORDER BY d.created_at, d.id"
        ))
        .bind(app_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Every drain, for the shipper.
    pub async fn all_drains(&self) -> Result<Vec<DrainRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DRAIN_COLUMNS} ORDER BY d.created_at, d.id")).fetch_all(&self.pool).await
    }

    /// Removes the drains of app `app_id` that `actor` added (a deploy key
    /// being revoked, in its revocation's transaction); their ids.
    pub async fn remove_drains_added_by(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        app_id: i64,
        actor: &str,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("DELETE FROM drains WHERE app_id = $1 AND created_by = $2 RETURNING id")
            .bind(app_id)
            .bind(actor)
            .fetch_all(&mut **tx)
            .await
    }

    /// Removes the drain `id` of the app `app_id` (None: a platform-wide one);
    /// whether there was one.
    pub async fn remove_drain(&self, app_id: Option<i64>, id: &str) -> Result<bool, sqlx::Error> {
        sqlx::query("DELETE FROM drains WHERE id = $1 AND app_id IS NOT DISTINCT FROM $2")
            .bind(id)
            .bind(app_id)
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected() == 1)
    }

    /// Who added the drain `id` of the app `app_id` (None: a platform-wide
    /// one), when there is one.
    pub async fn drain_adder(&self, app_id: Option<i64>, id: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT created_by FROM drains WHERE id = $1 AND app_id IS NOT DISTINCT FROM $2")
            .bind(id)
            .bind(app_id)
            .fetch_optional(&self.pool)
            .await
    }

    /// The audit events after `after` (by id) and those of the ids `gaps`
    /// (below it, not seen yet: their transactions may commit late), oldest
    /// first, at most `limit`.
    pub async fn events_after(
        &self,
        after: i64,
        gaps: &[i64],
        limit: i64,
    ) -> Result<Vec<nx_protocol::api::EventInfo>, sqlx::Error> {
        let rows: Vec<super::events::EventRow> = sqlx::query_as(
            "SELECT id, at, app, deployment_id, kind, actor, detail FROM events \
             WHERE id > $1 OR id = ANY($2) ORDER BY id LIMIT $3",
        )
        .bind(after)
        .bind(gaps)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(super::events::event_info).collect())
    }

    /// The newest audit event's id (0 when there is none).
    pub async fn last_event_id(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COALESCE(max(id), 0)::bigint FROM events").fetch_one(&self.pool).await
    }
}
