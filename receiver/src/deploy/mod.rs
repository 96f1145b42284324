//! Deployments: record them, run them in sandboxes, follow their health into the
//! database and the route table, promote them, and take them back after a
//! restart: each sandbox runs under its own shim and outlives this process, so
//! a start adopts what still runs and starts only what does not.
//!
//! Each running sandbox has a watcher task that is the only writer of its
//! deployment's state: it applies every status change to the database, then to
//! the router, and only then tells waiters, so a caller that saw "healthy" can
//! rely on the URL answering.
//!
//! What happens next elsewhere (GitHub reports) is queued on [`events`];
//! whether a push may name its repository is [`link`]'s to say.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nx_protocol::api::{DeploymentInfo, DeploymentState, PreviewDb, PushMeta, ReplicaState, Source, VerifiedGitHub};
use nx_protocol::names::{preview_host, production_host, url_for_host, AppName, DeploymentId};
use nx_runtime::spec::HostLayout;
use nx_runtime::supervisor::{SandboxConfig, Status};
use nx_runtime::{Log, LogLimits, ProcessManager, Sandbox};
use rand::RngCore;
use tokio::sync::watch;

use crate::config::ServeConfig;
use crate::databases::{DatabaseError, Databases};
use crate::db::{AppRow, ArtifactRow, Db, DeploymentEvent, DeploymentRow, NewDeployment, PromoteOutcome};
use crate::routing::RoutePublisher;
use crate::secrets::MasterKey;
use crate::volumes::{VolumeError, Volumes};
use nx_cluster::AppEndpoint;
use nx_store::{ArtifactStore, StoreError};

mod ahead;
pub mod events;
mod lifecycle;
pub mod link;
mod places;
pub use ahead::Ahead;
mod quotas;
mod sandbox;
mod sleep;

use quotas::Claim;
pub use quotas::{MAX_ENV_BYTES, MAX_ENV_NAMES};
pub use sandbox::{expand_arg, validate_env, RESERVED_ENV};

/// Failures of deployment operations; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no free port in {first}-{last} for a new deployment; stop unused deployments or widen --port-range")]
    NoPort { first: u16, last: u16 },
    #[error("cannot prepare {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("a sealed secret of app {app} cannot be opened: {source}")]
    Secret { app: String, source: crate::secrets::SecretError },
    #[error("deployment {id} does not exist in app {app}; `nx ls {app}` lists its deployments")]
    UnknownDeployment { app: String, id: String },
    /// A deployment whose record went while an operation on it was under
    /// way: its app was removed, or it was old and tidied away.
    #[error("deployment {id} no longer exists: its app was removed, or it was old and removed as unused; `nx ls` lists what there is")]
    Gone { id: String },
    #[error(
        "deployment {id} is {state}, only healthy deployments can be promoted; push again or check `nx logs {id}`"
    )]
    NotHealthy { id: String, state: String },
    #[error("deployment {id} is {state} now, so it is not started again; `nx ls` says why, and a new push runs the binary again")]
    NotRunning { id: String, state: String },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error(
        "app {app} is being removed, so nothing is deployed to it any more; if its removal stopped half way, `nx apps rm {app}` again finishes it"
    )]
    AppRemoving { app: String },
    #[error("deployment {id} is the production of {app}; promote another deployment before stopping it")]
    IsProduction { app: String, id: String },
    #[error(
        "deployment {id} is a preview of pull request #{pr} from a fork, pushed by a pull_request_target run: it \
         never becomes production; once the pull request is merged, a push of the production branch deploys it"
    )]
    ForkPreview { id: String, pr: i64 },
    #[error(transparent)]
    Cgroup(#[from] nx_runtime::cgroup::CgroupError),
    #[error(transparent)]
    Root(#[from] nx_runtime::root::RootError),
    /// The caller asked for something that cannot be done; the message says
    /// what and how to fix it (a 400).
    #[error("{0}")]
    Invalid(String),
    /// A fault of the platform's own (damaged stored state, a task that
    /// died): logged with its cause, answered as a 500 without it.
    #[error("{0}")]
    Internal(String),
    #[error("this binary will not run on the server: {0}")]
    WillNotRun(String),
    #[error(transparent)]
    Artifact(#[from] crate::artifacts::ArtifactError),
    #[error(
        "app {app} already runs {count} deployments, the most one app may run on this server (--max-running-per-app {cap}): {running}; stop one it no longer needs with `nx stop ID --app {app}`, or ask the operator to raise --max-running-per-app"
    )]
    TooManyRunning { app: String, cap: u32, count: usize, running: String },
    #[error(
        "app {app} already has {count} previews with a database of their own, the most one app may have on this server (--max-preview-databases-per-app {cap}): {holding}; stop previews it no longer needs with `nx stop ID --app {app}` or `nx stop --pr N --app {app}` (their databases are dropped), or ask the operator to raise --max-preview-databases-per-app"
    )]
    TooManyPreviewDatabases { app: String, cap: u32, count: usize, holding: String },
    #[error(
        "{what} would be {names} variables of {bytes} bytes (names and values), over the limit of {} variables and {} bytes per app; {fix}",
        MAX_ENV_NAMES,
        MAX_ENV_BYTES
    )]
    TooManyVariables { what: String, names: usize, bytes: usize, fix: String },
}

/// Whether `row` is in a state its sandboxes run in (or are about to).
fn meant_to_run(row: &DeploymentRow) -> bool {
    matches!(row.state(), DeploymentState::Pending | DeploymentState::Starting | DeploymentState::Healthy)
}

/// Whether a push gets a database of its own, and which: a pull request's
/// preview when the app asks for one (`empty` or a `copy` of production's);
/// a fork's preview always, and always empty, since a fork's code must reach
/// neither production's database nor a copy of its data.
fn own_database(app: &AppRow, meta: &PushMeta, proved: Option<&VerifiedGitHub>) -> Option<PreviewDb> {
    let fork = proved.is_some_and(VerifiedGitHub::is_pull_request_target);
    match (meta.pr, app.settings.preview_db) {
        (None, _) => None,
        (Some(_), _) if fork => Some(PreviewDb::Empty),
        (Some(_), PreviewDb::Shared) => None,
        (Some(_), mode) => Some(mode),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DeployError + '_ {
    move |source| DeployError::Io { path: path.to_owned(), source }
}

/// One replica of a running deployment: a sandbox on a port of its own.
#[derive(Debug)]
struct Replica {
    index: u32,
    port: u16,
    sandbox: Sandbox,
}

/// A running deployment: its replicas, and what its watcher last applied.
#[derive(Debug)]
struct Running {
    replicas: Vec<Replica>,
    applied: watch::Receiver<Status>,
    /// When each replica (in the order of `replicas`) last became healthy,
    /// while it runs healthy or unhealthy; kept by the watcher.
    healthy_since: Arc<Mutex<Vec<Option<std::time::Instant>>>>,
    /// The ports of the replicas the router was last given, once the table
    /// was sent; kept by the watcher.
    routed: Arc<Mutex<Vec<u16>>>,
    log: Log,
    /// When this receiver started (or adopted) it: idle time counts from here.
    since: std::time::Instant,
    /// The watcher: replaced with the replicas, so one deployment's state
    /// always has exactly one writer.
    watcher: tokio::task::AbortHandle,
}

impl Running {
    /// Ends its watcher and stops every replica.
    async fn stop(self) {
        self.watcher.abort();
        futures_util::future::join_all(self.replicas.into_iter().map(|r| r.sandbox.stop())).await;
    }
}

/// The name of replica `index` of deployment `id`, for its cgroup and shim
/// directory: the first replica's is the deployment's id (as before
/// replicas existed, so sandboxes started then are adopted), the others'
/// `<id>-<index>`. One name, one sandbox: never two of one replica.
pub fn replica_key(id: &str, index: u32) -> String {
    if index == 0 {
        id.to_owned()
    } else {
        format!("{id}-{index}")
    }
}

/// How many replicas `row` runs: production as many as its app asks, the
/// rollback target one (it only waits for a rollback, which brings it to
/// production's count before the switch), each preview as many as the app
/// asks of previews.
fn replica_count(app: &AppRow, row: &DeploymentRow) -> u32 {
    if row.is_production {
        app.settings.replicas()
    } else if app.previous_production_id.as_deref() == Some(row.id.as_str()) {
        1
    } else {
        app.settings.preview_replicas()
    }
}

/// How long [`Deployer::run`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Not at all.
    No,
    /// Until the deployment as a whole is decided: one replica healthy, or all failed.
    Any,
    /// Until every replica is decided (a promotion wants them all healthy).
    All,
}

