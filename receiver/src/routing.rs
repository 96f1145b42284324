//! The receiver's side of routing: it computes the whole route table from the
//! metadata database, publishes it to nx-router over the control socket, and runs
//! nx-router as a supervised child.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nx_protocol::api::DeploymentState;
use nx_protocol::names::{preview_host, production_host, AppName, DeploymentId};
use nx_protocol::routes::{Route, RouteTable, Target, CONTROL_ROUTES_PATH};
use nx_runtime::process::{Command, ProcessManager, Stream};
use nx_runtime::Log;
use tokio::sync::{watch, Mutex};

use crate::db::{Db, DeploymentRow};

/// Why a table did not reach the router.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read deployments: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot reach nx-router at {path}: {reason}")]
    Unreachable { path: PathBuf, reason: String },
    #[error("nx-router refused the table: {status} {body}")]
    Refused { status: u16, body: String },
}

/// What a deployment in `state` is served as.
fn target_of(state: DeploymentState, port: u16) -> Target {
    match state {
        DeploymentState::Healthy => Target::Live { addr: ([127, 0, 0, 1], port).into() },
        DeploymentState::Pending | DeploymentState::Starting => Target::Starting,
        DeploymentState::Failed => Target::Failed,
        DeploymentState::Stopped => Target::Stopped,
    }
}

/// The table for `rows`: one preview host per deployment, and the production
/// host of each app pointing where its production deployment points.
pub fn build_table(rows: &[DeploymentRow], domain: &str, generation: u64) -> RouteTable {
    let mut table = RouteTable { generation, ..RouteTable::default() };
    for row in rows {
        let (Ok(app), Ok(id)) = (AppName::parse(&row.app_name), DeploymentId::parse(&row.id)) else { continue };
        let route = Route {
            app: row.app_name.clone(),
            deployment: row.id.clone(),
            target: target_of(row.state(), row.port as u16),
        };
        if row.is_production {
            table.routes.insert(production_host(&app, domain), route.clone());
        }
        table.routes.insert(preview_host(&id, &app, domain), route);
    }
    table
}

/// Publishes route tables; serialises publishers so tables arrive in order.
#[derive(Debug)]
pub struct RoutePublisher {
    db: Db,
    control: PathBuf,
    domain: String,
    /// The last generation sent; tables only move forward.
    generation: Mutex<u64>,
    /// Set when the last publish failed, so the retry loop tries again.
    dirty: std::sync::atomic::AtomicBool,
}

impl RoutePublisher {
    pub fn new(db: Db, control: PathBuf, domain: String) -> RoutePublisher {
        RoutePublisher { db, control, domain, generation: Mutex::new(0), dirty: false.into() }
    }

    pub fn control_socket(&self) -> &Path {
        &self.control
    }

    /// Computes the table from the database and sends it; returns once the
    /// router has it, so a caller may rely on the new routes afterwards.
    pub async fn publish(&self) -> Result<(), PublishError> {
        let mut generation = self.generation.lock().await;
        let result = self.publish_locked(&mut generation).await;
        self.dirty.store(result.is_err(), std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = &result {
            tracing::warn!(error = %e, "route table not published; retrying in the background");
        }
        result
    }

    async fn publish_locked(&self, generation: &mut u64) -> Result<(), PublishError> {
        let rows = self.db.routed_deployments().await?;
        // Microseconds since the epoch move forward across receiver restarts.
        let now = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
        *generation = (*generation + 1).max(now);
        let table = build_table(&rows, &self.domain, *generation);
        match self.send(&table).await {
            Err(PublishError::Refused { status: 409, .. }) => {
                // The router holds a newer table (our clock went back): continue
                // from its generation.
                let theirs = self.current_generation().await?;
                *generation = theirs + 1;
                let table = build_table(&rows, &self.domain, *generation);
                self.send(&table).await
            }
            other => other,
        }
    }

    async fn request(&self, method: &str, body: Bytes) -> Result<(u16, Bytes), PublishError> {
        let unreachable = |reason: String| PublishError::Unreachable { path: self.control.clone(), reason };
        let stream = tokio::net::UnixStream::connect(&self.control).await.map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(CONTROL_ROUTES_PATH)
            .header(http::header::HOST, "nx-router")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .map_err(|_| unreachable("no answer within 10s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| unreachable(e.to_string()))?.to_bytes();
        Ok((status, body))
    }

    async fn send(&self, table: &RouteTable) -> Result<(), PublishError> {
        let json = serde_json::to_vec(table).map_err(|e| PublishError::Refused { status: 0, body: e.to_string() })?;
        let (status, body) = self.request("PUT", Bytes::from(json)).await?;
        if (200..300).contains(&status) {
            tracing::debug!(generation = table.generation, hosts = table.routes.len(), "route table published");
            Ok(())
        } else {
            Err(PublishError::Refused { status, body: String::from_utf8_lossy(&body).trim().to_owned() })
        }
    }

    async fn current_generation(&self) -> Result<u64, PublishError> {
        let (status, body) = self.request("GET", Bytes::new()).await?;
        let table: RouteTable =
            serde_json::from_slice(&body).map_err(|e| PublishError::Refused { status, body: e.to_string() })?;
        Ok(table.generation)
    }

    /// Republishes whenever the last attempt failed, until `shutdown` turns true.
    pub async fn retry_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            if self.dirty.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = self.publish().await;
            }
        }
    }
}

/// Settings of the supervised router.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub bin: PathBuf,
    pub listen: std::net::SocketAddr,
    pub dir: PathBuf,
    pub log: Log,
}

