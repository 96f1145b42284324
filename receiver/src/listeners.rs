//! The receiver's own listeners (the HTTP API and the SSH server) and the
//! bounds they share: a cap on connections open at once and a share of it
//! per client address (IPv6 counted by its /64, see
//! [`nx_runtime::net::client_key`]; loopback is not exempt). A connection
//! beyond either is closed at once, before a byte is read, so one client
//! can neither use up the process's descriptors nor lock other clients out.
//!
//! The API's connections are served by hyper directly (not `axum::serve`,
//! which sets no timer): a request head must arrive whole within
//! `--api-header-timeout`, counted from the moment the connection is ready
//! for it (its accept, or the end of the previous response, so it is also
//! the keep-alive idle timeout); bodies have their own deadlines where they
//! are read (JSON: `--api-body-timeout`, uploads: `--upload-timeout`,
//! webhooks: their minimum rate).
//!
//! A request answered before its body was read to the end (refused on its
//! head: a wrong key, an unknown app, no room for the push) has the rest of
//! its body read and dropped before the answer goes out, unless the answer
//! is a 408 (a body cut for being too slow). Otherwise hyper answers and
//! closes on unread data, the kernel resets the connection, and a client
//! still sending gets a broken pipe instead of the answer that says what to
//! fix (seen as `nx` retrying a refused push and failing with "cannot reach
//! the receiver"). The read-on is bounded like nginx's lingering close.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use nx_store::shares::{Share, Shares};

/// The connections one client address may hold: an eighth of the cap, at
/// least 16 (so a few clients behind one NAT are not starved), never more
/// than the cap.
pub fn share_per_client(max: usize) -> usize {
    (max / 8).max(16).min(max)
}

/// How long the unread rest of an answered request's body is read on at
/// most: enough for a client on a slow link to finish sending a binary of a
/// few tens of megabytes.
const READ_ON_FOR: Duration = Duration::from_secs(30);

/// How long that reading on waits for the next bytes before it gives up.
const READ_ON_IDLE: Duration = Duration::from_secs(5);

/// The connections a listener serves at once, in all and per client.
#[derive(Debug, Clone)]
pub struct Gate {
    open: Arc<Semaphore>,
    per_client: Shares<IpAddr>,
    /// The second a refusal was last logged: one line per second at most,
    /// whatever the flood.
    refusal_logged: Arc<AtomicU64>,
}

/// A connection's place, given back when it is dropped with the connection.
#[derive(Debug)]
pub struct Admitted {
    _open: OwnedSemaphorePermit,
    _client: Share<IpAddr>,
}

impl Gate {
    /// At most `max` connections, [`share_per_client`] of them per client.
    pub fn new(max: usize) -> Gate {
        Gate::with_share(max, share_per_client(max))
    }

    /// At most `max` places, `per_client` of them per client.
    pub fn with_share(max: usize, per_client: usize) -> Gate {
        Gate {
            open: Arc::new(Semaphore::new(max)),
            per_client: Shares::new(per_client),
            refusal_logged: Arc::default(),
        }
    }

    /// A place for `peer`, or `None` when the listener or that client holds
    /// all it may.
    pub fn admit(&self, peer: IpAddr) -> Option<Admitted> {
        let client = self.per_client.take(nx_runtime::net::client_key(peer))?;
        let open = self.open.clone().try_acquire_owned().ok()?;
        Some(Admitted { _open: open, _client: client })
    }

    fn log_refusal(&self, listener: &str, peer: SocketAddr) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        if self.refusal_logged.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(
                listener,
                %peer,
                per_client = self.per_client.cap(),
                "connection refused: the listener or this client holds all the connections it may"
            );
        }
    }
}

/// The next connection on `listener` that `gate` admits; the others are
/// closed as they come. Accept errors (out of descriptors, say) are waited
/// out, never fatal.
pub async fn accept(listener: &TcpListener, gate: &Gate, name: &str) -> (TcpStream, SocketAddr, Admitted) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match gate.admit(peer.ip()) {
                Some(admitted) => return (stream, peer, admitted),
                None => gate.log_refusal(name, peer),
            },
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then stops accepting, lets
/// requests in flight finish and closes idle connections (as
/// `axum::serve`'s graceful shutdown does). Handlers see the peer as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve_api(
    listener: TcpListener,
    app: axum::Router,
    gate: Gate,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    // Turns true when the listener stops: reading on ends then, so a stop
    // never waits on a refused client's upload.
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer, admitted) = tokio::select! {
            next = accept(&listener, &gate, "api") => next,
            () = &mut shutdown => break,
        };
        let app = TowerToHyperService::new(app.clone());
        let closed = closed.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let closed = closed.clone();
            let (mut parts, body) = req.into_parts();
            parts.extensions.insert(ConnectInfo(peer));
            let body = Shared::new(body);
            let answered = hyper::service::Service::call(&app, hyper::Request::from_parts(parts, body.clone()));
            async move {
                let response = answered.await?;
                if response.status() != axum::http::StatusCode::REQUEST_TIMEOUT {
                    body.read_on(closed).await;
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "API connection ended");
            }
            drop(admitted);
        });
        // Those that ended are forgotten as new ones come.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing.send(true);
    // The requests in flight finish, within `grace`: an upload over a slow
    // link may take --upload-timeout, and a stop must not. Those still open
    // then are cut here, their handlers dropped as a client's going away
    // drops them, before the caller goes on to stop what they use.
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs_f64(),
            connections = connections.len(),
            "API connections still open when the shutdown grace ended are cut"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// A request's body, held by the handler and by the connection that reads
/// on what the handler left (see the module's documentation).
#[derive(Debug, Clone)]
struct Shared(Arc<Mutex<Incoming>>);

