//! The database watchdog: what PostgreSQL lets an app lift, enforced from
//! outside. Every interval it cancels statements of app roles that ran longer
//! than the cap (`statement_timeout` is the app's to change), and holds every
//! app database to its size quota.
//!
//! Over the quota, the app's sessions are ended and its role's new sessions
//! start read-only (`default_transaction_read_only`, which an app can lift
//! again: that stage is for well-behaved apps, which see clear errors on
//! writes and keep reading). If the database still grows by more than the
//! grace after that, the role loses `LOGIN` (only a role with CREATEROLE can
//! give it back) and its sessions are ended. Under the quota again, both are
//! undone. Nothing is deleted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{Executor, PgConnection};
use tokio::sync::watch;

use super::provision::{self, Limits, ProvisionError};
use super::Cluster;

/// Roles (and databases) of apps and of previews with their own database; the
/// names the platform makes for one operation contain `__`.
const APP_ROLES: &str = "rolname ~ '^(app|prv)_' AND rolname !~ '__'";

/// The roles held to the statement cap and the quota: those of apps and
/// previews, and of the staging and verification copies a dump is restored
/// into (whatever SQL a dump holds runs as those). pg_dump's roles
/// (`__dump_`) run nothing of the app's and may take long.
const HELD_ROLES: &str = "rolname ~ '^(app|prv)_' AND rolname !~ '__dump_'";

/// What the watchdog holds an app to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchdogSettings {
    pub interval: Duration,
    pub statement_timeout: Duration,
    pub quota: u64,
}

/// Where an app database stands against its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaState {
    /// Over the quota: new sessions are read-only. `size` is what the
    /// database held then, the base of the grace.
    ReadOnly { size: u64 },
    /// Grew past the grace while read-only: its role cannot log in.
    Locked,
}

/// The quota states by database name, for `nx status` and app info, and the
/// databases whose sessions were ended for their size.
#[derive(Debug, Clone, Default)]
pub struct QuotaStates(Arc<Mutex<Quotas>>);

#[derive(Debug, Default)]
struct Quotas {
    states: HashMap<String, QuotaState>,
    /// Ended for the quota and not yet asked about by `take_ended`.
    ended: HashSet<String>,
}

impl QuotaStates {
    pub fn get(&self, database: &str) -> Option<QuotaState> {
        self.lock().states.get(database).copied()
    }