/// What the deployment service works with.
#[derive(Debug)]
pub struct Services {
    pub db: Db,
    pub store: ArtifactStore,
    pub pm: ProcessManager,
    pub master: Arc<MasterKey>,
    /// Where apps reach their databases.
    pub endpoint: AppEndpoint,
    pub config: Arc<ServeConfig>,
    pub host: Arc<HostLayout>,
    pub routes: Arc<RoutePublisher>,
    /// The compiled seccomp program every sandbox gets.
    pub seccomp: Arc<[u8]>,
    /// App database operations (preview databases).
    pub databases: Databases,
    /// The host's cgroup layout.
    pub cgroups: nx_runtime::cgroup::Driver,
    /// How network isolation is enforced, for every deployment's report.
    pub network: nx_protocol::api::Enforcement,
    /// The resolv.conf every sandbox gets (`network::Policy::resolv_conf`).
    pub resolv_conf: String,
    /// What Landlock enforces here (ports, abstract sockets), detected once.
    pub landlock: nx_runtime::landlock::Support,
    pub volumes: Volumes,
    /// Tells GitHub about deployments pushed from it.
    pub reporter: events::Reporter,
    /// What binaries this server runs.
    pub target: Arc<nx_protocol::target::ServerTarget>,
    /// The nx-shim executable every sandbox runs under.
    pub shim: PathBuf,
    /// Sandboxes parked ahead of starts (`--sandbox-pool`).
    pub pool: nx_runtime::pool::Pool,
}

/// The deployment service.
#[derive(Debug)]
pub struct Deployer {
    services: Services,
    running: Mutex<HashMap<String, Running>>,
    port_lock: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
    /// Per deployment, held across every pass that starts, scales, stops,
    /// puts to sleep or wakes it: one pass at a time, so a replica never
    /// gets two supervisors and a stop is never undone by a wake.
    transitions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per deployment, its consecutive failed wakes ([`sleep`]).
    wake_failures: Mutex<HashMap<String, sleep::FailedWakes>>,
    /// Per sleeping deployment, its sandbox made ready for its wake
    /// (`--wake-ready`, [`places`]); taken by its next start, discarded by
    /// a stop.
    ready: Mutex<places::Places>,
    /// Sandboxes made ahead of pushes under way ([`ahead`]).
    making: ahead::Making,
    /// `--push-ready` places, each held by a sandbox made ahead until it is
    /// started or discarded.
    ahead_places: Arc<tokio::sync::Semaphore>,
    /// Ports promised to pushes under way, not given to another deployment.
    promised: Mutex<std::collections::HashSet<u16>>,
}

/// Who pushes, and what was made for the push at its admission.
#[derive(Debug, Clone, Copy)]
pub struct PushedBy<'a> {
    /// What a GitHub OIDC token proved about the push.
    pub proved: Option<&'a VerifiedGitHub>,
    /// The admin's push, whose repository may link the app
    /// ([`link::check_push`]).
    pub may_link: bool,
    /// Who, as the audit log names them.
    pub actor: &'a str,
    /// The id and port promised at its admission, with the sandbox made
    /// meanwhile ([`ahead`]).
    pub ahead: Option<&'a Ahead>,
}

/// Proof that the caller holds a deployment's transition lock
/// ([`Deployer::hold`]).
pub(super) type Held = tokio::sync::OwnedMutexGuard<()>;

impl Deployer {
    pub fn new(services: Services) -> Deployer {
        let push_ready = services.config.push_ready;
        Deployer {
            services,
            running: Mutex::new(HashMap::new()),
            port_lock: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            transitions: Mutex::new(HashMap::new()),
            wake_failures: Mutex::new(HashMap::new()),
            ready: Mutex::new(HashMap::new()),
            making: Mutex::default(),
            ahead_places: Arc::new(tokio::sync::Semaphore::new(push_ready)),
            promised: Mutex::default(),
        }
    }

    fn url(&self, host: &str) -> String {
        url_for_host(&self.services.config.public_scheme, host, self.services.config.url_port())
    }

    /// Where an app's production is served.
    pub fn production_url(&self, app: &str) -> String {
        match AppName::parse(app) {
            Ok(a) => self.url(&production_host(&a, &self.services.config.domain)),
            Err(_) => String::new(),
        }
    }

    /// The API view of a deployment row.
    pub fn info(&self, row: &DeploymentRow, log_tail: Vec<String>) -> Result<DeploymentInfo, DeployError> {
        let damaged =
            |e: nx_protocol::NameError| DeployError::Internal(format!("stored deployment {} is damaged: {e}", row.id));
        let id = DeploymentId::parse(&row.id).map_err(damaged)?;
        let app = AppName::parse(&row.app_name).map_err(damaged)?;
        Ok(DeploymentInfo {
            preview_url: self.url(&preview_host(&id, &app, self.services.config.preview_domain())),
            id,
            app,
            state: row.state(),
            digest: row.artifact_sha256.clone(),
            size: row.size as u64,
            production: row.is_production,
            port: row.port as u16,
            git_sha: row.git_sha.clone(),
            git_ref: row.git_ref.clone(),
            pr: row.pr_number.map(|p| p as u64),
            source: match row.source.as_str() {
                "action" => Source::Action,
                "sftp" => Source::Sftp,
                _ => Source::Cli,
            },
            created_at: row.created_at,
            promoted_at: row.promoted_at,
            error: row.error.clone(),
            log_tail,
            limits: row.limits.0.clone(),
            database: row.db_name.clone(),
            github: row.github.as_ref().map(|g| g.0.clone()),
            replicas: self.replicas_of(&row.id),
        })
    }

    /// How each replica of a running deployment is doing.
    pub fn replicas_of(&self, id: &str) -> Vec<nx_protocol::api::ReplicaInfo> {
        let Ok(running) = self.running.lock() else { return Vec::new() };
        let Some(r) = running.get(id) else { return Vec::new() };
        let since = r.healthy_since.lock().map(|s| s.clone()).unwrap_or_default();
        let routed = r.routed.lock().map(|s| s.clone()).unwrap_or_default();
        r.replicas
            .iter()
            .enumerate()
            .map(|(i, replica)| {
                let status = replica.sandbox.status();
                let (state, restarts, error) = match status {
                    Status::Starting { restarts } => (ReplicaState::Starting, restarts, None),
                    Status::Healthy { restarts } => (ReplicaState::Healthy, restarts, None),
                    Status::Unhealthy { restarts, reason } => (ReplicaState::Unhealthy, restarts, Some(reason)),
                    Status::Failed { reason, .. } => (ReplicaState::Failed, 0, Some(reason)),
                    Status::Stopped => (ReplicaState::Stopped, 0, None),
                };
                let exit = replica.sandbox.last_exit();
                nx_protocol::api::ReplicaInfo {
                    index: replica.index,
                    port: replica.port,
                    state,
                    routed: routed.contains(&replica.port),
                    error,
                    restarts,
                    oom_killed: exit.as_ref().is_some_and(|e| e.oom_killed),
                    last_exit: exit.map(|e| e.how),
                    uptime_secs: since.get(i).copied().flatten().map(|t| t.elapsed().as_secs()),
                }
            })
            .collect()
    }

