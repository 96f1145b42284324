//! The router's configuration, parsed once at startup.

use std::net::SocketAddr;
use std::path::PathBuf;

/// `nx-router` flags; every flag has an environment fallback.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "nx-router", version, about = "Routes each Host to its sandbox; fed by nx-receiver")]
pub struct Config {
    /// Address the proxy listens on for HTTP.
    #[arg(long, env = "NX_ROUTER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Unix socket on which the receiver publishes route tables (created mode 0600).
    #[arg(long, env = "NX_ROUTER_CONTROL", default_value = ".nx/router/control.sock")]
    pub control: PathBuf,
    /// File the route table is saved to on every change and restored from at boot.
    #[arg(long, env = "NX_ROUTER_STATE", default_value = ".nx/router/routes.json")]
    pub state: PathBuf,
    /// Directory for the pid file and the graceful-upgrade socket.
    #[arg(long, env = "NX_ROUTER_RUN_DIR", default_value = ".nx/router")]
    pub run_dir: PathBuf,
    /// Worker threads of the proxy.
    #[arg(long, env = "NX_ROUTER_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// Take over the listening socket of a running router (graceful upgrade):
    /// start the new binary with --upgrade, then send SIGQUIT to the old one.
    #[arg(long)]
    pub upgrade: bool,
    /// Seconds an upstream has to accept a connection.
    #[arg(long, env = "NX_ROUTER_CONNECT_TIMEOUT", default_value_t = 5)]
    pub connect_timeout_secs: u64,
    /// Seconds an idle pooled upstream connection is kept.
    #[arg(long, env = "NX_ROUTER_IDLE_TIMEOUT", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Log format: `text` or `json`.
    #[arg(long, env = "NX_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}
