//! Apps: creation provisions the app's database and role and its first deploy
//! key, and records the app only when all of that worked.

use std::sync::Arc;

use nx_protocol::api::{AppInfo, DatabaseQuota};
use nx_protocol::auth::Credential;
use nx_protocol::names::{production_host, url_for_host, AppName, DeploymentId};

use crate::config::ServeConfig;
use crate::db::{AppRow, Db};
use crate::secrets::{random_lower, random_token, MasterKey};
use nx_cluster::watchdog::QuotaState;
use nx_cluster::{provision, Cluster, ClusterError};

/// Failures of app operations.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("app '{0}' already exists; pick another name or push to it")]
    Exists(String),
    #[error("cannot provision the database of app '{app}': {source}")]
    Database { app: String, source: ClusterError },
    #[error("this receiver has handed out all {span} app uids from {base}; start a receiver with another --uid-base for more apps")]
    NoUids { base: u32, span: u32 },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The API view of an app; `quota` is where its database stands against its
/// size quota, when over it.
pub fn info(row: &AppRow, config: &ServeConfig, quota: Option<QuotaState>) -> Option<AppInfo> {
    let name = AppName::parse(&row.name).ok()?;
    Some(AppInfo {
        production_url: url_for_host(&config.public_scheme, &production_host(&name, &config.domain), config.url_port()),
        name,
        production: row.production_id.as_deref().and_then(|p| DeploymentId::parse(p).ok()),
        database: row.db_name.clone(),
        database_quota: quota.map(|q| match q {
            QuotaState::ReadOnly { .. } => DatabaseQuota::ReadOnly,
            QuotaState::Locked => DatabaseQuota::Locked,
        }),
        settings: row.settings.0.clone(),
        created_at: row.created_at,
    })
}

/// `next` as a uid if it lies in the `span` uids from `base`: the range the
/// network rules and cgroups cover. An app outside it would run unconfined by
/// them, so past its end no app is created at all.
pub fn uid_in_range(next: i64, base: u32, span: u32) -> Option<u32> {
    let uid = u32::try_from(next).ok()?;
    (uid >= base && u64::from(uid) < u64::from(base) + u64::from(span)).then_some(uid)
}

/// Generates a deploy key: returns the credential (shown once) and its id.
pub fn new_deploy_key() -> Credential {
    Credential::deploy_key(&random_lower(10), &random_token(40))
}

/// Creates an app: database and role first (both must be new: a name already
/// in the cluster is refused, never taken over), then the app row and its deploy key, committed together. The
/// whole creation holds a transaction-scoped advisory lock, so two concurrent
/// creations of one name (even on two receivers) cannot touch each other's
/// database; if recording fails, the new database is dropped again.
pub async fn create(
    db: &Db,
    cluster: &Arc<Cluster>,
    master: &Arc<MasterKey>,
    config: &ServeConfig,
    name: &AppName,
    actor: &str,
) -> Result<(AppRow, Credential), AppError> {
    let mut tx = db.begin().await?;
    if Db::lock_app_creation(&mut tx, name.as_str()).await? {
        return Err(AppError::Exists(name.to_string()));
    }
    let db_name = name.database_name();
    let password = random_token(32);
    let db_error = |source: ClusterError| AppError::Database { app: name.to_string(), source };
    let mut admin = cluster.admin_connection("postgres").await.map_err(db_error)?;
    provision::create_app_database(&mut admin, &db_name, &password, cluster.limits())
        .await
        .map_err(|e| db_error(e.into()))?;
    cluster.refill_spares();

    let key = new_deploy_key();
    let recorded = async {
        let next = Db::next_uid(&mut tx, i64::from(config.uid_base)).await?;
        let Some(uid) = uid_in_range(next, config.uid_base, crate::network::UID_SPAN) else { return Ok(None) };
        let row = Db::insert_app(&mut tx, name.as_str(), uid, &db_name, &master.seal_str(&password)).await?;
        Db::insert_key(&mut tx, key.key_id(), Some(row.id), "deploy", &master.seal_str(key.expose_secret())).await?;
        tx.commit().await?;
        Ok::<Option<AppRow>, sqlx::Error>(Some(row))
    }
    .await;
    match recorded {
        Ok(None) => {
            let _ = provision::drop_app_database(&mut admin, &db_name).await;
            Err(AppError::NoUids { base: config.uid_base, span: crate::network::UID_SPAN })
        }
        Ok(Some(row)) => {
            db.event(Some(name.as_str()), None, "app.create", actor, serde_json::json!({ "uid": row.uid })).await?;
            tracing::info!(app = %name, uid = row.uid, "app created");
            Ok((row, key))
        }
        Err(e) => {
            if let Err(undo) = provision::drop_app_database(&mut admin, &db_name).await {
                tracing::error!(app = %name, error = %undo, "cannot undo the database of an app that was not recorded");
            }
            Err(AppError::Db(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_never_leave_the_isolated_range() {
        let (base, span) = (700_000, 4);
        for next in 700_000..700_004 {
            assert_eq!(uid_in_range(next, base, span), Some(next as u32));
        }
        assert_eq!(uid_in_range(700_004, base, span), None, "one past the range");
        assert_eq!(uid_in_range(699_999, base, span), None);
        assert_eq!(uid_in_range(i64::from(u32::MAX) + 1, base, span), None);
        assert_eq!(uid_in_range(i64::from(u32::MAX), u32::MAX - 1, 4), Some(u32::MAX), "no overflow at the top");
        let full = AppError::NoUids { base, span };
        assert_eq!(
            full.to_string(),
            "this receiver has handed out all 4 app uids from 700000; start a receiver with another --uid-base for more apps"
        );
    }
}