    /// Picks a free port: not held by a live deployment nor in `taken`, and bindable now.
    async fn allocate_port(&self, taken: &[i32]) -> Result<u16, DeployError> {
        let mut used: std::collections::HashSet<i32> = self.services.db.used_ports().await?.into_iter().collect();
        used.extend(taken);
        used.extend(self.promised.lock().map_err(|_| poisoned())?.iter().map(|p| i32::from(*p)));
        let range = self.services.config.port_range.clone();
        let span = u32::from(*range.end() - *range.start()) + 1;
        let offset = rand::thread_rng().next_u32() % span;
        for i in 0..span {
            let port = *range.start() + ((offset + i) % span) as u16;
            if used.contains(&i32::from(port)) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
        Err(DeployError::NoPort { first: *range.start(), last: *range.end() })
    }

    /// What `nx push` and an SFTP upload do with the bytes: verify them
    /// against this server, store them once per digest, and deploy them.
    pub async fn push(
        &self,
        app: &AppRow,
        upload: nx_store::Upload,
        meta: &PushMeta,
        by: &PushedBy<'_>,
    ) -> Result<DeploymentInfo, DeployError> {
        let actor = by.actor;
        let _timing = crate::counters::platform().push_timer();
        // Mapped, not read: a binary of up to --max-upload bytes per upload
        // in progress is not copied into the receiver's memory. The upload's
        // file is the receiver's own, so it cannot shrink under the map.
        let path = upload.path().to_owned();
        let target = self.services.target.clone();
        let (report, verdict) = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path).map_err(io_err(&path))?;
            let bytes = nx_runtime::sys::MappedFile::map(&file).map_err(io_err(&path))?;
            let report = nx_verify::inspect(&bytes);
            let verdict = nx_verify::judge(&report, &target);
            Ok::<_, DeployError>((report, verdict))
        })
        .await
        .map_err(|e| DeployError::Internal(format!("the inspection of the binary failed: {e}")))??;
        if !verdict.runs {
            let reason = verdict.message();
            let _ = self
                .services
                .db
                .event(
                    Some(&app.name),
                    None,
                    "push.refused",
                    actor,
                    serde_json::json!({ "reason": reason, "source": meta.source.as_str() }),
                )
                .await;
            return Err(DeployError::WillNotRun(reason));
        }
        let artifact = crate::artifacts::register(&self.services.db, &self.services.store, upload, &report).await?;
        self.deploy(app, &artifact, meta, by).await
    }

    /// Records a deployment of `artifact` to `app`, starts it, and returns once
    /// it is healthy or has failed.
    async fn deploy(
        &self,
        app: &AppRow,
        artifact: &ArtifactRow,
        meta: &PushMeta,
        by: &PushedBy<'_>,
    ) -> Result<DeploymentInfo, DeployError> {
        let PushedBy { proved, may_link: caller_may_link, actor, ahead } = *by;
        validate_env(&meta.env)?;
        quotas::check_push_env(&meta.env)?;
        link::check_push(&self.services.db, app, meta, proved, caller_may_link, actor).await?;
        if let Some(push_id) = &meta.push_id {
            if !nx_protocol::auth::is_valid_nonce(push_id) {
                return Err(DeployError::Invalid("push_id must be 16 to 64 characters of A-Z a-z 0-9 - _".into()));
            }
            if let Some(earlier) = self.services.db.deployment_by_push_id(app.id, push_id).await? {
                return self.earlier_attempt(earlier, artifact, meta).await;
            }
        }
        let env = sealed_push_env(&self.services.master, meta)?;
        let id = ahead.map_or_else(new_id, |a| a.id.clone());
        // Its name is reserved with the row, so it counts against the app's
        // cap before it exists.
        let own_db = own_database(app, meta, proved);
        let preview_db = own_db.map(|_| crate::databases::preview_database_name(&app.db_name, &id));
        let recorded = self
            .record(
                NewDeployment {
                    id: &id,
                    app_id: app.id,
                    artifact_sha256: &artifact.sha256,
                    port: ahead.map_or(0, |a| i32::from(a.port)),
                    // A push without arguments (an SFTP upload, say) gets the app's.
                    args: if meta.args.is_empty() { &app.settings.args } else { &meta.args },
                    env,
                    filename: meta.filename.as_deref(),
                    git_sha: meta.git_sha.as_deref(),
                    git_ref: meta.git_ref.as_deref(),
                    pr_number: meta.pr.map(|p| p as i64),
                    source: meta.source.as_str(),
                    push_id: meta.push_id.as_deref(),
                    repository: meta.repository.as_deref(),
                    repository_id: meta.repository_id.map(|i| i as i64),
                    github: proved,
                    db_name: preview_db.as_deref(),
                },
                app,
                Claim::Push { database: preview_db.is_some() },
                DeploymentEvent {
                    app: &app.name,
                    kind: "push",
                    actor,
                    detail: serde_json::json!({ "digest": artifact.sha256, "size": artifact.size, "pr": meta.pr, "git_sha": meta.git_sha }),
                },
            )
            .await;
        if let Err(e) = recorded {
            // Two attempts of one push raced; the other one recorded it.
            if let Some(earlier) = match (&e, &meta.push_id) {
                (DeployError::Db(_), Some(p)) => self.services.db.deployment_by_push_id(app.id, p).await?,
                _ => None,
            } {
                return self.earlier_attempt(earlier, artifact, meta).await;
            }
            return Err(e);
        }
        if let Some(ahead) = ahead {
            ahead.recorded();
        }
        // Held from here: an app removal that began meanwhile holds it
        // until the row is gone, so the row read under it says whether
        // anything may still be made for it (a database, a sandbox).
        let held = self.hold(&id).await;
        let removed = || DeployError::AppRemoving { app: app.name.clone() };
        let row = self.services.db.deployment(&id).await?.ok_or_else(removed)?;
        // A stop that came first (a pull request closing) dropped the
        // name: no database is made for a deployment that will not start.
        let still_wanted = meant_to_run(&row) && row.db_name == preview_db;
        if let (Some(name), Some(mode), true) = (&preview_db, own_db, still_wanted) {
            // Nor for an app whose removal began: the copy would only be
            // dropped again (a start refuses such an app anyway).
            if self.services.db.app_removing(app.id).await? {
                return Err(removed());
            }
            if let Err(e) = self.attach_preview_db(app, &id, name, mode).await {
                // Whatever stands under that name now is not this preview's.
                self.services.db.set_preview_db(&id, None).await?;
                let reason = format!("cannot make the preview's own database: {e}");
                self.services.db.set_state(&id, DeploymentState::Failed, Some(&reason)).await?;
                let _ = self.services.routes.publish().await;
                return self.info(&self.row(&id).await?, Vec::new());
            }
        }
        let row = if preview_db.is_some() { self.row(&id).await? } else { row };
        let status = self.start_held(&held, &row, !meta.no_wait).await?;
        drop(held);
        // A removal that began meanwhile stops what was just started: the
        // push says so rather than hand out a URL about to go.
        if self.services.db.app_removing(app.id).await? {
            return Err(removed());
        }
        let row = self.row(&id).await?;
        let tail = match status {
            Status::Failed { log_tail, .. } => log_tail,
            _ => Vec::new(),
        };
        self.info(&row, tail)
    }

    /// Records a new deployment on a free port, and `event` about it, if its
    /// app has room for `claim`. Ports are chosen and recorded under one lock
    /// so two deployments never take the same one.
    async fn record(
        &self,
        mut new: NewDeployment<'_>,
        app: &AppRow,
        claim: Claim,
        event: DeploymentEvent<'_>,
    ) -> Result<(), DeployError> {
        let _guard = self.port_lock.lock().await;
        // A push's port was promised at its admission ([`ahead`]).
        if new.port == 0 {
            new.port = i32::from(self.allocate_port(&[]).await?);
        }
        let caps = self.caps();
        self.services.db.insert_deployment(&new, |held| quotas::admit(&app.name, caps, held, claim), event).await
    }

    fn caps(&self) -> quotas::Caps {
        let config = &self.services.config;
        quotas::Caps { running: config.max_running_per_app, databases: config.max_preview_databases_per_app }
    }

    /// Refuses early, before its binary is received, a push its app has no
    /// room for; [`Deployer::deploy`] checks again when it records it.
    pub async fn check_room(
        &self,
        app: &AppRow,
        meta: &PushMeta,
        proved: Option<&VerifiedGitHub>,
    ) -> Result<(), DeployError> {
        quotas::check_push_env(&meta.env)?;
        // A retry of a push already recorded takes no new place: it gets
        // the deployment its first attempt made.
        if let Some(push_id) = &meta.push_id {
            if self.services.db.deployment_by_push_id(app.id, push_id).await?.is_some() {
                return Ok(());
            }
        }
        let database = own_database(app, meta, proved).is_some();
        let held = self.services.db.occupancy(app.id).await?;
        quotas::admit(&app.name, self.caps(), &held, Claim::Push { database })
    }

    /// Makes the database `name` reserved for preview `id` (`empty` or a
    /// `copy` of production's).
    async fn attach_preview_db(&self, app: &AppRow, id: &str, name: &str, mode: PreviewDb) -> Result<(), DeployError> {
        let p = self.services.databases.create_preview(app, name, mode == PreviewDb::Copy).await?;
        let sealed = self.services.master.seal_str(&p.password);
        self.services.db.set_preview_db(id, Some((&p.name, &sealed))).await?;
        tracing::info!(deployment = id, database = %p.name, ?mode, "preview database made");
        Ok(())
    }

    /// Answers a retried push with what its first attempt made, once that is
    /// decided.
    async fn earlier_attempt(
        &self,
        earlier: DeploymentRow,
        artifact: &ArtifactRow,
        meta: &PushMeta,
    ) -> Result<DeploymentInfo, DeployError> {
        if earlier.artifact_sha256 != artifact.sha256 {
            return Err(DeployError::Invalid(format!(
                "push id {} was used for other bytes (deployment {}); a retry must send the same binary",
                meta.push_id.as_deref().unwrap_or_default(),
                earlier.id
            )));
        }
        let waiter = self.running.lock().map_err(|_| poisoned())?.get(&earlier.id).map(|r| r.applied.clone());
        if let (Some(mut w), false) = (waiter, meta.no_wait) {
            let _ = w.wait_for(|s| !matches!(s, Status::Starting { .. })).await;
        }
        tracing::info!(deployment = %earlier.id, "a retried push got its earlier deployment");
        let row = self.row(&earlier.id).await?;
        self.info(&row, Vec::new())
    }

    async fn row(&self, id: &str) -> Result<DeploymentRow, DeployError> {
        self.services.db.deployment(id).await?.ok_or_else(|| DeployError::Gone { id: id.into() })
    }

    /// Starts the sandboxes of `row` (as many replicas as its app asks of
    /// its role, [`replica_count`]), stopping any it runs already;
    /// with `wait`, returns once its first start is decided and applied
    /// (one replica healthy, or all failed), else at once.
    pub async fn start(&self, row: &DeploymentRow, wait: bool) -> Result<Status, DeployError> {
        let held = self.hold(&row.id).await;
        // Read again under the hold: [`Deployer::run`] trusts its state and ports.
        let row = self.row(&row.id).await?;
        self.start_held(&held, &row, wait).await
    }

    /// [`Deployer::start`] for a caller that holds the deployment's lock and
    /// read `row` under it. Only a deployment meant to run is started: one
    /// stopped, failed or put to sleep since its caller decided to start it
    /// (an `nx stop` or a pull request closing in between) stays as it is.
    /// Started again, a stopped preview, whose own database is dropped,
    /// would run on the app's production database.
    async fn start_held(&self, held: &Held, row: &DeploymentRow, wait: bool) -> Result<Status, DeployError> {
        let app = self.app_of(row).await?;
        self.start_held_of(held, &app, row, wait).await
    }

    /// [`Deployer::start_held`] with the app of `row` read by the caller.
    async fn start_held_of(
        &self,
        held: &Held,
        app: &AppRow,
        row: &DeploymentRow,
        wait: bool,
    ) -> Result<Status, DeployError> {
        if !meant_to_run(row) {
            return Err(DeployError::NotRunning { id: row.id.clone(), state: row.state().as_str().to_owned() });
        }
        if app.removing_since.is_some() {
            return Err(DeployError::AppRemoving { app: app.name.clone() });
        }
        self.run(held, app, row, replica_count(app, row), false, if wait { Wait::Any } else { Wait::No }).await
    }

    async fn app_of(&self, row: &DeploymentRow) -> Result<AppRow, DeployError> {
        self.services
            .db
            .app_by_id(row.app_id)
            .await?
            .ok_or_else(|| DeployError::UnknownDeployment { app: row.app_name.clone(), id: row.id.clone() })
    }

    /// Runs each running deployment of app `name` (production, previews)
    /// as as many replicas as its settings ask of its role: the replicas it
    /// has stay, the missing ones start, the ones beyond stop. One
    /// deployment's lock at a time; one not running (stopped, sleeping)
    /// gets its count when it next starts.
    pub async fn scale(&self, name: &str) -> Result<(), DeployError> {
        let Some(app) = self.services.db.app(name).await? else { return Ok(()) };
        let ids: Vec<String> = self
            .services
            .db
            .live_deployments()
            .await?
            .into_iter()
            .filter(|r| r.app_id == app.id)
            .map(|r| r.id)
            .collect();
        for id in ids {
            let held = self.hold(&id).await;
            if !self.running.lock().map_err(|_| poisoned())?.contains_key(&id) {
                continue;
            }
            // Read again under the lock: a promotion may have changed its
            // role, and one that failed meanwhile is not scaled back up.
            let row = self.row(&id).await?;
            if !meant_to_run(&row) {
                continue;
            }
            let app = self.app_of(&row).await?;
            let count = replica_count(&app, &row);
            if self.running_replicas(&id) != count {
                self.run(&held, &app, &row, count, true, Wait::No).await?;
            }
        }
        Ok(())
    }

    /// The ports of `count` replicas of `id`: its own port first, then
    /// those recorded for its other replicas, with new ones for the
    /// missing; recorded before any replica uses them. Ports of replicas
    /// beyond `count` stay recorded until [`Deployer::free_replica_ports`].
    async fn replica_ports(&self, id: &str, count: u32) -> Result<Vec<u16>, DeployError> {
        let _guard = self.port_lock.lock().await;
        let row = self.row(id).await?;
        let wanted = count.saturating_sub(1) as usize;
        let mut extra: Vec<i32> = row.replica_ports.iter().copied().take(wanted).collect();
        while extra.len() < wanted {
            let mut taken = extra.clone();
            taken.push(row.port);
            extra.push(i32::from(self.allocate_port(&taken).await?));
        }
        if extra.len() > row.replica_ports.len() {
            self.services.db.set_replica_ports(id, &extra).await?;
        }
        Ok(std::iter::once(row.port).chain(extra).map(|p| p as u16).collect())
    }

    /// Frees the ports of `id`'s replicas beyond `count`, once the router
    /// sends nothing to them and they are stopped: a port freed earlier
    /// could go to another app's deployment while requests still reach it.
    async fn free_replica_ports(&self, id: &str, count: u32) -> Result<(), DeployError> {
        let _guard = self.port_lock.lock().await;
        let row = self.row(id).await?;
        let wanted = count.saturating_sub(1) as usize;
        if row.replica_ports.len() > wanted {
            self.services.db.set_replica_ports(id, &row.replica_ports[..wanted]).await?;
        }
        Ok(())
    }

    /// Runs `count` replicas of `row` (as read under `_held`, the
    /// deployment's hold) under one watcher. With `keep`, the
    /// replicas it runs already and still needs go on as they are;
    /// without, every sandbox it ran is stopped first. A replica is adopted
    /// when a previous receiver left it running (a receiver restart is no
    /// restart of its apps), else started.
    async fn run(
        &self,
        _held: &Held,
        app: &AppRow,
        row: &DeploymentRow,
        count: u32,
        keep: bool,
        wait: Wait,
    ) -> Result<Status, DeployError> {
        // One replica and none recorded (most starts, every wake): its own
        // port, read under the deployment's hold by the caller; the others
        // are only ever recorded under that hold.
        let single = count == 1 && row.replica_ports.is_empty();
        let ports = if single { vec![row.port as u16] } else { self.replica_ports(&row.id, count).await? };
        let log = self.open_log(&row.id)?;
        let previous = self.running.lock().map_err(|_| poisoned())?.remove(&row.id);
        // `starting` is committed once, by the caller (a wake) or below, and
        // not again by the watcher. A deployment that did not run here and
        // whose caller recorded `starting` (a wake: the router holds its
        // requests) gets no route table before its first healthy replica;
        // any other start shows the router its starting page at once. A
        // wake then costs one commit and two route tables (the first
        // patched, with no query), not three commits and two full tables.
        let ran_here = previous.is_some();
        let recorded_by_caller = row.state() == DeploymentState::Starting;
        let mut starting_recorded = recorded_by_caller;
        let mut kept = Vec::new();
        // When the replicas that stay became healthy: their uptime goes on.
        let mut kept_since = HashMap::new();
        if let Some(previous) = previous {
            previous.watcher.abort();
            let since = previous.healthy_since.lock().map(|s| s.clone()).unwrap_or_default();
            let (stay, go): (Vec<_>, Vec<_>) = previous
                .replicas
                .into_iter()
                .zip(since.into_iter().chain(std::iter::repeat(None)))
                .partition(|(r, _)| keep && (r.index as usize) < ports.len());
            if !go.is_empty() && keep {
                // The router stops sending to the going replicas before
                // they stop: only the healthy ones that stay are routed.
                let routed = stay.iter().filter(|(_, since)| since.is_some()).map(|(r, _)| r.port).collect();
                self.services.routes.set_healthy(&row.id, Some(routed));
                if let Err(e) = self.services.routes.publish().await {
                    tracing::warn!(deployment = %row.id, error = %e, "nx-router has not taken the table without the going replicas");
                }
            }
            kept_since = stay.iter().map(|(r, since)| (r.index, *since)).collect();
            kept = stay.into_iter().map(|(r, _)| r).collect();
            let go = go.into_iter().map(|(r, _)| r);
            // Never two instances of one replica: what goes is gone before
            // anything starts in its place.
            futures_util::future::join_all(go.map(|r| r.sandbox.stop())).await;
            if !keep {
                // None of its replicas answers now: a table sent before the
                // new watcher's first step must not route it by their ports.
                self.services.routes.set_healthy(&row.id, None);
            }
        }
        // Replicas beyond `count` a previous receiver left running.
        for index in count..count + 16 {
            let dir = self.shim_dir(&replica_key(&row.id, index));
            if index > 0 && dir.exists() {
                nx_runtime::shim::stop_dir(&dir, self.services.config.stop_grace).await;
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        if !single {
            self.free_replica_ports(&row.id, count).await?;
        }
        let mut replicas = Vec::new();
        for (index, port) in (0u32..).zip(ports) {
            if let Some(pos) = kept.iter().position(|r| r.index == index) {
                replicas.push(kept.swap_remove(pos));
                continue;
            }
            let config = match self.sandbox_config(app, row, index, port).await {
                Ok(c) => c,
                Err(e) => {
                    // Fail closed: no sandbox unless it is exactly as specified,
                    // not even one a previous receiver left running or made ready.
                    futures_util::future::join_all(replicas.into_iter().map(|r: Replica| r.sandbox.stop())).await;
                    if let Some(ready) = self.take_ready(&row.id) {
                        ready.discard().await;
                    }
                    if let Some((Some(ready), _place)) = self.made_ahead(&row.id).await {
                        ready.discard().await;
                    }
                    for index in 0..count {
                        let dir = self.shim_dir(&replica_key(&row.id, index));
                        nx_runtime::shim::stop_dir(&dir, self.services.config.stop_grace).await;
                    }
                    let reason = format!("cannot prepare the sandbox: {e}");
                    tracing::error!(deployment = %row.id, app = %row.app_name, error = %e, "sandbox not started");
                    self.services.routes.set_healthy(&row.id, None);
                    self.services.db.set_state(&row.id, DeploymentState::Failed, Some(&reason)).await?;
                    let _ = self.services.routes.publish().await;
                    return Ok(Status::Failed { reason, log_tail: Vec::new() });
                }
            };
            let sandbox = self.replica(row, index, config, &log, &mut starting_recorded).await?;
            replicas.push(Replica { index, port, sandbox });
        }
        let watched = replicas.iter().map(|r| (r.port, r.sandbox.watch())).collect();
        // What is applied (recorded and routed) is what the watcher says it
        // applied: a start whose replicas are healthy already (one from a
        // sandbox made ready answers within 2 ms) is still `starting` on
        // record until then, and a caller waiting for it must not read the
        // row before. Replicas that stay keep what they had.
        let (applied_tx, applied) = watch::channel(match keep {
            true => aggregate(&replicas.iter().map(|r| r.sandbox.status()).collect::<Vec<_>>()),
            false => Status::Starting { restarts: 0 },
        });
        let healthy_since =
            Arc::new(Mutex::new(replicas.iter().map(|r| kept_since.get(&r.index).copied().flatten()).collect()));
        let routed = Arc::new(Mutex::new(Vec::new()));
        let watcher = tokio::spawn(watch_sandbox(
            watched,
            applied_tx,
            healthy_since.clone(),
            routed.clone(),
            Watcher {
                db: self.services.db.clone(),
                routes: self.services.routes.clone(),
                reporter: self.services.reporter.clone(),
                id: row.id.clone(),
                app: row.app_name.clone(),
                recorded: if keep {
                    Some(self.row(&row.id).await?.state())
                } else {
                    (starting_recorded && !ran_here).then_some(DeploymentState::Starting)
                },
                routed: (recorded_by_caller && !ran_here && !keep).then(Vec::new),
            },
        ))
        .abort_handle();
        let mut waiter = applied.clone();
        let replica_watches: Vec<_> = replicas.iter().map(|r| r.sandbox.watch()).collect();
        if let Some(old) = self.running.lock().map_err(|_| poisoned())?.insert(
            row.id.clone(),
            Running { replicas, applied, healthy_since, routed, log, watcher, since: std::time::Instant::now() },
        ) {
            // Never two instances of one deployment (two starts raced).
            tokio::spawn(old.stop());
        }
        let status = match wait {
            Wait::No => return Ok(Status::Starting { restarts: 0 }),
            Wait::Any => waiter
                .wait_for(|s| !matches!(s, Status::Starting { .. }))
                .await
                .map(|s| s.clone())
                .unwrap_or(Status::Stopped),
            Wait::All => {
                let mut last = Status::Stopped;
                for mut w in replica_watches {
                    last = w
                        .wait_for(|s| !matches!(s, Status::Starting { .. }))
                        .await
                        .map(|s| s.clone())
                        .unwrap_or(Status::Stopped);
                    if !matches!(last, Status::Healthy { .. }) {
                        break;
                    }
                }
                // Applied (recorded and routed) before the caller relies on it.
                let _ = waiter.wait_for(|s| !matches!(s, Status::Starting { .. })).await;
                last
            }
        };
        if matches!(status, Status::Failed { .. }) && wait == Wait::Any {
            let _ = self.running.lock().map(|mut r| r.remove(&row.id));
        }
        Ok(status)
    }

    /// Replica `index` of `row`'s sandbox: started from the sandbox made
    /// ready for it (for its wake, or ahead of its push) if it is still the
    /// same, else adopted when a previous receiver left it running, else
    /// started. A start records `starting` unless that is `recorded` already.
    async fn replica(
        &self,
        row: &DeploymentRow,
        index: u32,
        config: SandboxConfig,
        log: &Log,
        recorded: &mut bool,
    ) -> Result<Sandbox, DeployError> {
        let pm = self.services.pm.clone();
        // Only the first replica is made ready; nothing else runs in its
        // state directory then, so there is nothing to adopt.
        // A push's keeps its place until it is started or discarded below.
        let (ready, _place) = match index {
            0 => match self.take_ready(&row.id) {
                Some(ready) => (Some(ready), None),
                None => self.made_ahead(&row.id).await.map_or((None, None), |(ready, place)| (ready, Some(place))),
            },
            _ => (None, None),
        };
        let config = match ready {
            Some(_) => config,
            None => match Sandbox::adopt(config, pm.clone(), log.clone()).await {
                Ok(adopted) => return Ok(adopted),
                Err(config) => config,
            },
        };
        if index == 0 && !*recorded {
            self.services.db.set_state(&row.id, DeploymentState::Starting, None).await?;
            *recorded = true;
        }
        let config = match ready {
            None => config,
            Some(ready) => match ready.start(config, pm.clone(), log.clone()).await {
                Ok(sandbox) => return Ok(sandbox),
                Err((config, why)) => {
                    log.system_line(&format!("the sandbox made ready ahead was not used: {why}"));
                    config
                }
            },
        };
        Ok(Sandbox::start(config, pm, log.clone()))
    }

    /// The sandbox made ready for `id`'s wake, if there is one.
    pub(super) fn take_ready(&self, id: &str) -> Option<nx_runtime::ready::Ready> {
        self.ready.lock().ok()?.remove(id)?.ready
    }

    /// The log of deployment `id`, which its sandboxes' shims write to.
    pub(super) fn open_log(&self, id: &str) -> Result<Log, DeployError> {
        let logs_dir = self.services.config.data_dir.join("logs/deployments");
        std::fs::create_dir_all(&logs_dir).map_err(io_err(&logs_dir))?;
        let log_path = self.log_path(id);
        Log::open_shared(&log_path, LogLimits::default()).map_err(io_err(&log_path))
    }

    /// Makes `id` the production of `app`; the router switches atomically and the
    /// previous production keeps running for a rollback.
    pub async fn promote(&self, app: &AppRow, id: &str, actor: &str) -> Result<Option<String>, DeployError> {
        let row = self.row(id).await?;
        // Whoever asks (the admin, a button, a merge): a fork's code ran in
        // the job that built it, with its own database and no secrets.
        if row.is_fork_preview() {
            return Err(DeployError::ForkPreview { id: id.to_owned(), pr: row.pr_number.unwrap_or_default() });
        }
        // A sleeping preview is woken first: production must answer at once.
        self.ensure_awake(id).await?;
        let held = self.hold(id).await;
        // Read again under the hold: one stopped or failed since (a stopped
        // preview's own database is dropped) is not moved onto the app's
        // database and started.
        let row = self.row(id).await?;
        if row.state() != DeploymentState::Healthy {
            return Err(DeployError::NotHealthy { id: id.into(), state: row.state().as_str().to_owned() });
        }
        let own_db = row.db_name.clone().zip(row.db_password.clone());
        let previous = match self.switch(&held, app, &row).await {
            Ok(Some(previous)) => previous,
            Ok(None) => return Ok(Some(id.to_owned())),
            Err(e) => {
                if let Some((db, password)) = &own_db {
                    self.back_to_own_database(&held, id, db, password).await?;
                }
                return Err(e);
            }
        };
        self.services
            .db
            .event(Some(&app.name), Some(id), "promote", actor, serde_json::json!({ "previous": previous }))
            .await?;
        if let Err(e) = self.services.routes.publish().await {
            tracing::error!(error = %e, app = %app.name, deployment = id, "promoted, but the router has not taken the new table yet");
        }
        self.services.reporter.send(events::Event::Promoted { deployment: id.to_owned(), previous: previous.clone() });
        // One lock at a time: never two held, so never a deadlock.
        drop(held);
        // The previous production stays for a rollback, as one sandbox:
        // its other replicas stop once the router sends nothing new to them.
        if let Some(prev) = &previous {
            let held = self.hold(prev).await;
            if let Ok(row) = self.row(prev).await {
                if self.running.lock().map_err(|_| poisoned())?.contains_key(prev) {
                    if let Err(e) = self.run(&held, app, &row, 1, true, Wait::No).await {
                        tracing::error!(deployment = %prev, error = %e, "cannot stop the replicas of the previous production");
                    }
                }
            }
        }
        if let Some((db, _)) = own_db {
            self.services.databases.drop_database(&db).await?;
        }
        Ok(previous)
    }

    /// Promotion's part under the hold of healthy `row`: a preview with a
    /// database of its own is restarted on the app's, the app's replicas
    /// are brought up healthy, and the app's production switches to it.
    /// Returns the production it replaced, or `None` when it was production
    /// already.
    async fn switch(
        &self,
        held: &Held,
        app: &AppRow,
        row: &DeploymentRow,
    ) -> Result<Option<Option<String>>, DeployError> {
        let id = row.id.as_str();
        if let Some(db) = &row.db_name {
            // Production uses the app's database: the preview is restarted on
            // it (its own URL blips, production does not) before the switch.
            tracing::info!(deployment = id, database = %db, "moving a preview onto the app's database before promotion");
            self.halt(held, id).await;
            self.services.db.set_preview_db(id, None).await?;
            let row = self.row(id).await?;
            if let Status::Failed { reason, .. } = self.start_held(held, &row, true).await? {
                return Err(DeployError::NotHealthy {
                    id: id.into(),
                    state: format!("failed on the app's database: {reason}"),
                });
            }
        }
        // Production runs as many replicas as the app asks: all of them
        // healthy before the switch.
        let replicas = app.settings.replicas();
        let row = self.row(id).await?;
        // One that is not healthy is refused below, without sandboxes started for it.
        let runs = self.running_replicas(id).max(1);
        if replicas != runs && row.state() == DeploymentState::Healthy {
            let status = self.run(held, app, &row, replicas, true, Wait::All).await?;
            if !matches!(status, Status::Healthy { .. }) {
                let reason = match status {
                    Status::Failed { reason, .. } => reason,
                    other => format!("{other:?}"),
                };
                // It stays what it was: a preview, not production. The row
                // is read again: the first run recorded replica ports.
                let row = self.row(id).await?;
                self.run(held, app, &row, runs, true, Wait::No).await?;
                return Err(DeployError::NotHealthy {
                    id: id.into(),
                    state: format!("not all of its {replicas} replicas came up healthy: {reason}"),
                });
            }
        }
        match self.services.db.promote(app.id, id).await? {
            PromoteOutcome::Promoted { previous } => Ok(Some(previous)),
            PromoteOutcome::AlreadyProduction => Ok(None),
            PromoteOutcome::NotHealthy(state) => Err(DeployError::NotHealthy { id: id.into(), state }),
            PromoteOutcome::NoDeployment | PromoteOutcome::NoApp => {
                Err(DeployError::UnknownDeployment { app: app.name.clone(), id: id.into() })
            }
        }
    }

    /// After a promotion that failed once preview `id` was moved onto the
    /// app's database: it is a preview again, on its own database (which
    /// stays counted against the app's cap and is dropped when it stops),
    /// started there if it still runs; never left on production's data.
    async fn back_to_own_database(&self, held: &Held, id: &str, db: &str, password: &[u8]) -> Result<(), DeployError> {
        let row = self.row(id).await?;
        if row.db_name.is_some() {
            return Ok(());
        }
        tracing::warn!(deployment = id, database = %db, "promotion failed: the preview goes back to its own database");
        self.halt(held, id).await;
        self.services.db.set_preview_db(id, Some((db, password))).await?;
        let row = self.row(id).await?;
        if meant_to_run(&row) {
            self.start_held(held, &row, false).await?;
        }
        Ok(())
    }

    /// Stops the sandbox of `id` if it runs or waits ready for its wake,
    /// and waits until it is gone.
    async fn halt(&self, _held: &Held, id: &str) {
        let running = self.running.lock().ok().and_then(|mut r| r.remove(id));
        if let Some(r) = running {
            r.stop().await;
        }
        if let Some(ready) = self.take_ready(id) {
            ready.discard().await;
        }
        self.services.routes.set_healthy(id, None);
    }

    /// Stops a deployment for good: its sandbox, its own database if it had
    /// one; its URL then answers a page saying it was stopped, and `reason`
    /// when given.
    pub async fn stop(&self, app: &AppRow, id: &str, actor: &str, reason: Option<&str>) -> Result<(), DeployError> {
        if self.row(id).await?.app_id != app.id {
            return Err(DeployError::UnknownDeployment { app: app.name.clone(), id: id.into() });
        }
        // Under the lock: a wake in flight finishes first, and none
        // starts it again afterwards (it only wakes what sleeps). The row is
        // read under it: a promotion it waited for may have made this
        // production, and moved it off its own database.
        let held = self.hold(id).await;
        let row = self.row(id).await?;
        if row.is_production {
            return Err(DeployError::IsProduction { app: app.name.clone(), id: id.into() });
        }
        self.halt(&held, id).await;
        self.services.db.set_state(id, DeploymentState::Stopped, reason).await?;
        self.forget_failed_wakes(id);
        if let Some(db) = &row.db_name {
            self.services.databases.drop_database(db).await?;
            self.services.db.set_preview_db(id, None).await?;
        }
        self.services
            .db
            .event(Some(&app.name), Some(id), "stop", actor, serde_json::json!({ "reason": reason }))
            .await?;
        let _ = self.services.routes.publish().await;
        tracing::info!(deployment = id, app = %app.name, reason, "deployment stopped");
        Ok(())
    }

    /// Takes back (or starts) every deployment that was running before this
    /// process started, and stops sandboxes left for any other.
    pub async fn reconcile(self: &Arc<Self>) -> Result<usize, DeployError> {
        let rows = self.services.db.live_deployments().await?;
        let count = rows.len();
        // A sandbox left running for a deployment that is no longer live
        // (its row changed while no receiver ran) is stopped, never leaked.
        let live: std::collections::HashSet<String> =
            rows.iter().flat_map(|r| (0..=r.replica_ports.len() as u32).map(|i| replica_key(&r.id, i))).collect();
        let shims = shims_dir(&self.services.config.data_dir);
        for entry in std::fs::read_dir(&shims).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&name) && nx_runtime::shim::stop_dir(&entry.path(), self.services.config.stop_grace).await
            {
                tracing::info!(deployment = %name, "stopped a sandbox whose deployment is no longer running");
            }
        }
        if let Err(e) = self.remove_unrecorded().await {
            tracing::warn!(error = %e, "cannot look for what pushes left of deployments never recorded");
        }
        let mut tasks = Vec::new();
        for row in rows {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                let started = me.start(&row, true).await;
                if let Err(e @ DeployError::NotRunning { .. }) = &started {
                    tracing::info!(deployment = %row.id, app = %row.app_name, reason = %e, "not taken back");
                } else if let Err(e) = started {
                    tracing::error!(deployment = %row.id, app = %row.app_name, error = %e, "cannot restart deployment");
                    let _ = me.services.db.set_state(&row.id, DeploymentState::Failed, Some(&e.to_string())).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        // Sleeping deployments get their sandboxes ready for a wake again
        // (the earlier ones ended with their receiver), one at a time after
        // the running ones are back: each joins a cgroup, which holds every
        // fork on the host for a moment.
        let me = self.clone();
        tokio::spawn(async move {
            let sleeping = me.services.db.sleeping_deployments().await.unwrap_or_default();
            for row in sleeping {
                let held = me.hold(&row.id).await;
                me.make_ready(&held, &row.id).await;
            }
        });
        Ok(count)
    }

    /// Removes what pushes made for deployments never recorded, which a
    /// receiver that died during their upload left (their sandboxes made
    /// ahead died with it): run and state directories and logs of ids that
    /// no deployment has and no push under way was promised.
    async fn remove_unrecorded(&self) -> Result<(), DeployError> {
        let data = &self.services.config.data_dir;
        for entry in std::fs::read_dir(data.join("run")).into_iter().flatten().flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            // Checked first: a push under way is promised its id before it
            // makes anything, and records it before it gives the promise up.
            if self.making.lock().map_err(|_| poisoned())?.contains_key(&id) {
                continue;
            }
            match self.services.db.deployment(&id).await {
                Ok(None) => {}
                Ok(Some(_)) => continue,
                // Kept: nothing is removed on a guess, and the deployments
                // are taken back all the same.
                Err(e) => {
                    tracing::warn!(deployment = %id, error = %e, "cannot tell whether a run directory's deployment is recorded; kept");
                    continue;
                }
            }
            let shim = self.shim_dir(&replica_key(&id, 0));
            nx_runtime::shim::stop_dir(&shim, self.services.config.stop_grace).await;
            for dir in [entry.path(), shim] {
                let _ = std::fs::remove_dir_all(&dir);
            }
            let _ = std::fs::remove_file(self.log_path(&id));
            tracing::info!(deployment = %id, "removed what a push left of a deployment never recorded");
        }
        Ok(())
    }

    /// Lets go of every sandbox without stopping it: each runs on under its
    /// shim, and the next start adopts it (`nx-receiver stop-all` stops them).
    /// Sandboxes made ready for a wake are discarded: the next receiver
    /// makes its own.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        // Each under its deployment's hold: a wake in flight that counted on
        // one finishes first.
        let ids: Vec<String> = self.ready.lock().map(|r| r.keys().cloned().collect()).unwrap_or_default();
        for id in ids {
            let _held = self.hold(&id).await;
            if let Some(ready) = self.take_ready(&id) {
                ready.discard().await;
            }
        }
        let running: Vec<Running> = match self.running.lock() {
            Ok(mut r) => r.drain().map(|(_, v)| v).collect(),
            Err(_) => Vec::new(),
        };
        tracing::info!(count = running.len(), "sandboxes left running under their shims");
    }

    /// Where a deployment's log is kept.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.services.config.data_dir.join("logs/deployments").join(format!("{id}.log"))
    }

    /// The state directory of a deployment's shim.
    pub fn shim_dir(&self, id: &str) -> PathBuf {
        shims_dir(&self.services.config.data_dir).join(id)
    }

    /// The live log of a running deployment.
    pub fn live_log(&self, id: &str) -> Option<Log> {
        self.running.lock().ok()?.get(id).map(|r| r.log.clone())
    }

    /// When the sandbox of a running deployment was started or adopted.
    fn running_since(&self, id: &str) -> Option<std::time::Instant> {
        self.running.lock().ok()?.get(id).map(|r| r.since)
    }

    /// How many replicas of a deployment run (0 when it does not run).
    fn running_replicas(&self, id: &str) -> u32 {
        let Ok(running) = self.running.lock() else { return 0 };
        running.get(id).map_or(0, |r| r.replicas.len() as u32)
    }

    /// The live logs of every running deployment, by id (for log drains).
    pub fn running_logs(&self) -> Vec<(String, Log)> {
        self.running.lock().map(|r| r.iter().map(|(id, r)| (id.clone(), r.log.clone())).collect()).unwrap_or_default()
    }

    /// The last status the watcher applied for a running deployment (of
    /// its replicas together).
    pub fn running_status(&self, id: &str) -> Option<Status> {
        self.running.lock().ok()?.get(id).map(|r| r.applied.borrow().clone())
    }

    /// The host's cgroup layout and the group sandboxes are made in: a
    /// deployment's cgroup is `<hierarchy>/<group>/<id>`.
    pub fn cgroups(&self) -> (&nx_runtime::cgroup::Driver, String) {
        (&self.services.cgroups, self.services.config.cgroup_group())
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// Where the shims of the receiver on `data_dir` keep their state.
pub fn shims_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("shims")
}

