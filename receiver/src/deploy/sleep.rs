//! Scale to zero: a deployment with no request for its app's `sleep_after`
//! (`[scale]`) is stopped as `sleeping`, its URL still routed; the router
//! holds the first request that comes and asks for it (`GET /wakes` on the
//! control socket, long-polled here), and it is started again.
//!
//! Idleness is judged from the router's traffic alone: a deployment is busy
//! in a round where its count of answered requests moved or a request (a
//! WebSocket, a long download) is open. Only deployments whose records say
//! `sleeping` are woken: a stopped one (an expired preview, a closed pull
//! request) never is, whatever the router asks.
//!
//! Going to sleep and waking hold the deployment's transition lock, so a
//! wake asked while it is being put to sleep starts it once that is over.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nx_protocol::api::{DeploymentState, Role};
use nx_protocol::metrics::Traffic;
use nx_protocol::names::DeploymentId;
use nx_protocol::units::format_duration;
use nx_runtime::supervisor::Status;
use tokio::sync::watch;

use super::{events, DeployError, Deployer};
use crate::db::{AppRow, DeploymentRow};

/// How often the router's traffic is looked at: the precision of idle
/// times, and why they are at least [`nx_protocol::api::MIN_SLEEP_SECS`].
const ROUND: Duration = Duration::from_secs(1);

/// How long requests forwarded before the sleeping route was published may
/// take to finish before the sandbox is stopped anyway.
const DRAIN: Duration = Duration::from_secs(10);

/// When each running deployment was last seen busy.
#[derive(Debug, Default)]
struct Idle {
    seen: HashMap<String, Seen>,
}

#[derive(Debug)]
struct Seen {
    answered: u64,
    busy_at: Instant,
}

impl Idle {
    /// How long `id`, whose sandbox started at `started`, has been idle at
    /// `now`, given its traffic: a deployment first seen, or started again
    /// since, counts from then.
    fn observe(&mut self, id: &str, traffic: Option<&Traffic>, started: Instant, now: Instant) -> Duration {
        let (answered, open) = traffic.map_or((0, 0), |t| (t.total(), t.open));
        let seen = self.seen.entry(id.to_owned()).or_insert(Seen { answered, busy_at: now });
        if answered != seen.answered || open > 0 {
            *seen = Seen { answered, busy_at: now };
        }
        seen.busy_at = seen.busy_at.max(started);
        now.saturating_duration_since(seen.busy_at)
    }

    /// Forgets deployments not seen running this round.
    fn keep(&mut self, running: &HashSet<String>) {
        self.seen.retain(|id, _| running.contains(id));
    }
}

/// Whether `row` counts as production for its app's sleep setting: the
/// production and the rollback target, kept running for an instant rollback.
fn role(row: &DeploymentRow, app: &AppRow) -> Role {
    if row.is_production || app.previous_production_id.as_deref() == Some(row.id.as_str()) {
        Role::Production
    } else {
        Role::Preview
    }
}

impl Deployer {
    /// The lock a deployment's sleep and wake hold.
    fn transition(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        // Locks nobody holds or waits for are dropped as others are made.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(id.to_owned()).or_default().clone()
    }

