//! Request and response bodies of the receiver's HTTP API (`/v1/...`).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::names::{AppName, DeploymentId};

/// The API version prefix every route starts with.
pub const API_PREFIX: &str = "/v1";

/// The app a request path acts on: `x` in `/v1/apps/x/...`, or `""`. Both sides
/// compute it from the path, so it is covered by the signature without a header.
pub fn app_of_path(path: &str) -> &str {
    let path = path.split('?').next().unwrap_or_default();
    path.strip_prefix("/v1/apps/").map(|rest| rest.split('/').next().unwrap_or_default()).unwrap_or_default()
}

/// The body of every error answer. `error` says what was wrong and how to fix it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    /// Set when the refusal is of the credential (unknown, or not allowed to
    /// do this), so another key would do; unset when the request itself is
    /// refused (over a cap, bad input), where another key changes nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub credential: bool,
}

/// Where a deployment came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `nx push` run by hand.
    #[default]
    Cli,
    /// The GitHub Action.
    Action,
    /// An upload over SFTP.
    Sftp,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cli => "cli",
            Source::Action => "action",
            Source::Sftp => "sftp",
        }
    }
}

/// The life of a deployment: `pending → starting → healthy | failed → stopped`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentState {
    /// Recorded, not started yet.
    Pending,
    /// The sandbox runs; the health check has not passed yet.
    Starting,
    /// Answers its health check and is routed.
    Healthy,
    /// Could not start, or crashed too often; see `error`.
    Failed,
    /// Stopped on purpose; its URL answers a page saying so.
    Stopped,
    /// Stopped after no request for its app's `sleep_after`; its URL stays
    /// routed and the first request starts it again.
    Sleeping,
}

impl DeploymentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
            Self::Sleeping => "sleeping",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "starting" => Self::Starting,
            "healthy" => Self::Healthy,
            "failed" => Self::Failed,
            "stopped" => Self::Stopped,
            "sleeping" => Self::Sleeping,
            _ => return None,
        })
    }
}

impl fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a push carries besides the binary: sent base64url-encoded in the
/// `x-nx-meta` header and covered by the signature.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PushMeta {
    /// Arguments passed to the binary. `$PORT`, `$HOST`, `$NX_APP` and
    /// `$NX_DEPLOYMENT` are expanded; secrets never are, because arguments are
    /// visible to every user of the host.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables for this deployment, on top of the app's own.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The file name the binary had on the client, for display.
    #[serde(default)]
    pub filename: Option<String>,
    #[serde(default)]
    pub git_sha: Option<String>,
    #[serde(default)]
    pub git_ref: Option<String>,
    #[serde(default)]
    pub pr: Option<u64>,
    #[serde(default)]
    pub source: Source,
    /// `owner/name` of the GitHub repository the binary was built from.
    #[serde(default)]
    pub repository: Option<String>,
    /// That repository's numeric id, which webhooks are matched by.
    #[serde(default)]
    pub repository_id: Option<u64>,
    /// Answer once the sandbox is started instead of once it is healthy.
    #[serde(default)]
    pub no_wait: bool,
    /// Chosen by the client and kept across retries of one push: a retry after
    /// a dropped connection gets the deployment the first attempt made.
    #[serde(default)]
    pub push_id: Option<String>,
}

/// How one limit of a deployment is enforced (or why it is not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforcement {
    /// `memory`, `cpu`, `pids`, `nofile`, `tmp`, `data`.
    pub limit: String,
    /// The value, for humans: `512 MiB`, `1.0 cores`, `256`.
    pub value: String,
    /// What enforces it (`cgroup v2`, `cgroup v1`, `rlimit`, `tmpfs`,
    /// `ext4 volume`), or `None` when nothing does.
    pub by: Option<String>,
    /// Why it is not enforced, when it is not.
    pub note: Option<String>,
}

impl Enforcement {
    pub fn enforced(limit: &str, value: String, by: &str) -> Enforcement {
        Enforcement { limit: limit.into(), value, by: Some(by.into()), note: None }
    }

    pub fn missing(limit: &str, value: String, note: &str) -> Enforcement {
        Enforcement { limit: limit.into(), value, by: None, note: Some(note.into()) }
    }
}

/// Limits an app asks for; unset ones take the receiver's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub memory_mib: Option<u64>,
    /// Cores, fractions allowed (`0.5`).
    pub cpu: Option<f64>,
    pub pids: Option<u32>,
    pub nofile: Option<u64>,
    pub tmp_mib: Option<u64>,
    pub data_mib: Option<u64>,
}

