//! What happens to app databases after creation: credentials, preview
//! databases (`empty` or a `copy` of production's), backups to a file or to the
//! object store (verified by a restore into a scratch database), and restores
//! that swap the new data in only when they succeeded.
//!
//! No SQL that came from an app (its data, a dump it uploaded) ever runs as the
//! cluster's superuser. pg_dump logs in as a role holding the app's rights
//! alone; pg_restore always restores into a new database as that database's
//! own new role, made for the occasion, which can do less than the app itself.
//! The superuser only creates, renames, hands over and drops databases and
//! roles.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nx_protocol::api::DbCredentials;
use sqlx::Executor;

use crate::config::Secret;
use crate::db::AppRow;
use crate::secrets::{random_lower, random_token, MasterKey, SecretError};
use nx_cluster::tools::{Login, ToolError};
use nx_cluster::{app_database_env, provision, AppEndpoint, Cluster, ClusterError};

/// Failures of database operations; each says what happened to the data.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
    #[error("the dump could not be restored, so nothing was changed: {0}")]
    RestoreFailed(ToolError),
    #[error("the dump could not be restored, so nothing was changed: restoring it grew {database} over the quota of {quota} bytes (--db-quota)")]
    RestoreOverQuota { database: String, quota: u64 },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("the database password of {app} cannot be opened: {source}")]
    Secret { app: String, source: SecretError },
    #[error("cannot swap the restored database in for {database}: {source}; the old data is back in place")]
    Swap { database: String, source: sqlx::Error },
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// A preview's own database: the name doubles as its login role.
#[derive(Debug, Clone)]
pub struct PreviewDatabase {
    pub name: String,
    pub password: String,
}

/// App database operations.
#[derive(Debug, Clone)]
pub struct Databases {
    cluster: Arc<Cluster>,
    master: Arc<MasterKey>,
    /// Where dumps are written while they are made or received.
    tmp_dir: PathBuf,
}

impl Databases {
    pub fn new(cluster: Arc<Cluster>, master: Arc<MasterKey>, tmp_dir: PathBuf) -> Databases {
        Databases { cluster, master, tmp_dir }
    }

    pub fn endpoint(&self) -> &AppEndpoint {
        self.cluster.endpoint()
    }

    fn password(&self, app: &AppRow) -> Result<String, DatabaseError> {
        self.master.open_str(&app.db_password).map_err(|source| DatabaseError::Secret { app: app.name.clone(), source })
    }

    /// How to reach the app's database.
    pub fn credentials(&self, app: &AppRow) -> Result<DbCredentials, DatabaseError> {
        let password = self.password(app)?;
        let e = self.endpoint();
        let env = app_database_env(e, &app.db_role, &app.db_name, &password);
        let url = env.iter().find(|(k, _)| k == "DATABASE_URL").map(|(_, v)| v.clone()).unwrap_or_default();
        Ok(DbCredentials {
            url,
            host: e.host.clone(),
            port: e.port,
            user: app.db_role.clone(),
            password,
            database: app.db_name.clone(),
        })
    }

    /// A temporary file name for a dump.
    pub fn temp_path(&self, what: &str) -> PathBuf {
        self.tmp_dir.join(format!("{what}-{}.dump", random_lower(12)))
    }

    /// Creates the own database of a preview, `name` from
    /// [`preview_database_name`], empty or (`copy`) filled with a copy of
    /// production's data.
    pub async fn create_preview(&self, app: &AppRow, name: &str, copy: bool) -> Result<PreviewDatabase, DatabaseError> {
        let name = name.to_owned();
        let password = random_token(32);
        let mut admin = self.cluster.admin_connection("postgres").await?;
        provision::create_app_database(&mut admin, &name, &password, self.cluster.limits()).await?;
        self.cluster.refill_spares();
        if copy {
            let copied = async {
                let dump = self.dump(app).await?;
                let restored = self.restore_as_owner(&dump, &name, &password).await;
                let _ = std::fs::remove_file(&dump);
                restored
            }
            .await;
            if let Err(e) = copied {
                let _ = provision::drop_app_database(&mut admin, &name).await;
                return Err(e);
            }
        }
        Ok(PreviewDatabase { name, password })
    }

