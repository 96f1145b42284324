//! Deployments: recorded against their app's caps, their states and
//! promotion, and the lifecycle's queries (previews of a pull request, idle
//! ones, those beyond the retention count).

use chrono::{DateTime, Utc};
use nx_protocol::api::DeploymentState;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};

use super::Db;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeploymentRow {
    pub id: String,
    pub app_id: i64,
    pub app_name: String,
    pub artifact_sha256: String,
    pub size: i64,
    pub linkage: String,
    pub state: String,
    pub port: i32,
    pub args: Json<Vec<String>>,
    pub env: Option<Vec<u8>>,
    pub filename: Option<String>,
    pub git_sha: Option<String>,
    pub git_ref: Option<String>,
    pub pr_number: Option<i64>,
    pub source: String,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub promoted_at: Option<DateTime<Utc>>,
    pub limits: Json<Vec<nx_protocol::api::Enforcement>>,
    /// A preview's own database (its name is also its role), and its sealed password.
    pub db_name: Option<String>,
    pub db_password: Option<Vec<u8>>,
    pub repository: Option<String>,
    pub repository_id: Option<i64>,
    /// What the push's GitHub OIDC token proved, when it came with one.
    pub github: Option<Json<nx_protocol::api::VerifiedGitHub>>,
    pub is_production: bool,
    /// The ports of its replicas after the first, which has `port`.
    pub replica_ports: Vec<i32>,
}

impl DeploymentRow {
    pub fn state(&self) -> DeploymentState {
        DeploymentState::parse(&self.state).unwrap_or(DeploymentState::Failed)
    }

    /// Whether a `pull_request_target` run's token pushed it: a preview of a
    /// fork's code, which gets none of the app's variables, data or database
    /// and never becomes production.
    pub fn is_fork_preview(&self) -> bool {
        self.github.as_ref().is_some_and(|g| g.is_pull_request_target())
    }
}

/// A new deployment to record.
#[derive(Debug)]
pub struct NewDeployment<'a> {
    pub id: &'a str,
    pub app_id: i64,
    pub artifact_sha256: &'a str,
    pub port: i32,
    pub args: &'a [String],
    pub env: Option<Vec<u8>>,
    pub filename: Option<&'a str>,
    pub git_sha: Option<&'a str>,
    pub git_ref: Option<&'a str>,
    pub pr_number: Option<i64>,
    pub source: &'a str,
    pub push_id: Option<&'a str>,
    pub repository: Option<&'a str>,
    pub repository_id: Option<i64>,
    pub github: Option<&'a nx_protocol::api::VerifiedGitHub>,
    /// The database of its own a preview will get, reserved with the row so
    /// that it counts against the app's cap from the start (its password
    /// comes once it is made).
    pub db_name: Option<&'a str>,
}

/// A deployment as it counts against its app's caps.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Held {
    pub id: String,
    pub pr_number: Option<i64>,
    pub is_production: bool,
    pub is_rollback_target: bool,
}

/// What an app holds of the host when a deployment is to be added: its
/// running deployments and the previews with a database of their own,
/// oldest first.
#[derive(Debug, Clone, Default)]
pub struct Occupancy {
    pub running: Vec<Held>,
    pub databases: Vec<Held>,
    /// The app is being removed, or is gone ([`Db::mark_app_removing`]):
    /// nothing new is deployed to it.
    pub removing: bool,
}

/// A deployment that lifecycle rules never touch: its app's production or
/// rollback target.
const NOT_PROTECTED: &str = "d.id IS DISTINCT FROM a.production_id AND d.id IS DISTINCT FROM a.previous_production_id";

const DEPLOYMENT_COLUMNS: &str =
    "d.id, d.app_id, a.name AS app_name, d.artifact_sha256, ar.size, ar.linkage, d.state, d.port, \
     d.args, d.env, d.filename, d.git_sha, d.git_ref, d.pr_number, d.source, d.error, d.created_at, d.promoted_at, d.limits, d.db_name, d.db_password, d.repository, d.repository_id, d.github, d.replica_ports, \
     (a.production_id IS NOT DISTINCT FROM d.id) AS is_production \
     FROM deployments d JOIN apps a ON a.id = d.app_id JOIN artifacts ar ON ar.sha256 = d.artifact_sha256";

