//! Traffic and resource figures: what nx-router counts per deployment (read
//! by the receiver over the control channel, `GET /traffic`) and what the
//! receiver's metrics API answers (`nx top`, `nx metrics APP`).
//!
//! Counters are cumulative since the router (or the sandbox) started, as in
//! Prometheus: a reader takes two snapshots and divides the difference by
//! the time between them. A counter that went down was reset (a router
//! reload, a restarted sandbox), and the later value is then the increase.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::DeploymentState;

/// Where the router's control channel answers per-deployment traffic
/// (`GET`, a [`RouterTraffic`]).
pub const CONTROL_TRAFFIC_PATH: &str = "/traffic";

/// Upper bounds, in seconds, of the request duration histogram's buckets; one
/// more bucket counts everything slower. Fixed, so the router counts into an
/// array and every reader agrees on what a bucket means.
pub const DURATION_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Number of duration buckets, the last one unbounded.
pub const BUCKETS: usize = DURATION_BUCKETS.len() + 1;

/// The classes responses are counted by: `none` when no response was sent
/// (the client left, or the request could not be read), then 1xx to 5xx.
pub const STATUS_CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index into [`STATUS_CLASSES`] of a status code (0 for none).
pub fn status_class(status: u16) -> usize {
    match status / 100 {
        c @ 1..=5 => usize::from(c),
        _ => 0,
    }
}

/// The index of the duration bucket `micros` falls in.
pub fn duration_bucket(micros: u64) -> usize {
    // Bounds in whole microseconds, compared without floating point.
    const BOUNDS: [u64; 12] =
        [1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 10_000_000];
    BOUNDS.iter().position(|&b| micros <= b).unwrap_or(BOUNDS.len())
}

/// One deployment's HTTP traffic through the router.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Requests answered, by [`STATUS_CLASSES`].
    pub requests: [u64; 6],
    /// Requests by duration bucket (not cumulative), [`DURATION_BUCKETS`] and one more.
    pub duration_buckets: [u64; BUCKETS],
    /// Sum of the requests' durations, in microseconds.
    pub duration_micros: u64,
    /// Request body bytes read from clients.
    pub bytes_in: u64,
    /// Response body bytes sent to clients.
    pub bytes_out: u64,
    /// Requests being proxied to the app now (each holds one app connection;
    /// a WebSocket for as long as it is open).
    pub open: u64,
}

impl Traffic {
    /// All requests counted.
    pub fn total(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Requests answered with a 5xx (the app's own, or the router's pages
    /// for an app that is down, failed or too slow).
    pub fn errors(&self) -> u64 {
        self.requests[5]
    }

    /// What was counted after `earlier`. When any counter went down the
    /// router was restarted in between, and everything it has now is new.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        let reset = self.total() < earlier.total() || self.duration_micros < earlier.duration_micros;
        if reset {
            return self.clone();
        }
        Traffic { open: self.open, ..self.minus(earlier) }
    }

    /// What `self` counts beyond `part`, a part of it counted apart (the
    /// gauge of open requests too).
    pub fn minus(&self, part: &Traffic) -> Traffic {
        let minus = |a: u64, b: u64| a.saturating_sub(b);
        Traffic {
            requests: std::array::from_fn(|i| minus(self.requests[i], part.requests[i])),
            duration_buckets: std::array::from_fn(|i| minus(self.duration_buckets[i], part.duration_buckets[i])),
            duration_micros: minus(self.duration_micros, part.duration_micros),
            bytes_in: minus(self.bytes_in, part.bytes_in),
            bytes_out: minus(self.bytes_out, part.bytes_out),
            open: minus(self.open, part.open),
        }
    }

    /// Both counts together: `self` and `other` counted apart, as one.
    pub fn plus(&self, other: &Traffic) -> Traffic {
        Traffic {
            requests: std::array::from_fn(|i| self.requests[i] + other.requests[i]),
            duration_buckets: std::array::from_fn(|i| self.duration_buckets[i] + other.duration_buckets[i]),
            duration_micros: self.duration_micros + other.duration_micros,
            bytes_in: self.bytes_in + other.bytes_in,
            bytes_out: self.bytes_out + other.bytes_out,
            open: self.open + other.open,
        }
    }

    /// The `q` quantile (0 to 1) of the durations in seconds, interpolated
    /// within its bucket as Prometheus's `histogram_quantile` does; `None`
    /// without requests. Past the last bound it is the last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.duration_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in self.duration_buckets.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = DURATION_BUCKETS.get(i) else { return DURATION_BUCKETS.last().copied() };
                let lower = if i == 0 { 0.0 } else { DURATION_BUCKETS[i - 1] };
                return Some(lower + (upper - lower) * ((rank - below as f64) / n as f64));
            }
            below += n;
        }
        DURATION_BUCKETS.last().copied()
    }
}

