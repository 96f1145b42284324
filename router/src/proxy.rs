//! The proxy itself: pingora's `ProxyHttp` with host routing, forwarding
//! headers, request ids, error pages and a structured access log; and [`run`],
//! which wires the proxy and the control channel into one pingora server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use nx_protocol::routes::{normalize_host, Target};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};

use crate::config::Config;
use crate::control;
use crate::pages::Page;
use crate::table::RouteStore;

/// Request id header, generated when the client sent none.
pub const REQUEST_ID: &str = "x-request-id";

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1).
/// `connection` and `upgrade` are left to pingora, which needs them to proxy
/// WebSocket upgrades.
const HOP_BY_HOP: [&str; 5] = ["keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te"];

/// The router's `ProxyHttp` implementation.
#[derive(Debug)]
pub struct Router {
    store: Arc<RouteStore>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

/// Per-request state.
#[derive(Debug, Default)]
pub struct Ctx {
    host: String,
    app: String,
    deployment: String,
    upstream: Option<SocketAddr>,
    request_id: String,
    started: Option<Instant>,
}

impl Router {
    pub fn new(store: Arc<RouteStore>, connect_timeout: Duration, idle_timeout: Duration) -> Router {
        Router { store, connect_timeout, idle_timeout }
    }
}

fn request_host(req: &RequestHeader) -> String {
    let raw = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.host())
        .unwrap_or_default();
    normalize_host(raw)
}

fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

async fn write_page(session: &mut Session, page: &Page, request_id: &str) -> pingora::Result<()> {
    let body = Bytes::from(page.html());
    let mut resp = ResponseHeader::build(page.status, Some(5))?;
    resp.insert_header(http::header::CONTENT_TYPE, "text/html; charset=utf-8")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    resp.insert_header(REQUEST_ID, request_id)?;
    if page.status == 503 {
        resp.insert_header(http::header::RETRY_AFTER, "2")?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

#[async_trait]
impl ProxyHttp for Router {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx { started: Some(Instant::now()), ..Ctx::default() }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        let req = session.req_header();
        ctx.host = request_host(req);
        ctx.request_id = req
            .headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(new_request_id);
        let Some(route) = self.store.lookup(&ctx.host) else {
            let page = Page::unknown_host(&ctx.host);
            write_page(session, &page, &ctx.request_id).await?;
            return Ok(true);
        };
        ctx.app = route.app;
        ctx.deployment = route.deployment;
        let page = match route.target {
            Target::Live { addr } => {
                ctx.upstream = Some(addr);
                return Ok(false);
            }
            Target::Starting => Page::starting(&ctx.app, &ctx.deployment),
            Target::Stopped => Page::stopped(&ctx.app, &ctx.deployment),
            Target::Failed => Page::failed(&ctx.app, &ctx.deployment),
        };
        write_page(session, &page, &ctx.request_id).await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> pingora::Result<Box<HttpPeer>> {
        let addr = ctx
            .upstream
            .ok_or_else(|| pingora::Error::explain(pingora::ErrorType::InternalError, "no upstream chosen"))?;
        // A SocketAddr, never a host name: HttpPeer::new would resolve names with
        // blocking DNS. Peers are pooled by their hash, so a fresh peer per
        // request still reuses kept-alive connections.
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.idle_timeout = Some(self.idle_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        for h in HOP_BY_HOP {
            upstream.remove_header(h);
        }
        let client_ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip().to_string());
        if let Some(ip) = client_ip {
            let forwarded_for = match upstream.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(prior) if !prior.is_empty() => format!("{prior}, {ip}"),
                _ => ip,
            };
            upstream.insert_header("x-forwarded-for", forwarded_for)?;
        }
        upstream.insert_header("x-forwarded-proto", "http")?;
        upstream.insert_header("x-forwarded-host", ctx.host.as_str())?;
        upstream.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        for h in HOP_BY_HOP {
            resp.remove_header(h);
        }
        resp.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &pingora::Error, ctx: &mut Ctx) -> FailToProxy {
        let upstream_fault = matches!(e.esource(), pingora::ErrorSource::Upstream)
            || matches!(e.etype(), pingora::ErrorType::ConnectRefused | pingora::ErrorType::ConnectTimedout);
        let code = if upstream_fault && session.response_written().is_none() {
            let page = Page::upstream_down(&ctx.app, &ctx.deployment);
            if let Err(we) = write_page(session, &page, &ctx.request_id).await {
                tracing::debug!(error = %we, "could not write the error page");
            }
            page.status
        } else if session.response_written().is_none() {
            let code = match e.etype() {
                pingora::ErrorType::HTTPStatus(c) => *c,
                _ => 400,
            };
            let _ = session.respond_error(code).await;
            code
        } else {
            0
        };
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, e: Option<&pingora::Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        let micros = ctx.started.map_or(0, |s| s.elapsed().as_micros() as u64);
        tracing::info!(
            target: "access",
            host = %ctx.host,
            method = %req.method,
            path = %req.uri.path(),
            status,
            app = %ctx.app,
            deployment = %ctx.deployment,
            upstream = ?ctx.upstream,
            request_id = %ctx.request_id,
            micros,
            error = e.map(|e| e.to_string()),
        );
    }
}

struct ControlService {
    store: Arc<RouteStore>,
    listener: std::sync::Mutex<Option<std::os::unix::net::UnixListener>>,
}

#[async_trait]
impl BackgroundService for ControlService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let Some(std_listener) = self.listener.lock().ok().and_then(|mut l| l.take()) else { return };
        match tokio::net::UnixListener::from_std(std_listener) {
            Ok(listener) => control::serve(listener, self.store.clone(), shutdown).await,
            Err(e) => tracing::error!(error = %e, "control socket unusable"),
        }
    }
}

/// Runs the router until SIGTERM (graceful), SIGINT (fast) or SIGQUIT (hand the
/// listening socket to a new router started with `--upgrade`).
pub fn run(config: Config) -> anyhow::Result<()> {
    crate::telemetry::init(&config.log_format);
    std::fs::create_dir_all(&config.run_dir)
        .with_context(|| format!("cannot create the run directory {}", config.run_dir.display()))?;
    let store = Arc::new(RouteStore::open(&config.state)?);
    tracing::info!(
        hosts = store.snapshot().routes.len(),
        generation = store.snapshot().generation,
        state = %config.state.display(),
        "route table restored"
    );
    // Bound before the server starts, so a receiver that sees the socket knows
    // the router is about to take tables.
    let listener = control::bind(&config.control)
        .with_context(|| format!("cannot bind the control socket {}", config.control.display()))?;

    let conf = ServerConf {
        pid_file: config.run_dir.join("router.pid").to_string_lossy().into_owned(),
        upgrade_sock: config.run_dir.join("upgrade.sock").to_string_lossy().into_owned(),
        threads: config.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let opt = Opt { upgrade: config.upgrade, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let router = Router::new(
        store.clone(),
        Duration::from_secs(config.connect_timeout_secs),
        Duration::from_secs(config.idle_timeout_secs),
    );
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, router);
    proxy.add_tcp(&config.listen.to_string());
    server.add_service(proxy);
    let control = ControlService { store, listener: std::sync::Mutex::new(Some(listener)) };
    server.add_service(background_service("control", control));
    tracing::info!(listen = %config.listen, control = %config.control.display(), "nx-router serving");
    server.run(RunArgs::default());
    Ok(())
}
