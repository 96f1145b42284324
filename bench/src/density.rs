//! Density: N idle sandboxes started at once, the time until all are
//! healthy, and the host memory each costs beyond the app itself (the peer:
//! N copies of the app started plainly). Memory is the drop of MemAvailable,
//! which counts what the kernel spends on namespaces and page tables too.

use std::time::{Duration, Instant};

use crate::sandbox::{first_answer, healthy, Host};
use crate::stats::verdict;

fn mem_available_kib() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no MemAvailable in /proc/meminfo"))
}

/// MemAvailable once it has stopped moving: freeing a torn-down sandbox's
/// memory (cgroups, page tables, namespaces) goes on after its processes are
/// gone, and a reading taken during it would credit the next measurement.
fn settled_mem_available_kib() -> anyhow::Result<u64> {
    let mut last = mem_available_kib()?;
    let mut quiet = 0;
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(500));
        let now = mem_available_kib()?;
        quiet = if now.abs_diff(last) < 512 { quiet + 1 } else { 0 };
        if quiet == 2 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// `n` free ports.
fn ports(n: usize) -> anyhow::Result<Vec<u16>> {
    // Held together so none is handed out twice, then released for the apps.
    let held: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

pub fn run(counts: &[usize]) -> anyhow::Result<()> {
    let host = Host::new()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!("density: idle sandboxes of a static C server");
    for &n in counts {
        // The peer: the app alone, n times.
        let ports_plain = ports(n)?;
        let before = settled_mem_available_kib()?;
        // Spawned through the process manager, whose reaper collects every
        // child of this process.
        let plain = runtime.block_on(async {
            let mut all = Vec::new();
            for p in &ports_plain {
                all.push(
                    host.pm.spawn(nx_runtime::process::Command::new(&host.binary).env("PORT", p.to_string())).await?,
                );
            }
            anyhow::Ok(all)
        })?;
        for p in &ports_plain {
            first_answer(*p, Duration::from_secs(30))?;
        }
        let after = settled_mem_available_kib()?;
        let app_kib = before.saturating_sub(after) as f64 / n as f64;
        for mut c in plain {
            c.signal(nix::sys::signal::Signal::SIGKILL)?;
            runtime.block_on(c.wait());
        }
        std::thread::sleep(Duration::from_millis(500));

        let ports_boxed = ports(n)?;
        let before = settled_mem_available_kib()?;
        let started = Instant::now();
        let sandboxes = runtime.block_on(async {
            let mut all = Vec::new();
            for (i, p) in ports_boxed.iter().enumerate() {
                all.push(host.start(&format!("density-{n}-{i}"), *p)?);
            }
            for s in &all {
                healthy(s).await?;
            }
            anyhow::Ok(all)
        })?;
        let took = started.elapsed();
        let boxed_kib = before.saturating_sub(settled_mem_available_kib()?) as f64 / n as f64;
        runtime.block_on(async {
            stop_all(sandboxes).await;
        });
        let overhead_mib = (boxed_kib - app_kib) / 1024.0;
        println!(
            "  {n:>5} sandboxes: all healthy in {:.2} s; memory {:.2} MiB each, the app alone {:.2} MiB (peer), overhead {:.2} MiB",
            took.as_secs_f64(),
            boxed_kib / 1024.0,
            app_kib / 1024.0,
            overhead_mib
        );
        if n == 1000 {
            verdict("1,000 idle sandboxes healthy within 10 s", took <= Duration::from_secs(10));
            verdict("overhead <= 1 MB per sandbox beyond the app", overhead_mib <= 1.0);
        }
    }
    Ok(())
}

async fn stop_all(sandboxes: Vec<nx_runtime::Sandbox>) {
    let mut stops = tokio::task::JoinSet::new();
    for s in sandboxes {
        stops.spawn(s.stop());
    }
    while stops.join_next().await.is_some() {}
}
