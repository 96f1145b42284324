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

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use nx_protocol::metrics::CONTROL_TRAFFIC_PATH;
use nx_protocol::routes::{RouteTable, CONTROL_ACTIVITY_PATH, CONTROL_ROUTES_PATH};
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

/// Serves the control channel until `shutdown` turns true.
pub async fn serve(listener: UnixListener, store: Arc<RouteStore>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
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
        let store = store.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, store.clone()));
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
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let response = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/health") => text(StatusCode::OK, "ok\n"),
        (Method::GET, p) if p == CONTROL_ROUTES_PATH => json(serde_json::to_vec(&*store.snapshot())),
        (Method::GET, p) if p == CONTROL_ACTIVITY_PATH => json(serde_json::to_vec(&store.activity())),
        (Method::GET, p) if p == CONTROL_TRAFFIC_PATH => json(serde_json::to_vec(&store.traffic())),
        (Method::PUT, p) if p == CONTROL_ROUTES_PATH => {
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
                            tracing::error!(error = %e, "route table not saved");
                            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
                        }
                    }
                }
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "unknown control path; use GET /health, GET /activity, GET /traffic, GET or PUT /routes\n",
        ),
    };
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

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
