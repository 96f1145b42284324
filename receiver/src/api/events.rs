//! `GET /v1/events`: the audit log, who did what and when. The admin and
//! read-only keys read every app's events (or one app's, `?app=`); a deploy
//! key reads its own app's alone. Nothing in the API writes or removes an
//! event: they are kept for `--events-retention`.

use axum::extract::{Query, State};
use axum::{Extension, Json};
use nx_protocol::api::EventInfo;
use serde::Deserialize;

use super::access::Role;
use super::auth::Caller;
use super::error::ApiError;
use super::AppState;

/// Events returned at most, and by default.
const MAX_LIMIT: i64 = 1000;
const DEFAULT_LIMIT: i64 = 100;

#[derive(Debug, Deserialize)]
pub struct EventQuery {
    app: Option<String>,
    /// How far back: a duration (`24h`, `7d`) or an RFC 3339 time.
    since: Option<String>,
    limit: Option<i64>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<EventQuery>,
) -> Result<Json<Vec<EventInfo>>, ApiError> {
    let app = match (&caller.role, q.app) {
        (
            Role::Deploy { app: own, .. } | Role::Workflow { app: own, .. } | Role::ForkPreview { app: own, .. },
            Some(asked),
        ) if asked != *own => {
            return Err(ApiError::Denied(format!(
                "the key {} belongs to app '{own}' and reads that app's events alone",
                caller.key_id
            )))
        }
        (Role::Deploy { app: own, .. } | Role::Workflow { app: own, .. } | Role::ForkPreview { app: own, .. }, _) => {
            Some(own.clone())
        }
        (Role::Admin | Role::ReadOnly, asked) => asked,
    };
    let since = match q.since.as_deref() {
        None => chrono::Utc::now() - chrono::Duration::days(1),
        Some(s) => since(s)?,
    };
    // A key of one app reads back to that app's making and no further: an
    // earlier app of the same name, removed with its events kept for their
    // time, was someone else's.
    let since = match (&caller.role, app.as_deref()) {
        (Role::Deploy { .. } | Role::Workflow { .. } | Role::ForkPreview { .. }, Some(own)) => {
            state.db.app(own).await?.map_or(since, |row| since.max(row.created_at))
        }
        _ => since,
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be 1 to {MAX_LIMIT}, not {limit}")));
    }
    Ok(Json(state.db.events(app.as_deref(), since, limit).await?))
}

/// `since` as a time: a duration back from now, or an RFC 3339 time.
fn since(s: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(at.with_timezone(&chrono::Utc));
    }
    let back = nx_protocol::units::parse_duration(s).map_err(|e| {
        ApiError::BadRequest(format!("since {s:?} is neither a duration (24h, 7d) nor an RFC 3339 time: {e}"))
    })?;
    let back =
        chrono::Duration::from_std(back).map_err(|_| ApiError::BadRequest(format!("since {s:?} is too far back")))?;
    chrono::Utc::now()
        .checked_sub_signed(back)
        .ok_or_else(|| ApiError::BadRequest(format!("since {s:?} is too far back")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_times_and_says_what_it_wants() {
        let day = since("24h").unwrap();
        let off = (chrono::Utc::now() - chrono::Duration::hours(24) - day).num_seconds().abs();
        assert!(off <= 1, "{off}");
        assert_eq!(since("2026-11-01T00:00:00Z").unwrap().to_rfc3339(), "2026-11-01T00:00:00+00:00");
        let e = since("yesterday").unwrap_err().to_string();
        assert!(e.starts_with("since \"yesterday\" is neither a duration (24h, 7d) nor an RFC 3339 time"), "{e}");
    }
}
