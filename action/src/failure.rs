//! Errors that decide the exit code. Everything else exits 2.
//!
//! Exit codes: 0 success; 1 the operation was refused or failed (a binary that
//! will not run, a deployment that failed, a refused request); 2 usage,
//! configuration or local I/O error; 3 the server could not be reached.

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The server or the verifier said no.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unreachable(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unreachable(_) => 3,
        }
    }
}

/// The exit code for any error a command returned.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.chain().find_map(|c| c.downcast_ref::<Failure>()).map_or(2, Failure::exit_code)
}
