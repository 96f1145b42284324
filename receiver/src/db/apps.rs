//! Apps, their settings and their variables.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use super::Db;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AppRow {
    pub id: i64,
    pub name: String,
    pub uid: i32,
    pub db_name: String,
    pub db_role: String,
    pub db_password: Vec<u8>,
    pub settings: Json<nx_protocol::api::AppSettings>,
    pub production_id: Option<String>,
    pub previous_production_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Set when its removal began ([`Db::mark_app_removing`]): nothing of
    /// it starts again.
    pub removing_since: Option<DateTime<Utc>>,
}

impl AppRow {
    /// The app as the artifact store counts its uploads.
    pub fn store_ref(&self) -> nx_store::AppRef<'_> {
        nx_store::AppRef { id: self.id, name: &self.name }
    }
}

/// An app's variables as they count against its cap: how many, and the bytes
/// of their names and plain values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnvTotals {
    pub names: usize,
    pub bytes: usize,
}

/// See [`EnvTotals`]; values are stored sealed, each [`SEAL_OVERHEAD`] bytes
/// longer than its plain text.
///
/// [`SEAL_OVERHEAD`]: crate::secrets::SEAL_OVERHEAD
async fn env_totals(conn: &mut sqlx::PgConnection, app_id: i64) -> Result<EnvTotals, sqlx::Error> {
    let (names, bytes): (i64, i64) = sqlx::query_as(
        "SELECT count(*), COALESCE(sum(octet_length(name) + octet_length(value) - $2), 0)::bigint \
         FROM app_env WHERE app_id = $1",
    )
    .bind(app_id)
    .bind(crate::secrets::SEAL_OVERHEAD as i32)
    .fetch_one(&mut *conn)
    .await?;
    Ok(EnvTotals { names: names.max(0) as usize, bytes: bytes.max(0) as usize })
}

impl Db {
    // --- apps ---

