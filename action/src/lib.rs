//! `nx`, the command line of NX Sandbox; the GitHub Action runs this same binary.
//!
//! Contract of this crate:
//! - every request to the receiver is signed with the configured key
//!   ([`client`]); the key never leaves this process in clear;
//! - results go to stdout (JSON with `--json`), progress and errors to stderr;
//! - exit codes follow [`failure`]: 0 success, 1 refused or failed, 2 usage or
//!   local error, 3 server unreachable.

pub mod browser;
pub mod build;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod failure;
pub mod manifest;
pub mod output;
pub mod progress;
