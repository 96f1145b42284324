//! `GET /v1/status`: what `nx status` shows, for any valid key; a deploy key
//! sees the counts of its own app alone.

use axum::extract::State;
use axum::{Extension, Json};
use nx_protocol::api::{ServerStatus, WildcardInfo};

use super::access::Role;
use super::auth::Caller;
use super::error::ApiError;
use super::AppState;

pub async fn status(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<ServerStatus>, ApiError> {
    let only = match caller.role {
        // A workflow never gets here (decide refuses it Status); were it let
        // through, it would see its own app alone.
        Role::Deploy { app_id, .. } | Role::Workflow { app_id, .. } | Role::ForkPreview { app_id, .. } => Some(app_id),
        Role::Admin | Role::ReadOnly => None,
    };
    let (apps, states) = state.db.counts(only).await?;
    let quotas = state.cluster.quota_states();
    let databases_over_quota = state
        .db
        .apps()
        .await?
        .into_iter()
        .filter(|a| caller.sees(&a.name))
        .filter_map(|a| {
            let info = crate::apps::info(&a, &state.config, quotas.get(&a.db_name))?;
            Some((a.name, info.database_quota?))
        })
        .collect();
    let config = &state.config;
    let database = match &config.database_url {
        Some(_) => "external PostgreSQL".to_owned(),
        None => format!("embedded PostgreSQL on {}", state.cluster.endpoint().port),
    };
    Ok(Json(ServerStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_secs: state.started.elapsed().as_secs(),
        domain: config.domain.clone(),
        apps: apps as u64,
        deployments: states.into_iter().map(|(s, n)| (s, n as u64)).collect(),
        database,
        store: state.store.describe().to_owned(),
        router: if state.router.is_some() { "supervised" } else { "separate (--no-router)" }.to_owned(),
        default_limits: state.deployer.default_limits(),
        isolation: state.deployer.isolation(),
        max_upload_bytes: config.max_upload,
        preview_idle_secs: config.preview_idle.as_secs(),
        keep_deployments: config.keep_deployments,
        databases_over_quota,
        wildcards: if only.is_none() { wildcards(&state).await? } else { Vec::new() },
    }))
}

/// Each wildcard certificate asked for, as far as it got (none yet before
/// the first attempt).
async fn wildcards(state: &AppState) -> Result<Vec<WildcardInfo>, ApiError> {
    let rows = state.db.wildcards().await?;
    Ok(state
        .config
        .wildcard_domains()
        .into_iter()
        .map(|domain| {
            let row = rows.iter().find(|r| r.domain == domain);
            WildcardInfo {
                name: format!("*.{domain}"),
                issuer: row.and_then(|r| r.issuer.clone()),
                expires_at: row.and_then(|r| r.expires_at),
                last_error: row.and_then(|r| r.last_error.clone()),
                next_attempt_at: row.and_then(|r| r.next_attempt_at),
            }
        })
        .collect())
}
