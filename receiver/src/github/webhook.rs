//! `POST /v1/github/webhook`: what GitHub tells the receiver. A delivery is
//! verified (`X-Hub-Signature-256`, compared in constant time), deduplicated
//! by `X-GitHub-Delivery`, acknowledged at once and handled by one worker in
//! the order it came:
//!
//! - `pull_request` closed: merged, and the app promotes on merge → the
//!   newest healthy deployment of the pull request's head commit becomes
//!   production; either way the pull request's previews stop;
//! - `check_run` requested_action `promote` / `rollback`: done, and the check
//!   run updated;
//! - `pull_request_review` submitted and approved, and the app promotes on
//!   approval → as a merge;
//! - `installation` created / deleted: remembered / forgotten;
//! - `ping`: answered; anything else: acknowledged and ignored.
//!
//! Repositories are matched by their numeric id, never by name.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use nx_protocol::api::PromoteOn;
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::{mpsc, watch};

use super::report::{Event, Reporter};
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::db::Db;
use crate::deploy::Deployer;

/// The largest delivery GitHub sends is 25 MB; anything larger is refused.
pub const MAX_BODY: usize = 25 << 20;

/// Deliveries read at once. A body must be read whole before its signature
/// can be checked, so anyone can make the receiver hold up to [`MAX_BODY`]
/// per request: this bounds that to a few, and a delivery that finds them all
/// taken is answered 503 (GitHub lets it be redelivered).
pub const READING_AT_ONCE: usize = 4;

/// How long the body of one delivery may take to arrive.
pub const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether a signature header is well formed (`sha256=` and 64 hex digits),
/// checked before any of the body is read.
fn signature_well_formed(header: &str) -> bool {
    header.strip_prefix("sha256=").is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under
/// `secret`. The comparison takes the same time however many bytes match.
pub fn signature_valid(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else { return false };
    let Ok(sig) = hex::decode(hex_sig) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return false };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// Work a delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    PullRequestClosed { repository_id: i64, pr: i64, merged: bool, head_sha: String, by: String },
    CheckRunAction { repository_id: i64, deployment: String, action: String, by: String },
    ReviewApproved { repository_id: i64, head_sha: String, by: String },
    InstallationCreated { id: i64, account: String },
    InstallationDeleted { id: i64, account: String },
}

/// Reads what a delivery asks for; `None` for events and actions the
/// receiver does not act on.
pub fn parse(event: &str, payload: &Value) -> Option<Work> {
    let repository_id = payload["repository"]["id"].as_i64();
    let by = payload["sender"]["login"].as_str().unwrap_or("someone").to_owned();
    let action = payload["action"].as_str().unwrap_or_default();
    match (event, action) {
        ("pull_request", "closed") => Some(Work::PullRequestClosed {
            repository_id: repository_id?,
            pr: payload["pull_request"]["number"].as_i64().or_else(|| payload["number"].as_i64())?,
            merged: payload["pull_request"]["merged"].as_bool().unwrap_or(false),
            head_sha: payload["pull_request"]["head"]["sha"].as_str()?.to_owned(),
            by,
        }),
        ("check_run", "requested_action") => Some(Work::CheckRunAction {
            repository_id: repository_id?,
            deployment: payload["check_run"]["external_id"].as_str().filter(|s| !s.is_empty())?.to_owned(),
            action: payload["requested_action"]["identifier"].as_str()?.to_owned(),
            by,
        }),
        ("pull_request_review", "submitted")
            if payload["review"]["state"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("approved")) =>
        {
            Some(Work::ReviewApproved {
                repository_id: repository_id?,
                head_sha: payload["pull_request"]["head"]["sha"].as_str()?.to_owned(),
                by,
            })
        }
        ("installation", "created") | ("installation", "deleted") => {
            let id = payload["installation"]["id"].as_i64()?;
            let account = payload["installation"]["account"]["login"].as_str()?.to_owned();
            Some(if action == "created" {
                Work::InstallationCreated { id, account }
            } else {
                Work::InstallationDeleted { id, account }
            })
        }
        _ => None,
    }
}

