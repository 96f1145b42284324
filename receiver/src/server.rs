//! `nx-receiver serve`: bring everything up in order, serve until SIGINT or
//! SIGTERM, then take everything down in reverse order.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use nx_protocol::auth::Credential;
use nx_runtime::spec::HostLayout;
use nx_runtime::{Log, LogLimits, ProcessManager};
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::config::{NetworkIsolation, ServeConfig};
use crate::db::Db;
use crate::deploy::{Deployer, Services};
use crate::network;
use crate::routing::{RoutePublisher, RouterProcess, RouterSettings, RouterTls};
use crate::secrets::{random_token, MasterKey};
use nx_cluster::Cluster;
use nx_store::ArtifactStore;

/// The first ancestor of `path` that other users cannot traverse, if any.
pub fn untraversable_ancestor(path: &Path) -> Option<(PathBuf, u32)> {
    let mut cur = path.parent();
    while let Some(dir) = cur {
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.permissions().mode();
            if mode & 0o001 == 0 {
                return Some((dir.to_owned(), mode & 0o777));
            }
        }
        cur = dir.parent();
    }
    None
}

fn make_dir(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

/// Reads a secret file, creating it with a fresh random value on first start.
fn secret_file(path: &Path, len: usize) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let value = random_token(len);
            crate::secrets::create_private(path, value.as_bytes())
                .with_context(|| format!("cannot create {}", path.display()))?;
            Ok(value)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Brings the metadata schema to this version. A start with nothing to
/// apply (every start but the first of a new version) costs one query: the
/// applied migrations, all successful, are exactly this binary's (same
/// versions, same checksums). Anything else (a first start, a newer
/// version, a failed or changed migration) goes through sqlx's migrator,
/// which applies what is missing under its lock or says what is wrong.
async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let migrator = sqlx::migrate!("./migrations");
    let wanted: Vec<(i64, &[u8])> =
        migrator.iter().filter(|m| !m.migration_type.is_down_migration()).map(|m| (m.version, &*m.checksum)).collect();
    let applied: Result<Vec<(i64, Vec<u8>, bool)>, _> =
        sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(pool)
            .await;
    let current = applied.is_ok_and(|applied| {
        applied.len() == wanted.len()
            && applied.iter().zip(&wanted).all(|((v, sum, ok), (want, want_sum))| *ok && v == want && sum == want_sum)
    });
    if !current {
        migrator.run(pool).await.context("cannot apply the metadata migrations")?;
    }
    Ok(())
}

/// Installs the admin token on first start and prints it once.
async fn bootstrap_admin(db: &Db, master: &MasterKey, given: Option<&str>) -> anyhow::Result<()> {
    if db.admin_key_exists().await? {
        if given.is_some() {
            tracing::warn!("NX_ADMIN_TOKEN is ignored: this receiver already has an admin token");
        }
        return Ok(());
    }
    let (token, generated) = match given {
        Some(t) => {
            let c = Credential::parse(t)
                .ok()
                .filter(Credential::is_admin)
                .context("NX_ADMIN_TOKEN must look like nxa_ followed by at least 32 letters and digits")?;
            (c, false)
        }
        None => (Credential::admin_token(&random_token(40)), true),
    };
    let mut tx = db.begin().await?;
    Db::insert_key(&mut tx, token.key_id(), None, "admin", &master.seal_str(token.expose_secret())).await?;
    tx.commit().await?;
    if generated {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "\nAdmin token (shown once; store it now, for example with `nx login`):\n\n    {}\n",
            token.expose_secret()
        )?;
        out.flush()?;
    }
    tracing::info!(generated, "admin token installed");
    Ok(())
}

/// Times the stages of a start, logged at debug level under the target
/// `nx_receiver::startup` (`RUST_LOG=info,nx_receiver::startup=debug`): where
/// a restart spends its time before the API answers (the restart benchmark
/// reads them).
#[derive(Debug, Clone, Copy)]
struct Stages {
    start: std::time::Instant,
    last: std::time::Instant,
}

impl Stages {
    fn new() -> Stages {
        let now = std::time::Instant::now();
        Stages { start: now, last: now }
    }

