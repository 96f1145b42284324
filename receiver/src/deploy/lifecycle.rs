//! Everything that happens to deployments after their push: restarts when the
//! app's variables change, rollback, pull requests closing, removal of an app,
//! and the janitor that stops idle previews, removes old deployments and
//! deletes binaries nobody uses.
//!
//! Production and the rollback target are never touched by the janitor or by
//! a pull request closing; the database queries exclude them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nx_protocol::api::{DeploymentState, EnvChange};
use nx_protocol::units::format_duration;
use nx_runtime::supervisor::Status;
use tokio::sync::watch;

use super::{meant_to_run, new_id, quotas, validate_env, Claim, DeployError, Deployer};
use crate::db::{AppRow, DeploymentEvent, NewDeployment};

/// What an environment change did; see [`nx_protocol::api::EnvChanged`].
#[derive(Debug, Default)]
pub struct EnvOutcome {
    pub changed: Vec<String>,
    pub restarted: Vec<String>,
    /// The new production and the one it replaced.
    pub production: Option<(String, Option<String>)>,
    pub failed: Vec<(String, String)>,
}

/// What one janitor round did, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tidied {
    pub idle_stopped: Vec<String>,
    pub removed: Vec<String>,
    pub artifacts: usize,
}

impl Deployer {
    /// Restarts a deployment in place and waits for the outcome. Its URL
    /// answers the starting page meanwhile; used for previews, whose URL
    /// belongs to the deployment. One no longer meant to run (stopped since
    /// the caller listed it) is left as it is: [`Status::Stopped`].
    pub async fn restart(&self, id: &str) -> Result<Status, DeployError> {
        let held = self.hold(id).await;
        let row = self.row(id).await?;
        if !meant_to_run(&row) {
            return Ok(Status::Stopped);
        }
        self.halt(&held, id).await;
        self.start_held(&held, &row, true).await
    }

    /// Replaces the running production of `app` by a new deployment of the
    /// same binary, arguments and variables, started with the app's current
    /// settings and environment, and promotes it once healthy: production
    /// never stops answering. The old production stays up as the rollback
    /// target. Returns the new production and the one it replaced.
    ///
    /// The app's cap on running deployments does not refuse it (see
    /// [`Claim::Replacement`]); once it is production, the deployment it
    /// pushed out of the rollback place is stopped if the app runs more than
    /// its cap, so repeated changes cannot pile up sandboxes.
    pub async fn replace_production(
        &self,
        app: &AppRow,
        actor: &str,
        cause: &str,
    ) -> Result<(String, Option<String>), DeployError> {
        let current = app
            .production_id
            .clone()
            .ok_or_else(|| DeployError::Invalid(format!("app {} has no production deployment to replace", app.name)))?;
        let old = self.row(&current).await?;
        let id = new_id();
        self.record(
            NewDeployment {
                id: &id,
                app_id: app.id,
                artifact_sha256: &old.artifact_sha256,
                port: 0,
                args: &old.args.0,
                env: old.env.clone(),
                filename: old.filename.as_deref(),
                git_sha: old.git_sha.as_deref(),
                git_ref: old.git_ref.as_deref(),
                pr_number: None,
                source: &old.source,
                push_id: None,
                repository: old.repository.as_deref(),
                repository_id: old.repository_id,
                github: old.github.as_ref().map(|g| &g.0),
                db_name: None,
            },
            app,
            Claim::Replacement,
            DeploymentEvent {
                app: &app.name,
                kind: "replace",
                actor,
                detail: serde_json::json!({ "replaces": current, "cause": cause }),
            },
        )
        .await?;
        let row = self.row(&id).await?;
        if let Status::Failed { reason, .. } = self.start(&row, true).await? {
            return Err(DeployError::NotHealthy {
                id: id.clone(),
                state: format!("failed, so {current} stays production: {reason}"),
            });
        }
        let app = self.services.db.app_by_id(app.id).await?.unwrap_or_else(|| app.clone());
        let displaced = app.previous_production_id.clone().filter(|d| *d != current);
        let previous = self.promote(&app, &id, actor).await?;
        if let Some(displaced) = displaced {
            // Production is replaced either way; a failed stop leaves the app
            // over its cap, and its next push is refused until one is stopped.
            if let Err(e) = self.stop_if_over_cap(&app, &displaced, actor).await {
                tracing::warn!(app = %app.name, deployment = %displaced, error = %e, "cannot stop the displaced rollback target");
            }
        }
        Ok((id, previous))
    }