/// Where the parked sandboxes' state directories are (`--sandbox-pool`).
pub fn pool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pool")
}

/// The push's own variables, sealed as they are recorded; `None` without any.
fn sealed_push_env(master: &crate::secrets::MasterKey, meta: &PushMeta) -> Result<Option<Vec<u8>>, DeployError> {
    if meta.env.is_empty() {
        return Ok(None);
    }
    let json = serde_json::to_vec(&meta.env)
        .map_err(|e| DeployError::Internal(format!("cannot encode the push's variables: {e}")))?;
    Ok(Some(master.seal(&json)))
}

/// A fresh random deployment id.
fn new_id() -> String {
    let mut bytes = [0u8; DeploymentId::LEN];
    rand::thread_rng().fill_bytes(&mut bytes);
    DeploymentId::from_random(bytes).to_string()
}

fn poisoned() -> DeployError {
    DeployError::Internal("the deployer's state lock is poisoned".into())
}

/// Where a sandbox's watcher applies its statuses.
struct Watcher {
    db: Db,
    routes: Arc<RoutePublisher>,
    reporter: events::Reporter,
    id: String,
    app: String,
    /// The state already recorded when replicas are added to or taken from
    /// a running deployment, or `starting` when its start recorded it: not
    /// recorded (nor reported) again.
    recorded: Option<DeploymentState>,
    /// The replica ports the router already has for it: none for a
    /// deployment that did not run here (`None`: not known, so the first
    /// status publishes a table). `Some` for a start the router holds
    /// requests for (a wake), whose first healthy replica is sent to the
    /// router before its state is committed.
    routed: Option<Vec<u16>>,
}

