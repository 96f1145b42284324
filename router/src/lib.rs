//! nx-router: the reverse proxy in front of every sandbox.
//!
//! Contract of this crate:
//! - a request is routed by its `Host` alone, through a table that is replaced
//!   whole and atomically ([`table::RouteStore`]); a request sees either the old
//!   table or the new one, never a mix;
//! - the table comes from the receiver over a local control channel (a unix
//!   socket, mode 0600, [`control`]), is written to a state file on every change
//!   and read back at boot, so the router serves the last known routes while the
//!   receiver is away;
//! - a new router process takes over the listening sockets of the running one
//!   before that one stops accepting, and a failed successor leaves it
//!   serving ([`upgrade`]);
//! - hosts that are unknown, starting, stopped or failed get a clear page with
//!   the matching status ([`pages`]); nothing the client sends chooses an upstream
//!   other than through the table;
//! - a request to a sleeping deployment is held while the receiver wakes it,
//!   and forwarded once its route is live ([`wake`]);
//! - SIGTERM loses no request: the router stops accepting, answers further
//!   requests on open connections with `Connection: close`, and exits when the
//!   last connection is gone ([`listener`]). The listening sockets usually come
//!   from the receiver, so a replacement router takes over without a gap;
//! - HTTPS certificates are chosen by SNI ([`certs`]): the receiver's come
//!   with each route table and are never written to disk by the router;
//! - once its sockets and TLS key are open, the router runs as `--user` under
//!   a seccomp filter that refuses exec ([`confine`]), and bounds every wait
//!   of a client or an app and the number of client connections
//!   ([`config::Limits`]);
//! - a route with several replicas is balanced across them ([`balance`]); an
//!   idempotent request without a body that could not reach one, or found
//!   its connection dead before any response byte, is sent once to another.

pub mod access;
pub mod balance;
pub mod buffered;
pub mod certs;
pub mod config;
pub mod confine;
pub mod control;
pub mod exchange;
pub mod h1;
pub mod h2;
pub mod listener;
pub mod pages;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod table;
pub mod telemetry;
pub mod traffic;
pub mod upgrade;
pub mod wake;