/// What the router answers on [`CONTROL_TRAFFIC_PATH`]: the traffic of every
/// deployment in its table, by deployment id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterTraffic {
    /// All of each deployment's traffic.
    pub deployments: BTreeMap<String, Traffic>,
    /// The part of each deployment's traffic each of its replicas got, by
    /// the port the router reached it on (the router knows replicas by
    /// address; the receiver knows which replica listens where). What a
    /// deployment's entry in `deployments` counts beyond these, the router
    /// answered itself (a starting or failed page). Empty from a router
    /// older than this field.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas: BTreeMap<String, BTreeMap<u16, Traffic>>,
    /// Access log lines the router dropped because their writer was behind
    /// (whole batches: see nx-router's `access` module); absent when the
    /// router keeps no access log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_lines_dropped: Option<u64>,
}

/// Whether a deployment serves the app's production host or only its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Production,
    Preview,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Production => "production",
            Role::Preview => "preview",
        }
    }
}

/// What a running deployment's cgroup says; a figure the host cannot give
/// (no such controller, cgroup v1) is absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_seconds: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
    pub pids: Option<u64>,
}

/// One deployment's figures in the metrics API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentMetrics {
    pub app: String,
    pub deployment: String,
    pub role: Role,
    pub state: DeploymentState,
    pub traffic: Traffic,
    pub resources: Resources,
    /// Times the sandbox was started again after it exited, since its start.
    pub restarts: u32,
    /// Each running replica's share of the figures above (one, replica 0,
    /// for a deployment without replicas).
    #[serde(default)]
    pub replicas: Vec<ReplicaMetrics>,
    /// The requests counted in `traffic` that no replica got: nx-router
    /// answered them itself (the deployment was starting, or none of its
    /// replicas could take them).
    #[serde(default)]
    pub router_answered: Traffic,
}

/// One replica's figures in the metrics API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaMetrics {
    /// The replica's number: 0 to the deployment's replica count less one.
    pub index: u32,
    pub traffic: Traffic,
    pub resources: Resources,
    pub restarts: u32,
}

/// `GET /v1/metrics` and `GET /v1/apps/{app}/metrics`: every running
/// deployment the caller may see.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    pub deployments: Vec<DeploymentMetrics>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_durations_fall_in_their_classes_and_buckets() {
        assert_eq!([0, 99, 101, 204, 302, 404, 503, 600].map(status_class), [0, 0, 1, 2, 3, 4, 5, 0]);
        assert_eq!(duration_bucket(0), 0);
        assert_eq!(duration_bucket(1_000), 0, "a bound belongs to its bucket (le)");
        assert_eq!(duration_bucket(1_001), 1);
        assert_eq!(duration_bucket(10_000_000), 11);
        assert_eq!(duration_bucket(10_000_001), BUCKETS - 1);
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_as_prometheus_does() {
        let mut t = Traffic::default();
        assert_eq!(t.quantile(0.5), None);
        // 100 requests in (5 ms, 10 ms]: the median is half way.
        t.duration_buckets[3] = 100;
        assert!((t.quantile(0.5).unwrap() - 0.0075).abs() < 1e-9);
        assert!((t.quantile(0.99).unwrap() - 0.00995).abs() < 1e-9);
        // One very slow request: the p99 of 101 stays in the fast bucket, the max is the last bound.
        t.duration_buckets[BUCKETS - 1] = 1;
        assert!(t.quantile(0.99).unwrap() <= 0.01);
        assert_eq!(t.quantile(1.0), Some(10.0));
    }

    #[test]
    fn differences_are_per_counter_and_a_reset_counts_from_zero() {
        let mut a = Traffic::default();
        a.requests[2] = 10;
        a.bytes_out = 100;
        a.duration_micros = 50;
        let mut b = a.clone();
        b.requests[2] = 15;
        b.requests[5] = 2;
        b.bytes_out = 180;
        b.duration_micros = 70;
        b.open = 3;
        let d = b.since(&a);
        assert_eq!((d.total(), d.errors(), d.bytes_out, d.duration_micros, d.open), (7, 2, 80, 20, 3));
        assert_eq!(a.plus(&d), b, "parts counted apart add up to the whole");
        assert_eq!(b.minus(&a), d, "and the whole less a part is the rest");
        let mut restarted = Traffic::default();
        restarted.requests[2] = 4;
        restarted.duration_micros = 9;
        assert_eq!(restarted.since(&b), restarted, "after a reset everything counted is new");
    }
}
