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
//! Going to sleep and waking hold the deployment's transition lock (the one
//! every start, scale and stop holds), so a wake asked while it is being put
//! to sleep starts it once that is over, and one racing a stop finds it
//! stopped. Both change the state only from the one they read (in SQL).
//!
//! A wake that fails puts it back to sleep, and traffic may wake it again
//! only after a pause doubling with each failure; after
//! [`MAX_FAILED_WAKES`] in a row it is `failed`, never woken by traffic
//! again (outside clients cannot make the host build a failing sandbox
//! over and over).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nx_protocol::api::{DeploymentState, Role};
use nx_protocol::metrics::Traffic;
use nx_protocol::names::DeploymentId;
use nx_protocol::units::format_duration;
use nx_runtime::supervisor::Status;
use tokio::sync::watch;

use super::{events, places, DeployError, Deployer, Held};
use crate::db::{AppRow, DeploymentRow};

/// How often the router's traffic is looked at: the precision of idle
/// times, and why they are at least [`nx_protocol::api::MIN_SLEEP_SECS`].
const ROUND: Duration = Duration::from_secs(1);

/// How long requests forwarded before the sleeping route was published may
/// take to finish before the sandbox is stopped anyway.
const DRAIN: Duration = Duration::from_secs(10);

/// Consecutive failed wakes after which a deployment is `failed`.
const MAX_FAILED_WAKES: u32 = 3;

/// How long traffic may not wake a deployment after its first failed wake;
/// doubled with each further one.
const FIRST_BACKOFF: Duration = Duration::from_secs(5);

/// A deployment's consecutive failed wakes, and when traffic may wake it
/// again.
#[derive(Debug, Clone, Copy)]
pub(super) struct FailedWakes {
    count: u32,
    not_before: Instant,
}

/// What follows a failed wake, given the failures before it.
#[derive(Debug, PartialEq, Eq)]
enum AfterFailure {
    /// Back to sleep; traffic may wake it again after `pause`.
    Sleep { count: u32, pause: Duration },
    /// Failed: too many wakes in a row failed.
    GiveUp { count: u32 },
}

