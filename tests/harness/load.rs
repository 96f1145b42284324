//! A bounded load generator for the zero-failure tests: keep-alive clients
//! (or clients opening a new connection for every request) requesting one
//! host through the router until told to stop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests production from several keep-alive clients until `stop`; counts
/// answers per body and every failure (a status other than 200 or a broken
/// connection).
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Requests answered 200 so far.
    pub ok: Arc<AtomicU64>,
    /// Each failure, with when its request was sent.
    failures: Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    bodies: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Starts four keep-alive clients requesting `/` of `host` through the router on `port`.
    pub fn start(port: u16, host: String) -> Load {
        Self::start_with(port, host, 4, true)
    }

    /// Starts `clients` clients requesting `/` of `host` through the router
    /// on `port`, each keeping its connection alive or (`keep_alive` false)
    /// opening a new one for every request.
    pub fn start_with(port: u16, host: String, clients: usize, keep_alive: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let bodies = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failures, bodies, host) =
                    (stop.clone(), ok.clone(), failures.clone(), bodies.clone(), host.clone());
                std::thread::spawn(move || {
                    let mut builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10));
                    if !keep_alive {
                        builder = builder.pool_max_idle_per_host(0);
                    }
                    let client = builder.build().unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        match client.get(format!("http://127.0.0.1:{port}/")).header("Host", &host).send() {
                            Ok(resp) if resp.status() == 200 => {
                                bodies.lock().unwrap().insert(resp.text().unwrap_or_default());
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(resp) => failures.lock().unwrap().push((sent, format!("status {}", resp.status()))),
                            Err(e) => failures.lock().unwrap().push((sent, format!("{e:?}"))),
                        }
                    }
                })
            })
            .collect();
        Load { stop, ok, failures, bodies, threads }
    }

    /// Stops the clients; returns the successes, the failures and the
    /// distinct bodies seen.
    pub fn finish(self) -> (u64, Vec<String>, std::collections::BTreeSet<String>) {
        let (ok, failures, bodies) = self.finish_timed();
        (ok, failures.into_iter().map(|(_, f)| f).collect(), bodies)
    }

    /// [`Load::finish`], each failure with when its request was sent.
    pub fn finish_timed(self) -> (u64, Vec<(Instant, String)>, std::collections::BTreeSet<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let bodies = self.bodies.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures, bodies)
    }

    /// [`Load::finish`], failing the test if any request failed; returns the
    /// successes and the distinct bodies seen.
    pub fn finish_without_failures(self) -> (u64, std::collections::BTreeSet<String>) {
        let (ok, failures, bodies) = self.finish();
        assert!(
            failures.is_empty(),
            "{} of {} requests failed: {:?}",
            failures.len(),
            ok + failures.len() as u64,
            &failures[..failures.len().min(5)]
        );
        (ok, bodies)
    }
}
