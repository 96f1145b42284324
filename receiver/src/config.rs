//! The receiver's configuration: parsed once at startup from flags, each with an
//! environment fallback, into typed fields.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

pub use nx_protocol::secret::Secret;
use nx_protocol::units::{parse_duration, parse_size};

/// `nx-receiver` and its subcommands.
#[derive(Debug, clap::Parser)]
#[command(
    name = "nx-receiver",
    version,
    about = "Receives binaries, runs them in sandboxes, serves them on preview URLs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the receiver: API, embedded Postgres, sandboxes and the router.
    /// Stopping it (SIGTERM, SIGINT) leaves the apps running under their
    /// shims; the next start on the same data directory takes them back.
    Serve(Box<ServeConfig>),
    /// Stop every app a receiver left running on a data directory (its
    /// receiver must be stopped first), unmount their data volumes and
    /// remove their network rules: everything `serve` leaves running.
    StopAll(StopAllConfig),
}

/// What `nx-receiver stop-all` needs: the flags of `serve` that say where
/// its apps are.
#[derive(Debug, Clone, clap::Args)]
pub struct StopAllConfig {
    /// The data directory of the receiver whose apps to stop.
    #[arg(long, env = "NX_DATA_DIR", default_value = ".nx")]
    pub data_dir: PathBuf,

    /// The first app uid of that receiver (names its network rules).
    #[arg(long, env = "NX_UID_BASE", default_value_t = 700_000)]
    pub uid_base: u32,

    /// How long each app has between SIGTERM and SIGKILL.
    #[arg(long, env = "NX_STOP_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub stop_grace: Duration,

    /// Root of the cgroup filesystem (that receiver's `--cgroup-root`).
    #[arg(long, env = "NX_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
}

/// See `ServeConfig::network_isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkIsolation {
    Nftables,
    Off,
}

