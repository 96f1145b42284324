//! The metadata database: typed rows and the queries the receiver makes.
//! Every statement is here, so the schema and its uses can be read together.

use sqlx::{PgPool, Postgres, Transaction};

mod apps;
mod artifacts;
mod backups;
mod deployments;
mod domains;
mod drains;
mod events;
mod github;
mod keys;
mod ssh;
mod stats;

pub use apps::{AppRow, EnvTotals};
pub use artifacts::ArtifactRow;
pub use backups::BackupRow;
pub use deployments::{DeploymentRow, Held, NewDeployment, Occupancy, PromoteOutcome};
pub use domains::{Added, DomainRow, WildcardRow};
pub use drains::{DrainRow, NewDrain};
pub use events::DeploymentEvent;
pub use github::{ForkLabel, ReportRow};
pub use keys::{KeyListing, KeyRow};
pub use ssh::{NewSshKey, SshKeyRow, UploadRow};
pub use stats::DatabaseFigures;

/// Cheap-to-clone handle to the metadata pool.
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
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
}