/// How an app is health-checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HealthSetting {
    /// `GET path` must answer 2xx or 3xx.
    Http { path: String },
    /// A TCP connection is accepted.
    Tcp,
}

/// Which database a pull-request preview uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreviewDb {
    /// The app's own database, shared with production.
    #[default]
    Shared,
    /// A fresh, empty database per preview, dropped when the preview stops.
    Empty,
    /// A copy of production's data per preview, dropped when the preview stops.
    Copy,
}

/// Whether pull requests from forks get previews. GitHub gives a fork's
/// `pull_request` runs neither secrets nor an OIDC token, so a fork's preview
/// can only come from a `pull_request_target` run, which runs the fork's code
/// with the base repository's rights: the receiver takes such a run's token
/// only for the one commit someone with write access labeled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForkPreviews {
    /// No previews of forks' pull requests.
    #[default]
    Never,
    /// The head commit of a fork's pull request labeled with the app's
    /// [`AppSettings::fork_label`] by someone with write, maintain or admin
    /// permission is previewed, by a `pull_request_target` run's OIDC token.
    Label,
}

/// The label that opts a fork's pull request in, unless the app names another.
pub const DEFAULT_FORK_LABEL: &str = "nx-preview";

/// Refuses a label name GitHub would not take (1 to 50 characters, none of
/// them a control character).
pub fn check_fork_label(label: &str) -> Result<(), String> {
    let chars = label.chars().count();
    if chars == 0 || chars > 50 || label.chars().any(char::is_control) || label.trim() != label {
        return Err(format!(
            "fork label {label:?} must be 1 to 50 characters without control characters or surrounding spaces, \
             as GitHub's labels are"
        ));
    }
    Ok(())
}

/// What makes a deployment production, besides `nx promote` and the Promote
/// button of its check run, which always do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromoteOn {
    /// The GitHub Action promotes what it builds from a push to the
    /// production branch (a merge is such a push).
    #[default]
    Push,
    /// A merged pull request: its newest healthy preview, the exact binary
    /// that was reviewed, becomes production (GitHub webhook).
    Merge,
    /// An approving review of the pull request (GitHub webhook).
    Approval,
    /// Nothing else.
    Manual,
}

/// When an approving review promotes (`promote_on = "approval"`). Whatever
/// the rule, only approvals from people with write, maintain or admin
/// permission on the repository count, and only on the commit that was
/// previewed last on the pull request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    /// Distinct approvers needed on that commit.
    #[serde(default = "ApprovalRule::one")]
    pub approvals: u32,
    /// Who must be among them: a login (`octocat`) or a team (`@org/team-slug`).
    #[serde(default)]
    pub reviewers: Vec<String>,
    /// Whether the pull request's author's own approval counts (GitHub
    /// forbids it, but the receiver does not rely on that).
    #[serde(default)]
    pub allow_author: bool,
}

impl ApprovalRule {
    fn one() -> u32 {
        1
    }

    /// Refuses a rule no pull request could meet or that names nobody.
    pub fn check(&self) -> Result<(), String> {
        if self.approvals == 0 {
            return Err("[promote] approvals must be at least 1".into());
        }
        let name = |s: &str| {
            !s.is_empty() && s.len() <= 100 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        for r in &self.reviewers {
            let valid = match r.strip_prefix('@') {
                Some(team) => team.split_once('/').is_some_and(|(org, slug)| name(org) && name(slug)),
                None => name(r),
            };
            if !valid {
                return Err(format!(
                    "[promote] reviewers: {r:?} is neither a GitHub login (octocat) nor a team (@org/team-slug)"
                ));
            }
        }
        Ok(())
    }
}

impl Default for ApprovalRule {
    fn default() -> Self {
        ApprovalRule { approvals: 1, reviewers: Vec::new(), allow_author: false }
    }
}

/// The GitHub repository an app is built from: webhooks of that repository
/// (matched by its numeric id) act on the app, and its pull requests get the
/// app's previews reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubLink {
    /// `owner/name`; follows renames once the id is known (an OIDC-verified
    /// push names the repository as it is called now).
    pub repository: String,
    /// Learned from the first push of the GitHub Action, or from GitHub.
    #[serde(default)]
    pub id: Option<u64>,
    /// The numeric id of the repository's owner, learned with the id from the
    /// first OIDC-verified push: a repository moved to another owner is no
    /// longer the one the admin trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<u64>,
    /// Which of the repository's workflows may push with their OIDC token
    /// instead of a deploy key; `None`: none may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<WorkflowTrust>,
}

