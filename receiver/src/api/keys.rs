//! `/v1/apps/{app}/keys`, `/v1/keys` and `/v1/admin/token`: deploy keys and
//! read-only keys are created, listed, rotated and revoked; the admin token is
//! rotated. Secrets are shown once, in the answer that creates them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use nx_protocol::api::{CreatedKey, KeyInfo};
use nx_protocol::auth::Credential;

use super::auth::{AppScope, Caller, VerifiedJson};
use super::error::ApiError;
use super::AppState;
use crate::apps::new_deploy_key;
use crate::db::{AppRow, Db, KeyListing};
use crate::secrets::random_token;

fn info(k: KeyListing) -> KeyInfo {
    KeyInfo { id: k.id, kind: k.kind, created_at: k.created_at, last_used_at: k.last_used_at, revoked_at: k.revoked_at }
}

/// Whose keys: an app's deploy keys, or the platform's read-only keys.
#[derive(Debug, Clone, Copy)]
enum Owner<'a> {
    App(&'a AppRow),
    Platform,
}

impl Owner<'_> {
    fn app_id(self) -> Option<i64> {
        match self {
            Owner::App(app) => Some(app.id),
            Owner::Platform => None,
        }
    }

    /// Where the audit log files the event, and how to list the keys.
    fn event_app(self) -> Option<String> {
        match self {
            Owner::App(app) => Some(app.name.clone()),
            Owner::Platform => None,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Owner::App(_) => "deploy",
            Owner::Platform => "read",
        }
    }
}

fn no_such_key(owner: Owner<'_>, id: &str) -> ApiError {
    ApiError::NotFound(match owner {
        Owner::App(app) => format!("app '{0}' has no live key {id}; `nx keys ls {0}` lists its keys", app.name),
        Owner::Platform => format!("there is no live read-only key {id}; `nx keys ls` without an app lists them"),
    })
}

async fn listed(state: &AppState, owner: Owner<'_>, id: &str) -> Result<KeyInfo, ApiError> {
    let keys = state.db.keys_of(owner.app_id()).await?;
    keys.into_iter()
        .find(|k| k.id == id)
        .map(info)
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("key {id} vanished")))
}

/// Creates a key; with `replaces`, revokes that one in the same transaction
/// (a rotation: there is never a moment without a valid key).
async fn create_inner(
    state: &AppState,
    caller: &Caller,
    owner: Owner<'_>,
    replaces: Option<&str>,
) -> Result<CreatedKey, ApiError> {
    let key = new_deploy_key();
    let mut tx = state.db.begin().await?;
    let drains = match replaces {
        Some(old) => retire(&mut tx, owner, old).await?,
        None => Vec::new(),
    };
    Db::insert_key(&mut tx, key.key_id(), owner.app_id(), owner.kind(), &state.master.seal_str(key.expose_secret()))
        .await?;
    tx.commit().await?;
    if !drains.is_empty() {
        state.drains.reload().await?;
    }
    let (kind, detail) = match replaces {
        Some(old) => (
            "key.rotate",
            serde_json::json!({ "key": key.key_id(), "kind": owner.kind(), "replaces": old, "drains_removed": drains }),
        ),
        None => ("key.create", serde_json::json!({ "key": key.key_id(), "kind": owner.kind(), "replaces": null })),
    };
    state.db.event(owner.event_app().as_deref(), None, kind, &caller.actor(), detail).await?;
    Ok(CreatedKey {
        info: listed(state, owner, key.key_id()).await?,
        secret: key.expose_secret().to_owned(),
        replaces: replaces.map(str::to_owned),
    })
}

/// Revokes key `id` in `tx`, a revocation's or a rotation's, and removes the
/// drains it added, which it returns. A drain is a channel its adder keeps:
/// a leaked key's holder would go on reading the app's output through one,
/// whether the key was revoked or rotated away (the event lists them, to add
/// again with a key that stays).
async fn retire(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    owner: Owner<'_>,
    id: &str,
) -> Result<Vec<String>, ApiError> {
    if !Db::revoke_key(tx, owner.app_id(), id).await? {
        return Err(no_such_key(owner, id));
    }
    Ok(match owner {
        Owner::App(app) => Db::remove_drains_added_by(tx, app.id, &format!("key:{id}@{}", app.name)).await?,
        Owner::Platform => Vec::new(),
    })
}

async fn revoke_inner(state: &AppState, caller: &Caller, owner: Owner<'_>, id: &str) -> Result<KeyInfo, ApiError> {
    let mut tx = state.db.begin().await?;
    let drains = retire(&mut tx, owner, id).await?;
    tx.commit().await?;
    if !drains.is_empty() {
        state.drains.reload().await?;
    }
    state
        .db
        .event(
            owner.event_app().as_deref(),
            None,
            "key.revoke",
            &caller.actor(),
            serde_json::json!({ "key": id, "drains_removed": drains }),
        )
        .await?;
    listed(state, owner, id).await
}

pub async fn list(
    State(state): State<AppState>,
    AppScope { app, .. }: AppScope,
) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    Ok(Json(state.db.keys_of(Some(app.id)).await?.into_iter().map(info).collect()))
}

pub async fn create(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    VerifiedJson(_): VerifiedJson<serde_json::Value>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    Ok((StatusCode::CREATED, Json(create_inner(&state, &caller, Owner::App(&app), None).await?)))
}

pub async fn rotate(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    Path((_, id)): Path<(String, String)>,
    VerifiedJson(_): VerifiedJson<serde_json::Value>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    Ok((StatusCode::CREATED, Json(create_inner(&state, &caller, Owner::App(&app), Some(&id)).await?)))
}

pub async fn revoke(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    Path((_, id)): Path<(String, String)>,
) -> Result<Json<KeyInfo>, ApiError> {
    Ok(Json(revoke_inner(&state, &caller, Owner::App(&app), &id).await?))
}

/// `GET /v1/keys`: the admin token and the read-only keys, without secrets.
pub async fn list_platform(State(state): State<AppState>) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    Ok(Json(state.db.keys_of(None).await?.into_iter().map(info).collect()))
}

/// `POST /v1/keys`: a read-only key, for dashboards and monitoring.
pub async fn create_read_only(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    VerifiedJson(_): VerifiedJson<serde_json::Value>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    Ok((StatusCode::CREATED, Json(create_inner(&state, &caller, Owner::Platform, None).await?)))
}

/// `DELETE /v1/keys/{id}`: revokes a read-only key.
pub async fn revoke_platform(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    Ok(Json(revoke_inner(&state, &caller, Owner::Platform, &id).await?))
}

/// `POST /v1/admin/token`: a new admin token; the old one stops working at once.
pub async fn rotate_admin(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    VerifiedJson(_): VerifiedJson<serde_json::Value>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
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