/// See [`Db::occupancy`].
async fn occupancy(conn: &mut sqlx::PgConnection, app_id: i64) -> Result<Occupancy, sqlx::Error> {
    let held = |condition: &str| {
        format!(
            "SELECT d.id, d.pr_number, (a.production_id IS NOT DISTINCT FROM d.id) AS is_production, \
             (a.previous_production_id IS NOT DISTINCT FROM d.id) AS is_rollback_target \
             FROM deployments d JOIN apps a ON a.id = d.app_id WHERE d.app_id = $1 AND {condition} \
             ORDER BY d.created_at, d.id"
        )
    };
    // A sleeping deployment holds its place: its next request starts it.
    let running = sqlx::query_as(&held("d.state IN ('pending', 'starting', 'healthy', 'sleeping')"))
        .bind(app_id)
        .fetch_all(&mut *conn)
        .await?;
    let databases = sqlx::query_as(&held("d.db_name IS NOT NULL")).bind(app_id).fetch_all(&mut *conn).await?;
    Ok(Occupancy { running, databases, removing: removing(conn, app_id).await? })
}

/// See [`Occupancy::removing`].
async fn removing(conn: &mut sqlx::PgConnection, app_id: i64) -> Result<bool, sqlx::Error> {
    let removing: Option<bool> = sqlx::query_scalar("SELECT removing_since IS NOT NULL FROM apps WHERE id = $1")
        .bind(app_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(removing.unwrap_or(true))
}

/// What [`Db::promote`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromoteOutcome {
    Promoted { previous: Option<String> },
    AlreadyProduction,
    NotHealthy(String),
    NoDeployment,
    NoApp,
}

impl Db {
    // --- deployments ---

