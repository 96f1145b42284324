//! What GitHub tells the receiver (`POST /v1/github/webhook`, whose handler
//! is `api::webhook`'s: data flows from the API to here). A delivery is
//! verified (`X-Hub-Signature-256`, compared in constant time), deduplicated
//! by `X-GitHub-Delivery`, queued (a bounded queue: when it is full the
//! delivery is answered 503 with `Retry-After`, before it is recorded, so a
//! redelivery, which keeps the delivery id, is taken; GitHub does not retry
//! by itself, a person or a script redelivers) and handled by one worker in
//! the order it came:
//!
//! - `pull_request` closed: merged, and the app promotes on merge → the
//!   newest healthy deployment of the pull request's head commit becomes
//!   production; either way the pull request's previews stop;
//! - `check_run` requested_action `promote` / `rollback`: done if the user
//!   who clicked may write to the repository ([`super::approval`]), and the
//!   check run updated; otherwise the check run says why not;
//! - `pull_request_review` submitted and approved, and the app promotes on
//!   approval → the previewed commit's deployment, if the approval counts
//!   ([`super::approval`]); otherwise the check run says why not;
//! - `pull_request` labeled with an app's fork label (`[preview] forks =
//!   "label"`): the head commit may be previewed by a `pull_request_target`
//!   run if whoever labeled it may write to the repository (asked as for
//!   approvals); otherwise the refusal is kept, for the push to say why;
//!   unlabeled: withdrawn, and the pull request's previews stop;
//! - `installation` created / deleted: remembered / forgotten;
//! - `ping`: answered; anything else: acknowledged and ignored.
//!
//! A captured body replayed under a new delivery id does nothing the first
//! did not: an event is acted on once, by its own ids ([`Work::key`]), and
//! one older than [`EVENT_RETENTION_DAYS`] (by its signed time) not at all.
//! Repositories are matched by their numeric id, never by name.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use nx_protocol::api::{ForkPreviews, PromoteOn};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::{mpsc, watch};

use super::approval::{may_promote, Access, Review, Verdict};
use super::client::Client;
use crate::db::{AppRow, Db};
use crate::deploy::events::{Event, Reporter};
use crate::deploy::Deployer;

/// The largest delivery GitHub sends is 25 MB; anything larger is refused.
pub const MAX_BODY: usize = 25 << 20;

/// Deliveries read at once. A body must be read whole before its signature
/// can be checked, so anyone can make the receiver hold up to [`MAX_BODY`]
/// per request: this bounds that to a few, and a delivery that finds them all
/// taken is answered 503 (GitHub lets it be redelivered).
pub const READING_AT_ONCE: usize = 4;

/// Deliveries read at once from one client address: a sender of bogus
/// deliveries holds at most this many of [`READING_AT_ONCE`], and GitHub's
/// own deliveries, from other addresses, are still read.
pub const READING_PER_ADDRESS: usize = 1;

/// A delivery's whole body arrives within this much time, plus its size at
/// [`READ_RATE`]: a trickled body loses its reading place quickly.
pub const READ_DEADLINE_BASE: std::time::Duration = std::time::Duration::from_secs(10);

/// The slowest body rate a delivery is given time for, in bytes a second.
pub const READ_RATE: u64 = 256 << 10;

/// How long a body of `len` bytes may take to arrive whole: ten seconds for
/// anything under about a megabyte (GitHub's deliveries are), a 25 MB
/// delivery about two minutes.
pub fn read_deadline(len: u64) -> std::time::Duration {
    READ_DEADLINE_BASE + std::time::Duration::from_secs(len / READ_RATE)
}

/// How long a delivery id is remembered: longer than GitHub offers to
/// redeliver (three days).
pub const DELIVERY_RETENTION_DAYS: i32 = 14;

/// How long an event acted on is remembered; an event whose own signed time
/// is older than this is not acted on at all, so forgetting it opens no
/// replay.
pub const EVENT_RETENTION_DAYS: i32 = 30;

