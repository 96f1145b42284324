//! The control channel: a small HTTP/1.1 server on a unix socket through which
//! the receiver publishes whole route tables.
//!
//! The socket is created mode 0600 inside a directory of mode 0700, so only the
//! receiver's user can reach it; sandboxes run as other uids and never see it.
//!
//! - `GET /health`: `ok`
//! - `GET /routes`: the current table as JSON
//! - `PUT /routes`: replace the table (409 when older than the current one)
//! - `GET /activity`: when each deployment was last requested
//! - `GET /traffic`: each deployment's requests, durations and bytes
//! - `GET /certificates`: the hosts with a certificate of the receiver's
//! - `GET /wakes`: the sleeping deployments requests wait for, as soon as
//!   there is one (a long poll of up to `WAKES_POLL_SECS`; see [`crate::wake`])
//!
//! While the router hands over to a successor ([`crate::upgrade`]) a table
//! change waits ([`Gate`]); once the successor serves, the old router answers
//! it 503, and the receiver publishes again, to the successor.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nx_protocol::metrics::CONTROL_TRAFFIC_PATH;
use nx_protocol::routes::{
    RouteTable, WakeRequests, CONTROL_ACTIVITY_PATH, CONTROL_CERTIFICATES_PATH, CONTROL_ROUTES_PATH,
    CONTROL_WAKES_PATH, WAKES_POLL_SECS,
};
use tokio::net::UnixListener;

use crate::table::{RouteStore, TableError};

/// Largest table accepted: far above any real table, well below memory trouble.
const MAX_TABLE_BYTES: usize = 64 << 20;

/// Binds the control socket, replacing a stale one. Returns a std listener so it
/// can be bound before any async runtime exists.
///
/// A missing directory is created private (0700). An existing one keeps its
/// mode: the socket's own mode (0600) is what guards it, and tightening a
/// shared directory such as /tmp would lock every other user out of it.
pub fn bind(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Holds table changes while the router hands over to a successor, which
/// reads the state file meanwhile; refuses them once it has.
#[derive(Debug, Default)]
pub struct Gate {
    changes: tokio::sync::RwLock<()>,
    handed_over: AtomicBool,
}

/// Table changes held: released when dropped.
#[derive(Debug)]
pub struct Held<'a> {
    gate: &'a Gate,
    _changes: tokio::sync::RwLockWriteGuard<'a, ()>,
}

impl Held<'_> {
    /// The successor serves: every table change from now on is refused.
    pub fn handed_over(self) {
        self.gate.handed_over.store(true, Ordering::SeqCst);
    }
}

impl Gate {
    /// Waits for the table change under way, if any, then holds the others.
    pub async fn hold(&self) -> Held<'_> {
        Held { gate: self, _changes: self.changes.write().await }
    }

    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::SeqCst)
    }
}

