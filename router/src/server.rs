//! Runs the router: the route table, the control channel, one single-threaded
//! runtime per worker with its own accept loops (no work stealing, so a
//! request stays on the thread that accepted it: measured faster than one
//! multi-threaded runtime), and the signals. SIGTERM drains (stop accepting,
//! close every connection after its current request, exit when none is left),
//! and so does a successor taking over ([`crate::upgrade`]); SIGINT exits at
//! once.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use pingora::listeners::tls::Acceptor;
use pingora::server::configuration::ServerConf;
use tokio::sync::watch;

use crate::certs::{self, CertStore};
use crate::config::{Config, Limits};
use crate::h1::H1;
use crate::listener::{self, Connections, Proxies, Source};
use crate::pool::Pool;
use crate::proxy::Router;
use crate::table::RouteStore;
use crate::{access, control, telemetry, upgrade};

/// The sockets of the router: the listening sockets every worker accepts on
/// (each worker registers its own copy of the descriptor with its own
/// runtime), the control socket and the upgrade socket. The main thread keeps
/// them until draining starts, to hand them to a successor.
struct Sockets {
    http: std::net::TcpListener,
    tls: Option<(std::net::TcpListener, Arc<Acceptor>, SocketAddr)>,
    control: std::os::unix::net::UnixListener,
    upgrade: std::os::unix::net::UnixListener,
    /// The certificates the HTTPS listener serves by SNI.
    certs: Arc<CertStore>,
}

/// The router this one replaces (with `--upgrade`) and its table's generation.
type Replacing = Option<(upgrade::Predecessor, u64)>;

/// Binds the sockets (or takes the receiver's inherited listening sockets),
/// or with `--upgrade` takes them all from the running router.
fn open_sockets(config: &Config) -> anyhow::Result<(Sockets, Replacing)> {
    // The operator's certificate is read now, before the router gives up
    // its user; the receiver's come later with the route tables.
    let fallback = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
            Some(certs::certified_key(&cert.display().to_string(), &read(cert)?, &read(key)?)?)
        }
        _ => None,
    };
    let certs = Arc::new(CertStore::new(fallback));
    if config.upgrade {
        let (taken, predecessor) = upgrade::take_over(&config.upgrade_socket(), config.tls_listen.is_some())?;
        let tls = match (taken.tls, config.tls_listen) {
            (Some(socket), Some(addr)) => Some((socket, listener::tls_acceptor(certs.clone()), addr)),
            _ => None,
        };
        let sockets = Sockets { http: taken.http, tls, control: taken.control, upgrade: taken.upgrade, certs };
        // The flag belongs to the socket, shared with the old router, which set it.
        sockets.http.set_nonblocking(true)?;
        if let Some((s, _, _)) = &sockets.tls {
            s.set_nonblocking(true)?;
        }
        sockets.control.set_nonblocking(true)?;
        sockets.upgrade.set_nonblocking(true)?;
        return Ok((sockets, Some((predecessor, taken.generation))));
    }
    let http_source = config.listen_fd.map_or(Source::Bind(config.listen), Source::Inherited);
    let http = http_source.open().with_context(|| format!("cannot listen on {} ({http_source:?})", config.listen))?;
    let tls = match config.tls_listen {
        Some(addr) => {
            let source = config.tls_listen_fd.map_or(Source::Bind(addr), Source::Inherited);
            let socket = source.open().with_context(|| format!("cannot listen on {addr} ({source:?})"))?;
            Some((socket, listener::tls_acceptor(certs.clone()), addr))
        }
        None => None,
    };
    let control = control::bind(&config.control)
        .with_context(|| format!("cannot bind the control socket {}", config.control.display()))?;
    let path = config.upgrade_socket();
    let upgrade = control::bind(&path).with_context(|| format!("cannot bind the upgrade socket {}", path.display()))?;
    Ok((Sockets { http, tls, control, upgrade, certs }, None))
}

/// Descriptors kept apart from connections: listeners, control socket,
/// state file, logs.
const SPARE_FILES: u64 = 64;

