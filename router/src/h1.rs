//! The HTTP/1 proxy: one loop per client connection over pingora's HTTP/1
//! sessions (its parser, validation and body framing), with the upstream
//! connections of [`crate::pool`].
//!
//! pingora's `HttpProxy` serves HTTP/2 (see [`crate::proxy`]); HTTP/1, which
//! is nearly all traffic behind a CDN or on localhost, takes this shorter
//! path: per request, one task instead of three, no channel between the
//! client and upstream halves, and no watcher task for the released upstream
//! connection. On the router benchmark this path serves about 1.4 times the
//! requests/s pingora's proxy did for the same work (bench/RESULTS.md).
//!
//! A request's body is sent on before its response is read (as nginx, which
//! reads it all first); an upgrade (WebSocket) turns the connection into a
//! tunnel both ways; a response body is passed on as it comes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::protocols::http::v1::server::HttpSession as Downstream;
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Limits;
use crate::exchange::{Client, Decision, Exchange};
use crate::pool::{Conn, Pool};
use crate::table::RouteStore;

/// Bytes read at once while waiting for a request to start.
const START_READ: usize = 4096;

/// What a client whose request head is late gets before its connection closes.
const HEAD_TIMEOUT_ANSWER: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n";

/// Which side of the proxy a failure came from: an upstream failure before
/// the response started gets the "not answering" page; a client failure just
/// ends its connection.
#[derive(Debug)]
enum Failure {
    Upstream(Box<pingora::Error>),
    Client(Box<pingora::Error>),
}

/// The HTTP/1 side of one worker.
#[derive(Debug)]
pub struct H1 {
    store: Arc<RouteStore>,
    pool: Arc<Pool>,
    /// Set once the router drains: every response closes its connection.
    draining: Arc<AtomicBool>,
    limits: Limits,
}

/// A bodiless answer for a request the router refuses outright.
fn refusal(status: u16) -> pingora::Result<Box<ResponseHeader>> {
    let mut resp = ResponseHeader::build(status, Some(3))?;
    resp.insert_header(header::CONTENT_LENGTH, "0")?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    resp.insert_header(header::CONNECTION, "close")?;
    Ok(Box::new(resp))
}

