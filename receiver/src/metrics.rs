//! What each app and the platform are doing, in figures: `/metrics` in
//! Prometheus's text format on `--metrics-listen`, and the snapshot the
//! metrics API answers (`nx top`, `nx metrics APP`).
//!
//! Nothing is counted here: each scrape asks the sources and builds the
//! families anew, so a deployment that stopped is gone from them at the next
//! scrape, and label sets stay bounded by what runs (labels are app,
//! deployment, role, replica (0 to 15, or `none`) and the status class;
//! never a path).
//!
//! - traffic: nx-router counts per deployment and replica port on its
//!   request path and answers `GET /traffic` on its control socket
//!   ([`RoutePublisher::traffic`]); the receiver knows what the router does
//!   not (production or preview, which replica listens on which port);
//! - resources: each replica's cgroup files (v2 or v1); the API's figures
//!   per deployment are their sums (the peak too: an upper bound of the
//!   replicas' peak together);
//! - storage: each app's data volume, its database's size and connections;
//! - the platform: [`crate::counters`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nx_protocol::metrics::{
    DeploymentMetrics, MetricsSnapshot, ReplicaMetrics, Resources, Role, RouterTraffic, Traffic, DURATION_BUCKETS,
    STATUS_CLASSES,
};
use nx_runtime::cgroup::Driver;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::db::{DatabaseFigures, Db, DeploymentRow};
use crate::deploy::{replica_key, Deployer};
use crate::routing::{PublishError, RoutePublisher};

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Why figures could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot read deployments: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot read traffic from nx-router: {0}")]
    Router(#[from] PublishError),
}

/// What the figures are read from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub db: Db,
    pub deployer: Arc<Deployer>,
    pub routes: Arc<RoutePublisher>,
    /// The receiver's data directory (apps' volumes are under `apps/`).
    pub data_dir: PathBuf,
    /// The log drains' queues.
    pub drains: Arc<crate::drains::Hub>,
}

/// Reads a number from the first line of `file`, or the value of `key` in a
/// flat-keyed file (`cpu.stat`, `memory.events`).
fn read_number(file: &Path, key: Option<&str>) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    match key {
        None => text.trim().parse().ok(),
        Some(key) => text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok()),
    }
}

/// The figures of the cgroup `group/id` in the host's layout; a figure the
/// layout does not give is absent: on cgroup v2 memory.peak needs Linux
/// 5.19, on v1 CPU time needs the cpuacct controller mounted with cpu.
/// The figures of two sandboxes of one deployment together; a figure
/// neither has stays absent.
fn sum_resources(a: Resources, b: Resources) -> Resources {
    fn add<T: std::ops::Add<Output = T>>(a: Option<T>, b: Option<T>) -> Option<T> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        }
    }
    Resources {
        cpu_seconds: add(a.cpu_seconds, b.cpu_seconds),
        memory_bytes: add(a.memory_bytes, b.memory_bytes),
        memory_peak_bytes: add(a.memory_peak_bytes, b.memory_peak_bytes),
        oom_kills: add(a.oom_kills, b.oom_kills),
        pids: add(a.pids, b.pids),
    }
}

pub fn cgroup_resources(driver: &Driver, group: &str, id: &str) -> Resources {
    let read = |hierarchy: Option<&PathBuf>, file: &str, key: Option<&str>| {
        read_number(&hierarchy?.join(group).join(id).join(file), key)
    };
    match driver {
        Driver::V2 { root, .. } => {
            let root = Some(root);
            Resources {
                cpu_seconds: read(root, "cpu.stat", Some("usage_usec")).map(|us| us as f64 / 1e6),
                memory_bytes: read(root, "memory.current", None),
                memory_peak_bytes: read(root, "memory.peak", None),
                oom_kills: read(root, "memory.events", Some("oom_kill")),
                pids: read(root, "pids.current", None),
            }
        }
        Driver::V1 { memory, cpu, pids } => Resources {
            cpu_seconds: read(cpu.as_ref(), "cpuacct.usage", None).map(|ns| ns as f64 / 1e9),
            memory_bytes: read(memory.as_ref(), "memory.usage_in_bytes", None),
            memory_peak_bytes: read(memory.as_ref(), "memory.max_usage_in_bytes", None),
            oom_kills: read(memory.as_ref(), "memory.oom_control", Some("oom_kill")),
            pids: read(pids.as_ref(), "pids.current", None),
        },
        Driver::None => Resources::default(),
    }
}

