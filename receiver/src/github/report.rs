//! Reporting deployments on GitHub: when a deployment pushed by the GitHub
//! Action becomes healthy or fails, its pull request gets one comment per app
//! (created once, then edited), its commit a status and a check run with a
//! Promote button (Rollback once production has a predecessor), and the
//! repository a GitHub deployment in the `preview` environment; a promotion
//! adds one in `production`.
//!
//! Reports are queued and sent by one task, in order, each call retried with
//! backoff ([`Client::call`]); a deploy never waits for GitHub nor fails
//! because of it.

use std::sync::Arc;

use nx_protocol::api::{DeploymentInfo, DeploymentState};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::client::{Client, Method};
use crate::db::{AppRow, Db, DeploymentRow, ReportRow};
use crate::deploy::events::Event;
use crate::deploy::Deployer;

/// Where a deployment came from on GitHub.
struct Origin<'a> {
    repository: &'a str,
    repository_id: i64,
    sha: &'a str,
}

/// Where to report a deployment: only to the repository its app is linked
/// to (by id, named as the link names it), never to one the push claimed,
/// and only for a commit id that is one.
fn origin<'a>(row: &'a DeploymentRow, app: &'a AppRow) -> Option<Origin<'a>> {
    let link = app.settings.github.as_ref()?;
    let repository_id = i64::try_from(link.id?).ok()?;
    let sha = row.git_sha.as_deref()?;
    let is_commit = sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit());
    (row.repository_id == Some(repository_id) && is_commit).then_some(Origin {
        repository: &link.repository,
        repository_id,
        sha,
    })
}

/// Sends queued events to GitHub until `stop`.
pub async fn run(
    mut rx: mpsc::UnboundedReceiver<Event>,
    client: Arc<Client>,
    deployer: Arc<Deployer>,
    db: Db,
    mut stop: watch::Receiver<bool>,
) {
    let sender = Sender { client, deployer, db };
    loop {
        let event = tokio::select! {
            e = rx.recv() => match e { Some(e) => e, None => return },
            _ = stop.changed() => return,
        };
        crate::counters::platform().github_queue.dec();
        if let Err(e) = sender.handle(&event).await {
            tracing::warn!(?event, error = %e, "cannot report to GitHub");
        }
    }
}

struct Sender {
    client: Arc<Client>,
    deployer: Arc<Deployer>,
    db: Db,
}

/// Logs a failed call; reporting goes on with the next one.
fn logged<T>(what: &str, result: Result<T, super::client::CallError>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(call = what, error = %e, "GitHub call failed");
            None
        }
    }
}

impl Sender {
    async fn handle(&self, event: &Event) -> anyhow::Result<()> {
        let id = match event {
            Event::Settled(id) | Event::Promoted { deployment: id, .. } | Event::Note { deployment: id, .. } => id,
        };
        let Some(row) = self.db.deployment(id).await? else { return Ok(()) };
        let Some(app) = self.db.app_by_id(row.app_id).await? else { return Ok(()) };
        let Some(o) = origin(&row, &app) else { return Ok(()) };
        let info = self.deployer.info(&row, Vec::new())?;
        let mut report = self.db.github_report(id).await?;
        match event {
            Event::Settled(_) => {
                if !matches!(
                    row.state(),
                    DeploymentState::Healthy | DeploymentState::Failed | DeploymentState::Sleeping
                ) || report.state.as_deref() == Some(row.state.as_str())
                {
                    return Ok(());
                }
                self.settled(&app, &row, &o, &info, &mut report).await;
                report.state = Some(row.state.clone());
            }
            Event::Promoted { previous, .. } => {
                self.promoted(&app, &row, &o, &mut report).await;
                if let Some(prev) = previous {
                    self.refresh_check_run(prev).await?;
                }
            }
            Event::Note { title, message, .. } => {
                if let Some(check) = report.check_run_id {
                    let body = json!({ "output": { "title": title, "summary": message } });
                    logged(
                        "update check run",
                        self.call(&o, Method::Patch, &format!("check-runs/{check}"), &body).await,
                    );
                }
            }
        }
        self.db.save_github_report(id, &report).await?;
        Ok(())
    }