/// Whether a signature header is well formed (`sha256=` and 64 hex digits),
/// checked before any of the body is read.
pub fn signature_well_formed(header: &str) -> bool {
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

/// Work a delivery asks for. Times are GitHub's, as the payload (signed)
/// carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    PullRequestClosed {
        repository_id: i64,
        pr: i64,
        merged: bool,
        head_sha: String,
        closed_at: String,
        by: String,
    },
    CheckRunAction {
        repository_id: i64,
        check_run: i64,
        deployment: String,
        action: String,
        head_sha: String,
        /// When the check run was last completed: each time the receiver
        /// updates it (after a promotion, say) this changes, so a new click
        /// differs from a replay of an old one.
        completed_at: String,
        by: String,
    },
    ReviewApproved {
        repository_id: i64,
        review: Review,
        submitted_at: String,
    },
    /// A label added to (`added`) or removed from a pull request.
    PullRequestLabel {
        repository_id: i64,
        pr: i64,
        head_sha: String,
        label: String,
        added: bool,
        /// The pull request's `updated_at`, which every label change moves on.
        updated_at: String,
        by: String,
    },
    InstallationCreated {
        id: i64,
        account: String,
    },
    InstallationDeleted {
        id: i64,
        account: String,
    },
}

impl Work {
    /// The event's own identity: what a replay under a new delivery id
    /// shares with the first delivery. `None` for work that is idempotent
    /// anyway.
    pub fn key(&self) -> Option<String> {
        match self {
            Work::PullRequestClosed { repository_id, pr, head_sha, closed_at, .. } => {
                Some(format!("pull_request:{repository_id}:{pr}:closed:{head_sha}:{closed_at}"))
            }
            // Whoever clicked is part of it: a click refused for lack of
            // permission must not use up the button for someone who has it.
            Work::CheckRunAction { repository_id, check_run, deployment, action, head_sha, completed_at, by } => Some(
                format!("check_run:{repository_id}:{check_run}:{deployment}:{action}:{head_sha}:{completed_at}:{by}"),
            ),
            Work::ReviewApproved { repository_id, review, .. } => Some(format!("review:{repository_id}:{}", review.id)),
            // A replayed label must not opt a pull request in again after
            // its label was removed.
            Work::PullRequestLabel { repository_id, pr, head_sha, label, added: true, updated_at, by } => {
                Some(format!("pull_request:{repository_id}:{pr}:labeled:{label}:{head_sha}:{updated_at}:{by}"))
            }
            // A removal only ever withdraws, so doing it again is safe, and
            // it must never be skipped: the pull request's time has whole
            // seconds, and a label added and removed twice within one would
            // otherwise leave the second label standing.
            Work::PullRequestLabel { added: false, .. } => None,
            Work::InstallationCreated { .. } | Work::InstallationDeleted { .. } => None,
        }
    }

    /// When GitHub says the event happened, where the payload says so.
    fn happened(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let at = match self {
            Work::PullRequestClosed { closed_at, .. } => closed_at,
            Work::ReviewApproved { submitted_at, .. } => submitted_at,
            Work::PullRequestLabel { updated_at, .. } => updated_at,
            // A click carries no time of its own; the check run it is on was
            // last completed before it, and every update moves that on.
            Work::CheckRunAction { completed_at, .. } => completed_at,
            Work::InstallationCreated { .. } | Work::InstallationDeleted { .. } => return None,
        };
        chrono::DateTime::parse_from_rfc3339(at).ok().map(|t| t.with_timezone(&chrono::Utc))
    }
}