/// The figures of each running deployment of `rows` that `visible` lets
/// through, with its traffic from `traffic`.
fn deployments(
    deployer: &Deployer,
    rows: &[DeploymentRow],
    traffic: &RouterTraffic,
    visible: &(dyn Fn(&str) -> bool + Sync),
) -> Vec<DeploymentMetrics> {
    use nx_runtime::supervisor::Status;
    let (driver, group) = deployer.cgroups();
    rows.iter()
        .filter(|r| visible(&r.app_name))
        .filter_map(|row| {
            let restarts = match deployer.running_status(&row.id)? {
                Status::Starting { restarts } | Status::Healthy { restarts } | Status::Unhealthy { restarts, .. } => {
                    restarts
                }
                Status::Failed { .. } | Status::Stopped => return None,
            };
            // The router knows replicas by port, the deployer which replica
            // listens on which.
            let ports = traffic.replicas.get(&row.id);
            let replicas: Vec<ReplicaMetrics> = deployer
                .replicas_of(&row.id)
                .into_iter()
                .map(|r| ReplicaMetrics {
                    index: r.index,
                    traffic: ports.and_then(|p| p.get(&r.port)).cloned().unwrap_or_default(),
                    resources: cgroup_resources(driver, &group, &replica_key(&row.id, r.index)),
                    restarts: r.restarts,
                })
                .collect();
            let total = traffic.deployments.get(&row.id).cloned().unwrap_or_default();
            let forwarded = ports.into_iter().flat_map(|p| p.values()).fold(Traffic::default(), |sum, t| sum.plus(t));
            Some(DeploymentMetrics {
                app: row.app_name.clone(),
                deployment: row.id.clone(),
                role: if row.is_production { Role::Production } else { Role::Preview },
                state: row.state(),
                router_answered: total.minus(&forwarded),
                traffic: total,
                resources: replicas.iter().map(|r| r.resources.clone()).reduce(sum_resources).unwrap_or_default(),
                restarts,
                replicas,
            })
        })
        .collect()
}

impl Sources {
    /// Every running deployment `visible` lets through (by app name).
    pub async fn snapshot(&self, visible: &(dyn Fn(&str) -> bool + Sync)) -> Result<MetricsSnapshot, MetricsError> {
        let rows = self.db.routed_deployments().await?;
        let traffic = self.routes.traffic().await?;
        Ok(MetricsSnapshot { deployments: deployments(&self.deployer, &rows, &traffic, visible) })
    }

    /// Everything, in Prometheus's text format. A source that cannot be read
    /// leaves its families out (and says so in `nx_router_up`, or the log),
    /// so one failure does not blank the rest.
    pub async fn render(&self) -> String {
        let rows = match self.db.routed_deployments().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read deployments");
                Vec::new()
            }
        };
        let traffic = match self.routes.traffic().await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read traffic from nx-router");
                None
            }
        };
        let deployments =
            deployments(&self.deployer, &rows, traffic.as_ref().unwrap_or(&RouterTraffic::default()), &|_| true);
        let databases = match self.db.database_figures().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read database sizes");
                Vec::new()
            }
        };
        let mut apps: Vec<&str> = rows.iter().map(|r| r.app_name.as_str()).collect();
        apps.sort_unstable();
        apps.dedup();
        let apps_dir = self.data_dir.join("apps");
        let volumes = apps
            .into_iter()
            .filter_map(|a| crate::volumes::used_bytes(&apps_dir.join(a)).map(|b| (a.to_owned(), b)))
            .collect();
        let drains = (self.drains.stats(), self.drains.lagged());
        let access_lines_dropped = traffic.as_ref().and_then(|t| t.access_lines_dropped);
        Scrape { deployments, router_up: traffic.is_some(), access_lines_dropped, volumes, databases, drains }.encode()
    }
}