    async fn call(
        &self,
        o: &Origin<'_>,
        method: Method,
        path: &str,
        body: &Value,
    ) -> Result<Value, super::client::CallError> {
        self.client.call(o.repository, method, &format!("/repos/{}/{path}", o.repository), Some(body)).await
    }

    async fn settled(
        &self,
        app: &AppRow,
        row: &DeploymentRow,
        o: &Origin<'_>,
        info: &DeploymentInfo,
        report: &mut ReportRow,
    ) {
        // A sleeping deployment is up as far as a visitor can tell.
        let ok = matches!(row.state(), DeploymentState::Healthy | DeploymentState::Sleeping);
        if let Some(pr) = row.pr_number {
            self.comment(app, row, o, pr, info).await;
        }
        let description = match row.state() {
            DeploymentState::Healthy => format!("{} is up", row.id),
            DeploymentState::Sleeping => format!("{} sleeps; its next request wakes it", row.id),
            _ => format!("{} failed to start", row.id),
        };
        let status = json!({
            "state": if ok { "success" } else { "failure" },
            "target_url": info.preview_url,
            "description": description,
            "context": format!("nx-sandbox/{}", app.name),
        });
        logged("commit status", self.call(o, Method::Post, &format!("statuses/{}", o.sha), &status).await);
        self.check_run(app, row, o, info, report).await;
        if report.preview_deployment.is_none() {
            let created = self.create_deployment(o, "preview", row, false).await;
            report.preview_deployment = created;
        }
        if let Some(d) = report.preview_deployment {
            let status = json!({
                "state": if ok { "success" } else { "failure" },
                "environment_url": info.preview_url,
                "description": format!("{} of {}", row.id, app.name),
            });
            logged(
                "deployment status",
                self.call(o, Method::Post, &format!("deployments/{d}/statuses"), &status).await,
            );
        }
    }

    async fn promoted(&self, app: &AppRow, row: &DeploymentRow, o: &Origin<'_>, report: &mut ReportRow) {
        if let Some(d) = self.create_deployment(o, "production", row, true).await {
            report.production_deployment = Some(d);
            let status = json!({
                "state": "success",
                "environment_url": self.deployer.production_url(&app.name),
                "description": format!("{} is production of {}", row.id, app.name),
            });
            logged(
                "deployment status",
                self.call(o, Method::Post, &format!("deployments/{d}/statuses"), &status).await,
            );
        }
        if let Ok(info) = self.deployer.info(row, Vec::new()) {
            self.check_run(app, row, o, &info, report).await;
            if let Some(pr) = row.pr_number {
                self.comment(app, row, o, pr, &info).await;
            }
        }
    }

    /// Brings the check run of another deployment up to date (its buttons).
    async fn refresh_check_run(&self, id: &str) -> anyhow::Result<()> {
        let Some(row) = self.db.deployment(id).await? else { return Ok(()) };
        let Some(app) = self.db.app_by_id(row.app_id).await? else { return Ok(()) };
        let Some(o) = origin(&row, &app) else { return Ok(()) };
        let mut report = self.db.github_report(id).await?;
        if report.check_run_id.is_none() {
            return Ok(());
        }
        let info = self.deployer.info(&row, Vec::new())?;
        self.check_run(&app, &row, &o, &info, &mut report).await;
        Ok(())
    }

    async fn create_deployment(
        &self,
        o: &Origin<'_>,
        environment: &str,
        row: &DeploymentRow,
        production: bool,
    ) -> Option<i64> {
        let body = json!({
            "ref": o.sha,
            "environment": environment,
            "description": format!("NX Sandbox deployment {}", row.id),
            "auto_merge": false,
            "required_contexts": [],
            "transient_environment": !production,
            "production_environment": production,
            "payload": { "deployment": row.id },
        });
        logged("deployment", self.call(o, Method::Post, "deployments", &body).await)?["id"].as_i64()
    }

