//! The receiver's side of routing: it computes the whole route table from the
//! metadata database, publishes it to nx-router over the control socket, and runs
//! nx-router as a supervised child.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use nx_protocol::api::DeploymentState;
use nx_protocol::metrics::{RouterTraffic, CONTROL_TRAFFIC_PATH};
use nx_protocol::names::{preview_host, production_host, AppName, DeploymentId};
use nx_protocol::routes::{
    Activity, Certificate, Route, RouteTable, Target, WakeRequests, CONTROL_ACTIVITY_PATH, CONTROL_ROUTES_PATH,
    CONTROL_WAKES_PATH,
};
use std::os::unix::ffi::OsStrExt as _;

use nx_runtime::process::{Child, Command, ProcessManager};
use nx_runtime::sys::Pidfd;
use nx_runtime::Log;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Mutex};

use crate::db::{Db, DeploymentRow, DomainRow, WildcardRow};
use crate::secrets::MasterKey;

/// Why a table did not reach the router.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read deployments: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot reach nx-router at {path}: {reason}")]
    Unreachable { path: PathBuf, reason: String },
    #[error("nx-router refused the table: {status} {body}")]
    Refused { status: u16, body: String },
}

/// What a deployment is served as, given its state.
fn target_of(row: &DeploymentRow) -> Target {
    match row.state() {
        DeploymentState::Healthy => Target::Live { addr: ([127, 0, 0, 1], row.port as u16).into() },
        DeploymentState::Pending | DeploymentState::Starting => Target::Starting,
        DeploymentState::Failed => Target::Failed,
        // For a stopped deployment the error column holds why it was stopped.
        DeploymentState::Stopped => Target::Stopped { reason: row.error.clone() },
        DeploymentState::Sleeping => Target::Sleeping,
    }
}

/// The table for `rows`: one preview host per deployment (under
/// `preview_domain`), the production host of each app pointing where its
/// production deployment points, and each verified custom domain of
/// `domains` pointing there too.
pub fn build_table(
    rows: &[DeploymentRow],
    domains: &[DomainRow],
    domain: &str,
    preview_domain: &str,
    generation: u64,
) -> RouteTable {
    let mut table = RouteTable { generation, ..RouteTable::default() };
    for row in rows {
        let (Ok(app), Ok(id)) = (AppName::parse(&row.app_name), DeploymentId::parse(&row.id)) else { continue };
        let route = Route { app: row.app_name.clone(), deployment: row.id.clone(), target: target_of(row) };
        if row.is_production {
            table.routes.insert(production_host(&app, domain), route.clone());
        }
        table.routes.insert(preview_host(&id, &app, preview_domain), route);
    }
    for d in domains.iter().filter(|d| d.verified_at.is_some()) {
        let Ok(app) = AppName::parse(&d.app_name) else { continue };
        if let Some(route) = table.routes.get(&production_host(&app, domain)).cloned() {
            table.routes.insert(d.name.clone(), route);
        }
    }
    table
}

/// Points each live route of a deployment running several replicas at its
/// healthy ones (`healthy`: deployment id, then the ports of its healthy
/// replicas): one healthy replica is routed as [`Target::Live`], several as
/// [`Target::Replicas`]. A deployment with none healthy keeps its route
/// until its watcher records it as no longer healthy. One recorded as
/// starting is routed as soon as a replica is healthy: its watcher sends
/// that table before it commits `healthy`, so the requests a wake holds go
/// on without waiting for the commit.
fn route_replicas(table: &mut RouteTable, healthy: &HashMap<String, Vec<u16>>) {
    for route in table.routes.values_mut() {
        let (Target::Live { .. } | Target::Starting, Some(ports)) = (&route.target, healthy.get(&route.deployment))
        else {
            continue;
        };
        if let Some(target) = replicas_target(ports) {
            route.target = target;
        }
    }
}

/// `last` with the routes of deployment `id` pointed at its healthy
/// replicas on `ports`: `None` when that changes nothing (no port, no such
/// route, or already so). Only a route that is sleeping, starting or live
/// is pointed there: one stopped or failed stays as it is until a table
/// built from the database says otherwise.
fn patch_healthy(last: &RouteTable, id: &str, ports: &[u16]) -> Option<RouteTable> {
    let target = replicas_target(ports)?;
    let mut table = last.clone();
    let mut changed = false;
    for route in table.routes.values_mut().filter(|r| r.deployment == id) {
        let routable =
            matches!(route.target, Target::Sleeping | Target::Starting | Target::Live { .. } | Target::Replicas { .. });
        if routable && route.target != target {
            route.target = target.clone();
            changed = true;
        }
    }
    changed.then_some(table)
}

/// The route to the replicas on `ports`: none without a port, one as
/// [`Target::Live`], several as [`Target::Replicas`].
fn replicas_target(ports: &[u16]) -> Option<Target> {
    let mut addrs: Vec<std::net::SocketAddr> = ports.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect();
    match addrs.len() {
        0 => None,
        1 => Some(Target::Live { addr: addrs.remove(0) }),
        _ => Some(Target::Replicas { addrs }),
    }
}