/// Which GitHub Actions runs of the linked repository may push to an app with
/// their OIDC token (`permissions: id-token: write`) and no deploy key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowTrust {
    /// `.github/workflows/deploy.yml`; `None`: any workflow of the repository.
    #[serde(default)]
    pub workflow: Option<String>,
    /// `refs/heads/main`, `refs/tags/v*` (`*` matches any characters, `/`
    /// included); `None`: any ref.
    #[serde(default)]
    pub ref_pattern: Option<String>,
}

/// Why a `--github-trust` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustSpecError {
    #[error("GitHub repository {0:?} must be written owner/name")]
    Repository(String),
    #[error("workflow {0:?} must be a file of .github/workflows ending in .yml or .yaml")]
    Workflow(String),
    #[error("ref pattern {0:?} must be a ref (refs/heads/main, refs/tags/v*, or a branch name) without spaces")]
    RefPattern(String),
}

/// Whether `s` is `owner/name` as GitHub allows them.
pub fn is_repository_name(s: &str) -> bool {
    s.split_once('/').is_some_and(|(owner, name)| {
        let ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        ok(owner) && ok(name)
    })
}

impl WorkflowTrust {
    /// Parses `owner/repo[:workflow-path][@ref-pattern]` into the repository
    /// and the trust. A bare workflow file name is taken from
    /// `.github/workflows/`, a bare branch name (pattern) from `refs/heads/`.
    pub fn parse(spec: &str) -> Result<(String, WorkflowTrust), TrustSpecError> {
        let spec = spec.trim();
        let (rest, ref_pattern) = match spec.split_once('@') {
            Some((rest, r)) => (rest, Some(r)),
            None => (spec, None),
        };
        let (repository, workflow) = match rest.split_once(':') {
            Some((repo, w)) => (repo, Some(w)),
            None => (rest, None),
        };
        if !is_repository_name(repository) {
            return Err(TrustSpecError::Repository(repository.to_owned()));
        }
        let trust = WorkflowTrust {
            workflow: workflow.map(Self::workflow_path).transpose()?,
            ref_pattern: ref_pattern.map(Self::ref_pattern).transpose()?,
        };
        Ok((repository.to_owned(), trust))
    }

    fn workflow_path(w: &str) -> Result<String, TrustSpecError> {
        let path = if w.contains('/') { w.to_owned() } else { format!(".github/workflows/{w}") };
        let file = path.strip_prefix(".github/workflows/").unwrap_or_default();
        let valid = !file.is_empty()
            && !file.contains('/')
            && (file.ends_with(".yml") || file.ends_with(".yaml"))
            && file.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if valid {
            Ok(path)
        } else {
            Err(TrustSpecError::Workflow(w.to_owned()))
        }
    }

    fn ref_pattern(r: &str) -> Result<String, TrustSpecError> {
        let valid = !r.is_empty() && r.chars().all(|c| c.is_ascii_graphic() && !"@:~^?[\\".contains(c));
        if !valid {
            return Err(TrustSpecError::RefPattern(r.to_owned()));
        }
        Ok(if r.starts_with("refs/") { r.to_owned() } else { format!("refs/heads/{r}") })
    }

    /// Checks a trust that came over the wire as [`WorkflowTrust::parse`]
    /// would have made it.
    pub fn validate(&self) -> Result<(), TrustSpecError> {
        if let Some(w) = &self.workflow {
            if Self::workflow_path(w)? != *w {
                return Err(TrustSpecError::Workflow(w.clone()));
            }
        }
        if let Some(r) = &self.ref_pattern {
            if Self::ref_pattern(r)? != *r {
                return Err(TrustSpecError::RefPattern(r.clone()));
            }
        }
        Ok(())
    }

    /// Whether `git_ref` (a token's `ref` claim) matches the pattern.
    pub fn ref_matches(&self, git_ref: &str) -> bool {
        self.ref_pattern.as_deref().is_none_or(|p| glob(p.as_bytes(), git_ref.as_bytes()))
    }

