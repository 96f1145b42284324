//! Promotions and rollbacks under load: every request to production is
//! timed; failures must be zero, and the latency around each swap is set
//! against the latency between swaps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nx_e2e::fixtures::{self, Go};
use nx_e2e::Receiver;

use crate::stats::verdict;

/// One request: when it started (since the load began), how long it took,
/// and whether it got a 200.
type Sample = (Duration, Duration, bool);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(swaps: usize) -> anyhow::Result<()> {
    let r = Receiver::start();
    r.create_app("bench");
    let goweb = fixtures::go(Go::Static);
    let a = r.push("bench", &goweb, &["--env", "GREETING=a", "--promote"]);
    let b = r.push("bench", &goweb, &["--env", "GREETING=b"]);
    let ids = [a["id"].as_str().unwrap_or_default().to_owned(), b["id"].as_str().unwrap_or_default().to_owned()];
    let (stop, samples) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::<Sample>::new())));
    let origin = Instant::now();
    let port = r.router_port;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().ok();
                let Some(client) = client else { return };
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = client
                        .get(format!("http://127.0.0.1:{port}/"))
                        .header("Host", format!("bench.localhost:{port}"))
                        .send()
                        .map(|r| r.status() == 200 && r.bytes().is_ok())
                        .unwrap_or(false);
                    samples.lock().map(|mut s| s.push((t - origin, t.elapsed(), ok))).ok();
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let mut swap_times = Vec::new();
    for i in 0..swaps {
        let t = origin.elapsed();
        let out = r.nx(&["promote", &ids[(i + 1) % 2], "--app", "bench"]);
        anyhow::ensure!(out.code == 0, "promotion failed: {}", out.stderr);
        swap_times.push((t, origin.elapsed()));
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let failed = samples.iter().filter(|s| !s.2).count();
    // A request is "around a swap" if it overlapped a promote call or the
    // 50 ms after it.
    let near =
        |s: &Sample| swap_times.iter().any(|(from, to)| s.0 <= *to + Duration::from_millis(50) && s.0 + s.1 >= *from);
    let ms = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (percentile(v, 0.5), percentile(v, 0.99), v.last().copied().unwrap_or(f64::NAN))
    };
    let (mut around, mut between): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for s in &samples {
        let v = s.1.as_secs_f64() * 1000.0;
        if near(s) {
            around.push(v);
        } else {
            between.push(v);
        }
    }
    let (a50, a99, amax) = ms(&mut around);
    let (b50, b99, bmax) = ms(&mut between);
    println!("promotion and rollback under load ({swaps} swaps, 4 keep-alive clients)");
    println!("  requests: {}, failed: {failed}", samples.len());
    println!("  between swaps (peer): p50 {b50:.2} ms, p99 {b99:.2} ms, max {bmax:.2} ms ({} requests)", between.len());
    println!("  around swaps:         p50 {a50:.2} ms, p99 {a99:.2} ms, max {amax:.2} ms ({} requests)", around.len());
    println!("  blip: p99 around/between {:.2}x", a99 / b99);
    verdict("zero failed requests through promotions and rollbacks", failed == 0);
    Ok(())
}