    /// Drops a database and the role of the same name: a preview's own, or a
    /// removed app's.
    pub async fn drop_database(&self, name: &str) -> Result<(), DatabaseError> {
        self.release(name).await?;
        let mut admin = self.cluster.admin_connection("postgres").await?;
        provision::drop_app_database(&mut admin, name).await?;
        Ok(())
    }

    /// Drops what other databases hold for the platform's role `role`, so it
    /// can be dropped: an app that granted a preview's or a backup's role a
    /// privilege on its own tables would otherwise keep that role alive, its
    /// connections counted against every app's budget.
    async fn release(&self, role: &str) -> Result<(), DatabaseError> {
        let mut admin = self.cluster.admin_connection("postgres").await?;
        for database in provision::databases_holding(&mut admin, role).await? {
            let mut conn = self.cluster.admin_connection(&database).await?;
            provision::drop_owned(&mut conn, role).await?;
        }
        // Privileges on shared objects (`GRANT CONNECT ON DATABASE app_x`)
        // are revoked from any database.
        provision::drop_owned(&mut admin, role).await?;
        Ok(())
    }

    /// Dumps the app's database to a temporary file and returns its path.
    /// pg_dump logs in as a role made for this dump that holds the app's
    /// rights and no more, so it takes none of the app's connections and
    /// whatever the app's objects make it run, runs as the app.
    pub async fn dump(&self, app: &AppRow) -> Result<PathBuf, DatabaseError> {
        let file = self.temp_path("backup");
        let user = format!("{}__dump_{}", app.db_name, random_lower(6));
        let password = random_token(32);
        let mut admin = self.cluster.admin_connection("postgres").await?;
        provision::create_member_role(&mut admin, &user, &password, &app.db_role).await?;
        let login = Login { user: user.clone(), password: Secret::new(password), database: app.db_name.clone() };
        let dumped = self.cluster.tools().dump(&login, &file).await.map_err(DatabaseError::from);
        let released = self.release(&user).await;
        let dropped = provision::drop_role(&mut admin, &user).await.map_err(DatabaseError::from);
        let dropped = released.and(dropped);
        if let Err(e) = dumped.and(dropped) {
            let _ = std::fs::remove_file(&file);
            return Err(e);
        }
        Ok(file)
    }

    /// Restores `file` into a scratch database and drops it: the proof that a
    /// backup can be restored.
    pub async fn verify(&self, app: &AppRow, file: &Path) -> Result<(), DatabaseError> {
        let scratch = format!("{}__verify_{}", app.db_name, random_lower(6));
        let password = random_token(32);
        let mut admin = self.cluster.admin_connection("postgres").await?;
        provision::create_app_database(&mut admin, &scratch, &password, &self.cluster.limits().for_operation()).await?;
        self.cluster.refill_spares();
        let restored = self.restore_as_owner(file, &scratch, &password).await;
        provision::drop_app_database(&mut admin, &scratch).await?;
        restored
    }

    /// Restores `file` into the new database `name` as its own role. When
    /// that fails, says whether the watchdog ended it for going over the
    /// quota, which pg_restore cannot tell.
    async fn restore_as_owner(&self, file: &Path, name: &str, password: &str) -> Result<(), DatabaseError> {
        let restored = self.cluster.tools().restore(file, &own_login(name, password)).await;
        let over_quota = self.cluster.quota_states().take_ended(name);
        match restored {
            Ok(()) => Ok(()),
            Err(_) if over_quota => Err(DatabaseError::RestoreOverQuota {
                database: name.to_owned(),
                quota: self.cluster.limits().quota_kb.saturating_mul(1024),
            }),
            Err(e) => Err(DatabaseError::RestoreFailed(e)),
        }
    }

