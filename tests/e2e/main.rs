//! The end-to-end suite: one test binary, one module per area. See the harness
//! (`tests/harness`) for how receivers are started.

// Tests fail loudly on the first surprise; unwrap is the clearest way to say so.
#![allow(clippy::unwrap_used)]

mod access;
mod ahead;
mod approvals;
mod attacks;
mod build;
mod cli;
mod core;
mod databases;
mod domains;
mod drains;
mod forks;
mod github;
mod lifecycle;
mod listeners;
mod metrics;
mod oidc;
mod outlive;
mod pool;
mod quotas;
mod replicas;
mod restart;
mod router;
mod sftp;
mod sleep;
mod supervision;
mod upgrade;
mod uploads;
mod verify;