/// Serves the control channel until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    store: Arc<RouteStore>,
    gate: Arc<Gate>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let (store, gate) = (store.clone(), gate.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, store.clone(), gate.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
            {
                tracing::debug!(error = %e, "control connection ended with an error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn json(encoded: serde_json::Result<Vec<u8>>) -> Response<Full<Bytes>> {
    match encoded {
        Ok(json) => text(StatusCode::OK, json),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn handle(
    req: Request<Incoming>,
    store: Arc<RouteStore>,
    gate: Arc<Gate>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let response = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/health") => text(StatusCode::OK, "ok\n"),
        (Method::GET, p) if p == CONTROL_ROUTES_PATH => json(serde_json::to_vec(&*store.snapshot())),
        (Method::GET, p) if p == CONTROL_ACTIVITY_PATH => json(serde_json::to_vec(&store.activity())),
        (Method::GET, p) if p == CONTROL_TRAFFIC_PATH => match store.traffic() {
            Some(traffic) => json(serde_json::to_vec(&traffic)),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "this router counts no traffic: it was started with --traffic-counters false (a bench setting)\n",
            ),
        },
        (Method::GET, p) if p == CONTROL_CERTIFICATES_PATH => json(serde_json::to_vec(&store.certified_hosts())),
        (Method::GET, p) if p == CONTROL_WAKES_PATH => {
            let deployments = store.wakes().take(std::time::Duration::from_secs(WAKES_POLL_SECS)).await;
            json(serde_json::to_vec(&WakeRequests { deployments }))
        }
        (Method::PUT, p) if p == CONTROL_ROUTES_PATH => {
            let _change = gate.changes.read().await;
            if gate.is_handed_over() {
                return Ok(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this router has handed over to its successor; publish again\n",
                ));
            }
            let body = match Limited::new(req.into_body(), MAX_TABLE_BYTES).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(text(StatusCode::PAYLOAD_TOO_LARGE, format!("cannot read the table: {e}\n"))),
            };
            match serde_json::from_slice::<RouteTable>(&body) {
                Err(e) => text(StatusCode::BAD_REQUEST, format!("route table is not valid JSON: {e}\n")),
                Ok(table) => {
                    let generation = table.generation;
                    let hosts = table.routes.len();
                    match store.replace(table) {
                        Ok(()) => {
                            tracing::info!(generation, hosts, "route table replaced");
                            text(StatusCode::NO_CONTENT, "")
                        }
                        Err(e @ TableError::Stale { .. }) => text(StatusCode::CONFLICT, format!("{e}\n")),
                        Err(e) => {
                            tracing::error!(error = %e, "route table served but not saved; the receiver sends it again");
                            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
                        }
                    }
                }
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "unknown control path; use GET /health, GET /activity, GET /traffic, GET /wakes, GET or PUT /routes\n",
        ),
    };
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PUTs `table` on the control socket at `path`; the status and body.
    async fn put(path: &Path, table: &str) -> (u16, String) {
        ask(path, "PUT", CONTROL_ROUTES_PATH, table).await
    }

    /// Sends `method target` with `body` on the control socket at `path`; the status and body.
    async fn ask(path: &Path, method: &str, target: &str, body: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        let request = format!(
            "{method} {target} HTTP/1.1\r\nHost: nx-router\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        let status = answer[9..12].parse().unwrap();
        (status, answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
    }

    #[tokio::test]
    async fn table_changes_wait_during_a_handoff_and_are_refused_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let store = Arc::new(RouteStore::open(&dir.path().join("routes.json")).unwrap());
        let gate = Arc::new(Gate::default());
        let listener = UnixListener::from_std(bind(&socket).unwrap()).unwrap();
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(serve(listener, store.clone(), gate.clone(), stopped));

        // Held, then released without a successor: the change goes through.
        let held = gate.hold().await;
        let waiting = tokio::spawn({
            let socket = socket.clone();
            async move { put(&socket, r#"{"generation": 2, "routes": {}}"#).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "a change waits while the handoff runs");
        assert_eq!(store.snapshot().generation, 0);
        drop(held);
        assert_eq!(waiting.await.unwrap().0, 204);
        assert_eq!(store.snapshot().generation, 2);

        // Handed over: a change held meanwhile, and any later, gets 503.
        let held = gate.hold().await;
        let waiting = tokio::spawn({
            let socket = socket.clone();
            async move { put(&socket, r#"{"generation": 3, "routes": {}}"#).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        held.handed_over();
        let refused = (503, "this router has handed over to its successor; publish again\n".to_owned());
        assert_eq!(waiting.await.unwrap(), refused);
        assert_eq!(put(&socket, r#"{"generation": 4, "routes": {}}"#).await, refused);
        assert_eq!(store.snapshot().generation, 2, "the old router's table stays what the successor read");
    }

    #[tokio::test]
    async fn traffic_is_answered_while_it_is_counted_and_refused_when_counters_are_off() {
        let table = RouteTable {
            generation: 1,
            routes: [(
                "web.localhost".to_owned(),
                nx_protocol::routes::Route {
                    app: "web".into(),
                    deployment: "d1".into(),
                    target: nx_protocol::routes::Target::Live { addr: ([127, 0, 0, 1], 9).into() },
                },
            )]
            .into(),
            ..RouteTable::default()
        };
        for counting in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("control.sock");
            let mut store = RouteStore::open(&dir.path().join("routes.json")).unwrap();
            store.replace(table.clone()).unwrap();
            if !counting {
                store = store.without_traffic_counters();
            }
            let store = Arc::new(store);
            store.lookup("web.localhost").unwrap().traffic(Some(0)).record(200, 10, 0, 3);
            let listener = UnixListener::from_std(bind(&socket).unwrap()).unwrap();
            let (_stop, stopped) = tokio::sync::watch::channel(false);
            tokio::spawn(serve(listener, store, Arc::new(Gate::default()), stopped));
            let (status, body) = ask(&socket, "GET", CONTROL_TRAFFIC_PATH, "").await;
            if counting {
                assert_eq!(status, 200, "{body}");
                let traffic: nx_protocol::metrics::RouterTraffic = serde_json::from_str(&body).unwrap();
                assert_eq!(traffic.deployments["d1"].total(), 1);
                assert_eq!(traffic.replicas["d1"][&9].bytes_out, 3);
            } else {
                assert_eq!(
                    (status, body.as_str()),
                    (503, "this router counts no traffic: it was started with --traffic-counters false (a bench setting)\n")
                );
            }
        }
    }

    #[test]
    fn the_socket_is_private_and_an_existing_directory_keeps_its_mode() {
        let shared = tempfile::tempdir().unwrap();
        std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let socket = shared.path().join("control.sock");
        let _listener = bind(&socket).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(shared.path()), 0o1777, "a shared directory is left as it was");
        assert_eq!(mode(&socket), 0o600);

        let fresh = shared.path().join("router");
        let _listener = bind(&fresh.join("control.sock")).unwrap();
        assert_eq!(mode(&fresh), 0o700, "a directory the router creates is private");
    }
}