/// The metrics listener's routes: `GET /metrics` alone.
pub fn app(sources: Sources) -> axum::Router {
    async fn scrape(axum::extract::State(sources): axum::extract::State<Sources>) -> impl axum::response::IntoResponse {
        ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], sources.render().await)
    }
    axum::Router::new().route("/metrics", axum::routing::get(scrape)).with_state(sources)
}

/// One scrape's figures, encoded as Prometheus families.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub deployments: Vec<DeploymentMetrics>,
    /// Whether the router's traffic was read (else its families are left out).
    pub router_up: bool,
    /// Access log lines the router dropped, when it keeps an access log.
    pub access_lines_dropped: Option<u64>,
    /// Bytes used on each app's data volume.
    pub volumes: Vec<(String, u64)>,
    pub databases: Vec<DatabaseFigures>,
    /// Each log drain's figures, and the records the drains' sources lost.
    pub drains: (Vec<crate::drains::DrainStats>, u64),
}

fn db_labels(d: &DatabaseFigures) -> [(&'static str, &str); 2] {
    [("app", d.app.as_str()), ("database", d.database.as_str())]
}

/// The label of requests no replica got: the router answered them itself.
const NO_REPLICA: &str = "none";

/// One labelled row of the per-deployment families: a replica of a
/// deployment (`replica="0"` when it has no others, so its series go on
/// unchanged when it is scaled), or the requests the router answered itself
/// (`replica="none"`, traffic only, present once there are some).
struct Row<'a> {
    d: &'a DeploymentMetrics,
    replica: String,
    traffic: &'a Traffic,
    /// The replica's own figures; `None` for the router's answers.
    sandbox: Option<&'a ReplicaMetrics>,
}

impl Row<'_> {
    fn labels(&self) -> [(&'static str, &str); 4] {
        let d = self.d;
        [
            ("app", d.app.as_str()),
            ("deployment", d.deployment.as_str()),
            ("role", d.role.as_str()),
            ("replica", self.replica.as_str()),
        ]
    }
}

fn rows(ds: &[DeploymentMetrics]) -> Vec<Row<'_>> {
    ds.iter()
        .flat_map(|d| {
            let replicas = d.replicas.iter().map(move |r| Row {
                d,
                replica: r.index.to_string(),
                traffic: &r.traffic,
                sandbox: Some(r),
            });
            let router = (d.router_answered.total() > 0).then(|| Row {
                d,
                replica: NO_REPLICA.to_owned(),
                traffic: &d.router_answered,
                sandbox: None,
            });
            replicas.chain(router)
        })
        .collect()
}

/// Writes one family of `kind` with a sample per labelled value; nothing when
/// there are none (an empty family says nothing and confuses readers).
fn family<L: EncodeLabelSet, V: Copy>(
    encoder: &mut DescriptorEncoder,
    (name, help, kind): (&str, &str, MetricType),
    samples: impl IntoIterator<Item = (L, V)>,
    mut write: impl FnMut(&mut prometheus_client::encoding::MetricEncoder, V) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        write(&mut metric.encode_family(&labels)?, value)?;
    }
    Ok(())
}

