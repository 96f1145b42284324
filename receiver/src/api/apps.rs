//! `/v1/apps`: create, list and show apps.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use nx_protocol::api::{AppInfo, AppSettings, CreateApp, CreatedApp, GitHubLink, HealthSetting, SetGitHub};

use super::auth::{AppScope, Caller, VerifiedJson};
use super::error::ApiError;
use super::AppState;
use crate::apps::{self, AppError};
use crate::db::AppRow;

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        use nx_cluster::provision::ProvisionError;
        use nx_cluster::ClusterError;
        match &e {
            AppError::Exists(_)
            | AppError::Database { source: ClusterError::Provision(ProvisionError::Exists { .. }), .. } => {
                ApiError::Conflict(e.to_string())
            }
            AppError::NoUids { .. }
            | AppError::Database { source: ClusterError::Provision(ProvisionError::Connections { .. }), .. } => {
                ApiError::Unavailable(e.to_string())
            }
            AppError::Database { .. } | AppError::Db(_) => ApiError::internal(e),
        }
    }
}

fn to_info(state: &AppState, row: &AppRow) -> Result<AppInfo, ApiError> {
    apps::info(row, &state.config, state.cluster.quota_states().get(&row.db_name))
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("stored app name {:?} is invalid", row.name)))
}

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    VerifiedJson(req): VerifiedJson<CreateApp>,
) -> Result<(StatusCode, Json<CreatedApp>), ApiError> {
    let (row, key) =
        apps::create(&state.db, &state.cluster, &state.master, &state.config, &req.name, &caller.actor()).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApp { app: to_info(&state, &row)?, deploy_key: key.expose_secret().to_owned() }),
    ))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<AppInfo>>, ApiError> {
    let rows = state.db.apps().await?;
    rows.iter().filter(|r| caller.sees(&r.name)).map(|r| to_info(&state, r)).collect::<Result<Vec<_>, _>>().map(Json)
}

/// `PUT /v1/apps/{app}/settings`: replaces the app's settings; they apply to
/// deployments started afterwards. A deploy key may change how its app runs
/// (what nx.toml says on a push) but not raise its limits or relink its
/// repository; nobody may go past the operator's caps.
pub async fn settings(
    State(state): State<AppState>,
    AppScope { caller, app: row }: AppScope,
    VerifiedJson(settings): VerifiedJson<AppSettings>,
) -> Result<Json<AppInfo>, ApiError> {
    let l = &settings.limits;
    let positive = [l.memory_mib, l.nofile, l.tmp_mib, l.data_mib].iter().all(|v| v.is_none_or(|v| v > 0))
        && l.pids.is_none_or(|p| p > 0)
        && l.cpu.is_none_or(|c| c >= 0.01 && c.is_finite());
    if !positive {
        return Err(ApiError::BadRequest("limits must be positive numbers, and cpu at least 0.01".into()));
    }
    super::deployments::check_args(&settings.args)?;
    if let Some(HealthSetting::Http { path }) = &settings.health {
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ApiError::BadRequest(format!(
                "health check path {path:?} must start with / and contain no spaces"
            )));
        }
    }
    settings.approval.check().map_err(ApiError::BadRequest)?;
    settings.scale.check().map_err(ApiError::BadRequest)?;
    if let Some(label) = &settings.fork_label {
        nx_protocol::api::check_fork_label(label).map_err(ApiError::BadRequest)?;
    }
    if let Some(link) = &settings.github {
        check_link(link)?;
    }
    if !caller.is_admin() {
        let current = &row.settings.0;
        if let Some(raised) = crate::limits::raised(&state.config, &current.limits, &settings.limits) {
            return Err(ApiError::Denied(format!(
                "raising {raised} needs the admin token; a deploy key may keep or lower its app's limits"
            )));
        }
        if settings.github != current.github {
            return Err(ApiError::Denied(
                "linking an app to a GitHub repository needs the admin token (`nx apps set APP --github owner/repo`)"
                    .into(),
            ));
        }
        // Who may push fork previews is part of the trust, as the link is:
        // it lets pull_request_target tokens in.
        if settings.preview_forks != current.preview_forks || settings.fork_label() != current.fork_label() {
            return Err(ApiError::Denied(
                "letting forks' pull requests be previewed (`[preview] forks`, `fork_label`) needs the admin token \
                 (`nx apps set APP --preview-forks label`); nx.toml may repeat what the admin set"
                    .into(),
            ));
        }
    }
    crate::limits::within_caps(&state.config, &settings.limits).map_err(|e| ApiError::Forbidden(e.to_string()))?;
    crate::limits::replicas_within_caps(&state.config, &settings.limits, &settings.scale).map_err(|e| match e {
        crate::limits::ReplicasRefused::OutOfRange { .. } => ApiError::BadRequest(e.to_string()),
        crate::limits::ReplicasRefused::OverCap { .. } => ApiError::Forbidden(e.to_string()),
    })?;
    // The body may have taken a while (its key was checked again once it
    // was in, [`VerifiedJson`]): the settings must still be the ones the
    // checks above compared against.
    if !state.db.set_settings_if(row.id, &row.settings.0, &settings).await? {
        return Err(ApiError::Conflict(format!(
            "app {}'s settings changed while this request was made, so nothing was changed; make the change \
             again from the settings as they are now (`nx apps set` reads them first)",
            row.name
        )));
    }
    let answer =
        changed(&state, &row, &caller, "settings", serde_json::to_value(&settings).map_err(ApiError::internal)?).await;
    // Sleeping deployments' sandboxes made ready for their wakes follow the
    // new limits and arguments now, not at the wake that would find them
    // changed (settings saved unchanged, as each push's nx.toml does, make
    // nothing again).
    if settings != row.settings.0 {
        let deployer = state.deployer.clone();
        let app_id = row.id;
        tokio::spawn(async move { deployer.remake_ready(app_id).await });
    }
    if (settings.replicas(), settings.preview_replicas()) != (row.settings.replicas(), row.settings.preview_replicas())
    {
        // Production and the running previews run as many replicas as asked
        // from now on; when one cannot (a replica fails to start), its state
        // and log say so.
        let deployer = state.deployer.clone();
        let app = row.name.clone();
        tokio::spawn(async move {
            if let Err(e) = deployer.scale(&app).await {
                tracing::error!(app, error = %e, "cannot change the replicas of the app's deployments");
            }
        });
    }
    answer
}