/// Raises the soft open-file limit to the hard one, so `max_connections`
/// connections fit: each a client descriptor and its app connections, one
/// for HTTP/1, up to `--h2-max-streams` for HTTP/2 (when HTTPS is on). Warns
/// when even the hard limit is too low, as accept then fails before the cap
/// is reached.
fn raise_open_files(limits: &Limits, https: bool) {
    let upstreams = if https { u64::from(limits.h2_max_streams.max(1)) } else { 1 };
    let needed = (1 + upstreams) * limits.max_connections as u64 + SPARE_FILES;
    let hard = match nx_runtime::sys::raise_open_files() {
        Ok(hard) => hard,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            return;
        }
    };
    if hard < needed {
        tracing::warn!(
            hard,
            needed,
            "the open-file limit is lower than --max-connections needs; lower --max-connections (or --h2-max-streams) or raise the limit"
        );
    }
}

/// How often each worker closes its expired or app-closed idle upstream connections.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// One worker: a single-threaded runtime running accept loops until `stop`.
///
/// Each worker has its own proxies and so its own upstream connection pools:
/// a connection then never moves between threads, and a request never waits
/// for another thread's wake-up. (Measured with pingora's pool: ~8% of
/// requests dialled anew with one shared pool, none with one pool per worker.)
fn worker(
    sockets: &Sockets,
    conf: &Arc<ServerConf>,
    router: Router,
    h1: H1Parts,
    connections: Arc<Connections>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let http = sockets.http.try_clone()?;
    let tls = match &sockets.tls {
        Some((s, acceptor, _)) => Some((s.try_clone()?, acceptor.clone())),
        None => None,
    };
    let pool = Arc::new(Pool::new(h1.limits.upstream_connect, h1.idle_timeout));
    let limits = h1.limits;
    let proxies = Proxies {
        h1: Arc::new(H1::new(h1.store, pool.clone(), h1.draining, h1.limits)),
        h2: Arc::new(crate::h2::proxy(conf, router, &limits)),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(std::thread::Builder::new().name("nx-router-worker".into()).spawn(move || {
        runtime.block_on(async move {
            // Dropped with the runtime when the worker ends.
            tokio::spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                loop {
                    every.tick().await;
                    pool.sweep();
                }
            });
            if let Some(log) = access::installed() {
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(access::FLUSH_EVERY);
                    loop {
                        every.tick().await;
                        log.flush();
                    }
                });
            }
            let mut loops = tokio::task::JoinSet::new();
            if let Ok(l) = tokio::net::TcpListener::from_std(http) {
                loops.spawn(listener::serve(l, None, limits, proxies.clone(), connections.clone(), stop.clone()));
            }
            if let Some((socket, acceptor)) = tls {
                if let Ok(l) = tokio::net::TcpListener::from_std(socket) {
                    loops.spawn(listener::serve(
                        l,
                        Some(acceptor),
                        limits,
                        proxies.clone(),
                        connections.clone(),
                        stop.clone(),
                    ));
                }
            }
            while loops.join_next().await.is_some() {}
            // Connections accepted here keep being served until they close.
            let mut done = connections.done();
            let _ = done.wait_for(|d| *d).await;
            if let Some(log) = access::installed() {
                log.flush();
            }
        });
    })?)
}

/// What each worker's HTTP/1 proxy is made from.
#[derive(Clone)]
struct H1Parts {
    store: Arc<RouteStore>,
    draining: Arc<AtomicBool>,
    limits: Limits,
    /// How long an idle pooled upstream connection is kept.
    idle_timeout: Duration,
}