fn counter(m: &mut prometheus_client::encoding::MetricEncoder, v: u64) -> std::fmt::Result {
    m.encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge(m: &mut prometheus_client::encoding::MetricEncoder, v: i64) -> std::fmt::Result {
    m.encode_gauge(&v)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge, Histogram};
        let rows = rows(&self.deployments);
        let gauge_u = |m: &mut prometheus_client::encoding::MetricEncoder, v: u64| gauge(m, v as i64);
        e.encode_descriptor("nx_router_up", "Whether nx-router's traffic counters could be read", None, Gauge)?
            .encode_gauge(&i64::from(self.router_up))?;
        if self.router_up {
            let by_class = rows.iter().flat_map(|r| {
                STATUS_CLASSES.iter().zip(r.traffic.requests).map(move |(class, n)| {
                    let [a, b, c, d] = r.labels();
                    ([a, b, c, d, ("class", *class)], n)
                })
            });
            family(
                &mut e,
                (
                    "nx_http_requests",
                    "Requests through nx-router by status class (none: no response was sent)",
                    Counter,
                ),
                by_class,
                counter,
            )?;
            family(
                &mut e,
                (
                    "nx_http_request_duration_seconds",
                    "Time from a request's head to the end of its response, in nx-router",
                    Histogram,
                ),
                rows.iter().map(|r| (r.labels(), r.traffic)),
                |m, t: &Traffic| {
                    let buckets: Vec<(f64, u64)> =
                        DURATION_BUCKETS.iter().copied().chain([f64::INFINITY]).zip(t.duration_buckets).collect();
                    m.encode_histogram::<NoLabelSet>(t.duration_micros as f64 / 1e6, t.total(), &buckets, None)
                },
            )?;
            family(
                &mut e,
                ("nx_http_request_body_bytes", "Request body bytes read from clients", Counter),
                rows.iter().map(|r| (r.labels(), r.traffic.bytes_in)),
                counter,
            )?;
            family(
                &mut e,
                ("nx_http_response_body_bytes", "Response body bytes sent to clients", Counter),
                rows.iter().map(|r| (r.labels(), r.traffic.bytes_out)),
                counter,
            )?;
            family(
                &mut e,
                (
                    "nx_http_open_connections",
                    "Requests being proxied to the app now, each on one app connection",
                    Gauge,
                ),
                rows.iter().map(|r| (r.labels(), r.traffic.open)),
                gauge_u,
            )?;
            if let Some(dropped) = self.access_lines_dropped {
                e.encode_descriptor(
                    "nx_router_access_lines_dropped",
                    "Access log lines nx-router dropped because their writer was behind",
                    None,
                    Counter,
                )?
                .encode_counter::<NoLabelSet, _, u64>(&dropped, None)?;
            }
        }
        let sandboxes = || rows.iter().filter_map(|r| Some((r.labels(), r.sandbox?)));
        let res = |f: fn(&Resources) -> Option<u64>| sandboxes().filter_map(move |(l, s)| Some((l, f(&s.resources)?)));
        family(
            &mut e,
            ("nx_deployment_cpu_seconds", "CPU time used by the deployment's sandbox", Counter),
            sandboxes().filter_map(|(l, s)| Some((l, s.resources.cpu_seconds?))),
            |m, v: f64| m.encode_counter::<NoLabelSet, _, u64>(&v, None),
        )?;
        family(
            &mut e,
            ("nx_deployment_memory_bytes", "Memory the sandbox uses now", Gauge),
            res(|r| r.memory_bytes),
            gauge_u,
        )?;
        family(
            &mut e,
            ("nx_deployment_memory_peak_bytes", "Most memory the sandbox used at once", Gauge),
            res(|r| r.memory_peak_bytes),
            gauge_u,
        )?;
        family(
            &mut e,
            ("nx_deployment_oom_kills", "Processes of the sandbox killed for its memory limit", Counter),
            res(|r| r.oom_kills),
            counter,
        )?;
        family(
            &mut e,
            ("nx_deployment_pids", "Processes and threads in the sandbox", Gauge),
            res(|r| r.pids),
            gauge_u,
        )?;
        family(
            &mut e,
            ("nx_deployment_restarts", "Times the sandbox was started again after it exited", Counter),
            sandboxes().map(|(l, s)| (l, u64::from(s.restarts))),
            counter,
        )?;
        family(
            &mut e,
            ("nx_app_volume_used_bytes", "Bytes used on the app's data volume", Gauge),
            self.volumes.iter().map(|(app, b)| ([("app", app.as_str())], *b)),
            gauge_u,
        )?;
        family(
            &mut e,
            ("nx_app_database_size_bytes", "Size of the app's database (pg_database_size)", Gauge),
            self.databases.iter().map(|d| (db_labels(d), d.bytes)),
            gauge,
        )?;
        family(
            &mut e,
            ("nx_app_database_connections", "Sessions open on the app's database", Gauge),
            self.databases.iter().map(|d| (db_labels(d), d.connections)),
            gauge,
        )?;
        let drain = |f: fn(&crate::drains::DrainStats) -> u64| {
            self.drains
                .0
                .iter()
                .map(move |d| ([("drain", d.id.as_str()), ("app", d.app.as_deref().unwrap_or(""))], f(d)))
        };
        family(
            &mut e,
            ("nx_drain_records", "Records taken into the log drain's queue", Counter),
            drain(|d| d.queued),
            counter,
        )?;
        family(&mut e, ("nx_drain_sent", "Records written to the log drain", Counter), drain(|d| d.sent), counter)?;
        family(
            &mut e,
            ("nx_drain_dropped", "Records dropped (the oldest) because the log drain's queue was full", Counter),
            drain(|d| d.dropped),
            counter,
        )?;
        family(
            &mut e,
            ("nx_drain_waiting", "Records waiting in the log drain's queue", Gauge),
            drain(|d| d.waiting),
            gauge_u,
        )?;
        family(
            &mut e,
            ("nx_drain_up", "Whether the last attempt to ship to the log drain reached it", Gauge),
            drain(|d| u64::from(d.up)),
            gauge_u,
        )?;
        e.encode_descriptor(
            "nx_drain_source_lagged",
            "Log lines the drains' reader lost because it fell behind its sources",
            None,
            Counter,
        )?
        .encode_counter::<NoLabelSet, _, u64>(&self.drains.1, None)?;
        Ok(())
    }
}