    /// Stops `id`, no longer production nor rollback target, if its app runs
    /// more deployments than `--max-running-per-app`.
    async fn stop_if_over_cap(&self, app: &AppRow, id: &str, actor: &str) -> Result<(), DeployError> {
        let cap = self.services.config.max_running_per_app;
        let running = self.services.db.occupancy(app.id).await?.running;
        if running.len() <= cap as usize || !running.iter().any(|h| h.id == id) {
            return Ok(());
        }
        let reason = format!(
            "stopped to keep app {} within --max-running-per-app {cap}: an environment change replaced production and this was the rollback target before it",
            app.name
        );
        self.stop(app, id, actor, Some(&reason)).await
    }

    /// Sets and removes variables of `app`, then brings its running
    /// deployments onto them: previews restart in place, production is
    /// replaced without downtime ([`Deployer::replace_production`]).
    pub async fn change_env(&self, app: &AppRow, change: &EnvChange, actor: &str) -> Result<EnvOutcome, DeployError> {
        validate_env(&change.set)?;
        let unset: BTreeMap<String, String> = change.unset.iter().map(|k| (k.clone(), String::new())).collect();
        validate_env(&unset)?;
        if let Some(both) = change.unset.iter().find(|k| change.set.contains_key(*k)) {
            return Err(DeployError::Invalid(format!("{both} is both set and unset; do one or the other")));
        }
        let sealed: Vec<(String, Vec<u8>)> =
            change.set.iter().map(|(k, v)| (k.clone(), self.services.master.seal_str(v))).collect();
        let changed = self
            .services
            .db
            .change_env(app.id, &sealed, &change.unset, |before, after| quotas::admit_env(&app.name, before, after))
            .await?;
        let mut outcome = EnvOutcome { changed, ..EnvOutcome::default() };
        if outcome.changed.is_empty() {
            return Ok(outcome);
        }
        self.services
            .db
            .event(Some(&app.name), None, "env", actor, serde_json::json!({ "changed": outcome.changed }))
            .await?;
        let rows = self.services.db.deployments_of_app(app.id, i64::MAX).await?;
        for row in rows.iter().filter(|r| meant_to_run(r)) {
            if row.is_production {
                match self.replace_production(app, actor, "environment changed").await {
                    Ok(promoted) => outcome.production = Some(promoted),
                    Err(e) => outcome.failed.push((row.id.clone(), e.to_string())),
                }
                continue;
            }
            // Replacing production may have stopped this one to keep the cap.
            if !meant_to_run(&self.row(&row.id).await?) {
                continue;
            }
            match self.restart(&row.id).await? {
                Status::Failed { reason, .. } => outcome.failed.push((row.id.clone(), reason)),
                // Stopped since it was listed (a pull request closed, say).
                Status::Stopped => {}
                _ => outcome.restarted.push(row.id.clone()),
            }
        }
        self.remake_ready(app.id).await;
        Ok(outcome)
    }

    /// Makes the rollback target production again; the production it
    /// replaces becomes the rollback target, so a second rollback undoes the
    /// first. Returns the new production and the one it replaced.
    pub async fn rollback(&self, app: &AppRow, actor: &str) -> Result<(String, Option<String>), DeployError> {
        let target = app.previous_production_id.clone().ok_or_else(|| {
            DeployError::Invalid(format!(
                "app {} has no earlier production to roll back to; `nx promote ID` makes any healthy deployment production",
                app.name
            ))
        })?;
        self.ensure_awake(&target).await?;
        let row = self.row(&target).await?;
        if row.state() != DeploymentState::Healthy {
            return Err(DeployError::NotHealthy {
                id: target,
                state: format!("{} (the rollback target must be running)", row.state()),
            });
        }
        let previous = self.promote(app, &target, actor).await?;
        Ok((target, previous))
    }

