//! Metrics: a real Prometheus scrapes the receiver's `/metrics` and sees each
//! app's traffic and resources as the test made them; `nx top` and
//! `nx metrics` show the same figures, each key only the apps it may see.

use nx_e2e::fixtures::{self, Go};
use nx_e2e::prometheus::Prometheus;
use nx_e2e::receiver::{free_port, Options};
use nx_e2e::{eventually, Receiver};

fn id(d: &serde_json::Value) -> String {
    d["id"].as_str().unwrap().to_owned()
}

fn url(d: &serde_json::Value, path: &str) -> String {
    format!("{}{path}", d["preview_url"].as_str().unwrap().trim_end_matches('/'))
}

/// Sends `n` GETs of `path` to deployment `d` and checks each answered `status`.
fn requests(r: &Receiver, d: &serde_json::Value, path: &str, n: usize, status: u16) {
    for _ in 0..n {
        assert_eq!(r.get(&url(d, path)).status, status, "GET {path}");
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The receiver's whole `/metrics` text.
fn scrape(addr: &str) -> String {
    let resp = reqwest::blocking::get(format!("http://{addr}/metrics")).unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    resp.text().unwrap()
}

/// Prometheus, scraping the receiver every second, counts exactly the
/// requests the test sent to each deployment (by status class, and nothing
/// for an app nobody called), a later batch exactly as its increase, memory
/// within the deployment's cgroup limit, the pushes and starts; a deployment
/// that stops leaves the families.
#[test]
fn prometheus_sees_each_apps_traffic_and_resources_as_they_were_made() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let r =
        Receiver::start_with(Options { args: vec!["--metrics-listen".into(), metrics.clone()], ..Options::default() });
    r.create_app("web");
    r.create_app("site");
    let binary = fixtures::go(Go::Static);
    let prod = r.push("web", &binary, &[]);
    r.nx_ok(&["promote", &id(&prod), "--app", "web"]);
    let preview = r.push("web", &binary, &[]);
    let site = r.push("site", &binary, &[]);
    let (prod_id, preview_id) = (id(&prod), id(&preview));
    let prometheus = Prometheus::scraping(&metrics);

    requests(&r, &prod, "/", 40, 200);
    requests(&r, &prod, "/fail", 7, 500);
    requests(&r, &preview, "/", 3, 200);

    let count = |labels: &str| format!("sum(nx_http_requests_total{{{labels}}})");
    let prod_labels = format!(r#"app="web",deployment="{prod_id}",role="production""#);
    let exactly = |n: f64| move |v: f64| v == n;
    prometheus.eventually(60, &count(&format!(r#"{prod_labels},class="2xx""#)), exactly(40.0));
    prometheus.eventually(10, &count(&format!(r#"{prod_labels},class="5xx""#)), exactly(7.0));
    prometheus.eventually(
        10,
        &count(&format!(r#"deployment="{preview_id}",role="preview",class="2xx""#)),
        exactly(3.0),
    );
    prometheus.eventually(10, &count(r#"app="site""#), exactly(0.0));
    prometheus.eventually(10, &format!("sum(nx_http_request_duration_seconds_count{{{prod_labels}}})"), exactly(47.0));

    // A later batch is exactly its increase; only the app that had traffic has a rate.
    let before = unix_now();
    requests(&r, &prod, "/", 30, 200);
    let all_prod = count(&format!(r#"deployment="{prod_id}""#));
    prometheus.eventually(30, &all_prod, exactly(77.0));
    let increase = format!("{all_prod} - sum(nx_http_requests_total{{deployment=\"{prod_id}\"}} @ {before:.3})");
    prometheus.eventually(10, &increase, exactly(30.0));
    prometheus
        .eventually(10, &format!(r#"sum(rate(nx_http_requests_total{{deployment="{prod_id}"}}[1m]))"#), |v| v > 0.0);
    prometheus.eventually(10, r#"sum(rate(nx_http_requests_total{app="site"}[1m]))"#, exactly(0.0));
    let body =
        prometheus.eventually(10, &format!("sum(nx_http_response_body_bytes_total{{{prod_labels}}})"), |v| v > 0.0);
    assert_eq!(
        body,
        (70 * "goweb\n".len() + 7 * "failing on purpose\n".len()) as f64,
        "response bodies, byte for byte"
    );

    // Memory and CPU come from the deployment's own cgroup, within its limit.
    let cgroup = |hierarchy: &str| {
        std::path::Path::new("/sys/fs/cgroup").join(hierarchy).join(format!("nx-sandbox-{}", r.uid_base)).join(&prod_id)
    };
    let (limit_file, cpu_file) = if cgroup("").join("memory.max").exists() {
        (cgroup("").join("memory.max"), Some(cgroup("").join("cpu.stat")))
    } else {
        let cpuacct = cgroup("cpu").join("cpuacct.usage");
        (cgroup("memory").join("memory.limit_in_bytes"), cpuacct.exists().then_some(cpuacct))
    };
    let limit: f64 = std::fs::read_to_string(&limit_file).unwrap().trim().parse().unwrap();
    let memory =
        prometheus.eventually(10, &format!(r#"nx_deployment_memory_bytes{{deployment="{prod_id}"}}"#), |v| v > 0.0);
    assert!(
        memory >= 1_048_576.0 && memory <= limit,
        "a Go server uses more than 1 MiB and at most its limit {limit}: {memory}"
    );
    let cpu = format!(r#"nx_deployment_cpu_seconds_total{{deployment="{prod_id}"}}"#);
    match cpu_file {
        Some(_) => _ = prometheus.eventually(10, &cpu, |v| v > 0.0),
        // cgroup v1 without cpuacct beside cpu: no CPU time, and none made up.
        None => assert!(prometheus.query(&cpu).is_empty(), "{:?}", prometheus.query(&cpu)),
    }
    prometheus.eventually(10, &format!(r#"nx_deployment_restarts_total{{{prod_labels}}}"#), exactly(0.0));
    prometheus.eventually(10, &format!(r#"nx_deployment_pids{{deployment="{prod_id}"}}"#), |v| v >= 1.0);
    prometheus.eventually(10, r#"nx_app_database_size_bytes{app="web",database="app_web"}"#, |v| v > 0.0);
    let volume = r#"nx_app_volume_used_bytes{app="web"}"#;
    if nx_receiver::volumes::is_mount_point(&r.data_dir().join("apps/web/data")) {
        // A fresh ext4 image uses some blocks for itself.
        prometheus.eventually(10, volume, |v| v > 0.0);
    } else {
        assert!(prometheus.query(volume).is_empty(), "a data directory on the host's disk is not the app's use");
    }
    prometheus.eventually(10, "nx_router_up", exactly(1.0));
    prometheus.eventually(10, "nx_push_duration_seconds_count", exactly(3.0));
    prometheus.eventually(10, "nx_start_to_healthy_seconds_count", exactly(3.0));
    let text = scrape(&metrics);
    assert!(!text.contains("path="), "no label is a request path: {text}");

    // A deployment that stops leaves the families, here and in Prometheus.
    r.nx_ok(&["stop", &preview_id, "--app", "web"]);
    eventually(10, "the stopped preview to leave /metrics", || (!scrape(&metrics).contains(&preview_id)).then_some(()));
    let gone = format!(r#"nx_http_requests_total{{deployment="{preview_id}"}}"#);
    eventually(30, "Prometheus to forget the stopped preview", || prometheus.query(&gone).is_empty().then_some(()));
    assert!(scrape(&metrics).contains(&id(&site)), "the others stay");
}

/// `nx metrics APP` and `nx top` read the same counters: exact totals and
/// 5xx per deployment, memory and restarts; a deploy key sees its own app
/// and is refused another's with the access table's reason, a read-only
/// key sees every app.
#[test]
fn nx_top_and_metrics_show_each_deployment_to_the_keys_that_may_see_it() {
    let r = Receiver::start();
    r.create_app("web");
    let site_key = r.create_app("site");
    let binary = fixtures::go(Go::Static);
    let web = r.push("web", &binary, &[]);
    let site = r.push("site", &binary, &[]);
    requests(&r, &web, "/", 20, 200);
    requests(&r, &web, "/fail", 5, 500);
    // The router counts a request once its answer is written: the last one
    // may be counted just after the client read it.
    eventually(10, "the 25 requests counted", || {
        let figures = r.nx_ok(&["--json", "metrics", "web", "--interval", "200ms"]).json();
        (figures[0]["requests"].as_u64() == Some(25)).then_some(())
    });

    let figures = r.nx_ok(&["--json", "metrics", "web", "--interval", "200ms"]).json();
    let rows = figures.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{figures}");
    let row = &rows[0];
    assert_eq!(row["deployment"], id(&web).as_str());
    assert_eq!(row["role"], "preview");
    assert_eq!(row["state"], "healthy");
    assert_eq!((row["requests"].as_u64(), row["errors"].as_u64()), (Some(25), Some(5)), "{row}");
    assert_eq!(row["restarts"], 0);
    assert!(row["memory_bytes"].as_u64().unwrap() > 1_048_576, "{row}");
    assert_eq!(row["requests_per_second"], 0.0, "nothing was sent during the interval: {row}");
    assert!(row["p99_ms"].is_null(), "no latency without requests: {row}");

    // A deploy key sees its own app alone, and is refused another's.
    let own = r.nx_with_key(&site_key, &["--json", "top", "--interval", "200ms"]).success().json();
    let apps: Vec<&str> = own.as_array().unwrap().iter().map(|d| d["app"].as_str().unwrap()).collect();
    assert_eq!(apps, ["site"], "{own}");
    assert_eq!(own[0]["deployment"], id(&site).as_str());
    let refused = r.nx_with_key(&site_key, &["metrics", "web", "--once", "--interval", "200ms"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("belongs to app 'site' and cannot act on app 'web'; use that app's deploy key"),
        "{}",
        refused.stderr
    );

    // A read-only key sees every app; the table has a row per deployment.
    let read_only = r.nx_ok(&["--json", "keys", "create", "--read-only"]).json();
    let read_only = read_only["secret"].as_str().unwrap_or_else(|| panic!("no secret in {read_only}"));
    let all = r.nx_with_key(read_only, &["top", "--once", "--interval", "200ms"]).success().stdout;
    let lines: Vec<&str> = all.lines().collect();
    assert!(
        lines[0].split_whitespace().eq([
            "app",
            "deployment",
            "role",
            "req/s",
            "p50",
            "p99",
            "5xx",
            "cpu",
            "memory",
            "restarts"
        ]),
        "{all}"
    );
    assert!(lines.iter().any(|l| l.starts_with("site ")) && lines.iter().any(|l| l.starts_with("web ")), "{all}");
    let bad = r.nx(&["top", "--interval", "10ms"]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("10ms is too short; give at least 100ms"), "{}", bad.stderr);
}

/// A deployment of three replicas: Prometheus sees each replica's series
/// apart (`replica` label), each with exactly the requests the test saw that
/// replica answer (the app tells its port, `nx ls` which replica listens
/// there), adding up to all that were sent; memory and restarts per replica
/// from each replica's own cgroup; and the router's count of access lines it
/// dropped (none here).
#[test]
fn prometheus_sees_each_replica_apart_with_the_requests_it_answered() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let r =
        Receiver::start_with(Options { args: vec!["--metrics-listen".into(), metrics.clone()], ..Options::default() });
    r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--replicas", "3"]);
    let d = r.push("web", &fixtures::go(Go::Static), &["--promote"]);
    let deployment = id(&d);
    let ports: std::collections::BTreeMap<String, String> = eventually(30, "three healthy replicas", || {
        let listing = r.nx(&["--json", "ls", "web"]).success().json();
        let production = listing[0]["deployments"].as_array()?.iter().find(|d| d["production"] == true)?.clone();
        let replicas = production["replicas"].as_array()?.clone();
        (replicas.len() == 3 && replicas.iter().all(|x| x["state"] == "healthy"))
            .then(|| replicas.iter().map(|x| (x["port"].to_string(), x["index"].to_string())).collect())
    });
    let prometheus = Prometheus::scraping(&metrics);

    // Which replica answered each request, by the port it tells.
    let sent = 90;
    let mut answered: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for _ in 0..sent {
        let answer = r.get(&url(&d, "/port"));
        assert_eq!(answer.status, 200, "{}", answer.body);
        let replica = ports.get(answer.body.trim()).unwrap_or_else(|| panic!("port {} is no replica's", answer.body));
        *answered.entry(replica.clone()).or_default() += 1;
    }
    assert_eq!(answered.len(), 3, "the router spread the requests over the three: {answered:?}");

    let labels = format!(r#"app="web",deployment="{deployment}",role="production""#);
    let exactly = |n: f64| move |v: f64| v == n;
    for (replica, n) in &answered {
        prometheus.eventually(
            60,
            &format!(r#"sum(nx_http_requests_total{{{labels},replica="{replica}",class="2xx"}})"#),
            exactly(*n as f64),
        );
        prometheus.eventually(
            10,
            &format!(r#"nx_http_request_duration_seconds_count{{{labels},replica="{replica}"}}"#),
            exactly(*n as f64),
        );
        prometheus.eventually(
            10,
            &format!(r#"nx_http_open_connections{{{labels},replica="{replica}"}}"#),
            exactly(0.0),
        );
        prometheus.eventually(
            10,
            &format!(r#"nx_deployment_restarts_total{{{labels},replica="{replica}"}}"#),
            exactly(0.0),
        );
        let memory = format!(r#"nx_deployment_memory_bytes{{{labels},replica="{replica}"}}"#);
        prometheus.eventually(10, &memory, |v| v >= 1_048_576.0);
    }
    prometheus.eventually(10, &format!("sum(nx_http_requests_total{{{labels}}})"), exactly(sent as f64));
    let series = prometheus.query(&format!("nx_deployment_memory_bytes{{{labels}}}"));
    let mut replicas: Vec<&str> = series.iter().map(|s| s.labels["replica"].as_str().unwrap()).collect();
    replicas.sort_unstable();
    assert_eq!(replicas, ["0", "1", "2"], "one memory series per replica: {series:?}");
    assert!(
        prometheus.query(&format!(r#"nx_http_requests_total{{{labels},replica="none"}}"#)).is_empty(),
        "every request reached a replica: none answered by the router itself"
    );
    prometheus.eventually(10, "nx_router_access_lines_dropped_total", exactly(0.0));
}
