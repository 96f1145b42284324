//! The audit log: what was done, by whom, when.

use chrono::{DateTime, Utc};

use super::Db;

impl Db {
    /// The audit log, newest first: the events of `app` (or all) since `since`.
    pub async fn events(
        &self,
        app: Option<&str>,
        since: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<nx_protocol::api::EventInfo>, sqlx::Error> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT id, at, app, deployment_id, kind, actor, detail FROM events \
                 WHERE ($1::text IS NULL OR app = $1) AND at >= $2 ORDER BY at DESC, id DESC LIMIT $3",
        )
        .bind(app)
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(event_info).collect())
    }

    /// Forgets audit events older than `days`.
    pub async fn expire_events(&self, days: u32) -> Result<u64, sqlx::Error> {
        sqlx::query("DELETE FROM events WHERE at < now() - make_interval(days => $1)")
            .bind(days as i32)
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
    }

    pub async fn event(
        &self,
        app: Option<&str>,
        deployment: Option<&str>,
        kind: &str,
        actor: &str,
        detail: serde_json::Value,
    ) -> Result<(), sqlx::Error> {
        insert(app, deployment, kind, actor, detail).execute(&self.pool).await.map(|_| ())
    }
}

/// An audit event about a deployment, written in the transaction that
/// records the deployment: the log never lacks it, nor tells of one that was
/// not recorded, and the push pays one commit for both.
#[derive(Debug)]
pub struct DeploymentEvent<'a> {
    pub app: &'a str,
    pub kind: &'a str,
    pub actor: &'a str,
    pub detail: serde_json::Value,
}

/// The statement that appends one event.
pub(super) fn insert<'q>(
    app: Option<&'q str>,
    deployment: Option<&'q str>,
    kind: &'q str,
    actor: &'q str,
    detail: serde_json::Value,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query("INSERT INTO events (app, deployment_id, kind, actor, detail) VALUES ($1, $2, $3, $4, $5)")
        .bind(app)
        .bind(deployment)
        .bind(kind)
        .bind(actor)
        .bind(detail)
}

/// The columns every read of the audit log selects, in this order:
/// `id, at, app, deployment_id, kind, actor, detail`.
pub(super) type EventRow = (i64, DateTime<Utc>, Option<String>, Option<String>, String, String, serde_json::Value);

/// One audit log row as the API shows it.
pub(super) fn event_info((id, at, app, deployment, kind, actor, detail): EventRow) -> nx_protocol::api::EventInfo {
    nx_protocol::api::EventInfo { id, at, app, deployment, kind, actor, detail }
}
