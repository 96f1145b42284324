//! Requests to sleeping deployments: held while the receiver wakes the
//! deployment, then forwarded once its route is live again.
//!
//! The first request to a sleeping deployment asks for it to be woken: the
//! deployment id is queued for the receiver, which long-polls `GET /wakes`
//! on the control socket (only the receiver can reach it). Later requests
//! join the wait and ask nothing, so concurrent first requests cause one
//! wake. What happens next is read off the tables the receiver publishes,
//! each of which passes through [`Wakes::table_replaced`]: live, the held
//! requests are forwarded; starting, they keep waiting; failed, or asleep
//! again after it started, the wake failed and they get a 503 page.
//!
//! A request can only ask for what its URL routes to, and only while the
//! receiver's table says that deployment sleeps; the receiver starts it only
//! if its records agree, so a stopped or expired deployment never wakes.
//! Each deployment holds at most [`MAX_HELD`] requests, and all of them
//! together at most [`MAX_HELD_ALL`] (one client cannot fill every sleeping
//! deployment's places), each for at most [`WAKE_WAIT`]; after a failed wake, requests get the 503 page at once for
//! [`RETRY_AFTER`] instead of asking again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nx_protocol::routes::{RouteTable, Target};
use tokio::sync::{watch, Notify};

use crate::pages::Page;
use crate::table::{Entry, RouteStore};

/// Requests held per sleeping deployment; more get the 503 page at once.
pub const MAX_HELD: usize = 1024;

/// Requests held across every sleeping deployment; more get the 503 page
/// at once.
pub const MAX_HELD_ALL: usize = 4096;

/// How long a request waits for its deployment to wake before the 503 page.
pub const WAKE_WAIT: Duration = Duration::from_secs(30);

/// How long after a failed wake requests get the 503 page without asking
/// again: the `Retry-After` every 503 page of the router carries.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Where one deployment's wake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Asked for; the receiver has not started it yet.
    Asked,
    /// The receiver published it starting.
    Starting,
    /// Its route is no longer asleep nor starting (live, stopped, gone):
    /// the held requests go by the route as it is now.
    Done,
    /// It failed to start, or went back to sleep after starting, at this instant.
    Failed(Instant),
}

#[derive(Debug)]
struct Waking {
    stage: watch::Sender<Stage>,
    held: usize,
}

/// The held requests and the wakes asked for, of every deployment.
#[derive(Debug, Default)]
pub struct Wakes {
    waking: Mutex<HashMap<String, Waking>>,
    /// Deployments asked for and not yet handed to the receiver.
    queue: Mutex<Vec<String>>,
    queued: Notify,
}

/// How a held request ends.
#[derive(Debug)]
pub enum Woken {
    /// Route it as its host routes now (live, most often).
    Route(Arc<Entry>),
    /// Answer this page.
    Answer(Page),
}

/// One request's place among a deployment's held ones.
struct Place<'a> {
    wakes: &'a Wakes,
    deployment: String,
}