/// The handler. Answers 202 once the work is queued (or 200 for a ping and a
/// repeated delivery); 401 for a bad signature, before anything is recorded.
pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, String), ApiError> {
    let Some(github) = &state.github else {
        return Err(ApiError::NotFound(
            "GitHub webhooks are off: start nx-receiver with --github-webhook-secret".into(),
        ));
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let signature = header("x-hub-signature-256");
    if !signature_well_formed(&signature) {
        return Err(ApiError::Unauthorized(
            "a delivery needs X-Hub-Signature-256: sha256=<hex>; set the webhook's secret on GitHub".into(),
        ));
    }
    let too_large = || ApiError::TooLarge(format!("webhook deliveries are at most {MAX_BODY} bytes"));
    if header("content-length").parse::<usize>().is_ok_and(|n| n > MAX_BODY) {
        return Err(too_large());
    }
    let Ok(_reading) = github.reading.clone().try_acquire_owned() else {
        return Err(ApiError::Unavailable(format!(
            "{READING_AT_ONCE} deliveries are being read already; redeliver this one from the webhook's settings"
        )));
    };
    let body = match tokio::time::timeout(READ_DEADLINE, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => return Err(too_large()),
        Err(_) => {
            return Err(ApiError::BadRequest(format!(
                "the delivery's body did not arrive within {}s",
                READ_DEADLINE.as_secs()
            )))
        }
    };
    if !signature_valid(github.secret.expose().as_bytes(), &body, &signature) {
        return Err(ApiError::Unauthorized(
            "the X-Hub-Signature-256 of this delivery does not match: check the webhook secret".into(),
        ));
    }
    let (delivery, event) = (header("x-github-delivery"), header("x-github-event"));
    if delivery.is_empty() || event.is_empty() {
        return Err(ApiError::BadRequest("a delivery needs X-GitHub-Delivery and X-GitHub-Event".into()));
    }
    if !state.db.record_delivery(&delivery, &event).await? {
        tracing::info!(delivery, event, "repeated webhook delivery ignored");
        return Ok((StatusCode::OK, "already handled\n".into()));
    }
    if event == "ping" {
        return Ok((StatusCode::OK, "pong\n".into()));
    }
    let payload: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("the delivery is not JSON: {e}")))?;
    match parse(&event, &payload) {
        Some(work) => {
            tracing::info!(delivery, event, ?work, "webhook queued");
            let _ = github.queue.send(work);
            Ok((StatusCode::ACCEPTED, "queued\n".into()))
        }
        None => Ok((StatusCode::ACCEPTED, "ignored\n".into())),
    }
}

/// What the handler needs: the secret and the worker's queue.
#[derive(Debug, Clone)]
pub struct Webhooks {
    pub secret: crate::config::Secret<String>,
    pub queue: mpsc::UnboundedSender<Work>,
    /// One permit per delivery being read (see [`READING_AT_ONCE`]).
    pub reading: Arc<tokio::sync::Semaphore>,
}

/// The worker: does the queued work in order until `stop`.
pub async fn work(
    mut rx: mpsc::UnboundedReceiver<Work>,
    deployer: Arc<Deployer>,
    db: Db,
    reporter: Reporter,
    client: Option<Arc<super::client::Client>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let item = tokio::select! {
            w = rx.recv() => match w { Some(w) => w, None => return },
            _ = stop.changed() => return,
        };
        if let Err(e) = handle(&item, &deployer, &db, &reporter, client.as_deref()).await {
            tracing::warn!(work = ?item, error = %e, "webhook work failed");
        }
    }
}

