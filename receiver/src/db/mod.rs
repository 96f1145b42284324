//! The metadata database: typed rows and the queries the receiver makes.
//! Every statement is here, so the schema and its uses can be read together.

use chrono::{DateTime, Utc};
use nx_protocol::api::DeploymentState;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

mod domains;
mod github;
mod ssh;

pub use domains::{Added, DomainRow};
pub use github::ReportRow;
pub use ssh::{NewSshKey, SshKeyRow, UploadRow};

/// Cheap-to-clone handle to the metadata pool.
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
}

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
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ArtifactRow {
    pub sha256: String,
    pub size: i64,
    pub format: String,
    pub arch: String,
    pub linkage: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeploymentRow {
    pub id: String,
    pub app_id: i64,
    pub app_name: String,
    pub artifact_sha256: String,
    pub size: i64,
    pub linkage: String,
    pub state: String,
    pub port: i32,
    pub args: Json<Vec<String>>,
    pub env: Option<Vec<u8>>,
    pub filename: Option<String>,
    pub git_sha: Option<String>,
    pub git_ref: Option<String>,
    pub pr_number: Option<i64>,
    pub source: String,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub promoted_at: Option<DateTime<Utc>>,
    pub limits: Json<Vec<nx_protocol::api::Enforcement>>,
    /// A preview's own database (its name is also its role), and its sealed password.
    pub db_name: Option<String>,
    pub db_password: Option<Vec<u8>>,
    pub repository: Option<String>,
    pub repository_id: Option<i64>,
    /// What the push's GitHub OIDC token proved, when it came with one.
    pub github: Option<Json<nx_protocol::api::VerifiedGitHub>>,
    pub is_production: bool,
}

impl DeploymentRow {
    pub fn state(&self) -> DeploymentState {
        DeploymentState::parse(&self.state).unwrap_or(DeploymentState::Failed)
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRow {
    pub id: String,
    pub app_id: Option<i64>,
    pub app_name: Option<String>,
    pub kind: String,
    pub secret: Vec<u8>,
    pub revoked_at: Option<DateTime<Utc>>,
}

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

/// A key as listed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyListing {
    pub id: String,
    pub kind: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A new deployment to record.
#[derive(Debug)]
pub struct NewDeployment<'a> {
    pub id: &'a str,
    pub app_id: i64,
    pub artifact_sha256: &'a str,
    pub port: i32,
    pub args: &'a [String],
    pub env: Option<Vec<u8>>,
    pub filename: Option<&'a str>,
    pub git_sha: Option<&'a str>,
    pub git_ref: Option<&'a str>,
    pub pr_number: Option<i64>,
    pub source: &'a str,
    pub push_id: Option<&'a str>,
    pub repository: Option<&'a str>,
    pub repository_id: Option<i64>,
    pub github: Option<&'a nx_protocol::api::VerifiedGitHub>,
    /// The database of its own a preview will get, reserved with the row so
    /// that it counts against the app's cap from the start (its password
    /// comes once it is made).
    pub db_name: Option<&'a str>,
}

/// A deployment as it counts against its app's caps.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Held {
    pub id: String,
    pub pr_number: Option<i64>,
    pub is_production: bool,
    pub is_rollback_target: bool,
}

/// What an app holds of the host when a deployment is to be added: its
/// running deployments and the previews with a database of their own,
/// oldest first.
#[derive(Debug, Clone, Default)]
pub struct Occupancy {
    pub running: Vec<Held>,
    pub databases: Vec<Held>,
}

/// An app's variables as they count against its cap: how many, and the bytes
/// of their names and plain values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnvTotals {
    pub names: usize,
    pub bytes: usize,
}

/// A deployment that lifecycle rules never touch: its app's production or
/// rollback target.
const NOT_PROTECTED: &str = "d.id IS DISTINCT FROM a.production_id AND d.id IS DISTINCT FROM a.previous_production_id";

const DEPLOYMENT_COLUMNS: &str =
    "d.id, d.app_id, a.name AS app_name, d.artifact_sha256, ar.size, ar.linkage, d.state, d.port, \
     d.args, d.env, d.filename, d.git_sha, d.git_ref, d.pr_number, d.source, d.error, d.created_at, d.promoted_at, d.limits, d.db_name, d.db_password, d.repository, d.repository_id, d.github, \
     (a.production_id IS NOT DISTINCT FROM d.id) AS is_production \
     FROM deployments d JOIN apps a ON a.id = d.app_id JOIN artifacts ar ON ar.sha256 = d.artifact_sha256";