    /// What `app_id` holds now (see [`Occupancy`]).
    pub async fn occupancy(&self, app_id: i64) -> Result<Occupancy, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        occupancy(&mut conn, app_id).await
    }

    /// Whether `app_id` is being removed or is gone ([`Occupancy::removing`]).
    pub async fn app_removing(&self, app_id: i64) -> Result<bool, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        removing(&mut conn, app_id).await
    }

    /// Records a new deployment, and `event` about it, if `admit` accepts
    /// what its app holds. The app's row is locked while it is counted and
    /// the row inserted, so two pushes at once cannot both take the last
    /// place.
    pub async fn insert_deployment<E: From<sqlx::Error>>(
        &self,
        d: &NewDeployment<'_>,
        admit: impl FnOnce(&Occupancy) -> Result<(), E>,
        event: super::events::DeploymentEvent<'_>,
    ) -> Result<(), E> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT 1 FROM apps WHERE id = $1 FOR UPDATE").bind(d.app_id).execute(&mut *tx).await?;
        admit(&occupancy(&mut tx, d.app_id).await?)?;
        sqlx::query(
            "INSERT INTO deployments (id, app_id, artifact_sha256, state, port, args, env, filename, git_sha, git_ref, pr_number, source, push_id, repository, repository_id, github, db_name) \
             VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(d.id)
        .bind(d.app_id)
        .bind(d.artifact_sha256)
        .bind(d.port)
        .bind(Json(d.args))
        .bind(&d.env)
        .bind(d.filename)
        .bind(d.git_sha)
        .bind(d.git_ref)
        .bind(d.pr_number)
        .bind(d.source)
        .bind(d.push_id)
        .bind(d.repository)
        .bind(d.repository_id)
        .bind(d.github.map(Json))
        .bind(d.db_name)
        .execute(&mut *tx)
        .await?;
        super::events::insert(Some(event.app), Some(d.id), event.kind, event.actor, event.detail)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DEPLOYMENT_COLUMNS} WHERE d.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// The deployment an earlier attempt of the same push made, if any.
    pub async fn deployment_by_push_id(
        &self,
        app_id: i64,
        push_id: &str,
    ) -> Result<Option<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DEPLOYMENT_COLUMNS} WHERE d.app_id = $1 AND d.push_id = $2"))
            .bind(app_id)
            .bind(push_id)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn deployments_of_app(&self, app_id: i64, limit: i64) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DEPLOYMENT_COLUMNS} WHERE d.app_id = $1 ORDER BY d.created_at DESC LIMIT $2"))
            .bind(app_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
    }

    /// Deployments that should be running: what a restart brings back.
    pub async fn live_deployments(&self) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} WHERE d.state IN ('pending', 'starting', 'healthy') ORDER BY d.created_at"
        ))
        .fetch_all(&self.pool)
        .await
    }

    /// Deployments asleep, oldest first.
    pub async fn sleeping_deployments(&self) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!("SELECT {DEPLOYMENT_COLUMNS} WHERE d.state = 'sleeping' ORDER BY d.created_at"))
            .fetch_all(&self.pool)
            .await
    }

    /// Every deployment the router should know about: all but long-stopped ones.
    pub async fn routed_deployments(&self) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} WHERE d.state <> 'stopped' OR d.stopped_at > now() - interval '30 days'"
        ))
        .fetch_all(&self.pool)
        .await
    }

    pub async fn used_ports(&self) -> Result<Vec<i32>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT unnest(array_append(replica_ports, port)) FROM deployments \
             WHERE state IN ('pending', 'starting', 'healthy', 'sleeping')",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Records the ports of `id`'s replicas after the first.
    pub async fn set_replica_ports(&self, id: &str, ports: &[i32]) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE deployments SET replica_ports = $2 WHERE id = $1")
            .bind(id)
            .bind(ports)
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Records `id` as starting if it sleeps, in one statement: its row as
    /// it was before, with its new state and no error, or `None` when it
    /// does not sleep (stopped, failed, removed, or woken by someone else).
    /// A wake waits on this; a read and then a conditional update would be
    /// two round trips.
    pub async fn wake_if_sleeping(&self, id: &str) -> Result<Option<DeploymentRow>, sqlx::Error> {
        let row: Option<DeploymentRow> = sqlx::query_as(&format!(
            "WITH woken AS (UPDATE deployments SET state = 'starting', error = NULL, stopped_at = NULL \
             WHERE id = $1 AND state = 'sleeping' RETURNING id) \
             SELECT {DEPLOYMENT_COLUMNS} WHERE d.id IN (SELECT id FROM woken)"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        // The SELECT sees the row as the statement found it.
        Ok(row.map(|row| DeploymentRow { state: DeploymentState::Starting.as_str().to_owned(), error: None, ..row }))
    }

    /// Sets `id`'s state to `to` only if it is `from`: whether it was. A
    /// transition decided on a state read earlier never overwrites one made
    /// since (a stop, a removal).
    pub async fn set_state_if(
        &self,
        id: &str,
        from: DeploymentState,
        to: DeploymentState,
        error: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query(
            "UPDATE deployments SET state = $3, error = $4, \
             stopped_at = CASE WHEN $3 IN ('stopped', 'failed') THEN now() ELSE NULL END \
             WHERE id = $1 AND state = $2",
        )
        .bind(id)
        .bind(from.as_str())
        .bind(to.as_str())
        .bind(error)
        .execute(&self.pool)
        .await
        .map(|r| r.rows_affected() == 1)
    }

    pub async fn set_state(&self, id: &str, state: DeploymentState, error: Option<&str>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE deployments SET state = $2, error = $3, \
             stopped_at = CASE WHEN $2 IN ('stopped', 'failed') THEN now() ELSE NULL END WHERE id = $1",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(error)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Records (or, with `None`, forgets) a deployment's own database.
    pub async fn set_preview_db(&self, id: &str, db: Option<(&str, &[u8])>) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE deployments SET db_name = $2, db_password = $3 WHERE id = $1")
            .bind(id)
            .bind(db.map(|d| d.0))
            .bind(db.map(|d| d.1))
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    pub async fn set_limits(&self, id: &str, limits: &[nx_protocol::api::Enforcement]) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE deployments SET limits = $2 WHERE id = $1")
            .bind(id)
            .bind(Json(limits))
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Makes `deployment` the app's production in one transaction; returns the
    /// previous production. The deployment must be healthy at that moment.
    pub async fn promote(&self, app_id: i64, deployment: &str) -> Result<PromoteOutcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let current: Option<Option<String>> =
            sqlx::query_scalar("SELECT production_id FROM apps WHERE id = $1 FOR UPDATE")
                .bind(app_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(current) = current else { return Ok(PromoteOutcome::NoApp) };
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM deployments WHERE id = $1 AND app_id = $2")
            .bind(deployment)
            .bind(app_id)
            .fetch_optional(&mut *tx)
            .await?;
        match state.as_deref() {
            None => return Ok(PromoteOutcome::NoDeployment),
            Some("healthy") => {}
            Some(other) => return Ok(PromoteOutcome::NotHealthy(other.to_owned())),
        }
        if current.as_deref() == Some(deployment) {
            return Ok(PromoteOutcome::AlreadyProduction);
        }
        sqlx::query("UPDATE apps SET production_id = $2, previous_production_id = $3 WHERE id = $1")
            .bind(app_id)
            .bind(deployment)
            .bind(&current)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE deployments SET promoted_at = now() WHERE id = $1")
            .bind(deployment)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(PromoteOutcome::Promoted { previous: current })
    }

    // --- lifecycle ---

    /// Running deployments of a pull request that are neither production nor
    /// the rollback target.
    pub async fn previews_of_pr(&self, app_id: i64, pr: i64) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} WHERE d.app_id = $1 AND d.pr_number = $2 \
             AND d.state IN ('pending', 'starting', 'healthy', 'failed', 'sleeping') AND {NOT_PROTECTED} ORDER BY d.created_at"
        ))
        .bind(app_id)
        .bind(pr)
        .fetch_all(&self.pool)
        .await
    }

    /// Records when deployments were last requested; times never go back.
    pub async fn record_requests(&self, seen: &[(String, DateTime<Utc>)]) -> Result<(), sqlx::Error> {
        let (ids, times): (Vec<&str>, Vec<DateTime<Utc>>) = seen.iter().map(|(d, t)| (d.as_str(), *t)).unzip();
        sqlx::query(
            "UPDATE deployments d SET last_request_at = GREATEST(d.last_request_at, s.at) \
             FROM UNNEST($1::text[], $2::timestamptz[]) AS s(id, at) WHERE d.id = s.id",
        )
        .bind(ids)
        .bind(times)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Running previews without a request (or, never requested, without a
    /// push) for longer than `idle_secs`.
    pub async fn idle_previews(&self, idle_secs: i64) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} WHERE d.state IN ('pending', 'starting', 'healthy', 'failed', 'sleeping') AND {NOT_PROTECTED} \
             AND GREATEST(d.created_at, d.last_request_at) < now() - make_interval(secs => $1) ORDER BY d.created_at"
        ))
        .bind(idle_secs as f64)
        .fetch_all(&self.pool)
        .await
    }

    /// Deployments past the `keep` most recent of their app, except
    /// production and the rollback target.
    pub async fn excess_deployments(&self, keep: i64) -> Result<Vec<DeploymentRow>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {DEPLOYMENT_COLUMNS} WHERE d.id IN ( \
                 SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY app_id ORDER BY created_at DESC, id) AS n \
                                 FROM deployments) ranked WHERE n > $1) \
             AND {NOT_PROTECTED} ORDER BY d.created_at"
        ))
        .bind(keep)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn delete_deployment(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM deployments WHERE id = $1").bind(id).execute(&self.pool).await.map(|_| ())
    }

    /// Artifacts no deployment uses, recorded more than `grace_secs` ago (a
    /// push records its artifact a moment before its deployment).
    pub async fn unused_artifacts(&self, grace_secs: i64) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT sha256 FROM artifacts a WHERE created_at < now() - make_interval(secs => $1) \
             AND NOT EXISTS (SELECT 1 FROM deployments d WHERE d.artifact_sha256 = a.sha256)",
        )
        .bind(grace_secs as f64)
        .fetch_all(&self.pool)
        .await
    }

    /// Whether an artifact row names `sha256`.
    pub async fn artifact_exists(tx: &mut Transaction<'_, Postgres>, sha256: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM artifacts WHERE sha256 = $1)")
            .bind(sha256)
            .fetch_one(&mut **tx)
            .await
    }

    /// Every artifact digest with a row.
    pub async fn artifact_digests(&self) -> Result<std::collections::HashSet<String>, sqlx::Error> {
        let all: Vec<String> = sqlx::query_scalar("SELECT sha256 FROM artifacts").fetch_all(&self.pool).await?;
        Ok(all.into_iter().collect())
    }

    /// Forgets an artifact unless a deployment or a push took it up
    /// meanwhile; `true` when it was forgotten (and its bytes may go).
    pub async fn delete_unused_artifact(
        tx: &mut Transaction<'_, Postgres>,
        sha256: &str,
        grace_secs: i64,
    ) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(
            "DELETE FROM artifacts a WHERE sha256 = $1 AND created_at < now() - make_interval(secs => $2) \
             AND NOT EXISTS (SELECT 1 FROM deployments d WHERE d.artifact_sha256 = a.sha256)",
        )
        .bind(sha256)
        .bind(grace_secs as f64)
        .execute(&mut **tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Counts for `nx status`: apps, deployments by state.
    /// How many apps there are and their deployments in each state: of every
    /// app, or with `Some(id)` of that app alone.
    pub async fn counts(&self, app_id: Option<i64>) -> Result<(i64, Vec<(String, i64)>), sqlx::Error> {
        let apps = sqlx::query_scalar("SELECT count(*) FROM apps WHERE $1::BIGINT IS NULL OR id = $1")
            .bind(app_id)
            .fetch_one(&self.pool)
            .await?;
        let states = sqlx::query_as(
            "SELECT state, count(*) FROM deployments WHERE $1::BIGINT IS NULL OR app_id = $1 \
             GROUP BY state ORDER BY state",
        )
        .bind(app_id)
        .fetch_all(&self.pool)
        .await?;
        Ok((apps, states))
    }
}