/// Everything `nx-receiver serve` needs to know.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Where all state lives: the embedded cluster, artifacts, app data, logs, keys.
    /// Every directory above it must be traversable by other users (the sandboxes
    /// and Postgres run as their own uids).
    #[arg(long, env = "NX_DATA_DIR", default_value = ".nx")]
    pub data_dir: PathBuf,

    /// Address of the HTTP API.
    #[arg(long, env = "NX_LISTEN", default_value = "127.0.0.1:8070")]
    pub listen: SocketAddr,

    /// How long an API client has to send a whole request head, from its
    /// connection (or the end of its previous response: this is also the
    /// keep-alive idle timeout); a slower one is disconnected.
    #[arg(long, env = "NX_API_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_nonzero_duration)]
    pub api_header_timeout: Duration,

    /// How long a JSON request body may take to arrive whole; a slower one
    /// is answered 408. Uploads have --upload-timeout instead.
    #[arg(long, env = "NX_API_BODY_TIMEOUT", default_value = "30s", value_parser = parse_nonzero_duration)]
    pub api_body_timeout: Duration,

    /// API connections open at once; one client address holds at most an
    /// eighth of them (at least 16). Beyond either, a new connection is
    /// closed before anything is read.
    #[arg(long, env = "NX_API_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub api_max_connections: u64,

    /// Base domain: previews are `<deployment>--<app>.<domain>`, production `<app>.<domain>`.
    #[arg(long, env = "NX_DOMAIN", default_value = "localhost")]
    pub domain: String,

    /// Domain of the preview URLs (`<deployment>--<app>.<preview-domain>`),
    /// when they should not share --domain: give a registrable domain of its
    /// own (one on the Public Suffix List, or at least not --domain nor under
    /// it), so a preview cannot set cookies on production or on other apps.
    /// Defaults to --domain.
    #[arg(long, env = "NX_PREVIEW_DOMAIN")]
    pub preview_domain: Option<String>,

    /// The addresses the router is reached at from the internet: the A/AAAA
    /// records `nx domains add` asks for an apex domain (which cannot be a
    /// CNAME), and what `nx domains verify` accepts instead of the CNAME.
    /// Repeat for several; without one, apex domains cannot be added.
    #[arg(long = "public-address", env = "NX_PUBLIC_ADDRESS", value_delimiter = ',')]
    pub public_addresses: Vec<std::net::IpAddr>,

    /// The DNS server `nx domains verify` asks (`host:port`, over UDP and
    /// TCP, no cache kept between checks); by default the system's resolvers
    /// from /etc/resolv.conf.
    #[arg(long, env = "NX_DNS_RESOLVER")]
    pub dns_resolver: Option<SocketAddr>,

    /// The ACME directory certificates of custom domains come from:
    /// `letsencrypt`, `letsencrypt-staging`, or a URL (another CA). Issuance
    /// runs only with an HTTPS listener (--router-tls-listen); `off` never
    /// asks for certificates.
    #[arg(long, env = "NX_ACME_DIRECTORY", default_value = "letsencrypt", value_parser = parse_acme_directory)]
    pub acme_directory: String,

    /// PEM root certificate to trust for the ACME directory's own HTTPS
    /// (a private or test CA such as pebble), instead of the system's roots.
    #[arg(long, env = "NX_ACME_CA_ROOT")]
    pub acme_ca_root: Option<PathBuf>,

    /// Contact address given to the ACME CA (expiry notices), e.g. `ops@example.com`.
    #[arg(long, env = "NX_ACME_EMAIL")]
    pub acme_email: Option<String>,

    /// A certificate is renewed this long before it expires.
    #[arg(long, env = "NX_ACME_RENEW_BEFORE", default_value = "30d", value_parser = parse_duration)]
    pub acme_renew_before: Duration,

    /// The wait after a first failed attempt to obtain a certificate; it
    /// doubles with each failure in a row, up to a day.
    #[arg(long, env = "NX_ACME_RETRY", default_value = "5m", value_parser = parse_duration)]
    pub acme_retry: Duration,

    /// How often the receiver looks for certificates that are due (new,
    /// within --acme-renew-before of expiry, or past their retry time);
    /// verifying a domain looks at once.
    #[arg(long, env = "NX_ACME_INTERVAL", default_value = "1m", value_parser = parse_nonzero_duration)]
    pub acme_interval: Duration,

    /// Cloudflare API token (Zone:Read and DNS:Edit on the zones below) with
    /// which wildcard certificates of the platform's own domains are
    /// obtained by ACME DNS-01 (see --wildcard-domain): the receiver creates
    /// the `_acme-challenge` TXT record, waits until --dns-resolver sees it,
    /// and deletes it afterwards.
    #[arg(long, env = "NX_CLOUDFLARE_API_TOKEN", hide_env_values = true)]
    pub cloudflare_api_token: Option<Secret<String>>,

    /// Base URL of Cloudflare's API (v4).
    #[arg(long, env = "NX_CLOUDFLARE_API", default_value = "https://api.cloudflare.com/client/v4")]
    pub cloudflare_api: String,

    /// The domains whose wildcard certificate (`*.<domain>`) is obtained by
    /// DNS-01 when a DNS provider is configured (--cloudflare-api-token), so
    /// app and preview hosts are HTTPS from their first request: each must be
    /// --domain or --preview-domain; by default both.
    #[arg(long = "wildcard-domain", env = "NX_WILDCARD_DOMAIN", value_delimiter = ',')]
    pub wildcard_domains: Vec<String>,

    /// How long a DNS-01 challenge's TXT record may take to be seen through
    /// --dns-resolver after the DNS provider accepted it.
    #[arg(long, env = "NX_DNS_PROPAGATION_TIMEOUT", default_value = "2m", value_parser = parse_nonzero_duration)]
    pub dns_propagation_timeout: Duration,

    /// Address the router listens on.
    #[arg(long, env = "NX_ROUTER_LISTEN", default_value = "127.0.0.1:8080")]
    pub router_listen: SocketAddr,

    /// Address for the router's HTTPS listener (HTTP/2): custom domains are
    /// served there with their ACME certificates, every other name with the
    /// two flags below when given.
    #[arg(long, env = "NX_ROUTER_TLS_LISTEN")]
    pub router_tls_listen: Option<SocketAddr>,

    /// Send `Strict-Transport-Security: max-age=<this>` (e.g. `365d`) with the
    /// router's HTTPS answers for names with a certificate of the receiver's
    /// (custom domains, wildcards); none when not given. Browsers then refuse
    /// plain HTTP for the name that long: set it once HTTPS works.
    #[arg(long, env = "NX_ROUTER_HSTS_MAX_AGE", value_parser = parse_duration, requires = "router_tls_listen")]
    pub router_hsts_max_age: Option<Duration>,

    /// PEM certificate chain for --router-tls-listen.
    #[arg(long, env = "NX_ROUTER_TLS_CERT", requires_all = ["router_tls_listen", "router_tls_key"])]
    pub router_tls_cert: Option<PathBuf>,

    /// PEM private key for --router-tls-listen.
    #[arg(long, env = "NX_ROUTER_TLS_KEY", requires_all = ["router_tls_listen", "router_tls_cert"])]
    pub router_tls_key: Option<PathBuf>,

    /// Scheme of the URLs handed to users (`https` when a TLS proxy sits in front).
    #[arg(long, env = "NX_PUBLIC_SCHEME", default_value = "http")]
    pub public_scheme: String,

    /// Port of the URLs handed to users; defaults to the router's port.
    #[arg(long, env = "NX_PUBLIC_PORT")]
    pub public_port: Option<u16>,

    /// Do not start nx-router; run it separately (it reads the same control socket).
    #[arg(long, env = "NX_NO_ROUTER")]
    pub no_router: bool,

    /// The nx-router executable; by default the one next to this executable.
    #[arg(long, env = "NX_ROUTER_BIN")]
    pub router_bin: Option<PathBuf>,

    /// The nx-shim executable that runs each sandbox (and outlives the
    /// receiver); by default the one next to this executable.
    #[arg(long, env = "NX_SHIM_BIN")]
    pub shim_bin: Option<PathBuf>,

    /// Unprivileged system user nx-router becomes once its sockets are open
    /// (created when missing); it owns only the router's state directory.
    #[arg(long, env = "NX_ROUTER_USER", default_value = "nx-router")]
    pub router_user: String,

    /// An extra nx-router flag, passed on as given; repeat for several (for
    /// example `--router-arg=--max-connections=20000`; `nx-router --help`
    /// lists them with their defaults).
    #[arg(long = "router-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub router_args: Vec<String>,

    /// An external PostgreSQL cluster (`postgres://admin:password@host:port/db`) with a
    /// role that may create roles and databases; without it an embedded cluster runs.
    #[arg(long, env = "NX_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret<String>>,

    /// Directory of PostgreSQL's server programs (`initdb`, `postgres`); found under
    /// /usr/lib/postgresql when not given.
    #[arg(long, env = "NX_PG_BIN")]
    pub pg_bin: Option<PathBuf>,

    /// Loopback port of the embedded cluster.
    #[arg(long, env = "NX_PG_PORT", default_value_t = 54320)]
    pub pg_port: u16,

    /// Unprivileged system user the embedded cluster runs as (created when missing).
    #[arg(long, env = "NX_PG_USER", default_value = "nx-postgres")]
    pub pg_user: String,

    /// Empty databases (`nx_spare_*`) kept ready, so that a new app or
    /// preview database is a rename instead of a `CREATE DATABASE`, whose
    /// hundreds of file creations dominate provisioning. 0 turns this off
    /// (and drops the spares left).
    #[arg(long, env = "NX_SPARE_DATABASES", default_value_t = 2)]
    pub spare_databases: usize,

    /// `max_connections` of the embedded cluster (an external cluster's own
    /// setting is read from it instead). Every app, and every preview with a
    /// database of its own, holds `--db-app-connections` of them; an app whose
    /// share would not fit is refused.
    #[arg(long, env = "NX_DB_MAX_CONNECTIONS", default_value_t = 1000)]
    pub db_max_connections: u32,

    /// Connections no app may take: the platform's own sessions (metadata
    /// pool, backups, restores, the watchdog) and PostgreSQL's superuser slots.
    #[arg(long, env = "NX_DB_RESERVED_CONNECTIONS", default_value_t = 50)]
    pub db_reserved_connections: u32,

    /// Connections one app (or preview with its own database) may hold at once.
    #[arg(long, env = "NX_DB_APP_CONNECTIONS", default_value_t = 20)]
    pub db_app_connections: u32,

    /// Longest an app's statement may run: the database watchdog cancels any
    /// that runs longer, whatever `statement_timeout` the app set itself.
    #[arg(long, env = "NX_DB_STATEMENT_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub db_statement_timeout: Duration,

    /// Temporary file space one session of an app may use (sorts, hashes):
    /// PostgreSQL's `temp_file_limit`, set on the app's role, which only a
    /// superuser can change.
    #[arg(long, env = "NX_DB_TEMP_FILE_LIMIT", default_value = "1GiB", value_parser = parse_size)]
    pub db_temp_file_limit: u64,

    /// Size one app database may reach. Over it, the app's sessions are ended
    /// and its new ones are read-only; an app that goes on writing anyway
    /// loses its login until the database is under the quota again (the
    /// quota raised, or a smaller dump restored). Nothing is deleted.
    #[arg(long, env = "NX_DB_QUOTA", default_value = "10GiB", value_parser = parse_size)]
    pub db_quota: u64,

    /// How often the database watchdog checks statement times and sizes.
    #[arg(long, env = "NX_DB_WATCHDOG_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub db_watchdog_interval: Duration,

    /// Object store for artifacts, as an object_store URL (`s3://bucket/prefix`,
    /// `gs://...`, `az://...`, `file:///path`); the default is `<data-dir>/store`.
    #[arg(long, env = "NX_STORE")]
    pub store: Option<String>,

    /// Largest binary accepted, with a unit (`512MiB`, `2GiB`).
    #[arg(long, env = "NX_MAX_UPLOAD", default_value = "512MiB", value_parser = parse_size)]
    pub max_upload: u64,

    /// Uploads in progress at once, over SFTP and the HTTP API together (each
    /// holds a temporary file of up to --max-upload); beyond it a push is
    /// refused with a message to try again (HTTP 503).
    #[arg(long, env = "NX_MAX_CONCURRENT_UPLOADS", default_value_t = nx_store::DEFAULT_MAX_UPLOADS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_uploads: u64,

    /// Uploads one app may have in progress at once, out of
    /// --max-concurrent-uploads (a quarter of it, at least 1, unless set);
    /// beyond it a push of that app is refused with a message to try again
    /// once one has finished (HTTP 429), while other apps still push.
    #[arg(long, env = "NX_MAX_UPLOADS_PER_APP", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_uploads_per_app: Option<u64>,

    /// How long one upload (HTTP or SFTP, from its start to its last byte)
    /// may take (`10m`, `1h`); a slower one is cut off with HTTP 408 or an
    /// SFTP failure, and nothing of it is kept.
    #[arg(long, env = "NX_UPLOAD_TIMEOUT", default_value = "10m", value_parser = parse_nonzero_duration)]
    pub upload_timeout: Duration,

    /// Loopback ports handed to sandboxes, `FIRST-LAST`.
    #[arg(long, env = "NX_PORT_RANGE", default_value = "20000-29999", value_parser = parse_range)]
    pub port_range: RangeInclusive<u16>,

    /// First host uid given to apps; app n runs as uid-base + n.
    #[arg(long, env = "NX_UID_BASE", default_value_t = 700_000)]
    pub uid_base: u32,

    /// The bubblewrap executable.
    #[arg(long, env = "NX_BWRAP", default_value = "/usr/bin/bwrap")]
    pub bwrap: PathBuf,

    /// How long a new deployment may take to answer its health check (`30s`, `2m`).
    #[arg(long, env = "NX_START_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub start_timeout: Duration,

    /// How long a stopping app has between SIGTERM and SIGKILL.
    #[arg(long, env = "NX_STOP_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub stop_grace: Duration,

    /// How long the API's requests in flight have to finish once the
    /// receiver is told to stop (SIGTERM, SIGINT); those still open then are
    /// cut, and `nx` retries a cut push against the next receiver, which
    /// answers it with the same deployment. Log follows end at once. Keep it
    /// under the service manager's own stop timeout (systemd's is 90 s).
    #[arg(long, env = "NX_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Sandboxes kept parked ahead of starts, each already in a cgroup of its
    /// own, so a start skips the kernel's wait on joining one (about 10-16 ms
    /// on an untuned host; bench/RESULTS.md). 0 turns the pool off. Each
    /// parked sandbox is two idle processes.
    #[arg(long, env = "NX_SANDBOX_POOL", default_value_t = 2)]
    pub sandbox_pool: usize,

    /// Sleeping deployments that keep their sandbox made and waiting for
    /// their wake: bwrap's setup done, the app not started, so a wake skips
    /// most of a start (bench/RESULTS.md). Each costs an idle shim, bwrap
    /// and nx-init (about 350 KiB), and none of the app's memory. Deployments put to sleep beyond
    /// this many wake the usual way. 0 turns it off.
    #[arg(long, env = "NX_WAKE_READY", default_value_t = 64)]
    pub wake_ready: usize,

    /// The most of those places one app's deployments hold: past it, the
    /// app's own deployment that has slept longest gives its place to the
    /// one that fell asleep last, so one app's many sleeping previews cannot
    /// take every place. 0 turns ready wakes off.
    #[arg(long, env = "NX_WAKE_READY_PER_APP", default_value_t = 16)]
    pub wake_ready_per_app: usize,

    /// Pushes under way that get their sandbox made while their binary is
    /// uploaded (the deployment's id and port promised at admission), so
    /// their start waits for the app's own start alone (bench/RESULTS.md).
    /// A preview with a database of its own gets none. 0 turns it off.
    #[arg(long, env = "NX_PUSH_READY", default_value_t = 8)]
    pub push_ready: usize,

    /// Memory of each sandbox unless its app sets its own.
    #[arg(long, env = "NX_DEFAULT_MEMORY", default_value = "512MiB", value_parser = parse_size)]
    pub default_memory: u64,

    /// CPU cores of each sandbox unless its app sets its own (fractions allowed).
    #[arg(long, env = "NX_DEFAULT_CPU", default_value_t = 1.0)]
    pub default_cpu: f64,

    /// Processes and threads of each sandbox unless its app sets its own.
    #[arg(long, env = "NX_DEFAULT_PIDS", default_value_t = 512)]
    pub default_pids: u32,

    /// Open files of each sandbox unless its app sets its own.
    #[arg(long, env = "NX_DEFAULT_NOFILE", default_value_t = 4096)]
    pub default_nofile: u64,

    /// Size of each sandbox's /tmp unless its app sets its own.
    #[arg(long, env = "NX_DEFAULT_TMP", default_value = "256MiB", value_parser = parse_size)]
    pub default_tmp: u64,

    /// Size of each app's /data volume unless the app sets its own.
    #[arg(long, env = "NX_DEFAULT_DATA", default_value = "1GiB", value_parser = parse_size)]
    pub default_data: u64,

    /// The most memory any app may be given (`nx apps set --memory`), by the admin
    /// included; deploy keys may not raise limits at all.
    #[arg(long, env = "NX_MAX_APP_MEMORY", default_value = "8GiB", value_parser = parse_size)]
    pub max_app_memory: u64,

    /// The most CPU cores any app may be given.
    #[arg(long, env = "NX_MAX_APP_CPU", default_value_t = 4.0)]
    pub max_app_cpu: f64,

    /// The most processes and threads any app may be given.
    #[arg(long, env = "NX_MAX_APP_PIDS", default_value_t = 4096)]
    pub max_app_pids: u32,

    /// The most open files any app may be given.
    #[arg(long, env = "NX_MAX_APP_NOFILE", default_value_t = 65536)]
    pub max_app_nofile: u64,

    /// The largest /tmp any app may be given (it is memory).
    #[arg(long, env = "NX_MAX_APP_TMP", default_value = "1GiB", value_parser = parse_size)]
    pub max_app_tmp: u64,

    /// The largest /data volume any app may be given. Volumes are sparse images,
    /// so keep this below the free space of the data directory's filesystem.
    #[arg(long, env = "NX_MAX_APP_DATA", default_value = "20GiB", value_parser = parse_size)]
    pub max_app_data: u64,

    /// Crashes of a deployment within --restart-window after which it is
    /// marked failed instead of restarted again.
    #[arg(long, env = "NX_MAX_RESTARTS", default_value_t = 5)]
    pub max_restarts: u32,

    /// The window --max-restarts counts crashes in.
    #[arg(long, env = "NX_RESTART_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub restart_window: Duration,

    /// Pause before the first restart; it doubles with every crash in the
    /// window, up to 30s.
    #[arg(long, env = "NX_RESTART_BACKOFF", default_value = "500ms", value_parser = parse_duration)]
    pub restart_backoff: Duration,

    /// How soon a running sandbox that stops answering its health check is
    /// reported unhealthy and taken out of its route: the check runs every
    /// third of this, each probe given a third of it, and two failures in a
    /// row make it unhealthy. A deployment's last replica still running is
    /// never taken out; it is restarted (--unhealthy-restart-after).
    #[arg(long, env = "NX_HEALTH_INTERVAL", default_value = "10s", value_parser = parse_nonzero_duration)]
    pub health_interval: Duration,

    /// A running sandbox failing its health check for this long is stopped
    /// (SIGTERM, --stop-grace, SIGKILL) and restarted as after a crash
    /// (--max-restarts and --restart-window count it).
    #[arg(long, env = "NX_UNHEALTHY_RESTART_AFTER", default_value = "30s", value_parser = parse_nonzero_duration)]
    pub unhealthy_restart_after: Duration,

    /// Previews (deployments that are neither production nor the rollback
    /// target) without a request for this long are stopped; their URL then
    /// says why.
    #[arg(long, env = "NX_PREVIEW_IDLE", default_value = "7d", value_parser = parse_duration)]
    pub preview_idle: Duration,

    /// How long the audit log (`nx events`) keeps an event.
    #[arg(long, env = "NX_EVENTS_RETENTION", default_value = "90d", value_parser = parse_duration)]
    pub events_retention: Duration,

    /// Deployments kept per app, newest first; older ones are removed with
    /// their logs (production and the rollback target always stay).
    #[arg(long, env = "NX_KEEP_DEPLOYMENTS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_deployments: u32,

    /// Deployments one app may have running at once (starting or healthy,
    /// production and the rollback target included): a push beyond it is
    /// refused (409) until one is stopped, so one deploy key cannot fill the
    /// host with sandboxes of its app's full limits. At least 2, so a new
    /// deployment can always be pushed next to production once the rollback
    /// target is stopped. Replacing production for an environment change may
    /// exceed it by one (see ARCHITECTURE.md, "Lifecycle").
    #[arg(long, env = "NX_MAX_RUNNING_PER_APP", default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..))]
    pub max_running_per_app: u32,

    /// Previews of one app that may have a database of their own at once
    /// (`preview_db = empty|copy`): each takes --db-app-connections of the
    /// cluster's budget, so a preview push beyond it is refused (409) until
    /// one of them is stopped.
    #[arg(long, env = "NX_MAX_PREVIEW_DATABASES_PER_APP", default_value_t = 5)]
    pub max_preview_databases_per_app: u32,

    /// How long a binary no deployment uses stays in the object store after
    /// its last push.
    #[arg(long, env = "NX_ARTIFACT_GRACE", default_value = "1h", value_parser = parse_duration)]
    pub artifact_grace: Duration,

    /// How often idle previews, old deployments and unused binaries are
    /// looked for.
    #[arg(long, env = "NX_JANITOR_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub janitor_interval: Duration,

    /// Address of the SFTP server (pushes over plain SFTP or scp). Use
    /// 0.0.0.0:2222 to take uploads from other machines.
    #[arg(long, env = "NX_SFTP_LISTEN", default_value = "127.0.0.1:2222")]
    pub sftp_listen: SocketAddr,

    /// Address of the Prometheus endpoint, `GET /metrics`: every app's
    /// traffic and resources, and the platform's. Off unless given. It is
    /// not signed (a scraper cannot sign requests), so give it a loopback or
    /// private address (127.0.0.1:9464): it names every app and deployment.
    #[arg(long, env = "NX_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Records one log drain holds while it is down or slow; beyond them the
    /// oldest are dropped and counted (`nx_drain_dropped_total`).
    #[arg(long, env = "NX_DRAIN_BUFFER", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub drain_buffer: u64,

    /// MiB of records one log drain holds while it is down or slow (each
    /// record counted as its text, its structured fields and 128 bytes);
    /// beyond them the oldest are dropped and counted like those beyond
    /// `--drain-buffer`. Whichever bound is reached first applies, so a
    /// drain that never reads costs the receiver at most this much memory.
    #[arg(long, env = "NX_DRAIN_BUFFER_MIB", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub drain_buffer_mib: u64,

    /// Let log drains reach private addresses: RFC 1918, IPv6 unique-local
    /// and shared address space (100.64.0.0/10), for a log host on the
    /// private network. Refused by default, since every deploy key can add
    /// a drain. Loopback needs `--drain-allow-loopback`; link-local and
    /// cloud metadata (169.254.169.254, fd00:ec2::254, 100.100.100.200,
    /// 168.63.129.16) stay refused whatever is set.
    #[arg(long, env = "NX_DRAIN_ALLOW_PRIVATE")]
    pub drain_allow_private: bool,

    /// Let log drains reach the host itself (127.0.0.0/8, ::1, localhost),
    /// where PostgreSQL, the API and other host daemons listen: any deploy
    /// key could then write to them. For tests with a local log sink only.
    #[arg(long, env = "NX_DRAIN_ALLOW_LOOPBACK")]
    pub drain_allow_loopback: bool,

    /// PEM file of CA certificates log drains trust beside the public roots
    /// (a private syslog or HTTPS endpoint; the suite's own CA).
    #[arg(long, env = "NX_DRAIN_CA")]
    pub drain_ca: Option<PathBuf>,

    /// SSH connections open at once; one client address holds at most an
    /// eighth of them (at least 16). Beyond either, a new connection is
    /// closed before the SSH greeting.
    #[arg(long, env = "NX_SFTP_MAX_CONNECTIONS", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub sftp_max_connections: u64,

    /// How long an SSH client has from its connection to a successful
    /// login; one that has not logged in by then is disconnected.
    #[arg(long, env = "NX_SFTP_AUTH_TIMEOUT", default_value = "20s", value_parser = parse_nonzero_duration)]
    pub sftp_auth_timeout: Duration,

    /// Do not run the SFTP server.
    #[arg(long, env = "NX_NO_SFTP")]
    pub no_sftp: bool,

    /// How often a live SFTP session's key is looked up again (`2s`): a key
    /// revoked or moved to other apps ends its sessions within this, busy or
    /// idle. Uploads also check their key when they are opened and closed,
    /// whatever this says.
    #[arg(long, env = "NX_SSH_KEY_RECHECK", default_value = "2s", value_parser = parse_nonzero_duration)]
    pub ssh_key_recheck: Duration,

    /// GitHub's API, or a GitHub Enterprise server's (`https://HOST/api/v3`).
    #[arg(long, env = "NX_GITHUB_API", default_value = "https://api.github.com")]
    pub github_api: String,

    /// A token for GitHub's API (fine-grained: pull requests, issues,
    /// statuses, checks and deployments of the repositories, read and
    /// write; metadata read, to ask who may approve; organization members
    /// read, for `[promote] reviewers` teams). Either this or a GitHub App.
    #[arg(long, env = "NX_GITHUB_TOKEN", hide_env_values = true, conflicts_with = "github_app_id")]
    pub github_token: Option<Secret<String>>,

    /// The id of the GitHub App the receiver acts as; needs --github-app-key.
    #[arg(long, env = "NX_GITHUB_APP_ID", requires = "github_app_key")]
    pub github_app_id: Option<u64>,

    /// The GitHub App's private key (PEM file).
    #[arg(long, env = "NX_GITHUB_APP_KEY", requires = "github_app_id")]
    pub github_app_key: Option<PathBuf>,

    /// The secret GitHub signs webhooks with; webhooks are refused without it.
    #[arg(long, env = "NX_GITHUB_WEBHOOK_SECRET", hide_env_values = true)]
    pub github_webhook_secret: Option<Secret<String>>,

    /// Webhook deliveries that may wait for the worker; one more is answered
    /// 503 with Retry-After and not recorded, so its redelivery is taken.
    #[arg(long, env = "NX_GITHUB_WEBHOOK_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub github_webhook_queue: u16,

    /// The issuer of the GitHub Actions OIDC tokens a workflow may push with
    /// instead of a deploy key (a GitHub Enterprise server's own, or a local
    /// one in tests); its signing keys are read from its
    /// `/.well-known/openid-configuration`.
    #[arg(long, env = "NX_GITHUB_OIDC_ISSUER", default_value = "https://token.actions.githubusercontent.com")]
    pub github_oidc_issuer: String,

    /// The audience a workflow's OIDC token must be issued for: this API's
    /// URL as workflows reach it (the action asks for a token with its
    /// server URL as audience). Defaults to `http://` and --listen; set it
    /// when the API is reached through another name or a TLS proxy.
    #[arg(long, env = "NX_GITHUB_OIDC_AUDIENCE")]
    pub github_oidc_audience: Option<String>,

    /// Least time between two fetches of the issuer's signing keys: a token
    /// signed with a key not seen yet makes the receiver fetch them again,
    /// at most this often, so unknown key ids cannot make it hammer the issuer.
    #[arg(long, env = "NX_GITHUB_OIDC_REFRESH", default_value = "1m", value_parser = parse_duration)]
    pub github_oidc_refresh: Duration,

    /// How apps are kept off the host's other ports: `nftables` (rules on the
    /// apps' uids) or `off` (reported as not enforced on every deployment).
    #[arg(long, env = "NX_NETWORK_ISOLATION", value_enum, default_value_t = NetworkIsolation::Nftables)]
    pub network_isolation: NetworkIsolation,

    /// A private address range apps may reach (`10.1.0.0/16`, `fd00:1::/32`);
    /// repeat, or separate with commas, for more. Without it, private (RFC
    /// 1918), CGNAT, link-local and unique-local destinations are closed to apps.
    #[arg(long = "allow-egress", env = "NX_ALLOW_EGRESS", value_delimiter = ',', value_name = "CIDR")]
    pub allow_egress: Vec<crate::network::Cidr>,

    /// Let apps ask the host's DNS resolvers: a local one on port 53 and the
    /// nameservers of /etc/resolv.conf even at private addresses. Without it,
    /// sandboxes get the host's nameservers they can reach, else 1.1.1.1 and
    /// 9.9.9.9.
    #[arg(long, env = "NX_ALLOW_HOST_DNS")]
    pub allow_host_dns: bool,

    /// Root of the cgroup filesystem.
    #[arg(long, env = "NX_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,

    /// Log format: `text` or `json`.
    #[arg(long, env = "NX_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Admin token to install on first start (`nxa_...`); when not given, one is
    /// generated and printed once.
    #[arg(long, env = "NX_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret<String>>,
}