impl RouterSettings {
    pub fn control_socket(dir: &Path) -> PathBuf {
        dir.join("control.sock")
    }
}

/// nx-router as a child: restarted when it exits, stopped with the receiver.
#[derive(Debug)]
pub struct RouterProcess {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RouterProcess {
    /// Starts the router and waits until its control socket answers.
    pub async fn start(
        pm: ProcessManager,
        settings: RouterSettings,
        publisher: Arc<RoutePublisher>,
    ) -> anyhow::Result<RouterProcess> {
        anyhow::ensure!(
            settings.bin.is_file(),
            "nx-router not found at {}; build it (`cargo build --release`) or pass --router-bin, or run it yourself with --no-router",
            settings.bin.display()
        );
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, mut ready_rx) = watch::channel(None::<Result<(), String>>);
        let task = tokio::spawn(supervise(pm, settings, publisher, stop_rx, ready_tx));
        let ready = ready_rx.wait_for(Option::is_some).await.map(|r| r.clone());
        match ready {
            Ok(Some(Ok(()))) => Ok(RouterProcess { stop, task }),
            Ok(Some(Err(e))) => Err(anyhow::anyhow!(e)),
            _ => Err(anyhow::anyhow!("nx-router supervisor ended before the router was ready")),
        }
    }

    /// SIGTERM (pingora's graceful shutdown) and wait.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn supervise(
    pm: ProcessManager,
    s: RouterSettings,
    publisher: Arc<RoutePublisher>,
    mut stop: watch::Receiver<bool>,
    ready: watch::Sender<Option<Result<(), String>>>,
) {
    let mut failures = 0u32;
    loop {
        let mut cmd = Command::new(&s.bin).args([
            "--listen".into(),
            s.listen.to_string().into(),
            "--control".into(),
            RouterSettings::control_socket(&s.dir).into_os_string(),
            "--state".into(),
            s.dir.join("routes.json").into_os_string(),
            "--run-dir".into(),
            s.dir.clone().into_os_string(),
        ]);
        cmd.env = std::env::vars_os().filter(|(k, _)| k == "RUST_LOG" || k == "NX_LOG_FORMAT").collect();
        cmd.stdout = Stream::Pipe;
        cmd.stderr = Stream::ToStdout;
        cmd.parent_death_signal = Some(nix::sys::signal::Signal::SIGTERM);
        let mut child = match pm.spawn(cmd).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Some(Err(format!("cannot start nx-router: {e}"))));
                return;
            }
        };
        if let Some(fd) = child.stdout.take() {
            let log = s.log.clone();
            tokio::spawn(async move { log.pump(fd).await });
        }
        // Ready when a table goes through; the table is what it needs anyway.
        let mut up = false;
        for _ in 0..200 {
            if child.try_status().is_some() {
                break;
            }
            if publisher.publish().await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if up {
            failures = 0;
            if ready.borrow().is_none() {
                let _ = ready.send(Some(Ok(())));
            }
            tracing::info!(listen = %s.listen, pid = child.pid(), "nx-router running");
        } else if ready.borrow().is_none() {
            let _ = child.signal(nix::sys::signal::Signal::SIGKILL);
            child.wait().await;
            let tail = s.log.tail(5).join(" / ");
            let _ = ready.send(Some(Err(format!("nx-router did not come up on {}: {tail}", s.listen))));
            return;
        }
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(status) = exited else {
            let _ = child.signal(nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                let _ = child.signal(nix::sys::signal::Signal::SIGKILL);
                child.wait().await;
            }
            tracing::info!("nx-router stopped");
            return;
        };
        failures += 1;
        let pause = Duration::from_millis(200 * u64::from(failures.min(25)));
        tracing::error!(%status, ?pause, "nx-router exited; restarting it");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::types::Json;

    fn row(id: &str, app: &str, state: &str, port: i32, prod: bool) -> DeploymentRow {
        DeploymentRow {
            id: id.into(),
            app_id: 1,
            app_name: app.into(),
            artifact_sha256: "0".repeat(64),
            size: 1,
            linkage: "static".into(),
            state: state.into(),
            port,
            args: Json(vec![]),
            env: None,
            filename: None,
            git_sha: None,
            git_ref: None,
            pr_number: None,
            source: "cli".into(),
            error: None,
            created_at: chrono::Utc::now(),
            promoted_at: None,
            limits: Json(vec![]),
            db_name: None,
            db_password: None,
            is_production: prod,
        }
    }

    #[test]
    fn previews_and_production_hosts_are_built() {
        let rows = [
            row("aaaaaaaa", "web", "healthy", 20001, true),
            row("bbbbbbbb", "web", "starting", 20002, false),
            row("cccccccc", "web", "stopped", 20003, false),
            row("dddddddd", "api", "failed", 20004, false),
        ];
        let t = build_table(&rows, "localhost", 7);
        assert_eq!(t.generation, 7);
        assert_eq!(t.routes["web.localhost"].target, Target::Live { addr: ([127, 0, 0, 1], 20001).into() });
        assert_eq!(t.routes["aaaaaaaa--web.localhost"].target, Target::Live { addr: ([127, 0, 0, 1], 20001).into() });
        assert_eq!(t.routes["bbbbbbbb--web.localhost"].target, Target::Starting);
        assert_eq!(t.routes["cccccccc--web.localhost"].target, Target::Stopped);
        assert_eq!(t.routes["dddddddd--api.localhost"].target, Target::Failed);
        assert!(!t.routes.contains_key("api.localhost"), "no production without a promotion");
        assert_eq!(t.routes.len(), 5);
    }
}
