//! Log drains: `/v1/apps/{app}/drains` (an app's: adding and removing is
//! `Action::Drains`, listing `ReadApp`) and `/v1/drains` (platform-wide,
//! every app's records: `Action::Platform`). The URL is sealed at rest and
//! never echoed back: answers and errors show it masked.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nx_protocol::api::{AddDrain, DrainInfo};
use rand::RngCore;

use super::auth::{AppScope, Caller, VerifiedJson};
use super::error::ApiError;
use super::AppState;
use crate::db::{DrainRow, NewDrain};
use crate::drains::target::{self, Target, TargetError};

/// Drains one app may have, and the platform.
pub const MAX_DRAINS: i64 = 5;

impl From<TargetError> for ApiError {
    fn from(e: TargetError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

fn info(row: &DrainRow) -> DrainInfo {
    DrainInfo {
        id: row.id.clone(),
        app: row.app_name.clone(),
        url: row.shown.clone(),
        created_at: row.created_at,
        created_by: row.created_by.clone(),
    }
}

/// Whose drains: an app's (id and name) or the platform's.
type Owner<'a> = Option<(i64, &'a str)>;

async fn list_of(state: &AppState, owner: Owner<'_>) -> Result<Json<Vec<DrainInfo>>, ApiError> {
    let rows = state.db.drains_of(owner.map(|(id, _)| id)).await?;
    Ok(Json(rows.iter().map(info).collect()))
}

async fn add_to(
    state: &AppState,
    caller: &Caller,
    owner: Owner<'_>,
    req: AddDrain,
) -> Result<(StatusCode, Json<DrainInfo>), ApiError> {
    Target::parse(&req.url, state.drains.settings().reach)?;
    let parsed = url::Url::parse(req.url.trim()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let shown = target::shown(&parsed);
    let mut bytes = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut bytes);
    let id = format!("dr{}", hex::encode(bytes));
    let sealed = state.master.seal_str(req.url.trim());
    let new = NewDrain {
        id: &id,
        app_id: owner.map(|(id, _)| id),
        url_sealed: &sealed,
        shown: &shown,
        created_by: &caller.actor(),
    };
    let row = state.db.add_drain(&new, MAX_DRAINS).await?.ok_or_else(|| {
        ApiError::Conflict(match owner {
            Some((_, app)) => format!(
                "app '{app}' has {MAX_DRAINS} log drains, the most an app may have; remove one first \
                 (`nx drains ls {app}`, `nx drains rm {app} ID`)"
            ),
            None => format!(
                "the platform has {MAX_DRAINS} log drains, the most it may have; remove one first \
                 (`nx drains ls --platform`, `nx drains rm --platform ID`)"
            ),
        })
    })?;
    let app = owner.map(|(_, name)| name);
    state.db.event(app, None, "drain.add", &caller.actor(), serde_json::json!({ "drain": id, "url": shown })).await?;
    state.drains.reload().await?;
    Ok((StatusCode::CREATED, Json(info(&row))))
}

async fn remove_from(state: &AppState, caller: &Caller, owner: Owner<'_>, id: &str) -> Result<StatusCode, ApiError> {
    let missing = || {
        ApiError::NotFound(match owner {
            Some((_, app)) => format!("app '{app}' has no log drain {id}; `nx drains ls {app}` lists them"),
            None => format!("the platform has no log drain {id}; `nx drains ls --platform` lists them"),
        })
    };
    let adder = state.db.drain_adder(owner.map(|(id, _)| id), id).await?.ok_or_else(missing)?;
    // The admin's drain is the admin's record of the app, kept off the host:
    // a leaked deploy key would remove it first, then act unseen.
    if adder == "admin" && !caller.is_admin() {
        return Err(ApiError::Denied(format!(
            "log drain {id} was added by the admin key, and only the admin key removes it              (this key removes the drains keys of its app added)"
        )));
    }
    if !state.db.remove_drain(owner.map(|(id, _)| id), id).await? {
        return Err(missing());
    }
    let app = owner.map(|(_, name)| name);
    state.db.event(app, None, "drain.remove", &caller.actor(), serde_json::json!({ "drain": id })).await?;
    state.drains.reload().await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list(
    State(state): State<AppState>,
    AppScope { app, .. }: AppScope,
) -> Result<Json<Vec<DrainInfo>>, ApiError> {
    list_of(&state, Some((app.id, &app.name))).await
}

/// `POST /v1/apps/{app}/drains`.
pub async fn add(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    VerifiedJson(req): VerifiedJson<AddDrain>,
) -> Result<(StatusCode, Json<DrainInfo>), ApiError> {
    add_to(&state, &caller, Some((app.id, &app.name)), req).await
}

/// `DELETE /v1/apps/{app}/drains/{id}`.
pub async fn remove(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    Path((_, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    remove_from(&state, &caller, Some((app.id, &app.name)), &id).await
}

/// `GET /v1/drains`: the platform-wide drains.
pub async fn list_platform(State(state): State<AppState>) -> Result<Json<Vec<DrainInfo>>, ApiError> {
    list_of(&state, None).await
}

/// `POST /v1/drains`: a drain of every app's records and the platform's events.
pub async fn add_platform(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    VerifiedJson(req): VerifiedJson<AddDrain>,
) -> Result<(StatusCode, Json<DrainInfo>), ApiError> {
    add_to(&state, &caller, None, req).await
}

/// `DELETE /v1/drains/{id}`.
pub async fn remove_platform(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    remove_from(&state, &caller, None, &id).await
}
