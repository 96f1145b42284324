//! pingora's `ProxyHttp` for the requests pingora's `HttpProxy` serves
//! (HTTP/2 over TLS; HTTP/1 goes through [`crate::h1`]), with the same
//! routing, headers, pages and access log as the HTTP/1 path
//! ([`crate::exchange`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::config::Limits;
use crate::exchange::{Client, Decision, Exchange};
use crate::pages::Page;
use crate::table::RouteStore;

/// The router's `ProxyHttp` implementation.
#[derive(Debug, Clone)]
pub struct Router {
    store: Arc<RouteStore>,
    limits: Limits,
    idle_timeout: Duration,
    /// Set once this process is handing over to a new one or shutting down:
    /// every response then says `Connection: close`, so clients leave
    /// cleanly after their current request instead of racing a closing socket.
    draining: Arc<AtomicBool>,
}

impl Router {
    pub fn new(store: Arc<RouteStore>, limits: Limits, idle_timeout: Duration, draining: Arc<AtomicBool>) -> Router {
        Router { store, limits, idle_timeout, draining }
    }

    /// Whether responses close their connections now; if so, the session's does.
    fn draining(&self, session: &mut Session) -> bool {
        let draining = self.draining.load(Ordering::Relaxed);
        if draining {
            session.set_keepalive(None);
        }
        draining
    }
}

async fn write_page(router: &Router, session: &mut Session, page: &Page, ex: &Exchange) -> pingora::Result<()> {
    let (head, body) = ex.page(page, router.draining(session))?;
    session.write_response_header(head, false).await?;
    session.write_response_body(Some(body), true).await
}

#[async_trait]
impl ProxyHttp for Router {
    /// Set once the request header is read.
    type CTX = Option<Exchange>;

    fn new_ctx(&self) -> Option<Exchange> {
        None
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Option<Exchange>) -> pingora::Result<bool> {
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let (ex, decision) = Exchange::begin(&self.store, session.req_header(), tls).await;
        let ex = ctx.insert(ex);
        match decision {
            Decision::Forward(_) => Ok(false),
            Decision::Answer(page) => {
                write_page(self, session, &page, ex).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Option<Exchange>,
    ) -> pingora::Result<Box<HttpPeer>> {
        let upstream = ctx
            .as_ref()
            .and_then(|ex| ex.upstream)
            .ok_or_else(|| pingora::Error::explain(pingora::ErrorType::InternalError, "no upstream chosen"))?;
        // A SocketAddr, never a host name: HttpPeer::new would resolve names with
        // blocking DNS. Peers are pooled by their hash, so a fresh peer per
        // request still reuses kept-alive connections.
        let mut peer = HttpPeer::new(upstream.addr, false, String::new());
        // pingora keeps connections per peer hash, which the group key is
        // part of: a port's next owner never gets its previous owner's.
        peer.group_key = upstream.owner;
        peer.options.connection_timeout = Some(self.limits.upstream_connect);
        peer.options.idle_timeout = Some(self.idle_timeout);
        // pingora bounds each read of the response, not its head alone: on
        // HTTP/2 the response timeout also ends a body the app leaves silent
        // for that long.
        peer.options.read_timeout = Some(self.limits.upstream_response);
        peer.options.write_timeout = Some(self.limits.upstream_response);
        Ok(Box::new(peer))
    }

    /// A replica that refused the connection is left out a while, and an
    /// idempotent request without a body goes once to another replica.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Option<Exchange>,
        mut e: Box<pingora::Error>,
    ) -> Box<pingora::Error> {
        if let Some(ex) = ctx {
            ex.unreachable();
            if session.req_header().method.is_idempotent() && session.is_body_empty() && ex.fail_over().is_some() {
                e.set_retry(true);
            }
        }
        e
    }

    /// pingora's own policy (idempotent requests, retried on a reused
    /// connection); a retry goes to another replica when the route has several.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<pingora::Error>,
        ctx: &mut Option<Exchange>,
        client_reused: bool,
    ) -> Box<pingora::Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        if let (true, Some(ex)) = (e.retry(), ctx) {
            ex.fail_over();
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Option<Exchange>,
    ) -> pingora::Result<()> {
        let client_ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        match ctx {
            Some(ex) => {
                *upstream = ex.upstream_request(upstream, &Client::new(client_ip, tls))?;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// pingora reads an HTTP/2 request body with no deadline (its h2
    /// session has no read timeout): a body still arriving after the request
    /// body timeout is cut at its next chunk with 408. (A client that sends
    /// nothing more waits for the app, whose response head is bounded.)
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Option<Exchange>,
    ) -> pingora::Result<()> {
        match ctx {
            Some(ex) if !end_of_stream && ex.started.elapsed() > self.limits.request_body => pingora::Error::e_explain(
                pingora::ErrorType::HTTPStatus(408),
                format!("request body not complete within {:?}", self.limits.request_body),
            ),
            _ => Ok(()),
        }
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Option<Exchange>,
    ) -> pingora::Result<()> {
        let draining = self.draining(session);
        match ctx {
            Some(ex) => ex.rewrite_response(resp, draining),
            None => Ok(()),
        }
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut Option<Exchange>,
    ) -> FailToProxy {
        let upstream_fault = matches!(e.esource(), pingora::ErrorSource::Upstream)
            || matches!(e.etype(), pingora::ErrorType::ConnectRefused | pingora::ErrorType::ConnectTimedout);
        let code = match ctx {
            Some(ex) if upstream_fault && session.response_written().is_none() => {
                let page = ex.upstream_failed(e);
                if let Err(we) = write_page(self, session, &page, ex).await {
                    tracing::debug!(error = %we, "could not write the error page");
                }
                page.status
            }
            _ if session.response_written().is_none() => {
                let code = match e.etype() {
                    pingora::ErrorType::HTTPStatus(c) => *c,
                    _ => 400,
                };
                let _ = session.respond_error(code).await;
                code
            }
            _ => 0,
        };
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, e: Option<&pingora::Error>, ctx: &mut Option<Exchange>) {
        if let Some(ex) = ctx {
            let status = session.response_written().map_or(0, |r| r.status.as_u16());
            let bytes = (session.body_bytes_read(), session.body_bytes_sent());
            ex.finish(session.req_header(), status, bytes, e.map(|e| e.to_string()));
        }
    }
}