/// See [`Db::occupancy`].
async fn occupancy(conn: &mut sqlx::PgConnection, app_id: i64) -> Result<Occupancy, sqlx::Error> {
    let held = |condition: &str| {
        format!(
            "SELECT d.id, d.pr_number, (a.production_id IS NOT DISTINCT FROM d.id) AS is_production, \
             (a.previous_production_id IS NOT DISTINCT FROM d.id) AS is_rollback_target \
             FROM deployments d JOIN apps a ON a.id = d.app_id WHERE d.app_id = $1 AND {condition} \
             ORDER BY d.created_at, d.id"
        )
    };
    let running = sqlx::query_as(&held("d.state IN ('pending', 'starting', 'healthy')"))
        .bind(app_id)
        .fetch_all(&mut *conn)
        .await?;
    let databases = sqlx::query_as(&held("d.db_name IS NOT NULL")).bind(app_id).fetch_all(&mut *conn).await?;
    Ok(Occupancy { running, databases })
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
    pub fn new(pool: PgPool) -> Db {
        Db { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    // --- apps ---

    pub async fn app(&self, name: &str) -> Result<Option<AppRow>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM apps WHERE name = $1").bind(name).fetch_optional(&self.pool).await
    }

    pub async fn app_by_id(&self, id: i64) -> Result<Option<AppRow>, sqlx::Error> {
        sqlx::query_as("SELECT * FROM apps WHERE id = $1").bind(id).fetch_optional(&self.pool).await
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

    pub async fn set_settings(&self, app_id: i64, settings: &nx_protocol::api::AppSettings) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE apps SET settings = $2 WHERE id = $1")
            .bind(app_id)
            .bind(Json(settings))
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    // --- keys ---

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
            "SELECT k.id, k.app_id, a.name AS app_name, k.kind, k.secret, k.revoked_at \
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

    pub async fn touch_key(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE keys SET last_used_at = now() WHERE id = $1").bind(id).execute(&self.pool).await.map(|_| ())
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

    // --- artifacts ---

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

    // --- deployments ---

    /// What `app_id` holds now (see [`Occupancy`]).
    pub async fn occupancy(&self, app_id: i64) -> Result<Occupancy, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        occupancy(&mut conn, app_id).await
    }

    /// Records a new deployment if `admit` accepts what its app holds. The
    /// app's row is locked while it is counted and the row inserted, so two
    /// pushes at once cannot both take the last place.
    pub async fn insert_deployment<E: From<sqlx::Error>>(
        &self,
        d: &NewDeployment<'_>,
        admit: impl FnOnce(&Occupancy) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT 1 FROM apps WHERE id = $1 FOR UPDATE").bind(d.app_id).execute(&mut *tx).await?;
        admit(&occupancy(&mut tx, d.app_id).await?)?;
        sqlx::query(
            "INSERT INTO deployments (id, app_id, artifact_sha256, state, port, args, env, filename, git_sha, git_ref, pr_number, source, push_id, repository, repository_id, github, db_name) \
             VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(d.id)
        .bind(d.app_id)
        .bind(d.artifact_sha256)
        .bind(d.port)
        .bind(Json(d.args))
        .bind(&d.env)
        .bind(d.filename)
        .bind(d.git_sha)
        .bind(d.git_ref)
        .bind(d.pr_number)
        .bind(d.source)
        .bind(d.push_id)
        .bind(d.repository)
        .bind(d.repository_id)
        .bind(d.github.map(Json))
        .bind(d.db_name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DEPLOYMENT_COLUMNS} WHERE d.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// The deployment an earlier attempt of the same push made, if any.
    pub async fn deployment_by_push_id(
        &self,
        app_id: i64,
        push_id: &str,
    ) -> Result<Option<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DEPLOYMENT_COLUMNS} WHERE d.app_id = $1 AND d.push_id = $2"))
            .bind(app_id)
            .bind(push_id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn deployments_of_app(&self, app_id: i64, limit: i64) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DEPLOYMENT_COLUMNS} WHERE d.app_id = $1 ORDER BY d.created_at DESC LIMIT $2"))
            .bind(app_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
    }

    /// Deployments that should be running: what a restart brings back.
    pub async fn live_deployments(&self) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} WHERE d.state IN ('pending', 'starting', 'healthy') ORDER BY d.created_at"
        ))
        .fetch_all(&self.pool)
        .await
    }

    /// Every deployment the router should know about: all but long-stopped ones.
    pub async fn routed_deployments(&self) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} WHERE d.state <> 'stopped' OR d.stopped_at > now() - interval '30 days'"
        ))
        .fetch_all(&self.pool)
        .await
    }

    pub async fn used_ports(&self) -> Result<Vec<i32>, sqlx::Error> {
        sqlx::query_scalar("SELECT port FROM deployments WHERE state IN ('pending', 'starting', 'healthy')")
            .fetch_all(&self.pool)
            .await
    }

    pub async fn set_state(&self, id: &str, state: DeploymentState, error: Option<&str>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE deployments SET state = $2, error = $3, \
             stopped_at = CASE WHEN $2 IN ('stopped', 'failed') THEN now() ELSE NULL END WHERE id = $1",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(error)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Records (or, with `None`, forgets) a deployment's own database.
    pub async fn set_preview_db(&self, id: &str, db: Option<(&str, &[u8])>) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE deployments SET db_name = $2, db_password = $3 WHERE id = $1")
            .bind(id)
            .bind(db.map(|d| d.0))
            .bind(db.map(|d| d.1))
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    pub async fn set_limits(&self, id: &str, limits: &[nx_protocol::api::Enforcement]) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE deployments SET limits = $2 WHERE id = $1")
            .bind(id)
            .bind(Json(limits))
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Makes `deployment` the app's production in one transaction; returns the
    /// previous production. The deployment must be healthy at that moment.
    pub async fn promote(&self, app_id: i64, deployment: &str) -> Result<PromoteOutcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let current: Option<Option<String>> =
            sqlx::query_scalar("SELECT production_id FROM apps WHERE id = $1 FOR UPDATE")
                .bind(app_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(current) = current else { return Ok(PromoteOutcome::NoApp) };
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM deployments WHERE id = $1 AND app_id = $2")
            .bind(deployment)
            .bind(app_id)
            .fetch_optional(&mut *tx)
            .await?;
        match state.as_deref() {
            None => return Ok(PromoteOutcome::NoDeployment),
            Some("healthy") => {}
            Some(other) => return Ok(PromoteOutcome::NotHealthy(other.to_owned())),
        }
        if current.as_deref() == Some(deployment) {
            return Ok(PromoteOutcome::AlreadyProduction);
        }
        sqlx::query("UPDATE apps SET production_id = $2, previous_production_id = $3 WHERE id = $1")
            .bind(app_id)
            .bind(deployment)
            .bind(&current)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE deployments SET promoted_at = now() WHERE id = $1")
            .bind(deployment)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(PromoteOutcome::Promoted { previous: current })
    }

    // --- lifecycle ---

    /// Running deployments of a pull request that are neither production nor
    /// the rollback target.
    pub async fn previews_of_pr(&self, app_id: i64, pr: i64) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} WHERE d.app_id = $1 AND d.pr_number = $2 \
             AND d.state IN ('pending', 'starting', 'healthy', 'failed') AND {NOT_PROTECTED} ORDER BY d.created_at"
        ))
        .bind(app_id)
        .bind(pr)
        .fetch_all(&self.pool)
        .await
    }

    /// Records when deployments were last requested; times never go back.
    pub async fn record_requests(&self, seen: &[(String, DateTime<Utc>)]) -> Result<(), sqlx::Error> {
        let (ids, times): (Vec<&str>, Vec<DateTime<Utc>>) = seen.iter().map(|(d, t)| (d.as_str(), *t)).unzip();
        sqlx::query(
            "UPDATE deployments d SET last_request_at = GREATEST(d.last_request_at, s.at) \
             FROM UNNEST($1::text[], $2::timestamptz[]) AS s(id, at) WHERE d.id = s.id",
        )
        .bind(ids)
        .bind(times)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Running previews without a request (or, never requested, without a
    /// push) for longer than `idle_secs`.
    pub async fn idle_previews(&self, idle_secs: i64) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} WHERE d.state IN ('pending', 'starting', 'healthy', 'failed') AND {NOT_PROTECTED} \
             AND GREATEST(d.created_at, d.last_request_at) < now() - make_interval(secs => $1) ORDER BY d.created_at"
        ))
        .bind(idle_secs as f64)
        .fetch_all(&self.pool)
        .await
    }

    /// Deployments past the `keep` most recent of their app, except
    /// production and the rollback target.
    pub async fn excess_deployments(&self, keep: i64) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} WHERE d.id IN ( \
                 SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY app_id ORDER BY created_at DESC, id) AS n \
                                 FROM deployments) ranked WHERE n > $1) \
             AND {NOT_PROTECTED} ORDER BY d.created_at"
        ))
        .bind(keep)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn delete_deployment(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM deployments WHERE id = $1").bind(id).execute(&self.pool).await.map(|_| ())
    }

    /// Artifacts no deployment uses, recorded more than `grace_secs` ago (a
    /// push records its artifact a moment before its deployment).
    pub async fn unused_artifacts(&self, grace_secs: i64) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT sha256 FROM artifacts a WHERE created_at < now() - make_interval(secs => $1) \
             AND NOT EXISTS (SELECT 1 FROM deployments d WHERE d.artifact_sha256 = a.sha256)",
        )
        .bind(grace_secs as f64)
        .fetch_all(&self.pool)
        .await
    }

    /// Whether an artifact row names `sha256`.
    pub async fn artifact_exists(tx: &mut Transaction<'_, Postgres>, sha256: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM artifacts WHERE sha256 = $1)")
            .bind(sha256)
            .fetch_one(&mut **tx)
            .await
    }

    /// Every artifact digest with a row.
    pub async fn artifact_digests(&self) -> Result<std::collections::HashSet<String>, sqlx::Error> {
        let all: Vec<String> = sqlx::query_scalar("SELECT sha256 FROM artifacts").fetch_all(&self.pool).await?;
        Ok(all.into_iter().collect())
    }

    /// Forgets an artifact unless a deployment or a push took it up
    /// meanwhile; `true` when it was forgotten (and its bytes may go).
    pub async fn delete_unused_artifact(
        tx: &mut Transaction<'_, Postgres>,
        sha256: &str,
        grace_secs: i64,
    ) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(
            "DELETE FROM artifacts a WHERE sha256 = $1 AND created_at < now() - make_interval(secs => $2) \
             AND NOT EXISTS (SELECT 1 FROM deployments d WHERE d.artifact_sha256 = a.sha256)",
        )
        .bind(sha256)
        .bind(grace_secs as f64)
        .execute(&mut **tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Counts for `nx status`: apps, deployments by state.
    /// How many apps there are and their deployments in each state: of every
    /// app, or with `Some(id)` of that app alone.
    pub async fn counts(&self, app_id: Option<i64>) -> Result<(i64, Vec<(String, i64)>), sqlx::Error> {
        let apps = sqlx::query_scalar("SELECT count(*) FROM apps WHERE $1::BIGINT IS NULL OR id = $1")
            .bind(app_id)
            .fetch_one(&self.pool)
            .await?;
        let states = sqlx::query_as(
            "SELECT state, count(*) FROM deployments WHERE $1::BIGINT IS NULL OR app_id = $1 \
             GROUP BY state ORDER BY state",
        )
        .bind(app_id)
        .fetch_all(&self.pool)
        .await?;
        Ok((apps, states))
    }

    // --- backups ---

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

    // --- events ---

    /// The audit log, newest first: the events of `app` (or all) since `since`.
    pub async fn events(
        &self,
        app: Option<&str>,
        since: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<nx_protocol::api::EventInfo>, sqlx::Error> {
        type Row = (i64, DateTime<Utc>, Option<String>, Option<String>, String, String, serde_json::Value);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, at, app, deployment_id, kind, actor, detail FROM events \
                 WHERE ($1::text IS NULL OR app = $1) AND at >= $2 ORDER BY at DESC, id DESC LIMIT $3",
        )
        .bind(app)
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, at, app, deployment, kind, actor, detail)| nx_protocol::api::EventInfo {
                id,
                at,
                app,
                deployment,
                kind,
                actor,
                detail,
            })
            .collect())
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
        sqlx::query("INSERT INTO events (app, deployment_id, kind, actor, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(app)
            .bind(deployment)
            .bind(kind)
            .bind(actor)
            .bind(detail)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }
}

/// What [`Db::promote`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromoteOutcome {
    Promoted { previous: Option<String> },
    AlreadyProduction,
    NotHealthy(String),
    NoDeployment,
    NoApp,
}
