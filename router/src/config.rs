//! The router's configuration, parsed once at startup.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nx_protocol::units::parse_duration;

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
    /// Address for HTTPS (HTTP/2 and HTTP/1.1). Certificates are chosen by
    /// SNI among those the receiver sends with its route tables (custom
    /// domains), else --tls-cert and --tls-key when given.
    #[arg(long, env = "NX_ROUTER_TLS_LISTEN")]
    pub tls_listen: Option<SocketAddr>,
    /// Serve HTTPS on this inherited listening socket instead of binding --tls-listen.
    #[arg(long, env = "NX_ROUTER_TLS_LISTEN_FD", requires = "tls_listen")]
    pub tls_listen_fd: Option<i32>,
    /// PEM certificate chain for --tls-listen, served to names the receiver
    /// has no certificate for.
    #[arg(long, env = "NX_ROUTER_TLS_CERT", requires_all = ["tls_listen", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long, env = "NX_ROUTER_TLS_KEY", requires_all = ["tls_listen", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// Send `Strict-Transport-Security: max-age=<this>` with HTTPS answers for
    /// names with a certificate of the receiver's (custom domains, wildcards),
    /// e.g. `365d`; none when not given. Browsers then refuse plain HTTP and
    /// certificate errors for the name that long: set it once HTTPS works.
    #[arg(long, env = "NX_ROUTER_HSTS_MAX_AGE", value_parser = parse_duration, requires = "tls_listen")]
    pub hsts_max_age: Option<std::time::Duration>,
    /// Unix socket on which the receiver publishes route tables (created mode 0600).
    #[arg(long, env = "NX_ROUTER_CONTROL", default_value = ".nx/router/control.sock")]
    pub control: PathBuf,
    /// Unix socket (created mode 0600) on which this router hands its
    /// listening sockets to a successor started with --upgrade (default:
    /// `upgrade.sock` beside --control).
    #[arg(long, env = "NX_ROUTER_UPGRADE_SOCKET")]
    pub upgrade_socket: Option<PathBuf>,
    /// Replace the router running on --upgrade-socket: take its listening
    /// sockets (--listen, --tls-listen and their descriptors are then not
    /// used; the HTTPS settings must match), its control socket and its
    /// upgrade socket, serve, then let it drain and exit. If this process
    /// fails first, the running router keeps serving. For `systemctl reload`.
    #[arg(long, env = "NX_ROUTER_UPGRADE")]
    pub upgrade: bool,
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
    /// Seconds an app has to accept a connection; then the client gets a 504 page.
    #[arg(long, env = "NX_ROUTER_CONNECT_TIMEOUT", default_value_t = 5)]
    pub connect_timeout_secs: u64,
    /// Seconds an idle pooled upstream connection is kept.
    #[arg(long, env = "NX_ROUTER_IDLE_TIMEOUT", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Time a client has to complete its TLS handshake; then its connection is closed.
    #[arg(long, env = "NX_ROUTER_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// Time a client has to send a whole request head (request line and
    /// headers), counted from the connection's start for its first request and
    /// from the first byte for a kept-alive one; a total, not a per-byte wait.
    /// A head still incomplete then gets 408 and its connection is closed.
    /// An HTTP/2 connection must send its preface within it (from the
    /// connection's start) or is closed.
    #[arg(long, env = "NX_ROUTER_REQUEST_HEAD_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub request_head_timeout: Duration,
    /// Time a kept-alive client connection (an HTTP/2 one with no stream
    /// open too) may wait for its next request, and the longest a client may
    /// leave the router's reads of its body (then 408) or writes of its
    /// response unserved; a WebSocket tunnel silent both ways that long ends.
    #[arg(long, env = "NX_ROUTER_CLIENT_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub client_idle_timeout: Duration,
    /// Time a client has to send a whole request body, counted from the end
    /// of its head; a total, not a per-read wait (each read is also bounded by
    /// --client-idle-timeout). A body still incomplete then gets 408 and its
    /// connection is closed: a client trickling a byte now and then cannot
    /// hold a connection for longer. On HTTP/2 (whose body reads pingora
    /// does not bound) a body still arriving after it is cut at its next
    /// chunk with 408, and its stream ends. Raise it for apps taking large
    /// uploads over slow links.
    #[arg(long, env = "NX_ROUTER_REQUEST_BODY_TIMEOUT", default_value = "300s", value_parser = parse_duration)]
    pub request_body_timeout: Duration,
    /// Time an app has to start its response (its status line and headers)
    /// once the request is sent; then the client gets a 504 page. Each write of
    /// a request to an app is bounded by it too, and so is each wait for the
    /// next bytes of a response body (as nginx's proxy_read_timeout): a body
    /// left silent that long is cut and its connection closed, so server-sent
    /// events need a heartbeat more often than that.
    #[arg(long, env = "NX_ROUTER_UPSTREAM_RESPONSE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub upstream_response_timeout: Duration,
    /// Client connections served at once, over every listener and worker;
    /// beyond it a new connection is closed at once (the client reads the end
    /// of the stream) and the open ones keep being served. Each takes a
    /// descriptor and one per app connection it holds (one for HTTP/1, up to
    /// --h2-max-streams for HTTP/2): the router raises its open-file limit to
    /// fit, and warns when the hard limit is too low.
    #[arg(long, env = "NX_ROUTER_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Client connections one client address may hold at once, within
    /// --max-connections (default: an eighth of it, but at least 64, or all of
    /// it when it is smaller: a browser alone opens several connections per
    /// site, and several people may share an address); an IPv6 client counts by
    /// its /64, which a client usually holds whole. Beyond it a new connection
    /// from that address is closed at once, while other addresses keep being
    /// served. Loopback is not exempt: behind a tunnel or CDN connector on
    /// this host every client shares its address, so raise this to
    /// --max-connections there.
    #[arg(long, env = "NX_ROUTER_MAX_CONNECTIONS_PER_IP", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: Option<u32>,
    /// Streams one HTTP/2 client connection may have open at once; beyond it
    /// a new stream is refused (RST_STREAM REFUSED_STREAM, which clients retry
    /// once one ends). Each open stream may hold an app connection: the
    /// router's open-file need counts this many per connection when HTTPS is on.
    #[arg(long, env = "NX_ROUTER_H2_MAX_STREAMS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub h2_max_streams: u32,
    /// Once its sockets, control socket and TLS key are open, become this
    /// user (and its group, without supplementary groups); the state file is
    /// then read and written as this user. Without it the router keeps its
    /// user. Either way it then runs under a seccomp filter that refuses exec,
    /// ptrace, mounts, module loading and bpf.
    #[arg(long, env = "NX_ROUTER_USER")]
    pub user: Option<String>,
    /// Write the access log: one JSON line per request (`nx_protocol::logs::AccessLine`),
    /// batched per worker thread and written by a thread of its own; lines
    /// the reader is too slow for are dropped and counted, never waited for.
    #[arg(long, env = "NX_ROUTER_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
    /// Write the access log to this inherited descriptor (a pipe the
    /// receiver reads, to pass each app its lines) instead of stdout.
    #[arg(long, env = "NX_ROUTER_ACCESS_LOG_FD")]
    pub access_log_fd: Option<i32>,
    /// Count each deployment's traffic (requests by status class,
    /// durations, bytes, open requests) for `GET /traffic`. A bench and
    /// diagnostic setting: with `false` nothing is counted and `/traffic`
    /// answers 503, so the receiver's metrics and scale to zero have no
    /// figures; the receiver never passes it. `bench/router.sh` measures
    /// what counting and the access log cost with it.
    #[arg(long, env = "NX_ROUTER_TRAFFIC_COUNTERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub traffic_counters: bool,
    /// Log format: `text` or `json`.
    #[arg(long, env = "NX_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// The least default share of the connections one client address gets.