    /// Stops the previews of pull request `pr` (and drops their own
    /// databases); returns the ids stopped.
    pub async fn close_pull_request(&self, app: &AppRow, pr: u64, actor: &str) -> Result<Vec<String>, DeployError> {
        let reason = format!("pull request #{pr} was closed");
        let mut stopped = Vec::new();
        for row in self.services.db.previews_of_pr(app.id, pr as i64).await? {
            match self.stop(app, &row.id, actor, Some(&reason)).await {
                Ok(()) => stopped.push(row.id),
                // Promoted while the close waited for it: production stays.
                Err(DeployError::IsProduction { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(stopped)
    }

    /// Removes an app and everything it has: sandboxes, databases (the app's
    /// and its previews'), data volume, logs, backups and records. Steps that
    /// can fail come before the records go, so a failed removal can simply
    /// be run again.
    pub async fn remove_app(&self, app: &AppRow, actor: &str) -> Result<(), DeployError> {
        // Marked first: a push racing the removal either recorded its
        // deployment before (it is among `rows`, and its start waits for the
        // lock held below, then finds its row gone) or is refused.
        self.services.db.mark_app_removing(app.id).await?;
        let rows = self.services.db.deployments_of_app(app.id, i64::MAX).await?;
        // Held until the records are gone: no wake brings one back
        // meanwhile. Every other path holds one lock at a time, so taking
        // several here cannot deadlock.
        let mut held = Vec::new();
        for row in &rows {
            let lock = self.hold(&row.id).await;
            self.halt(&lock, &row.id).await;
            held.push(lock);
        }
        // Read again under every lock: a pass that held one while the rows
        // were first read (a promotion that failed and put a preview back on
        // its own database) may have changed which database it names.
        let now = self.services.db.deployments_of_app(app.id, i64::MAX).await?;
        for row in now.iter().filter(|r| meant_to_run(r) || r.state() == DeploymentState::Sleeping) {
            // Recorded as stopped, so a removal that fails below leaves
            // nothing that a request, a restart or a receiver's start brings
            // back.
            self.services.db.set_state(&row.id, DeploymentState::Stopped, Some("its app is being removed")).await?;
        }
        let databases: BTreeSet<&str> = rows.iter().chain(&now).filter_map(|r| r.db_name.as_deref()).collect();
        for db in databases {
            self.services.databases.drop_database(db).await?;
        }
        self.services.databases.drop_database(&app.db_name).await?;
        let app_dir = self.services.config.data_dir.join("apps").join(&app.name);
        self.services.volumes.remove(&app_dir).await?;
        for backup in self.services.db.backups(app.id).await? {
            self.services.store.delete_key(&backup.object_key).await?;
        }
        for row in &rows {
            self.remove_files(&row.id);
        }
        self.services.db.delete_app(app).await?;
        self.services
            .db
            .event(Some(&app.name), None, "app.remove", actor, serde_json::json!({ "uid": app.uid }))
            .await?;
        let _ = self.services.routes.publish().await;
        tracing::info!(app = %app.name, deployments = rows.len(), "app removed");
        Ok(())
    }

    /// Removes a deployment's log, run directory and shim state.
    fn remove_files(&self, id: &str) {
        let log = self.log_path(id);
        let mut paths = vec![log.clone()];
        // Rotated logs sit beside the current one.
        if let (Some(dir), Some(name)) = (log.parent(), log.file_name().and_then(|n| n.to_str())) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                paths.extend(entries.flatten().map(|e| e.path()).filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(name) && n != name)
                }));
            }
        }
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir_all(self.services.config.data_dir.join("run").join(id));
        let _ = std::fs::remove_dir_all(self.shim_dir(id));
    }

    /// One janitor round: learn from the router when previews were last
    /// requested, stop the idle ones, remove deployments past the retention,
    /// and delete binaries nothing uses.
    pub async fn tidy(&self) -> Result<Tidied, DeployError> {
        let config = &self.services.config;
        let mut tidied = Tidied::default();
        match self.services.routes.activity().await {
            Ok(activity) => {
                let seen: Vec<_> = activity
                    .deployments
                    .into_iter()
                    .filter_map(|(id, t)| Some((id, chrono::DateTime::from_timestamp(i64::try_from(t).ok()?, 0)?)))
                    .collect();
                self.services.db.record_requests(&seen).await?;
            }
            // Without the router's figures idleness cannot be judged: a busy
            // preview would look idle. Skip expiry this round.
            Err(e) => {
                tracing::warn!(error = %e, "cannot read request activity from nx-router; idle previews are not stopped this round");
                return self.tidy_storage(tidied).await;
            }
        }
        let idle = config.preview_idle;
        let reason = format!("no requests for {}", format_duration(idle));
        for row in self.services.db.idle_previews(idle.as_secs() as i64).await? {
            let Some(app) = self.services.db.app_by_id(row.app_id).await? else { continue };
            match self.stop(&app, &row.id, "janitor", Some(&reason)).await {
                Ok(()) => tidied.idle_stopped.push(row.id),
                Err(e) => tracing::warn!(deployment = %row.id, error = %e, "cannot stop an idle preview"),
            }
        }
        self.tidy_storage(tidied).await
    }

    async fn tidy_storage(&self, mut tidied: Tidied) -> Result<Tidied, DeployError> {
        let config = &self.services.config;
        for row in self.services.db.excess_deployments(i64::from(config.keep_deployments)).await? {
            // Held until its record is gone: a wake in flight cannot start
            // a sandbox for a deleted deployment.
            let held = self.hold(&row.id).await;
            // Read again under the hold: a promotion it waited for may
            // have made it production or the rollback target.
            let Some(row) = self.services.db.deployment(&row.id).await? else { continue };
            let app = self.services.db.app_by_id(row.app_id).await?;
            let protected = app.is_some_and(|a| {
                a.production_id.as_deref() == Some(row.id.as_str())
                    || a.previous_production_id.as_deref() == Some(row.id.as_str())
            });
            if protected {
                continue;
            }
            self.halt(&held, &row.id).await;
            if let Some(db) = &row.db_name {
                self.services.databases.drop_database(db).await?;
            }
            self.services.db.delete_deployment(&row.id).await?;
            self.remove_files(&row.id);
            self.services
                .db
                .event(
                    Some(&row.app_name),
                    Some(&row.id),
                    "remove",
                    "janitor",
                    serde_json::json!({ "keep": config.keep_deployments }),
                )
                .await?;
            tracing::info!(deployment = %row.id, app = %row.app_name, "old deployment removed");
            tidied.removed.push(row.id);
        }
        if !tidied.removed.is_empty() {
            let _ = self.services.routes.publish().await;
        }
        tidied.artifacts = crate::artifacts::collect_garbage(
            &self.services.db,
            &self.services.store,
            config.artifact_grace.as_secs() as i64,
        )
        .await?;
        Ok(tidied)
    }

    /// Runs [`Deployer::tidy`] every `--janitor-interval` until `stop`.
    pub async fn janitor(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.services.config.janitor_interval) => {}
                _ = stop.changed() => return,
            }
            match self.tidy().await {
                Ok(t) if t == Tidied::default() => {}
                Ok(t) => tracing::info!(
                    idle_stopped = t.idle_stopped.len(),
                    removed = t.removed.len(),
                    artifacts = t.artifacts,
                    "janitor round"
                ),
                Err(e) => tracing::warn!(error = %e, "janitor round failed; trying again next round"),
            }
        }
    }
}
