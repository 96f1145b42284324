//! Balancing across the replicas of one deployment: power of two choices on
//! outstanding requests, and a replica that refused a connection taken out
//! for a short back-off (or until the receiver's next table, which builds
//! new replica state).
//!
//! Two random replicas are compared and the one with fewer requests in
//! flight gets the request: nearly as even as least-outstanding over all of
//! them, without a scan, and without every worker herding onto the same
//! "least loaded" replica between two updates of the counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::exchange::Backend;

/// How long a replica that refused a connection is left out. Short: the
/// receiver's health check takes a dead replica out of the table within one
/// interval anyway, and a replica back from a restart should soon get
/// requests again.
pub const BACKOFF: Duration = Duration::from_secs(2);

/// One replica: where it listens, its requests in flight, and until when it is left out.
#[derive(Debug)]
struct Replica {
    backend: Backend,
    outstanding: AtomicU32,
    /// Milliseconds since [`epoch`] until which it is left out; 0 when it is in.
    down_until: AtomicU64,
}

/// The replicas of one route.
#[derive(Debug)]
pub struct Replicas {
    replicas: Box<[Replica]>,
}

/// The instant [`Replica::down_until`] counts from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Replicas {
    /// The replicas at `addrs`, all owned by `deployment`.
    pub fn new(addrs: &[SocketAddr], deployment: &str) -> Replicas {
        let replicas = addrs
            .iter()
            .map(|a| Replica {
                backend: Backend::new(*a, deployment),
                outstanding: AtomicU32::new(0),
                down_until: AtomicU64::new(0),
            })
            .collect();
        Replicas { replicas }
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    fn usable(&self, i: usize, now: u64, except: Option<usize>) -> bool {
        Some(i) != except && self.replicas[i].down_until.load(Ordering::Relaxed) <= now
    }

    /// Picks a replica other than `except` and counts a request on it: the
    /// less busy of two random ones that are in. When every other one is
    /// left out, the first other one is tried anyway (a back-off is a guess;
    /// a request is not refused on a guess). `None` when there is no other.
    pub fn pick(&self, except: Option<usize>) -> Option<(usize, Backend)> {
        let n = self.replicas.len();
        if n == 0 || (n == 1 && except == Some(0)) {
            return None;
        }
        let now = now_ms();
        let a = rand::random::<usize>() % n;
        let b = (a + 1 + rand::random::<usize>() % (n - 1).max(1)) % n;
        let chosen = match (self.usable(a, now, except), self.usable(b, now, except)) {
            (true, true) => {
                let load = |i: usize| self.replicas[i].outstanding.load(Ordering::Relaxed);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            (true, false) => a,
            (false, true) => b,
            (false, false) => (0..n)
                .map(|k| (a + k) % n)
                .find(|&i| self.usable(i, now, except))
                .or_else(|| (0..n).find(|&i| Some(i) != except))?,
        };
        self.replicas[chosen].outstanding.fetch_add(1, Ordering::Relaxed);
        Some((chosen, self.replicas[chosen].backend))
    }

    /// A request picked on replica `i` is over.
    pub fn done(&self, i: usize) {
        self.replicas[i].outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    /// Leaves replica `i` out for [`BACKOFF`]: it refused a connection.
    pub fn take_out(&self, i: usize) {
        self.replicas[i].down_until.store(now_ms() + BACKOFF.as_millis() as u64, Ordering::Relaxed);
    }

    /// Requests in flight on replica `i`.
    #[cfg(test)]
    pub fn outstanding(&self, i: usize) -> u32 {
        self.replicas[i].outstanding.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Replicas {
        let addrs: Vec<SocketAddr> = (1..=3).map(|p| ([127, 0, 0, 1], p).into()).collect();
        Replicas::new(&addrs, "d1")
    }

    #[test]
    fn requests_spread_and_the_busy_replica_gets_fewer() {
        let r = three();
        // Replica 0 holds many slow requests: it is never the less busy of two.
        for _ in 0..50 {
            r.replicas[0].outstanding.fetch_add(1, Ordering::Relaxed);
        }
        let mut hits = [0u32; 3];
        for _ in 0..300 {
            let (i, backend) = r.pick(None).unwrap();
            assert_eq!(backend.addr.port() as usize, i + 1);
            hits[i] += 1;
            r.done(i);
        }
        assert_eq!(hits[0], 0, "{hits:?}");
        assert!(hits[1] > 50 && hits[2] > 50, "both idle replicas share the load: {hits:?}");
        assert_eq!(r.outstanding(1) + r.outstanding(2), 0, "every pick was given back");
    }

    #[test]
    fn a_replica_taken_out_gets_nothing_until_its_backoff_ends() {
        let r = three();
        r.take_out(1);
        for _ in 0..100 {
            let (i, _) = r.pick(None).unwrap();
            assert_ne!(i, 1);
            r.done(i);
        }
        r.replicas[1].down_until.store(now_ms().saturating_sub(1), Ordering::Relaxed);
        assert!((0..200).any(|_| r.pick(None).unwrap().0 == 1), "back after its back-off");
    }

    #[test]
    fn a_retry_goes_to_another_replica_even_when_all_are_out() {
        let r = three();
        for _ in 0..100 {
            let (i, _) = r.pick(Some(2)).unwrap();
            assert_ne!(i, 2);
        }
        for i in 0..3 {
            r.take_out(i);
        }
        let (i, _) = r.pick(Some(0)).unwrap();
        assert_ne!(i, 0, "a guess does not refuse a request, but the failed replica is not asked again");
        let one = Replicas::new(&[([127, 0, 0, 1], 1).into()], "d1");
        assert!(one.pick(Some(0)).is_none(), "a single replica has no other");
        assert_eq!(one.pick(None).unwrap().0, 0);
    }
}
