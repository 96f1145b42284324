//! The proxy itself: pingora's `ProxyHttp` with host routing, forwarding
//! headers, request ids, hop-by-hop headers, error pages and a structured
//! access log.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use nx_protocol::routes::{normalize_host, Target};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::pages::Page;
use crate::table::{Entry, RouteStore};

/// Request id header, generated when the client sent none.
pub const REQUEST_ID: &str = "x-request-id";

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1).
/// `connection` and `upgrade` are left to pingora, which needs them to proxy
/// WebSocket upgrades.
const HOP_BY_HOP: [&str; 5] = ["keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te"];

/// The router's `ProxyHttp` implementation.
#[derive(Debug, Clone)]
pub struct Router {
    store: Arc<RouteStore>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Set once this process is handing over to a new one or shutting down:
    /// every response then says `Connection: close`, so clients leave
    /// cleanly after their current request instead of racing a closing socket.
    draining: Arc<AtomicBool>,
}

/// Per-request state.
#[derive(Debug, Default)]
pub struct Ctx {
    host: String,
    route: Option<Arc<Entry>>,
    upstream: Option<SocketAddr>,
    request_id: String,
    started: Option<Instant>,
}

impl Ctx {
    /// The app and deployment of the request's route, empty when none.
    fn names(&self) -> (&str, &str) {
        self.route.as_ref().map_or(("", ""), |e| (e.route.app.as_str(), e.route.deployment.as_str()))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Router {
    pub fn new(
        store: Arc<RouteStore>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        draining: Arc<AtomicBool>,
    ) -> Router {
        Router { store, connect_timeout, idle_timeout, draining }
    }

    fn close_if_draining(&self, session: &mut Session, resp: &mut ResponseHeader) -> pingora::Result<()> {
        if self.draining.load(Ordering::Relaxed) {
            session.set_keepalive(None);
            resp.insert_header(http::header::CONNECTION, "close")?;
        }
        Ok(())
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

async fn write_page(router: &Router, session: &mut Session, page: &Page, request_id: &str) -> pingora::Result<()> {
    let body = Bytes::from(page.html());
    let mut resp = ResponseHeader::build(page.status, Some(5))?;
    router.close_if_draining(session, &mut resp)?;
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
        let Some(entry) = self.store.lookup(&ctx.host) else {
            let page = Page::unknown_host(&ctx.host);
            write_page(self, session, &page, &ctx.request_id).await?;
            return Ok(true);
        };
        entry.touch(unix_now());
        let route = &entry.route;
        let page = match &route.target {
            Target::Live { addr } => {
                ctx.upstream = Some(*addr);
                ctx.route = Some(entry);
                return Ok(false);
            }
            Target::Starting => Page::starting(&route.app, &route.deployment),
            Target::Stopped { reason } => Page::stopped(&route.app, &route.deployment, reason.as_deref()),
            Target::Failed => Page::failed(&route.app, &route.deployment),
        };
        ctx.route = Some(entry.clone());
        write_page(self, session, &page, &ctx.request_id).await?;
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
        // Headers the client named in Connection are for this hop only; pingora
        // keeps Connection and Upgrade itself, which WebSocket needs.
        if upstream.headers.contains_key(http::header::CONNECTION) {
            let named: Vec<String> = upstream
                .headers
                .get_all(http::header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty() && t != "upgrade" && t != "keep-alive" && t != "close")
                .collect();
            for h in named {
                upstream.remove_header(h.as_str());
            }
        }
        let client_ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip().to_string());
        if let Some(ip) = client_ip {
            let forwarded_for = match upstream.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(prior) if !prior.is_empty() => format!("{prior}, {ip}"),
                _ => ip,
            };
            upstream.insert_header("x-forwarded-for", forwarded_for)?;
        }
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        upstream.insert_header("x-forwarded-proto", if tls { "https" } else { "http" })?;
        upstream.insert_header("x-forwarded-host", ctx.host.as_str())?;
        upstream.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        for h in HOP_BY_HOP {
            resp.remove_header(h);
        }
        resp.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        self.close_if_draining(session, resp)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &pingora::Error, ctx: &mut Ctx) -> FailToProxy {
        let upstream_fault = matches!(e.esource(), pingora::ErrorSource::Upstream)
            || matches!(e.etype(), pingora::ErrorType::ConnectRefused | pingora::ErrorType::ConnectTimedout);
        let code = if upstream_fault && session.response_written().is_none() {
            let (app, deployment) = ctx.names();
            let page = Page::upstream_down(app, deployment);
            if let Err(we) = write_page(self, session, &page, &ctx.request_id).await {
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
        let (app, deployment) = ctx.names();
        tracing::info!(
            target: "access",
            host = %ctx.host,
            method = %req.method,
            path = %req.uri.path(),
            status,
            app,
            deployment,
            upstream = ?ctx.upstream,
            request_id = %ctx.request_id,
            micros,
            error = e.map(|e| e.to_string()),
        );
    }
}
