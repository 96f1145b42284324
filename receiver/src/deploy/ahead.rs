//! Sandboxes made ahead of a push's start. At a push's admission, before
//! its binary is read, the push is promised the id and the port its
//! deployment will have, and its sandbox is made ([`nx_runtime::ready`])
//! while the binary is uploaded: bwrap's setup, most of a start, is paid
//! beside the upload instead of after it. The sandbox binds the
//! deployment's binary directory, still empty; the start that uses it
//! places the verified binary there and only then says go, after
//! comparing it with the sandbox asked for as a wake does (a changed
//! variable, another linkage, anything: the start goes the usual way).
//!
//! Nothing of the app runs before its deployment is recorded and its
//! binary verified: until go only nx-init waits, as the app's user. A push
//! refused, abandoned or answered by an earlier attempt drops its
//! [`Ahead`], which discards the sandbox (under the deployment's hold once
//! its row exists: a start of it may be under way) and, for a deployment
//! never recorded, removes what it made (its run and state directories,
//! its log). `--push-ready` bounds how many sandboxes are made ahead or
//! wait at once, each holding its place until it is started or discarded
//! to its end; the push takes its upload place first, so one with no room
//! costs nothing. A preview with a database of its own gets none (its
//! variables are known only once the database is made).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nx_protocol::api::{PushMeta, VerifiedGitHub};
use nx_runtime::ready::Ready;
use sqlx::types::Json;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;

use super::sandbox::Stage;
use super::{own_database, replica_key, Deployer};
use crate::db::{AppRow, DeploymentRow};

/// A sandbox made ahead, with its place among `--push-ready`'s, held until
/// it is started or discarded.
pub(super) type Made = (Option<Ready>, OwnedSemaphorePermit);

/// Sandboxes being made, or made, for pushes under way, by the id their
/// deployment will have.
pub(super) type Making = Mutex<HashMap<String, JoinHandle<Made>>>;

/// A push's promise of a deployment id and a port, with its sandbox made
/// ahead. Dropped, it discards the sandbox unless a start took it, then
/// gives the port back.
pub struct Ahead {
    pub(super) id: String,
    pub(super) port: u16,
    /// Set once the deployment is recorded: what was made for it is its own.
    recorded: AtomicBool,
    deployer: Arc<Deployer>,
    /// Made for a deployment never recorded, removed with the sandbox.
    leftovers: Vec<std::path::PathBuf>,
}

impl std::fmt::Debug for Ahead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead").field("id", &self.id).field("port", &self.port).finish_non_exhaustive()
    }
}

impl Ahead {
    /// Says the deployment is recorded under this id and port.
    pub(super) fn recorded(&self) {
        self.recorded.store(true, Ordering::SeqCst);
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        let (id, port, deployer) = (self.id.clone(), self.port, self.deployer.clone());
        let recorded = self.recorded.load(Ordering::SeqCst);
        let leftovers = std::mem::take(&mut self.leftovers);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            // A row committed as the push was cut (its answer lost) is
            // recorded all the same; one that cannot be read is kept.
            let recorded = recorded || deployer.services.db.deployment(&id).await.map_or(true, |r| r.is_some());
            // Once its row exists a start of it may be under way: the
            // discard waits for the hold every start and stop takes.
            let held = match recorded {
                true => Some(deployer.hold(&id).await),
                false => None,
            };
            if let Some((Some(ready), _place)) = deployer.made_ahead(&id).await {
                ready.discard().await;
            }
            drop(held);
            if !recorded {
                for path in leftovers {
                    let _ = match path.is_dir() {
                        true => tokio::fs::remove_dir_all(&path).await,
                        false => tokio::fs::remove_file(&path).await,
                    };
                }
            }
            if let Ok(mut p) = deployer.promised.lock() {
                p.remove(&port);
            }
        });
    }
}