fn expects_continue(req: &RequestHeader) -> bool {
    req.headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

impl H1 {
    pub fn new(store: Arc<RouteStore>, pool: Arc<Pool>, draining: Arc<AtomicBool>, limits: Limits) -> H1 {
        H1 { store, pool, draining, limits }
    }

    /// Serves one client connection until it closes, fails, or `shutdown`
    /// turns true while it waits for a request.
    ///
    /// Each request head must be complete within the head timeout: counted
    /// from the connection's start for the first request, from its first byte
    /// for a later one (which may first wait the idle timeout). pingora bounds
    /// each read of a head, not the whole: a client sending a byte now and
    /// then would hold its connection for ever.
    pub async fn serve(&self, mut stream: Stream, client: Client, mut shutdown: watch::Receiver<bool>) {
        // Bytes of the next request the client sent before this answer
        // (HTTP/1.1 pipelining), or its first bytes: they start the next
        // request's header.
        let mut pipelined: Option<BytesMut> = None;
        let mut head_due = Instant::now() + self.limits.request_head;
        let mut first = true;
        loop {
            if pipelined.is_none() {
                let wait = if first { head_due } else { Instant::now() + self.limits.client_idle };
                let mut start = BytesMut::with_capacity(START_READ);
                let read = tokio::select! {
                    biased;
                    read = tokio::time::timeout_at(wait, stream.read_buf(&mut start)) => read,
                    _ = shutdown.wait_for(|s| *s) => return,
                };
                // Closed, failed, or idle for too long: nothing was asked, so
                // nothing is answered.
                let Ok(Ok(1..)) = read else { return };
                pipelined = Some(start);
            }
            if !first {
                head_due = Instant::now() + self.limits.request_head;
            }
            first = false;
            let mut down = Downstream::new(stream);
            down.set_server_keepalive(Some(self.limits.client_idle.as_secs().max(1)));
            down.set_read_timeout(Some(self.limits.client_idle));
            down.set_write_timeout(Some(self.limits.client_idle));
            down.set_pipelining_enabled(true);
            if let Some(prefix) = pipelined.take() {
                down.set_pipelined_prefix(prefix);
            }
            let read = tokio::select! {
                biased;
                read = tokio::time::timeout_at(head_due, down.read_request()) => read,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match read {
                Ok(Ok(Some(_))) => {}
                // The client closed its kept-alive connection.
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "unreadable request");
                    if matches!(e.etype(), pingora::ErrorType::InvalidHTTPHeader) {
                        if let Ok(resp) = refusal(400) {
                            let _ = down.write_response_header(resp).await;
                        }
                    }
                    return;
                }
                Err(_) => {
                    tracing::debug!(timeout = ?self.limits.request_head, "request head not complete in time");
                    let mut stream = down.into_inner();
                    let _ = stream.write_all(HEAD_TIMEOUT_ANSWER).await;
                    let _ = stream.shutdown().await;
                    return;
                }
            }
            if down.req_header().method == http::Method::CONNECT {
                if let Ok(resp) = refusal(405) {
                    let _ = down.write_response_header(resp).await;
                }
                return;
            }
            if !self.exchange(&mut down, &client).await {
                down.shutdown().await;
                return;
            }
            match down.reuse().await {
                Ok(Some(next)) => (stream, pipelined) = next.into_parts(),
                _ => return,
            }
        }
    }

    /// Answers one request; true when the client connection may carry another.
    async fn exchange(&self, down: &mut Downstream, client: &Client) -> bool {
        let (mut ex, decision) = Exchange::begin(&self.store, down.req_header(), client.tls()).await;
        let draining = self.draining.load(Ordering::Relaxed);
        if draining {
            down.set_server_keepalive(None);
        }
        let result = match decision {
            Decision::Forward(_) => self.forward(down, &mut ex, client, draining).await,
            Decision::Answer(page) => write_page(down, &ex, &page, draining).await.map(|()| true),
        };
        let (reusable, error) = match result {
            Ok(reusable) => (reusable, None),
            Err(Failure::Upstream(e)) => {
                if down.response_written().is_none() {
                    // The connection closes after this page: the request's
                    // body may be half sent.
                    if let Err(we) = write_page(down, &ex, &ex.upstream_failed(&e), true).await {
                        tracing::debug!(error = ?we, "could not write the error page");
                    }
                }
                (false, Some(e))
            }
            Err(Failure::Client(e)) => {
                // A body too slow (in total or in one read): told so, as a
                // late head is, when nothing was answered yet.
                if down.response_written().is_none() && e.etype() == &pingora::ErrorType::ReadTimedout {
                    if let Ok(resp) = refusal(408) {
                        let _ = down.write_response_header(resp).await;
                    }
                }
                (false, Some(e))
            }
        };
        let status = down.response_written().map_or(0, |r| r.status.as_u16());
        let bytes = (down.body_bytes_read(), down.body_bytes_sent());
        ex.finish(down.req_header(), status, bytes, error.map(|e| e.to_string()));
        reusable
    }

    /// The request header the upstream gets.
    fn upstream_request(
        down: &Downstream,
        ex: &Exchange,
        client: &Client,
        has_body: bool,
    ) -> Result<Box<RequestHeader>, Failure> {
        // Built before the version is raised: whether it is an upgrade
        // depends on the client's version.
        let mut req = Box::new(ex.upstream_request(down.req_header(), client).map_err(Failure::Client)?);
        req.set_version(http::Version::HTTP_11);
        // The router answers `Expect: 100-continue` itself (below).
        req.remove_header(&header::EXPECT);
        if has_body
            && !req.headers.contains_key(header::CONTENT_LENGTH)
            && !req.headers.contains_key(header::TRANSFER_ENCODING)
        {
            req.insert_header(header::TRANSFER_ENCODING, "chunked").map_err(Failure::Client)?;
        }
        Ok(req)
    }

    /// Proxies one request to its upstream; true when the client connection
    /// may carry another.
    ///
    /// A request that cannot have been acted on (idempotent, without a body)
    /// is sent once more when its first try failed before any response
    /// byte: to another replica when the route has several (the first may
    /// have just died; one that refused the connection is left out a while),
    /// else, when it went over a kept-alive connection the app had closed
    /// (just as it was taken, or without the pool noticing), on a new
    /// connection. Any other request may have been acted on, and gets the
    /// error page instead. An app that took too long is not given a second wait.
    async fn forward(
        &self,
        down: &mut Downstream,
        ex: &mut Exchange,
        client: &Client,
        draining: bool,
    ) -> Result<bool, Failure> {
        let has_body = !down.is_body_empty();
        let resendable = !has_body && down.req_header().method.is_idempotent();
        let timeout = self.limits.upstream_response;
        let mut retried = false;
        let (upstream, fd, mut up) = loop {
            let upstream = ex.upstream.ok_or_else(|| {
                Failure::Upstream(pingora::Error::explain(pingora::ErrorType::InternalError, "no upstream chosen"))
            })?;
            // A retry takes a new connection: the pool may hold more the app closed.
            let pooled = if retried { None } else { self.pool.take(upstream) };
            let (conn, reused) = match pooled {
                Some(conn) => (conn, true),
                None => match self.pool.connect(upstream.addr).await {
                    Ok(conn) => (conn, false),
                    Err(e) => {
                        ex.unreachable();
                        if resendable && !retried && ex.fail_over().is_some() {
                            tracing::debug!(error = %e, upstream = %upstream.addr, "replica unreachable; retrying on another");
                            retried = true;
                            continue;
                        }
                        return Err(Failure::Upstream(e));
                    }
                },
            };
            let mut up = upstream_session(conn.stream, timeout);
            let req = Self::upstream_request(down, ex, client, has_body)?;
            match send(down, &mut up, req, has_body, &self.limits).await {
                Ok(()) => break (upstream, conn.fd, up),
                Err(Failure::Upstream(e))
                    if resendable && !retried && e.etype() != &pingora::ErrorType::ReadTimedout =>
                {
                    if ex.fail_over().is_none() && !reused {
                        return Err(Failure::Upstream(e));
                    }
                    tracing::debug!(error = %e, upstream = %upstream.addr, "upstream connection failed; retrying");
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        };
        up.respect_keepalive();
        let mut resp = Box::new(up.resp_header().cloned().ok_or_else(|| {
            Failure::Upstream(pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "no response header"))
        })?);
        if close_delimited(&resp, &down.req_header().method, up.is_body_done()) {
            // An HTTP/1.0-style body that ends when the app closes: passed on
            // chunked, so the client's connection outlives it.
            resp.set_version(http::Version::HTTP_11);
            resp.insert_header(header::TRANSFER_ENCODING, "chunked").map_err(Failure::Upstream)?;
        }
        ex.rewrite_response(&mut resp, draining).map_err(Failure::Upstream)?;
        let switching = resp.status == http::StatusCode::SWITCHING_PROTOCOLS;
        let unasked = || {
            Failure::Upstream(pingora::Error::explain(
                pingora::ErrorType::InvalidHTTPHeader,
                "101 Switching Protocols answering a request that asked for no upgrade",
            ))
        };
        if switching && !(up.was_upgraded() && down.is_upgrade_req()) {
            return Err(unasked());
        }
        down.write_response_header(resp).await.map_err(Failure::Client)?;
        if switching {
            if !down.was_upgraded() {
                return Err(unasked());
            }
            tunnel(down, &mut up).await?;
            return Ok(false);
        }
        // An app that starts a body and then goes silent would hold the
        // client's connection (and its descriptors) for ever.
        up.read_timeout = Some(timeout);
        while let Some(chunk) = up.read_body_bytes().await.map_err(Failure::Upstream)? {
            down.write_body(&chunk).await.map_err(Failure::Client)?;
        }
        down.finish_body().await.map_err(Failure::Client)?;
        if let Some(stream) = up.reuse().await {
            self.pool.put(upstream, Conn { fd, stream });
        }
        Ok(true)
    }
}

/// Whether a response's body is delimited by the app closing its connection:
/// one is expected (not HEAD, 1xx, 204 or 304, not already over) and neither
/// length nor chunking is given.
fn close_delimited(resp: &ResponseHeader, method: &http::Method, body_done: bool) -> bool {
    let no_body =
        method == http::Method::HEAD || resp.status.is_informational() || matches!(resp.status.as_u16(), 204 | 304);
    !no_body
        && !body_done
        && !resp.headers.contains_key(header::TRANSFER_ENCODING)
        && !resp.headers.contains_key(header::CONTENT_LENGTH)
}

/// An HTTP/1 session on an upstream connection whose every write is bounded
/// by `timeout` (an app that stops reading its request must not hold the
/// router's task for ever).
fn upstream_session(stream: Stream, timeout: Duration) -> Upstream {
    let mut up = Upstream::new(stream);
    up.write_timeout = Some(timeout);
    up
}

/// Sends the request (header and body) and reads the response header,
/// skipping interim 1xx answers other than 101. The whole body must arrive
/// within the request body timeout; the whole response header (interim
/// answers included) within the upstream response timeout of the request's end.
async fn send(
    down: &mut Downstream,
    up: &mut Upstream,
    req: Box<RequestHeader>,
    has_body: bool,
    limits: &Limits,
) -> Result<(), Failure> {
    let continue_first = has_body && expects_continue(down.req_header());
    up.write_request_header(req).await.map_err(Failure::Upstream)?;
    if has_body {
        let body_due = Instant::now() + limits.request_body;
        let body = async {
            if continue_first {
                down.write_continue_response().await.map_err(Failure::Client)?;
            }
            while let Some(chunk) = down.read_body_bytes().await.map_err(Failure::Client)? {
                up.write_body(&chunk).await.map_err(Failure::Upstream)?;
            }
            Ok(())
        };
        tokio::time::timeout_at(body_due, body).await.unwrap_or_else(|_| {
            Err(Failure::Client(pingora::Error::explain(
                pingora::ErrorType::ReadTimedout,
                format!("request body not complete within {:?}", limits.request_body),
            )))
        })?;
    }
    up.finish_body().await.map_err(Failure::Upstream)?;
    let timeout = limits.upstream_response;
    let head = async {
        loop {
            up.read_response().await.map_err(Failure::Upstream)?;
            match up.get_status() {
                Some(s) if s.is_informational() && s != http::StatusCode::SWITCHING_PROTOCOLS => continue,
                _ => return Ok(()),
            }
        }
    };
    tokio::time::timeout(timeout, head).await.unwrap_or_else(|_| {
        Err(Failure::Upstream(pingora::Error::explain(
            pingora::ErrorType::ReadTimedout,
            format!("no response header within {timeout:?}"),
        )))
    })
}

/// After a 101: bytes both ways as they come, until the app's side ends.
/// The client's end ends it too (pingora then closes the app's side), and so
/// does silence both ways for the client idle timeout: each wait for the
/// client is a read bounded by it, started anew whenever either side moves.
async fn tunnel(down: &mut Downstream, up: &mut Upstream) -> Result<(), Failure> {
    up.maybe_upgrade_body_writer();
    let mut client_open = true;
    loop {
        tokio::select! {
            got = down.read_body_bytes(), if client_open => match got.map_err(Failure::Client)? {
                Some(chunk) => {
                    up.write_body(&chunk).await.map_err(Failure::Upstream)?;
                }
                None => {
                    client_open = false;
                    up.finish_body().await.map_err(Failure::Upstream)?;
                }
            },
            got = up.read_body_bytes() => match got.map_err(Failure::Upstream)? {
                Some(chunk) => {
                    down.write_body(&chunk).await.map_err(Failure::Client)?;
                }
                None => {
                    down.finish_body().await.map_err(Failure::Client)?;
                    return Ok(());
                }
            },
        }
    }
}

/// Answers with one of the router's pages; `close` ends the connection after it.
async fn write_page(
    down: &mut Downstream,
    ex: &Exchange,
    page: &crate::pages::Page,
    close: bool,
) -> Result<(), Failure> {
    if close {
        down.set_server_keepalive(None);
    }
    let (head, body) = ex.page(page, close).map_err(Failure::Client)?;
    down.write_response_header(head).await.map_err(Failure::Client)?;
    down.write_body(&body).await.map_err(Failure::Client)?;
    down.finish_body().await.map_err(Failure::Client)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use nx_protocol::routes::{Route, RouteTable, Target};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Reads one request (header and Content-Length body) from `s`; None
    /// when the connection closed first.
    async fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: ").map(|v| v.trim().parse::<usize>().unwrap()))
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.ok()?;
        Some((head, body))
    }

    /// An app that answers the first `answers` requests on each connection
    /// with the request's header and body size, keeps the connection, and
    /// drops it unanswered when the next request arrives on it (as an app
    /// does whose idle timeout fires just as the request comes). Counts the
    /// requests seen.
    async fn app(answers: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let addr = serving(move |mut s| {
            let seen = counter.clone();
            async move {
                for _ in 0..answers {
                    let Some((head, body)) = read_request(&mut s).await else { return };
                    seen.fetch_add(1, Ordering::SeqCst);
                    let answer = format!("{head}body: {}\n", body.len());
                    let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}", answer.len());
                    s.write_all(reply.as_bytes()).await.unwrap();
                }
                if read_request(&mut s).await.is_some() {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .await;
        (addr, seen)
    }

    /// An app on a port of its own that hands every connection to `serve`.
    pub(crate) async fn serving<F, Fut>(serve: F) -> SocketAddr
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(s));
            }
        });
        addr
    }

    /// An app that answers the first request on each connection with `reply`,
    /// as it is, and then closes the connection.
    async fn app_answering_once(reply: &'static [u8]) -> SocketAddr {
        serving(move |mut s| async move {
            if read_request(&mut s).await.is_some() {
                let _ = s.write_all(reply).await;
            }
        })
        .await
    }

    /// Generous bounds: no test but those of the bounds reaches them.
    pub(crate) const LIMITS: Limits = Limits {
        tls_handshake: Duration::from_secs(10),
        request_head: Duration::from_secs(20),
        client_idle: Duration::from_secs(60),
        upstream_connect: Duration::from_secs(2),
        upstream_response: Duration::from_secs(60),
        request_body: Duration::from_secs(300),
        max_connections: 1024,
        max_connections_per_ip: 1024,
        h2_max_streams: 16,
    };

    /// A router (HTTP/1 path only) routing app.localhost to `upstream`.
    async fn router(upstream: SocketAddr) -> (SocketAddr, tempfile::TempDir) {
        router_with(LIMITS, &[("app.localhost", upstream)]).await
    }

    /// A router (HTTP/1 path only) with these bounds, routing each host to its
    /// upstream (deployment d1, d2, ... in order).
    async fn router_with(limits: Limits, hosts: &[(&str, SocketAddr)]) -> (SocketAddr, tempfile::TempDir) {
        let (addr, dir, _store) = router_and_routes(limits, hosts).await;
        (addr, dir)
    }

    /// [`router_with`], and the route store the test may replace tables in.
    async fn router_and_routes(
        limits: Limits,
        hosts: &[(&str, SocketAddr)],
    ) -> (SocketAddr, tempfile::TempDir, Arc<RouteStore>) {
        let routes = hosts
            .iter()
            .enumerate()
            .map(|(i, (host, upstream))| {
                let target = Target::Live { addr: *upstream };
                ((*host).to_owned(), Route { app: "web".into(), deployment: format!("d{}", i + 1), target })
            })
            .collect();
        router_routing(limits, routes).await
    }

    /// A router (HTTP/1 path only) serving `routes`, and its route store.
    async fn router_routing(
        limits: Limits,
        routes: std::collections::BTreeMap<String, Route>,
    ) -> (SocketAddr, tempfile::TempDir, Arc<RouteStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RouteStore::open(&dir.path().join("routes.json")).unwrap());
        store.replace(RouteTable { generation: 1, routes, ..Default::default() }).unwrap();
        let pool = Arc::new(Pool::new(limits.upstream_connect, Duration::from_secs(60)));
        let h1 = Arc::new(H1::new(store.clone(), pool, Arc::new(AtomicBool::new(false)), limits));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_keep, shutdown) = watch::channel(false);
        tokio::spawn(async move {
            let _keep = _keep;
            loop {
                let (tcp, peer) = listener.accept().await.unwrap();
                let (h1, shutdown) = (h1.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let stream = crate::buffered::Buffered::new(tcp);
                    h1.serve(Box::new(stream), Client::new(Some(peer.ip()), false), shutdown).await;
                });
            }
        });
        (addr, dir, store)
    }

    /// Reads one response (header and Content-Length body) as text.
    async fn read_response(s: &mut TcpStream) -> String {
        let (head, body) = tokio::time::timeout(Duration::from_secs(10), read_request(s))
            .await
            .expect("an answer in time")
            .expect("an answer before the connection closed");
        format!("{head}{}", String::from_utf8_lossy(&body))
    }

    /// A router routing app.localhost to replicas at `addrs` (deployment d1).
    async fn router_to_replicas(addrs: Vec<SocketAddr>) -> (SocketAddr, Arc<RouteStore>) {
        let route = Route { app: "web".into(), deployment: "d1".into(), target: Target::Replicas { addrs } };
        let (addr, dir, store) = router_routing(LIMITS, [("app.localhost".to_owned(), route)].into()).await;
        // The state file's directory outlives the test's requests.
        std::mem::forget(dir);
        (addr, store)
    }

    /// Deployment d1's requests by status class, and those open, on the
    /// replica at `addr`, once every request sent has been counted (a
    /// request is counted as its exchange ends, just after its answer).
    async fn counted_on(store: &RouteStore, addr: SocketAddr, sent: u64) -> ([u64; 6], u64) {
        for _ in 0..100 {
            let traffic = store.traffic().unwrap();
            if traffic.deployments["d1"].total() == sent && traffic.deployments["d1"].open == 0 {
                let t = traffic.replicas["d1"].get(&addr.port()).cloned().unwrap_or_default();
                return (t.requests, t.open);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("not all {sent} requests were counted: {:?}", store.traffic().unwrap());
    }

    /// Sends `request` on a new connection and reads the answer.
    async fn ask(router: SocketAddr, request: &[u8]) -> String {
        let mut client = TcpStream::connect(router).await.unwrap();
        client.write_all(request).await.unwrap();
        read_response(&mut client).await
    }

    #[tokio::test]
    async fn a_get_that_meets_a_refusing_or_dying_replica_is_answered_by_another() {
        let (live, served) = app(usize::MAX).await;
        let refusing = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        // Reads each request and closes its connection unanswered, as an app
        // killed while the request was in flight.
        let (dying, died) = app(0).await;
        for dead in [refusing, dying] {
            let (router, store) = router_to_replicas(vec![dead, live]).await;
            for i in 0..20 {
                let answer = ask(router, format!("GET /{i} HTTP/1.1\r\nHost: app.localhost\r\n\r\n").as_bytes()).await;
                assert!(answer.starts_with("http/1.1 200"), "request {i} to {dead}: {answer}");
                assert!(answer.contains(&format!("get /{i} http/1.1")), "{answer}");
            }
            // Each request is counted on the replica that answered it, and
            // one moved to another is open on neither once it is over.
            assert_eq!(counted_on(&store, live, 20).await, ([0, 0, 20, 0, 0, 0], 0));
            assert_eq!(counted_on(&store, dead, 20).await, ([0; 6], 0));
        }
        assert_eq!(served.load(Ordering::SeqCst), 40);
        assert!(died.load(Ordering::SeqCst) > 0, "the dying replica was tried (and its requests sent again)");
    }

    #[tokio::test]
    async fn a_post_that_a_replica_may_have_acted_on_is_never_sent_twice() {
        let (live, served) = app(usize::MAX).await;
        let (dying, died) = app(0).await;
        let (router, store) = router_to_replicas(vec![dying, live]).await;
        let mut failed = 0;
        for _ in 0..30 {
            let answer = ask(router, b"POST / HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 2\r\n\r\nhi").await;
            if answer.starts_with("http/1.1 502") {
                failed += 1;
            } else {
                assert!(answer.starts_with("http/1.1 200"), "{answer}");
            }
        }
        assert!(failed > 0, "p2c sends some requests to the dying replica");
        assert_eq!(died.load(Ordering::SeqCst), failed, "each POST the dying replica saw was answered 502, not resent");
        assert_eq!(served.load(Ordering::SeqCst), 30 - failed);
        let failed = failed as u64;
        assert_eq!(
            counted_on(&store, dying, 30).await,
            ([0, 0, 0, 0, 0, failed], 0),
            "the 502s on the replica that failed"
        );
        assert_eq!(counted_on(&store, live, 30).await, ([0, 0, 30 - failed, 0, 0, 0], 0));
    }

    /// A deployment that gives up its port keeps the connections it accepted
    /// (it can hand them to a process of its own that lives on); the next
    /// owner of the port must never get requests over them.
    #[tokio::test]
    async fn a_ports_next_owner_never_gets_requests_over_its_previous_owners_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap();
        let (addr, _dir, store) = router_and_routes(LIMITS, &[("app.localhost", port)]).await;
        let held = Arc::new(AtomicUsize::new(0));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
        let (mut kept, _) = listener.accept().await.unwrap();
        read_request(&mut kept).await.unwrap();
        kept.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nold").await.unwrap();
        assert!(read_response(&mut client).await.ends_with("old"));
        // The old owner stops listening but keeps the connection the router
        // pooled, answering whatever comes on it.
        drop(listener);
        let seen = held.clone();
        tokio::spawn(async move {
            while read_request(&mut kept).await.is_some() {
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = kept.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstolen").await;
            }
        });
        // The port goes to another deployment, under the same host.
        let victim = TcpListener::bind(port).await.unwrap();
        let route = Route { app: "web".into(), deployment: "d2".into(), target: Target::Live { addr: port } };
        store
            .replace(RouteTable {
                generation: 2,
                routes: [("app.localhost".to_owned(), route)].into(),
                ..Default::default()
            })
            .unwrap();
        client
            .write_all(b"GET /account HTTP/1.1\r\nHost: app.localhost\r\nCookie: session=secret\r\n\r\n")
            .await
            .unwrap();
        let (mut fresh, _) = tokio::time::timeout(Duration::from_secs(5), victim.accept()).await.unwrap().unwrap();
        let (head, _) = read_request(&mut fresh).await.unwrap();
        assert!(head.contains("cookie: session=secret"), "{head}");
        fresh.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew").await.unwrap();
        assert!(read_response(&mut client).await.ends_with("new"));
        assert_eq!(held.load(Ordering::SeqCst), 0, "the old owner's connection carried no request");
    }

    #[tokio::test]
    async fn a_request_on_a_connection_the_app_drops_is_sent_again_unless_it_has_a_body() {
        let (app, seen) = app(1).await;
        let (addr, _dir) = router(app).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        for _ in 0..3 {
            client.write_all(b"GET /x HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
            let answer = read_response(&mut client).await;
            assert!(answer.starts_with("http/1.1 200"), "{answer}");
            assert!(answer.contains("get /x http/1.1"), "{answer}");
        }
        // The first GET opened a connection; each later one was dropped on the
        // kept connection and answered on a new one.
        assert_eq!(seen.load(Ordering::SeqCst), 5);

        // A request that is not idempotent, or has a body, may have been acted
        // on: it is not sent twice.
        for (i, request) in [
            &b"POST /x HTTP/1.1\r\nHost: app.localhost\r\n\r\n"[..],
            b"PUT /x HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 5\r\n\r\nhello",
        ]
        .into_iter()
        .enumerate()
        {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(b"GET /x HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
            assert!(read_response(&mut client).await.starts_with("http/1.1 200"));
            let before = seen.load(Ordering::SeqCst);
            client.write_all(request).await.unwrap();
            let answer = read_response(&mut client).await;
            assert!(answer.starts_with("http/1.1 502"), "request {i}: {answer}");
            assert!(answer.contains("d1"), "the page names the deployment: {answer}");
            assert_eq!(seen.load(Ordering::SeqCst), before + 1, "request {i} was sent once");
        }
    }

    #[tokio::test]
    async fn expect_continue_is_answered_by_the_router_and_the_body_follows() {
        let (app, _) = app(1).await;
        let (addr, _dir) = router(app).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"PUT /up HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let mut interim = [0u8; 25];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut interim))
            .await
            .expect("100 Continue before the body is sent")
            .unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"hello").await.unwrap();
        let answer = read_response(&mut client).await;
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("body: 5"), "{answer}");
        assert!(!answer.contains("expect:"), "the app is not asked to continue again: {answer}");
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let (app, _) = app(usize::MAX).await;
        let (addr, _dir) = router(app).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(
                b"GET /one HTTP/1.1\r\nHost: app.localhost\r\n\r\n\
                  POST /two HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 3\r\n\r\nabc\
                  GET /three HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        for (path, body) in [("get /one", 0), ("post /two", 3), ("get /three", 0)] {
            let answer = read_response(&mut client).await;
            assert!(answer.starts_with("http/1.1 200"), "{answer}");
            assert!(answer.contains(path) && answer.contains(&format!("body: {body}")), "{path}: {answer}");
        }
    }

    #[tokio::test]
    async fn a_body_ended_by_the_app_closing_reaches_the_client_chunked_on_a_kept_connection() {
        let app = app_answering_once(b"HTTP/1.0 200 OK\r\n\r\nuntil close").await;
        let (addr, _dir) = router(app).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            client.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
            let mut answer = Vec::new();
            let mut chunk = [0u8; 4096];
            while !answer.ends_with(b"0\r\n\r\n") {
                let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
                    .await
                    .expect("the chunked body ends in time")
                    .unwrap();
                assert!(n > 0, "the router closed the client's connection: {}", String::from_utf8_lossy(&answer));
                answer.extend_from_slice(&chunk[..n]);
            }
            let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
            assert!(answer.starts_with("http/1.1 200"), "{answer}");
            assert!(answer.contains("transfer-encoding: chunked") && answer.contains("until close"), "{answer}");
        }
    }

    #[tokio::test]
    async fn a_switch_of_protocols_nobody_asked_for_is_not_passed_on() {
        let app = app_answering_once(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        .await;
        let (addr, _dir) = router(app).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        // Upgrade without Connection: upgrade, which is no upgrade request.
        client.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\nUpgrade: websocket\r\n\r\n").await.unwrap();
        let answer = read_response(&mut client).await;
        assert!(answer.starts_with("http/1.1 502"), "{answer}");
    }

    #[tokio::test]
    async fn malformed_requests_and_connect_are_refused() {
        let (app, seen) = app(1).await;
        let (addr, _dir) = router(app).await;
        for (request, status) in [
            (&b"GET / HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..], "400"),
            // The app must not see another host than the one the route was chosen by.
            (b"GET http://other.localhost/ HTTP/1.1\r\nHost: app.localhost\r\n\r\n", "400"),
            (b"CONNECT app.localhost:443 HTTP/1.1\r\nHost: app.localhost\r\n\r\n", "405"),
        ] {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(request).await.unwrap();
            let mut answer = String::new();
            tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut answer))
                .await
                .expect("the router answers and closes")
                .unwrap();
            assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer}");
        }
        assert_eq!(seen.load(Ordering::SeqCst), 0, "nothing reached the app");
    }

    /// An app that reads requests and never answers them.
    async fn silent_app() -> SocketAddr {
        serving(|mut s| async move {
            let _ = read_request(&mut s).await;
            // Holds the connection open, answering nothing.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        })
        .await
    }

    /// Asks `host` for / on a new connection while the router is busy with a
    /// hostile client: the answer must come at once.
    async fn served(addr: SocketAddr, host: &str) -> String {
        let started = Instant::now();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
        let answer = read_response(&mut client).await;
        assert!(started.elapsed() < Duration::from_millis(300), "served late: {:?}", started.elapsed());
        answer
    }

    #[tokio::test]
    async fn a_client_sending_its_head_a_byte_at_a_time_is_cut_at_the_head_deadline() {
        let (app, _) = app(usize::MAX).await;
        let deadline = Duration::from_millis(800);
        let (addr, _dir) = router_with(
            Limits { request_head: deadline, ..LIMITS },
            &[("app.localhost", app), ("other.localhost", app)],
        )
        .await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let (mut reader, mut writer) = slow.split();
        let head =
            b"GET / HTTP/1.1\r\nHost: app.localhost\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let drip = async {
            for byte in head {
                if writer.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("the whole head was sent: the router never cut the connection");
        };
        let mut answer = Vec::new();
        let cut = async {
            let _ = reader.read_to_end(&mut answer).await;
            started.elapsed()
        };
        // Another app is served meanwhile.
        let other = async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            served(addr, "other.localhost").await
        };
        let (elapsed, other) = tokio::select! {
            _ = drip => unreachable!(),
            both = async { tokio::join!(cut, other) } => both,
        };
        assert!(other.starts_with("http/1.1 200"), "{other}");
        assert!(other.contains("host: other.localhost"), "{other}");
        assert_eq!(String::from_utf8_lossy(&answer), String::from_utf8_lossy(HEAD_TIMEOUT_ANSWER));
        assert!(
            elapsed >= deadline && elapsed < deadline + Duration::from_millis(300),
            "closed after {elapsed:?}, deadline {deadline:?}"
        );
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_when_idle_and_then_gets_a_whole_head_deadline() {
        let (app, _) = app(usize::MAX).await;
        let idle = Duration::from_millis(600);
        let head_deadline = Duration::from_millis(400);
        let (addr, _dir) =
            router_with(Limits { client_idle: idle, request_head: head_deadline, ..LIMITS }, &[("app.localhost", app)])
                .await;
        // Idle longer than the head deadline (the wait for a next request is
        // not a head), then a whole request: served.
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
        assert!(read_response(&mut client).await.starts_with("http/1.1 200"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
        assert!(read_response(&mut client).await.starts_with("http/1.1 200"));
        // Idle past the idle timeout: closed without a word.
        let started = Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert_eq!(rest, b"", "an idle connection is closed without an answer");
        let elapsed = started.elapsed();
        assert!(
            elapsed >= idle - Duration::from_millis(50) && elapsed < idle + Duration::from_millis(300),
            "{elapsed:?}"
        );
        // A kept-alive request whose head starts but does not end in time: 408.
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
        assert!(read_response(&mut client).await.starts_with("http/1.1 200"));
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert_eq!(rest, HEAD_TIMEOUT_ANSWER);
        let elapsed = started.elapsed();
        assert!(elapsed < head_deadline + Duration::from_millis(300), "{elapsed:?}");
    }

    #[tokio::test]
    async fn an_app_that_never_answers_gets_a_504_at_the_response_timeout() {
        let (app, _) = app(usize::MAX).await;
        let silent = silent_app().await;
        let timeout = Duration::from_millis(700);
        let (addr, _dir) = router_with(
            Limits { upstream_response: timeout, ..LIMITS },
            &[("silent.localhost", silent), ("app.localhost", app)],
        )
        .await;
        let started = Instant::now();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET /slow HTTP/1.1\r\nHost: silent.localhost\r\n\r\n").await.unwrap();
        let other = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            served(addr, "app.localhost").await
        };
        let (answer, other) = tokio::join!(read_response(&mut client), other);
        let elapsed = started.elapsed();
        assert!(other.starts_with("http/1.1 200"), "{other}");
        assert!(answer.starts_with("http/1.1 504"), "{answer}");
        assert!(answer.contains("Deployment d1 of web did not answer in time"), "{answer}");
        assert!(elapsed >= timeout && elapsed < timeout + Duration::from_millis(300), "{elapsed:?}");
        // The page closes the connection (its request may be half done upstream).
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert_eq!(rest, b"");
    }

    /// The router's whole accept path (caps included) on a port of its own,
    /// routing app.localhost to `app`, with these bounds, over TLS with this
    /// acceptor if any.
    pub(crate) async fn listening(
        limits: Limits,
        app: SocketAddr,
        tls: Option<Arc<pingora::listeners::tls::Acceptor>>,
    ) -> (SocketAddr, Arc<crate::listener::Connections>, tempfile::TempDir, watch::Sender<bool>) {
        use crate::listener::{serve, Connections, Proxies};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RouteStore::open(&dir.path().join("routes.json")).unwrap());
        let route = Route { app: "web".into(), deployment: "d1".into(), target: Target::Live { addr: app } };
        store
            .replace(RouteTable {
                generation: 1,
                routes: [("app.localhost".into(), route)].into(),
                ..Default::default()
            })
            .unwrap();
        let draining = Arc::new(AtomicBool::new(false));
        let pool = Arc::new(Pool::new(limits.upstream_connect, Duration::from_secs(60)));
        let conf = Arc::new(pingora::server::configuration::ServerConf::default());
        let h2 = crate::proxy::Router::new(store.clone(), limits, Duration::from_secs(60), draining.clone());
        let proxies = Proxies {
            h1: Arc::new(H1::new(store, pool, draining.clone(), limits)),
            h2: Arc::new(crate::h2::proxy(&conf, h2, &limits)),
        };
        let connections = Connections::new(draining, limits.max_connections, limits.max_connections_per_ip);
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], listener.local_addr().unwrap().port()));
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(serve(listener, tls, limits, proxies, connections.clone(), stop));
        (addr, connections, dir, stop_tx)
    }

    /// Waits until the router counts `n` open connections.
    async fn until_open(connections: &crate::listener::Connections, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while connections.open() != n {
            assert!(Instant::now() < deadline, "{} connections open, not {n}", connections.open());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A new connection to `addr` from `from`: the router must close it at
    /// once, having read nothing and answered nothing.
    async fn refused_from(from: std::net::IpAddr, addr: SocketAddr) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let mut extra = socket.connect(addr).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut got))
            .await
            .expect("a connection beyond the cap is closed at once")
            .unwrap();
        assert_eq!(got, b"");
    }

    #[tokio::test]
    async fn beyond_the_connection_cap_new_connections_are_closed_and_open_ones_served() {
        let (app, _) = app(usize::MAX).await;
        let cap = 3;
        let (addr, connections, _dir, _stop) =
            listening(Limits { max_connections: cap, max_connections_per_ip: cap, ..LIMITS }, app, None).await;

        let mut held = Vec::new();
        for _ in 0..cap {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        until_open(&connections, cap).await;
        // Beyond the cap: closed at once, nothing read, nothing answered.
        for _ in 0..2 {
            refused_from([127, 0, 0, 1].into(), addr).await;
        }
        assert_eq!(connections.open(), cap);
        // The open ones are served, and keep being.
        for client in &mut held {
            client.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
            assert!(read_response(client).await.starts_with("http/1.1 200"));
        }
        // A closed one makes room for a new one.
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(5);
        while connections.open() >= cap {
            assert!(Instant::now() < deadline, "the closed connection is still counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(served(addr, "app.localhost").await.starts_with("http/1.1 200"));
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_and_another_address_is_still_served() {
        let (app, _) = app(usize::MAX).await;
        let share = 2;
        let (addr, connections, _dir, _stop) =
            listening(Limits { max_connections: 10, max_connections_per_ip: share, ..LIMITS }, app, None).await;
        let mut held = Vec::new();
        for _ in 0..share {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        until_open(&connections, share).await;
        // The third from 127.0.0.1 is closed at once, though the cap is far.
        refused_from([127, 0, 0, 1].into(), addr).await;
        assert_eq!(connections.open(), share);
        // Another address is served meanwhile, and so are the held ones.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
        let mut other = socket.connect(addr).await.unwrap();
        other.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
        let answer = read_response(&mut other).await;
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("x-forwarded-for: 127.0.0.2"), "{answer}");
        for client in &mut held {
            client.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
            assert!(read_response(client).await.starts_with("http/1.1 200"));
        }
        // One closed, 127.0.0.1 gets a place again.
        drop(held.pop());
        until_open(&connections, share).await;
        assert!(served(addr, "app.localhost").await.starts_with("http/1.1 200"));
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        use crate::listener::client_key;
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("2001:db8:1:2:ffff:1:2:3")), ip("2001:db8:1:2::"));
        assert_ne!(client_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_key(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[tokio::test]
    async fn a_request_body_sent_slowly_gets_408_at_the_body_deadline() {
        let (app, seen) = app(usize::MAX).await;
        let deadline = Duration::from_millis(800);
        let (addr, _dir) = router_with(Limits { request_body: deadline, ..LIMITS }, &[("app.localhost", app)]).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"POST /up HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 100\r\n\r\n").await.unwrap();
        let started = Instant::now();
        let (mut reader, mut writer) = slow.split();
        // A byte every 100 ms: each read is well within the idle timeout.
        let drip = async {
            for _ in 0..100 {
                if writer.write_all(b"x").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            std::future::pending::<()>().await;
        };
        let mut answer = Vec::new();
        let cut = async {
            let _ = reader.read_to_end(&mut answer).await;
            started.elapsed()
        };
        let elapsed = tokio::select! {
            () = drip => unreachable!(),
            elapsed = cut => elapsed,
        };
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{answer}");
        assert!(answer.contains("\r\nConnection: close\r\n") && answer.ends_with("\r\n\r\n"), "{answer}");
        assert!(elapsed >= deadline && elapsed < deadline + Duration::from_millis(300), "{elapsed:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 0, "the app never got a whole request");
    }

    #[tokio::test]
    async fn an_app_silent_in_the_middle_of_its_body_is_cut_at_the_response_timeout() {
        let app = serving(|mut s| async move {
            let _ = read_request(&mut s).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial").await;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        })
        .await;
        let timeout = Duration::from_millis(700);
        let (addr, _dir) =
            router_with(Limits { upstream_response: timeout, ..LIMITS }, &[("app.localhost", app)]).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await.unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("the router closes the connection")
            .unwrap();
        let elapsed = started.elapsed();
        let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(got.starts_with("http/1.1 200") && got.ends_with("\r\n\r\npartial"), "{got}");
        assert!(elapsed >= timeout && elapsed < timeout + Duration::from_millis(300), "{elapsed:?}");
    }

    #[tokio::test]
    async fn a_tunnel_idle_both_ways_is_closed_at_the_idle_timeout() {
        // Switches protocols, then never sends a byte nor closes.
        let app = serving(|mut s| async move {
            let _ = read_request(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                .await;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            std::future::pending::<()>().await;
        })
        .await;
        let idle = Duration::from_millis(700);
        let (addr, _dir) = router_with(Limits { client_idle: idle, ..LIMITS }, &[("app.localhost", app)]).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /ws HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 101");
        // Traffic keeps the tunnel: a byte every half idle timeout.
        for _ in 0..4 {
            tokio::time::sleep(idle / 2).await;
            client.write_all(b"x").await.unwrap();
        }
        // Both sides silent: closed at the idle timeout.
        let started = Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("the tunnel ends")
            .unwrap();
        let elapsed = started.elapsed();
        let rest = String::from_utf8_lossy(&rest).to_ascii_lowercase();
        assert!(rest.ends_with("\r\n\r\n"), "nothing after the 101's head: {rest}");
        assert!(
            elapsed >= idle - Duration::from_millis(50) && elapsed < idle + Duration::from_millis(300),
            "{elapsed:?}"
        );
    }
}
