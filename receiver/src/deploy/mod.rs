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

use nx_protocol::api::{DeploymentInfo, DeploymentState, PreviewDb, PushMeta, Source, VerifiedGitHub};
use nx_protocol::names::{preview_host, production_host, url_for_host, AppName, DeploymentId};
use nx_runtime::spec::HostLayout;
use nx_runtime::supervisor::Status;
use nx_runtime::{Log, LogLimits, ProcessManager, Sandbox};
use rand::RngCore;
use tokio::sync::watch;

use crate::config::ServeConfig;
use crate::databases::{DatabaseError, Databases};
use crate::db::{AppRow, ArtifactRow, Db, DeploymentRow, NewDeployment, PromoteOutcome};
use crate::routing::RoutePublisher;
use crate::secrets::MasterKey;
use crate::volumes::{VolumeError, Volumes};
use nx_cluster::AppEndpoint;
use nx_store::{ArtifactStore, StoreError};

pub mod events;
mod lifecycle;
pub mod link;
mod quotas;
mod sandbox;

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
    #[error(
        "deployment {id} is {state}, only healthy deployments can be promoted; push again or check `nx logs {id}`"
    )]
    NotHealthy { id: String, state: String },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("deployment {id} is the production of {app}; promote another deployment before stopping it")]
    IsProduction { app: String, id: String },
    #[error(
        "deployment {id} is a preview of pull request #{pr} from a fork, pushed by a pull_request_target run: it \
         never becomes production; once the pull request is merged, a push of the production branch deploys it"
    )]
    ForkPreview { id: String, pr: i64 },
    #[error(transparent)]
    Cgroup(#[from] nx_runtime::cgroup::CgroupError),
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

/// A running sandbox and what its watcher last applied.
#[derive(Debug)]
struct Running {
    sandbox: Sandbox,
    applied: watch::Receiver<Status>,
    log: Log,
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
}

/// The deployment service.
#[derive(Debug)]
pub struct Deployer {
    services: Services,
    running: Mutex<HashMap<String, Running>>,
    port_lock: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
}

impl Deployer {
    pub fn new(services: Services) -> Deployer {
        Deployer {
            services,
            running: Mutex::new(HashMap::new()),
            port_lock: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
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
        })
    }

    /// Picks a free port: not held by a live deployment, and bindable now.
    async fn allocate_port(&self) -> Result<u16, DeployError> {
        let used: std::collections::HashSet<i32> = self.services.db.used_ports().await?.into_iter().collect();
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
        proved: Option<&VerifiedGitHub>,
        caller_may_link: bool,
        actor: &str,
    ) -> Result<DeploymentInfo, DeployError> {
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
        self.deploy(app, &artifact, meta, proved, caller_may_link, actor).await
    }

    /// Records a deployment of `artifact` to `app`, starts it, and returns once
    /// it is healthy or has failed. `proved`: what a GitHub OIDC token proved
    /// about the push; `caller_may_link`: the admin's push, whose repository
    /// may link the app (see [`link::check_push`]).
    pub async fn deploy(
        &self,
        app: &AppRow,
        artifact: &ArtifactRow,
        meta: &PushMeta,
        proved: Option<&VerifiedGitHub>,
        caller_may_link: bool,
        actor: &str,
    ) -> Result<DeploymentInfo, DeployError> {
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
        let env = if meta.env.is_empty() {
            None
        } else {
            let json = serde_json::to_vec(&meta.env)
                .map_err(|e| DeployError::Internal(format!("cannot encode the push's variables: {e}")))?;
            Some(self.services.master.seal(&json))
        };
        let id = new_id();
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
                    port: 0,
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
        self.services.db
            .event(
                Some(&app.name),
                Some(&id),
                "push",
                actor,
                serde_json::json!({ "digest": artifact.sha256, "size": artifact.size, "pr": meta.pr, "git_sha": meta.git_sha }),
            )
            .await?;
        if let (Some(name), Some(mode)) = (&preview_db, own_db) {
            if let Err(e) = self.attach_preview_db(app, &id, name, mode).await {
                // Whatever stands under that name now is not this preview's.
                self.services.db.set_preview_db(&id, None).await?;
                let reason = format!("cannot make the preview's own database: {e}");
                self.services.db.set_state(&id, DeploymentState::Failed, Some(&reason)).await?;
                let _ = self.services.routes.publish().await;
                return self.info(&self.row(&id).await?, Vec::new());
            }
        }
        let row = self.row(&id).await?;
        let status = self.start(&row, !meta.no_wait).await?;
        let row = self.row(&id).await?;
        let tail = match status {
            Status::Failed { log_tail, .. } => log_tail,
            _ => Vec::new(),
        };
        self.info(&row, tail)
    }

    /// Records a new deployment on a free port, if its app has room for
    /// `claim`. Ports are chosen and recorded under one lock so two
    /// deployments never take the same one.
    async fn record(&self, mut new: NewDeployment<'_>, app: &AppRow, claim: Claim) -> Result<(), DeployError> {
        let _guard = self.port_lock.lock().await;
        new.port = i32::from(self.allocate_port().await?);
        let caps = self.caps();
        self.services.db.insert_deployment(&new, |held| quotas::admit(&app.name, caps, held, claim)).await
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
        self.services
            .db
            .deployment(id)
            .await?
            .ok_or_else(|| DeployError::UnknownDeployment { app: "?".into(), id: id.into() })
    }

    /// Starts the sandbox of `row`; with `wait`, returns once its first start is
    /// decided and applied, else at once.
    pub async fn start(&self, row: &DeploymentRow, wait: bool) -> Result<Status, DeployError> {
        let app = self
            .services
            .db
            .app_by_id(row.app_id)
            .await?
            .ok_or_else(|| DeployError::UnknownDeployment { app: row.app_name.clone(), id: row.id.clone() })?;
        let config = match self.sandbox_config(&app, row).await {
            Ok(c) => c,
            Err(e) => {
                // Fail closed: no sandbox unless it is exactly as specified,
                // not even one a previous receiver left running.
                nx_runtime::shim::stop_dir(&self.shim_dir(&row.id), self.services.config.stop_grace).await;
                let reason = format!("cannot prepare the sandbox: {e}");
                tracing::error!(deployment = %row.id, app = %row.app_name, error = %e, "sandbox not started");
                self.services.db.set_state(&row.id, DeploymentState::Failed, Some(&reason)).await?;
                let _ = self.services.routes.publish().await;
                return Ok(Status::Failed { reason, log_tail: Vec::new() });
            }
        };
        let logs_dir = self.services.config.data_dir.join("logs/deployments");
        std::fs::create_dir_all(&logs_dir).map_err(io_err(&logs_dir))?;
        let log_path = self.log_path(&row.id);
        // The sandbox's shim writes the app's lines to the same file.
        let log = Log::open_shared(&log_path, LogLimits::default()).map_err(io_err(&log_path))?;
        // One a previous receiver started may still run: taken back as it is,
        // so a receiver restart is no restart of its apps.
        let sandbox = match Sandbox::adopt(config, self.services.pm.clone(), log.clone()).await {
            Ok(adopted) => adopted,
            Err(config) => {
                self.services.db.set_state(&row.id, DeploymentState::Starting, None).await?;
                Sandbox::start(config, self.services.pm.clone(), log.clone())
            }
        };
        let (applied_tx, applied) = watch::channel(sandbox.status());
        tokio::spawn(watch_sandbox(
            sandbox.watch(),
            applied_tx,
            Watcher {
                db: self.services.db.clone(),
                routes: self.services.routes.clone(),
                reporter: self.services.reporter.clone(),
                id: row.id.clone(),
                app: row.app_name.clone(),
            },
        ));
        let mut waiter = applied.clone();
        if let Some(old) =
            self.running.lock().map_err(|_| poisoned())?.insert(row.id.clone(), Running { sandbox, applied, log })
        {
            // Never two instances of one deployment.
            tokio::spawn(old.sandbox.stop());
        }
        if !wait {
            return Ok(Status::Starting { restarts: 0 });
        }
        let status = waiter
            .wait_for(|s| !matches!(s, Status::Starting { .. }))
            .await
            .map(|s| s.clone())
            .unwrap_or(Status::Stopped);
        if matches!(status, Status::Failed { .. }) {
            let _ = self.running.lock().map(|mut r| r.remove(&row.id));
        }
        Ok(status)
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
        let preview_db = row.db_name.clone();
        if let Some(db) = &preview_db {
            // Production uses the app's database: the preview is restarted on
            // it (its own URL blips, production does not) before the switch.
            tracing::info!(deployment = id, database = %db, "moving a preview onto the app's database before promotion");
            self.halt(id).await;
            self.services.db.set_preview_db(id, None).await?;
            let row = self.row(id).await?;
            if let Status::Failed { reason, .. } = self.start(&row, true).await? {
                return Err(DeployError::NotHealthy {
                    id: id.into(),
                    state: format!("failed on the app's database: {reason}"),
                });
            }
        }
        let outcome = self.services.db.promote(app.id, id).await?;
        let previous = match outcome {
            PromoteOutcome::Promoted { previous } => previous,
            PromoteOutcome::AlreadyProduction => return Ok(Some(id.to_owned())),
            PromoteOutcome::NotHealthy(state) => return Err(DeployError::NotHealthy { id: id.into(), state }),
            PromoteOutcome::NoDeployment | PromoteOutcome::NoApp => {
                return Err(DeployError::UnknownDeployment { app: app.name.clone(), id: id.into() })
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
        if let Some(db) = preview_db {
            self.services.databases.drop_database(&db).await?;
        }
        Ok(previous)
    }

    /// Stops the sandbox of `id` if it runs, and waits until it is gone.
    async fn halt(&self, id: &str) {
        let running = self.running.lock().ok().and_then(|mut r| r.remove(id));
        if let Some(r) = running {
            r.sandbox.stop().await;
        }
    }

    /// Stops a deployment for good: its sandbox, its own database if it had
    /// one; its URL then answers a page saying it was stopped, and `reason`
    /// when given.
    pub async fn stop(&self, app: &AppRow, id: &str, actor: &str, reason: Option<&str>) -> Result<(), DeployError> {
        let row = self.row(id).await?;
        if row.app_id != app.id {
            return Err(DeployError::UnknownDeployment { app: app.name.clone(), id: id.into() });
        }
        if row.is_production {
            return Err(DeployError::IsProduction { app: app.name.clone(), id: id.into() });
        }
        self.halt(id).await;
        self.services.db.set_state(id, DeploymentState::Stopped, reason).await?;
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
        let live: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let shims = shims_dir(&self.services.config.data_dir);
        for entry in std::fs::read_dir(&shims).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(name.as_str())
                && nx_runtime::shim::stop_dir(&entry.path(), self.services.config.stop_grace).await
            {
                tracing::info!(deployment = %name, "stopped a sandbox whose deployment is no longer running");
            }
        }
        let mut tasks = Vec::new();
        for row in rows {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = me.start(&row, true).await {
                    tracing::error!(deployment = %row.id, app = %row.app_name, error = %e, "cannot restart deployment");
                    let _ = me.services.db.set_state(&row.id, DeploymentState::Failed, Some(&e.to_string())).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(count)
    }

    /// Lets go of every sandbox without stopping it: each runs on under its
    /// shim, and the next start adopts it (`nx-receiver stop-all` stops them).
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
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

    /// The live logs of every running deployment, by id (for log drains).
    pub fn running_logs(&self) -> Vec<(String, Log)> {
        self.running.lock().map(|r| r.iter().map(|(id, r)| (id.clone(), r.log.clone())).collect()).unwrap_or_default()
    }

    /// The last status the watcher applied for a running deployment.
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
        Status::Healthy { .. } => (DeploymentState::Healthy, None),
        Status::Failed { reason, .. } => (DeploymentState::Failed, Some(reason.clone())),
        Status::Stopped => return None,
    };
    let settled = matches!(state, DeploymentState::Healthy | DeploymentState::Failed);
    (applied != Some(state)).then_some(Step { state, error, settled })
}

/// Applies each status of one sandbox to the database and the router, then
/// publishes it as applied, and reports it to GitHub.
async fn watch_sandbox(mut status: watch::Receiver<Status>, applied: watch::Sender<Status>, w: Watcher) {
    let Watcher { db, routes, reporter, id, app } = w;
    let mut applied_state = None;
    // The sandbox was started just before its watcher.
    let (started, mut was_healthy) = (std::time::Instant::now(), false);
    loop {
        let current = status.borrow_and_update().clone();
        if let Some(step) = step(applied_state, &current) {
            applied_state = Some(step.state);
            if step.state == DeploymentState::Healthy && !was_healthy {
                was_healthy = true;
                crate::counters::platform().became_healthy(started.elapsed());
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
        let _ = applied.send(current.clone());
        if current.is_final() || status.changed().await.is_err() {
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
}