impl ServeConfig {
    /// The configuration `nx-receiver serve` runs with when given no flag
    /// (environment fallbacks still apply).
    pub fn defaults() -> ServeConfig {
        #[derive(Debug, clap::Parser)]
        struct Serve {
            #[command(flatten)]
            serve: ServeConfig,
        }
        <Serve as clap::Parser>::parse_from(["nx-receiver"]).serve
    }

    /// `nx-receiver serve` with `extra` flags, as the tests give them.
    #[cfg(test)]
    pub fn parse(extra: &[&str]) -> Result<ServeConfig, clap::Error> {
        use clap::Parser;
        match Cli::try_parse_from([&["nx-receiver", "serve"], extra].concat())?.command {
            Command::Serve(c) => Ok(*c),
            other => panic!("serve parsed as {other:?}"),
        }
    }

    /// What the PostgreSQL cluster is to be, from the `--pg-*`, `--db-*` and
    /// `--database-url` flags.
    pub fn cluster(&self) -> nx_cluster::ClusterConfig {
        nx_cluster::ClusterConfig {
            database_url: self.database_url.clone(),
            pg_bin: self.pg_bin.clone(),
            pg_user: self.pg_user.clone(),
            pg_port: self.pg_port,
            max_connections: self.db_max_connections,
            shim: self.shim(),
            spare_databases: self.spare_databases,
            limits: nx_cluster::provision::Limits {
                connections: self.db_app_connections,
                reserved: self.db_reserved_connections,
                temp_file_limit_kb: self.db_temp_file_limit.div_ceil(1024),
                statement_timeout_ms: self.db_statement_timeout.as_millis().min(i32::MAX as u128) as u64,
                quota_kb: self.db_quota.div_ceil(1024),
            },
        }
    }

