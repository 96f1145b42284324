//! The HTTP API: `fn app(state) -> Router`, so it can be driven with `oneshot`
//! in tests without binding a port.

pub mod apps;
pub mod auth;
pub mod database;
pub mod deployments;
pub mod error;
pub mod keys;
pub mod lifecycle;
pub mod ssh_keys;
pub mod status;

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use nx_protocol::api::Health;
use nx_protocol::target::ServerTarget;

use crate::config::ServeConfig;
use crate::databases::Databases;
use crate::db::Db;
use crate::deploy::Deployer;
use crate::pg::Cluster;
use crate::routing::RouterProcess;
use crate::secrets::MasterKey;
use crate::store::ArtifactStore;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    pub db: Db,
    pub master: Arc<MasterKey>,
    pub store: ArtifactStore,
    pub deployer: Arc<Deployer>,
    pub cluster: Arc<Cluster>,
    pub databases: Databases,
    /// The supervised router, unless it runs on its own (--no-router).
    pub router: Option<Arc<RouterProcess>>,
    pub config: Arc<ServeConfig>,
    pub target: Arc<ServerTarget>,
    /// When this receiver started serving.
    pub started: std::time::Instant,
    /// GitHub's webhooks, when a webhook secret is configured.
    pub github: Option<crate::github::webhook::Webhooks>,
}

/// The API router.
pub fn app(state: AppState) -> Router {
    let signed = Router::new()
        .route("/v1/apps", post(apps::create).get(apps::list))
        .route("/v1/apps/{app}", get(apps::show).delete(lifecycle::remove))
        .route("/v1/apps/{app}/env", get(lifecycle::env_list).patch(lifecycle::env_change))
        .route("/v1/apps/{app}/rollback", post(lifecycle::rollback))
        .route("/v1/apps/{app}/pulls/{pr}/close", post(lifecycle::close_pull))
        .route("/v1/status", get(status::status))
        .route("/v1/apps/{app}/settings", put(apps::settings))
        .route("/v1/apps/{app}/keys", post(keys::create).get(keys::list))
        .route("/v1/apps/{app}/keys/{id}", delete(keys::revoke))
        .route("/v1/apps/{app}/keys/{id}/rotate", post(keys::rotate))
        .route("/v1/apps/{app}/ssh-keys", post(ssh_keys::add).get(ssh_keys::list))
        .route("/v1/apps/{app}/ssh-keys/{id}", delete(ssh_keys::remove))
        .route("/v1/admin/token", post(keys::rotate_admin))
        .route("/v1/admin/router/reload", post(reload_router))
        .route("/v1/apps/{app}/db", get(database::credentials))
        .route("/v1/apps/{app}/db/dump", get(database::dump))
        .route("/v1/apps/{app}/db/restore", post(database::restore))
        .route("/v1/apps/{app}/db/backups", post(database::backup_to_store).get(database::backups))
        .route("/v1/apps/{app}/deployments", post(deployments::push).get(deployments::list))
        .route("/v1/apps/{app}/deployments/{id}", get(deployments::show))
        .route("/v1/apps/{app}/deployments/{id}/promote", post(deployments::promote))
        .route("/v1/apps/{app}/deployments/{id}/logs", get(deployments::logs))
        .route("/v1/apps/{app}/deployments/{id}/stop", post(deployments::stop))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::authenticate));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/target", get(target))
        // Signed by GitHub, not by nx: verified in the handler.
        .route("/v1/github/webhook", post(crate::github::webhook::receive))
        .merge(signed)
        .fallback(not_found)
        // Uploads are streamed and capped by the store, not buffered here.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn health() -> Json<Health> {
    Json(Health { ok: true, version: env!("CARGO_PKG_VERSION").to_owned() })
}

/// What binaries this server runs; unauthenticated, so `nx verify --server`
/// works before a key exists.
async fn target(State(state): State<AppState>) -> Json<ServerTarget> {
    Json((*state.target).clone())
}

/// `POST /v1/admin/router/reload`: a new nx-router process takes over the
/// listening sockets from the old one; no request is dropped.
async fn reload_router(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
) -> Result<axum::http::StatusCode, error::ApiError> {
    caller.require_admin()?;
    let router = state.router.as_ref().ok_or_else(|| {
        error::ApiError::Conflict("this receiver does not run nx-router (--no-router); reload it where it runs".into())
    })?;
    router.reload().await.map_err(error::ApiError::Unavailable)?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

async fn not_found(uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::NotFound(format!("no API route at {}; this receiver speaks /v1 (see `nx --help`)", uri.path()))
}