    /// `owner/repo[:workflow][@ref]`, as `--github-trust` takes it.
    pub fn spec(&self, repository: &str) -> String {
        let mut s = repository.to_owned();
        if let Some(w) = &self.workflow {
            s.push(':');
            s.push_str(w);
        }
        if let Some(r) = &self.ref_pattern {
            s.push('@');
            s.push_str(r);
        }
        s
    }
}

/// `*` matches any run of bytes; everything else matches itself.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

/// `PUT /v1/apps/{app}/github`: link the app to a repository (the admin's
/// call), and say which of its workflows may push with their OIDC token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetGitHub {
    /// `owner/name`, or `None` to unlink.
    pub repository: Option<String>,
    #[serde(default)]
    pub trust: Option<WorkflowTrust>,
}

/// What a GitHub Actions OIDC token proved about a push, as the receiver
/// verified it; recorded with the deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedGitHub {
    pub repository: String,
    pub repository_id: u64,
    pub repository_owner_id: u64,
    /// `refs/heads/main`, `refs/pull/7/merge`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub sha: String,
    /// `owner/repo/.github/workflows/deploy.yml@refs/heads/main`.
    pub workflow_ref: String,
    /// `push`, `pull_request`, `workflow_dispatch`...
    pub event_name: String,
    /// Who started the run.
    pub actor: String,
}

impl VerifiedGitHub {
    /// Whether the token is a `pull_request_target` run's: such a run may
    /// execute a fork's code with the base repository's rights, and its
    /// claims name the base branch, not the pull request.
    pub fn is_pull_request_target(&self) -> bool {
        self.event_name == "pull_request_target"
    }
}

/// An app's settings (`PUT /v1/apps/{app}/settings`); they apply to the
/// deployments started after the change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSettings {
    #[serde(default)]
    pub limits: LimitSettings,
    /// `None`: any HTTP answer to `GET /` counts.
    #[serde(default)]
    pub health: Option<HealthSetting>,
    /// The database of deployments pushed for a pull request.
    #[serde(default)]
    pub preview_db: PreviewDb,
    /// Arguments for pushes that bring none (an SFTP upload, say).
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub promote_on: PromoteOn,
    /// Which approvals promote, with `promote_on = "approval"`.
    #[serde(default)]
    pub approval: ApprovalRule,
    #[serde(default)]
    pub github: Option<GitHubLink>,
    /// Whether pull requests from forks get previews (`[preview] forks`).
    #[serde(default)]
    pub preview_forks: ForkPreviews,
    /// The label that opts a fork's pull request in; `None`: [`DEFAULT_FORK_LABEL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork_label: Option<String>,
    /// When idle deployments sleep (`[scale]`).
    #[serde(default, skip_serializing_if = "ScaleSettings::is_default")]
    pub scale: ScaleSettings,
}

/// A preview sleeps after this long without a request unless its app says
/// otherwise (`[scale] sleep_after`).
pub const DEFAULT_PREVIEW_SLEEP_SECS: u64 = 15 * 60;

/// The shortest `sleep_after` accepted: the receiver looks at the router's
/// traffic every second, so a shorter idle time could not be told apart
/// from a pause between two requests.
pub const MIN_SLEEP_SECS: u64 = 2;

/// Which deployments of an app a sleep setting is for: production (and the
/// rollback target, kept for an instant rollback) or every other one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Preview,
    Production,
}

/// `[scale]`: how many sandboxes production and each preview run, and
/// seconds without a request (and none open) after which a deployment is
/// stopped until its next request; `0` never. `None`: the default, one
/// replica, and [`DEFAULT_PREVIEW_SLEEP_SECS`] for previews, never for
/// production.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleSettings {
    /// Sandboxes the production deployment runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Sandboxes each preview runs as (the rollback target always runs one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_sleep_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_sleep_secs: Option<u64>,
}

impl ScaleSettings {
    fn is_default(&self) -> bool {
        *self == ScaleSettings::default()
    }

    /// How long a deployment of `role` may be idle before it sleeps; `None`: never.
    pub fn sleep_after(&self, role: Role) -> Option<std::time::Duration> {
        let secs = match role {
            Role::Preview => self.preview_sleep_secs.unwrap_or(DEFAULT_PREVIEW_SLEEP_SECS),
            Role::Production => self.production_sleep_secs.unwrap_or(0),
        };
        (secs > 0).then(|| std::time::Duration::from_secs(secs))
    }