impl Deployer {
    /// At a push's admission: promises it a deployment id and a port and
    /// starts making its sandbox, unless `--push-ready` pushes have one
    /// already or the deployment will have a database of its own. `None`:
    /// the push starts its sandbox the usual way.
    pub async fn ahead(
        self: &Arc<Self>,
        app: &AppRow,
        meta: &PushMeta,
        proved: Option<&VerifiedGitHub>,
    ) -> Option<Ahead> {
        if own_database(app, meta, proved).is_some() {
            return None;
        }
        let place = self.ahead_places.clone().try_acquire_owned().ok()?;
        // Most pushes of an app link as its last one did; a guess that is
        // wrong only means the sandbox made is not used.
        let linkage = match self.services.db.deployments_of_app(app.id, 1).await {
            Ok(rows) => rows.into_iter().next().map_or_else(|| "static".to_owned(), |r| r.linkage),
            Err(_) => return None,
        };
        let id = super::new_id();
        let port = {
            let _guard = self.port_lock.lock().await;
            let port = self.allocate_port(&[]).await.ok()?;
            self.promised.lock().ok()?.insert(port);
            port
        };
        let data = &self.services.config.data_dir;
        let ahead = Ahead {
            id: id.clone(),
            port,
            recorded: AtomicBool::new(false),
            deployer: self.clone(),
            leftovers: vec![data.join("run").join(&id), self.shim_dir(&replica_key(&id, 0)), self.log_path(&id)],
        };
        let row = self.prospective_row(app, meta, proved, &id, port, linkage);
        let me = self.clone();
        let app = app.clone();
        let making = async move {
            let made = async {
                let config = me.configure(&app, &row, 0, port, Stage::Ahead).await?;
                let log = me.open_log(&row.id)?;
                nx_runtime::ready::Ready::make(&config, &me.services.pm, &log)
                    .await
                    .map_err(|e| super::DeployError::Internal(e.to_string()))
            };
            match made.await {
                Ok(ready) => (Some(ready), place),
                Err(e) => {
                    tracing::warn!(deployment = %row.id, error = %e, "cannot make a sandbox ahead of a push; it starts the usual way");
                    (None, place)
                }
            }
        };
        self.making.lock().ok()?.insert(id, tokio::spawn(making));
        Some(ahead)
    }

    /// The deployment a push admitted now will be recorded as, as far as
    /// its sandbox depends on it (its binary is not known yet).
    fn prospective_row(
        &self,
        app: &AppRow,
        meta: &PushMeta,
        proved: Option<&VerifiedGitHub>,
        id: &str,
        port: u16,
        linkage: String,
    ) -> DeploymentRow {
        DeploymentRow {
            id: id.to_owned(),
            app_id: app.id,
            app_name: app.name.clone(),
            artifact_sha256: String::new(),
            size: 0,
            linkage,
            state: nx_protocol::api::DeploymentState::Pending.as_str().to_owned(),
            port: i32::from(port),
            args: Json(if meta.args.is_empty() { app.settings.args.clone() } else { meta.args.clone() }),
            env: super::sealed_push_env(&self.services.master, meta).ok().flatten(),
            filename: meta.filename.clone(),
            git_sha: meta.git_sha.clone(),
            git_ref: meta.git_ref.clone(),
            pr_number: meta.pr.map(|p| p as i64),
            source: meta.source.as_str().to_owned(),
            error: None,
            created_at: chrono::Utc::now(),
            promoted_at: None,
            limits: Json(Vec::new()),
            db_name: None,
            db_password: None,
            repository: meta.repository.clone(),
            repository_id: meta.repository_id.map(|i| i as i64),
            github: proved.cloned().map(Json),
            is_production: false,
            replica_ports: Vec::new(),
        }
    }

    /// The sandbox made ahead for deployment `id`'s push, once made, with
    /// its place, to be held until it is started or discarded: the start
    /// that takes it waits for the making to end.
    pub(super) async fn made_ahead(&self, id: &str) -> Option<Made> {
        let handle = self.making.lock().ok()?.remove(id)?;
        handle.await.ok()
    }
}