impl Scrape {
    /// The scrape and the platform's counters, in Prometheus's text format.
    pub fn encode(self) -> String {
        let mut registry = Registry::default();
        crate::counters::platform().register(&mut registry);
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
            tracing::error!(error = %e, "metrics: cannot encode");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nx_protocol::api::DeploymentState;

    #[test]
    fn the_replicas_of_a_deployment_are_counted_together() {
        let one = Resources { cpu_seconds: Some(1.5), memory_bytes: Some(100), pids: Some(2), ..Default::default() };
        let two =
            Resources { cpu_seconds: Some(0.5), memory_bytes: Some(50), oom_kills: Some(1), ..Default::default() };
        assert_eq!(
            sum_resources(one, two),
            Resources {
                cpu_seconds: Some(2.0),
                memory_bytes: Some(150),
                memory_peak_bytes: None,
                oom_kills: Some(1),
                pids: Some(2)
            }
        );
    }

    #[test]
    fn both_cgroup_layouts_are_read_and_missing_files_are_left_out() {
        let root = std::env::temp_dir().join(format!("nx-metrics-cgroup-{}", std::process::id()));
        let write = |dir: &str, name: &str, text: &str| {
            let dir = root.join(dir).join("nx-sandbox-7/abcdefgh");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), text).unwrap();
        };
        write("v2", "cpu.stat", "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n");
        write("v2", "memory.current", "1048576\n");
        write("v2", "memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n");
        write("v2", "pids.current", "4\n");
        let v2 = Driver::V2 { root: root.join("v2"), controllers: vec!["memory".into()] };
        let expected = Resources {
            cpu_seconds: Some(2.5),
            memory_bytes: Some(1_048_576),
            memory_peak_bytes: None,
            oom_kills: Some(1),
            pids: Some(4),
        };
        assert_eq!(cgroup_resources(&v2, "nx-sandbox-7", "abcdefgh"), expected);
        assert_eq!(cgroup_resources(&v2, "nx-sandbox-7", "gone"), Resources::default());

