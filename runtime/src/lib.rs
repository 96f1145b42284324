//! Runs untrusted binaries in bubblewrap sandboxes.
//!
//! Contract of this crate:
//! - [`spec::bwrap_args`] turns a [`spec::SandboxSpec`] into bwrap's command line
//!   as a pure function; what is not on that line is not in the sandbox. The
//!   host directories it binds whole as `/dev` and `/etc` are made by [`root`].
//! - Every sandbox is started by its own [`shim`] (which the
//!   [`process::ProcessManager`] thread starts) as the app's own unprivileged
//!   host uid, with an empty environment plus the app's variables (never on
//!   the command line nor in bwrap's own environment), in its own session,
//!   confined by Landlock where the kernel has it. It outlives this process
//!   and dies with its shim (parent-death signal).
//! - [`supervisor::Sandbox`] reports `Starting → Healthy`, restarts crashes with
//!   capped backoff, ends as `Failed` with the last log lines, and `stop` returns
//!   only when every process of the sandbox is gone.
//! - A sandbox made ahead ([`ready::Ready`]) starts only if the configuration
//!   it is started with makes the very same sandbox; else it is discarded.
//! - Each sandbox's pid 1 is [`init`] (`nx-init`), a static program that
//!   reaps orphans and ends with the app; bwrap's own init is not used.
//! - All `unsafe` code and raw system calls live in [`sys`], but for the one
//!   `waitpid` of [`init`], which is compiled alone. Host paths (`/proc`, the
//!   root the host layout is read from) are passed in, never assumed.

pub mod cgroup;
pub mod health;
pub mod init;
pub mod landlock;
pub mod listen;
pub mod logs;
pub mod net;
pub mod output;
pub mod pool;
pub mod process;
pub mod ready;
pub mod root;
pub mod seccomp;
pub mod shim;
pub mod spec;
pub mod supervisor;
pub mod sys;

pub use health::HealthCheck;
pub use logs::{Log, LogLimits};
pub use process::ProcessManager;
pub use spec::{HostLayout, SandboxSpec};
pub use supervisor::{Liveness, RestartPolicy, Sandbox, SandboxConfig, Status};