    /// Creates or edits the deployment's check run, with the buttons that
    /// apply now.
    async fn check_run(
        &self,
        app: &AppRow,
        row: &DeploymentRow,
        o: &Origin<'_>,
        info: &DeploymentInfo,
        report: &mut ReportRow,
    ) {
        let ok = matches!(row.state(), DeploymentState::Healthy | DeploymentState::Sleeping);
        let mut actions = Vec::new();
        // A fork's preview is never promoted (Deployer::promote): no button.
        if ok && !row.is_production && !row.is_fork_preview() {
            actions.push(json!({ "label": "Promote", "identifier": "promote", "description": "Make this deployment production" }));
        }
        // Only production's own check run offers the way back.
        let current = self.db.app_by_id(app.id).await.ok().flatten();
        if row.is_production && current.is_some_and(|a| a.previous_production_id.is_some()) {
            actions.push(json!({ "label": "Rollback", "identifier": "rollback", "description": "Make the previous production production again" }));
        }
        let title = match (ok, row.is_production) {
            (true, true) => format!("{} is production", row.id),
            (true, false) if row.state() == DeploymentState::Sleeping => {
                format!("{} sleeps; its next request wakes it", row.id)
            }
            (true, false) => format!("{} is up", row.id),
            (false, _) => format!("{} failed to start", row.id),
        };
        let mut summary = format!("Preview: {}\n\nDigest: `sha256:{}`", info.preview_url, row.artifact_sha256);
        if let Some(e) = &row.error {
            summary.push_str(&format!("\n\n{e}"));
        }
        let mut body = json!({
            "name": format!("NX Sandbox ({})", app.name),
            "external_id": row.id,
            "details_url": info.preview_url,
            "status": "completed",
            "conclusion": if ok { "success" } else { "failure" },
            "completed_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "output": { "title": title, "summary": summary },
            "actions": actions,
        });
        match report.check_run_id {
            Some(check) => {
                logged("update check run", self.call(o, Method::Patch, &format!("check-runs/{check}"), &body).await);
            }
            None => {
                body["head_sha"] = json!(o.sha);
                let created = logged("check run", self.call(o, Method::Post, "check-runs", &body).await);
                report.check_run_id = created.and_then(|c| c["id"].as_i64());
            }
        }
    }

    /// Creates the app's comment on the pull request, or edits it.
    async fn comment(&self, app: &AppRow, row: &DeploymentRow, o: &Origin<'_>, pr: i64, info: &DeploymentInfo) {
        let body = json!({ "body": comment_body(&app.name, row, info, &self.deployer.production_url(&app.name)) });
        let existing = self.db.github_comment(app.id, o.repository_id, pr).await.ok().flatten();
        if let Some(comment) = existing {
            match self.call(o, Method::Patch, &format!("issues/comments/{comment}"), &body).await {
                Ok(_) => return,
                // Deleted by someone: make a new one.
                Err(e) if e.status() == Some(404) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot edit the pull request comment");
                    return;
                }
            }
        }
        let created = logged("comment", self.call(o, Method::Post, &format!("issues/{pr}/comments"), &body).await);
        if let Some(id) = created.and_then(|c| c["id"].as_i64()) {
            if let Err(e) = self.db.set_github_comment(app.id, o.repository_id, pr, id).await {
                tracing::warn!(error = %e, "cannot remember the pull request comment");
            }
        }
    }
}

/// The pull request comment of an app: its latest deployment for that pull
/// request, as a small table.
pub fn comment_body(app: &str, row: &DeploymentRow, info: &DeploymentInfo, production_url: &str) -> String {
    let state = match (row.state(), row.is_production) {
        (DeploymentState::Healthy, true) => format!("✅ healthy, **production** at {production_url}"),
        (DeploymentState::Healthy, false) => "✅ healthy".to_owned(),
        (DeploymentState::Failed, _) => "❌ failed".to_owned(),
        (DeploymentState::Sleeping, _) => "💤 sleeping: its next request wakes it".to_owned(),
        (other, _) => other.to_string(),
    };
    let sha = row.git_sha.as_deref().unwrap_or_default();
    let mut body = format!(
        "<!-- nx-sandbox:app={app} -->\n**NX Sandbox** · `{app}`\n\n| | |\n| --- | --- |\n\
         | deployment | `{}` |\n| state | {state} |\n| preview | {} |\n| digest | `sha256:{}` |\n| commit | `{}` |\n| updated | {} |\n",
        row.id,
        info.preview_url,
        &row.artifact_sha256[..row.artifact_sha256.len().min(12)],
        &sha[..sha.len().min(12)],
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC"),
    );
    if let Some(e) = &row.error {
        body.push_str(&format!("\n**Why it failed:** {e}\n"));
    }
    body
}