        write("memory", "memory.usage_in_bytes", "1048576\n");
        write("memory", "memory.max_usage_in_bytes", "2097152\n");
        write("memory", "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n");
        write("cpu", "cpuacct.usage", "2500000000\n");
        write("pids", "pids.current", "4\n");
        let v1 = Driver::V1 {
            memory: Some(root.join("memory")),
            cpu: Some(root.join("cpu")),
            pids: Some(root.join("pids")),
        };
        let got = cgroup_resources(&v1, "nx-sandbox-7", "abcdefgh");
        assert_eq!(got, Resources { memory_peak_bytes: Some(2_097_152), ..expected });
        let no_cpu = Driver::V1 { memory: Some(root.join("memory")), cpu: None, pids: None };
        let got = cgroup_resources(&no_cpu, "nx-sandbox-7", "abcdefgh");
        assert_eq!((got.cpu_seconds, got.pids, got.memory_bytes), (None, None, Some(1_048_576)));
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn replica(index: u32) -> ReplicaMetrics {
        ReplicaMetrics { index, traffic: Traffic::default(), resources: Resources::default(), restarts: 0 }
    }

    /// A deployment of one replica with nothing counted.
    fn deployment(app: &str, id: &str, role: Role) -> DeploymentMetrics {
        DeploymentMetrics {
            app: app.into(),
            deployment: id.into(),
            role,
            state: DeploymentState::Healthy,
            traffic: Traffic::default(),
            resources: Resources::default(),
            restarts: 0,
            replicas: vec![replica(0)],
            router_answered: Traffic::default(),
        }
    }