/// The certificates of `domains` and the wildcards of `wildcards` whose
/// domain is one of `served` (the router serves no other name under a
/// wildcard), unsealed. One that cannot be opened is left out and said in
/// the log; its names are then served with the fallback certificate until it
/// is renewed.
fn certificates(
    domains: &[DomainRow],
    wildcards: &[WildcardRow],
    served: [&str; 2],
    master: &MasterKey,
) -> Vec<Certificate> {
    let custom = domains.iter().map(|d| (d.name.clone(), &d.cert_chain, &d.cert_key));
    let wildcard = wildcards
        .iter()
        .filter(|w| served.contains(&w.domain.as_str()))
        .map(|w| (format!("*.{}", w.domain), &w.cert_chain, &w.cert_key));
    custom
        .chain(wildcard)
        .filter_map(|(host, chain, key)| {
            let (chain, key) = (chain.as_ref()?, key.as_ref()?);
            match (master.open_str(chain), master.open_str(key)) {
                (Ok(chain_pem), Ok(key_pem)) => Some(Certificate { hosts: vec![host], chain_pem, key_pem }),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(domain = %host, error = %e, "certificate cannot be unsealed; left out");
                    None
                }
            }
        })
        .collect()
}

/// What was last sent to the router.
#[derive(Debug, Default)]
struct Published {
    generation: u64,
    /// The last table the router took, certificates included: the router
    /// keeps only the certificates of its latest table, so a table patched
    /// from this one must carry them (they are unsealed in memory only).
    last: Option<RouteTable>,
}

/// Publishes route tables; serialises publishers so tables arrive in order.
#[derive(Debug)]
pub struct RoutePublisher {
    db: Db,
    master: Arc<MasterKey>,
    control: PathBuf,
    domain: String,
    preview_domain: String,
    /// ACME HTTP-01 answers being asked for: host, token, key authorization.
    challenges: std::sync::Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    /// The last generation sent (tables only move forward), and the last
    /// table the router took.
    published: Mutex<Published>,
    /// Set when the last publish failed, so the retry loop tries again.
    dirty: std::sync::atomic::AtomicBool,
    /// Whether the last table sent carried certificates, which a router keeps
    /// in memory only (see [`RoutePublisher::retry_loop`]).
    certified: std::sync::atomic::AtomicBool,
    /// The healthy replicas of each running deployment, as its watcher last
    /// saw them: deployment id, then the replicas' ports.
    healthy: std::sync::Mutex<HashMap<String, Vec<u16>>>,
}

impl RoutePublisher {
    pub fn new(
        db: Db,
        master: Arc<MasterKey>,
        control: PathBuf,
        domain: String,
        preview_domain: String,
    ) -> RoutePublisher {
        RoutePublisher {
            db,
            master,
            control,
            domain,
            preview_domain,
            challenges: Default::default(),
            published: Mutex::new(Published::default()),
            dirty: false.into(),
            certified: false.into(),
            healthy: Default::default(),
        }
    }

    /// Routes deployment `id` to the replicas on `ports` from the next table
    /// on (`None`: to its first port, as a deployment not running here).
    pub fn set_healthy(&self, id: &str, ports: Option<Vec<u16>>) {
        let mut healthy = self.healthy.lock().unwrap_or_else(|p| p.into_inner());
        match ports {
            Some(ports) => healthy.insert(id.to_owned(), ports),
            None => healthy.remove(id),
        };
    }

    /// Answers `token` on `host` with `key_authorization` (`Some`), or no
    /// longer (`None`), from the next table on.
    pub fn set_challenge(&self, host: &str, token: &str, key_authorization: Option<String>) {
        let mut challenges = self.challenges.lock().unwrap_or_else(|p| p.into_inner());
        match key_authorization {
            Some(answer) => {
                challenges.entry(host.to_owned()).or_default().insert(token.to_owned(), answer);
            }
            None => {
                if let Some(tokens) = challenges.get_mut(host) {
                    tokens.remove(token);
                    if tokens.is_empty() {
                        challenges.remove(host);
                    }
                }
            }
        }
    }

    pub fn control_socket(&self) -> &Path {
        &self.control
    }

    /// Computes the table from the database and sends it; returns once the
    /// router has it, so a caller may rely on the new routes afterwards.
    pub async fn publish(&self) -> Result<(), PublishError> {
        let result = self.publish_quietly().await;
        if let Err(e) = &result {
            tracing::warn!(error = %e, "route table not published; retrying in the background");
        }
        result
    }

    /// [`RoutePublisher::publish`] without the warning, for readiness polls.
    pub async fn publish_quietly(&self) -> Result<(), PublishError> {
        let mut published = self.published.lock().await;
        self.publish_locked(&mut published).await
    }

    /// Sends the router's last table with deployment `id` routed to its
    /// healthy replicas (see [`RoutePublisher::set_healthy`] and
    /// [`patch_healthy`]), without reading the database: what the requests
    /// a wake holds wait for. The caller records the state and publishes
    /// the whole table after it, which brings in whatever else changed
    /// meanwhile. Sends nothing when there is no table to start from (none
    /// sent yet, or the last publish failed or was cut short: the whole
    /// table follows anyway) or when it would change nothing.
    pub async fn publish_healthy(&self, id: &str) -> Result<(), PublishError> {
        let mut published = self.published.lock().await;
        if self.dirty.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let ports = self.healthy.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned().unwrap_or_default();
        let Some(table) = published.last.as_ref().and_then(|last| patch_healthy(last, id, &ports)) else {
            return Ok(());
        };
        let result = self.send_next(&mut published, table).await;
        if let Err(e) = &result {
            tracing::warn!(error = %e, "route table not published; retrying in the background");
        }
        result
    }

