//! Per-deployment traffic counters, counted on the request path and summed
//! only when the receiver asks (`GET /traffic` on the control channel).
//!
//! A request costs a handful of relaxed atomic additions and nothing else:
//! no lock, no allocation, no map lookup (the counters hang off the route
//! entry the request already holds). Each deployment's counters are split
//! into shards, one per worker thread (modulo [`SHARDS`]), each on cache
//! lines of its own, so workers serving one busy app never write to the same
//! line; a read sums the shards.
//!
//! `--traffic-counters false` (a bench setting: it measures what counting
//! costs) hands every request [`Counters::off`], which has no shards and
//! counts nothing.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::LazyLock;

use nx_protocol::metrics::{duration_bucket, status_class, Traffic, BUCKETS, STATUS_CLASSES};

/// Shards per deployment: more than the workers of any machine the router
/// runs on by default would leave some unused; fewer makes two workers share.
const SHARDS: usize = 16;

/// One worker's share of a deployment's counters, alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    requests: [AtomicU64; STATUS_CLASSES.len()],
    buckets: [AtomicU64; BUCKETS],
    micros: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Proxied requests begun and ended: the gauge of open ones is their
    /// difference, so a request may end on another shard than it began.
    opened: AtomicU64,
    closed: AtomicU64,
}

/// The shard of the calling thread: workers are numbered as they first count.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// One deployment's traffic counters.
#[derive(Debug)]
pub struct Counters {
    shards: Box<[Shard]>,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters { shards: (0..SHARDS).map(|_| Shard::default()).collect() }
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// Counters that count nothing, for a router started with
    /// `--traffic-counters false`.
    pub fn off() -> &'static Counters {
        static OFF: LazyLock<Counters> = LazyLock::new(|| Counters { shards: Box::new([]) });
        &OFF
    }

    /// The calling thread's shard; none in [`Counters::off`] (the bounds
    /// check is the one indexing makes anyway).
    fn shard(&self) -> Option<&Shard> {
        self.shards.get(shard_index())
    }

    /// A request starts being proxied to the app.
    pub fn open(&self) {
        if let Some(shard) = self.shard() {
            add(&shard.opened, 1);
        }
    }

    /// A request [`Counters::open`] counted is over.
    pub fn close(&self) {
        if let Some(shard) = self.shard() {
            add(&shard.closed, 1);
        }
    }

    /// One request answered with `status` (0: none) after `micros`, with
    /// these body bytes read from the client and sent to it.
    pub fn record(&self, status: u16, micros: u64, bytes_in: u64, bytes_out: u64) {
        let Some(shard) = self.shard() else { return };
        add(&shard.requests[status_class(status)], 1);
        add(&shard.buckets[duration_bucket(micros)], 1);
        add(&shard.micros, micros);
        if bytes_in > 0 {
            add(&shard.bytes_in, bytes_in);
        }
        add(&shard.bytes_out, bytes_out);
    }

    /// The sum of every shard.
    pub fn read(&self) -> Traffic {
        let mut t = Traffic::default();
        let (mut opened, mut closed) = (0u64, 0u64);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for s in self.shards.iter() {
            for (sum, c) in t.requests.iter_mut().zip(&s.requests) {
                *sum += get(c);
            }
            for (sum, c) in t.duration_buckets.iter_mut().zip(&s.buckets) {
                *sum += get(c);
            }
            t.duration_micros += get(&s.micros);
            t.bytes_in += get(&s.bytes_in);
            t.bytes_out += get(&s.bytes_out);
            opened += get(&s.opened);
            closed += get(&s.closed);
        }
        // Read shard by shard, a close may be seen without its open.
        t.open = opened.saturating_sub(closed);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_from_many_threads_add_up_by_class_bucket_and_bytes() {
        let counters = Arc::new(Counters::default());
        let threads: Vec<_> = (0..20)
            .map(|i| {
                let c = counters.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        c.open();
                        c.record(if i % 4 == 0 { 503 } else { 200 }, 3_000, 10, 1_000);
                        c.close();
                    }
                    c.open();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let t = counters.read();
        assert_eq!(t.total(), 2_000);
        assert_eq!(t.requests[5], 500, "every fourth thread answered 503");
        assert_eq!(t.requests[2], 1_500);
        assert_eq!(t.duration_buckets[duration_bucket(3_000)], 2_000);
        assert_eq!(t.duration_micros, 6_000_000);
        assert_eq!((t.bytes_in, t.bytes_out), (20_000, 2_000_000));
        assert_eq!(t.open, 20, "each thread left one request open");
    }

    #[test]
    fn counters_that_are_off_count_nothing() {
        let off = Counters::off();
        off.open();
        off.record(200, 3_000, 10, 1_000);
        off.close();
        assert_eq!(off.read(), Traffic::default());
    }
}
