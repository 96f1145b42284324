//! pg_dump and pg_restore, run as the cluster's admin with the credentials in
//! their environment (never on their command line).

use std::path::{Path, PathBuf};

use nx_runtime::process::{Command, ProcessManager};

use crate::config::Secret;

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

/// The tools and how they reach the cluster as its admin.
#[derive(Debug, Clone)]
pub struct PgTools {
    bin: PathBuf,
    env: Secret<Vec<(String, String)>>,
    pm: ProcessManager,
}

impl PgTools {
    /// `env` holds PGHOST, PGPORT, PGUSER and PGPASSWORD for the admin.
    pub fn new(bin: PathBuf, env: Vec<(String, String)>, pm: ProcessManager) -> PgTools {
        PgTools { bin, env: Secret::new(env), pm }
    }

    fn command(&self, program: &'static str, database: &str) -> Result<Command, ToolError> {
        let path = self.bin.join(program);
        if !path.is_file() {
            return Err(ToolError::Missing { program, dir: self.bin.clone() });
        }
        let mut cmd = Command::new(path);
        cmd.env = self.env.expose().iter().map(|(k, v)| (k.into(), v.into())).collect();
        cmd.env.push(("PGDATABASE".into(), database.into()));
        cmd.env.push(("LC_ALL".into(), "C".into()));
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

    /// Dumps `database` in pg_dump's custom format to `file`. pg_dump reads a
    /// consistent snapshot without blocking the app's writes.
    pub async fn dump(&self, database: &str, file: &Path) -> Result<(), ToolError> {
        let cmd = self.command("pg_dump", database)?.args(["--format=custom", "--no-owner", "--file"]).arg(file);
        self.run("pg_dump", cmd).await
    }

    /// Restores `file` into `database`, every object owned by `role`; stops at
    /// the first error.
    pub async fn restore(&self, file: &Path, database: &str, role: &str) -> Result<(), ToolError> {
        let cmd = self
            .command("pg_restore", database)?
            .args(["--exit-on-error", "--no-owner", "--no-privileges", "--single-transaction", "--dbname", database])
            .arg(format!("--role={role}"))
            .arg(file);
        self.run("pg_restore", cmd).await
    }
}
