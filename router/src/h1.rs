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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::protocols::http::v1::server::HttpSession as Downstream;
use pingora::protocols::Stream;
use tokio::sync::watch;

use crate::exchange::{Client, Decision, Exchange};
use crate::pool::{Conn, Pool};
use crate::table::RouteStore;

/// Seconds a client connection may idle between requests (pingora's default).
const CLIENT_IDLE_SECS: u64 = 60;

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
    pub fn new(store: Arc<RouteStore>, pool: Arc<Pool>, draining: Arc<AtomicBool>) -> H1 {
        H1 { store, pool, draining }
    }

    /// Serves one client connection until it closes, fails, or `shutdown`
    /// turns true while it waits for a request.
    pub async fn serve(&self, mut stream: Stream, client: Client, mut shutdown: watch::Receiver<bool>) {
        // Bytes of the next request the client sent before this answer
        // (HTTP/1.1 pipelining); they start the next request's header.
        let mut pipelined = None;
        loop {
            let mut down = Downstream::new(stream);
            down.set_server_keepalive(Some(CLIENT_IDLE_SECS));
            down.set_pipelining_enabled(true);
            if let Some(prefix) = pipelined.take() {
                down.set_pipelined_prefix(prefix);
            }
            let read = tokio::select! {
                biased;
                read = down.read_request() => read,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match read {
                Ok(Some(_)) => {}
                // The client closed its kept-alive connection.
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "unreadable request");
                    if matches!(e.etype(), pingora::ErrorType::InvalidHTTPHeader) {
                        if let Ok(resp) = refusal(400) {
                            let _ = down.write_response_header(resp).await;
                        }
                    }
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
        let (ex, decision) = Exchange::begin(&self.store, down.req_header());
        let draining = self.draining.load(Ordering::Relaxed);
        if draining {
            down.set_server_keepalive(None);
        }
        let result = match decision {
            Decision::Forward(addr) => self.forward(down, &ex, addr, client, draining).await,
            Decision::Answer(page) => write_page(down, &ex, &page, draining).await.map(|()| true),
        };
        let (reusable, error) = match result {
            Ok(reusable) => (reusable, None),
            Err(Failure::Upstream(e)) => {
                if down.response_written().is_none() {
                    // The connection closes after this page: the request's
                    // body may be half sent.
                    if let Err(we) = write_page(down, &ex, &ex.upstream_down(), true).await {
                        tracing::debug!(error = ?we, "could not write the error page");
                    }
                }
                (false, Some(e))
            }
            Err(Failure::Client(e)) => (false, Some(e)),
        };
        let status = down.response_written().map_or(0, |r| r.status.as_u16());
        ex.log(down.req_header(), status, error.map(|e| e.to_string()));
        reusable
    }

    /// The request header the upstream gets.
    fn upstream_request(
        down: &Downstream,
        ex: &Exchange,
        client: &Client,
        has_body: bool,
    ) -> Result<Box<RequestHeader>, Failure> {
        let mut req = Box::new(down.req_header().clone());
        // Rewritten before the version is raised: whether it is an upgrade
        // depends on the client's version.
        ex.rewrite_request(&mut req, client).map_err(Failure::Client)?;
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

    /// Proxies one request to `addr`; true when the client connection may
    /// carry another.
    async fn forward(
        &self,
        down: &mut Downstream,
        ex: &Exchange,
        addr: SocketAddr,
        client: &Client,
        draining: bool,
    ) -> Result<bool, Failure> {
        let has_body = !down.is_body_empty();
        let (mut conn, reused) = match self.pool.take(addr) {
            Some(conn) => (conn, true),
            None => (self.pool.connect(addr).await.map_err(Failure::Upstream)?, false),
        };
        let mut up = Upstream::new(conn.stream);
        let req = Self::upstream_request(down, ex, client, has_body)?;
        match send(down, &mut up, req, has_body).await {
            Ok(()) => {}
            // A kept-alive connection the app closed (just as it was taken,
            // or without the pool noticing): an idempotent request without a
            // body is sent again on a new connection; any other may have been
            // acted on, and gets the error page instead.
            Err(Failure::Upstream(e)) if reused && !has_body && down.req_header().method.is_idempotent() => {
                tracing::debug!(error = %e, upstream = %addr, "kept-alive upstream connection failed; retrying");
                let fresh = self.pool.connect(addr).await.map_err(Failure::Upstream)?;
                conn.fd = fresh.fd;
                up = Upstream::new(fresh.stream);
                let req = Self::upstream_request(down, ex, client, has_body)?;
                send(down, &mut up, req, has_body).await?;
            }
            Err(e) => return Err(e),
        }
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
        while let Some(chunk) = up.read_body_bytes().await.map_err(Failure::Upstream)? {
            down.write_body(&chunk).await.map_err(Failure::Client)?;
        }
        down.finish_body().await.map_err(Failure::Client)?;
        if let Some(stream) = up.reuse().await {
            self.pool.put(addr, Conn { fd: conn.fd, stream });
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

/// Sends the request (header and body) and reads the response header,
/// skipping interim 1xx answers other than 101.
async fn send(
    down: &mut Downstream,
    up: &mut Upstream,
    req: Box<RequestHeader>,
    has_body: bool,
) -> Result<(), Failure> {
    let continue_first = has_body && expects_continue(down.req_header());
    up.write_request_header(req).await.map_err(Failure::Upstream)?;
    if has_body {
        if continue_first {
            down.write_continue_response().await.map_err(Failure::Client)?;
        }
        while let Some(chunk) = down.read_body_bytes().await.map_err(Failure::Client)? {
            up.write_body(&chunk).await.map_err(Failure::Upstream)?;
        }
    }
    up.finish_body().await.map_err(Failure::Upstream)?;
    loop {
        up.read_response().await.map_err(Failure::Upstream)?;
        match up.get_status() {
            Some(s) if s.is_informational() && s != http::StatusCode::SWITCHING_PROTOCOLS => continue,
            _ => return Ok(()),
        }
    }
}

/// After a 101: bytes both ways as they come, until the app's side ends.
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
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let seen = counter.clone();
                tokio::spawn(async move {
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
                });
            }
        });
        (addr, seen)
    }

    /// An app that answers the first request on each connection with `reply`,
    /// as it is, and then closes the connection.
    async fn app_answering_once(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    if read_request(&mut s).await.is_some() {
                        let _ = s.write_all(reply).await;
                    }
                });
            }
        });
        addr
    }

    /// A router (HTTP/1 path only) routing app.localhost to `upstream`.
    async fn router(upstream: SocketAddr) -> (SocketAddr, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RouteStore::open(&dir.path().join("routes.json")).unwrap());
        let route = Route { app: "web".into(), deployment: "d1".into(), target: Target::Live { addr: upstream } };
        store.replace(RouteTable { generation: 1, routes: BTreeMap::from([("app.localhost".into(), route)]) }).unwrap();
        let pool = Arc::new(Pool::new(Duration::from_secs(2), Duration::from_secs(60)));
        let h1 = Arc::new(H1::new(store, pool, Arc::new(AtomicBool::new(false))));
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
        (addr, dir)
    }

    /// Reads one response (header and Content-Length body) as text.
    async fn read_response(s: &mut TcpStream) -> String {
        let (head, body) = tokio::time::timeout(Duration::from_secs(10), read_request(s))
            .await
            .expect("an answer in time")
            .expect("an answer before the connection closed");
        format!("{head}{}", String::from_utf8_lossy(&body))
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
}