    /// Sets the idle time of `role` from `15m`, `2s` or `off`.
    pub fn set(&mut self, role: Role, value: &str) -> Result<(), String> {
        let secs = parse_sleep_after(value)?;
        match role {
            Role::Preview => self.preview_sleep_secs = Some(secs),
            Role::Production => self.production_sleep_secs = Some(secs),
        }
        Ok(())
    }

    /// Checks the values a caller sent.
    pub fn check(&self) -> Result<(), String> {
        for secs in [self.preview_sleep_secs, self.production_sleep_secs].into_iter().flatten() {
            if secs != 0 && secs < MIN_SLEEP_SECS {
                return Err(format!(
                    "sleep_after of {secs}s is below the shortest allowed, {MIN_SLEEP_SECS}s; use \"{MIN_SLEEP_SECS}s\" or more, or \"off\""
                ));
            }
        }
        Ok(())
    }
}

/// `off` (0: never sleeps) or a duration of at least [`MIN_SLEEP_SECS`]
/// in whole seconds, like `15m`.
pub fn parse_sleep_after(value: &str) -> Result<u64, String> {
    if value.trim().eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let d = crate::units::parse_duration(value)?;
    if d.subsec_nanos() != 0 || d.as_secs() < MIN_SLEEP_SECS {
        return Err(format!(
            "sleep_after {value:?} must be whole seconds, at least {MIN_SLEEP_SECS}s (like \"15m\"), or \"off\""
        ));
    }
    Ok(d.as_secs())
}

impl AppSettings {
    /// How many replicas production runs.
    pub fn replicas(&self) -> u32 {
        self.scale.replicas.unwrap_or(1)
    }

    /// How many replicas each preview runs.
    pub fn preview_replicas(&self) -> u32 {
        self.scale.preview_replicas.unwrap_or(1)
    }

    /// The label that opts a fork's pull request in.
    pub fn fork_label(&self) -> &str {
        self.fork_label.as_deref().unwrap_or(DEFAULT_FORK_LABEL)
    }
}

/// `GET /v1/apps/{app}/db`: how to reach the app's database.
#[derive(Clone, Serialize, Deserialize)]
pub struct DbCredentials {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
}

impl fmt::Debug for DbCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbCredentials").field("database", &self.database).field("password", &"<redacted>").finish()
    }
}

/// A backup kept in the object store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupInfo {
    pub id: i64,
    pub size: u64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    /// Set once the dump was restored into a scratch database without error.
    pub verified_at: Option<DateTime<Utc>>,
}

/// `POST /v1/apps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    pub name: AppName,
}

/// One app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppInfo {
    pub name: AppName,
    /// The production deployment, if one was promoted.
    pub production: Option<DeploymentId>,
    /// Where production is served, whether or not one is promoted yet.
    pub production_url: String,
    /// Name of the app's own Postgres database.
    pub database: String,
    /// Set while the database is over its size quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_quota: Option<DatabaseQuota>,
    pub settings: AppSettings,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/apps/{app}/domains`: attach a custom domain to the app's production.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddDomain {
    pub domain: String,
}

/// `POST /v1/apps/{app}/drains` (an app's) or `POST /v1/drains` (platform-wide):
/// ship logs to `url`: `syslog+tls://HOST:PORT`, `syslog+tcp://HOST:PORT` or
/// `https://HOST/PATH` (NDJSON batches).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddDrain {
    pub url: String,
}

/// A log drain as the API shows it: its URL with user, password, query and
/// long path segments masked; the URL itself is never echoed back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DrainInfo {
    pub id: String,
    /// None for a platform-wide drain.
    pub app: Option<String>,
    pub url: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

/// A DNS record the owner of a custom domain creates at their DNS provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DnsRecord {
    /// `CNAME`, `A`, `AAAA` or `TXT`.
    pub kind: String,
    pub name: String,
    pub value: String,
}

/// A custom domain of an app, and where its certificate stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainInfo {
    pub domain: String,
    pub app: AppName,
    /// The records to create: where the name points, and the TXT record that
    /// proves it is the app owner's.
    pub records: Vec<DnsRecord>,
    /// When the records were found; the domain is served from then on.
    pub verified_at: Option<DateTime<Utc>>,
    /// The issuer of the current certificate (its subject's common name or organisation).
    pub issuer: Option<String>,
    /// When the current certificate expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// Why the last attempt to obtain a certificate failed, while it stands.
    pub last_error: Option<String>,
    /// When the next attempt to obtain or renew the certificate is due.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// What an app database over its size quota may still do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatabaseQuota {
    /// New sessions are read-only; reads work.
    ReadOnly,
    /// It went on growing: its role cannot log in until it is under the quota.
    Locked,
}

