//! `/v1/apps/{app}/deployments`: push a binary, list, show and promote.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use bytes::Bytes;
use nx_protocol::api::{DeploymentInfo, Promotion, PushMeta};
use nx_protocol::names::DeploymentId;
use nx_runtime::LogLimits;

use super::access::Role;
use super::auth::{AppScope, Caller};
use super::error::ApiError;
use super::AppState;
use crate::deploy::link::ForkPushRefused;
use crate::deploy::{DeployError, PushedBy};

/// How often an open log follow checks that its key still holds.
const FOLLOW_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Most arguments a push may carry, and their total size.
const MAX_ARGS: usize = 256;
const MAX_ARGS_BYTES: usize = 64 << 10;

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        match e {
            DeployError::Store(s) => s.into(),
            DeployError::NoPort { .. } => ApiError::Unavailable(e.to_string()),
            DeployError::UnknownDeployment { .. } | DeployError::Gone { .. } => ApiError::NotFound(e.to_string()),
            // The app's state, not the request, stands in the way, and waiting
            // does not clear it: 409, not 429 (which clients retry later).
            DeployError::NotHealthy { .. }
            | DeployError::NotRunning { .. }
            | DeployError::IsProduction { .. }
            | DeployError::ForkPreview { .. }
            | DeployError::TooManyRunning { .. }
            | DeployError::TooManyPreviewDatabases { .. }
            | DeployError::AppRemoving { .. } => ApiError::Conflict(e.to_string()),
            DeployError::TooManyVariables { .. } => ApiError::TooLarge(e.to_string()),
            DeployError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            DeployError::WillNotRun(_) => ApiError::Unprocessable(e.to_string()),
            DeployError::Artifact(a) => a.into(),
            DeployError::Database(d) => d.into(),
            DeployError::Db(_)
            | DeployError::Io { .. }
            | DeployError::Secret { .. }
            | DeployError::Volume(_)
            | DeployError::Cgroup(_)
            | DeployError::Root(_)
            | DeployError::Internal(_) => ApiError::internal(e),
        }
    }
}

fn parse_meta(caller: &Caller) -> Result<PushMeta, ApiError> {
    let Some(bytes) = &caller.meta else { return Ok(PushMeta::default()) };
    let meta: PushMeta = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("the push metadata (x-nx-meta) is not valid: {e}")))?;
    check_args(&meta.args)?;
    Ok(meta)
}

/// The arguments a deployment may be started with, from a push or from the
/// app's default arguments.
pub(super) fn check_args(args: &[String]) -> Result<(), ApiError> {
    let total: usize = args.iter().map(String::len).sum();
    if args.len() > MAX_ARGS || total > MAX_ARGS_BYTES {
        return Err(ApiError::BadRequest(format!("at most {MAX_ARGS} arguments of {MAX_ARGS_BYTES} bytes in all")));
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::BadRequest("arguments may not contain NUL bytes".into()));
    }
    Ok(())
}