impl Drop for Place<'_> {
    /// The last request to leave forgets a wake that is over, except a
    /// failure, which answers the next requests until its retry time.
    fn drop(&mut self) {
        let mut waking = self.wakes.waking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = waking.get_mut(&self.deployment) {
            w.held = w.held.saturating_sub(1);
            if w.held == 0 && !matches!(*w.stage.borrow(), Stage::Failed(_)) {
                waking.remove(&self.deployment);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Wakes {
    /// Whether a wake of `deployment` is under way, so a request that finds
    /// it starting waits for it instead of getting the starting page.
    pub fn is_waking(&self, deployment: &str) -> bool {
        lock(&self.waking).get(deployment).is_some_and(|w| !matches!(*w.stage.borrow(), Stage::Failed(_)))
    }

    /// Takes a place among the requests held for `deployment`, asking for
    /// the wake when it is the first; the stage to wait on, or the page to
    /// answer at once.
    fn join(&self, deployment: &str, app: &str) -> Result<(Place<'_>, watch::Receiver<Stage>), Page> {
        let mut waking = lock(&self.waking);
        let now = Instant::now();
        let held_all: usize = waking.values().map(|w| w.held).sum();
        let w = waking
            .entry(deployment.to_owned())
            .or_insert_with(|| Waking { stage: watch::channel(Stage::Done).0, held: 0 });
        let stage = *w.stage.borrow();
        match stage {
            Stage::Failed(at) if now < at + RETRY_AFTER => return Err(Page::wake_failed(app, deployment)),
            _ if w.held >= MAX_HELD || held_all >= MAX_HELD_ALL => return Err(Page::wake_busy(app, deployment)),
            // Over (or never begun, or failed long enough ago): ask again.
            Stage::Done | Stage::Failed(_) => {
                w.stage.send_replace(Stage::Asked);
                lock(&self.queue).push(deployment.to_owned());
                self.queued.notify_one();
            }
            Stage::Asked | Stage::Starting => {}
        }
        w.held += 1;
        let rx = w.stage.subscribe();
        Ok((Place { wakes: self, deployment: deployment.to_owned() }, rx))
    }

    /// Holds a request for `host`, whose route is the sleeping (or waking)
    /// `deployment` of `app`, until the wake is decided.
    pub async fn hold(&self, store: &RouteStore, host: &str, app: &str, deployment: &str) -> Woken {
        let (_place, mut stage) = match self.join(deployment, app) {
            Ok(joined) => joined,
            Err(page) => return Woken::Answer(page),
        };
        let deadline = tokio::time::Instant::now() + WAKE_WAIT;
        loop {
            match *stage.borrow_and_update() {
                Stage::Asked | Stage::Starting => {}
                Stage::Failed(_) => return Woken::Answer(Page::wake_failed(app, deployment)),
                Stage::Done => {
                    return match store.lookup(host) {
                        Some(entry) => Woken::Route(entry),
                        None => Woken::Answer(Page::unknown_host(host)),
                    }
                }
            }
            tokio::select! {
                changed = stage.changed() => if changed.is_err() {
                    return Woken::Answer(Page::wake_timeout(app, deployment));
                },
                _ = tokio::time::sleep_until(deadline) => {
                    self.give_up(deployment);
                    return Woken::Answer(Page::wake_timeout(app, deployment));
                }
            }
        }
    }

    /// A wake that took too long is forgotten: the next request asks again.
    fn give_up(&self, deployment: &str) {
        if let Some(w) = lock(&self.waking).get(deployment) {
            if matches!(*w.stage.borrow(), Stage::Asked | Stage::Starting) {
                w.stage.send_replace(Stage::Done);
            }
        }
    }

    /// Moves each wake under way on by what `table` says of its deployment.
    /// Called with every table taken, in order, so no step is missed.
    pub fn table_replaced(&self, table: &RouteTable) {
        let mut waking = lock(&self.waking);
        if waking.is_empty() {
            return;
        }
        let now = Instant::now();
        // A failure nobody waits on is kept only until its retry time.
        waking.retain(|_, w| w.held > 0 || matches!(*w.stage.borrow(), Stage::Failed(at) if now < at + RETRY_AFTER));
        for (deployment, w) in waking.iter() {
            let target = table.routes.values().find(|r| &r.deployment == deployment).map(|r| &r.target);
            let current = *w.stage.borrow();
            let next = match (current, target) {
                (Stage::Done | Stage::Failed(_), _) => continue,
                (_, Some(Target::Starting)) => Stage::Starting,
                (Stage::Asked, Some(Target::Sleeping)) => continue,
                // Asleep again after it started: the receiver put it back
                // after a failed start.
                (Stage::Starting, Some(Target::Sleeping)) | (_, Some(Target::Failed)) => Stage::Failed(now),
                (_, Some(Target::Live { .. } | Target::Replicas { .. } | Target::Stopped { .. }) | None) => Stage::Done,
            };
            if next != current {
                w.stage.send_replace(next);
            }
        }
    }

    /// The deployments asked for since the last call, waiting up to
    /// `wait` for one when there is none.
    pub async fn take(&self, wait: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.queued.notified();
            {
                let mut queue = lock(&self.queue);
                if !queue.is_empty() {
                    let mut asked = std::mem::take(&mut *queue);
                    asked.dedup();
                    return asked;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Vec::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nx_protocol::routes::Route;

    fn table(generation: u64, target: Target) -> RouteTable {
        let mut t = RouteTable { generation, ..Default::default() };
        t.routes.insert("web.localhost".into(), Route { app: "web".into(), deployment: "abcdefgh".into(), target });
        t
    }

    fn store() -> (Arc<RouteStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RouteStore::open(&dir.path().join("routes.json")).unwrap());
        store.replace(table(1, Target::Sleeping)).unwrap();
        (store, dir)
    }

    async fn held(store: &Arc<RouteStore>, n: usize) -> Vec<tokio::task::JoinHandle<Woken>> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.wakes().hold(&store, "web.localhost", "web", "abcdefgh").await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tasks
    }

    #[tokio::test]
    async fn concurrent_requests_ask_once_and_are_forwarded_when_live() {
        let (store, _dir) = store();
        let tasks = held(&store, 50).await;
        assert_eq!(store.wakes().take(Duration::from_millis(10)).await, ["abcdefgh"], "one wake for all");
        assert!(store.wakes().take(Duration::from_millis(10)).await.is_empty(), "asked once");
        store.replace(table(2, Target::Starting)).unwrap();
        assert!(store.wakes().is_waking("abcdefgh"));
        store.replace(table(3, Target::Live { addr: ([127, 0, 0, 1], 20001).into() })).unwrap();
        for t in tasks {
            match t.await.unwrap() {
                Woken::Route(e) => assert!(matches!(e.route.target, Target::Live { .. })),
                Woken::Answer(p) => panic!("answered {p:?}"),
            }
        }
        assert!(!store.wakes().is_waking("abcdefgh"), "forgotten once every request left");
    }

    #[tokio::test]
    async fn a_failed_wake_answers_503_and_the_next_request_asks_again_after_the_retry_time() {
        let (store, _dir) = store();
        let tasks = held(&store, 3).await;
        assert_eq!(store.wakes().take(Duration::from_millis(10)).await, ["abcdefgh"]);
        store.replace(table(2, Target::Starting)).unwrap();
        store.replace(table(3, Target::Failed)).unwrap();
        store.replace(table(4, Target::Sleeping)).unwrap();
        for t in tasks {
            match t.await.unwrap() {
                Woken::Answer(p) => assert_eq!((p.status, p.title), (503, "Could not wake")),
                Woken::Route(e) => panic!("routed to {:?}", e.route),
            }
        }
        // At once: the page, no new wake.
        let again = store.wakes().hold(&store, "web.localhost", "web", "abcdefgh").await;
        assert!(matches!(again, Woken::Answer(Page { status: 503, .. })));
        assert!(store.wakes().take(Duration::from_millis(10)).await.is_empty());
        tokio::time::sleep(RETRY_AFTER).await;
        let tasks = held(&store, 1).await;
        assert_eq!(store.wakes().take(Duration::from_millis(10)).await, ["abcdefgh"], "asked again");
        store.replace(table(5, Target::Stopped { reason: None })).unwrap();
        assert!(matches!(tasks.into_iter().next().unwrap().await.unwrap(), Woken::Route(_)));
    }

    #[tokio::test]
    async fn a_wake_seen_starting_and_then_asleep_failed_even_if_no_failed_table_came() {
        let (store, _dir) = store();
        let tasks = held(&store, 1).await;
        store.replace(table(2, Target::Starting)).unwrap();
        store.replace(table(3, Target::Sleeping)).unwrap();
        assert!(matches!(tasks.into_iter().next().unwrap().await.unwrap(), Woken::Answer(Page { status: 503, .. })));
    }

    #[tokio::test]
    async fn requests_held_across_deployments_are_bounded_and_a_place_left_is_taken_again() {
        let (store, _dir) = store();
        let wakes = store.wakes();
        let ids: Vec<String> = (0..MAX_HELD_ALL / MAX_HELD).map(|i| format!("deploym{i}")).collect();
        let mut places = Vec::new();
        for id in &ids {
            for _ in 0..MAX_HELD {
                places.push(wakes.join(id, "web").map_err(|p| p.title).unwrap());
            }
        }
        // Another deployment, whose own count is zero: refused all the same.
        let busy = wakes.join("another1", "web").map(|_| ()).unwrap_err();
        assert_eq!((busy.status, busy.title), (503, "Waking"));
        places.pop();
        assert!(wakes.join("another1", "web").is_ok(), "a place left is free again");
    }
}
