//! Runs the router: the route table, the control channel, the accept loops on
//! a tokio runtime, and the signals. SIGTERM drains (stop accepting, close
//! every connection after its current request, exit when none is left);
//! SIGINT exits at once.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use pingora::server::configuration::ServerConf;

use crate::config::Config;
use crate::listener::{self, Connections, Source};
use crate::proxy::Router;
use crate::table::RouteStore;
use crate::{control, telemetry};

pub fn run(config: Config) -> anyhow::Result<()> {
    telemetry::init(&config.log_format);
    let threads = config.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let store = Arc::new(RouteStore::open(&config.state)?);
    tracing::info!(
        hosts = store.snapshot().routes.len(),
        generation = store.snapshot().generation,
        state = %config.state.display(),
        "route table restored"
    );
    let http_source = config.listen_fd.map_or(Source::Bind(config.listen), Source::Inherited);
    let http = http_source.open().with_context(|| format!("cannot listen on {} ({http_source:?})", config.listen))?;
    let tls = match (config.tls_listen, &config.tls_cert, &config.tls_key) {
        (Some(addr), Some(cert), Some(key)) => {
            let source = config.tls_listen_fd.map_or(Source::Bind(addr), Source::Inherited);
            let socket = source.open().with_context(|| format!("cannot listen on {addr} ({source:?})"))?;
            Some((socket, listener::tls_acceptor(cert, key)?, addr))
        }
        _ => None,
    };
    let control_listener = control::bind(&config.control)
        .with_context(|| format!("cannot bind the control socket {}", config.control.display()))?;

    let draining = Arc::new(AtomicBool::new(false));
    let router = Router::new(
        store.clone(),
        Duration::from_secs(config.connect_timeout_secs),
        Duration::from_secs(config.idle_timeout_secs),
        draining.clone(),
    );
    let conf = Arc::new(ServerConf::default());
    let proxy = Arc::new(pingora::proxy::http_proxy(&conf, router));
    let connections = Connections::new(draining);
    let (stop_accepting, stop_rx) = tokio::sync::watch::channel(false);
    let (stop_control, control_rx) = tokio::sync::watch::channel(false);

    let mut tasks =
        vec![tokio::spawn(listener::serve(http, None, proxy.clone(), connections.clone(), stop_rx.clone()))];
    if let Some((socket, acceptor, addr)) = tls {
        tracing::info!(listen = %addr, "HTTPS enabled (HTTP/2 and HTTP/1.1)");
        tasks.push(tokio::spawn(listener::serve(socket, Some(acceptor), proxy.clone(), connections.clone(), stop_rx)));
    }
    let control_listener = tokio::net::UnixListener::from_std(control_listener)?;
    let control = tokio::spawn(control::serve(control_listener, store, control_rx));
    tracing::info!(listen = %config.listen, control = %config.control.display(), "nx-router serving");

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut int = signal(SignalKind::interrupt())?;
    let graceful = tokio::select! {
        _ = term.recv() => true,
        _ = quit.recv() => true,
        _ = int.recv() => false,
    };
    let _ = stop_accepting.send(true);
    for t in tasks {
        let _ = t.await;
    }
    if graceful {
        tracing::info!(open = connections.open(), "draining: no new connections, every response closes its connection");
        connections.drain(Duration::from_secs(config.drain_timeout_secs)).await;
    }
    let _ = stop_control.send(true);
    let _ = control.await;
    tracing::info!("nx-router stopped");
    Ok(())
}