    pub async fn app(&self, name: &str) -> Result<Option<AppRow>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM apps WHERE name = $1").bind(name).fetch_optional(&self.pool).await
    }

    pub async fn app_by_id(&self, id: i64) -> Result<Option<AppRow>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM apps WHERE id = $1").bind(id).fetch_optional(&self.pool).await
    }

    /// The app deployment `id` belongs to.
    pub async fn app_of_deployment(&self, id: &str) -> Result<Option<AppRow>, sqlx::Error> {
        sqlx::query_as("SELECT a.* FROM apps a JOIN deployments d ON d.app_id = a.id WHERE d.id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn apps(&self) -> Result<Vec<AppRow>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM apps ORDER BY name").fetch_all(&self.pool).await
    }

    /// Whether an app of this name exists, once no other creation of an app
    /// can run until `tx` ends: the lock is transaction-scoped and advisory, so
    /// it holds across receivers sharing the metadata database, and the
    /// cluster's database of that name is made under it.
    pub async fn lock_app_creation(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<bool, sqlx::Error> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('nx.apps.create'))").execute(&mut **tx).await?;
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM apps WHERE name = $1)").bind(name).fetch_one(&mut **tx).await
    }

    /// The uid the next app would get: one past every uid ever handed out,
    /// at least `uid_base`. Locks the apps table until the transaction ends,
    /// so the uid is still free when [`Db::insert_app`] takes it.
    pub async fn next_uid(tx: &mut Transaction<'_, Postgres>, uid_base: i64) -> Result<i64, sqlx::Error> {
        // Serialises uid allocation; uids are never reused, even after removal.
        sqlx::query("LOCK TABLE apps IN SHARE ROW EXCLUSIVE MODE").execute(&mut **tx).await?;
        sqlx::query_scalar(
            "SELECT GREATEST($1, (SELECT COALESCE(MAX(uid)::bigint + 1, $1) FROM apps), \
                                 (SELECT COALESCE(MAX(uid)::bigint + 1, $1) FROM removed_apps))",
        )
        .bind(uid_base)
        .fetch_one(&mut **tx)
        .await
    }

    /// Records an app with the uid [`Db::next_uid`] gave in the same transaction.
    pub async fn insert_app(
        tx: &mut Transaction<'_, Postgres>,
        name: &str,
        uid: u32,
        db_name: &str,
        sealed_password: &[u8],
    ) -> Result<AppRow, sqlx::Error> {
        sqlx::query_as(
            "INSERT INTO apps (name, uid, db_name, db_role, db_password) VALUES ($1, $2, $3, $3, $4) RETURNING *",
        )
        .bind(name)
        .bind(uid as i32)
        .bind(db_name)
        .bind(sealed_password)
        .fetch_one(&mut **tx)
        .await
    }

    /// Marks an app as being removed: from then on no deployment of it is
    /// recorded ([`Occupancy::removing`]). Waits for the pushes recording
    /// one now (they hold the app's row), so every deployment recorded
    /// before it returns is seen by whoever reads them next.
    pub async fn mark_app_removing(&self, app_id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE apps SET removing_since = COALESCE(removing_since, now()) WHERE id = $1")
            .bind(app_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes an app's records (deployments, keys, backups and variables go
    /// with it) and retires its uid for good.
    pub async fn delete_app(&self, app: &AppRow) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO removed_apps (name, uid) VALUES ($1, $2)")
            .bind(&app.name)
            .bind(app.uid)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM apps WHERE id = $1").bind(app.id).execute(&mut *tx).await?;
        tx.commit().await
    }

    // --- app variables ---

    /// The names of an app's variables and when each last changed.
    pub async fn env_names(&self, app_id: i64) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
        sqlx::query_as("SELECT name, updated_at FROM app_env WHERE app_id = $1 ORDER BY name")
            .bind(app_id)
            .fetch_all(&self.pool)
            .await
    }

    /// An app's variables with their sealed values.
    pub async fn env_sealed(&self, app_id: i64) -> Result<Vec<(String, Vec<u8>)>, sqlx::Error> {
        sqlx::query_as("SELECT name, value FROM app_env WHERE app_id = $1 ORDER BY name")
            .bind(app_id)
            .fetch_all(&self.pool)
            .await
    }

    /// Sets and unsets variables of an app in one transaction; returns the
    /// names that did change (an unset of a missing name changes nothing).
    /// `admit` is shown the app's totals before and after the change, in the
    /// same transaction (the app's row locked), and refuses it by returning
    /// an error: nothing is then changed.
    pub async fn change_env<E: From<sqlx::Error>>(
        &self,
        app_id: i64,
        set: &[(String, Vec<u8>)],
        unset: &[String],
        admit: impl FnOnce(EnvTotals, EnvTotals) -> Result<(), E>,
    ) -> Result<Vec<String>, E> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT 1 FROM apps WHERE id = $1 FOR UPDATE").bind(app_id).execute(&mut *tx).await?;
        let before = env_totals(&mut tx, app_id).await?;
        let mut changed = Vec::new();
        for (name, sealed) in set {
            sqlx::query(
                "INSERT INTO app_env (app_id, name, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (app_id, name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
            )
            .bind(app_id)
            .bind(name)
            .bind(sealed)
            .execute(&mut *tx)
            .await?;
            changed.push(name.clone());
        }
        for name in unset {
            let r = sqlx::query("DELETE FROM app_env WHERE app_id = $1 AND name = $2")
                .bind(app_id)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            if r.rows_affected() > 0 {
                changed.push(name.clone());
            }
        }
        admit(before, env_totals(&mut tx, app_id).await?)?;
        tx.commit().await?;
        Ok(changed)
    }

    /// Replaces an app's settings with `new` if they are still `basis`, the
    /// settings the change was checked against, or are `new` already;
    /// returns whether they are `new` now. A
    /// change made meanwhile (the admin's, another request's) is never
    /// overwritten by a request checked against what it replaced.
    pub async fn set_settings_if(
        &self,
        app_id: i64,
        basis: &nx_protocol::api::AppSettings,
        new: &nx_protocol::api::AppSettings,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let current: Option<Json<nx_protocol::api::AppSettings>> =
            sqlx::query_scalar("SELECT settings FROM apps WHERE id = $1 FOR UPDATE")
                .bind(app_id)
                .fetch_optional(&mut *tx)
                .await?;
        match current {
            // Already so (the same change twice, as two runs applying one
            // nx.toml): nothing to refuse.
            Some(Json(current)) if current == *new => return Ok(true),
            Some(Json(current)) if current == *basis => {}
            _ => return Ok(false),
        }
        sqlx::query("UPDATE apps SET settings = $2 WHERE id = $1")
            .bind(app_id)
            .bind(Json(new))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }
}
