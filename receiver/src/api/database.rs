//! `/v1/apps/{app}/db`: credentials, dumps (streamed out), restores (streamed
//! in, swapped in only when they succeed), and verified backups kept in the
//! object store.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nx_protocol::api::{BackupInfo, DbCredentials};
use nx_protocol::auth::HEADER_CONTENT_SHA256;
use sha2::{Digest, Sha256};

use super::auth::AppScope;
use super::error::ApiError;
use super::AppState;
use crate::databases::DatabaseError;
use crate::db::BackupRow;

impl From<DatabaseError> for ApiError {
    fn from(e: DatabaseError) -> Self {
        use nx_cluster::provision::ProvisionError;
        match &e {
            DatabaseError::RestoreFailed(_) | DatabaseError::RestoreOverQuota { .. } => {
                ApiError::Unprocessable(e.to_string())
            }
            DatabaseError::Provision(ProvisionError::Connections { .. }) => ApiError::Unavailable(e.to_string()),
            DatabaseError::Provision(ProvisionError::Exists { .. }) => ApiError::Conflict(e.to_string()),
            _ => ApiError::internal(e),
        }
    }
}

fn info(b: BackupRow) -> BackupInfo {
    BackupInfo { id: b.id, size: b.size as u64, sha256: b.sha256, created_at: b.created_at, verified_at: b.verified_at }
}

async fn sha256_of(path: std::path::PathBuf) -> Result<(String, u64), ApiError> {
    tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        let n = std::io::copy(&mut f, &mut h)?;
        Ok((hex::encode(h.finalize()), n))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)
}

pub async fn credentials(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
) -> Result<Json<DbCredentials>, ApiError> {
    state.db.event(Some(&app.name), None, "db.credentials", &caller.actor(), serde_json::json!({})).await?;
    Ok(Json(state.databases.credentials(&app)?))
}

/// `GET .../db/dump`: `pg_dump -Fc` of the app's database. The dump is made in
/// full first, so a failure is an error answer, never a truncated file; the
/// answer carries its length and sha256 for the client to check.
pub async fn dump(State(state): State<AppState>, AppScope { caller, app }: AppScope) -> Result<Response, ApiError> {
    let path = state.databases.dump(&app).await?;
    let (sha, size) = sha256_of(path.clone()).await?;
    let file = tokio::fs::File::open(&path).await.map_err(ApiError::internal)?;
    // The open file stays readable; the name goes now, so nothing is left behind.
    let _ = std::fs::remove_file(&path);
    state
        .db
        .event(Some(&app.name), None, "db.backup", &caller.actor(), serde_json::json!({ "size": size, "sha256": sha }))
        .await?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
            (header::HeaderName::from_static(HEADER_CONTENT_SHA256), sha),
        ],
        body,
    )
        .into_response())
}

/// `POST .../db/restore`: the body is a `pg_dump -Fc` file.
pub async fn restore(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let (body_len, length) = caller.upload_lengths("a restore")?;
    let limit = state.config.max_upload;
    if length > limit {
        return Err(ApiError::TooLarge(format!(
            "the dump is {length} bytes, over the limit of {limit}; raise --max-upload"
        )));
    }
    let upload = state
        .store
        .receive(app.store_ref(), None, body.into_data_stream(), caller.upload_digest(), body_len, limit)
        .await?;
    caller.still_valid(&state).await?;
    state.databases.restore(&app, upload.path()).await?;
    state.db.event(Some(&app.name), None, "db.restore", &caller.actor(), serde_json::json!({ "size": length })).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize)]
pub struct KeepQuery {
    /// How many backups to keep (the newest); older ones are deleted.
    keep: Option<usize>,
}

/// `POST .../db/backups?keep=N`: a backup in the object store, reported only
/// once it was restored into a scratch database without error.
pub async fn backup_to_store(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    Query(q): Query<KeepQuery>,
) -> Result<(StatusCode, Json<BackupInfo>), ApiError> {
    let keep = q.keep.unwrap_or(7).max(1);
    let path = state.databases.dump(&app).await?;
    let result = async {
        state.databases.verify(&app, &path).await?;
        let (sha, size) = sha256_of(path.clone()).await?;
        // Two backups of unchanged data in one second have the same digest:
        // the random part keeps their names apart.
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let key = format!("backups/{}/{stamp}-{}.dump", app.name, crate::secrets::random_lower(8));
        state.store.put_file(&path, &key).await?;
        let row = state.db.insert_backup(app.id, &key, size as i64, &sha).await?;
        Ok::<_, ApiError>(row)
    }
    .await;
    let _ = std::fs::remove_file(&path);
    let row = result?;
    for old in state.db.backups(app.id).await?.into_iter().skip(keep) {
        state.store.delete_key(&old.object_key).await?;
        state.db.delete_backup(old.id).await?;
    }
    state
        .db
        .event(Some(&app.name), None, "db.backup.store", &caller.actor(), serde_json::json!({ "key": row.object_key }))
        .await?;
    Ok((StatusCode::CREATED, Json(info(row))))
}

pub async fn backups(
    State(state): State<AppState>,
    AppScope { app, .. }: AppScope,
) -> Result<Json<Vec<BackupInfo>>, ApiError> {
    Ok(Json(state.db.backups(app.id).await?.into_iter().map(info).collect()))
}