    /// Whether sessions in `database` were ended for its size since the last
    /// call: how a restore whose session died learns why (an aborted
    /// restore's files are gone by the time anyone could measure them).
    pub fn take_ended(&self, database: &str) -> bool {
        self.lock().ended.remove(database)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Quotas> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How much an over-quota database may still grow before its role is locked
/// out: room for what PostgreSQL itself writes (visibility maps, free space
/// maps) but not for an app that lifted read-only and went on.
fn grace(quota: u64) -> u64 {
    (quota / 100).max(16 << 20)
}

/// Runs until `stop` says so; a failed round is logged and the next one tries
/// again on a new connection.
pub async fn run(
    cluster: Arc<Cluster>,
    settings: WatchdogSettings,
    states: QuotaStates,
    mut stop: watch::Receiver<bool>,
) {
    let mut conn: Option<PgConnection> = None;
    let mut reconciled = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = stop.changed() => return,
        }
        if conn.is_none() {
            match cluster.admin_connection("postgres").await {
                Ok(mut c) => {
                    // A tenant can hold a lock on its own role's catalog rows
                    // (an open `ALTER ROLE ... SET`): the watchdog waits for no
                    // lock, so one tenant cannot stop it for everyone.
                    let setup = "SET search_path = pg_catalog; SET lock_timeout = '2s'; SET statement_timeout = '60s'";
                    if c.execute(setup).await.is_ok() {
                        conn = Some(c);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the database watchdog cannot connect"),
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        if !reconciled {
            match reconcile(c, cluster.limits()).await {
                Ok(()) => reconciled = true,
                Err(e) => tracing::warn!(error = %e, "cannot give the roles of existing apps their limits"),
            }
        }
        let round = async {
            cancel_long_statements(c, settings.statement_timeout).await?;
            hold_quotas(c, settings.quota, &states).await
        };
        if let Err(e) = round.await {
            tracing::warn!(error = %e, "database watchdog round failed");
            conn = None;
        }
    }
}

/// Gives the roles of apps made before (or under other settings) the limits
/// configured now.
async fn reconcile(c: &mut PgConnection, limits: &Limits) -> Result<(), ProvisionError> {
    let roles: Vec<String> = sqlx::query_scalar(&format!("SELECT rolname::text FROM pg_roles WHERE {APP_ROLES}"))
        .fetch_all(&mut *c)
        .await
        .map_err(|source| ProvisionError::Sql { action: "list", database: "the app roles".into(), source })?;
    for role in roles {
        provision::apply_limits_locked(c, &role, limits).await?;
    }
    Ok(())
}

/// Cancels statements of app roles older than `cap` (fast-path function
/// calls included); one that outlives twice the cap (a cancel can be held off
/// in some C code) has its session ended, and so has a session idle in a
/// transaction for longer than the cap (it holds locks and old snapshots).
async fn cancel_long_statements(c: &mut PgConnection, cap: Duration) -> Result<(), sqlx::Error> {
    let ms = cap.as_millis().min(i64::MAX as u128) as i64;
    let stopped: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT usename::text, CASE \
                WHEN state LIKE 'idle in transaction%' OR now() - query_start > 2 * $1 * interval '1 millisecond' \
                THEN 'ended: ' || pg_terminate_backend(pid)::text \
                ELSE 'cancelled: ' || pg_cancel_backend(pid)::text END \
         FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid \
         WHERE {HELD_ROLES} AND ( \
             (state IN ('active', 'fastpath function call') AND now() - query_start > $1 * interval '1 millisecond') \
             OR (state LIKE 'idle in transaction%' AND now() - state_change > $1 * interval '1 millisecond'))"
    ))
    .bind(ms)
    .fetch_all(&mut *c)
    .await?;
    for (role, what) in stopped {
        tracing::warn!(role, what, limit_ms = ms, "an app's statement ran over the time limit");
    }
    Ok(())
}

/// What a round does to one database's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Nothing,
    /// Under the quota again: login and writes back.
    Free,
    /// Newly over the quota: read-only, sessions ended.
    ReadOnly,
    /// Grew past the grace: no login, sessions ended.
    Lock,
}

/// The step for a database of `size` whose role `can_login`, and its state
/// afterwards (`None`: under the quota).
fn step(before: Option<QuotaState>, size: u64, can_login: bool, quota: u64) -> (Step, Option<QuotaState>) {
    if size <= quota {
        let step = if before.is_some() || !can_login { Step::Free } else { Step::Nothing };
        return (step, None);
    }
    match before {
        None if can_login => (Step::ReadOnly, Some(QuotaState::ReadOnly { size })),
        Some(QuotaState::ReadOnly { size: at }) if size > at + grace(quota) => (Step::Lock, Some(QuotaState::Locked)),
        // Locked before the receiver restarted.
        None => (Step::Nothing, Some(QuotaState::Locked)),
        Some(state) => (Step::Nothing, Some(state)),
    }
}

/// What a role can store outside its database, in the cluster's shared
/// catalogs, counted against its quota: a comment on its database and the
/// settings of its role and database (`COMMENT ON DATABASE`, `ALTER ROLE ...
/// SET`, `ALTER DATABASE ... SET` take up to a gigabyte each).
const SHARED_BYTES: &str = "coalesce((SELECT sum(pg_column_size(description)) FROM pg_shdescription \
     WHERE objoid = d.oid), 0) \
     + coalesce((SELECT sum(pg_column_size(setconfig)) FROM pg_db_role_setting \
     WHERE setdatabase = d.oid OR setrole = r.oid), 0)";

/// Compares every app database with the quota and moves it between states.
async fn hold_quotas(c: &mut PgConnection, quota: u64, states: &QuotaStates) -> Result<(), sqlx::Error> {
    let sizes: Vec<(String, i64, bool)> = sqlx::query_as(&format!(
        "SELECT rolname::text, pg_database_size(d.oid) + {SHARED_BYTES}, rolcanlogin FROM pg_database d \
         JOIN pg_roles r ON r.rolname = d.datname WHERE {HELD_ROLES}"
    ))
    .fetch_all(&mut *c)
    .await?;
    let before = states.lock().states.clone();
    let mut now = HashMap::new();
    for (name, size, can_login) in sizes {
        let size = size.max(0) as u64;
        let was = before.get(&name).copied();
        let (step, state) = step(was, size, can_login, quota);
        // A step that fails (a lock held past the timeout) is tried again
        // next round; the other roles are held to the quota meanwhile.
        let state = match take_step(c, &name, step, states).await {
            Ok(()) => {
                if step != Step::Nothing {
                    tracing::info!(database = name, size, quota, ?step, "app database quota step");
                }
                state
            }
            Err(e) => {
                tracing::warn!(database = name, ?step, error = %e, "cannot hold an app database to its quota this round");
                was
            }
        };
        if let Some(state) = state {
            now.insert(name, state);
        }
    }
    states.lock().states = now;
    Ok(())
}

/// Carries out `step` for the role `name`. Sessions are ended before the
/// role is changed (one of them may hold the role's catalog row) and again
/// after (one may have started in between, without the change).
async fn take_step(c: &mut PgConnection, name: &str, step: Step, states: &QuotaStates) -> Result<(), sqlx::Error> {
    let ident = format!("\"{}\"", name.replace('"', "\"\""));
    let change = match step {
        Step::Nothing => return Ok(()),
        Step::Free => {
            states.lock().ended.remove(name);
            c.execute(format!("ALTER ROLE {ident} LOGIN").as_str()).await?;
            c.execute(format!("ALTER ROLE {ident} RESET default_transaction_read_only").as_str()).await?;
            return Ok(());
        }
        Step::ReadOnly => format!("ALTER ROLE {ident} SET default_transaction_read_only = on"),
        Step::Lock => format!("ALTER ROLE {ident} NOLOGIN"),
    };
    states.lock().ended.insert(name.to_owned());
    end_sessions(c, name).await?;
    c.execute(change.as_str()).await?;
    end_sessions(c, name).await
}

/// Ends every session of `role`.
async fn end_sessions(c: &mut PgConnection, role: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(role)
        .execute(&mut *c)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_quota_read_only_then_locked_then_free_again() {
        let q = 100 << 20;
        let g = grace(q);
        assert_eq!(step(None, q, true, q), (Step::Nothing, None), "at the quota is not over it");
        let ro = QuotaState::ReadOnly { size: q + 1 };
        assert_eq!(step(None, q + 1, true, q), (Step::ReadOnly, Some(ro)));
        assert_eq!(step(Some(ro), q + 1 + g, true, q), (Step::Nothing, Some(ro)), "within the grace");
        assert_eq!(step(Some(ro), q + 2 + g, true, q), (Step::Lock, Some(QuotaState::Locked)));
        assert_eq!(step(Some(QuotaState::Locked), q + 9 * g, false, q), (Step::Nothing, Some(QuotaState::Locked)));
        // After a restart: a role without login over the quota stays locked.
        assert_eq!(step(None, q + 1, false, q), (Step::Nothing, Some(QuotaState::Locked)));
        // Under the quota (raised, or a smaller dump restored): freed.
        assert_eq!(step(Some(QuotaState::Locked), q, false, q), (Step::Free, None));
        assert_eq!(step(Some(ro), q, true, q), (Step::Free, None));
        assert_eq!(step(None, q, false, q), (Step::Free, None), "locked before a restart");
    }

    #[test]
    fn grace_is_a_hundredth_of_the_quota_and_at_least_16_mib() {
        assert_eq!(grace(10 << 30), (10 << 30) / 100);
        assert_eq!(grace(100 << 20), 16 << 20);
    }
}
