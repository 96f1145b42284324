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
    /// Serve HTTP on this inherited listening socket instead of binding --listen
    /// (the receiver passes its socket, which outlives router restarts).
    #[arg(long, env = "NX_ROUTER_LISTEN_FD")]
    pub listen_fd: Option<i32>,
    /// Address for HTTPS (HTTP/2 and HTTP/1.1), with --tls-cert and --tls-key.
    #[arg(long, env = "NX_ROUTER_TLS_LISTEN", requires_all = ["tls_cert", "tls_key"])]
    pub tls_listen: Option<SocketAddr>,
    /// Serve HTTPS on this inherited listening socket instead of binding --tls-listen.
    #[arg(long, env = "NX_ROUTER_TLS_LISTEN_FD", requires = "tls_listen")]
    pub tls_listen_fd: Option<i32>,
    /// PEM certificate chain for --tls-listen.
    #[arg(long, env = "NX_ROUTER_TLS_CERT", requires = "tls_listen")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long, env = "NX_ROUTER_TLS_KEY", requires = "tls_listen")]
    pub tls_key: Option<PathBuf>,
    /// Unix socket on which the receiver publishes route tables (created mode 0600).
    #[arg(long, env = "NX_ROUTER_CONTROL", default_value = ".nx/router/control.sock")]
    pub control: PathBuf,
    /// File the route table is saved to on every change and restored from at boot.
    #[arg(long, env = "NX_ROUTER_STATE", default_value = ".nx/router/routes.json")]
    pub state: PathBuf,
    /// Worker threads of the proxy (default: one per CPU).
    #[arg(long, env = "NX_ROUTER_THREADS")]
    pub threads: Option<usize>,
    /// On SIGTERM, how long to wait for open connections to finish before the
    /// idle ones left are closed.
    #[arg(long, env = "NX_ROUTER_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
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
