//! `/v1/apps/{app}/keys` and `/v1/admin/token`: deploy keys are created,
//! listed, rotated and revoked; the admin token is rotated. Secrets are shown
//! once, in the answer that creates them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nx_protocol::api::{CreatedKey, KeyInfo};
use nx_protocol::auth::Credential;

use super::apps::find_app;
use super::auth::{Caller, VerifiedJson};
use super::error::ApiError;
use super::AppState;
use crate::apps::new_deploy_key;
use crate::db::{Db, KeyListing};
use crate::secrets::random_token;

fn info(k: KeyListing) -> KeyInfo {
    KeyInfo { id: k.id, kind: k.kind, created_at: k.created_at, last_used_at: k.last_used_at, revoked_at: k.revoked_at }
}

async fn listed(state: &AppState, app_id: i64, id: &str) -> Result<KeyInfo, ApiError> {
    let keys = state.db.keys_of_app(app_id).await?;
    keys.into_iter()
        .find(|k| k.id == id)
        .map(info)
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("key {id} vanished")))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    let app = find_app(&state, &caller, &app).await?;
    Ok(Json(state.db.keys_of_app(app.id).await?.into_iter().map(info).collect()))
}

/// Creates a deploy key; with `replaces`, revokes that one in the same
/// transaction (a rotation: there is never a moment without a valid key).
async fn create_inner(
    state: &AppState,
    caller: &Caller,
    app: &str,
    replaces: Option<&str>,
) -> Result<CreatedKey, ApiError> {
    let app = find_app(state, caller, app).await?;
    let key = new_deploy_key();
    let mut tx = state.db.begin().await?;
    if let Some(old) = replaces {
        if !Db::revoke_key(&mut tx, app.id, old).await? {
            return Err(ApiError::NotFound(format!(
                "app '{}' has no live key {old}; `nx keys ls {}` lists its keys",
                app.name, app.name
            )));
        }
    }
    Db::insert_key(&mut tx, key.key_id(), Some(app.id), "deploy", &state.master.seal_str(key.expose_secret())).await?;
    tx.commit().await?;
    let kind = if replaces.is_some() { "key.rotate" } else { "key.create" };
    state
        .db
        .event(
            Some(&app.name),
            None,
            kind,
            &caller.actor(),
            serde_json::json!({ "key": key.key_id(), "replaces": replaces }),
        )
        .await?;
    Ok(CreatedKey {
        info: listed(state, app.id, key.key_id()).await?,
        secret: key.expose_secret().to_owned(),
        replaces: replaces.map(str::to_owned),
    })
}

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    VerifiedJson(_): VerifiedJson<serde_json::Value>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    Ok((StatusCode::CREATED, Json(create_inner(&state, &caller, &app, None).await?)))
}

pub async fn rotate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((app, id)): Path<(String, String)>,
    VerifiedJson(_): VerifiedJson<serde_json::Value>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    Ok((StatusCode::CREATED, Json(create_inner(&state, &caller, &app, Some(&id)).await?)))
}

pub async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<KeyInfo>, ApiError> {
    let row = find_app(&state, &caller, &app).await?;
    let mut tx = state.db.begin().await?;
    if !Db::revoke_key(&mut tx, row.id, &id).await? {
        return Err(ApiError::NotFound(format!("app '{app}' has no live key {id}; `nx keys ls {app}` lists its keys")));
    }
    tx.commit().await?;
    state.db.event(Some(&row.name), None, "key.revoke", &caller.actor(), serde_json::json!({ "key": id })).await?;
    Ok(Json(listed(&state, row.id, &id).await?))
}

/// `POST /v1/admin/token`: a new admin token; the old one stops working at once.
pub async fn rotate_admin(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    VerifiedJson(_): VerifiedJson<serde_json::Value>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    caller.require_admin()?;
    let token = Credential::admin_token(&random_token(40));
    state.db.replace_admin_secret(&state.master.seal_str(token.expose_secret())).await?;
    state.db.event(None, None, "admin.rotate", &caller.actor(), serde_json::json!({})).await?;
    let now = chrono::Utc::now();
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            info: KeyInfo {
                id: token.key_id().to_owned(),
                kind: "admin".into(),
                created_at: now,
                last_used_at: None,
                revoked_at: None,
            },
            secret: token.expose_secret().to_owned(),
            replaces: Some("admin".into()),
        }),
    ))
}
