//! An app's life after its pushes: variables, rollback, pull requests
//! closing, and removal.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use nx_protocol::api::{ClosedPull, EnvChange, EnvChanged, EnvVar, Promotion};
use nx_protocol::names::{AppName, DeploymentId};

use super::auth::{AppScope, VerifiedJson};
use super::error::ApiError;
use super::AppState;
use crate::db::AppRow;

fn ids(ids: Vec<String>) -> Vec<DeploymentId> {
    ids.iter().filter_map(|id| DeploymentId::parse(id).ok()).collect()
}

fn app_name(app: &AppRow) -> Result<AppName, ApiError> {
    AppName::parse(&app.name).map_err(|e| ApiError::internal(anyhow::anyhow!(e)))
}

/// The answer to a promotion or rollback.
pub(super) fn promotion(
    state: &AppState,
    app: &AppRow,
    production: &str,
    previous: Option<String>,
) -> Result<Promotion, ApiError> {
    Ok(Promotion {
        app: app_name(app)?,
        production: DeploymentId::parse(production).map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?,
        previous: previous.filter(|p| p != production).and_then(|p| DeploymentId::parse(&p).ok()),
        production_url: state.deployer.production_url(&app.name),
    })
}

async fn env_vars(state: &AppState, app: &AppRow) -> Result<Vec<EnvVar>, ApiError> {
    Ok(state.db.env_names(app.id).await?.into_iter().map(|(name, updated_at)| EnvVar { name, updated_at }).collect())
}

/// `GET /v1/apps/{app}/env`: the names of the app's variables, never values.
pub async fn env_list(
    State(state): State<AppState>,
    AppScope { app, .. }: AppScope,
) -> Result<Json<Vec<EnvVar>>, ApiError> {
    Ok(Json(env_vars(&state, &app).await?))
}

/// `PATCH /v1/apps/{app}/env`: sets and removes variables; running
/// deployments are brought onto them before the answer.
pub async fn env_change(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    VerifiedJson(change): VerifiedJson<EnvChange>,
) -> Result<Json<EnvChanged>, ApiError> {
    if change.set.is_empty() && change.unset.is_empty() {
        return Err(ApiError::BadRequest("nothing to change: name variables to set (KEY=VALUE) or unset (KEY)".into()));
    }
    let outcome = state.deployer.change_env(&app, &change, &caller.actor()).await?;
    let production = match outcome.production {
        Some((new, previous)) => Some(promotion(&state, &app, &new, previous)?),
        None => None,
    };
    Ok(Json(EnvChanged {
        vars: env_vars(&state, &app).await?,
        changed: outcome.changed,
        restarted: ids(outcome.restarted),
        production,
        failed: outcome
            .failed
            .into_iter()
            .filter_map(|(id, why)| Some((DeploymentId::parse(&id).ok()?, why)))
            .collect(),
    }))
}

/// `POST /v1/apps/{app}/rollback`: the previous production becomes production
/// again.
pub async fn rollback(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
) -> Result<Json<Promotion>, ApiError> {
    let (production, previous) = state.deployer.rollback(&app, &caller.actor()).await?;
    Ok(Json(promotion(&state, &app, &production, previous)?))
}

/// `POST /v1/apps/{app}/pulls/{pr}/close`: stops the pull request's previews.
pub async fn close_pull(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    Path((_, pr)): Path<(String, u64)>,
) -> Result<Json<ClosedPull>, ApiError> {
    let stopped = state.deployer.close_pull_request(&app, pr, &caller.actor()).await?;
    Ok(Json(ClosedPull { app: app_name(&app)?, pr, stopped: ids(stopped) }))
}

/// `?confirm=NAME`
#[derive(Debug, serde::Deserialize)]
pub struct Confirm {
    confirm: Option<String>,
}

/// `DELETE /v1/apps/{app}?confirm={app}`: removes the app with its database,
/// data, deployments, keys and backups. Admin only, and the name must be
/// repeated, since nothing of it can be brought back.
pub async fn remove(
    State(state): State<AppState>,
    AppScope { caller, app: row }: AppScope,
    Query(q): Query<Confirm>,
) -> Result<StatusCode, ApiError> {
    let app = &row.name;
    if q.confirm.as_deref() != Some(app.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "removing app {app} deletes its database, data, deployments and backups for good; confirm with ?confirm={app} (`nx apps rm {app} --yes`)"
        )));
    }
    state.deployer.remove_app(&row, &caller.actor()).await?;
    // Its drains went with its row: stop them now, before a new app of the
    // same name could have records shipped to the old one's drains.
    if let Err(e) = state.drains.reload().await {
        tracing::warn!(app, error = %e, "cannot stop the removed app's log drains; they stop at the next reload");
    }
    Ok(StatusCode::NO_CONTENT)
}