impl Shared {
    fn new(body: Incoming) -> Shared {
        Shared(Arc::new(Mutex::new(body)))
    }

    /// The body; held only for one poll, never across an await.
    fn lock(&self) -> MutexGuard<'_, Incoming> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads and drops what is left of the body, no more than its declared
    /// length (hyper enforces it), for at most [`READ_ON_FOR`], giving up
    /// after [`READ_ON_IDLE`] without a byte, at the first error, or when
    /// `closed` turns true (the listener stops).
    async fn read_on(mut self, mut closed: tokio::sync::watch::Receiver<bool>) {
        if self.lock().is_end_stream() {
            return;
        }
        let rest = async { while let Ok(Some(Ok(_))) = tokio::time::timeout(READ_ON_IDLE, self.frame()).await {} };
        tokio::select! {
            _ = tokio::time::timeout(READ_ON_FOR, rest) => {}
            _ = closed.wait_for(|c| *c) => {}
        }
    }
}

impl Body for Shared {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut *self.lock()).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.lock().is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.lock().size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_an_eighth_of_the_cap_but_at_least_sixteen() {
        assert_eq!(share_per_client(512), 64);
        assert_eq!(share_per_client(64), 16);
        assert_eq!(share_per_client(4), 4);
    }

    #[test]
    fn a_client_beyond_its_share_is_refused_and_others_are_not() {
        let gate = Gate::new(20);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..16).map(|_| gate.admit(a).expect("within a's share")).collect();
        assert!(gate.admit(a).is_none(), "a holds its share");
        let others: Vec<_> = (0..4).map(|_| gate.admit(b).expect("b is not held back by a")).collect();
        assert!(gate.admit(b).is_none(), "the cap is reached");
        drop(held);
        assert!(gate.admit(a).is_some(), "a's closed connections gave their places back");
        drop(others);
    }

    /// Serves `app` on a port of loopback until the sender returned is used
    /// (or dropped), with a shutdown `grace`; its address, and the serving task.
    async fn served_until_stopped(
        app: axum::Router,
        grace: Duration,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async {
            let _ = stopped.await;
        };
        let server = tokio::spawn(serve_api(listener, app, Gate::new(64), Duration::from_secs(5), stopped, grace));
        (addr, stop, server)
    }

    /// Serves `app` on a port of loopback; its address.
    async fn served(app: axum::Router) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        tokio::spawn(serve_api(
            listener,
            app,
            Gate::new(64),
            Duration::from_secs(5),
            std::future::pending(),
            Duration::from_secs(30),
        ));
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_before_the_body_is_read_reaches_a_client_still_sending() {
        // Refused on the head alone, as a wrong key or a missing app is,
        // after a lookup; the body, larger than any socket buffer, is still
        // being streamed (as `nx` streams a binary) when the answer is ready.
        let refuse = || async { (axum::http::StatusCode::FORBIDDEN, "this key may not push to web\n") };
        let addr = served(axum::Router::new().route("/push", axum::routing::post(refuse))).await;
        let client = reqwest::Client::new();
        for attempt in 0..100 {
            let chunks = futures_util::stream::iter((0..128).map(|_| Ok::<_, std::io::Error>(vec![7u8; 256 << 10])));
            let sent = client
                .post(format!("http://{addr}/push"))
                .header("content-length", 128 * (256 << 10))
                .body(reqwest::Body::wrap_stream(chunks))
                .send()
                .await;
            let answer = sent.unwrap_or_else(|e| panic!("attempt {attempt}: the refusal was lost: {e:?}"));
            assert_eq!(answer.status(), 403);
            assert_eq!(answer.text().await.expect("the refusal's text"), "this key may not push to web\n");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_does_not_wait_for_a_refused_body_that_stalls() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let refuse = || async { (axum::http::StatusCode::UNAUTHORIZED, "no key\n") };
        let app = axum::Router::new().route("/push", axum::routing::post(refuse));
        let (addr, stop, server) = served_until_stopped(app, Duration::from_secs(30)).await;
        // A body announced as 1 MiB of which 10 bytes come, then nothing: the
        // read-on waits for more (up to 5 s idle) before the answer.
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n0123456789")
            .await
            .expect("send the head");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let asked = std::time::Instant::now();
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("the listener stopped without waiting out the read-on")
            .expect("the listener's task");
        assert!(asked.elapsed() < Duration::from_secs(3));
        // The client still gets its answer.
        let mut answer = String::new();
        let _ = client.read_to_string(&mut answer).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_cuts_a_request_still_open_when_the_grace_ends() {
        let (entered, mut handler_entered) = tokio::sync::mpsc::channel::<()>(1);
        // A handler that never answers, as an upload over a stalled link.
        let app = axum::Router::new().route(
            "/stuck",
            axum::routing::get(move || async move {
                let _ = entered.send(()).await;
                std::future::pending::<&'static str>().await
            }),
        );
        let grace = Duration::from_millis(500);
        let (addr, stop, server) = served_until_stopped(app, grace).await;
        let request = tokio::spawn(reqwest::get(format!("http://{addr}/stuck")));
        handler_entered.recv().await.expect("the handler runs");
        let asked = std::time::Instant::now();
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the listener stopped once the grace ended")
            .expect("the listener's task");
        let took = asked.elapsed();
        assert!(took >= grace && took < grace + Duration::from_secs(2), "stopped after {took:?}");
        // Cut, not left running: the client's connection is closed.
        let answer = tokio::time::timeout(Duration::from_secs(2), request)
            .await
            .expect("the cut request ended at the stop")
            .expect("the client's task");
        assert!(answer.is_err(), "the stuck request was answered: {answer:?}");
    }
}