pub fn run(config: Config) -> anyhow::Result<()> {
    telemetry::init(&config.log_format);
    let threads = config.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let (sockets, replacing) = open_sockets(&config)?;
    let limits = config.limits();
    raise_open_files(&limits, sockets.tls.is_some());
    let notifier = upgrade::Notifier::from_env();
    // Before any worker thread exists; the filter would reach them anyway.
    crate::confine::confine(config.user.as_deref())?;
    tracing::info!(user = config.user.as_deref().unwrap_or("(unchanged)"), "confined: no exec, seccomp filter on");
    // After confinement, so its thread runs under the filter like every other.
    if config.access_log {
        let out: Box<dyn std::io::Write + Send> = match config.access_log_fd {
            Some(fd) => Box::new(std::fs::File::from(
                nx_runtime::sys::inherited_fd(fd).with_context(|| format!("cannot take --access-log-fd {fd}"))?,
            )),
            None => Box::new(std::io::stdout()),
        };
        access::install(access::AccessLog::new(out, access::QUEUE)?);
    }
    let https_port = sockets.tls.as_ref().map(|(_, _, addr)| addr.port());
    let mut store =
        RouteStore::with_certs(&config.state, sockets.certs.clone(), https_port)?.with_hsts(config.hsts_max_age);
    if !config.traffic_counters {
        tracing::warn!("traffic counters off (--traffic-counters false): no metrics, nothing is put to sleep");
        store = store.without_traffic_counters();
    }
    let store = Arc::new(store);
    tracing::info!(
        hosts = store.snapshot().routes.len(),
        generation = store.snapshot().generation,
        state = %config.state.display(),
        "route table restored"
    );
    if let Some((_, theirs)) = &replacing {
        let ours = store.snapshot().generation;
        if ours < *theirs {
            return Err(upgrade::UpgradeError::StaleState { path: config.state.clone(), ours, theirs: *theirs }.into());
        }
    }

    let draining = Arc::new(AtomicBool::new(false));
    let h1 = H1Parts {
        store: store.clone(),
        draining: draining.clone(),
        limits,
        idle_timeout: Duration::from_secs(config.idle_timeout_secs),
    };
    let router = Router::new(store.clone(), limits, h1.idle_timeout, draining.clone());
    let conf = Arc::new(ServerConf::default());
    let connections = Connections::new(draining, limits.max_connections, limits.max_connections_per_ip);
    let (stop_accepting, stop_rx) = watch::channel(false);
    let workers = (0..threads)
        .map(|_| worker(&sockets, &conf, router.clone(), h1.clone(), connections.clone(), stop_rx.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some((_, _, addr)) = &sockets.tls {
        tracing::info!(listen = %addr, "HTTPS enabled (HTTP/2 and HTTP/1.1)");
    }
    let listen = sockets.http.local_addr()?;
    tracing::info!(%listen, control = %config.control.display(), threads, "nx-router serving");

    let main = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    main.block_on(async {
        let gate = Arc::new(control::Gate::default());
        let (stop_control, control_rx) = watch::channel(false);
        let control_listener = tokio::net::UnixListener::from_std(sockets.control.try_clone()?)?;
        let control = tokio::spawn(control::serve(control_listener, store.clone(), gate.clone(), control_rx));
        let upgrades = tokio::net::UnixListener::from_std(sockets.upgrade.try_clone()?)?;
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut quit = signal(SignalKind::quit())?;
        let mut int = signal(SignalKind::interrupt())?;
        match replacing {
            Some((predecessor, _)) => {
                // systemd follows this process from now on, before the old one exits.
                notifier.send(&format!("MAINPID={}\nREADY=1", std::process::id()));
                match predecessor.serving() {
                    Ok(()) => tracing::info!("took over from the running router, which now drains"),
                    // It died or gave up waiting: this one serves alone either way.
                    Err(e) => tracing::warn!(error = %e, "the router being replaced did not wait for this one"),
                }
            }
            None => notifier.send("READY=1"),
        }
        let graceful = loop {
            tokio::select! {
                _ = term.recv() => break true,
                _ = quit.recv() => break true,
                _ = int.recv() => break false,
                accepted = upgrades.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            tracing::warn!(error = %e, "upgrade socket accept failed");
                            continue;
                        }
                    };
                    let handing = upgrade::Handing {
                        http: sockets.http.as_fd(),
                        tls: sockets.tls.as_ref().map(|(s, _, _)| s.as_fd()),
                        control: sockets.control.as_fd(),
                        upgrade: sockets.upgrade.as_fd(),
                    };
                    tracing::info!("a successor asks for the sockets");
                    match upgrade::hand_over(stream, handing, &store, &gate).await {
                        Ok(()) => break true,
                        Err(e) => tracing::warn!(error = %e, "the successor did not take over; this router keeps serving"),
                    }
                }
            }
        };
        let _ = stop_accepting.send(true);
        // The successor accepts on the same control socket now.
        let handed_over = gate.is_handed_over();
        if handed_over {
            let _ = stop_control.send(true);
        }
        drop(upgrades);
        // Closed here unless a successor holds them: new connections are then refused, not left waiting.
        drop(sockets);
        if graceful {
            tracing::info!(
                open = connections.open(),
                handed_over,
                "draining: no new connections, every response closes its connection, HTTP/2 gets GOAWAY"
            );
            connections.drain(Duration::from_secs(config.drain_timeout_secs)).await;
        } else {
            connections.drain(Duration::ZERO).await;
        }
        let _ = stop_control.send(true);
        let _ = control.await;
        anyhow::Ok(())
    })?;
    for w in workers {
        let _ = w.join();
    }
    if let Some(log) = access::installed() {
        log.close();
    }
    tracing::info!("nx-router stopped");
    Ok(())
}