    #[test]
    fn the_text_has_each_family_once_with_bounded_labels_and_cumulative_buckets() {
        let mut web = deployment("web", "aaaaaaaa", Role::Production);
        let first = &mut web.replicas[0];
        first.traffic.requests = [0, 0, 7, 0, 1, 2];
        first.traffic.duration_buckets[0] = 6;
        first.traffic.duration_buckets[4] = 4;
        first.traffic.duration_micros = 150_000;
        first.traffic.bytes_out = 900;
        first.resources.memory_bytes = Some(4096);
        first.restarts = 2;
        let mut second = replica(1);
        second.traffic.requests = [0, 0, 3, 0, 0, 0];
        second.traffic.open = 1;
        second.resources.memory_bytes = Some(2048);
        web.replicas.push(second);
        // Two 503s the router answered while no replica was healthy.
        web.router_answered.requests[5] = 2;
        web.router_answered.duration_buckets[0] = 2;
        let preview = deployment("web", "bbbbbbbb", Role::Preview);
        let text = Scrape {
            deployments: vec![web, preview],
            router_up: true,
            access_lines_dropped: Some(12),
            volumes: vec![("web".into(), 8192)],
            databases: vec![DatabaseFigures {
                app: "web".into(),
                database: "app_web".into(),
                bytes: 100,
                connections: 3,
            }],
            drains: (
                vec![crate::drains::DrainStats {
                    id: "dr1".into(),
                    app: Some("web".into()),
                    queued: 10,
                    sent: 6,
                    dropped: 3,
                    waiting: 1,
                    up: false,
                }],
                4,
            ),
        }
        .encode();
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        let web = |replica: &str| format!(r#"app="web",deployment="aaaaaaaa",role="production",replica="{replica}""#);
        has(&format!(r#"nx_http_requests_total{{{},class="2xx"}} 7"#, web("0")));
        has(&format!(r#"nx_http_requests_total{{{},class="2xx"}} 3"#, web("1")));
        has(&format!(r#"nx_http_requests_total{{{},class="5xx"}} 2"#, web("0")));
        has(&format!(r#"nx_http_requests_total{{{},class="5xx"}} 2"#, web("none")));
        has(&format!(r#"nx_http_requests_total{{{},class="2xx"}} 0"#, web("none")));
        has(r#"nx_http_requests_total{app="web",deployment="bbbbbbbb",role="preview",replica="0",class="5xx"} 0"#);
        has(&format!(r#"nx_http_open_connections{{{}}} 1"#, web("1")));
        has(&format!(r#"nx_http_open_connections{{{}}} 0"#, web("none")));
        has(&format!(r#"nx_http_request_duration_seconds_bucket{{{},le="0.001"}} 6"#, web("0")));
        has(&format!(r#"nx_http_request_duration_seconds_bucket{{{},le="0.025"}} 10"#, web("0")));
        has(&format!(r#"nx_http_request_duration_seconds_bucket{{{},le="+Inf"}} 10"#, web("0")));
        has(&format!(r#"nx_http_request_duration_seconds_count{{{}}} 10"#, web("0")));
        has(&format!(r#"nx_http_request_duration_seconds_count{{{}}} 2"#, web("none")));
        has(&format!(r#"nx_http_request_duration_seconds_sum{{{}}} 0.15"#, web("0")));
        has(&format!(r#"nx_http_response_body_bytes_total{{{}}} 900"#, web("0")));
        has(&format!(r#"nx_deployment_memory_bytes{{{}}} 4096"#, web("0")));
        has(&format!(r#"nx_deployment_memory_bytes{{{}}} 2048"#, web("1")));
        has(&format!(r#"nx_deployment_restarts_total{{{}}} 2"#, web("0")));
        has(&format!(r#"nx_deployment_restarts_total{{{}}} 0"#, web("1")));
        has("nx_router_access_lines_dropped_total 12");
        has(r#"nx_drain_dropped_total{drain="dr1",app="web"} 3"#);
        has(r#"nx_drain_sent_total{drain="dr1",app="web"} 6"#);
        has(r#"nx_drain_waiting{drain="dr1",app="web"} 1"#);
        has(r#"nx_drain_up{drain="dr1",app="web"} 0"#);
        has("nx_drain_source_lagged_total 4");
        has(r#"nx_app_volume_used_bytes{app="web"} 8192"#);
        has(r#"nx_app_database_connections{app="web",database="app_web"} 3"#);
        has("nx_router_up 1");
        has("# TYPE nx_push_duration_seconds histogram");
        // A figure the host does not give is absent, not zero; the router's
        // own answers have no sandbox figures; a deployment the router
        // answered nothing for has no `none` row.
        assert!(!text.contains(r#"nx_deployment_memory_bytes{app="web",deployment="bbbbbbbb""#), "{text}");
        assert!(!text.contains(&format!(r#"nx_deployment_restarts_total{{{}}}"#, web("none"))), "{text}");
        assert!(!text.contains(r#"deployment="bbbbbbbb",role="preview",replica="none""#), "{text}");
        for family in ["nx_http_requests_total", "nx_deployment_memory_bytes"] {
            let declared = text
                .lines()
                .filter(|l| *l == format!("# TYPE {family} counter") || *l == format!("# TYPE {family} gauge"))
                .count();
            assert_eq!(declared, 1, "{family} is declared once");
        }
    }

    #[test]
    fn without_the_router_its_families_are_left_out_and_said_so() {
        let text =
            Scrape { deployments: vec![deployment("web", "aaaaaaaa", Role::Production)], ..Scrape::default() }.encode();
        assert!(text.lines().any(|l| l == "nx_router_up 0"), "{text}");
        assert!(!text.contains("nx_http_requests_total{"), "no traffic is made up: {text}");
        assert!(!text.contains("nx_router_access_lines_dropped"), "{text}");
        assert!(text.contains(
            r#"nx_deployment_restarts_total{app="web",deployment="aaaaaaaa",role="production",replica="0"} 0"#
        ));
    }
}
