//! `nx top` (every app the key sees) and `nx metrics APP`: two readings of the
//! server's counters an interval apart, turned into rates, latency quantiles
//! and an error rate per running deployment; refreshed until Ctrl-C, or
//! printed once (`--once`, `--json`).

use std::io::IsTerminal;
use std::time::Instant;

use nx_protocol::api::DeploymentState;
use nx_protocol::metrics::{DeploymentMetrics, MetricsSnapshot, Role};
use serde::Serialize;

use super::{client, print_json, resolve_app};
use crate::cli::{Global, MetricsArgs, TopArgs};
use crate::client::Client;
use crate::output::table;

/// One deployment over one interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub app: String,
    pub deployment: String,
    pub role: Role,
    pub state: DeploymentState,
    /// Requests counted since the router started, and those answered 5xx.
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    /// Latency quantiles of the interval's requests; none without requests.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Share of the interval's requests answered 5xx, 0 to 1.
    pub error_rate: Option<f64>,
    /// CPU used over the interval, in percent of one core.
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub restarts: u32,
    pub open_connections: u64,
}

/// The figures of every deployment of `later`, over the `seconds` since
/// `earlier`. A deployment `earlier` did not have counts from zero.
pub fn figures(earlier: &MetricsSnapshot, later: &MetricsSnapshot, seconds: f64) -> Vec<Figures> {
    let seconds = seconds.max(f64::EPSILON);
    later
        .deployments
        .iter()
        .map(|d: &DeploymentMetrics| {
            let before = earlier.deployments.iter().find(|e| e.deployment == d.deployment);
            let delta = before.map_or_else(|| d.traffic.clone(), |b| d.traffic.since(&b.traffic));
            let ms = |q: f64| delta.quantile(q).map(|s| s * 1000.0);
            let cpu = match (before.and_then(|b| b.resources.cpu_seconds), d.resources.cpu_seconds) {
                (Some(a), Some(b)) if b >= a => Some((b - a) / seconds * 100.0),
                _ => None,
            };
            Figures {
                app: d.app.clone(),
                deployment: d.deployment.clone(),
                role: d.role,
                state: d.state,
                requests: d.traffic.total(),
                errors: d.traffic.errors(),
                requests_per_second: delta.total() as f64 / seconds,
                p50_ms: ms(0.5),
                p99_ms: ms(0.99),
                error_rate: (delta.total() > 0).then(|| delta.errors() as f64 / delta.total() as f64),
                cpu_percent: cpu,
                memory_bytes: d.resources.memory_bytes,
                memory_peak_bytes: d.resources.memory_peak_bytes,
                restarts: d.restarts,
                open_connections: d.traffic.open,
            }
        })
        .collect()
}

/// The figures as an aligned table.
fn render(figures: &[Figures]) -> String {
    if figures.is_empty() {
        return "no running deployments\n".into();
    }
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mut rows = vec![["app", "deployment", "role", "req/s", "p50", "p99", "5xx", "cpu", "memory", "restarts"]
        .map(str::to_owned)
        .to_vec()];
    rows.extend(figures.iter().map(|f| {
        vec![
            f.app.clone(),
            f.deployment.clone(),
            f.role.as_str().to_owned(),
            format!("{:.1}", f.requests_per_second),
            or_dash(f.p50_ms.map(|v| format!("{v:.1}ms"))),
            or_dash(f.p99_ms.map(|v| format!("{v:.1}ms"))),
            or_dash(f.error_rate.map(|r| format!("{:.1}%", r * 100.0))),
            or_dash(f.cpu_percent.map(|c| format!("{c:.1}%"))),
            or_dash(f.memory_bytes.map(|b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)))),
            f.restarts.to_string(),
        ]
    }));
    table(&rows)
}

/// Reads `path` every interval and shows what changed; once with --json or --once.
async fn watch(g: &Global, client: &Client, path: &str, args: &TopArgs) -> anyhow::Result<()> {
    let mut earlier: MetricsSnapshot = client.get(path).await?;
    let mut at = Instant::now();
    let terminal = std::io::stdout().is_terminal();
    loop {
        tokio::time::sleep(args.interval).await;
        let later: MetricsSnapshot = client.get(path).await?;
        let now = Instant::now();
        let figures = figures(&earlier, &later, (now - at).as_secs_f64());
        if g.json {
            return print_json(&figures);
        }
        if args.once {
            print!("{}", render(&figures));
            return Ok(());
        }
        if terminal {
            // Home and clear: the view is redrawn in place.
            print!("\x1b[H\x1b[2J");
        }
        println!("every {:?} (Ctrl-C to stop)\n{}", args.interval, render(&figures));
        (earlier, at) = (later, now);
    }
}

pub async fn top(g: &Global, args: TopArgs) -> anyhow::Result<()> {
    let client = client(g)?;
    watch(g, &client, "/v1/metrics", &args).await
}

pub async fn app(g: &Global, args: MetricsArgs) -> anyhow::Result<()> {
    let client = client(g)?;
    let app = resolve_app(&client, g, args.app.as_deref()).await?;
    watch(g, &client, &format!("/v1/apps/{app}/metrics"), &args.top).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use nx_protocol::metrics::{Resources, Traffic};

    fn deployment(id: &str, requests: [u64; 6], fast: u64, cpu: f64) -> DeploymentMetrics {
        let mut traffic = Traffic { requests, ..Traffic::default() };
        traffic.duration_buckets[3] = fast;
        DeploymentMetrics {
            app: "web".into(),
            deployment: id.into(),
            role: Role::Production,
            state: DeploymentState::Healthy,
            traffic,
            resources: Resources { cpu_seconds: Some(cpu), memory_bytes: Some(3 << 20), ..Resources::default() },
            restarts: 1,
            replicas: Vec::new(),
            router_answered: Traffic::default(),
        }
    }

    #[test]
    fn rates_quantiles_and_errors_are_over_the_interval() {
        let earlier = MetricsSnapshot { deployments: vec![deployment("aaaaaaaa", [0, 0, 10, 0, 0, 0], 10, 1.0)] };
        let later = MetricsSnapshot {
            deployments: vec![
                deployment("aaaaaaaa", [0, 0, 25, 0, 1, 4], 30, 1.5),
                deployment("bbbbbbbb", [0, 0, 0, 0, 0, 0], 0, 0.1),
            ],
        };
        let f = figures(&earlier, &later, 2.0);
        assert_eq!((f[0].requests, f[0].errors), (30, 4), "totals are since the start");
        assert!((f[0].requests_per_second - 10.0).abs() < 1e-9, "20 requests in 2 s");
        assert!((f[0].error_rate.unwrap() - 0.2).abs() < 1e-9, "4 of the interval's 20");
        assert!((f[0].cpu_percent.unwrap() - 25.0).abs() < 1e-9, "0.5 s of CPU in 2 s");
        assert!((f[0].p50_ms.unwrap() - 7.5).abs() < 1e-9, "the middle of (5 ms, 10 ms]");
        assert_eq!((f[1].requests_per_second, f[1].p99_ms, f[1].error_rate, f[1].cpu_percent), (0.0, None, None, None));
        let text = render(&f);
        let cells: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(cells[..5], ["web", "aaaaaaaa", "production", "10.0", "7.5ms"], "{text}");
        assert_eq!(cells[6..], ["20.0%", "25.0%", "3.0", "MiB", "1"], "{text}");
        assert_eq!(text.lines().nth(2).unwrap().split_whitespace().nth(4), Some("-"), "no requests, no latency");
        assert_eq!(render(&[]), "no running deployments\n");
    }
}
