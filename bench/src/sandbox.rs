//! Sandboxes started the way the receiver starts them (bwrap, seccomp,
//! cgroup, own uid), and the start benchmark: start to first answer, next to
//! the same binary started plainly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nx_runtime::cgroup::{Driver, Limits};
use nx_runtime::pool::{Pool, PoolConfig};
use nx_runtime::spec::{group_file, hosts_file, passwd_file, HostLayout, SandboxSpec};
use nx_runtime::supervisor::{Liveness, RestartPolicy, SandboxConfig, Status};
use nx_runtime::{HealthCheck, Log, LogLimits, ProcessManager, Sandbox};

use crate::stats::{verdict, Figure};

/// The first uid the benchmarks run sandboxes as: far from any receiver's.
pub const UID: u32 = 3_900_000;

/// What every benchmark sandbox shares.
pub struct Host {
    pub pm: ProcessManager,
    pub layout: Arc<HostLayout>,
    pub seccomp: Arc<[u8]>,
    /// Applied as the receiver applies it.
    pub landlock: nx_runtime::landlock::Support,
    pub cgroups: Driver,
    pub dir: tempfile::TempDir,
    /// The binary: the musl-static C server of the test fixtures.
    pub binary: PathBuf,
}

impl Host {
    pub fn new() -> anyhow::Result<Host> {
        let arch = nx_runtime::seccomp::Arch::host()
            .ok_or_else(|| anyhow::anyhow!("no seccomp filter for this architecture"))?;
        let dir = tempfile::Builder::new().prefix("nx-bench-").tempdir_in("/tmp")?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        // As the receiver makes them, in a directory of its own.
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin)?;
        let init = nx_runtime::spec::install_init(&bin)?;
        // Bound at /app, the binary's directory holds it alone, as a
        // deployment's does.
        let app = dir.path().join("app");
        std::fs::create_dir(&app)?;
        let binary = app.join("hello");
        std::fs::copy(nx_e2e::fixtures::c_musl_static(), &binary)?;
        let dev = nx_runtime::root::install_dev(&bin)
            .map_err(|e| eprintln!("sandboxes get bwrap's own /dev, as the receiver's would here: {e}"))
            .ok();
        Ok(Host {
            pm: ProcessManager::global()?,
            layout: Arc::new(HostLayout::detect(Path::new("/"), init, dev)),
            seccomp: nx_runtime::seccomp::to_bytes(&nx_runtime::seccomp::filter(arch)).into(),
            landlock: nx_runtime::landlock::Support::detect(),
            cgroups: Driver::detect(Path::new("/sys/fs/cgroup")),
            dir,
            binary,
        })
    }

    /// Parked sandboxes as the receiver keeps them (`--sandbox-pool`), for
    /// [`Host::start_with`]; filled by the caller.
    pub fn pool(&self, size: usize) -> Pool {
        let cfg = PoolConfig {
            size,
            dir: self.dir.path().join("pool"),
            shim: nx_e2e::bin("nx-shim"),
            cgroups: self.cgroups.clone(),
            group: "nx-bench".into(),
            proc_root: "/proc".into(),
        };
        Pool::new(cfg, self.pm.clone())
    }

    /// The configuration of sandbox `name` listening on `port`.
    pub fn config(&self, name: &str, port: u16) -> anyhow::Result<SandboxConfig> {
        let root = self.dir.path().join(name);
        let data = root.join("data");
        std::fs::create_dir_all(&data)?;
        std::os::unix::fs::chown(&data, Some(UID), Some(UID))?;
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(500),
            pids: Some(64),
            nofile: Some(256),
            tmp_bytes: 16 << 20,
            data_bytes: None,
        };
        let enforced = nx_runtime::cgroup::enforce(&self.cgroups, "nx-bench", name, &limits);
        let spec = SandboxSpec {
            hostname: "bench".into(),
            binary: self.binary.clone(),
            binary_name: "hello".into(),
            args: Vec::new(),
            data_dir: data,
            // Every benchmark sandbox is a deployment of one app, "bench",
            // and shares its /etc as the receiver's deployments of an app do.
            etc: Some(self.dir.path().join("etc")),
            dynamic: false,
            tmp_size_bytes: limits.tmp_bytes,
            seccomp_fd: None,
            env_fd: None,
            go_fd: None,
            share_net: true,
            ro_binds: Vec::new(),
        };
        let files = [("passwd", passwd_file("bench")), ("group", group_file("bench")), ("hosts", hosts_file("bench"))];
        nx_runtime::root::write_etc(&spec, &self.layout, &files)?;
        Ok(SandboxConfig {
            spec,
            host: self.layout.clone(),
            bwrap: "/usr/bin/bwrap".into(),
            host_ids: (UID, UID),
            env: vec![("PORT".into(), port.to_string()), ("HOST".into(), "127.0.0.1".into())],
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            health: HealthCheck::Http { path: "/".into(), require_success: true },
            start_timeout: Duration::from_secs(60),
            stop_grace: Duration::from_secs(2),
            restart: RestartPolicy::default(),
            liveness: Liveness::default(),
            seccomp: Some(self.seccomp.clone()),
            cgroup: Some(enforced.cgroup),
            rlimits: enforced.rlimits,
            proc_root: "/proc".into(),
            landlock: self.landlock,
            shim: nx_e2e::bin("nx-shim"),
            state_dir: root.join("shim"),
            pool: None,
        })
    }

    /// Starts sandbox `name` on `port`.
    pub fn start(&self, name: &str, port: u16) -> anyhow::Result<Sandbox> {
        self.start_with(name, port, None)
    }

    /// Starts sandbox `name` on `port`, from a slot of `pool` if one is parked.
    pub fn start_with(&self, name: &str, port: u16, pool: Option<&Pool>) -> anyhow::Result<Sandbox> {
        let log = Log::open(&self.dir.path().join(format!("{name}.log")), LogLimits::default())?;
        let mut config = self.config(name, port)?;
        config.pool = pool.cloned();
        Ok(Sandbox::start(config, self.pm.clone(), log))
    }
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `port` as tightly as it can until an HTTP request gets 200.
pub fn first_answer(port: u16, deadline: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
            let mut head = [0u8; 12];
            if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200") {
                return Ok(started.elapsed());
            }
        }
        anyhow::ensure!(started.elapsed() < deadline, "no answer on port {port} within {deadline:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Waits until the sandbox is healthy or has failed.
pub async fn healthy(sandbox: &Sandbox) -> anyhow::Result<()> {
    let mut status = sandbox.watch();
    let s = status.wait_for(|s| matches!(s, Status::Healthy { .. } | Status::Failed { .. })).await?.clone();
    match s {
        Status::Failed { reason, .. } => anyhow::bail!("a sandbox failed: {reason}"),
        _ => Ok(()),
    }
}

/// One sandboxed start, timed from before its configuration (cgroup,
/// files) is made to its first answer and to its supervisor's "healthy".
fn timed_start(
    host: &Host,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    pool: Option<&Pool>,
) -> anyhow::Result<(Duration, Duration)> {
    let port = free_port()?;
    let t0 = Instant::now();
    let sandbox = runtime.block_on(async { host.start_with(name, port, pool) })?;
    answered_and_healthy(runtime, t0, port, sandbox)
}

/// The times from `t0` until `sandbox`, started on `port`, first answers
/// and until its supervisor says "healthy"; then it is stopped.
fn answered_and_healthy(
    runtime: &tokio::runtime::Runtime,
    t0: Instant,
    port: u16,
    sandbox: Sandbox,
) -> anyhow::Result<(Duration, Duration)> {
    first_answer(port, Duration::from_secs(10))?;
    let answered = t0.elapsed();
    runtime.block_on(healthy(&sandbox))?;
    let healthy_at = t0.elapsed();
    runtime.block_on(sandbox.stop());
    Ok((answered, healthy_at))
}

/// One start from a sandbox made ready ahead (as a sleeping deployment's
/// is for its wake), timed like [`timed_start`]: from before its
/// configuration is made again and compared to its first answer and to
/// "healthy". The sandbox is made, and left `gap` to settle, untimed.
fn timed_ready_start(
    host: &Host,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    gap: Duration,
) -> anyhow::Result<(Duration, Duration)> {
    let port = free_port()?;
    let log = Log::open(&host.dir.path().join(format!("{name}.log")), LogLimits::default())?;
    let ready = runtime.block_on(nx_runtime::ready::Ready::make(&host.config(name, port)?, &host.pm, &log))?;
    std::thread::sleep(gap);
    let t0 = Instant::now();
    let config = host.config(name, port)?;
    let sandbox = runtime
        .block_on(ready.start(config, host.pm.clone(), log))
        .map_err(|(_, why)| anyhow::anyhow!("the ready sandbox was not used: {why}"))?;
    answered_and_healthy(runtime, t0, port, sandbox)
}

/// The start benchmark: from a parked slot, from a sandbox made ready and
/// the usual way, in turns; returns the median from a parked slot in
/// milliseconds (what a push pays: the receiver keeps a pool).
pub fn start(rounds: usize, gap: Duration) -> anyhow::Result<f64> {
    let host = Host::new()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let pool = host.pool(1);
    let (mut pooled, mut pooled_healthy) = (Figure::default(), Figure::default());
    let (mut sandboxed, mut healthy_at, mut plain) = (Figure::default(), Figure::default(), Figure::default());
    let (mut ready, mut ready_healthy) = (Figure::default(), Figure::default());
    for round in 0..rounds {
        // Pushes arrive seconds apart, not back to back: the pause lets the
        // kernel's cgroup locks go idle as they are when a push arrives. The
        // pool refills in it, as the receiver's does after a claim.
        runtime.block_on(pool.fill())?;
        std::thread::sleep(gap);
        // The cgroups and the sandbox's files are part of every start the
        // receiver makes, so the clock starts before they are made.
        let (answered, ready_at) = timed_start(&host, &runtime, &format!("pooled-{round}"), Some(&pool))?;
        pooled.push_ms(answered);
        pooled_healthy.push_ms(ready_at);

        std::thread::sleep(gap);
        let (answered, ready_at) = timed_start(&host, &runtime, &format!("start-{round}"), None)?;
        sandboxed.push_ms(answered);
        healthy_at.push_ms(ready_at);

        let (answered, ready_at) = timed_ready_start(&host, &runtime, &format!("ready-{round}"), gap)?;
        ready.push_ms(answered);
        ready_healthy.push_ms(ready_at);

        // The peer goes through the same process manager (whose reaper
        // collects every child of this process), minus bwrap and cgroups.
        let port = free_port()?;
        let t0 = Instant::now();
        let command = nx_runtime::process::Command::new(&host.binary).env("PORT", port.to_string());
        let mut child = runtime.block_on(host.pm.spawn(command))?;
        first_answer(port, Duration::from_secs(10))?;
        plain.push_ms(t0.elapsed());
        child.signal(nix::sys::signal::Signal::SIGKILL)?;
        runtime.block_on(child.wait());
    }
    let (from_pool, fresh) = pool.starts();
    nx_runtime::pool::clean(&host.dir.path().join("pool"));
    anyhow::ensure!(
        from_pool == rounds as u64,
        "only {from_pool} of {rounds} pooled starts came from the pool ({fresh} did not)"
    );
    println!("sandbox start -> first answer ({rounds} rounds, a static C server)");
    println!("{}", pooled.line("from a parked sandbox (bwrap, seccomp, cgroup)", "ms"));
    println!("{}", pooled_healthy.line("  ... reported healthy", "ms"));
    println!("{}", ready.line("from a sandbox made ready (a push's or a wake's: bwrap set up ahead)", "ms"));
    println!("{}", ready_healthy.line("  ... reported healthy", "ms"));
    println!("{}", sandboxed.line("the usual way (bwrap, seccomp, cgroup)", "ms"));
    println!("{}", healthy_at.line("  ... reported healthy", "ms"));
    println!("{}", plain.line("started plainly (peer)", "ms"));
    println!(
        "  ratio parked/plain: {:.1}x, usual/plain: {:.1}x; the pool saves {:.2} ms",
        pooled.median() / plain.median(),
        sandboxed.median() / plain.median(),
        sandboxed.median() - pooled.median()
    );
    println!("  rcu_expedited: {}, cgroup favordynmods: {}", rcu_expedited(), favordynmods());
    verdict(
        "first healthy answer <= 5 ms median (from a parked sandbox: a restart's, or a push's without one made ahead)",
        pooled_healthy.median() <= 5.0,
    );
    verdict(
        "first healthy answer <= 5 ms median (from a sandbox made ready: a push's and a wake's start)",
        ready_healthy.median() <= 5.0,
    );
    Ok(pooled.median())
}

/// Whether a cgroup2 mount has `favordynmods`, which spares task migrations
/// (on v1 hierarchies too: the lock is shared) the RCU grace period.
fn favordynmods() -> &'static str {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let cgroup2 = mounts.lines().filter(|l| l.split(' ').nth(2) == Some("cgroup2")).collect::<Vec<_>>();
    if cgroup2.is_empty() {
        "no cgroup2 mount"
    } else if cgroup2.iter().any(|l| l.split(' ').nth(3).is_some_and(|o| o.split(',').any(|o| o == "favordynmods"))) {
        "on"
    } else {
        "off"
    }
}

/// Whether the kernel runs expedited RCU grace periods, which decides what
/// joining a cgroup costs (see bench/RESULTS.md).
fn rcu_expedited() -> String {
    std::fs::read_to_string("/sys/kernel/rcu_expedited")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