impl fmt::Display for DatabaseQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatabaseQuota::ReadOnly => "its database is over its size quota: read-only until it is under it",
            DatabaseQuota::Locked => {
                "its database went on growing over its size quota: the app cannot log in to it until it is under the quota (raise --db-quota or restore a smaller dump)"
            }
        })
    }
}

/// The answer to `POST /v1/apps`: the deploy key is shown here once and never again.
#[derive(Clone, Serialize, Deserialize)]
pub struct CreatedApp {
    pub app: AppInfo,
    pub deploy_key: String,
}

impl fmt::Debug for CreatedApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedApp").field("app", &self.app).field("deploy_key", &"<redacted>").finish()
    }
}

/// One deployment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentInfo {
    pub id: DeploymentId,
    pub app: AppName,
    pub state: DeploymentState,
    /// sha256 of the artifact.
    pub digest: String,
    pub size: u64,
    pub preview_url: String,
    /// Whether this deployment is the app's production.
    pub production: bool,
    pub port: u16,
    pub git_sha: Option<String>,
    pub git_ref: Option<String>,
    pub pr: Option<u64>,
    pub source: Source,
    pub created_at: DateTime<Utc>,
    pub promoted_at: Option<DateTime<Utc>>,
    /// Why the deployment failed, with the remedy when one is known.
    pub error: Option<String>,
    /// The last lines the app printed, when it failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
    /// The limits it runs under, and what enforces each.
    #[serde(default)]
    pub limits: Vec<Enforcement>,
    /// The database it uses, when it is not the app's own (a preview's).
    #[serde(default)]
    pub database: Option<String>,
    /// What the GitHub Actions OIDC token of the push proved, when it came
    /// with one instead of a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github: Option<VerifiedGitHub>,
    /// Its running sandboxes, one per replica, while it runs on this
    /// receiver; empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaInfo>,
}

/// The state of one replica of a running deployment.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Started (or restarting after a crash); not answering yet.
    Starting,
    /// Answers its health check.
    Healthy,
    /// Was healthy, still runs, but fails its health check: taken out of
    /// the route, and restarted if it keeps failing.
    Unhealthy,
    /// Could not start, or crashed too often.
    Failed,
    Stopped,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

/// How one replica of a running deployment is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// 0 for the first; each replica has its own port, cgroup and shim.
    pub index: u32,
    pub port: u16,
    pub state: ReplicaState,
    /// Whether the router sends it requests: a healthy replica is routed,
    /// an unhealthy one only while no replica of its deployment is healthy.
    #[serde(default)]
    pub routed: bool,
    /// Why it is unhealthy (its health check's last failure) or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Restarts after crashes (and after failing its health check too
    /// long) since its supervision began.
    pub restarts: u32,
    /// How its last life ended ("status 1", "signal 9 (SIGKILL)"), as its
    /// shim recorded it; `None` while none ended under this receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Whether the kernel killed a process of that life for memory (its
    /// cgroup's `memory.events`).
    #[serde(default)]
    pub oom_killed: bool,
    /// Seconds since it last became healthy; `None` while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<u64>,
}

/// `POST /v1/apps/{app}/ssh-keys`: a public key that may upload to the app
/// over SFTP, as in an `authorized_keys` line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddSshKey {
    pub public_key: String,
}

/// An SSH key registered for an app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SshKeyInfo {
    pub id: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    pub algorithm: String,
    pub comment: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A key as listed: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyInfo {
    pub id: String,
    /// `deploy` or `admin`.
    pub kind: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A new key: the secret is shown here once and never again.
#[derive(Clone, Serialize, Deserialize)]
pub struct CreatedKey {
    pub info: KeyInfo,
    pub secret: String,
    /// The key this one replaced, when it was a rotation.
    pub replaces: Option<String>,
}

impl fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedKey").field("info", &self.info).field("secret", &"<redacted>").finish()
    }
}

/// The answer to `POST /v1/apps/{app}/deployments/{id}/promote` and `.../rollback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Promotion {
    pub app: AppName,
    pub production: DeploymentId,
    pub previous: Option<DeploymentId>,
    pub production_url: String,
}