    /// Loads `file` into a new database and, only if that worked, swaps it in
    /// for the app's database: connections are closed, the old database is
    /// renamed away and dropped, the new one takes its name. A failed restore
    /// changes nothing.
    ///
    /// The new database has a new role of its own name, and pg_restore logs in
    /// as that role: the dump's SQL can touch nothing but the staging database
    /// (not even the app's live data). Only then does the superuser give what
    /// was restored to the app's role, which runs none of it.
    pub async fn restore(&self, app: &AppRow, file: &Path) -> Result<(), DatabaseError> {
        let staging = format!("{}__restore", app.db_name);
        let password = random_token(32);
        let mut admin = self.cluster.admin_connection("postgres").await?;
        // Left over from a restore that died half-way.
        provision::drop_app_database(&mut admin, &staging).await?;
        provision::create_app_database(&mut admin, &staging, &password, &self.cluster.limits().for_operation()).await?;
        self.cluster.refill_spares();
        if let Err(e) = self.restore_as_owner(file, &staging, &password).await {
            let _ = provision::drop_app_database(&mut admin, &staging).await;
            return Err(e);
        }
        let handed = async {
            let mut conn = self.cluster.admin_connection(&staging).await?;
            provision::hand_over(&mut conn, &staging, &app.db_role).await?;
            let _ = sqlx::Connection::close(conn).await;
            Ok::<(), DatabaseError>(())
        }
        .await;
        if let Err(e) = handed {
            let _ = provision::drop_app_database(&mut admin, &staging).await;
            return Err(e);
        }
        let live = quote(&app.db_name);
        let old_name = format!("{}__old_{}", app.db_name, random_lower(6));
        let old = quote(&old_name);
        let swap = async {
            admin.execute(format!("ALTER DATABASE {live} WITH ALLOW_CONNECTIONS false").as_str()).await?;
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&app.db_name)
            .execute(&mut admin)
            .await?;
            admin.execute(format!("ALTER DATABASE {live} RENAME TO {old}").as_str()).await?;
            admin.execute(format!("ALTER DATABASE {} RENAME TO {live}", quote(&staging)).as_str()).await?;
            Ok::<(), sqlx::Error>(())
        }
        .await;
        if let Err(source) = swap {
            // Put the old database back the way it was.
            let _ = admin.execute(format!("ALTER DATABASE {old} RENAME TO {live}").as_str()).await;
            let _ = admin.execute(format!("ALTER DATABASE {live} WITH ALLOW_CONNECTIONS true").as_str()).await;
            let _ = provision::drop_app_database(&mut admin, &staging).await;
            return Err(DatabaseError::Swap { database: app.db_name.clone(), source });
        }
        provision::drop_app_database(&mut admin, &old_name).await?;
        // The staging role, which owns nothing any more.
        provision::drop_role(&mut admin, &staging).await?;
        tracing::info!(app = %app.name, database = %app.db_name, "database restored from a dump");
        Ok(())
    }
}

/// The database (and role) of a preview: `prv_<app>_<deployment>`. Every app
/// database starts with `app_`, so no preview can ever be given the name of an
/// app's database, whatever the two are called; deployment ids have a fixed
/// length and no `_`, so two previews cannot share one either.
pub fn preview_database_name(app_db: &str, deployment: &str) -> String {
    let app = app_db.strip_prefix(APP_PREFIX).unwrap_or(app_db);
    format!("{PREVIEW_PREFIX}{app}_{deployment}")
}

/// How app databases begin (see `AppName::database_name`).
const APP_PREFIX: &str = "app_";
/// How preview databases begin.
const PREVIEW_PREFIX: &str = "prv_";

/// The login of a database's own role.
fn own_login(name: &str, password: &str) -> Login {
    Login { user: name.to_owned(), password: Secret::new(password.to_owned()), database: name.to_owned() }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use nx_protocol::names::{AppName, DeploymentId};

    use super::*;

    #[test]
    fn preview_databases_never_take_an_app_database_name() {
        // The collision of old: app "a" previewing deployment x, and app "a-x".
        let id = DeploymentId::from_random([0; 8]);
        let a = AppName::parse("a2").unwrap();
        let a_id = AppName::parse(&format!("a2-{id}")).unwrap();
        let preview = preview_database_name(&a.database_name(), id.as_str());
        assert_eq!(preview, format!("prv_a2_{id}"));
        assert_ne!(preview, a_id.database_name());
        assert!(a_id.database_name().starts_with(APP_PREFIX));
        assert!(!preview.starts_with(APP_PREFIX));
        // The longest names still fit PostgreSQL's 63 bytes.
        let long = AppName::parse(&"a".repeat(32)).unwrap();
        assert!(preview_database_name(&long.database_name(), id.as_str()).len() <= 63);
    }
}