    /// The nx-shim program: `--shim-bin`, or the one next to this
    /// executable.
    pub fn shim(&self) -> PathBuf {
        match &self.shim_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe().unwrap_or_default().with_file_name("nx-shim"),
        }
    }

    /// Each app's share of --max-concurrent-uploads.
    pub fn uploads_per_app(&self) -> u64 {
        let max = self.max_concurrent_uploads;
        self.max_uploads_per_app.unwrap_or(nx_store::default_share(max as usize) as u64).min(max)
    }

    /// The audience GitHub OIDC tokens must name (see `github_oidc_audience`).
    pub fn oidc_audience(&self) -> String {
        match &self.github_oidc_audience {
            Some(a) => a.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.listen),
        }
    }

    /// The domain of preview URLs.
    pub fn preview_domain(&self) -> &str {
        self.preview_domain.as_deref().unwrap_or(&self.domain)
    }

    /// Refuses a `--preview-domain` that shares cookies with `--domain`: the
    /// same domain, or one under the other (a host may set cookies for its
    /// parent domains).
    pub fn check_preview_domain(&self) -> Result<(), String> {
        let Some(preview) = &self.preview_domain else { return Ok(()) };
        let (p, d) = (preview.to_ascii_lowercase(), self.domain.to_ascii_lowercase());
        if p == d || p.ends_with(&format!(".{d}")) || d.ends_with(&format!(".{p}")) {
            return Err(format!(
                "--preview-domain {preview} shares cookies with --domain {}: give previews a registrable domain of \
                 their own (one on the Public Suffix List, or at least neither --domain nor under it), or leave the \
                 flag out to serve previews under --domain",
                self.domain
            ));
        }
        Ok(())
    }

    /// The domains whose wildcard certificate is obtained by DNS-01: none
    /// without a DNS provider, else --wildcard-domain, by default --domain
    /// and --preview-domain.
    pub fn wildcard_domains(&self) -> Vec<String> {
        if self.cloudflare_api_token.is_none() {
            return Vec::new();
        }
        let mut domains = if self.wildcard_domains.is_empty() {
            vec![self.domain.clone(), self.preview_domain().to_owned()]
        } else {
            self.wildcard_domains.iter().map(|d| d.trim_end_matches('.').to_ascii_lowercase()).collect()
        };
        domains.dedup();
        domains
    }

    /// Refuses a --wildcard-domain that is neither --domain nor
    /// --preview-domain: the router serves no other name under a wildcard,
    /// so its certificate would only spend the CA's rate limits.
    pub fn check_wildcard_domains(&self) -> Result<(), String> {
        let ours = [self.domain.to_ascii_lowercase(), self.preview_domain().to_ascii_lowercase()];
        match self.wildcard_domains.iter().find(|d| !ours.contains(&d.trim_end_matches('.').to_ascii_lowercase())) {
            Some(other) => Err(format!(
                "--wildcard-domain {other} is neither --domain {} nor --preview-domain {}: wildcard certificates \
                 are for the platform's own hosts; custom domains get theirs by HTTP-01",
                self.domain,
                self.preview_domain()
            )),
            None => Ok(()),
        }
    }

    /// The ACME directory URL, or `None` when certificates are not asked for
    /// (`--acme-directory off`, or no HTTPS listener to serve them).
    pub fn acme_directory_url(&self) -> Option<&str> {
        self.router_tls_listen?;
        match self.acme_directory.as_str() {
            "off" => None,
            "letsencrypt" => Some("https://acme-v02.api.letsencrypt.org/directory"),
            "letsencrypt-staging" => Some("https://acme-staging-v02.api.letsencrypt.org/directory"),
            url => Some(url),
        }
    }

    /// The port shown in URLs.
    pub fn url_port(&self) -> u16 {
        self.public_port.unwrap_or(self.router_listen.port())
    }

    /// The limits of an app: its own settings over this receiver's defaults.
    pub fn limits_for(&self, own: &nx_protocol::api::LimitSettings) -> nx_runtime::cgroup::Limits {
        let mib = |v: Option<u64>, default: u64| v.map_or(default, |m| m << 20);
        nx_runtime::cgroup::Limits {
            memory_bytes: Some(mib(own.memory_mib, self.default_memory)),
            cpu_millis: Some((own.cpu.unwrap_or(self.default_cpu) * 1000.0).round() as u32),
            pids: Some(own.pids.unwrap_or(self.default_pids)),
            nofile: Some(own.nofile.unwrap_or(self.default_nofile)),
            tmp_bytes: mib(own.tmp_mib, self.default_tmp),
            data_bytes: Some(mib(own.data_mib, self.default_data)),
        }
    }

    /// The cgroup under which this receiver's sandboxes live; named by the uid
    /// range, so two receivers on one host never share one.
    pub fn cgroup_group(&self) -> String {
        cgroup_group(self.uid_base)
    }
}

