//! pg_dump and pg_restore. They never run as the cluster's superuser: each
//! connects over the apps' own endpoint as a plain login role (the app's, or
//! one made for the operation) whose credentials are in its environment, never
//! on its command line. Whatever SQL a dump holds runs with that role's rights.

use std::path::{Path, PathBuf};

use nx_runtime::process::{Command, ProcessManager};

use super::AppEndpoint;
use nx_protocol::secret::Secret;

/// Failures of the client tools; their own words are kept.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{program} is not installed in {dir}; install the PostgreSQL client (apt-get install postgresql-client) or pass --pg-bin")]
    Missing { program: &'static str, dir: PathBuf },
    #[error("{program} failed: {reason}")]
    Failed { program: &'static str, reason: String },
    #[error(transparent)]
    Spawn(#[from] nx_runtime::process::SpawnError),
}

/// Who a tool logs in as, and into which database.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: Secret<String>,
    pub database: String,
}

/// The tools and where they reach the cluster.
#[derive(Debug, Clone)]
pub struct PgTools {
    bin: PathBuf,
    endpoint: AppEndpoint,
    pm: ProcessManager,
}

impl PgTools {
    pub fn new(bin: PathBuf, endpoint: AppEndpoint, pm: ProcessManager) -> PgTools {
        PgTools { bin, endpoint, pm }
    }

    /// The program with an environment built here alone: nothing of the
    /// receiver's (a `~/.pgpass`, `PGSERVICE`) takes part.
    fn command(&self, program: &'static str, login: &Login) -> Result<Command, ToolError> {
        let path = self.bin.join(program);
        if !path.is_file() {
            return Err(ToolError::Missing { program, dir: self.bin.clone() });
        }
        let mut cmd = Command::new(path);
        cmd.env = [
            ("PGHOST", self.endpoint.host.as_str()),
            ("PGPORT", &self.endpoint.port.to_string()),
            ("PGUSER", &login.user),
            ("PGPASSWORD", login.password.expose()),
            ("PGDATABASE", &login.database),
            ("PGPASSFILE", "/dev/null"),
            ("PGSYSCONFDIR", "/nonexistent"),
            ("LC_ALL", "C"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        Ok(cmd)
    }

    async fn run(&self, program: &'static str, cmd: Command) -> Result<(), ToolError> {
        let out = self.pm.output(cmd).await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ToolError::Failed { program, reason: out.last_words() })
        }
    }

    /// Dumps the database of `login` in pg_dump's custom format to `file`.
    /// pg_dump reads a consistent snapshot without blocking the app's writes.
    pub async fn dump(&self, login: &Login, file: &Path) -> Result<(), ToolError> {
        let cmd = self.command("pg_dump", login)?.args(["--format=custom", "--no-owner", "--file"]).arg(file);
        self.run("pg_dump", cmd).await
    }

    /// Restores `file` into the database of `login`, every object owned by the
    /// login role; ownership and privilege statements of the dump are skipped,
    /// and the first error undoes everything.
    pub async fn restore(&self, file: &Path, login: &Login) -> Result<(), ToolError> {
        let cmd = self
            .command("pg_restore", login)?
            .args(["--exit-on-error", "--no-owner", "--no-privileges", "--single-transaction", "--dbname"])
            .arg(&login.database)
            .arg(file);
        self.run("pg_restore", cmd).await
    }
}