    async fn publish_locked(&self, published: &mut Published) -> Result<(), PublishError> {
        // Dirty until the router took a table: a failed query, a failed
        // send, or a publish cut short leaves it for the retry loop.
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        // Three queries at once, on three of the pool's connections: a
        // table follows every state change.
        let (rows, domains, wildcards) =
            tokio::try_join!(self.db.routed_deployments(), self.db.verified_domains(), self.db.wildcards())?;
        let mut table = build_table(&rows, &domains, &self.domain, &self.preview_domain, 0);
        route_replicas(&mut table, &self.healthy.lock().unwrap_or_else(|p| p.into_inner()));
        table.challenges = self.challenges.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let served = [self.domain.as_str(), self.preview_domain.as_str()];
        table.certificates = certificates(&domains, &wildcards, served, &self.master);
        self.certified.store(!table.certificates.is_empty(), std::sync::atomic::Ordering::SeqCst);
        self.send_next(published, table).await
    }

    /// Sends `table` as the next generation; on success it is the last
    /// table and nothing is left to send again, on failure there is none
    /// (the next publish reads everything).
    async fn send_next(&self, published: &mut Published, mut table: RouteTable) -> Result<(), PublishError> {
        published.last = None;
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
        // Microseconds since the epoch move forward across receiver restarts.
        let now = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
        published.generation = (published.generation + 1).max(now);
        table.generation = published.generation;
        match self.send(&table).await {
            Err(PublishError::Refused { status: 409, .. }) => {
                // The router holds a newer table (our clock went back): continue
                // from its generation.
                table.generation = self.current_generation().await? + 1;
                published.generation = table.generation;
                self.send(&table).await?;
            }
            other => other?,
        }
        published.last = Some(table);
        self.dirty.store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    async fn request(&self, method: &str, path: &str, body: Bytes) -> Result<(u16, Bytes), PublishError> {
        let unreachable = |reason: String| PublishError::Unreachable { path: self.control.clone(), reason };
        let stream = tokio::net::UnixStream::connect(&self.control).await.map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "nx-router")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .map_err(|_| unreachable("no answer within 10s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| unreachable(e.to_string()))?.to_bytes();
        Ok((status, body))
    }

    async fn send(&self, table: &RouteTable) -> Result<(), PublishError> {
        let json = Bytes::from(
            serde_json::to_vec(table).map_err(|e| PublishError::Refused { status: 0, body: e.to_string() })?,
        );
        let mut tries = 0;
        let (status, body) = loop {
            let (status, body) = self.request("PUT", CONTROL_ROUTES_PATH, json.clone()).await?;
            // A router that has just handed over to its successor (nx-router
            // --upgrade) answers 503; the successor accepts on the same socket.
            if status != 503 || tries == HANDED_OVER_RETRIES {
                break (status, body);
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if (200..300).contains(&status) {
            tracing::debug!(generation = table.generation, hosts = table.routes.len(), "route table published");
            Ok(())
        } else {
            Err(PublishError::Refused { status, body: String::from_utf8_lossy(&body).trim().to_owned() })
        }
    }

    async fn current_generation(&self) -> Result<u64, PublishError> {
        let (status, body) = self.request("GET", CONTROL_ROUTES_PATH, Bytes::new()).await?;
        let table: RouteTable =
            serde_json::from_slice(&body).map_err(|e| PublishError::Refused { status, body: e.to_string() })?;
        Ok(table.generation)
    }

    /// When the router last saw a request for each deployment.
    pub async fn activity(&self) -> Result<Activity, PublishError> {
        let (status, body) = self.request("GET", CONTROL_ACTIVITY_PATH, Bytes::new()).await?;
        serde_json::from_slice(&body).map_err(|e| PublishError::Refused { status, body: e.to_string() })
    }

    /// The traffic the router counted for each deployment in its table.
    pub async fn traffic(&self) -> Result<RouterTraffic, PublishError> {
        let (status, body) = self.request("GET", CONTROL_TRAFFIC_PATH, Bytes::new()).await?;
        serde_json::from_slice(&body).map_err(|e| PublishError::Refused { status, body: e.to_string() })
    }

    /// The sleeping deployments the router holds requests for: answered as
    /// soon as there is one, or empty after a few seconds (a long poll).
    pub async fn wakes(&self) -> Result<Vec<String>, PublishError> {
        let (status, body) = self.request("GET", CONTROL_WAKES_PATH, Bytes::new()).await?;
        let asked: WakeRequests =
            serde_json::from_slice(&body).map_err(|e| PublishError::Refused { status, body: e.to_string() })?;
        Ok(asked.deployments)
    }

    /// Whether the router serves certificates of the receiver's: one that
    /// started from its state file (a restart under systemd, a successor
    /// that took over) has none until it is sent a table.
    async fn router_lost_certificates(&self) -> Result<bool, PublishError> {
        let (status, body) = self.request("GET", nx_protocol::routes::CONTROL_CERTIFICATES_PATH, Bytes::new()).await?;
        let hosts: Vec<String> =
            serde_json::from_slice(&body).map_err(|e| PublishError::Refused { status, body: e.to_string() })?;
        Ok(hosts.is_empty())
    }

    /// Republishes whenever the last attempt failed, and when the router lost
    /// the certificates it was sent, until `shutdown` turns true.
    pub async fn retry_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        use std::sync::atomic::Ordering;
        for tick in 1u64.. {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            let lost = tick % CERTIFICATE_CHECK_SECS == 0
                && self.certified.load(Ordering::SeqCst)
                && self.router_lost_certificates().await.unwrap_or(false);
            if lost {
                tracing::info!("the router has none of the domains' certificates (it restarted or was replaced): sending them again");
            }
            if lost || self.dirty.load(Ordering::SeqCst) {
                let _ = self.publish().await;
            }
        }
    }
}

/// How often the retry loop asks whether the router still has the
/// certificates it was sent: a restarted router serves the fallback
/// certificate for custom domains at most this long.
const CERTIFICATE_CHECK_SECS: u64 = 5;

/// Publishes sent again after a router answered that it handed over (503):
/// a second of tries, far more than a successor needs.
const HANDED_OVER_RETRIES: u32 = 20;

/// The HTTPS side of the router.
#[derive(Debug, Clone)]
pub struct RouterTls {
    pub socket: Arc<std::net::TcpListener>,
    pub addr: std::net::SocketAddr,
    /// The operator's certificate and key (`--router-tls-cert`, `--router-tls-key`),
    /// for names without one of their own.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// `--router-hsts-max-age`, passed on as `--hsts-max-age`.
    pub hsts_max_age: Option<Duration>,
}

/// The FIFO in the router's directory `dir` that the router writes its
/// access log into (`--access-log-fd`), apart from its own log. A FIFO
/// rather than a pipe, because the router outlives the receiver: the next
/// receiver opens it again and reads on where the last one stopped. Both
/// ends open it read-write, so neither ever sees the other gone: while no
/// receiver reads, the pipe fills and the router's access log writer drops
/// whole batches, counted, and no request waits. A router run on its own
/// (under systemd, the receiver with `--no-router`) is given it the same
/// way (`3<>access.fifo`, deploy/systemd/nx-router.service).
pub fn open_access_fifo(dir: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    let path = dir.join("access.fifo");
    nx_runtime::sys::make_fifo(&path, 0o600)?;
    Ok(std::fs::OpenOptions::new().read(true).write(true).open(path)?.into())
}

/// Reads the access lines of the router whose directory is `dir` into
/// `log` and `feed` (the log drains') while the receiver runs: one reader
/// per receiver, whichever router writes (one it started, an adopted one,
/// or one run on its own).
pub fn read_access_log(dir: &Path, log: Log, feed: broadcast::Sender<Arc<str>>) -> std::io::Result<()> {
    let access = open_access_fifo(dir)?;
    tokio::spawn(async move { log.pump_with(access, |line| _ = feed.send(Arc::from(line))).await });
    Ok(())
}

/// Settings of the supervised router. The listening sockets are the
/// receiver's: every router process gets them as inherited descriptors, so
/// they stay open (connections wait in the backlog) while a router restarts,
/// and an old and a new router share them during a reload.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub bin: PathBuf,
    pub listen: std::net::SocketAddr,
    pub socket: Arc<std::net::TcpListener>,
    pub tls: Option<RouterTls>,
    pub dir: PathBuf,
    pub log: Log,
    /// The nx-shim program, which keeps the router's log.
    pub shim: PathBuf,
    /// `--router-arg` flags, after the receiver's own.
    pub extra_args: Vec<String>,
    /// The unprivileged user the router becomes once its sockets are open.
    pub user: String,
    /// Every access log line of the router (its JSON text), for log drains.
    pub access: broadcast::Sender<Arc<str>>,
}

const HTTP_FD: i32 = 3;
const TLS_FD: i32 = 4;
/// The router writes its access log to this pipe (`--access-log-fd`), apart
/// from its own log on stdout/stderr, so each line can be passed to its app's drains.
const ACCESS_FD: i32 = 5;

impl RouterSettings {
    pub fn control_socket(dir: &Path) -> PathBuf {
        dir.join("control.sock")
    }

    /// Where the router keeps its state file: the one directory it may write
    /// once unprivileged. The control socket stays in the root-owned `dir`,
    /// where only root (the receiver, and each router before it drops root)
    /// creates or replaces anything.
    pub fn state_dir(dir: &Path) -> PathBuf {
        dir.join("state")
    }

    fn command(&self) -> std::io::Result<Command> {
        let mut cmd = Command::new(&self.bin).args([
            "--listen".into(),
            self.listen.to_string().into(),
            "--listen-fd".into(),
            HTTP_FD.to_string().into(),
            "--control".into(),
            Self::control_socket(&self.dir).into_os_string(),
            "--state".into(),
            Self::state_dir(&self.dir).join("routes.json").into_os_string(),
            "--user".into(),
            self.user.clone().into(),
        ]);
        cmd.pass_fds.push((std::os::fd::AsFd::as_fd(&*self.socket).try_clone_to_owned()?, HTTP_FD));
        cmd.args.extend(["--access-log-fd".into(), ACCESS_FD.to_string().into()]);
        if let Some(tls) = &self.tls {
            cmd.args.extend([
                "--tls-listen".into(),
                tls.addr.to_string().into(),
                "--tls-listen-fd".into(),
                TLS_FD.to_string().into(),
            ]);
            if let Some((cert, key)) = &tls.cert {
                cmd.args.extend([
                    "--tls-cert".into(),
                    cert.clone().into_os_string(),
                    "--tls-key".into(),
                    key.clone().into_os_string(),
                ]);
            }
            if let Some(age) = tls.hsts_max_age {
                cmd.args.extend(["--hsts-max-age".into(), format!("{}s", age.as_secs()).into()]);
            }
            cmd.pass_fds.push((std::os::fd::AsFd::as_fd(&*tls.socket).try_clone_to_owned()?, TLS_FD));
        }
        cmd.args.extend(self.extra_args.iter().map(Into::into));
        cmd.env = std::env::vars_os().filter(|(k, _)| k == "RUST_LOG" || k == "NX_LOG_FORMAT").collect();
        // It outlives the receiver (a receiver restart or upgrade does not
        // touch routing; the next receiver adopts it): no parent-death
        // signal and its own session. Its output goes to a log keeper of its
        // own (see `Supervisor::spawn`).
        cmd.new_session = true;
        Ok(cmd)
    }
}

/// Why the router's user or state directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RouterUserError {
    #[error("cannot create the system user {user} for nx-router: {reason}")]
    User { user: String, reason: String },
    #[error("cannot prepare the router's state directory {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
}

/// Creates the unprivileged user nx-router runs as (a system user, when
/// missing) and gives it its state directory inside `dir` (root's, 0711).
pub async fn prepare_router_user(pm: &ProcessManager, user: &str, dir: &Path) -> Result<(), RouterUserError> {
    // Receivers starting at once on one host race for /etc/passwd's lock;
    // the loser finds the user there on a later try.
    let mut tries = 0;
    let (uid, gid) = loop {
        match nx_cluster::embedded::ensure_system_user(pm, user).await {
            Ok(ids) => break ids,
            Err(e) if tries < 10 => {
                tries += 1;
                tracing::debug!(error = %e, user, "creating the router's user; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(RouterUserError::User { user: user.into(), reason: e.to_string() }),
        }
    };
    let state = RouterSettings::state_dir(dir);
    let failed = |source| RouterUserError::StateDir { path: state.clone(), source };
    match std::fs::create_dir(&state) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(failed(e)),
    }
    // By path, safely: `dir` is root's, so nobody else can swap `state` for a link.
    nix::unistd::chown(&state, Some(uid.into()), Some(gid.into())).map_err(|e| failed(e.into()))?;
    std::fs::set_permissions(&state, <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700))
        .map_err(failed)?;
    Ok(())
}

enum RouterCommand {
    Reload(oneshot::Sender<Result<(), String>>),
    LetGo,
}

/// nx-router as a child: restarted when it exits, replaced without dropping a
/// connection on reload, stopped with the receiver.
#[derive(Debug)]
pub struct RouterProcess {
    commands: mpsc::Sender<RouterCommand>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for RouterCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RouterCommand::Reload(_) => "Reload",
            RouterCommand::LetGo => "LetGo",
        })
    }
}