/// The cgroup under which the receiver with apps from `uid_base` keeps its
/// sandboxes' cgroups.
pub fn cgroup_group(uid_base: u32) -> String {
    format!("nx-sandbox-{uid_base}")
}

/// A duration that is not zero (zero would refuse everything, or spin).
fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0s".into()),
        d => Ok(d),
    }
}

fn parse_acme_directory(s: &str) -> Result<String, String> {
    let named = matches!(s, "letsencrypt" | "letsencrypt-staging" | "off");
    let url = url::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "https" | "http") && u.host().is_some());
    if named || url {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not letsencrypt, letsencrypt-staging, off or the URL of an ACME directory (https://...)"))
    }
}

fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let err = || format!("{s:?} is not a port range; write it like 20000-29999");
    let (a, b) = s.split_once('-').ok_or_else(err)?;
    let (a, b): (u16, u16) = (a.trim().parse().map_err(|_| err())?, b.trim().parse().map_err(|_| err())?);
    if a == 0 || a > b {
        return Err(err());
    }
    Ok(a..=b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acme_directories_are_named_or_urls_and_previews_never_share_cookies_with_production() {
        assert!(ServeConfig::parse(&["--acme-directory", "letsencrypt-staging"]).is_ok());
        assert!(ServeConfig::parse(&["--acme-directory", "https://127.0.0.1:14000/dir"]).is_ok());
        let e = ServeConfig::parse(&["--acme-directory", "letsencrpyt"]).unwrap_err().to_string();
        assert!(e.contains("\"letsencrpyt\" is not letsencrypt, letsencrypt-staging, off or the URL"), "{e}");
        let check = |domain: &str, preview: &str| {
            ServeConfig::parse(&["--domain", domain, "--preview-domain", preview]).unwrap().check_preview_domain()
        };
        assert_eq!(check("example.com", "example-previews.net"), Ok(()));
        for (domain, preview) in [("example.com", "previews.example.com"), ("apps.example.com", "example.com")] {
            let e = check(domain, preview).unwrap_err();
            assert!(e.starts_with(&format!("--preview-domain {preview} shares cookies with --domain {domain}")), "{e}");
        }
        assert_eq!(ServeConfig::parse(&[]).unwrap().check_preview_domain(), Ok(()));
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_range("20000-20009").unwrap(), 20000..=20009);
        assert!(parse_range("9-1").is_err());
        assert!(parse_range("0-10").is_err());
    }

    #[test]
    fn egress_ranges_are_typed_and_repeatable() {
        let parse = |extra: &[&str]| {
            ServeConfig::parse(extra)
                .map(|c| (c.allow_egress.iter().map(ToString::to_string).collect::<Vec<_>>(), c.allow_host_dns))
        };
        assert_eq!(parse(&[]).unwrap(), (vec![], false));
        assert_eq!(
            parse(&["--allow-egress", "10.1.0.0/16", "--allow-egress", "fd00::/8,192.168.5.0/24", "--allow-host-dns"])
                .unwrap(),
            (vec!["10.1.0.0/16".to_owned(), "fd00::/8".to_owned(), "192.168.5.0/24".to_owned()], true)
        );
        let err = parse(&["--allow-egress", "10.1.2.3/16"]).unwrap_err().to_string();
        assert!(err.contains("write the range's first address (10.1.0.0/16)"), "{err}");
    }

    #[test]
    fn each_app_gets_a_quarter_of_the_upload_places_unless_told() {
        let parse = |extra: &[&str]| ServeConfig::parse(extra).map(|c| (c.uploads_per_app(), c.upload_timeout));
        assert_eq!(parse(&[]).unwrap(), (2, Duration::from_secs(600)));
        assert_eq!(parse(&["--max-concurrent-uploads", "3"]).unwrap().0, 1, "at least one");
        assert_eq!(
            parse(&["--max-concurrent-uploads", "3", "--max-uploads-per-app", "9"]).unwrap().0,
            3,
            "at most all"
        );
        assert_eq!(parse(&["--upload-timeout", "30s"]).unwrap().1, Duration::from_secs(30));
        let err = parse(&["--upload-timeout", "0s"]).unwrap_err().to_string();
        assert!(err.contains("must be more than 0s"), "{err}");
        assert!(parse(&["--max-uploads-per-app", "0"]).is_err());
    }

    #[test]
    fn wildcards_need_a_dns_provider_and_are_the_platforms_own_domains() {
        let base = ["--domain", "apps.test", "--preview-domain", "previews.test"];
        let parse = |extra: &[&str]| ServeConfig::parse(&[&base[..], extra].concat()).unwrap();
        assert!(parse(&[]).wildcard_domains().is_empty(), "no DNS provider, no wildcard");
        let token = ["--cloudflare-api-token", "t"];
        assert_eq!(parse(&token).wildcard_domains(), ["apps.test", "previews.test"]);
        assert_eq!(
            parse(&[&token[..], &["--wildcard-domain", "Previews.Test."]].concat()).wildcard_domains(),
            ["previews.test"]
        );
        assert_eq!(
            parse(&[&token[..], &["--wildcard-domain", "previews.test"]].concat()).check_wildcard_domains(),
            Ok(())
        );
        assert_eq!(
            parse(&["--wildcard-domain", "example.com"]).check_wildcard_domains().unwrap_err(),
            "--wildcard-domain example.com is neither --domain apps.test nor --preview-domain previews.test: \
             wildcard certificates are for the platform's own hosts; custom domains get theirs by HTTP-01"
        );
        assert_eq!(format!("{:?}", parse(&token).cloudflare_api_token), "Some(<redacted>)");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let s: Secret<String> = "postgres://a:hunter2@h/db".parse().unwrap();
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert!(s.expose().contains("hunter2"));
    }
}
