//! SSH keys of apps and SFTP uploads.

use chrono::{DateTime, Utc};

use super::{AppRow, Db};

/// A registered SSH key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SshKeyRow {
    pub id: String,
    pub fingerprint: String,
    pub public_key: String,
    pub algorithm: String,
    pub comment: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// How many names of uploads an app's SFTP folder keeps, newest first.
pub const UPLOADS_KEPT: i64 = 64;

/// An upload as listed in its app's folder.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UploadRow {
    pub name: String,
    pub size: i64,
    pub deployment_id: Option<String>,
    pub outcome: String,
    pub created_at: DateTime<Utc>,
}

/// A key to register.
#[derive(Debug)]
pub struct NewSshKey<'a> {
    pub id: &'a str,
    pub app_id: i64,
    pub fingerprint: &'a str,
    pub public_key: &'a str,
    pub algorithm: &'a str,
    pub comment: &'a str,
}

impl Db {
    /// Registers a key; `false` when the app has it already.
    pub async fn add_ssh_key(&self, k: &NewSshKey<'_>) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(
            "INSERT INTO ssh_keys (id, app_id, fingerprint, public_key, algorithm, comment) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (app_id, fingerprint) DO NOTHING",
        )
        .bind(k.id)
        .bind(k.app_id)
        .bind(k.fingerprint)
        .bind(k.public_key)
        .bind(k.algorithm)
        .bind(k.comment)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn ssh_keys_of_app(&self, app_id: i64) -> Result<Vec<SshKeyRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, fingerprint, public_key, algorithm, comment, created_at, last_used_at FROM ssh_keys \
             WHERE app_id = $1 ORDER BY created_at",
        )
        .bind(app_id)
        .fetch_all(self.pool())
        .await
    }

    /// Removes a key of an app; `false` when it has no such key.
    pub async fn remove_ssh_key(&self, app_id: i64, id: &str) -> Result<bool, sqlx::Error> {
        let r = sqlx::query("DELETE FROM ssh_keys WHERE app_id = $1 AND id = $2")
            .bind(app_id)
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The apps a key (by fingerprint and exact public key) may upload to;
    /// marks the key used.
    /// The apps a key is registered for; looking does not count as a use.
    pub async fn apps_of_ssh_key(&self, fingerprint: &str, public_key: &str) -> Result<Vec<AppRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT a.* FROM apps a JOIN ssh_keys k ON k.app_id = a.id WHERE k.fingerprint = $1 AND k.public_key = $2 ORDER BY a.name",
        )
        .bind(fingerprint)
        .bind(public_key)
        .fetch_all(self.pool())
        .await
    }

    /// Records a use of a key: only once its holder proved it (a signature).
    pub async fn touch_ssh_key(&self, fingerprint: &str, public_key: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE ssh_keys SET last_used_at = now() WHERE fingerprint = $1 AND public_key = $2")
            .bind(fingerprint)
            .bind(public_key)
            .execute(self.pool())
            .await
            .map(|_| ())
    }

    /// Records an upload's outcome as its name's only one, and keeps the
    /// newest [`UPLOADS_KEPT`] names of the app: an SFTP key uploads under
    /// names of its choosing, refused uploads included, and nothing but the
    /// latest of each name is ever read.
    pub async fn record_upload(
        &self,
        app_id: i64,
        name: &str,
        size: i64,
        deployment: Option<&str>,
        outcome: &str,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM sftp_uploads WHERE app_id = $1 AND name = $2")
            .bind(app_id)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO sftp_uploads (app_id, name, size, deployment_id, outcome) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(app_id)
        .bind(name)
        .bind(size)
        .bind(deployment)
        .bind(outcome)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM sftp_uploads WHERE app_id = $1 AND id NOT IN \
             (SELECT id FROM sftp_uploads WHERE app_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2)",
        )
        .bind(app_id)
        .bind(UPLOADS_KEPT)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// The latest upload of each name to an app.
    pub async fn uploads(&self, app_id: i64) -> Result<Vec<UploadRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT DISTINCT ON (name) name, size, deployment_id, outcome, created_at FROM sftp_uploads \
             WHERE app_id = $1 ORDER BY name, created_at DESC, id DESC",
        )
        .bind(app_id)
        .fetch_all(self.pool())
        .await
    }
}
