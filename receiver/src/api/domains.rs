//! `/v1/apps/{app}/domains`: custom domains of an app's production. Adding,
//! verifying and removing one is the admin's (`Action::Domains`); reading
//! them is `ReadApp`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nx_protocol::api::{AddDomain, DomainInfo};

use super::auth::{AppScope, VerifiedJson};
use super::error::ApiError;
use super::AppState;
use crate::db::{Added, DomainRow};
use crate::domains;

impl From<domains::NameError> for ApiError {
    fn from(e: domains::NameError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

fn to_info(state: &AppState, row: &DomainRow) -> Result<DomainInfo, ApiError> {
    domains::info(row, &state.config)
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("stored app name {:?} is invalid", row.app_name)))
}

/// The domain `name` of the app, or 404 saying so.
async fn attached(state: &AppState, app: &crate::db::AppRow, name: &str) -> Result<DomainRow, ApiError> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    state.db.domain(&name).await?.filter(|d| d.app_id == app.id).ok_or_else(|| {
        ApiError::NotFound(format!(
            "app '{}' has no domain {name}; `nx domains ls {}` lists its domains",
            app.name, app.name
        ))
    })
}

pub async fn list(
    State(state): State<AppState>,
    AppScope { app, .. }: AppScope,
) -> Result<Json<Vec<DomainInfo>>, ApiError> {
    let rows = state.db.app_domains(app.id).await?;
    rows.iter().map(|r| to_info(&state, r)).collect::<Result<Vec<_>, _>>().map(Json)
}

/// `POST /v1/apps/{app}/domains`: attaches a name; it is served once `verify` finds its records.
pub async fn add(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    VerifiedJson(req): VerifiedJson<AddDomain>,
) -> Result<(StatusCode, Json<DomainInfo>), ApiError> {
    let name = domains::normalize(&req.domain, &state.config)?;
    let row = match state.db.add_domain(app.id, &name, &domains::new_token()).await? {
        Added::Added(row) => row,
        Added::Taken { app: owner } if owner == app.name => {
            return Err(ApiError::Conflict(format!("{name} is attached to app '{owner}' already")))
        }
        Added::Taken { .. } => {
            // Which other app holds it is that app's business.
            return Err(ApiError::Conflict(format!(
                "{name} is attached to another app; a domain belongs to one app at most (remove it there first)"
            )));
        }
        Added::Full { domain } => {
            return Err(ApiError::Conflict(format!(
                "app '{}' has the domain {domain} already; an app has one custom domain (`nx domains rm {} {domain}` first)",
                app.name, app.name
            )))
        }
    };
    state.db.event(Some(&app.name), None, "domain.add", &caller.actor(), serde_json::json!({ "domain": name })).await?;
    Ok((StatusCode::CREATED, Json(to_info(&state, &row)?)))
}

/// `POST /v1/apps/{app}/domains/{domain}/verify`: looks the records up; 422
/// saying what is missing, else the domain is served from now on and its
/// certificate is asked for.
pub async fn verify(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    Path((_, name)): Path<(String, String)>,
) -> Result<Json<DomainInfo>, ApiError> {
    let row = attached(&state, &app, &name).await?;
    let resolver = domains::resolver(&state.config)
        .map_err(|e| ApiError::Unavailable(format!("cannot set up a DNS resolver (--dns-resolver): {e}")))?;
    let missing = domains::missing(&resolver, &row, &state.config).await;
    if !missing.is_empty() {
        // A domain verified before whose records are gone: a certificate
        // attempt that is due is refused now rather than at the next round,
        // so `nx domains ls` says why at once.
        if let (Some(acme), Some(_)) = (&state.acme, row.verified_at) {
            acme.wake();
        }
        return Err(ApiError::Unprocessable(format!("{} is not verified: {}", row.name, missing.join("; "))));
    }
    let first = row.verified_at.is_none();
    state.db.set_domain_verified(row.id).await?;
    if first {
        state
            .db
            .event(Some(&app.name), None, "domain.verify", &caller.actor(), serde_json::json!({ "domain": row.name }))
            .await?;
        let _ = state.routes.publish().await;
    }
    if let Some(acme) = &state.acme {
        acme.wake();
    }
    let row = attached(&state, &app, &row.name).await?;
    Ok(Json(to_info(&state, &row)?))
}

/// `DELETE /v1/apps/{app}/domains/{domain}`: no longer served, certificate forgotten.
pub async fn remove(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    Path((_, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let row = attached(&state, &app, &name).await?;
    state.db.remove_domain(app.id, &row.name).await?;
    state
        .db
        .event(Some(&app.name), None, "domain.remove", &caller.actor(), serde_json::json!({ "domain": row.name }))
        .await?;
    let _ = state.routes.publish().await;
    Ok(StatusCode::NO_CONTENT)
}