/// Reads what a delivery asks for; `None` for events and actions the
/// receiver does not act on.
pub fn parse(event: &str, payload: &Value) -> Option<Work> {
    let repository_id = payload["repository"]["id"].as_i64();
    let by = payload["sender"]["login"].as_str().unwrap_or("someone").to_owned();
    let action = payload["action"].as_str().unwrap_or_default();
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    match (event, action) {
        ("pull_request", "closed") => Some(Work::PullRequestClosed {
            repository_id: repository_id?,
            pr: payload["pull_request"]["number"].as_i64().or_else(|| payload["number"].as_i64())?,
            merged: payload["pull_request"]["merged"].as_bool().unwrap_or(false),
            head_sha: payload["pull_request"]["head"]["sha"].as_str()?.to_owned(),
            closed_at: text(&payload["pull_request"]["closed_at"]),
            by,
        }),
        ("pull_request", "labeled" | "unlabeled") => Some(Work::PullRequestLabel {
            repository_id: repository_id?,
            pr: payload["pull_request"]["number"].as_i64().or_else(|| payload["number"].as_i64())?,
            head_sha: payload["pull_request"]["head"]["sha"].as_str()?.to_owned(),
            label: payload["label"]["name"].as_str()?.to_owned(),
            added: action == "labeled",
            updated_at: text(&payload["pull_request"]["updated_at"]),
            by,
        }),
        ("check_run", "requested_action") => Some(Work::CheckRunAction {
            repository_id: repository_id?,
            check_run: payload["check_run"]["id"].as_i64()?,
            deployment: payload["check_run"]["external_id"].as_str().filter(|s| !s.is_empty())?.to_owned(),
            action: payload["requested_action"]["identifier"].as_str()?.to_owned(),
            head_sha: text(&payload["check_run"]["head_sha"]),
            completed_at: text(&payload["check_run"]["completed_at"]),
            by,
        }),
        ("pull_request_review", "submitted")
            if payload["review"]["state"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("approved")) =>
        {
            let review = &payload["review"];
            Some(Work::ReviewApproved {
                repository_id: repository_id?,
                review: Review {
                    id: review["id"].as_i64()?,
                    pr: payload["pull_request"]["number"].as_i64()?,
                    reviewer: review["user"]["login"].as_str()?.to_owned(),
                    commit_id: review["commit_id"].as_str()?.to_owned(),
                    author: payload["pull_request"]["user"]["login"].as_str()?.to_owned(),
                },
                submitted_at: text(&review["submitted_at"]),
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

/// A delivery's work, waiting for the worker.
#[derive(Debug)]
pub struct Queued {
    pub delivery: String,
    pub work: Work,
}

/// What the handler needs: the secret and the worker's queue.
#[derive(Debug, Clone)]
pub struct Webhooks {
    pub secret: crate::config::Secret<String>,
    /// Bounded (`--github-webhook-queue`).
    pub queue: mpsc::Sender<Queued>,
    /// One place per delivery being read ([`READING_AT_ONCE`], of them
    /// [`READING_PER_ADDRESS`] per client address).
    pub reading: crate::listeners::Gate,
}

/// What the worker acts with.
#[derive(Debug)]
pub struct Worker {
    pub deployer: Arc<Deployer>,
    pub db: Db,
    pub reporter: Reporter,
    pub client: Option<Arc<Client>>,
}

/// The worker: does the queued work in order until `stop`. Work that fails
/// forgets its delivery, so a redelivery of it is taken.
pub async fn work(mut rx: mpsc::Receiver<Queued>, worker: Worker, mut stop: watch::Receiver<bool>) {
    loop {
        let Queued { delivery, work } = tokio::select! {
            w = rx.recv() => match w { Some(w) => w, None => return },
            _ = stop.changed() => return,
        };
        if let Err(e) = worker.once(&delivery, &work).await {
            tracing::warn!(
                delivery,
                ?work,
                error = format!("{e:#}"),
                "webhook work failed; a redelivery will be taken"
            );
            if let Err(e) = worker.db.forget_delivery(&delivery).await {
                tracing::warn!(delivery, error = %e, "cannot forget the failed delivery");
            }
        }
    }
}

impl Worker {
    /// Does `work` unless its event was acted on already or is too old.
    async fn once(&self, delivery: &str, work: &Work) -> anyhow::Result<()> {
        let key = work.key();
        if let Some(key) = &key {
            if let Some(first) = self.db.github_event(key).await? {
                tracing::info!(delivery, first_delivery = %first, key, "event already acted on; replay ignored");
                return Ok(());
            }
        }
        let oldest = chrono::Utc::now() - chrono::Duration::days(i64::from(EVENT_RETENTION_DAYS));
        if let Some(at) = work.happened().filter(|at| *at < oldest) {
            tracing::warn!(delivery, ?key, happened = %at, "event older than {EVENT_RETENTION_DAYS} days ignored");
            return Ok(());
        }
        self.handle(work).await?;
        if let Some(key) = key {
            self.db.record_github_event(&key, delivery).await?;
        }
        Ok(())
    }

    async fn handle(&self, item: &Work) -> anyhow::Result<()> {
        let db = &self.db;
        match item {
            Work::PullRequestClosed { repository_id, pr, merged, head_sha, by, .. } => {
                let actor = format!("github:{by}");
                for app in db.apps_of_repository(*repository_id).await? {
                    if *merged && app.settings.promote_on == PromoteOn::Merge {
                        self.promote_commit(&app, head_sha, &actor).await?;
                    }
                    let app = db.app_by_id(app.id).await?.unwrap_or(app);
                    // A closed pull request's labels allow nothing any more.
                    db.withdraw_fork_labels(app.id, *pr).await?;
                    let stopped = self.deployer.close_pull_request(&app, *pr as u64, &actor).await?;
                    tracing::info!(app = %app.name, pr, merged, stopped = stopped.len(), "pull request closed");
                }
            }
            Work::ReviewApproved { repository_id, review, .. } => {
                for app in db.apps_of_repository(*repository_id).await? {
                    if app.settings.promote_on == PromoteOn::Approval {
                        self.approved(&app, review).await?;
                    }
                }
            }
            Work::CheckRunAction { repository_id, deployment, action, by, .. } => {
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
                self.button(&app, deployment, action, by).await?;
            }
            Work::PullRequestLabel { repository_id, pr, head_sha, label, added, by, .. } => {
                for app in db.apps_of_repository(*repository_id).await? {
                    if app.settings.preview_forks == ForkPreviews::Label && app.settings.fork_label() == label {
                        self.fork_label(&app, *pr, head_sha, *added, by).await?;
                    }
                }
            }
            Work::InstallationCreated { id, account } => {
                db.add_github_installation(*id, account).await?;
                tracing::info!(installation = id, account, "GitHub App installed");
            }
            Work::InstallationDeleted { id, account } => {
                db.remove_github_installation(*id).await?;
                if let Some(c) = &self.client {
                    c.forget_installation(account).await;
                }
                tracing::info!(installation = id, account, "GitHub App uninstalled");
            }
        }
        Ok(())
    }

    /// Who to ask about the people of `app`'s repository; `None` without a
    /// GitHub client or a link by id, when nobody can be told apart.
    fn access<'a>(&'a self, app: &'a AppRow) -> Option<Access<'a>> {
        let link = app.settings.github.as_ref()?;
        Some(Access {
            client: self.client.as_deref()?,
            db: &self.db,
            repository: &link.repository,
            repository_id: i64::try_from(link.id?).ok()?,
        })
    }

    /// An approving review of one of `app`'s pull requests.
    async fn approved(&self, app: &AppRow, review: &Review) -> anyhow::Result<()> {
        let Some((previewed_id, previewed)) = self.db.latest_preview(app.id, review.pr).await? else {
            tracing::warn!(app = %app.name, pr = review.pr, review = review.id, reviewer = %review.reviewer,
                "approval of a pull request with no preview: nothing to promote");
            return Ok(());
        };
        let Some(access) = self.access(app) else {
            tracing::warn!(app = %app.name, pr = review.pr, review = review.id, reviewer = %review.reviewer,
                "approval not counted: without --github-token or a GitHub App nobody can say who may approve");
            return Ok(());
        };
        match access.judge(&app.settings.approval, review, &previewed).await? {
            Verdict::Promotes => self.promote_commit(app, &previewed, &format!("github:{}", review.reviewer)).await,
            Verdict::DoesNotCount(why) => {
                tracing::warn!(app = %app.name, pr = review.pr, review = review.id, reviewer = %review.reviewer,
                    commit = %review.commit_id, previewed = %previewed, reason = %why, "approval does not promote");
                self.reporter.send(Event::Note {
                    deployment: previewed_id,
                    title: format!("The approval of @{} did not promote", review.reviewer),
                    message: why,
                });
                Ok(())
            }
        }
    }

    /// `app`'s fork label added to (`added`) or removed from pull request
    /// `pr`, whose head is `head_sha`, by `by`.
    async fn fork_label(&self, app: &AppRow, pr: i64, head_sha: &str, added: bool, by: &str) -> anyhow::Result<()> {
        if !added {
            let withdrawn = self.db.withdraw_fork_labels(app.id, pr).await?;
            let stopped = self.deployer.close_pull_request(app, pr as u64, &format!("github:{by}")).await?;
            tracing::info!(app = %app.name, pr, by, withdrawn, stopped = stopped.len(), "fork preview label removed");
            return Ok(());
        }
        let permission = match self.access(app) {
            Some(access) => access.permission(by).await?,
            None => "unknown (the receiver has no --github-token or GitHub App to ask GitHub with)".to_owned(),
        };
        let allowed = may_promote(&permission);
        self.db.record_fork_label(app.id, pr, head_sha, by, &permission, allowed).await?;
        if allowed {
            tracing::info!(app = %app.name, pr, commit = head_sha, by, "fork pull request labeled for a preview");
        } else {
            tracing::warn!(app = %app.name, pr, commit = head_sha, by, permission,
                "fork preview label does not count: only write, maintain or admin may opt a fork in");
        }
        Ok(())
    }

    /// A Promote or Rollback button of `deployment`'s check run, clicked by
    /// `by`.
    async fn button(&self, app: &AppRow, deployment: &str, action: &str, by: &str) -> anyhow::Result<()> {
        let refuse = |why: String| {
            tracing::warn!(app = %app.name, deployment, action, by, reason = %why, "check run button refused");
            self.reporter.send(Event::Note {
                deployment: deployment.to_owned(),
                title: format!("The {action} button did nothing"),
                message: why,
            });
            Ok(())
        };
        if !matches!(action, "promote" | "rollback") {
            tracing::warn!(action, "unknown check run action ignored");
            return Ok(());
        }
        let Some(access) = self.access(app) else {
            return refuse(format!(
                "the receiver cannot ask GitHub whether @{by} may write to the repository; use `nx {action}`"
            ));
        };
        let permission = access.permission(by).await?;
        if !may_promote(&permission) {
            return refuse(format!(
                "@{by} has {permission} permission on {}: the buttons need write, maintain or admin",
                access.repository
            ));
        }
        let is_production = app.production_id.as_deref() == Some(deployment);
        let actor = format!("github:{by}");
        let done = match action {
            "promote" if is_production => {
                tracing::info!(app = %app.name, deployment, by, "already production: nothing to promote");
                return Ok(());
            }
            "promote" => self.deployer.promote(app, deployment, &actor).await.map(|_| ()),
            // Only production's check run has the button; a click on one
            // whose deployment was replaced since rolls back nothing.
            _ if !is_production => {
                return refuse(format!(
                    "{deployment} is no longer production, so its Rollback button rolls back nothing; \
                     `nx rollback {}` rolls back what is production now",
                    app.name
                ))
            }
            _ => self.deployer.rollback(app, &actor).await.map(|_| ()),
        };
        if let Err(e) = done {
            self.reporter.send(Event::Note {
                deployment: deployment.to_owned(),
                title: "The action failed".into(),
                message: e.to_string(),
            });
        }
        Ok(())
    }

    /// Promotes the newest healthy deployment of `app` built from `sha`; one
    /// that is production already stays so, with no second promotion.
    async fn promote_commit(&self, app: &AppRow, sha: &str, actor: &str) -> anyhow::Result<()> {
        match self.db.newest_healthy_of_commit(app.id, sha).await? {
            Some(id) if app.production_id.as_deref() == Some(id.as_str()) => {
                tracing::info!(app = %app.name, deployment = %id, sha, "already production: nothing to promote");
            }
            Some(id) => {
                self.deployer.promote(app, &id, actor).await?;
                tracing::info!(app = %app.name, deployment = %id, sha, "promoted from GitHub");
            }
            None => tracing::warn!(app = %app.name, sha, "no healthy deployment of this commit to promote"),
        }
        Ok(())
    }
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
                closed_at: "2019-05-15T15:21:18Z".into(),
                by: "Codertocat".into()
            }
        );
        assert_eq!(
            closed.key().unwrap(),
            "pull_request:186853002:2:closed:ec26c3e57ca3a959ca5aad62de7213c562f8c821:2019-05-15T15:21:18Z"
        );
        assert_eq!(parse("pull_request", &payload("pull_request.opened")), None, "opened is the action's job");
        let mut labeled = payload("pull_request.opened");
        labeled["action"] = "labeled".into();
        labeled["label"] = serde_json::json!({ "id": 1, "name": "nx-preview", "color": "0e8a16", "default": false });
        let label = parse("pull_request", &labeled).unwrap();
        assert_eq!(
            label,
            Work::PullRequestLabel {
                repository_id: 186853002,
                pr: 2,
                head_sha: "ec26c3e57ca3a959ca5aad62de7213c562f8c821".into(),
                label: "nx-preview".into(),
                added: true,
                updated_at: "2019-05-15T15:20:33Z".into(),
                by: "Codertocat".into()
            }
        );
        labeled["action"] = "unlabeled".into();
        let unlabel = parse("pull_request", &labeled).unwrap();
        assert!(matches!(unlabel, Work::PullRequestLabel { added: false, .. }));
        assert_eq!(unlabel.key(), None, "a removal is acted on every time, never taken for a replay");
        let mut action = payload("check_run.requested_action");
        assert_eq!(parse("check_run", &action), None, "a check run that is not ours has no deployment id");
        action["check_run"]["external_id"] = "7kq3mz2a".into();
        action["requested_action"]["identifier"] = "promote".into();
        let button = parse("check_run", &action).unwrap();
        assert!(matches!(
            button,
            Work::CheckRunAction { repository_id: 9384267, check_run: 1494503112, ref deployment, ref action, ref head_sha, .. }
                if deployment == "7kq3mz2a" && action == "promote" && head_sha == "5bd5f196a46b8222fb7484f05faba41a73cf34bd"
        ));
        // The same button of the same check run, once the check run changed: another event.
        action["check_run"]["completed_at"] = "2026-11-29T21:00:00Z".into();
        let changed = parse("check_run", &action).unwrap();
        assert_ne!(changed.key(), button.key());
        // Another person's click of the same button: another event too.
        action["sender"]["login"] = "someone-else".into();
        assert_ne!(parse("check_run", &action).unwrap().key(), changed.key());
        let mut review = payload("pull_request_review.submitted");
        assert_eq!(parse("pull_request_review", &review), None, "a comment is not an approval");
        review["review"]["state"] = "approved".into();
        assert_eq!(
            parse("pull_request_review", &review),
            Some(Work::ReviewApproved {
                repository_id: 186853002,
                review: Review {
                    id: 237895671,
                    pr: 2,
                    reviewer: "Codertocat".into(),
                    commit_id: "ec26c3e57ca3a959ca5aad62de7213c562f8c821".into(),
                    author: "Codertocat".into(),
                },
                submitted_at: "2019-05-15T15:20:38Z".into(),
            })
        );
        assert_eq!(parse("pull_request_review", &review).unwrap().key().unwrap(), "review:186853002:237895671");
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
