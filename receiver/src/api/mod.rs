//! The HTTP API: `fn app(state) -> Router`, so it can be driven with `oneshot`
//! in tests without binding a port.

pub mod access;
pub mod apps;
pub mod auth;
pub mod database;
pub mod deployments;
pub mod domains;
pub mod drains;
pub mod error;
pub mod events;
pub mod keys;
pub mod lifecycle;
pub mod metrics;
pub mod ssh_keys;
pub mod status;
pub mod webhook;

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post, MethodFilter};
use axum::{Json, Router};
use nx_protocol::api::Health;
use nx_protocol::target::ServerTarget;

use crate::config::ServeConfig;
use crate::databases::Databases;
use crate::db::Db;
use crate::deploy::Deployer;
use crate::routing::RouterProcess;
use crate::secrets::MasterKey;
use nx_cluster::Cluster;
use nx_store::ArtifactStore;

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
    /// Asks GitHub about repositories, when a token or a GitHub App is configured.
    pub github_client: Option<Arc<crate::github::client::Client>>,
    /// Verifies the GitHub Actions OIDC tokens workflows push with.
    pub oidc: Arc<crate::github::oidc::Verifier>,
    /// Where the metrics API reads its figures.
    pub metrics: crate::metrics::Sources,
    /// Publishes route tables (a domain verified or removed changes them).
    pub routes: Arc<crate::routing::RoutePublisher>,
    /// Ships apps' logs to their drains.
    pub drains: Arc<crate::drains::Hub>,
    /// Obtains certificates for verified domains, unless ACME is off.
    pub acme: Option<Arc<crate::domains::acme::Acme>>,
    /// Turns true once the deployments are reconciled after the start.
    pub reconciled: tokio::sync::watch::Receiver<bool>,
    /// Turns true when the receiver is told to stop: endless streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// Declares every signed route once, with the action it performs: the list
/// becomes both [`SIGNED_ROUTES`] (the authorization table the tests walk) and
/// the routes themselves, each behind a guard for its action. A signed route
/// cannot be added without saying who may call it.
macro_rules! signed_routes {
    ($($method:ident $path:literal $action:ident => $handler:path,)*) => {
        /// Every signed route: method, path and the action it performs.
        pub const SIGNED_ROUTES: &[(&str, &str, access::Action)] =
            &[$((stringify!($method), $path, access::Action::$action),)*];

        fn signed(state: &AppState) -> Router<AppState> {
            let mut router = Router::new();
            $(
                router = router.route(
                    $path,
                    axum::routing::on(MethodFilter::$method, $handler).route_layer(
                        axum::middleware::from_fn_with_state(
                            auth::Guard::new(state, access::Action::$action),
                            auth::authorize,
                        ),
                    ),
                );
            )*
            router
        }
    };
}