fn check_link(link: &GitHubLink) -> Result<(), ApiError> {
    if !nx_protocol::api::is_repository_name(&link.repository) {
        return Err(ApiError::BadRequest(format!(
            "GitHub repository {:?} must be written owner/name",
            link.repository
        )));
    }
    if let Some(trust) = &link.trust {
        trust.validate().map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    Ok(())
}

/// `PUT /v1/apps/{app}/github` (the admin's): links the app to a repository,
/// with or without a trust for its workflows' OIDC tokens, or unlinks it.
/// The repository's ids stay known when the name stays the same, unless they
/// were not proved (by GitHub or an OIDC token) and workflows are now
/// trusted: then the first push proved by an OIDC token learns them. A link
/// without a trust learns them from GitHub, when the receiver can ask it
/// (else from the admin's first push, or a proved one); a deploy key's push
/// never sets them.
pub async fn github(
    State(state): State<AppState>,
    AppScope { caller, app: row }: AppScope,
    VerifiedJson(req): VerifiedJson<SetGitHub>,
) -> Result<Json<AppInfo>, ApiError> {
    let link = match req.repository {
        None if req.trust.is_some() => {
            return Err(ApiError::BadRequest("a trust for workflows needs the repository they run in".into()))
        }
        None => None,
        Some(repository) => {
            let known = row.settings.github.as_ref().filter(|l| {
                l.repository.eq_ignore_ascii_case(&repository) && (l.owner_id.is_some() || req.trust.is_none())
            });
            let mut link = GitHubLink {
                repository,
                id: known.and_then(|l| l.id),
                owner_id: known.and_then(|l| l.owner_id),
                trust: req.trust,
            };
            check_link(&link)?;
            if let (None, None, Some(client)) = (link.id, &link.trust, &state.github_client) {
                if let Some((id, owner_id, name)) = client.repository_ids(&link.repository).await {
                    link = GitHubLink { repository: name, id: Some(id), owner_id: Some(owner_id), ..link };
                }
            }
            Some(link)
        }
    };
    state.db.set_link(row.id, link.as_ref()).await?;
    changed(&state, &row, &caller, "github.link", serde_json::to_value(&link).map_err(ApiError::internal)?).await
}

pub async fn show(State(state): State<AppState>, AppScope { app, .. }: AppScope) -> Result<Json<AppInfo>, ApiError> {
    Ok(Json(to_info(&state, &app)?))
}

/// Records a change of `row` in the audit log and answers with the app as
/// it is now.
async fn changed(
    state: &AppState,
    row: &AppRow,
    caller: &Caller,
    kind: &str,
    detail: serde_json::Value,
) -> Result<Json<AppInfo>, ApiError> {
    state.db.event(Some(&row.name), None, kind, &caller.actor(), detail).await?;
    let row = state.db.app(&row.name).await?.ok_or_else(|| ApiError::internal(anyhow::anyhow!("app vanished")))?;
    Ok(Json(to_info(state, &row)?))
}