    /// Puts idle deployments to sleep, once a [`ROUND`], until `stop`.
    pub async fn sleeper(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut idle = Idle::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(ROUND) => {}
                _ = stop.changed() => return,
            }
            if let Err(e) = self.sleep_round(&mut idle).await {
                tracing::warn!(error = %e, "cannot look for idle deployments; trying again");
            }
        }
    }

    async fn sleep_round(self: &Arc<Self>, idle: &mut Idle) -> Result<(), DeployError> {
        // Without the router's figures idleness cannot be judged: a busy
        // deployment would look idle.
        let traffic = match self.services.routes.traffic().await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "no traffic figures from nx-router; nothing sleeps this round");
                return Ok(());
            }
        };
        let now = Instant::now();
        let mut apps: HashMap<i64, Option<AppRow>> = HashMap::new();
        let mut running = HashSet::new();
        for row in self.services.db.live_deployments().await? {
            let Some(started) = self.running_since(&row.id) else { continue };
            if row.state() != DeploymentState::Healthy {
                continue;
            }
            let idle_for = idle.observe(&row.id, traffic.deployments.get(&row.id), started, now);
            running.insert(row.id.clone());
            let app = match apps.entry(row.app_id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(self.services.db.app_by_id(row.app_id).await?),
            };
            let Some(app) = app else { continue };
            let Some(after) = app.settings.scale.sleep_after(role(&row, app)) else { continue };
            if idle_for >= after {
                let me = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.put_to_sleep(&row.id, after).await {
                        tracing::warn!(deployment = %row.id, error = %e, "cannot put an idle deployment to sleep");
                    }
                });
            }
        }
        idle.keep(&running);
        Ok(())
    }

    /// Routes `id` as sleeping (requests from now on are held), lets the
    /// requests already forwarded finish, and stops its sandbox.
    async fn put_to_sleep(&self, id: &str, after: Duration) -> Result<(), DeployError> {
        let lock = self.transition(id);
        let Ok(_held) = lock.try_lock() else { return Ok(()) };
        let row = self.row(id).await?;
        if row.state() != DeploymentState::Healthy {
            return Ok(());
        }
        self.services.db.set_state(id, DeploymentState::Sleeping, None).await?;
        let _ = self.services.routes.publish().await;
        let deadline = Instant::now() + DRAIN;
        while Instant::now() < deadline {
            match self.services.routes.traffic().await {
                Ok(t) if t.deployments.get(id).is_some_and(|t| t.open > 0) => {}
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.halt(id).await;
        let idle = format_duration(after);
        self.services
            .db
            .event(Some(&row.app_name), Some(id), "sleep", "scaler", serde_json::json!({ "idle": idle }))
            .await?;
        self.services.reporter.send(events::Event::Settled(id.to_owned()));
        tracing::info!(deployment = id, app = %row.app_name, idle, "deployment sleeps");
        Ok(())
    }

    /// Starts `id` again if it sleeps, and waits for its health check. A
    /// failed start puts it back to sleep, with why in its `error`, so the
    /// next request tries again; its log keeps what the app printed.
    pub async fn wake(&self, id: &str) -> Result<Status, DeployError> {
        let lock = self.transition(id);
        let _held = lock.lock().await;
        let row = self.row(id).await?;
        if row.state() != DeploymentState::Sleeping {
            // Whatever the router waits for, the current table tells it.
            let _ = self.services.routes.publish().await;
            return Ok(self.running_status(id).unwrap_or(Status::Stopped));
        }
        let started = Instant::now();
        let status = self.start(&row, true).await?;
        if let Status::Failed { reason, .. } = &status {
            let reason = format!("could not wake: {reason}");
            self.services.db.set_state(id, DeploymentState::Sleeping, Some(&reason)).await?;
            let _ = self.services.routes.publish().await;
            tracing::warn!(deployment = id, app = %row.app_name, reason, "deployment did not wake");
        } else {
            tracing::info!(deployment = id, app = %row.app_name, micros = started.elapsed().as_micros() as u64, "deployment woke");
        }
        Ok(status)
    }

    /// Wakes what the router holds requests for, until `stop`.
    pub async fn waker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let asked = tokio::select! {
                asked = self.services.routes.wakes() => asked,
                _ = stop.changed() => return,
            };
            match asked {
                Ok(ids) => {
                    for id in ids {
                        // The router is a separate, less trusted process:
                        // only well-formed ids reach the database.
                        if DeploymentId::parse(&id).is_err() {
                            tracing::warn!(deployment = %id, "nx-router asked to wake a malformed deployment id");
                            continue;
                        }
                        let me = self.clone();
                        tokio::spawn(async move {
                            if let Err(e) = me.wake(&id).await {
                                tracing::warn!(deployment = %id, error = %e, "cannot wake deployment");
                            }
                        });
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot ask nx-router what to wake; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(ROUND) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
    }

    /// Wakes `id` when it sleeps, for what needs it running (a promotion,
    /// a rollback): an error unless it is healthy afterwards.
    pub(super) async fn ensure_awake(&self, id: &str) -> Result<(), DeployError> {
        if self.row(id).await?.state() != DeploymentState::Sleeping {
            return Ok(());
        }
        match self.wake(id).await? {
            Status::Failed { reason, .. } => Err(DeployError::NotHealthy {
                id: id.to_owned(),
                state: format!("sleeping and could not be woken ({reason})"),
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic(answered: u64, open: u64) -> Traffic {
        let mut t = Traffic { open, ..Traffic::default() };
        t.requests[2] = answered;
        t
    }

    #[test]
    fn idle_time_counts_from_the_last_request_or_open_one_or_start() {
        let mut idle = Idle::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(idle.observe("a", None, t0, at(0)), Duration::ZERO, "first seen: idle from now");
        assert_eq!(idle.observe("a", Some(&traffic(0, 0)), t0, at(5)), Duration::from_secs(5));
        assert_eq!(idle.observe("a", Some(&traffic(3, 0)), t0, at(6)), Duration::ZERO, "requests answered");
        assert_eq!(idle.observe("a", Some(&traffic(3, 0)), t0, at(9)), Duration::from_secs(3));
        // A WebSocket open for long keeps it busy though nothing is answered.
        assert_eq!(idle.observe("a", Some(&traffic(3, 1)), t0, at(30)), Duration::ZERO);
        assert_eq!(idle.observe("a", Some(&traffic(3, 1)), t0, at(60)), Duration::ZERO);
        assert_eq!(idle.observe("a", Some(&traffic(4, 0)), t0, at(61)), Duration::ZERO);
        assert_eq!(idle.observe("a", Some(&traffic(4, 0)), t0, at(63)), Duration::from_secs(2));
        // Started again (woken) since: idle from the start.
        assert_eq!(idle.observe("a", Some(&traffic(4, 0)), at(70), at(71)), Duration::from_secs(1));
        idle.keep(&HashSet::new());
        assert!(idle.seen.is_empty());
    }
}