struct Supervisor {
    pm: ProcessManager,
    settings: RouterSettings,
    publisher: Arc<RoutePublisher>,
}

impl Supervisor {
    async fn spawn(&self) -> Result<Router, String> {
        let mut command =
            self.settings.command().map_err(|e| format!("cannot pass the listening sockets to nx-router: {e}"))?;
        // A keeper, not the file itself: it caps and rotates the log, which
        // outside clients could otherwise grow without bound, and no pipe of
        // the receiver's breaks when it restarts.
        let out = self.settings.log.keeper(&self.pm, &self.settings.shim).await.map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| format!("cannot share nx-router's log pipe: {e}"))?;
        command.pass_fds.extend([(out, 1), (err, 2)]);
        let access =
            open_access_fifo(&self.settings.dir).map_err(|e| format!("cannot open the router's access log: {e}"))?;
        command.pass_fds.push((access, ACCESS_FD));
        let child = self.pm.spawn(command).await.map_err(|e| format!("cannot start nx-router: {e}"))?;
        Ok(Router::Child(child))
    }

    /// Publishes until the router takes the table (its sign of readiness).
    async fn wait_ready(&self, child: &Router) -> Result<(), String> {
        for _ in 0..400 {
            if child.try_status().is_some() {
                break;
            }
            if self.publisher.publish_quietly().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let tail = self.settings.log.tail(5).join(" / ");
        Err(format!("nx-router did not come up on {}: {tail}", self.settings.listen))
    }

    async fn start(&self) -> Result<Router, String> {
        let child = self.spawn().await?;
        if let Err(e) = self.wait_ready(&child).await {
            let _ = child.signal(Signal::SIGKILL);
            return Err(e);
        }
        tracing::info!(listen = %self.settings.listen, pid = child.pid(), "nx-router running");
        Ok(child)
    }

    /// Takes over a router an earlier receiver started (the settings hold its
    /// sockets): sends it the table, and replaces it (as a reload does) when
    /// it is not what this receiver would start: another binary (an
    /// upgrade), other arguments, or other sockets.
    async fn adopt(&self, process: Pidfd) -> Result<Router, String> {
        let current = Router::Adopted(process);
        let wanted = self.settings.command().map_err(|e| format!("cannot prepare nx-router's command: {e}"))?;
        let mut argv = vec![wanted.program.into_os_string()];
        argv.extend(wanted.args);
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", current.pid())).unwrap_or_default();
        let running: Vec<std::ffi::OsString> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| std::ffi::OsStr::from_bytes(a).to_owned())
            .collect();
        let same_binary = {
            use std::os::unix::fs::MetadataExt;
            let id = |m: std::fs::Metadata| (m.dev(), m.ino());
            let exe = std::fs::metadata(format!("/proc/{}/exe", current.pid())).map(id).ok();
            exe.is_some() && exe == std::fs::metadata(&self.settings.bin).map(id).ok()
        };
        if same_binary && running == argv {
            self.wait_ready(&current).await?;
            tracing::info!(pid = current.pid(), "nx-router adopted: it kept serving since the last receiver");
            return Ok(current);
        }
        tracing::info!(
            pid = current.pid(),
            same_binary,
            "the running nx-router is not the one configured now (another binary or other settings); replacing it"
        );
        match self.upgrade(&current).await {
            Ok(next) => {
                let mut old = current;
                tokio::spawn(async move {
                    let status = old.wait().await;
                    tracing::info!(status, "the replaced nx-router exited");
                });
                Ok(next)
            }
            Err(e) => {
                tracing::error!(error = %e, "the running nx-router keeps serving");
                self.wait_ready(&current).await?;
                Ok(current)
            }
        }
    }

    /// A reload: a new router starts on the same listening sockets and takes
    /// the table; then the old one drains (stops accepting, closes each
    /// connection after its current request, exits when none is left). The
    /// sockets never close, so no connection is refused and no request lost.
    async fn upgrade(&self, current: &Router) -> Result<Router, String> {
        use std::os::unix::fs::MetadataExt;
        let control = RouterSettings::control_socket(&self.settings.dir);
        let before = std::fs::metadata(&control).map(|m| m.ino()).ok();
        let next = self.spawn().await?;
        // Until the new router has bound its control socket, a publish would
        // still reach the old one.
        let mut bound = false;
        for _ in 0..400 {
            if next.try_status().is_some() {
                break;
            }
            if std::fs::metadata(&control).map(|m| m.ino()).ok() != before {
                bound = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if !bound {
            let _ = next.signal(Signal::SIGKILL);
            return Err("the new nx-router did not start; the old one keeps serving".into());
        }
        self.wait_ready(&next).await?;
        let _ = current.signal(Signal::SIGTERM);
        tracing::info!(old = current.pid(), new = next.pid(), "nx-router replaced; the old one drains");
        Ok(next)
    }
}

/// A router process: this receiver's child, or one an earlier receiver
/// started, held by a pidfd (its exit status is init's to collect).
#[derive(Debug)]
enum Router {
    Child(Child),
    Adopted(Pidfd),
}

impl Router {
    fn pid(&self) -> i32 {
        match self {
            Router::Child(c) => c.pid(),
            Router::Adopted(p) => p.pid(),
        }
    }

    fn signal(&self, signal: Signal) -> std::io::Result<()> {
        match self {
            Router::Child(c) => c.signal(signal),
            Router::Adopted(p) => p.signal(signal),
        }
    }

    fn try_status(&self) -> Option<String> {
        match self {
            Router::Child(c) => c.try_status().map(|s| s.to_string()),
            Router::Adopted(p) => p.exited().then(|| "exited".to_owned()),
        }
    }

    /// Waits for the process to exit; says how, when known.
    async fn wait(&mut self) -> String {
        match self {
            Router::Child(c) => c.wait().await.to_string(),
            Router::Adopted(p) => {
                // Not our child: no exit status to wait for, only its pidfd.
                while !p.exited() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                "exited".to_owned()
            }
        }
    }
}

/// A router an earlier receiver started and left serving, found through
/// its control socket, with copies of its listening sockets (a socket on
/// another address than configured now is `None`: the caller binds the
/// new one, and the router is replaced).
#[derive(Debug)]
pub struct RunningRouter {
    pub process: Pidfd,
    pub http: Option<std::net::TcpListener>,
    pub tls: Option<std::net::TcpListener>,
}

/// Why a router answering on the control socket cannot be taken over.
#[derive(Debug, thiserror::Error)]
#[error("an nx-router answers on {path} but this receiver cannot take it over: {reason}; stop it (or stop the receiver and run `nx-receiver stop-all`), or run the receiver with --no-router if it runs on its own")]
pub struct ForeignRouter {
    path: PathBuf,
    reason: String,
}

/// The router serving the control socket in `dir`, if one answers: the
/// process that listens on it (its peer credentials), which must be an
/// nx-router. Its listening sockets are at the numbers every receiver
/// passes them at; copies are taken with `pidfd_getfd` (root may), so this
/// receiver holds them again, as if it had started the router: a router
/// restarted or replaced later gets the same sockets and no connection is
/// refused.
pub async fn find_running(
    dir: &Path,
    listen: std::net::SocketAddr,
    tls: Option<std::net::SocketAddr>,
) -> Result<Option<RunningRouter>, ForeignRouter> {
    let path = RouterSettings::control_socket(dir);
    let Ok(stream) = tokio::net::UnixStream::connect(&path).await else { return Ok(None) };
    let foreign = |reason: String| ForeignRouter { path: path.clone(), reason };
    let pid = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .ok_or_else(|| foreign("the kernel does not say which process listens".into()))?;
    let process = Pidfd::open(pid).map_err(|e| {
        foreign(format!("the process that listens (pid {pid}) is gone ({e}); it handed its sockets to another"))
    })?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "nx-router" {
        return Err(foreign(format!("pid {pid} is {:?}, not nx-router", comm.trim())));
    }
    // Started by hand or under systemd (it bound its own sockets): not the
    // receiver's to supervise or replace.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !cmdline.split(|&b| b == 0).any(|a| a == b"--listen-fd") {
        return Err(foreign(format!("pid {pid} was not started by a receiver (no --listen-fd)")));
    }
    let socket = |fd: i32, addr: std::net::SocketAddr| {
        let copy = process.get_fd(fd).ok()?;
        let listener = std::net::TcpListener::from(copy);
        let accepting = nix::sys::socket::getsockopt(&listener, nix::sys::socket::sockopt::AcceptConn).ok()?;
        (accepting && listener.local_addr().ok()? == addr).then_some(listener)
    };
    let http = socket(HTTP_FD, listen);
    let tls = tls.and_then(|addr| socket(TLS_FD, addr));
    Ok(Some(RunningRouter { process, http, tls }))
}

