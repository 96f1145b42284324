//! The platform's own counters: how long pushes take and how long a
//! deployment takes from its start to its first healthy answer, how many
//! GitHub reports wait and how often a GitHub call was retried, and (counted
//! by nx-store) how many operations on the artifact store failed.
//!
//! A leaf module: the modules that do the work record here and [`crate::metrics`]
//! reads from here, so recording imports nothing of the exposition. One set
//! per process, as the `metrics` facade and every Prometheus client keep them:
//! handing a registry through every constructor would change every
//! signature for a number.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Bounds, in seconds, for pushes and starts: from a small binary on a fast
/// disk to a large one behind a slow health check.
const SLOW_BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// The platform's counters (clones share their values).
#[derive(Debug)]
pub struct Platform {
    pub push_seconds: Histogram,
    pub start_to_healthy_seconds: Histogram,
    pub github_queue: Gauge,
    pub github_retries: Counter,
    /// The pool of parked sandboxes, which counts its starts itself.
    pool: std::sync::OnceLock<nx_runtime::pool::Pool>,
}

static PLATFORM: LazyLock<Platform> = LazyLock::new(|| Platform {
    push_seconds: Histogram::new(SLOW_BUCKETS),
    start_to_healthy_seconds: Histogram::new(SLOW_BUCKETS),
    github_queue: Gauge::default(),
    github_retries: Counter::default(),
    pool: std::sync::OnceLock::new(),
});

/// A push under way; see [`Platform::push_timer`].
#[derive(Debug)]
pub struct PushTimer<'a> {
    histogram: &'a Histogram,
    started: std::time::Instant,
}

impl Drop for PushTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// The process's counters.
pub fn platform() -> &'static Platform {
    &PLATFORM
}

impl Platform {
    /// Times a push (API or SFTP) from now until the timer is dropped,
    /// whichever way the push ends.
    pub fn push_timer(&self) -> PushTimer<'_> {
        PushTimer { histogram: &self.push_seconds, started: std::time::Instant::now() }
    }

    /// Reports the sandbox starts `pool` counts (from a parked slot or the
    /// usual way) and how many it holds parked; the first pool set stays.
    pub fn count_starts(&self, pool: nx_runtime::pool::Pool) {
        let _ = self.pool.set(pool);
    }

    /// A deployment answered its health check `took` after its start.
    pub fn became_healthy(&self, took: Duration) {
        self.start_to_healthy_seconds.observe(took.as_secs_f64());
    }

    /// Adds the counters to `registry` (each scrape builds a new one).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "nx_push_duration_seconds",
            "Time from the start of a push to its answer",
            self.push_seconds.clone(),
        );
        registry.register(
            "nx_start_to_healthy_seconds",
            "Time from a deployment's start to its first healthy answer",
            self.start_to_healthy_seconds.clone(),
        );
        registry.register("nx_github_report_queue", "GitHub reports waiting to be sent", self.github_queue.clone());
        registry.register(
            "nx_github_call_retries",
            "GitHub API calls sent again after a failure",
            self.github_retries.clone(),
        );
        if let Some(pool) = self.pool.get() {
            let (parked, fresh) = pool.starts();
            let starts = Family::<[(&'static str, &'static str); 1], Counter>::default();
            starts.get_or_create(&[("from", "pool")]).inc_by(parked);
            starts.get_or_create(&[("from", "fresh")]).inc_by(fresh);
            starts.get_or_create(&[("from", "ready")]).inc_by(nx_runtime::ready::started());
            registry.register(
                "nx_sandbox_starts",
                "Sandbox starts: from a parked sandbox (from=pool), the usual way (from=fresh), or from one made \
                 ready ahead, for a wake or during a push's upload (from=ready)",
                starts,
            );
            let ready = Gauge::<i64>::default();
            ready.set(i64::try_from(pool.parked()).unwrap_or(i64::MAX));
            registry.register("nx_sandbox_pool_parked", "Sandboxes parked ready for a start", ready);
        }
        // The store counts its own failures (nx-store knows nothing of the metrics).
        registry.register(
            "nx_store_errors",
            "Artifact store operations that failed",
            ConstCounter::new(nx_store::failures()),
        );
    }
}
