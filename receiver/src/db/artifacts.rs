//! Artifacts: binaries by digest, and which of them no deployment uses.

use sqlx::{Postgres, Transaction};

use super::Db;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ArtifactRow {
    pub sha256: String,
    pub size: i64,
    pub format: String,
    pub arch: String,
    pub linkage: String,
}

impl Db {
    /// Takes the lock that serialises everything done to one artifact (its
    /// registration by a push, its removal by the garbage collector) until
    /// `tx` ends.
    pub async fn lock_artifact(tx: &mut Transaction<'_, Postgres>, sha256: &str) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('nx.artifact.' || $1))")
            .bind(sha256)
            .execute(&mut **tx)
            .await
            .map(|_| ())
    }

    /// The artifact with this digest, its grace period restarted: a push is
    /// about to use it, so the garbage collector must leave it alone.
    pub async fn touch_artifact(
        tx: &mut Transaction<'_, Postgres>,
        sha256: &str,
    ) -> Result<Option<ArtifactRow>, sqlx::Error> {
        sqlx::query_as(
            "UPDATE artifacts SET created_at = now() WHERE sha256 = $1 RETURNING sha256, size, format, arch, linkage",
        )
        .bind(sha256)
        .fetch_optional(&mut **tx)
        .await
    }

    pub async fn insert_artifact(
        tx: &mut Transaction<'_, Postgres>,
        a: &ArtifactRow,
        object_key: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO artifacts (sha256, size, format, arch, linkage, object_key) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&a.sha256)
        .bind(a.size)
        .bind(&a.format)
        .bind(&a.arch)
        .bind(&a.linkage)
        .bind(object_key)
        .execute(&mut **tx)
        .await
        .map(|_| ())
    }
}
