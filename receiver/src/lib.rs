//! nx-receiver: receives binaries, keeps them in object storage, runs them in
//! sandboxes with their own databases, and routes them to preview and
//! production URLs.
//!
//! Contract of this crate:
//! - nothing is recorded in the metadata database that is not durable first:
//!   an artifact row follows a published object, an app row follows its
//!   database; a failure on the way leaves no row and no temporary file;
//! - every request except `GET /v1/health` and `GET /v1/target` is signed and
//!   authenticated before its body is read ([`api::auth`]);
//! - the deployment watcher is the only writer of a running deployment's state,
//!   and it updates the database before the router, and both before anyone is
//!   told ([`deploy`]);
//! - every child process (PostgreSQL, nx-router, sandboxes) is started through
//!   the runtime's process manager and stops when the receiver stops.

pub mod api;
pub mod apps;
pub mod artifacts;
pub mod config;
pub mod databases;
pub mod db;
pub mod deploy;
pub mod github;
pub mod limits;
pub mod listeners;
pub mod network;
pub mod pg;
pub mod routing;
pub mod secrets;
pub mod server;
pub mod sftp;
pub mod shares;
pub mod store;
pub mod telemetry;
pub mod volumes;
