//! API keys, the admin secret and the nonces of signed requests.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::Db;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRow {
    pub id: String,
    pub app_id: Option<i64>,
    pub app_name: Option<String>,
    pub kind: String,
    pub secret: Vec<u8>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A key as listed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyListing {
    pub id: String,
    pub kind: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Db {
    pub async fn insert_key(
        tx: &mut Transaction<'_, Postgres>,
        id: &str,
        app_id: Option<i64>,
        kind: &str,
        sealed_secret: &[u8],
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO keys (id, app_id, kind, secret) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(app_id)
            .bind(kind)
            .bind(sealed_secret)
            .execute(&mut **tx)
            .await
            .map(|_| ())
    }

    pub async fn key(&self, id: &str) -> Result<Option<KeyRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT k.id, k.app_id, a.name AS app_name, k.kind, k.secret, k.revoked_at, k.last_used_at \
             FROM keys k LEFT JOIN apps a ON a.id = k.app_id WHERE k.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
    }

    /// The keys of an app, or with `None` the platform's (admin and read-only).
    pub async fn keys_of(&self, app_id: Option<i64>) -> Result<Vec<KeyListing>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, kind, created_at, last_used_at, revoked_at FROM keys \
             WHERE app_id IS NOT DISTINCT FROM $1 ORDER BY created_at",
        )
        .bind(app_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Revokes a key of an app, or with `None` a read-only key; `false` when
    /// there is no such live key. The admin token is rotated, never revoked.
    pub async fn revoke_key(
        tx: &mut Transaction<'_, Postgres>,
        app_id: Option<i64>,
        id: &str,
    ) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(
            "UPDATE keys SET revoked_at = now() \
             WHERE app_id IS NOT DISTINCT FROM $1 AND id = $2 AND kind <> 'admin' AND revoked_at IS NULL",
        )
        .bind(app_id)
        .bind(id)
        .execute(&mut **tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Replaces the admin token's secret.
    pub async fn replace_admin_secret(&self, sealed: &[u8]) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE keys SET secret = $1, created_at = now(), last_used_at = NULL WHERE kind = 'admin'")
            .bind(sealed)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    pub async fn admin_key_exists(&self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM keys WHERE kind = 'admin' AND revoked_at IS NULL)")
            .fetch_one(&self.pool)
            .await
    }

    /// Records that key `id` signed a request. On every request's path, so
    /// its commit does not wait for the WAL's flush: a crash may forget a
    /// last use, which only `nx keys ls` shows, and nothing depends on.
    pub async fn touch_key(&self, id: &str) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
        sqlx::query("UPDATE keys SET last_used_at = now() WHERE id = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await
    }

    /// Remembers a nonce; `false` when it was seen before (a replay).
    pub async fn record_nonce(&self, nonce: &str, key_id: &str) -> Result<bool, sqlx::Error> {
        let r = sqlx::query("INSERT INTO nonces (nonce, key_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(nonce)
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Forgets nonces older than the clock window allows anyway.
    pub async fn expire_nonces(&self, older_than_secs: i64) -> Result<u64, sqlx::Error> {
        let r = sqlx::query("DELETE FROM nonces WHERE seen_at < now() - make_interval(secs => $1)")
            .bind(older_than_secs as f64)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