/// What the watcher does with a status: record `state` (and `error`, with a
/// `failed` event), publish the routes, and report to GitHub when `settled`.
#[derive(Debug, PartialEq, Eq)]
struct Step {
    state: DeploymentState,
    error: Option<String>,
    settled: bool,
}

/// The watcher's decision for `status` when `applied` is the state it last
/// recorded: nothing when the state is unchanged (the supervisor announces
/// `Starting` again as it spawns; a second write costs a commit and a route
/// publish for nothing) or when the sandbox stopped (stops are recorded by
/// whoever asked for them; a receiver shutdown records nothing, so the
/// deployment comes back at the next start).
fn step(applied: Option<DeploymentState>, status: &Status) -> Option<Step> {
    let (state, error) = match status {
        Status::Starting { .. } => (DeploymentState::Starting, None),
        // Unhealthy replicas are routed while none is healthy: the
        // deployment stays healthy until they are restarted.
        Status::Healthy { .. } | Status::Unhealthy { .. } => (DeploymentState::Healthy, None),
        Status::Failed { reason, .. } => (DeploymentState::Failed, Some(reason.clone())),
        Status::Stopped => return None,
    };
    let settled = matches!(state, DeploymentState::Healthy | DeploymentState::Failed);
    (applied != Some(state)).then_some(Step { state, error, settled })
}