/// Stops the router serving the control socket in `dir`, if any: SIGTERM
/// (it drains), SIGKILL after `grace`. Returns its pid.
pub async fn stop_running(dir: &Path, grace: Duration) -> Result<Option<i32>, ForeignRouter> {
    let path = RouterSettings::control_socket(dir);
    let Ok(stream) = tokio::net::UnixStream::connect(&path).await else { return Ok(None) };
    let pid = stream.peer_cred().ok().and_then(|c| c.pid());
    let process = pid.and_then(|pid| Pidfd::open(pid).ok()).ok_or_else(|| ForeignRouter {
        path: path.clone(),
        reason: "the process that listens is gone; it handed its sockets to another".into(),
    })?;
    drop(stream);
    let mut router = Router::Adopted(process);
    let _ = router.signal(Signal::SIGTERM);
    if tokio::time::timeout(grace, router.wait()).await.is_err() {
        let _ = router.signal(Signal::SIGKILL);
        router.wait().await;
    }
    Ok(Some(router.pid()))
}

impl RouterProcess {
    /// Starts the router, or takes over the one an earlier receiver left
    /// (`adopted`, see [`find_running`]; `settings` then hold its sockets),
    /// and waits until it has taken the route table.
    pub async fn start(
        pm: ProcessManager,
        settings: RouterSettings,
        publisher: Arc<RoutePublisher>,
        adopted: Option<Pidfd>,
    ) -> anyhow::Result<RouterProcess> {
        anyhow::ensure!(
            settings.bin.is_file(),
            "nx-router not found at {}; build it (`cargo build --release`) or pass --router-bin, or run it yourself with --no-router",
            settings.bin.display()
        );
        read_access_log(&settings.dir, settings.log.clone(), settings.access.clone())?;
        let sup = Supervisor { pm, settings, publisher };
        let first = match adopted {
            Some(process) => sup.adopt(process).await.map_err(|e| anyhow::anyhow!(e))?,
            None => sup.start().await.map_err(|e| anyhow::anyhow!(e))?,
        };
        let (commands, rx) = mpsc::channel(8);
        let task = tokio::spawn(supervise(sup, first, rx));
        Ok(RouterProcess { commands, task: std::sync::Mutex::new(Some(task)) })
    }

