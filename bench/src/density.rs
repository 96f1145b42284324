//! Density: N idle sandboxes started at once, the time until all are
//! healthy, and the host memory each costs beyond the app itself (the peer:
//! N copies of the app started plainly). Memory is what the host holds and
//! cannot reclaim, as `free` counts "used" but with tmpfs files counted:
//! MemTotal - MemFree - Buffers - (Cached - Shmem) - SReclaimable. That
//! counts what the kernel spends on namespaces, cgroups and page tables
//! too, and leaves out the page cache of files, which every sandbox shares
//! (the binary) or the kernel drops under pressure. MemAvailable's drop is
//! printed beside it: it moves with the page cache, by a tenth of a MiB per
//! sandbox between runs on this VM. The other fields of /proc/meminfo say
//! where the memory went.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::sandbox::{first_answer, healthy, Host};
use crate::stats::verdict;

/// The fields of /proc/meminfo given in kB, by name.
type MemInfo = BTreeMap<String, i64>;

/// The kernel's own fields, the ones a sandbox's overhead beyond its app's
/// pages is made of, printed with the total.
const KERNEL_FIELDS: [&str; 7] = ["AnonPages", "Shmem", "Cached", "SUnreclaim", "KernelStack", "PageTables", "Percpu"];

fn meminfo() -> anyhow::Result<MemInfo> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let fields: MemInfo = text
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(':')?;
            Some((name.to_owned(), value.trim().strip_suffix("kB")?.trim().parse().ok()?))
        })
        .collect();
    for name in ["MemTotal", "MemFree", "Buffers", "Cached", "Shmem", "SReclaimable", "MemAvailable"] {
        anyhow::ensure!(fields.contains_key(name), "no {name} in /proc/meminfo");
    }
    Ok(fields)
}

/// Memory held and not reclaimable, in KiB (see the top of this file).
fn held(m: &MemInfo) -> i64 {
    m["MemTotal"] - m["MemFree"] - m["Buffers"] - (m["Cached"] - m["Shmem"]) - m["SReclaimable"]
}

/// /proc/meminfo once the memory held has stopped moving: freeing a torn-down
/// sandbox's memory (cgroups, page tables, namespaces) goes on after its
/// processes are gone, and a reading taken during it would credit the next
/// measurement.
fn settled_meminfo() -> anyhow::Result<MemInfo> {
    let mut last = meminfo()?;
    let mut quiet = 0;
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(500));
        let now = meminfo()?;
        quiet = if held(&now).abs_diff(held(&last)) < 512 { quiet + 1 } else { 0 };
        if quiet == 2 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// What each of `n` processes or sandboxes took, in KiB per field, from the
/// readings before and after they ran: MemAvailable's drop, the others'
/// rise, and the memory held ([`held`]) as `Held`.
fn per_each(before: &MemInfo, after: &MemInfo, n: usize) -> BTreeMap<String, f64> {
    let mut each: BTreeMap<String, f64> = after
        .iter()
        .filter_map(|(name, now)| {
            let was = before.get(name)?;
            let taken = if name == "MemAvailable" { was - now } else { now - was };
            Some((name.clone(), taken as f64 / n as f64))
        })
        .collect();
    each.insert("Held".into(), (held(after) - held(before)) as f64 / n as f64);
    each
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
        let before = settled_meminfo()?;
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
        let app = per_each(&before, &settled_meminfo()?, n);
        for mut c in plain {
            c.signal(nix::sys::signal::Signal::SIGKILL)?;
            runtime.block_on(c.wait());
        }
        std::thread::sleep(Duration::from_millis(500));

        let ports_boxed = ports(n)?;
        let before = settled_meminfo()?;
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
        let boxed = per_each(&before, &settled_meminfo()?, n);
        runtime.block_on(async {
            stop_all(sandboxes).await;
        });
        let beyond = |field: &str| boxed.get(field).copied().unwrap_or(0.0) - app.get(field).copied().unwrap_or(0.0);
        let overhead_mib = beyond("Held") / 1024.0;
        println!(
            "  {n:>5} sandboxes: all healthy in {:.2} s; memory {:.2} MiB each, the app alone {:.2} MiB (peer), overhead {:.2} MiB (by MemAvailable: {:.2})",
            took.as_secs_f64(),
            boxed["Held"] / 1024.0,
            app["Held"] / 1024.0,
            overhead_mib,
            beyond("MemAvailable") / 1024.0
        );
        let parts: Vec<String> = KERNEL_FIELDS.iter().map(|f| format!("{f} {:.0}", beyond(f))).collect();
        println!("         the overhead by /proc/meminfo field, KiB each: {}", parts.join(", "));
        if n == 1000 {
            verdict("1,000 idle sandboxes healthy within 10 s (the design)", took <= Duration::from_secs(10));
            verdict("1,000 idle sandboxes healthy within 5 s (issue #22)", took <= Duration::from_secs(5));
            // A megabyte, 10^6 bytes: a little less than the MiB the figures are in.
            verdict("overhead under 1 MB per sandbox beyond the app", beyond("Held") * 1024.0 < 1e6);
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