/// One of an app's variables as listed: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    pub updated_at: DateTime<Utc>,
}

/// `PATCH /v1/apps/{app}/env`: variables to set and names to remove, applied
/// together.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvChange {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

impl fmt::Debug for EnvChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvChange")
            .field("set", &self.set.keys().collect::<Vec<_>>())
            .field("unset", &self.unset)
            .finish()
    }
}

/// What an environment change did to the running deployments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnvChanged {
    /// The variables now set (names only).
    pub vars: Vec<EnvVar>,
    /// The names whose value changed or that were removed.
    pub changed: Vec<String>,
    /// Previews restarted in place with the new variables.
    pub restarted: Vec<DeploymentId>,
    /// When production was running: the new deployment that replaced it
    /// without downtime (same binary, new variables), now production.
    pub production: Option<Promotion>,
    /// Deployments that did not come back healthy, with why.
    pub failed: Vec<(DeploymentId, String)>,
}

/// `POST /v1/apps/{app}/pulls/{pr}/close`: what closing a pull request stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClosedPull {
    pub app: AppName,
    pub pr: u64,
    pub stopped: Vec<DeploymentId>,
}

/// One entry of the audit log (`GET /v1/events`): who did what, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventInfo {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub app: Option<String>,
    pub deployment: Option<String>,
    /// `push`, `promote`, `env`, `key.revoke`, `github.link`, ...
    pub kind: String,
    /// Who: `admin`, `key:<id>@<app>`, `key:<id>(read-only)`,
    /// `github:<workflow_ref> (<actor>)`, `github:<login>`, `janitor`, ...
    pub actor: String,
    /// What, as the platform recorded it: names, ids and reasons, never a
    /// variable's value or a secret.
    pub detail: serde_json::Value,
}

/// `GET /v1/status`: the receiver's health, version and limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerStatus {
    pub version: String,
    pub uptime_secs: u64,
    /// Where apps are served: `*.localhost`, `*.example.com`.
    pub domain: String,
    pub apps: u64,
    /// How many deployments are in each state.
    pub deployments: BTreeMap<String, u64>,
    /// `embedded PostgreSQL ...` or `external PostgreSQL`.
    pub database: String,
    /// The object store artifacts and backups are kept in.
    pub store: String,
    /// `supervised`, or `separate` when it runs on its own.
    pub router: String,
    /// The limits a deployment gets unless its app asks otherwise, and what
    /// enforces each on this host.
    pub default_limits: Vec<Enforcement>,
    /// Isolation besides limits: seccomp, network.
    pub isolation: Vec<Enforcement>,
    pub max_upload_bytes: u64,
    /// Previews without a request for this long are stopped.
    pub preview_idle_secs: u64,
    /// Deployments kept per app; older ones are removed.
    pub keep_deployments: u32,
    /// The apps (of those the key sees) whose database is over its size quota.
    #[serde(default)]
    pub databases_over_quota: BTreeMap<String, DatabaseQuota>,
    /// The wildcard certificates of the platform's domains obtained by
    /// DNS-01 (`--wildcard-domain`), shown to the admin and read-only keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wildcards: Vec<WildcardInfo>,
}