/// Push: stream the binary in, verify it, store it by digest, run it, and answer
/// with the deployment once it is healthy (201) or failed (also 201, with the
/// error and the last log lines, so the client can show why).
pub async fn push(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    body: Body,
) -> Result<(StatusCode, Json<DeploymentInfo>), ApiError> {
    let limit = state.config.max_upload;
    let (body_len, length) = caller.upload_lengths("a push")?;
    if length > limit {
        return Err(ApiError::TooLarge(format!(
            "the binary is {length} bytes, over this receiver's limit of {limit}; raise --max-upload on the receiver or push a smaller binary"
        )));
    }
    let meta = admit(&state, &caller, &app).await?;
    // Its place among the uploads first: a push that has none costs nothing
    // more. Then its sandbox is made while the binary comes in; a push that
    // goes no further drops it, and with it the sandbox.
    let slot = state.store.upload_slot(app.store_ref())?;
    let ahead = state.deployer.ahead(&app, &meta, caller.github.as_ref()).await;
    let stream = body.into_data_stream();
    let upload =
        state.store.receive(app.store_ref(), Some(slot), stream, caller.upload_digest(), body_len, limit).await?;
    caller.still_valid(&state).await?;
    let actor = caller.actor();
    let by =
        PushedBy { proved: caller.github.as_ref(), may_link: caller.is_admin(), actor: &actor, ahead: ahead.as_ref() };
    let info = state.deployer.push(&app, upload, &meta, &by).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// What a push must pass before its binary is read: its metadata, the link
/// its GitHub proof (or its key) allows, its variables, and room for it.
async fn admit(state: &AppState, caller: &Caller, app: &crate::db::AppRow) -> Result<PushMeta, ApiError> {
    let mut meta = parse_meta(caller)?;
    match (&caller.github, &caller.role) {
        // A fork's code may have asked for the token: only the labeled commit.
        (Some(proved), Role::ForkPreview { .. }) => {
            crate::deploy::link::bind_fork(&state.db, app, &mut meta, proved).await.map_err(|e| match e {
                ForkPushRefused::Db(e) => ApiError::from(e),
                refused => ApiError::Forbidden(refused.to_string()),
            })?
        }
        // What the OIDC token proved replaces what the push says.
        (Some(proved), _) => crate::deploy::link::bind(&mut meta, proved).map_err(ApiError::Forbidden)?,
        (None, _) => crate::deploy::link::may_link(app, &meta, caller.is_admin()).map_err(ApiError::Forbidden)?,
    }
    crate::deploy::validate_env(&meta.env).map_err(ApiError::from)?;
    // Before the binary is read: a push the app has no room for costs no upload.
    state.deployer.check_room(app, &meta, caller.github.as_ref()).await?;
    Ok(meta)
}

pub async fn list(
    State(state): State<AppState>,
    AppScope { app, .. }: AppScope,
) -> Result<Json<Vec<DeploymentInfo>>, ApiError> {
    let rows = state.db.deployments_of_app(app.id, 100).await?;
    rows.iter().map(|r| state.deployer.info(r, Vec::new()).map_err(ApiError::from)).collect::<Result<_, _>>().map(Json)
}

async fn find_deployment(state: &AppState, app: &str, id: &str) -> Result<crate::db::DeploymentRow, ApiError> {
    DeploymentId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    match state.db.deployment(id).await? {
        Some(row) if row.app_name == app => Ok(row),
        _ => Err(DeployError::UnknownDeployment { app: app.into(), id: id.into() }.into()),
    }
}

pub async fn show(
    State(state): State<AppState>,
    AppScope { app, .. }: AppScope,
    Path((_, id)): Path<(String, String)>,
) -> Result<Json<DeploymentInfo>, ApiError> {
    let row = find_deployment(&state, &app.name, &id).await?;
    Ok(Json(state.deployer.info(&row, Vec::new())?))
}

pub async fn promote(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    Path((_, id)): Path<(String, String)>,
) -> Result<Json<Promotion>, ApiError> {
    let row = find_deployment(&state, &app.name, &id).await?;
    let previous = state.deployer.promote(&app, &row.id, &caller.actor()).await?;
    Ok(Json(super::lifecycle::promotion(&state, &app, &row.id, previous)?))
}

pub async fn stop(
    State(state): State<AppState>,
    AppScope { caller, app }: AppScope,
    Path((_, id)): Path<(String, String)>,
) -> Result<Json<DeploymentInfo>, ApiError> {
    let row = find_deployment(&state, &app.name, &id).await?;
    state.deployer.stop(&app, &row.id, &caller.actor(), Some("stopped with `nx stop`")).await?;
    let row = find_deployment(&state, &app.name, &id).await?;
    Ok(Json(state.deployer.info(&row, Vec::new())?))
}

/// `?lines=N&follow=true`
#[derive(Debug, serde::Deserialize)]
pub struct LogQuery {
    #[serde(default = "default_lines")]
    lines: usize,
    #[serde(default)]
    follow: bool,
}

fn default_lines() -> usize {
    100
}

/// `GET .../logs`: the last lines of a deployment's log as text, one per line;
/// with `follow`, then every new line until the deployment stops or the client
/// goes away.
pub async fn logs(
    State(state): State<AppState>,
    AppScope { app, caller }: AppScope,
    Path((_, id)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let row = find_deployment(&state, &app.name, &id).await?;
    let live = if q.follow { state.deployer.live_log(&row.id) } else { None };
    let path = state.deployer.log_path(&row.id);
    let lines = q.lines.min(100_000);
    let keep = LogLimits::default().keep_rotated;
    let (history, live) = tokio::task::spawn_blocking(move || match live {
        // The stored lines and a feed of what follows them, none twice.
        Some(log) => Ok::<_, std::io::Error>({
            let (history, feed, skip) = log.tail_then_follow(lines, keep);
            (history, Some((feed, skip)))
        }),
        None => Ok((nx_runtime::logs::read_recent(&path, lines, keep)?, None)),
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    let head = futures_util::stream::iter(
        history.into_iter().map(|l| Ok::<_, std::convert::Infallible>(Bytes::from(l + "\n"))),
    );
    let body = match live {
        None => axum::body::Body::from_stream(head),
        Some((rx, skip)) => {
            let stopping = state.stopping.clone();
            let recheck = tokio::time::interval_at(tokio::time::Instant::now() + FOLLOW_RECHECK, FOLLOW_RECHECK);
            let open = Some((rx, stopping, skip, recheck, (caller, state)));
            let tail = futures_util::stream::unfold(open, |open| async move {
                let (mut rx, mut stopping, mut skip, mut recheck, who) = open?;
                let received = loop {
                    let received = tokio::select! {
                        received = rx.recv() => Some(received),
                    // A follow never ends by itself: one open would hold a
                    // stopping receiver until its grace ran out.
                        _ = stopping.wait_for(|s| *s) => {
                            let note = "[nx] the receiver is stopping: this follow ends here; run it again once the receiver is back\n";
                            return Some((Ok(Bytes::from(note)), None));
                        }
                        _ = recheck.tick() => None,
                    };
                    // Revoking a leaked key cuts its holder off, open
                    // follows included.
                    // A failed lookup (the database restarting) ends nothing.
                    let Some(received) = received else {
                        if let Err(ApiError::Unauthorized(_)) = who.0.still_valid(&who.1).await {
                            let note = "[nx] the key this follow was opened with was revoked or replaced, or its app removed: it ends here\n";
                            return Some((Ok(Bytes::from(note)), None));
                        }
                        continue;
                    };
                    // The first lines are those the stored lines ended with.
                    match received {
                        Ok(_) if skip > 0 => skip -= 1,
                        other => break other,
                    }
                };
                match received {
                    Ok(line) => Some((Ok(Bytes::from(line + "\n")), Some((rx, stopping, 0, recheck, who)))),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let note = format!("[nx] {n} lines were skipped: the client read too slowly\n");
                        Some((Ok(Bytes::from(note)), Some((rx, stopping, 0, recheck, who))))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
                }
            });
            axum::body::Body::from_stream(futures_util::StreamExt::chain(head, tail))
        }
    };
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_mistakes_are_400s_and_the_platforms_faults_500s_without_their_cause() {
        let mistake = ApiError::from(DeployError::Invalid("FOO is set by the platform".into()));
        assert_eq!((mistake.status().as_u16(), mistake.to_string().as_str()), (400, "FOO is set by the platform"));
        let fault = ApiError::from(DeployError::Internal("stored deployment x is damaged: bad id".into()));
        assert_eq!((fault.status().as_u16(), fault.to_string().as_str()), (500, "internal error"));
    }
}