    /// Logs that `stage` is done: how long it took and when, since the start.
    fn done(&mut self, stage: &str) {
        let now = std::time::Instant::now();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        tracing::debug!(target: "nx_receiver::startup", stage, took_ms = ms(now - self.last), at_ms = ms(now - self.start), "start stage done");
        self.last = now;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot listen for SIGTERM and SIGINT");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

/// Runs the receiver until a shutdown signal.
pub async fn serve(mut config: ServeConfig) -> anyhow::Result<()> {
    let mut stages = Stages::new();
    anyhow::ensure!(
        nx_runtime::sys::effective_uid() == 0,
        "nx-receiver serve must run as root: it runs every app as its own unprivileged uid and the database as a system user"
    );
    // Connections (API, SSH, webhooks) each hold a descriptor: with the
    // usual soft limit of 1024 a client could leave none for starting
    // sandboxes. The listeners' caps keep them well under the hard limit.
    match nx_runtime::sys::raise_open_files() {
        Ok(hard) => tracing::debug!(limit = hard, "open-file limit raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    config.check_preview_domain().map_err(anyhow::Error::msg)?;
    config.check_wildcard_domains().map_err(anyhow::Error::msg)?;
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    config.data_dir = cwd.join(&config.data_dir);
    let data = config.data_dir.clone();
    if let Some((dir, mode)) = untraversable_ancestor(&data) {
        anyhow::bail!(
            "the data directory {} is out of reach of the unprivileged users that run PostgreSQL and the apps: {} has mode {mode:o}; choose another directory with --data-dir (for example /var/lib/nx-sandbox) or run chmod o+x {}",
            data.display(),
            dir.display(),
            dir.display()
        );
    }
    make_dir(&data, 0o711)?;
    // One receiver per data directory: a second would start every
    // deployment's sandbox again beside the first one's.
    let _lock = match lock_data_dir(&data)? {
        Some(lock) => lock,
        None => anyhow::bail!(
            "another nx-receiver runs on the data directory {}; stop it first (or give this one another --data-dir)",
            data.display()
        ),
    };
    for (sub, mode) in [
        ("secrets", 0o700),
        ("logs", 0o700),
        ("apps", 0o711),
        ("run", 0o711),
        ("router", 0o711),
        ("shims", 0o700),
        ("bin", 0o711),
    ] {
        make_dir(&data.join(sub), mode)?;
    }
    stages.done("data directory locked");
    // Bound first: a client that calls while the receiver starts (after a
    // restart or an upgrade) waits in the backlog instead of being refused.
    let api = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    stages.done("api listener bound");
    let config = Arc::new(config);
    let pm = ProcessManager::global().context("cannot start the process manager")?;
    let master = Arc::new(MasterKey::load_or_create(&data.join("secrets/master.key"))?);
    let pg_password = secret_file(&data.join("secrets/postgres-admin.password"), 40)?;

    let pg_log = Log::open(&data.join("logs/postgres.log"), LogLimits::default())?;
    stages.done("secrets read");
    let cluster = Arc::new(Cluster::start(&config.cluster(), &pm, &data, &pg_password, pg_log).await?);
    stages.done("postgres adopted or started");
    // PostgreSQL runs on after the receiver, as the apps do (they keep their
    // databases through a receiver restart); the next start adopts it.
    run(config.clone(), pm, master, cluster, api, stages).await
}

async fn run(
    config: Arc<ServeConfig>,
    pm: ProcessManager,
    master: Arc<MasterKey>,
    cluster: Arc<Cluster>,
    listener: tokio::net::TcpListener,
    mut stages: Stages,
) -> anyhow::Result<()> {
    let data = config.data_dir.clone();
    reserve_ports(&config, cluster.endpoint().port, listener.local_addr()?.port());
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let policy = match config.network_isolation {
        NetworkIsolation::Nftables => Some(network::Policy {
            uid_first: config.uid_base,
            db_port: cluster.endpoint().port,
            allow_egress: config.allow_egress.clone(),
            host_dns: config.allow_host_dns.then_some(network::nameservers(&host_resolv)),
        }),
        NetworkIsolation::Off => {
            tracing::warn!("network isolation is off: apps can reach every loopback port of this host");
            None
        }
    };
    // The network rules (an nft process) go in while the metadata database
    // is reached: neither waits for the other, and both are done before
    // anything is served.
    let install = async {
        match &policy {
            Some(p) => p.install(&pm).await,
            None => Ok(()),
        }
    };
    let metadata = async {
        let pool = cluster.metadata_pool().await?;
        stages.done("metadata pool connected");
        migrate(&pool).await?;
        stages.done("metadata migrations checked");
        anyhow::Ok(pool)
    };
    let (pool, installed) = tokio::join!(metadata, install);
    let pool = pool?;
    installed?;
    stages.done("network rules installed");
    let db = Db::new(pool);
    cluster.refill_spares();
    bootstrap_admin(&db, &master, config.admin_token.as_ref().map(|t| t.expose().as_str())).await?;
    stages.done("admin token checked");
    let store = ArtifactStore::open(config.store.as_deref(), &data)?.with_upload_limits(
        config.max_concurrent_uploads as usize,
        config.uploads_per_app() as usize,
        config.upload_timeout,
    );
    let swept = store.clean_temporary();
    if swept > 0 {
        tracing::info!(files = swept, "removed uploads left by an earlier crash");
    }
    // This receiver's API takes an upload's digest in its footer.
    let target = Arc::new(nx_protocol::target::ServerTarget {
        digest_in_footer: true,
        ..nx_verify::target::detect(Path::new("/"))
    });
    let arch = nx_runtime::seccomp::Arch::host()
        .context("this machine's architecture has no seccomp filter; NX Sandbox runs on x86-64 and arm64")?;
    let seccomp: Arc<[u8]> = nx_runtime::seccomp::to_bytes(&nx_runtime::seccomp::filter(arch)).into();
    let init = nx_runtime::spec::install_init(&data.join("bin"))
        .with_context(|| format!("cannot install the sandboxes' init in {}", data.join("bin").display()))?;
    let dev = match nx_runtime::root::install_dev(&data.join("bin")) {
        Ok(dev) => Some(dev),
        Err(e) => {
            tracing::warn!(error = %e, "sandboxes get bwrap's own /dev, which costs each start about 1 ms more");
            None
        }
    };
    let host = Arc::new(HostLayout::detect(Path::new("/"), init, dev));
    let network_report = policy.as_ref().map_or_else(network::not_enforced, network::Policy::enforcement);
    let resolv_conf = policy.as_ref().map_or(host_resolv.clone(), |p| p.resolv_conf(&host_resolv));
    let landlock = nx_runtime::landlock::Support::detect();
    tracing::info!(landlock = ?landlock, "port and abstract socket confinement");
    let cgroups = nx_runtime::cgroup::Driver::detect(&config.cgroup_root);
    // Parked sandboxes an earlier receiver left (they die with it; this
    // catches what did not) are ended before any are parked anew.
    let pool_dir = crate::deploy::pool_dir(&data);
    let cleaned = tokio::task::spawn_blocking(move || nx_runtime::pool::clean(&pool_dir)).await?;
    if cleaned > 0 {
        tracing::info!(slots = cleaned, "removed the parked sandboxes an earlier receiver left");
    }
    let pool = nx_runtime::pool::Pool::new(
        nx_runtime::pool::PoolConfig {
            size: config.sandbox_pool,
            dir: crate::deploy::pool_dir(&data),
            shim: config.shim(),
            cgroups: cgroups.clone(),
            group: config.cgroup_group(),
            proc_root: PathBuf::from("/proc"),
        },
        pm.clone(),
    );
    crate::counters::platform().count_starts(pool.clone());
    stages.done("store, seccomp filter, host layout");
    let databases = crate::databases::Databases::new(cluster.clone(), master.clone(), data.join("tmp"));
    let volumes = crate::volumes::Volumes::probe(pm.clone());
    tracing::info!(cgroups = ?cgroups, "resource limits");
    let control = RouterSettings::control_socket(&data.join("router"));
    let routes = Arc::new(RoutePublisher::new(
        db.clone(),
        master.clone(),
        control,
        config.domain.clone(),
        config.preview_domain().to_owned(),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Turns true on the signal to stop, before the API's grace: what streams
    // until the client goes away (log follows) ends then, so the stop need
    // not wait for it, and SFTP takes no new session.
    let (stopping_tx, stopping) = watch::channel(false);
    // The router's access lines, for log drains: a slow reader loses lines, never holds the router.
    let (access, _) = tokio::sync::broadcast::channel(ACCESS_FEED);
    let router = if config.no_router {
        // A router run on its own still writes its access lines into the
        // FIFO here when given it (deploy/systemd/nx-router.service).
        let dir = data.join("router");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log = Log::open(&data.join("logs/router.log"), LogLimits::default())?;
        crate::routing::read_access_log(&dir, log, access.clone())
            .with_context(|| format!("cannot read the router's access log in {}", dir.display()))?;
        None
    } else {
        let bin = match &config.router_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?.with_file_name("nx-router"),
        };
        let log = Log::open(&data.join("logs/router.log"), LogLimits::default())?;
        // The router an earlier receiver left serving, with its sockets.
        let running =
            crate::routing::find_running(&data.join("router"), config.router_listen, config.router_tls_listen).await?;
        let (mut http, mut tls_socket) = (None, None);
        let adopted = running.map(|r| {
            (http, tls_socket) = (r.http, r.tls);
            r.process
        });
        let bind = |taken: Option<std::net::TcpListener>, addr: std::net::SocketAddr, flag: &str| match taken {
            Some(socket) => Ok(Arc::new(socket)),
            None => std::net::TcpListener::bind(addr)
                .map(Arc::new)
                .with_context(|| format!("cannot listen on {addr} ({flag})")),
        };
        let socket = bind(http, config.router_listen, "--router-listen")?;
        let tls = match config.router_tls_listen {
            Some(addr) => Some(RouterTls {
                socket: bind(tls_socket, addr, "--router-tls-listen")?,
                addr,
                cert: config.router_tls_cert.clone().zip(config.router_tls_key.clone()),
                hsts_max_age: config.router_hsts_max_age,
            }),
            None => None,
        };
        crate::routing::prepare_router_user(&pm, &config.router_user, &data.join("router")).await?;
        let settings = RouterSettings {
            user: config.router_user.clone(),
            bin,
            listen: config.router_listen,
            socket,
            tls,
            dir: data.join("router"),
            log,
            shim: config.shim(),
            extra_args: config.router_args.clone(),
            access: access.clone(),
        };
        Some(Arc::new(RouterProcess::start(pm.clone(), settings, routes.clone(), adopted).await?))
    };
    stages.done("router adopted or started");
    if let Some(router) = &router {
        tokio::spawn(reload_on_sighup(router.clone(), stop_rx.clone()));
    }
    tokio::spawn(routes.clone().retry_loop(stop_rx.clone()));
    let events_days = u32::try_from(config.events_retention.as_secs().div_ceil(86_400).max(1)).unwrap_or(u32::MAX);
    tokio::spawn(expire_records(db.clone(), events_days, stop_rx.clone()));
    let watchdog = nx_cluster::watchdog::WatchdogSettings {
        interval: config.db_watchdog_interval,
        statement_timeout: config.db_statement_timeout,
        quota: config.db_quota,
    };
    let quotas = cluster.quota_states().clone();
    // Joined at shutdown: it holds the cluster, which stops only once no one does.
    let watchdog = tokio::spawn(nx_cluster::watchdog::run(cluster.clone(), watchdog, quotas, stop_rx.clone()));

    let github = crate::github::client::Client::from_config(&config, db.clone())?.map(Arc::new);
    let (reporter, reports) = match &github {
        Some(_) => {
            let (r, rx) = crate::deploy::events::Reporter::new();
            (r, Some(rx))
        }
        None => (crate::deploy::events::Reporter::off(), None),
    };
    let deployer = Arc::new(Deployer::new(Services {
        db: db.clone(),
        store: store.clone(),
        pm: pm.clone(),
        master: master.clone(),
        endpoint: cluster.endpoint().clone(),
        config: config.clone(),
        host,
        routes: routes.clone(),
        seccomp,
        databases: databases.clone(),
        cgroups,
        network: network_report,
        resolv_conf,
        landlock,
        volumes: volumes.clone(),
        reporter: reporter.clone(),
        target: target.clone(),
        shim: config.shim(),
        pool: pool.clone(),
    }));
    if let (Some(client), Some(rx)) = (&github, reports) {
        tokio::spawn(crate::github::report::run(rx, client.clone(), deployer.clone(), db.clone(), stop_rx.clone()));
        tracing::info!(api = %config.github_api, "reporting to GitHub");
    }
    let webhooks = config.github_webhook_secret.clone().map(|secret| {
        let (queue, rx) = tokio::sync::mpsc::channel(usize::from(config.github_webhook_queue));
        let worker = crate::github::webhook::Worker {
            deployer: deployer.clone(),
            db: db.clone(),
            reporter: reporter.clone(),
            client: github.clone(),
        };
        tokio::spawn(crate::github::webhook::work(rx, worker, stop_rx.clone()));
        let reading = crate::listeners::Gate::with_share(
            crate::github::webhook::READING_AT_ONCE,
            crate::github::webhook::READING_PER_ADDRESS,
        );
        crate::github::webhook::Webhooks { secret, queue, reading }
    });
    let sftp = if config.no_sftp {
        None
    } else {
        let key = crate::sftp::host_key(&data.join("secrets/ssh_host_ed25519_key"))?;
        let listener = tokio::net::TcpListener::bind(config.sftp_listen).await.with_context(|| {
            format!("cannot listen on {} (--sftp-listen; --no-sftp turns SFTP off)", config.sftp_listen)
        })?;
        Some((listener, key))
    };
    // Deployments are taken back (adopted, or started) while the API already
    // answers; what changes deployments (API writes, SFTP uploads, the
    // janitor) waits until that is done, so it never races the reconcile.
    let (reconciled_tx, reconciled) = watch::channel(false);
    let background = {
        let (deployer, db, store, routes, config, stop_rx, stopping) = (
            deployer.clone(),
            db.clone(),
            store.clone(),
            routes.clone(),
            config.clone(),
            stop_rx.clone(),
            stopping.clone(),
        );
        move |mut stages: Stages| async move {
            match deployer.reconcile().await {
                Ok(0) => {}
                Ok(count) => tracing::info!(count, "deployments restarted"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot take back the deployments; they start at the next receiver start")
                }
            }
            let _ = routes.publish().await;
            let _ = reconciled_tx.send(true);
            stages.done("deployments reconciled");
            tracing::info!("deployments reconciled");
            tokio::spawn(deployer.clone().janitor(stop_rx.clone()));
            // After the reconcile, so a wake never races the reconcile's
            // start of the same deployment.
            tokio::spawn(deployer.clone().sleeper(stop_rx.clone()));
            tokio::spawn(deployer.clone().waker(stop_rx.clone()));
            // Parking competes with the reconcile's starts for the CPU: after.
            tokio::spawn(pool.refill());
            if let Some((listener, key)) = sftp {
                let shared = crate::sftp::fs::Shared {
                    deployer: deployer.clone(),
                    db: db.clone(),
                    store: store.clone(),
                    max_upload: config.max_upload,
                    key_recheck: config.ssh_key_recheck,
                    handles: nx_store::shares::Shares::new(crate::sftp::fs::MAX_HANDLES),
                };
                tokio::spawn(crate::sftp::serve(
                    listener,
                    key,
                    shared,
                    crate::listeners::Gate::new(config.sftp_max_connections as usize),
                    config.sftp_auth_timeout,
                    stopping,
                    stop_rx,
                ));
            }
        }
    };

    let drains = crate::drains::Hub::new(
        db.clone(),
        master.clone(),
        crate::drains::Settings {
            buffer: usize::try_from(config.drain_buffer).unwrap_or(usize::MAX),
            buffer_bytes: usize::try_from(config.drain_buffer_mib << 20).unwrap_or(usize::MAX),
            reach: crate::drains::target::Reach {
                private: config.drain_allow_private,
                loopback: config.drain_allow_loopback,
            },
            extra_roots: match &config.drain_ca {
                Some(path) => {
                    Some(std::fs::read(path).with_context(|| format!("cannot read --drain-ca {}", path.display()))?)
                }
                None => None,
            },
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| config.domain.clone()),
            spool: data.join("drains"),
        },
    );
    let feed = router.as_ref().map(|_| access.subscribe());
    let drains_done = tokio::spawn(drains.clone().run(deployer.clone(), feed, stop_rx.clone()));
    let metrics = crate::metrics::Sources {
        db: db.clone(),
        deployer: deployer.clone(),
        routes: routes.clone(),
        data_dir: data.clone(),
        drains: drains.clone(),
    };
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
        let mut stop = stop_rx.clone();
        tokio::spawn(crate::listeners::serve_api(
            listener,
            crate::metrics::app(metrics.clone()),
            crate::listeners::Gate::new(METRICS_CONNECTIONS),
            config.api_header_timeout,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
            config.shutdown_grace,
        ));
    }
    let acme = crate::domains::acme::Acme::new(db.clone(), master.clone(), routes.clone(), config.clone());
    if let Some(acme) = &acme {
        tokio::spawn(acme.clone().run(stop_rx.clone()));
        tracing::info!(
            directory = config.acme_directory_url().unwrap_or_default(),
            "certificates of custom domains by ACME"
        );
    }
    let state = AppState {
        reconciled: reconciled.clone(),
        stopping,
        drains,
        metrics,
        routes: routes.clone(),
        acme,
        db,
        master,
        store,
        deployer: deployer.clone(),
        cluster,
        databases,
        router: router.clone(),
        config: config.clone(),
        target,
        started: std::time::Instant::now(),
        github: webhooks,
        github_client: github,
        oidc: Arc::new(crate::github::oidc::Verifier::new(
            &config.github_oidc_issuer,
            &config.oidc_audience(),
            config.github_oidc_refresh,
        )),
    };
    stages.done("services ready, api served");
    tokio::spawn(background(stages));
    tracing::info!(
        api = %config.listen,
        router = %config.router_listen,
        sftp = %if config.no_sftp { "off".to_owned() } else { config.sftp_listen.to_string() },
        metrics = %config.metrics_listen.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        domain = %config.domain,
        data = %data.display(),
        "nx-receiver ready"
    );
    let app = api::app(state).layer(axum::middleware::from_fn(move |req, next| {
        let reconciled = reconciled.clone();
        after_reconcile(reconciled, req, next)
    }));
    crate::listeners::serve_api(
        listener,
        app,
        crate::listeners::Gate::new(config.api_max_connections as usize),
        config.api_header_timeout,
        async move {
            shutdown_signal().await;
            let _ = stopping_tx.send(true);
        },
        config.shutdown_grace,
    )
    .await;

    let _ = stop_tx.send(true);
    let _ = watchdog.await;
    // The drains' queues are written down before the process ends.
    let _ = drains_done.await;
    // The apps run on, so their data volumes and network rules stay;
    // `nx-receiver stop-all` removes them with the apps.
    deployer.shutdown().await;
    // nx-router too serves on: the next receiver adopts it.
    if let Some(r) = router {
        r.let_go().await;
    }
    Ok(())
}

/// Lets reads through at once and holds every other request (deploys,
/// promotions, stops, webhooks) until the deployments are reconciled: a
/// change to a deployment the reconcile is still taking back would race it.
async fn after_reconcile(
    mut reconciled: watch::Receiver<bool>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
        let _ = reconciled.wait_for(|done| *done).await;
    }
    next.run(req).await
}

/// Connections the metrics listener serves at once: a few scrapers.
const METRICS_CONNECTIONS: usize = 16;

/// Access lines waiting for the drains' reader at most; beyond, the oldest are lost (counted).
const ACCESS_FEED: usize = 8192;

/// Holds the data directory's lock (`receiver.lock`) while it lives; `None`
/// when a running receiver holds it.
fn lock_data_dir(data: &Path) -> anyhow::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let path = data.join("receiver.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    nx_runtime::sys::try_lock(file).with_context(|| format!("cannot lock {}", path.display()))
}

/// `nx-receiver stop-all`: stops every sandbox a stopped receiver left
/// running on the data directory (through its shim; what a dead shim left
/// is killed by its cgroup), then unmounts the data volumes, removes the
/// network rules and the receiver's cgroup, and stops nx-router and the
/// embedded PostgreSQL. The deployments stay as they are recorded: the next
/// `serve` starts them again.
pub async fn stop_all(config: crate::config::StopAllConfig) -> anyhow::Result<()> {
    let data = std::env::current_dir().context("cannot read the working directory")?.join(&config.data_dir);
    anyhow::ensure!(data.is_dir(), "{} is not a data directory (give the receiver's --data-dir)", data.display());
    let _lock = lock_data_dir(&data)?.ok_or_else(|| {
        anyhow::anyhow!(
            "an nx-receiver runs on {}; stop it first (its apps keep running until stop-all)",
            data.display()
        )
    })?;
    let pm = ProcessManager::global().context("cannot start the process manager")?;
    let shims = crate::deploy::shims_dir(&data);
    let mut stopped = 0;
    for entry in std::fs::read_dir(&shims).into_iter().flatten().flatten() {
        if nx_runtime::shim::stop_dir(&entry.path(), config.stop_grace).await {
            stopped += 1;
        }
    }
    let pool_dir = crate::deploy::pool_dir(&data);
    let parked = tokio::task::spawn_blocking(move || nx_runtime::pool::clean(&pool_dir)).await?;
    if parked > 0 {
        println!("removed {parked} parked sandboxes");
    }
    crate::volumes::Volumes::probe(pm.clone()).unmount_all(&data.join("apps")).await;
    network::remove_table(&pm, config.uid_base).await;
    // The sandboxes' cgroups are gone; their parent goes too, or every
    // receiver that ever ran would leave one behind in each hierarchy.
    nx_runtime::cgroup::Driver::detect(&config.cgroup_root).remove_group(&crate::config::cgroup_group(config.uid_base));
    println!("stopped {stopped} sandboxes of {}", data.display());
    // Routing and the database go last: nothing of the apps needs them now.
    if let Some(pid) = crate::routing::stop_running(&data.join("router"), config.stop_grace).await? {
        println!("stopped nx-router (pid {pid})");
    }
    if let Some(pid) = nx_cluster::embedded::stop(&data.join("postgres")).await? {
        println!("stopped PostgreSQL (pid {pid})");
    }
    Ok(())
}

/// SIGHUP replaces nx-router without dropping a request (after an upgrade of
/// its binary, say).
async fn reload_on_sighup(router: Arc<RouterProcess>, mut stop: watch::Receiver<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: replacing nx-router");
                if let Err(e) = router.reload().await {
                    tracing::error!(error = %e, "nx-router was not replaced");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// Forgets nonces, webhook deliveries, GitHub events and audit events
/// (after `events_days`) past their retention: at start (a receiver stopped
/// for long prunes at once) and every minute.
async fn expire_records(db: Db, events_days: u32, mut stop: watch::Receiver<bool>) {
    loop {
        // Twice the clock window: a nonce older than that is refused by its
        // timestamp anyway.
        if let Err(e) = db.expire_nonces(2 * nx_protocol::auth::CLOCK_WINDOW_SECS).await {
            tracing::warn!(error = %e, "cannot expire nonces");
        }
        // GitHub offers redelivery for a few days at most.
        if let Err(e) = db.expire_deliveries(crate::github::webhook::DELIVERY_RETENTION_DAYS).await {
            tracing::warn!(error = %e, "cannot expire webhook deliveries");
        }
        if let Err(e) = db.expire_github_events(crate::github::webhook::EVENT_RETENTION_DAYS).await {
            tracing::warn!(error = %e, "cannot expire the GitHub events acted on");
        }
        if let Err(e) = db.expire_events(events_days).await {
            tracing::warn!(error = %e, "cannot expire audit events");
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Keeps the platform's ports from the kernel's automatic assignment
/// ([`crate::ports`]), before any sandbox is adopted or started: the
/// database's, the listeners' and the apps' range.
fn reserve_ports(config: &ServeConfig, db_port: u16, api_port: u16) {
    let ports = [
        Some(db_port),
        Some(api_port),
        Some(config.router_listen.port()),
        config.router_tls_listen.map(|a| a.port()),
        Some(config.sftp_listen.port()),
        config.metrics_listen.map(|a| a.port()),
    ];
    let mut wanted: Vec<_> = ports.into_iter().flatten().map(|p| p..=p).collect();
    wanted.push(config.port_range.clone());
    match crate::ports::reserve(Path::new("/proc/sys/net/ipv4"), &wanted) {
        Ok(added) if !added.is_empty() => {
            tracing::info!(ports = ?added, "platform ports kept from automatic assignment (ip_local_reserved_ports)");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "cannot reserve the platform's ports in ip_local_reserved_ports: an app that listens without binding first could be handed one"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_parent_is_found() {
        let root = std::env::temp_dir().join(format!("nx-traverse-{}", std::process::id()));
        let closed = root.join("closed");
        std::fs::create_dir_all(closed.join("inner")).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let (dir, mode) = untraversable_ancestor(&closed.join("inner/.nx")).unwrap();
        assert_eq!(dir, closed.join("inner").parent().unwrap());
        assert_eq!(mode, 0o700);
        assert!(untraversable_ancestor(&root.join("open/.nx")).is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