/// The status of a deployment as a whole, from its replicas': healthy when
/// one is (the router sends requests to the healthy ones), unhealthy when
/// none is but one runs unhealthy (the router sends to those, see
/// [`routed_ports`]), starting while none runs but one may still, else how
/// the first one ended.
fn aggregate(replicas: &[Status]) -> Status {
    let restarts: u32 = replicas
        .iter()
        .map(|s| match s {
            Status::Starting { restarts } | Status::Healthy { restarts } | Status::Unhealthy { restarts, .. } => {
                *restarts
            }
            _ => 0,
        })
        .sum();
    if replicas.iter().any(|s| matches!(s, Status::Healthy { .. })) {
        Status::Healthy { restarts }
    } else if let Some(Status::Unhealthy { reason, .. }) =
        replicas.iter().find(|s| matches!(s, Status::Unhealthy { .. }))
    {
        Status::Unhealthy { restarts, reason: reason.clone() }
    } else if replicas.iter().any(|s| matches!(s, Status::Starting { .. })) {
        Status::Starting { restarts }
    } else {
        replicas.iter().find(|s| matches!(s, Status::Failed { .. })).cloned().unwrap_or(Status::Stopped)
    }
}

/// The ports of `replicas` the router sends requests to: the healthy
/// ones; while none is healthy, the unhealthy ones that still run, since a
/// replica failing its health check may still answer some requests (a host
/// too loaded to answer probes in time), and no route at all would answer
/// none. A deployment's only replica is thus never taken out while it runs;
/// it is restarted once it has failed for `--unhealthy-restart-after`.
fn routed_ports(replicas: &[(u16, Status)]) -> Vec<u16> {
    let with = |healthy: bool| -> Vec<u16> {
        replicas
            .iter()
            .filter(|(_, s)| match s {
                Status::Healthy { .. } => healthy,
                Status::Unhealthy { .. } => !healthy,
                _ => false,
            })
            .map(|(port, _)| *port)
            .collect()
    };
    let healthy = with(true);
    if healthy.is_empty() {
        with(false)
    } else {
        healthy
    }
}

