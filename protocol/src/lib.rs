//! The wire contract between the `nx` CLI (and the GitHub Action, which runs it)
//! and `nx-receiver`, and between `nx-receiver` and `nx-router`.
//!
//! Contract of this crate:
//! - no I/O, no clock and no randomness: every function is a pure function of its
//!   arguments, so both sides compute byte-identical results;
//! - every type that crosses a process boundary is defined here exactly once;
//! - names (apps, deployments, hosts) are validated here, so a value that parsed
//!   on one side is valid on the other;
//! - [`secret::Secret`] is the one redacted wrapper every crate keeps tokens and
//!   passwords in.

pub mod api;
pub mod auth;
pub mod logs;
pub mod metrics;
pub mod names;
pub mod routes;
pub mod secret;
pub mod target;
pub mod units;

pub use names::{AppName, DeploymentId, NameError};
