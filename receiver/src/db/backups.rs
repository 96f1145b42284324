//! Backups of app databases kept in the object store.

use chrono::{DateTime, Utc};

use super::Db;

/// A backup in the object store.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BackupRow {
    pub id: i64,
    pub object_key: String,
    pub size: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    pub verified_at: Option<DateTime<Utc>>,
}

impl Db {
    pub async fn insert_backup(
        &self,
        app_id: i64,
        key: &str,
        size: i64,
        sha256: &str,
    ) -> Result<BackupRow, sqlx::Error> {
        sqlx::query_as(
            "INSERT INTO backups (app_id, object_key, size, sha256, verified_at) VALUES ($1, $2, $3, $4, now()) \
             RETURNING id, object_key, size, sha256, created_at, verified_at",
        )
        .bind(app_id)
        .bind(key)
        .bind(size)
        .bind(sha256)
        .fetch_one(&self.pool)
        .await
    }

    pub async fn backups(&self, app_id: i64) -> Result<Vec<BackupRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, object_key, size, sha256, created_at, verified_at FROM backups WHERE app_id = $1 ORDER BY created_at DESC, id DESC",
        )
        .bind(app_id)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn delete_backup(&self, id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM backups WHERE id = $1").bind(id).execute(&self.pool).await.map(|_| ())
    }
}