    /// Replaces the router process without dropping a request.
    pub async fn reload(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(RouterCommand::Reload(tx)).await.map_err(|_| "the router supervisor is gone".to_owned())?;
        rx.await.map_err(|_| "the router supervisor is gone".to_owned())?
    }

    /// Stops supervising and leaves the router serving, for the next
    /// receiver to adopt.
    pub async fn let_go(&self) {
        let _ = self.commands.send(RouterCommand::LetGo).await;
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

async fn supervise(sup: Supervisor, mut current: Router, mut commands: mpsc::Receiver<RouterCommand>) {
    let mut failures = 0u32;
    loop {
        let event = tokio::select! {
            status = current.wait() => Err(status),
            cmd = commands.recv() => Ok(cmd),
        };
        match event {
            Ok(Some(RouterCommand::Reload(reply))) => {
                let result = sup.upgrade(&current).await;
                let answer = match result {
                    Ok(next) => {
                        let mut old = std::mem::replace(&mut current, next);
                        tokio::spawn(async move {
                            let status = old.wait().await;
                            tracing::info!(status, "the replaced nx-router exited");
                        });
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(answer);
            }
            Ok(Some(RouterCommand::LetGo) | None) => {
                tracing::info!(pid = current.pid(), "nx-router keeps serving for the next receiver");
                return;
            }
            Err(status) => {
                failures += 1;
                let pause = Duration::from_millis(200 * u64::from(failures.min(25)));
                tracing::error!(status, ?pause, "nx-router exited; restarting it");
                tokio::time::sleep(pause).await;
                match sup.start().await {
                    Ok(c) => {
                        failures = 0;
                        current = c;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "nx-router did not come back; trying again");
                        match sup.spawn().await {
                            Ok(c) => current = c,
                            Err(e) => {
                                tracing::error!(error = %e, "cannot run nx-router at all; routing is down");
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::types::Json;

    fn row(id: &str, app: &str, state: &str, port: i32, prod: bool) -> DeploymentRow {
        DeploymentRow {
            id: id.into(),
            app_id: 1,
            app_name: app.into(),
            artifact_sha256: "0".repeat(64),
            size: 1,
            linkage: "static".into(),
            state: state.into(),
            port,
            args: Json(vec![]),
            env: None,
            filename: None,
            git_sha: None,
            git_ref: None,
            pr_number: None,
            source: "cli".into(),
            error: None,
            created_at: chrono::Utc::now(),
            promoted_at: None,
            limits: Json(vec![]),
            db_name: None,
            db_password: None,
            repository: None,
            repository_id: None,
            github: None,
            is_production: prod,
            replica_ports: vec![],
        }
    }

    #[test]
    fn a_deployment_with_replicas_is_routed_to_its_healthy_ones() {
        let rows = [row("aaaaaaaa", "web", "healthy", 20001, true), row("bbbbbbbb", "api", "healthy", 20002, true)];
        let mut t = build_table(&rows, &[], "localhost", "localhost", 1);
        let healthy = [("aaaaaaaa".to_owned(), vec![20001, 20005, 20007]), ("bbbbbbbb".to_owned(), vec![20006])];
        route_replicas(&mut t, &healthy.into());
        let addrs = [20001, 20005, 20007].map(|p| ([127, 0, 0, 1], p).into()).to_vec();
        assert_eq!(t.routes["web.localhost"].target, Target::Replicas { addrs: addrs.clone() });
        assert_eq!(t.routes["aaaaaaaa--web.localhost"].target, Target::Replicas { addrs });
        assert_eq!(
            t.routes["api.localhost"].target,
            Target::Live { addr: ([127, 0, 0, 1], 20006).into() },
            "one healthy replica is a plain live route, on its own port"
        );
    }

    #[test]
    fn a_starting_deployment_is_routed_once_a_replica_is_healthy_and_nothing_else_is() {
        let rows = [
            row("aaaaaaaa", "web", "starting", 20001, false),
            row("bbbbbbbb", "web", "starting", 20002, false),
            row("cccccccc", "web", "sleeping", 20003, false),
            row("dddddddd", "web", "failed", 20004, false),
        ];
        let mut t = build_table(&rows, &[], "localhost", "localhost", 1);
        // A woken one with its replica healthy, one with none healthy yet,
        // and ports left for deployments that are not starting.
        let healthy = [
            ("aaaaaaaa".to_owned(), vec![20001]),
            ("bbbbbbbb".to_owned(), vec![]),
            ("cccccccc".to_owned(), vec![20003]),
            ("dddddddd".to_owned(), vec![20004]),
        ];
        route_replicas(&mut t, &healthy.into());
        assert_eq!(t.routes["aaaaaaaa--web.localhost"].target, Target::Live { addr: ([127, 0, 0, 1], 20001).into() });
        assert_eq!(t.routes["bbbbbbbb--web.localhost"].target, Target::Starting);
        assert_eq!(t.routes["cccccccc--web.localhost"].target, Target::Sleeping, "only a start is routed early");
        assert_eq!(t.routes["dddddddd--web.localhost"].target, Target::Failed);
    }

    #[test]
    fn a_patched_table_routes_only_the_woken_deployment_and_never_a_stopped_one() {
        let rows = [
            row("aaaaaaaa", "web", "sleeping", 20001, true),
            row("bbbbbbbb", "web", "sleeping", 20002, false),
            row("cccccccc", "api", "stopped", 20003, false),
        ];
        let last = build_table(&rows, &[], "localhost", "localhost", 1);
        let live = |port| Target::Live { addr: ([127, 0, 0, 1], port).into() };
        let woken = patch_healthy(&last, "aaaaaaaa", &[20001]).expect("a sleeping route is woken");
        assert_eq!(woken.routes["web.localhost"].target, live(20001), "its production host too");
        assert_eq!(woken.routes["aaaaaaaa--web.localhost"].target, live(20001));
        assert_eq!(woken.routes["bbbbbbbb--web.localhost"].target, Target::Sleeping, "no other deployment moves");
        assert_eq!(woken.certificates, last.certificates);
        let two = patch_healthy(&last, "aaaaaaaa", &[20001, 20009]).unwrap();
        assert!(matches!(two.routes["web.localhost"].target, Target::Replicas { .. }));
        // Nothing to send: no healthy port, no route, the same routes, a
        // route the database says is stopped.
        assert_eq!(patch_healthy(&last, "aaaaaaaa", &[]), None);
        assert_eq!(patch_healthy(&last, "zzzzzzzz", &[20001]), None);
        assert_eq!(patch_healthy(&woken, "aaaaaaaa", &[20001]), None);
        assert_eq!(patch_healthy(&last, "cccccccc", &[20003]), None);
    }

    #[test]
    fn previews_and_production_hosts_are_built() {
        let rows = [
            row("aaaaaaaa", "web", "healthy", 20001, true),
            row("bbbbbbbb", "web", "starting", 20002, false),
            DeploymentRow {
                error: Some("pull request #4 was closed".into()),
                ..row("cccccccc", "web", "stopped", 20003, false)
            },
            row("dddddddd", "api", "failed", 20004, false),
            row("eeeeeeee", "api", "sleeping", 20005, false),
        ];
        let t = build_table(&rows, &[], "localhost", "localhost", 7);
        assert_eq!(t.generation, 7);
        assert_eq!(t.routes["web.localhost"].target, Target::Live { addr: ([127, 0, 0, 1], 20001).into() });
        assert_eq!(t.routes["aaaaaaaa--web.localhost"].target, Target::Live { addr: ([127, 0, 0, 1], 20001).into() });
        assert_eq!(t.routes["bbbbbbbb--web.localhost"].target, Target::Starting);
        assert_eq!(
            t.routes["cccccccc--web.localhost"].target,
            Target::Stopped { reason: Some("pull request #4 was closed".into()) }
        );
        assert_eq!(t.routes["dddddddd--api.localhost"].target, Target::Failed);
        assert_eq!(t.routes["eeeeeeee--api.localhost"].target, Target::Sleeping, "a sleeping URL stays routed");
        assert!(!t.routes.contains_key("api.localhost"), "no production without a promotion");
        assert_eq!(t.routes.len(), 6);
    }

    fn domain(name: &str, app: &str, verified: bool) -> DomainRow {
        DomainRow {
            id: 1,
            name: name.into(),
            app_id: 1,
            app_name: app.into(),
            token: "t".into(),
            verified_at: verified.then(chrono::Utc::now),
            cert_chain: None,
            cert_key: None,
            issuer: None,
            expires_at: None,
            last_error: None,
            failures: 0,
            next_attempt_at: None,
        }
    }

    #[test]
    fn previews_live_on_their_own_domain_and_verified_custom_domains_follow_production() {
        let rows = [row("aaaaaaaa", "web", "healthy", 20001, true), row("bbbbbbbb", "api", "healthy", 20002, false)];
        let domains = [
            domain("www.example.test", "web", true),
            domain("unverified.example.test", "web", false),
            domain("api.example.test", "api", true),
        ];
        let t = build_table(&rows, &domains, "apps.test", "previews.test", 1);
        assert_eq!(t.routes["web.apps.test"].target, Target::Live { addr: ([127, 0, 0, 1], 20001).into() });
        assert_eq!(t.routes["www.example.test"], t.routes["web.apps.test"]);
        assert!(t.routes.contains_key("aaaaaaaa--web.previews.test"));
        assert!(!t.routes.contains_key("aaaaaaaa--web.apps.test"), "no preview under the production domain");
        assert!(!t.routes.contains_key("unverified.example.test"), "served only once verified");
        assert!(!t.routes.contains_key("api.example.test"), "an app without production serves nothing there");
    }
}