const MIN_DEFAULT_PER_IP: usize = 64;

/// The bounds on what one client connection may hold, and on how many there are.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub tls_handshake: Duration,
    pub request_head: Duration,
    pub client_idle: Duration,
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub request_body: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub h2_max_streams: u32,
}

impl Config {
    /// Where this router listens for a successor, and a successor finds it.
    pub fn upgrade_socket(&self) -> PathBuf {
        self.upgrade_socket.clone().unwrap_or_else(|| crate::upgrade::default_path(&self.control))
    }

    pub fn limits(&self) -> Limits {
        Limits {
            tls_handshake: self.tls_handshake_timeout,
            request_head: self.request_head_timeout,
            client_idle: self.client_idle_timeout,
            upstream_connect: Duration::from_secs(self.connect_timeout_secs),
            upstream_response: self.upstream_response_timeout,
            request_body: self.request_body_timeout,
            max_connections: self.max_connections as usize,
            max_connections_per_ip: self
                .max_connections_per_ip
                .map_or((self.max_connections as usize / 8).max(MIN_DEFAULT_PER_IP), |n| n as usize)
                .min(self.max_connections as usize),
            h2_max_streams: self.h2_max_streams,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn per_ip(args: &[&str]) -> usize {
        Config::try_parse_from([&["nx-router"], args].concat()).unwrap().limits().max_connections_per_ip
    }

    #[test]
    fn the_default_share_per_address_is_an_eighth_of_the_cap_within_bounds() {
        assert_eq!(per_ip(&[]), 512);
        assert_eq!(per_ip(&["--max-connections", "20000"]), 2500);
        assert_eq!(per_ip(&["--max-connections", "100"]), 64);
        assert_eq!(per_ip(&["--max-connections", "12"]), 12);
        assert_eq!(per_ip(&["--max-connections", "100", "--max-connections-per-ip", "5"]), 5);
        assert_eq!(per_ip(&["--max-connections", "100", "--max-connections-per-ip", "500"]), 100);
        assert!(Config::try_parse_from(["nx-router", "--max-connections-per-ip", "0"]).is_err());
    }
}
