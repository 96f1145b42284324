//! The PostgreSQL cluster behind the receiver: embedded (started here) or
//! external (`--database-url`). It holds the receiver's catalog (its metadata
//! database) and one database per app.
//!
//! Contract of this crate:
//! - it knows PostgreSQL, not the receiver: it takes a [`ClusterConfig`] and
//!   secrets, and never reads the receiver's catalog or configuration;
//! - every role and database it makes for an app is named by
//!   [`provision`]'s rules, and an app role can reach its own database only;
//! - every PostgreSQL program it runs (initdb, postgres, pg_dump, pg_restore)
//!   goes through the caller's [`nx_runtime::ProcessManager`];
//! - [`watchdog`] holds app roles to what [`provision::Limits`] says, from
//!   outside, whatever the app sets for itself.

pub mod embedded;
pub mod provision;
pub mod scram;
pub mod tools;
pub mod watchdog;

use std::path::Path;
use std::str::FromStr;

use nx_runtime::ProcessManager;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool};

use self::embedded::{Embedded, EmbeddedConfig, EmbeddedError};

/// Name of the metadata database.
pub const METADATA_DB: &str = "nx";

/// SQLSTATE `invalid_catalog_name`: a connection to a database that does not exist.
const MISSING_DATABASE: &str = "3D000";

/// Failures to reach or prepare the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error("--database-url is not a PostgreSQL URL: {0}")]
    BadUrl(sqlx::Error),
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect { target: String, source: sqlx::Error },
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
}

/// What the receiver's configuration says of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// An external cluster's admin URL; `None` starts the embedded one.
    pub database_url: Option<nx_protocol::secret::Secret<String>>,
    /// Where PostgreSQL's programs are; `None` looks in the usual places.
    pub pg_bin: Option<std::path::PathBuf>,
    /// The system user the embedded cluster runs as.
    pub pg_user: String,
    /// The embedded cluster's TCP port (loopback).
    pub pg_port: u16,
    /// The embedded cluster's `max_connections`.
    pub max_connections: u32,
    /// The nx-shim program, which keeps the embedded cluster's log.
    pub shim: std::path::PathBuf,
    /// How many empty app databases to keep ready.
    pub spare_databases: usize,
    /// What each app's role may use of the cluster.
    pub limits: provision::Limits,
}

/// How apps reach their database, for `DATABASE_URL` and the `PG*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppEndpoint {
    pub host: String,
    pub port: u16,
}

/// The cluster and how to reach it.
#[derive(Debug)]
pub struct Cluster {
    admin: PgConnectOptions,
    endpoint: AppEndpoint,
    tools: tools::PgTools,
    /// Whether the cluster is the receiver's own (embedded).
    own: bool,
    /// How many spare databases to keep ready.
    spares: usize,
    /// What each app's role may use of the cluster.
    limits: provision::Limits,
    /// Where app databases stand against their quota, kept by the watchdog.
    quotas: watchdog::QuotaStates,
}

impl Cluster {
    /// Starts the embedded cluster, or checks the external one.
    pub async fn start(
        config: &ClusterConfig,
        pm: &ProcessManager,
        data_dir: &Path,
        admin_password: &str,
        log: nx_runtime::Log,
    ) -> Result<Cluster, ClusterError> {
        let cluster = match &config.database_url {
            Some(url) => {
                let admin = PgConnectOptions::from_str(url.expose()).map_err(ClusterError::BadUrl)?;
                let endpoint = AppEndpoint { host: admin.get_host().to_owned(), port: admin.get_port() };
                let bin = embedded::find_bin_dir(config.pg_bin.as_deref(), &["pg_dump", "pg_restore"])?;
                Cluster {
                    admin,
                    tools: tools::PgTools::new(bin, endpoint.clone(), pm.clone()),
                    endpoint,
                    own: false,
                    spares: config.spare_databases,
                    limits: config.limits.clone(),
                    quotas: watchdog::QuotaStates::default(),
                }
            }
            None => {
                let bin =
                    embedded::find_bin_dir(config.pg_bin.as_deref(), &["initdb", "postgres", "pg_dump", "pg_restore"])?;
                let ids = embedded::ensure_system_user(pm, &config.pg_user).await?;
                let ec = EmbeddedConfig {
                    bin,
                    root: data_dir.join("postgres"),
                    port: config.pg_port,
                    ids,
                    log_path: data_dir.join("logs/postgres.log"),
                    max_connections: config.max_connections,
                    shim: config.shim.clone(),
                };
                let admin = ec.admin_options(admin_password);
                let endpoint = AppEndpoint { host: "127.0.0.1".into(), port: config.pg_port };
                let tools = tools::PgTools::new(ec.bin.clone(), endpoint.clone(), pm.clone());
                Embedded::start(pm, ec, admin_password, log).await?;
                Cluster {
                    admin,
                    endpoint,
                    tools,
                    own: true,
                    spares: config.spare_databases,
                    limits: config.limits.clone(),
                    quotas: watchdog::QuotaStates::default(),
                }
            }
        };
        Ok(cluster)
    }

