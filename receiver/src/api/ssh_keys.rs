//! `/v1/apps/{app}/ssh-keys`: the public keys that may upload to an app over
//! SFTP (`nx keys add-ssh APP KEYFILE.pub`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nx_protocol::api::{AddSshKey, SshKeyInfo};
use russh::keys::{Algorithm, HashAlg, PublicKey};

use super::auth::{AppScope, VerifiedJson};
use super::error::ApiError;
use super::AppState;
use crate::db::{NewSshKey, SshKeyRow};
use crate::secrets::random_lower;

fn info(k: SshKeyRow) -> SshKeyInfo {
    SshKeyInfo {
        id: k.id,
        fingerprint: k.fingerprint,
        algorithm: k.algorithm,
        comment: k.comment,
        created_at: k.created_at,
        last_used_at: k.last_used_at,
    }
}

/// A public key in the form the receiver stores and compares: OpenSSH
/// format without its comment.
pub fn canonical(key: &PublicKey) -> Result<String, ApiError> {
    PublicKey::new(key.key_data().clone(), "")
        .to_openssh()
        .map_err(|e| ApiError::BadRequest(format!("the key cannot be encoded: {e}")))
}

/// Parses and checks an `authorized_keys`-style line.
fn parse(line: &str) -> Result<PublicKey, ApiError> {
    let key = PublicKey::from_openssh(line.trim()).map_err(|e| {
        ApiError::BadRequest(format!(
            "this is not an OpenSSH public key ({e}); give the .pub file, like ~/.ssh/id_ed25519.pub"
        ))
    })?;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => Ok(key),
        Algorithm::Rsa { .. } => {
            let bits = key.key_data().rsa().map_or(0, |r| r.n.as_positive_bytes().map_or(0, |b| b.len() * 8));
            if bits < 2048 {
                return Err(ApiError::BadRequest(format!(
                    "this RSA key has {bits} bits; use at least 2048, or better an ed25519 key (ssh-keygen -t ed25519)"
                )));
            }
            Ok(key)
        }
        other => Err(ApiError::BadRequest(format!(
            "{} keys are not accepted; use an ed25519 key (ssh-keygen -t ed25519)",
            other.as_str()
        ))),
    }
}

pub async fn add(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    VerifiedJson(req): VerifiedJson<AddSshKey>,
) -> Result<(StatusCode, Json<SshKeyInfo>), ApiError> {
    let key = parse(&req.public_key)?;
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    let id = format!("ssh_{}", random_lower(10));
    let added = state
        .db
        .add_ssh_key(&NewSshKey {
            id: &id,
            app_id: app.id,
            fingerprint: &fingerprint,
            public_key: &canonical(&key)?,
            algorithm: key.algorithm().as_str(),
            comment: key.comment(),
        })
        .await?;
    if !added {
        return Err(ApiError::Conflict(format!("app '{}' has the key {fingerprint} already", app.name)));
    }
    state
        .db
        .event(Some(&app.name), None, "ssh-key.add", &caller.actor(), serde_json::json!({ "fingerprint": fingerprint }))
        .await?;
    let row = state.db.ssh_keys_of_app(app.id).await?.into_iter().find(|k| k.id == id);
    let row = row.ok_or_else(|| ApiError::internal(anyhow::anyhow!("ssh key {id} vanished")))?;
    Ok((StatusCode::CREATED, Json(info(row))))
}

pub async fn list(
    State(state): State<AppState>,
    AppScope { app, .. }: AppScope,
) -> Result<Json<Vec<SshKeyInfo>>, ApiError> {
    Ok(Json(state.db.ssh_keys_of_app(app.id).await?.into_iter().map(info).collect()))
}

pub async fn remove(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    Path((_, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    if !state.db.remove_ssh_key(app.id, &id).await? {
        return Err(ApiError::NotFound(format!(
            "app '{}' has no SSH key {id}; `nx keys ls {}` lists its keys",
            app.name, app.name
        )));
    }
    state.db.event(Some(&app.name), None, "ssh-key.remove", &caller.actor(), serde_json::json!({ "id": id })).await?;
    Ok(StatusCode::NO_CONTENT)
}