signed_routes! {
    GET "/v1/status" Status => status::status,
    GET "/v1/events" Status => events::list,
    GET "/v1/apps" ListApps => apps::list,
    GET "/v1/metrics" ListApps => metrics::all,
    POST "/v1/apps" CreateApp => apps::create,
    GET "/v1/apps/{app}" ReadApp => apps::show,
    GET "/v1/apps/{app}/metrics" ReadApp => metrics::app,
    DELETE "/v1/apps/{app}" RemoveApp => lifecycle::remove,
    PUT "/v1/apps/{app}/settings" Configure => apps::settings,
    PUT "/v1/apps/{app}/github" LinkRepository => apps::github,
    GET "/v1/apps/{app}/domains" ReadApp => domains::list,
    POST "/v1/apps/{app}/domains" Domains => domains::add,
    POST "/v1/apps/{app}/domains/{domain}/verify" Domains => domains::verify,
    DELETE "/v1/apps/{app}/domains/{domain}" Domains => domains::remove,
    GET "/v1/apps/{app}/drains" ReadApp => drains::list,
    POST "/v1/apps/{app}/drains" Drains => drains::add,
    DELETE "/v1/apps/{app}/drains/{id}" Drains => drains::remove,
    GET "/v1/apps/{app}/env" ReadApp => lifecycle::env_list,
    PATCH "/v1/apps/{app}/env" SetEnv => lifecycle::env_change,
    POST "/v1/apps/{app}/rollback" Deploy => lifecycle::rollback,
    POST "/v1/apps/{app}/pulls/{pr}/close" Deploy => lifecycle::close_pull,
    GET "/v1/apps/{app}/deployments" ReadApp => deployments::list,
    POST "/v1/apps/{app}/deployments" Push => deployments::push,
    GET "/v1/apps/{app}/deployments/{id}" ReadApp => deployments::show,
    POST "/v1/apps/{app}/deployments/{id}/promote" Deploy => deployments::promote,
    GET "/v1/apps/{app}/deployments/{id}/logs" ReadApp => deployments::logs,
    POST "/v1/apps/{app}/deployments/{id}/stop" Deploy => deployments::stop,
    GET "/v1/apps/{app}/keys" ReadKeys => keys::list,
    POST "/v1/apps/{app}/keys" ManageKeys => keys::create,
    DELETE "/v1/apps/{app}/keys/{id}" ManageKeys => keys::revoke,
    POST "/v1/apps/{app}/keys/{id}/rotate" ManageKeys => keys::rotate,
    GET "/v1/apps/{app}/ssh-keys" ReadKeys => ssh_keys::list,
    POST "/v1/apps/{app}/ssh-keys" ManageKeys => ssh_keys::add,
    DELETE "/v1/apps/{app}/ssh-keys/{id}" ManageKeys => ssh_keys::remove,
    GET "/v1/apps/{app}/db" Database => database::credentials,
    GET "/v1/apps/{app}/db/dump" Database => database::dump,
    POST "/v1/apps/{app}/db/restore" Database => database::restore,
    GET "/v1/apps/{app}/db/backups" ReadApp => database::backups,
    POST "/v1/apps/{app}/db/backups" Database => database::backup_to_store,
    GET "/v1/keys" Platform => keys::list_platform,
    POST "/v1/keys" Platform => keys::create_read_only,
    DELETE "/v1/keys/{id}" Platform => keys::revoke_platform,
    GET "/v1/drains" Platform => drains::list_platform,
    POST "/v1/drains" Platform => drains::add_platform,
    DELETE "/v1/drains/{id}" Platform => drains::remove_platform,
    POST "/v1/admin/token" Platform => keys::rotate_admin,
    POST "/v1/admin/router/reload" Platform => reload_router,
}

/// The API router.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/target", get(target))
        // Signed by GitHub, not by nx: verified in the handler.
        .route("/v1/github/webhook", post(webhook::receive))
        .merge(signed(&state))
        .fallback(not_found)
        // Uploads are streamed and capped by the store, not buffered here.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Json<Health> {
    let reconciled = *state.reconciled.borrow();
    Json(Health { ok: true, version: env!("CARGO_PKG_VERSION").to_owned(), reconciled })
}

/// What binaries this server runs; unauthenticated, so `nx verify --server`
/// works before a key exists.
async fn target(State(state): State<AppState>) -> Json<ServerTarget> {
    Json((*state.target).clone())
}

/// `POST /v1/admin/router/reload`: a new nx-router process takes over the
/// listening sockets from the old one; no request is dropped.
async fn reload_router(State(state): State<AppState>) -> Result<axum::http::StatusCode, error::ApiError> {
    let router = state.router.as_ref().ok_or_else(|| {
        error::ApiError::Conflict("this receiver does not run nx-router (--no-router); reload it where it runs".into())
    })?;
    router.reload().await.map_err(error::ApiError::Unavailable)?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

async fn not_found(uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::NotFound(format!("no API route at {}; this receiver speaks /v1 (see `nx --help`)", uri.path()))
}
