//! A real Prometheus (Debian's `prometheus`, which scripts/test.sh installs)
//! scraping one target every second, and its HTTP API's instant queries.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::receiver::free_port;
use crate::require_program;

/// A Prometheus server with its own configuration and storage in a
/// temporary directory, on a free loopback port.
#[derive(Debug)]
pub struct Prometheus {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// One sample of an instant query: its labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: serde_json::Map<String, serde_json::Value>,
    pub value: f64,
}

impl Prometheus {
    /// Starts Prometheus scraping `http://<target>/metrics` every second and
    /// waits until it is ready.
    pub fn scraping(target: &str) -> Prometheus {
        let binary = require_program("prometheus", "prometheus");
        let dir = tempfile::Builder::new().prefix("nx-e2e-prometheus-").tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: nx\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("prometheus log");
        let child = crate::exec::spawn(
            Command::new(binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("start prometheus");
        let p = Prometheus { port, dir, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        while !reqwest::blocking::get(&ready).is_ok_and(|r| r.status().is_success()) {
            assert!(Instant::now() < deadline, "prometheus did not become ready:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// What Prometheus printed, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant query (`/api/v1/query`), at `at` (Unix seconds) when
    /// given, and returns its vector.
    pub fn query_at(&self, promql: &str, at: Option<f64>) -> Vec<Sample> {
        let mut params = vec![("query", promql.to_owned())];
        if let Some(t) = at {
            params.push(("time", format!("{t:.3}")));
        }
        let answer: serde_json::Value = reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query(&params)
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("query {promql}: {e}"));
        assert_eq!(answer["status"], "success", "query {promql}: {answer}");
        assert_eq!(answer["data"]["resultType"], "vector", "query {promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .expect("result")
            .iter()
            .map(|r| Sample {
                labels: r["metric"].as_object().cloned().unwrap_or_default(),
                value: r["value"][1].as_str().and_then(|v| v.parse().ok()).expect("a sample's value"),
            })
            .collect()
    }

    /// An instant query now.
    pub fn query(&self, promql: &str) -> Vec<Sample> {
        self.query_at(promql, None)
    }

    /// Waits until `promql` answers one sample for which `good` holds, and
    /// returns its value; fails naming the last answer.
    pub fn eventually(&self, secs: u64, promql: &str, good: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.query(promql);
            if let [one] = got.as_slice() {
                if good(one.value) {
                    return one.value;
                }
            }
            assert!(Instant::now() < deadline, "after {secs}s, {promql} answers {got:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