/// Where the wildcard certificate of one of the platform's domains stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WildcardInfo {
    /// `*.<domain>`.
    pub name: String,
    /// The issuer of the current certificate, if there is one.
    pub issuer: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed, while it stands.
    pub last_error: Option<String>,
    /// When the next attempt is due.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// `GET /v1/health`, unauthenticated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    pub version: String,
    /// Whether the receiver has taken back its deployments since it started
    /// (the API answers before that; requests that change deployments wait).
    #[serde(default)]
    pub reconciled: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_is_read_from_app_paths_only() {
        assert_eq!(app_of_path("/v1/apps/web/deployments"), "web");
        assert_eq!(app_of_path("/v1/apps/web"), "web");
        assert_eq!(app_of_path("/v1/apps/web?x=1"), "web");
        assert_eq!(app_of_path("/v1/apps"), "");
        assert_eq!(app_of_path("/v1/apps?x=/v1/apps/y"), "");
        assert_eq!(app_of_path("/v1/status"), "");
    }

    #[test]
    fn push_meta_refuses_unknown_fields() {
        assert!(serde_json::from_str::<PushMeta>(r#"{"args":["a"],"evil":1}"#).is_err());
        let meta: PushMeta = serde_json::from_str(r#"{"pr":7,"source":"action"}"#).unwrap();
        assert_eq!(meta.pr, Some(7));
        assert_eq!(meta.source, Source::Action);
    }

    #[test]
    fn trust_specs_parse_with_their_defaults() {
        let (repo, trust) = WorkflowTrust::parse("acme/web").unwrap();
        assert_eq!((repo.as_str(), trust), ("acme/web", WorkflowTrust::default()));
        let (repo, trust) = WorkflowTrust::parse("acme/web:deploy.yml@main").unwrap();
        assert_eq!(repo, "acme/web");
        assert_eq!(trust.workflow.as_deref(), Some(".github/workflows/deploy.yml"));
        assert_eq!(trust.ref_pattern.as_deref(), Some("refs/heads/main"));
        assert_eq!(trust.spec(&repo), "acme/web:.github/workflows/deploy.yml@refs/heads/main");
        assert_eq!(trust.validate(), Ok(()));
        let (_, trust) = WorkflowTrust::parse("acme/web@refs/tags/v*").unwrap();
        assert!(trust.ref_matches("refs/tags/v1.2.0"));
        assert!(!trust.ref_matches("refs/heads/v1"));
        assert_eq!(WorkflowTrust::parse("acme"), Err(TrustSpecError::Repository("acme".into())));
        assert_eq!(WorkflowTrust::parse("acme/web:../x.yml"), Err(TrustSpecError::Workflow("../x.yml".into())));
        assert_eq!(WorkflowTrust::parse("acme/web:deploy.sh"), Err(TrustSpecError::Workflow("deploy.sh".into())));
        assert_eq!(WorkflowTrust::parse("acme/web@ma in"), Err(TrustSpecError::RefPattern("ma in".into())));
        let sent = WorkflowTrust { workflow: Some("deploy.yml".into()), ref_pattern: None };
        assert_eq!(sent.validate(), Err(TrustSpecError::Workflow("deploy.yml".into())));
    }

    #[test]
    fn ref_patterns_match_whole_refs() {
        let any_branch = WorkflowTrust { ref_pattern: Some("refs/heads/*".into()), ..WorkflowTrust::default() };
        assert!(any_branch.ref_matches("refs/heads/main"));
        assert!(any_branch.ref_matches("refs/heads/feature/x"));
        assert!(!any_branch.ref_matches("refs/pull/7/merge"));
        let main = WorkflowTrust { ref_pattern: Some("refs/heads/main".into()), ..WorkflowTrust::default() };
        assert!(main.ref_matches("refs/heads/main"));
        assert!(!main.ref_matches("refs/heads/main2"));
        assert!(WorkflowTrust::default().ref_matches("refs/pull/7/merge"));
    }

    #[test]
    fn states_round_trip() {
        for s in [
            DeploymentState::Pending,
            DeploymentState::Starting,
            DeploymentState::Healthy,
            DeploymentState::Failed,
            DeploymentState::Stopped,
            DeploymentState::Sleeping,
        ] {
            assert_eq!(DeploymentState::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn previews_sleep_after_15_minutes_and_production_never_unless_told() {
        let default = ScaleSettings::default();
        assert_eq!(default.sleep_after(Role::Preview), Some(std::time::Duration::from_secs(900)));
        assert_eq!(default.sleep_after(Role::Production), None);
        let mut s = ScaleSettings::default();
        s.set(Role::Preview, "off").unwrap();
        s.set(Role::Production, "1h").unwrap();
        assert_eq!(s.sleep_after(Role::Preview), None);
        assert_eq!(s.sleep_after(Role::Production), Some(std::time::Duration::from_secs(3600)));
        assert!(s.check().is_ok());
        for bad in ["1s", "0s", "1500ms", "soon"] {
            assert!(ScaleSettings::default().set(Role::Preview, bad).is_err(), "{bad}");
        }
        let sent = ScaleSettings { preview_sleep_secs: Some(1), ..ScaleSettings::default() };
        assert_eq!(
            sent.check().unwrap_err(),
            "sleep_after of 1s is below the shortest allowed, 2s; use \"2s\" or more, or \"off\""
        );
        // Settings saved before [scale] existed still load, as the defaults.
        let old: AppSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(old.scale, ScaleSettings::default());
    }
}