async fn handle(
    item: &Work,
    deployer: &Deployer,
    db: &Db,
    reporter: &Reporter,
    client: Option<&super::client::Client>,
) -> anyhow::Result<()> {
    match item {
        Work::PullRequestClosed { repository_id, pr, merged, head_sha, by } => {
            let actor = format!("github:{by}");
            for app in db.apps_of_repository(*repository_id).await? {
                if *merged && app.settings.promote_on == PromoteOn::Merge {
                    promote_commit(deployer, db, &app, head_sha, &actor).await?;
                }
                let app = db.app_by_id(app.id).await?.unwrap_or(app);
                let stopped = deployer.close_pull_request(&app, *pr as u64, &actor).await?;
                tracing::info!(app = %app.name, pr, merged, stopped = stopped.len(), "pull request closed");
            }
        }
        Work::ReviewApproved { repository_id, head_sha, by } => {
            for app in db.apps_of_repository(*repository_id).await? {
                if app.settings.promote_on == PromoteOn::Approval {
                    promote_commit(deployer, db, &app, head_sha, &format!("github:{by}")).await?;
                }
            }
        }
        Work::CheckRunAction { repository_id, deployment, action, by } => {
            let actor = format!("github:{by}");
            let Some(row) = db.deployment(deployment).await? else { return Ok(()) };
            // The button must come from the repository the deployment is of.
            let Some(app) = db.apps_of_repository(*repository_id).await?.into_iter().find(|a| a.id == row.app_id)
            else {
                tracing::warn!(
                    deployment,
                    repository_id,
                    "check run action for a deployment of another repository ignored"
                );
                return Ok(());
            };
            let done = match action.as_str() {
                "promote" => deployer.promote(&app, deployment, &actor).await.map(|_| ()),
                "rollback" => deployer.rollback(&app, &actor).await.map(|_| ()),
                other => {
                    tracing::warn!(action = other, "unknown check run action ignored");
                    return Ok(());
                }
            };
            if let Err(e) = done {
                reporter.send(Event::ActionFailed { deployment: deployment.clone(), message: e.to_string() });
            }
        }
        Work::InstallationCreated { id, account } => {
            db.add_github_installation(*id, account).await?;
            tracing::info!(installation = id, account, "GitHub App installed");
        }
        Work::InstallationDeleted { id, account } => {
            db.remove_github_installation(*id).await?;
            if let Some(c) = client {
                c.forget_installation(account).await;
            }
            tracing::info!(installation = id, account, "GitHub App uninstalled");
        }
    }
    Ok(())
}

/// Promotes the newest healthy deployment of `app` built from `sha`.
async fn promote_commit(
    deployer: &Deployer,
    db: &Db,
    app: &crate::db::AppRow,
    sha: &str,
    actor: &str,
) -> anyhow::Result<()> {
    match db.newest_healthy_of_commit(app.id, sha).await? {
        Some(id) => {
            deployer.promote(app, &id, actor).await?;
            tracing::info!(app = %app.name, deployment = %id, sha, "promoted from GitHub");
        }
        None => tracing::warn!(app = %app.name, sha, "no healthy deployment of this commit to promote"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn githubs_published_test_vector_verifies() {
        // From GitHub's "Validating webhook deliveries" (tests/fixtures/github/signature-vector.md).
        let secret = b"It's a Secret to Everybody";
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(signature_valid(secret, b"Hello, World!", header));
        assert!(!signature_valid(secret, b"Hello, World?", header), "another body");
        assert!(!signature_valid(b"another secret", b"Hello, World!", header), "another secret");
        assert!(!signature_valid(secret, b"Hello, World!", &header.replace("sha256=", "sha1=")));
        assert!(!signature_valid(secret, b"Hello, World!", "sha256=zz"));
        assert!(!signature_valid(secret, b"Hello, World!", ""));
    }

    fn payload(name: &str) -> Value {
        let path = format!("{}/../tests/fixtures/github/webhooks/{name}.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    #[test]
    fn githubs_example_payloads_parse_into_work() {
        let closed = parse("pull_request", &payload("pull_request.closed")).unwrap();
        assert_eq!(
            closed,
            Work::PullRequestClosed {
                repository_id: 186853002,
                pr: 2,
                merged: false,
                head_sha: "ec26c3e57ca3a959ca5aad62de7213c562f8c821".into(),
                by: "Codertocat".into()
            }
        );
        assert_eq!(parse("pull_request", &payload("pull_request.opened")), None, "opened is the action's job");
        let mut action = payload("check_run.requested_action");
        assert_eq!(parse("check_run", &action), None, "a check run that is not ours has no deployment id");
        action["check_run"]["external_id"] = "7kq3mz2a".into();
        action["requested_action"]["identifier"] = "promote".into();
        assert!(matches!(
            parse("check_run", &action),
            Some(Work::CheckRunAction { repository_id: 9384267, ref deployment, ref action, .. })
                if deployment == "7kq3mz2a" && action == "promote"
        ));
        let mut review = payload("pull_request_review.submitted");
        assert_eq!(parse("pull_request_review", &review), None, "a comment is not an approval");
        review["review"]["state"] = "approved".into();
        assert!(matches!(parse("pull_request_review", &review), Some(Work::ReviewApproved { .. })));
        assert_eq!(
            parse("installation", &payload("installation.created")),
            Some(Work::InstallationCreated { id: 957387, account: "Codertocat".into() })
        );
        assert!(matches!(
            parse("installation", &payload("installation.deleted")),
            Some(Work::InstallationDeleted { .. })
        ));
        assert_eq!(parse("push", &payload("push")), None);
    }
}