fn after_failed_wake(earlier: u32) -> AfterFailure {
    let count = earlier.saturating_add(1);
    if count >= MAX_FAILED_WAKES {
        AfterFailure::GiveUp { count }
    } else {
        AfterFailure::Sleep { count, pause: FIRST_BACKOFF.saturating_mul(1 << (count - 1).min(16)) }
    }
}

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
    /// The lock of deployment `id`.
    fn transition(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        // Locks nobody holds or waits for are dropped as others are made.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(id.to_owned()).or_default().clone()
    }

    /// Waits for, and takes, the lock of deployment `id`: held across a
    /// whole start, scale, stop, sleep or wake of it.
    pub(super) async fn hold(&self, id: &str) -> Held {
        self.transition(id).lock_owned().await
    }

    /// Forgets `id`'s failed wakes: it was stopped, or woke.
    pub(super) fn forget_failed_wakes(&self, id: &str) {
        self.wake_failures.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
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
        let Ok(held) = self.transition(id).try_lock_owned() else { return Ok(()) };
        let row = self.row(id).await?;
        if !self.services.db.set_state_if(id, DeploymentState::Healthy, DeploymentState::Sleeping, None).await? {
            return Ok(());
        }
        let _ = self.services.routes.publish().await;
        let deadline = Instant::now() + DRAIN;
        while Instant::now() < deadline {
            match self.services.routes.traffic().await {
                Ok(t) if t.deployments.get(id).is_some_and(|t| t.open > 0) => {}
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.halt(&held, id).await;
        self.make_ready(&held, id).await;
        let idle = format_duration(after);
        self.services
            .db
            .event(Some(&row.app_name), Some(id), "sleep", "scaler", serde_json::json!({ "idle": idle }))
            .await?;
        self.services.reporter.send(events::Event::Settled(id.to_owned()));
        tracing::info!(deployment = id, app = %row.app_name, idle, "deployment sleeps");
        Ok(())
    }

    /// Makes the sandbox of `id`, which sleeps, ready for its wake (its
    /// first replica's: [`nx_runtime::ready`]) if it gets a place
    /// ([`places::room`]: the sandbox of one that has slept longer may give
    /// its place up); first ends whatever runs in its replicas' state
    /// directories (an earlier receiver's). Read under the hold, so one
    /// woken meanwhile is left alone. Failing only means it wakes the usual
    /// way.
    pub(super) async fn make_ready(&self, _held: &Held, id: &str) {
        // Never two for one state directory and cgroup. One made again (a
        // change of its app's) keeps its place's age.
        let earlier = self.ready.lock().ok().and_then(|mut r| r.remove(id));
        let since = earlier.as_ref().map_or_else(Instant::now, |p| p.holder.since);
        if let Some(ready) = earlier.and_then(|p| p.ready) {
            ready.discard().await;
        }
        let made = async {
            let row = self.row(id).await?;
            let running = self.running.lock().map_or(true, |r| r.contains_key(id));
            if row.state() != DeploymentState::Sleeping || running {
                return Ok(None);
            }
            for index in 0..=row.replica_ports.len() as u32 {
                let dir = self.shim_dir(&super::replica_key(id, index));
                nx_runtime::shim::stop_dir(&dir, self.services.config.stop_grace).await;
            }
            if !self.take_place(id, &row, since).await {
                return Ok(None);
            }
            let app = self.app_of(&row).await?;
            let config = self.sandbox_config(&app, &row, 0, row.port as u16).await?;
            let log = self.open_log(id)?;
            nx_runtime::ready::Ready::make(&config, &self.services.pm, &log)
                .await
                .map(Some)
                .map_err(|e| DeployError::Internal(e.to_string()))
        };
        let made = made.await;
        // Its place was taken under the same hold, so it is still there
        // unless the map is poisoned; without one the sandbox is discarded.
        let unplaced = {
            let mut places = self.ready.lock().ok();
            let place = places.as_deref_mut().and_then(|p| p.get_mut(id));
            match (made, place) {
                (Ok(Some(ready)), Some(place)) => {
                    place.ready = Some(ready);
                    None
                }
                (made, _) => {
                    if let Some(p) = places.as_deref_mut() {
                        p.remove(id);
                    }
                    match made {
                        Ok(ready) => ready,
                        Err(e) => {
                            tracing::warn!(deployment = id, error = %e, "cannot make a sandbox ready for a wake; it wakes the usual way");
                            None
                        }
                    }
                }
            }
        };
        if let Some(ready) = unplaced {
            ready.discard().await;
        }
    }

    /// Makes the ready sandboxes of app `app_id`'s sleeping deployments
    /// again, from its variables and settings as they are now: one made
    /// before the change would be discarded at its wake, which would then go
    /// the usual way.
    pub async fn remake_ready(&self, app_id: i64) {
        let ids: Vec<String> = self
            .ready
            .lock()
            .map(|r| r.iter().filter(|(_, p)| p.holder.app == app_id).map(|(id, _)| id.clone()).collect())
            .unwrap_or_default();
        for id in ids {
            let held = self.hold(&id).await;
            // Woken or stopped meanwhile: nothing to make again.
            if self.ready.lock().is_ok_and(|r| r.contains_key(&id)) {
                self.make_ready(&held, &id).await;
            }
        }
    }

    /// Takes a place for `row`'s ready sandbox, if there is room, before it
    /// is made: places are counted with the ones being made, so sleeps at
    /// the same moment cannot pass the bound together. A place given up by
    /// another deployment has its sandbox discarded under that deployment's
    /// hold, which is only tried: waiting for it while holding this one
    /// could deadlock two sleeps taking each other's place, and one that is
    /// busy is waking or stopping, which gives its place up anyway.
    async fn take_place(&self, id: &str, row: &DeploymentRow, since: Instant) -> bool {
        let config = &self.services.config;
        let holder = places::Holder { app: row.app_id, production: row.is_production, since };
        // Twice at most: a sleep at the same moment may take the place freed.
        for _ in 0..2 {
            let other = {
                let Ok(mut all) = self.ready.lock() else { return false };
                match places::room(&all, &holder, config.wake_ready, config.wake_ready_per_app) {
                    places::Room::None => return false,
                    places::Room::Free => {
                        all.insert(id.to_owned(), places::Place { holder, ready: None });
                        return true;
                    }
                    places::Room::Taken(other) => other,
                }
            };
            let Ok(_other_held) = self.transition(&other).try_lock_owned() else { return false };
            if let Some(ready) = self.take_ready(&other) {
                tracing::info!(deployment = %other, to = id, "a sandbox made ready gives its place to one that fell asleep later");
                ready.discard().await;
            }
        }
        false
    }

    /// Starts `id` again if it sleeps, and waits for its health check. A
    /// failed start puts it back to sleep, with why in its `error`, so a
    /// later request tries again once its pause is over (with `by_traffic`
    /// it waits for that; an operator's promotion or rollback does not);
    /// after
    /// [`MAX_FAILED_WAKES`] in a row it is `failed`. Its log keeps what the
    /// app printed.
    pub async fn wake(&self, id: &str, by_traffic: bool) -> Result<Status, DeployError> {
        // Traffic waits out the pause (the router holds its requests
        // meanwhile), without the lock: a stop goes ahead.
        let (held, failed) = loop {
            let failed = self.wake_failures.lock().map_err(|_| super::poisoned())?.get(id).copied();
            match failed {
                Some(f) if by_traffic && Instant::now() < f.not_before => {
                    tokio::time::sleep_until(f.not_before.into()).await;
                }
                // Held, then looked at again: a wake that failed meanwhile
                // set a new pause.
                _ => {
                    let held = self.hold(id).await;
                    let again = self.wake_failures.lock().map_err(|_| super::poisoned())?.get(id).copied();
                    if again.map(|f| f.not_before) == failed.map(|f| f.not_before) {
                        break (held, failed);
                    }
                }
            }
        };
        // Only what sleeps wakes: a deployment stopped, failed or removed
        // since the router asked stays as it is.
        // The app is read beside, on another connection: a woken request
        // waits for both. Both run to their end, so a claim made is known.
        let (row, app) = tokio::join!(self.services.db.wake_if_sleeping(id), self.services.db.app_of_deployment(id));
        let Some(row) = row? else {
            // Whatever the router waits for, the current table tells it.
            let _ = self.services.routes.publish().await;
            return Ok(self.running_status(id).unwrap_or(Status::Stopped));
        };
        let started = Instant::now();
        // Claimed: an error before its sandbox is watched puts it back to
        // sleep, so the next request tries again (no watcher would ever
        // move it on from `starting`).
        let run = async {
            // No app only while it is being removed, with its deployments.
            let app =
                app?.ok_or_else(|| DeployError::UnknownDeployment { app: row.app_name.clone(), id: id.into() })?;
            self.start_held_of(&held, &app, &row, true).await
        };
        let status = match run.await {
            Ok(status) => status,
            Err(e) => {
                let reason = format!("could not wake: {e}");
                let back = self.services.db.set_state_if(
                    id,
                    DeploymentState::Starting,
                    DeploymentState::Sleeping,
                    Some(&reason),
                );
                if let Err(db) = back.await {
                    tracing::error!(deployment = id, error = %db, "cannot put a deployment whose wake failed back to sleep");
                }
                let _ = self.services.routes.publish().await;
                return Err(e);
            }
        };
        let Status::Failed { reason, .. } = &status else {
            self.forget_failed_wakes(id);
            tracing::info!(deployment = id, app = %row.app_name, micros = started.elapsed().as_micros() as u64, "deployment woke");
            return Ok(status);
        };
        let (state, reason) = match after_failed_wake(failed.map_or(0, |f| f.count)) {
            AfterFailure::Sleep { count, pause } => {
                let failed = FailedWakes { count, not_before: Instant::now() + pause };
                self.wake_failures.lock().map_err(|_| super::poisoned())?.insert(id.to_owned(), failed);
                let reason =
                    format!("could not wake ({count} in a row; next try in {}): {reason}", format_duration(pause));
                (DeploymentState::Sleeping, reason)
            }
            AfterFailure::GiveUp { count } => {
                self.forget_failed_wakes(id);
                let reason = format!(
                    "could not wake {count} times in a row, so no request wakes it again (push again to run it): {reason}"
                );
                (DeploymentState::Failed, reason)
            }
        };
        self.services.db.set_state(id, state, Some(&reason)).await?;
        let _ = self.services.routes.publish().await;
        tracing::warn!(deployment = id, app = %row.app_name, reason, "deployment did not wake");
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
                            if let Err(e) = me.wake(&id, true).await {
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
        match self.wake(id, false).await? {
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
    fn failed_wakes_back_off_doubling_then_give_up() {
        assert_eq!(after_failed_wake(0), AfterFailure::Sleep { count: 1, pause: Duration::from_secs(5) });
        assert_eq!(after_failed_wake(1), AfterFailure::Sleep { count: 2, pause: Duration::from_secs(10) });
        // The third failure in a row: failed, never woken by traffic again.
        assert_eq!(after_failed_wake(2), AfterFailure::GiveUp { count: 3 });
        assert_eq!(after_failed_wake(u32::MAX), AfterFailure::GiveUp { count: u32::MAX });
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
