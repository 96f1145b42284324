//! `GET /v1/metrics` (every app the caller may see: the admin and read-only
//! keys see all, a deploy key its own app alone, as in `GET /v1/apps`) and
//! `GET /v1/apps/{app}/metrics` (one app, for whoever may read it): each
//! running deployment's traffic, resources and restarts, as counters since
//! its start that `nx top` turns into rates.

use axum::extract::State;
use axum::{Extension, Json};
use nx_protocol::metrics::MetricsSnapshot;

use super::auth::{AppScope, Caller};
use super::error::ApiError;
use super::AppState;
use crate::metrics::MetricsError;

impl From<MetricsError> for ApiError {
    fn from(e: MetricsError) -> Self {
        match e {
            MetricsError::Db(e) => e.into(),
            // Traffic is the router's to tell: without it the figures would lie.
            MetricsError::Router(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

pub async fn all(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<MetricsSnapshot>, ApiError> {
    Ok(Json(state.metrics.snapshot(&|app| caller.sees(app)).await?))
}

pub async fn app(
    State(state): State<AppState>,
    AppScope { app, .. }: AppScope,
) -> Result<Json<MetricsSnapshot>, ApiError> {
    Ok(Json(state.metrics.snapshot(&|name| name == app.name).await?))
}