    fn describe(&self) -> String {
        format!("{}:{}", self.admin.get_host(), self.admin.get_port())
    }

    /// A connection as the admin role to `database`.
    pub async fn admin_connection(&self, database: &str) -> Result<PgConnection, ClusterError> {
        self.admin
            .clone()
            .database(database)
            .connect()
            .await
            .map_err(|source| ClusterError::Connect { target: self.describe(), source })
    }

    /// Creates the metadata database if needed and returns a pool whose
    /// sessions always use the `public` schema only; its schema is the
    /// caller's to migrate. Every start but the first finds the database:
    /// it then costs one login (the pool's first connection; the others
    /// open when needed) and one round trip, which matters to how soon the
    /// API answers after a restart.
    pub async fn metadata_pool(&self) -> Result<PgPool, ClusterError> {
        let options = self.admin.clone().database(METADATA_DB).options([("search_path", "public")]);
        let connect = || PgPoolOptions::new().max_connections(16).connect_with(options.clone());
        let connect_error = |source| ClusterError::Connect { target: self.describe(), source };
        let pool = match connect().await {
            Ok(pool) => pool,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(MISSING_DATABASE) => {
                let mut admin = self.admin_connection("postgres").await?;
                provision::ensure_metadata_database(&mut admin, METADATA_DB).await?;
                connect().await.map_err(connect_error)?
            }
            Err(source) => return Err(connect_error(source)),
        };
        // The cluster is ours: no role but the admin connects anywhere it
        // was not given (pg_hba already says so; this is a second wall).
        let closed: &[&str] = if self.own { &["postgres", "template1"] } else { &[] };
        let mut conn = pool.acquire().await.map_err(connect_error)?;
        provision::close_to_public(&mut conn, METADATA_DB, closed).await?;
        Ok(pool)
    }

    /// Tops the spare databases up in the background; called at start and
    /// after each provisioning. A failure costs only speed: it is logged and
    /// the next provisioning creates its database itself.
    pub fn refill_spares(self: &std::sync::Arc<Self>) {
        let cluster = self.clone();
        tokio::spawn(async move {
            let refill = async {
                let mut admin = cluster.admin_connection("postgres").await?;
                Ok::<_, ClusterError>(provision::refill_spares(&mut admin, cluster.spares).await?)
            };
            match refill.await {
                Ok(0) => {}
                Ok(changed) => tracing::debug!(changed, want = cluster.spares, "spare databases topped up"),
                Err(e) => tracing::warn!(error = %e, "cannot make spare databases"),
            }
        });
    }

    pub fn endpoint(&self) -> &AppEndpoint {
        &self.endpoint
    }

    pub fn quota_states(&self) -> &watchdog::QuotaStates {
        &self.quotas
    }

    pub fn limits(&self) -> &provision::Limits {
        &self.limits
    }

    pub fn tools(&self) -> &tools::PgTools {
        &self.tools
    }
}

/// The variables an app sees for its database.
pub fn app_database_env(endpoint: &AppEndpoint, role: &str, database: &str, password: &str) -> Vec<(String, String)> {
    let url = format!("postgres://{role}:{password}@{}:{}/{database}", endpoint.host, endpoint.port);
    vec![
        ("DATABASE_URL".into(), url),
        ("PGHOST".into(), endpoint.host.clone()),
        ("PGPORT".into(), endpoint.port.to_string()),
        ("PGUSER".into(), role.into()),
        ("PGPASSWORD".into(), password.into()),
        ("PGDATABASE".into(), database.into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_env_carries_url_and_pg_variables() {
        let env = app_database_env(&AppEndpoint { host: "127.0.0.1".into(), port: 5 }, "app_web", "app_web", "pw");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("DATABASE_URL"), Some("postgres://app_web:pw@127.0.0.1:5/app_web"));
        assert_eq!(get("PGPORT"), Some("5"));
        assert_eq!(get("PGDATABASE"), Some("app_web"));
    }
}