/// Applies each status of one deployment's replicas to the database and the
/// router (which gets the ports of [`routed_ports`]), then publishes it as
/// applied, and reports it to GitHub.
async fn watch_sandbox(
    mut replicas: Vec<(u16, watch::Receiver<Status>)>,
    applied: watch::Sender<Status>,
    healthy_since: Arc<Mutex<Vec<Option<std::time::Instant>>>>,
    routed_now: Arc<Mutex<Vec<u16>>>,
    w: Watcher,
) {
    let Watcher { db, routes, reporter, id, app, recorded, routed } = w;
    let mut applied_state = recorded;
    let holds_requests = routed.is_some();
    let mut routed = routed;
    // The sandbox was started just before its watcher.
    let (started, mut was_healthy) = (std::time::Instant::now(), recorded == Some(DeploymentState::Healthy));
    loop {
        let statuses: Vec<Status> = replicas.iter_mut().map(|(_, s)| s.borrow_and_update().clone()).collect();
        if let Ok(mut since) = healthy_since.lock() {
            for (at, status) in since.iter_mut().zip(&statuses) {
                match status {
                    Status::Healthy { .. } | Status::Unhealthy { .. } => *at = at.or(Some(std::time::Instant::now())),
                    _ => *at = None,
                }
            }
        }
        let ports: Vec<(u16, Status)> = replicas.iter().map(|(port, _)| *port).zip(statuses.iter().cloned()).collect();
        let to_route = routed_ports(&ports);
        let reroute = routed.as_ref() != Some(&to_route);
        if reroute {
            routes.set_healthy(&id, Some(to_route.clone()));
            routed = Some(to_route);
        }
        let current = aggregate(&statuses);
        match step(applied_state, &current) {
            Some(step) => {
                applied_state = Some(step.state);
                let first_healthy = step.state == DeploymentState::Healthy && !was_healthy;
                if first_healthy {
                    was_healthy = true;
                    crate::counters::platform().became_healthy(started.elapsed());
                }
                // Healthy, it is routed by its healthy replicas (set above)
                // whatever its recorded state: for a wake the router has it
                // before the commit, and the requests it holds go on at
                // once. The whole table follows the commit.
                if first_healthy && holds_requests {
                    let _ = routes.publish_healthy(&id).await;
                }
                if let Err(e) = db.set_state(&id, step.state, step.error.as_deref()).await {
                    tracing::error!(deployment = %id, error = %e, "cannot record deployment state");
                }
                if let Some(reason) = &step.error {
                    let _ = db
                        .event(Some(&app), Some(&id), "failed", "supervisor", serde_json::json!({ "reason": reason }))
                        .await;
                }
                let _ = routes.publish().await;
                tracing::info!(deployment = %id, app = %app, state = step.state.as_str(), "deployment state");
                if step.settled {
                    reporter.send(events::Event::Settled(id.clone()));
                }
            }
            // A replica came or went while the deployment stayed as it was.
            None if reroute => {
                let _ = routes.publish().await;
            }
            None => {}
        }
        if reroute {
            // Said after the table went to the router (a failed publish is
            // retried in the background): a replica shown as not routed is
            // sent no new request.
            if let Ok(mut now) = routed_now.lock() {
                now.clone_from(routed.as_ref().unwrap_or(&Vec::new()));
            }
        }
        let _ = applied.send(current.clone());
        // Waits for the next change of a replica still supervised.
        let open: Vec<_> = replicas
            .iter_mut()
            .zip(&statuses)
            .filter(|(_, s)| !s.is_final())
            .map(|((_, rx), _)| Box::pin(rx.changed()))
            .collect();
        if open.is_empty() || futures_util::future::select_all(open).await.0.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(reason: &str) -> Status {
        Status::Failed { reason: reason.into(), log_tail: vec!["boom".into()] }
    }

    #[test]
    fn each_state_is_recorded_once_and_settled_states_are_reported() {
        use DeploymentState::{Failed, Healthy, Starting};
        let starting = Some(Step { state: Starting, error: None, settled: false });
        assert_eq!(step(None, &Status::Starting { restarts: 0 }), starting);
        assert_eq!(step(Some(Starting), &Status::Starting { restarts: 1 }), None, "a respawn is no new state");
        assert_eq!(
            step(Some(Starting), &Status::Healthy { restarts: 0 }),
            Some(Step { state: Healthy, error: None, settled: true })
        );
        assert_eq!(step(Some(Healthy), &Status::Healthy { restarts: 0 }), None);
        assert_eq!(step(Some(Healthy), &Status::Starting { restarts: 1 }), starting, "a crash restarts");
        assert_eq!(
            step(Some(Starting), &failed("crashed 6 times")),
            Some(Step { state: Failed, error: Some("crashed 6 times".into()), settled: true })
        );
        assert_eq!(step(Some(Failed), &failed("again")), None);
        for applied in [None, Some(Starting), Some(Healthy)] {
            assert_eq!(step(applied, &Status::Stopped), None, "whoever stops records it");
        }
    }

    fn unhealthy(restarts: u32) -> Status {
        Status::Unhealthy { restarts, reason: "failed its health check 2 times in a row".into() }
    }

    #[test]
    fn an_unhealthy_replica_is_taken_out_unless_none_is_healthy() {
        let healthy = Status::Healthy { restarts: 0 };
        let starting = Status::Starting { restarts: 1 };
        let three = [(20001, healthy.clone()), (20002, unhealthy(0)), (20003, healthy.clone())];
        assert_eq!(routed_ports(&three), [20001, 20003]);
        assert_eq!(aggregate(&three.map(|(_, s)| s)), Status::Healthy { restarts: 0 });
        // The last one answering its checks stays; so do unhealthy ones
        // while none is healthy: they may answer, no route answers nothing.
        let none_healthy = [(20001, unhealthy(2)), (20002, starting.clone()), (20003, unhealthy(0))];
        assert_eq!(routed_ports(&none_healthy), [20001, 20003]);
        assert_eq!(aggregate(&none_healthy.map(|(_, s)| s)), unhealthy(3));
        assert_eq!(routed_ports(&[(20001, unhealthy(0))]), [20001], "a single replica is never taken out");
        assert_eq!(routed_ports(&[(20001, starting), (20002, failed("gave up"))]), Vec::<u16>::new());
        // The deployment stays healthy (and is not reported again).
        assert_eq!(step(Some(DeploymentState::Healthy), &unhealthy(0)), None);
    }
}
