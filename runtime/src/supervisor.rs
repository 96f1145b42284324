//! Supervision of one sandbox: start it as the app's own uid, wait until it
//! answers its health check, keep checking it while it runs (a sandbox that
//! stops answering is reported unhealthy, and restarted when it does not
//! recover), restart it with capped exponential backoff when it crashes, give
//! up with the last log lines when it crash-loops, and stop the whole process
//! tree on request.
//!
//! Each life of the sandbox runs under its own [`crate::shim`], so the sandbox
//! keeps running when this process stops; [`Sandbox::adopt`] re-attaches to a
//! life a previous process started.
//!
//! Stopping (the shim does it): bwrap's outer process (the shim's child) runs
//! `nx-init` (pid 1 of the sandbox's pid namespace, [`crate::init`]) which
//! runs the app. SIGTERM goes to the app so it can shut down cleanly; after
//! the grace period SIGKILL goes to the sandbox's init, and the kernel then
//! kills every process of the namespace. The outer process
//! sees its child gone and exits, and the shim reaps it. Nothing is left as a
//! zombie or an orphan; whatever the cgroup still holds is killed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::watch;

use crate::health::{self, HealthCheck};
use crate::logs::Log;
use crate::pool::Claim;
use crate::process::ProcessManager;
use crate::shim::{Outcome, Shim, ShimError, ShimSpec, LANDLOCK_FD};
use crate::spec::{bwrap_args, env_args, HostLayout, SandboxSpec, ENV_FD, HOST_ENV, SECCOMP_FD};
use crate::sys::{self, Rlimit};

/// When to restart and when to give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// More crashes than this within `window` and the deployment is failed.
    pub max_restarts: u32,
    pub window: Duration,
    /// First backoff; doubles with every crash in the window.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(300),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

impl RestartPolicy {
    /// The pause before the `n`th restart within the window (n starts at 1).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
        self.backoff_base.saturating_mul(factor).min(self.backoff_cap)
    }

    /// What follows a crash at `now`, given the earlier crashes still in the
    /// window (which this updates): a restart after the backoff for that
    /// many crashes, or giving up once there are more than `max_restarts`.
    pub fn after_crash(&self, crashes: &mut VecDeque<Instant>, now: Instant) -> AfterCrash {
        crashes.push_back(now);
        while crashes.front().is_some_and(|t| now.duration_since(*t) > self.window) {
            crashes.pop_front();
        }
        let count = crashes.len() as u32;
        if count > self.max_restarts {
            AfterCrash::GiveUp { crashes: count }
        } else {
            AfterCrash::Restart(self.backoff(count))
        }
    }
}

/// How a running sandbox keeps being checked once healthy: its health check
/// runs every third of `interval`, each probe given a third of it, so that
/// two failures in a row (one failure is not enough: a loaded host may be
/// slow to answer once) fall within `interval` of the moment it stopped
/// answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A sandbox that stops answering is reported [`Status::Unhealthy`]
    /// within this long.
    pub interval: Duration,
    /// One that keeps failing this long (from its first failed probe) is
    /// stopped and restarted as after a crash, under the restart policy.
    pub restart_after: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self { interval: Duration::from_secs(10), restart_after: Duration::from_secs(30) }
    }
}

/// Failed probes in a row after which a running sandbox is unhealthy.
pub const FAILURES_TO_UNHEALTHY: u32 = 2;

impl Liveness {
    /// How often a running sandbox is probed, and how long each probe may
    /// take: a third of the interval, in whole milliseconds (it is shown in
    /// the reason a replica is unhealthy).
    pub fn every(&self) -> Duration {
        let third = self.interval.as_millis() / u128::from(FAILURES_TO_UNHEALTHY + 1);
        Duration::from_millis(u64::try_from(third).unwrap_or(u64::MAX).max(10))
    }
}

/// What [`RestartPolicy::after_crash`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCrash {
    /// Start the app again after this pause.
    Restart(Duration),
    /// Crash-looping: this many crashes within the window.
    GiveUp { crashes: u32 },
}

/// Why an answer on `addr` does not count as the app's: some socket that
/// listens there belongs to another user than the app's `uid`, none does,
/// or the kernel could not be asked (then nothing proves it is the app's).
fn foreign_listener(owners: std::io::Result<Vec<u32>>, uid: u32, addr: SocketAddr) -> Option<String> {
    let owners = match owners {
        Ok(o) => o,
        Err(e) => return Some(format!("cannot tell which user listens on {addr}: {e}")),
    };
    match owners.iter().find(|o| **o != uid) {
        Some(other) => Some(format!(
            "{addr} is held by a socket of uid {other}, not this app's (uid {uid}); the answer was not the app's, \
             so it is not served (push again to get another port)"
        )),
        None if owners.is_empty() => {
            Some(format!("the answer on {addr} came from no socket of this app's (uid {uid})"))
        }
        None => None,
    }
}

/// Why an answer on the app's port is not the app's, if it is not
/// ([`foreign_listener`]). The kernel is asked off the async threads: a
/// tenant with many listeners on its port makes the dump longer.
async fn not_the_apps(cfg: &SandboxConfig) -> Option<String> {
    let addr = cfg.addr;
    let owners = tokio::task::spawn_blocking(move || health::listeners(addr))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    foreign_listener(owners, cfg.host_ids.0, addr)
}

/// Everything needed to run one sandbox. `Debug` leaves out the environment,
/// which holds the app's secrets.
#[derive(Clone)]
pub struct SandboxConfig {
    pub spec: SandboxSpec,
    pub host: Arc<HostLayout>,
    /// The bwrap executable.
    pub bwrap: PathBuf,
    /// Host uid and gid the sandbox runs as, the app's own.
    pub host_ids: (u32, u32),
    /// The app's complete environment.
    pub env: Vec<(String, String)>,
    /// Where the app listens; the health check connects here.
    pub addr: SocketAddr,
    pub health: HealthCheck,
    /// How long the app may take to answer its first health check.
    pub start_timeout: Duration,
    /// How long the app has to exit after SIGTERM.
    pub stop_grace: Duration,
    pub restart: RestartPolicy,
    pub liveness: Liveness,
    /// The seccomp program (`seccomp::to_bytes`), handed to bwrap by descriptor.
    pub seccomp: Option<Arc<[u8]>>,
    /// The cgroup the sandbox joins; destroyed when supervision ends.
    pub cgroup: Option<crate::cgroup::Cgroup>,
    pub rlimits: Vec<Rlimit>,
    /// The host's `/proc`, to find the sandbox's processes.
    pub proc_root: PathBuf,
    /// What Landlock can enforce here: bind rules for `addr`'s port, scopes.
    pub landlock: crate::landlock::Support,
    /// The shim program (`nx-shim`).
    pub shim: PathBuf,
    /// The shim's state directory: one per sandbox, root's alone.
    pub state_dir: PathBuf,
    /// Parked sandboxes to start from (their cgroup join paid ahead); a
    /// start without one, or whose claim fails, goes the usual way.
    pub pool: Option<crate::pool::Pool>,
}

impl std::fmt::Debug for SandboxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxConfig")
            .field("spec", &self.spec)
            .field("host_ids", &self.host_ids)
            .field("env", &format_args!("<{} variables>", self.env.len()))
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// What a sandbox is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Started (or restarting after a crash); not answering yet.
    Starting { restarts: u32 },
    /// Answers its health check.
    Healthy { restarts: u32 },
    /// Was healthy, runs, but has failed its health check
    /// [`FAILURES_TO_UNHEALTHY`] times in a row (`reason`: the last
    /// failure); healthy again once a probe passes.
    Unhealthy { restarts: u32, reason: String },
    /// Gave up: could not start, never answered, or crash-looped.
    Failed { reason: String, log_tail: Vec<String> },
    /// Stopped on request.
    Stopped,
}

impl Status {
    /// Whether the supervisor is done with this sandbox.
    pub fn is_final(&self) -> bool {
        matches!(self, Status::Failed { .. } | Status::Stopped)
    }
}

/// How a sandbox's last life ended, while this process supervised it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastExit {
    /// "status 3", "signal 9 (SIGKILL)", or that its shim was killed.
    pub how: String,
    /// Whether the kernel killed a process of it for memory (its cgroup's
    /// `memory.events`, as the shim read it when the life ended).
    pub oom_killed: bool,
}

/// A supervised sandbox. Dropping it does not stop it; call [`Sandbox::stop`].
#[derive(Debug)]
pub struct Sandbox {
    status: watch::Receiver<Status>,
    last_exit: watch::Receiver<Option<LastExit>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sandbox {
    /// Starts supervising; returns at once. A sandbox of this state
    /// directory that still runs (its shim alive, or processes left in its
    /// cgroup) is ended first: never two instances.
    pub fn start(config: SandboxConfig, pm: ProcessManager, log: Log) -> Sandbox {
        Self::supervised(config, pm, log, First::Launch)
    }

    /// Re-attaches to the sandbox a previous process started, if its shim
    /// still runs it and it answers its health check: supervision goes on
    /// from `Healthy` without a restart. Otherwise ends whatever is left of
    /// it (saying in the log how it ended) and gives the configuration back,
    /// for [`Sandbox::start`].
    pub async fn adopt(config: SandboxConfig, pm: ProcessManager, log: Log) -> Result<Sandbox, SandboxConfig> {
        let Some(mut shim) = Shim::attach(&config.state_dir).await else {
            // The shim records how the life ended for a receiver that was away.
            if let Some(exit) = crate::shim::last_exit(&config.state_dir) {
                log.system_line(&format!("exited ({}) while no receiver watched it", exit.describe()));
            }
            clear_leftovers(&config, &log).await;
            return Err(config);
        };
        let probe = shim.probe();
        let answered = health::wait_healthy(config.addr, &config.health, config.start_timeout, || probe.exited()).await;
        let foreign = not_the_apps(&config).await;
        match (answered, foreign) {
            (Ok(()), None) => {
                log.system_line(&format!("sandbox (pid {}) adopted, healthy on {}", shim.pid(), config.addr));
                Ok(Self::supervised(config, pm, log, First::Adopted(shim)))
            }
            (Err(e), _) => {
                log.system_line(&format!(
                    "the running sandbox (pid {}) does not answer ({e}); replacing it",
                    shim.pid()
                ));
                terminate(&config, &mut shim).await;
                Err(config)
            }
            (Ok(()), Some(reason)) => {
                log.system_line(&format!("the running sandbox is not adopted: {reason}"));
                terminate(&config, &mut shim).await;
                Err(config)
            }
        }
    }

    pub(crate) fn supervised(config: SandboxConfig, pm: ProcessManager, log: Log, first: First) -> Sandbox {
        let initial = match first {
            First::Adopted(_) => Status::Healthy { restarts: 0 },
            First::Launch | First::Released(_) => Status::Starting { restarts: 0 },
        };
        let (status_tx, status) = watch::channel(initial);
        let (exit_tx, last_exit) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let cgroup = config.cgroup.clone();
        let task = tokio::spawn(async move {
            supervise(config, pm, log, (status_tx, exit_tx), stop_rx, first).await;
            // The tree is gone by now; this catches anything that slipped out
            // of the namespace and frees the cgroup.
            if let Some(cg) = cgroup {
                let _ = tokio::task::spawn_blocking(move || cg.destroy()).await;
            }
        });
        Sandbox { status, last_exit, stop, task }
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// How its last life ended, when one ended under this supervision.
    pub fn last_exit(&self) -> Option<LastExit> {
        self.last_exit.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Waits until the first start is decided: healthy, failed or stopped.
    pub async fn wait_started(&self) -> Status {
        let mut rx = self.status.clone();
        let result = rx.wait_for(|s| !matches!(s, Status::Starting { .. })).await.map(|s| s.clone());
        result.unwrap_or(Status::Stopped)
    }

    /// Stops the sandbox (SIGTERM, grace period, then SIGKILL of the whole
    /// tree) and waits until every process of it is gone.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Where a supervised sandbox's first life comes from.
pub(crate) enum First {
    /// Started here.
    Launch,
    /// Running already, under a shim a previous receiver started: healthy.
    Adopted(Shim),
    /// Held ready ([`crate::ready::Ready`]) and just told to go.
    Released(Shim),
}

async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    // An error means the handle was dropped without stop: keep running.
    if rx.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn supervise(
    cfg: SandboxConfig,
    pm: ProcessManager,
    log: Log,
    (status, last_exit): (watch::Sender<Status>, watch::Sender<Option<LastExit>>),
    mut stop: watch::Receiver<bool>,
    mut first: First,
) {
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    let mut restarts = 0u32;
    let fail = |status: &watch::Sender<Status>, reason: String| {
        log.system_line(&reason);
        let _ = status.send(Status::Failed { reason, log_tail: log.tail(20) });
    };
    loop {
        let mut shim = match std::mem::replace(&mut first, First::Launch) {
            First::Adopted(shim) => shim,
            first => {
                let _ = status.send(Status::Starting { restarts });
                let mut shim = match first {
                    First::Released(shim) => {
                        log.system_line("started from a sandbox held ready (bwrap's setup done ahead of time)");
                        shim
                    }
                    _ => match launch(&cfg, &pm, &log).await {
                        Ok(s) => s,
                        Err(e) => return fail(&status, format!("cannot create the sandbox: {e}")),
                    },
                };
                log.system_line(&format!("sandbox started (pid {})", shim.pid()));
                let probe = shim.probe();
                let healthy = tokio::select! {
                    r = health::wait_healthy(cfg.addr, &cfg.health, cfg.start_timeout, || probe.exited()) => r,
                    _ = stop_requested(&mut stop) => {
                        terminate(&cfg, &mut shim).await;
                        let _ = status.send(Status::Stopped);
                        return;
                    }
                };
                if let Err(e) = healthy {
                    if !shim.exited() {
                        terminate(&cfg, &mut shim).await;
                        return fail(
                            &status,
                            format!("did not pass its health check within {:?}: {e}", cfg.start_timeout),
                        );
                    }
                    let ended = describe_outcome(&cfg, shim.wait().await).await;
                    let how = ended.how.clone();
                    let _ = last_exit.send(Some(ended));
                    return fail(&status, format!("exited ({how}) before answering its health check"));
                }
                // Apps share the host's network namespace: the answer must come from
                // a socket of this app's own, not one another app holds on its port.
                if let Some(reason) = not_the_apps(&cfg).await {
                    terminate(&cfg, &mut shim).await;
                    return fail(&status, reason);
                }
                log.system_line(&format!("healthy on {}", cfg.addr));
                let _ = status.send(Status::Healthy { restarts });
                shim
            }
        };

        let (outcome, hung) = tokio::select! {
            outcome = shim.wait() => (outcome, None),
            reason = keep_checking(&cfg, &log, &status, restarts) => {
                log.system_line(&format!(
                    "failed its health check for {:?} ({reason}); stopping it to restart it",
                    cfg.liveness.restart_after
                ));
                terminate(&cfg, &mut shim).await;
                (shim.wait().await, Some(reason))
            }
            _ = stop_requested(&mut stop) => {
                terminate(&cfg, &mut shim).await;
                let _ = status.send(Status::Stopped);
                return;
            }
        };
        let mut ended = describe_outcome(&cfg, outcome).await;
        if let Some(reason) = hung {
            ended.how = format!(
                "{}, stopped after failing its health check for {:?}: {reason}",
                ended.how, cfg.liveness.restart_after
            );
        }
        let _ = last_exit.send(Some(ended.clone()));
        let ended = ended.how;
        let pause = match cfg.restart.after_crash(&mut crashes, Instant::now()) {
            AfterCrash::Restart(pause) => pause,
            AfterCrash::GiveUp { crashes } => {
                return fail(
                    &status,
                    format!("crashed {crashes} times within {:?}, giving up; last exit: {ended}", cfg.restart.window),
                );
            }
        };
        log.system_line(&format!("exited ({ended}), restarting in {pause:?}"));
        restarts += 1;
        let _ = status.send(Status::Starting { restarts });
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop_requested(&mut stop) => {
                let _ = status.send(Status::Stopped);
                return;
            }
        }
    }
}

/// Probes a running sandbox as [`Liveness`] says while it lives: after
/// [`FAILURES_TO_UNHEALTHY`] failures in a row it is [`Status::Unhealthy`],
/// healthy again at the next probe that passes. Returns the last failure
/// once it has failed for `restart_after`: the caller stops it, and the
/// restart policy takes it from there as after a crash.
async fn keep_checking(cfg: &SandboxConfig, log: &Log, status: &watch::Sender<Status>, restarts: u32) -> String {
    let every = cfg.liveness.every();
    // A probe that outlasts the period is followed by the next at once, so
    // two failures in a row take at most three periods: the interval.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: Option<(Instant, u32)> = None;
    loop {
        ticks.tick().await;
        let started = Instant::now();
        let probe = tokio::time::timeout(every, health::probe(cfg.addr, &cfg.health, every)).await;
        // An answer counts only from the app's own socket, as at its start:
        // an app that closed its listener could have had its port taken by
        // another tenant's, which would then get its visitors.
        let probe = match probe.unwrap_or(Err(health::ProbeError::NoAnswer(cfg.addr, every))) {
            Ok(()) => not_the_apps(cfg).await.map_or(Ok(()), Err),
            Err(e) => Err(e.to_string()),
        };
        match probe {
            Ok(()) => {
                if failing.take().is_some_and(|(_, n)| n >= FAILURES_TO_UNHEALTHY) {
                    log.system_line(&format!("answers its health check again on {}", cfg.addr));
                    let _ = status.send(Status::Healthy { restarts });
                }
            }
            Err(e) => {
                let (since, count) = failing.get_or_insert((started, 0));
                *count += 1;
                if *count == FAILURES_TO_UNHEALTHY {
                    let reason = format!("failed its health check {count} times in a row: {e}");
                    log.system_line(&format!("unhealthy: {reason}"));
                    let _ = status.send(Status::Unhealthy { restarts, reason });
                }
                if *count >= FAILURES_TO_UNHEALTHY && since.elapsed() >= cfg.liveness.restart_after {
                    return e.to_string();
                }
            }
        }
    }
}

/// How a life ended, for the log; a shim that went away without saying
/// (killed) took its sandbox along, and whatever the cgroup still holds is
/// killed here, before another life can start.
async fn describe_outcome(cfg: &SandboxConfig, outcome: Outcome) -> LastExit {
    match outcome {
        Outcome::Exited(exit) => LastExit { how: exit.describe(), oom_killed: exit.oom_kills > 0 },
        Outcome::Lost => {
            if let Some(cg) = cfg.cgroup.clone() {
                let _ = tokio::task::spawn_blocking(move || cg.kill_all()).await;
            }
            LastExit { how: "its shim was killed, and the sandbox with it".to_owned(), oom_killed: false }
        }
    }
}

/// Ends what a previous life left when no shim answers for it: processes
/// still in the cgroup (a shim killed while its sandbox lived on) are killed.
pub(crate) async fn clear_leftovers(cfg: &SandboxConfig, log: &Log) {
    if let Some(cg) = cfg.cgroup.clone() {
        let left = cg.pids();
        if !left.is_empty() {
            log.system_line(&format!(
                "{} processes of this sandbox were running without their shim; killed them",
                left.len()
            ));
            let _ = tokio::task::spawn_blocking(move || cg.kill_all()).await;
        }
    }
}

/// Starts one life under a new shim, after making sure no other runs.
/// Ends what an earlier start left of `cfg`'s sandbox before another
/// starts in its place: a shim still running in its state directory, and
/// whatever is left in its cgroup.
pub(crate) async fn end_earlier(cfg: &SandboxConfig, log: &Log) {
    if let Some(mut old) = Shim::attach(&cfg.state_dir).await {
        log.system_line(&format!("another instance (pid {}) was still running; stopping it first", old.pid()));
        terminate(cfg, &mut old).await;
    }
    clear_leftovers(cfg, log).await;
}

async fn launch(cfg: &SandboxConfig, pm: &ProcessManager, log: &Log) -> Result<Shim, ShimError> {
    end_earlier(cfg, log).await;
    let (spec, fds) = shim_spec(cfg, log).map_err(|source| ShimError::State { path: cfg.state_dir.clone(), source })?;
    let cgroup = cfg.cgroup.clone().unwrap_or_default();
    if let Some(pool) = &cfg.pool {
        match pool.launch(&cgroup, &cfg.state_dir, &spec, &fds).await {
            Claim::Started(shim) => {
                log.system_line("started from a parked sandbox (its cgroup joined ahead of time)");
                return Ok(shim);
            }
            Claim::Failed(e) => return Err(e),
            Claim::Unusable(why) => {
                log.system_line(&format!("a parked sandbox could not be used ({why}); starting this one the usual way"))
            }
            Claim::Empty => {}
        }
    }
    cgroup.create()?;
    Shim::launch(pm, &cfg.shim, &cfg.state_dir, &spec, fds).await
}

pub(crate) fn shim_spec(
    cfg: &SandboxConfig,
    log: &Log,
) -> std::io::Result<(ShimSpec, Vec<(std::os::fd::OwnedFd, i32)>)> {
    let mut spec = cfg.spec.clone();
    let mut fds = Vec::new();
    if let Some(program) = &cfg.seccomp {
        fds.push((sys::sealed_file_with("nx-seccomp", program)?, SECCOMP_FD));
        spec.seccomp_fd = Some(SECCOMP_FD);
    }
    // The app's variables reach bwrap only through this descriptor: never its
    // own environment (its loader would act on them on the host) nor its
    // command line (readable by every user in /proc), nor the shim's spec.
    let env = env_args(&cfg.env).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    fds.push((sys::sealed_file_with("nx-env", &env)?, ENV_FD));
    spec.env_fd = Some(ENV_FD);
    let pass_fds = fds.iter().map(|(_, n)| *n).collect();
    let landlock = cfg.landlock.ruleset(cfg.addr.port())?;
    let has_landlock = landlock.is_some();
    fds.extend(landlock.map(|fd| (fd, LANDLOCK_FD)));
    let args = bwrap_args(&spec, &cfg.host)
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{a:?} is not UTF-8")))
        })
        .collect::<Result<_, _>>()?;
    let limits = log.limits();
    let shim = ShimSpec {
        program: cfg.bwrap.clone(),
        args,
        env: HOST_ENV.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        user: cfg.host_ids,
        rlimits: cfg.rlimits.clone(),
        cgroup: cfg.cgroup.as_ref().map(|c| c.dirs().to_vec()).unwrap_or_default(),
        pass_fds,
        landlock: has_landlock,
        log: log.path(),
        log_max_file_bytes: limits.max_file_bytes,
        log_keep_rotated: limits.keep_rotated,
        proc_root: cfg.proc_root.clone(),
        listen_port: Some(cfg.addr.port()),
        hold: false,
    };
    Ok((shim, fds))
}

/// "status 3" or "signal 9 (SIGKILL)".
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({})", s.as_str()),
            Err(_) => format!("signal {sig}"),
        },
        _ => "unknown status".to_owned(),
    }
}

/// The direct children of `pid`, read from `<proc>/<pid>/task/*/children`.
pub fn children_of(proc_root: &Path, pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(proc_root.join(pid.to_string()).join("task")) else { return Vec::new() };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

/// Stops one life through its shim and waits until it has ended; if the shim
/// does not say so in time (or is gone), whatever is in the cgroup is killed.
pub(crate) async fn terminate(cfg: &SandboxConfig, shim: &mut Shim) {
    if shim.exited() && matches!(shim.wait().await, Outcome::Exited(_)) {
        return;
    }
    if let Outcome::Lost = shim.stop(cfg.stop_grace).await {
        if let Some(cg) = cfg.cgroup.clone() {
            let _ = tokio::task::spawn_blocking(move || cg.kill_all()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(3),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(500));
        assert_eq!(p.backoff(2), Duration::from_secs(1));
        assert_eq!(p.backoff(3), Duration::from_secs(2));
        assert_eq!(p.backoff(4), Duration::from_secs(3));
        assert_eq!(p.backoff(40), Duration::from_secs(3));
    }

    #[test]
    fn only_the_apps_own_listener_makes_it_healthy() {
        let addr: SocketAddr = "127.0.0.1:20000".parse().unwrap();
        assert_eq!(foreign_listener(Ok(vec![7001]), 7001, addr), None);
        assert_eq!(foreign_listener(Ok(vec![7001, 7001]), 7001, addr), None, "SO_REUSEPORT listeners of the app's own");
        let held = foreign_listener(Ok(vec![7001, 7002]), 7001, addr).unwrap();
        assert!(
            held.starts_with("127.0.0.1:20000 is held by a socket of uid 7002, not this app's (uid 7001)"),
            "{held}"
        );
        assert!(foreign_listener(Ok(vec![]), 7001, addr).is_some());
        let unknown = foreign_listener(Err(std::io::Error::from_raw_os_error(libc::EPERM)), 7001, addr).unwrap();
        assert!(unknown.starts_with("cannot tell which user listens on 127.0.0.1:20000"), "{unknown}");
    }

    #[test]
    fn crashes_restart_with_backoff_until_too_many_fall_in_the_window() {
        let p = RestartPolicy {
            max_restarts: 2,
            window: Duration::from_secs(60),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
        };
        let t0 = Instant::now();
        let mut crashes = VecDeque::new();
        assert_eq!(p.after_crash(&mut crashes, t0), AfterCrash::Restart(Duration::from_secs(1)));
        assert_eq!(
            p.after_crash(&mut crashes, t0 + Duration::from_secs(10)),
            AfterCrash::Restart(Duration::from_secs(2))
        );
        // The first crash leaves the window: two in it, a restart.
        let later = t0 + Duration::from_secs(65);
        assert_eq!(p.after_crash(&mut crashes, later), AfterCrash::Restart(Duration::from_secs(2)));
        assert_eq!(crashes.len(), 2);
        assert_eq!(p.after_crash(&mut crashes, later + Duration::from_secs(1)), AfterCrash::GiveUp { crashes: 3 });
    }

    #[test]
    fn children_are_read_from_the_given_proc() {
        let root = std::env::temp_dir().join(format!("nx-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("10/task/10")).unwrap();
        std::fs::create_dir_all(root.join("10/task/11")).unwrap();
        std::fs::write(root.join("10/task/10/children"), "12 13 ").unwrap();
        std::fs::write(root.join("10/task/11/children"), "14").unwrap();
        let mut kids = children_of(&root, 10);
        kids.sort();
        assert_eq!(kids, [12, 13, 14]);
        assert!(children_of(&root, 99).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn exits_are_described_for_humans() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe_exit(std::process::ExitStatus::from_raw(3 << 8)), "status 3");
        assert_eq!(describe_exit(std::process::ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
    }

    fn config(addr: SocketAddr, health: HealthCheck, liveness: Liveness) -> SandboxConfig {
        SandboxConfig {
            spec: SandboxSpec {
                hostname: "web".into(),
                binary: "/b".into(),
                binary_name: "b".into(),
                args: vec![],
                data_dir: "/d".into(),
                etc: None,
                dynamic: false,
                tmp_size_bytes: 1,
                seccomp_fd: None,
                env_fd: None,
                go_fd: None,
                share_net: true,
                ro_binds: vec![],
            },
            host: Arc::new(HostLayout {
                usr: "/usr".into(),
                lib_entries: vec![],
                ld_cache: None,
                init: "/nx-init".into(),
                dev: None,
            }),
            bwrap: "/usr/bin/bwrap".into(),
            host_ids: (1, 1),
            env: vec![("DATABASE_URL".into(), "postgres://u:hunter2@h/db".into())],
            addr,
            health,
            start_timeout: Duration::from_secs(1),
            stop_grace: Duration::from_secs(1),
            restart: RestartPolicy::default(),
            liveness,
            seccomp: None,
            cgroup: None,
            rlimits: vec![],
            proc_root: "/proc".into(),
            landlock: crate::landlock::Support::Abi(0),
            shim: "/nx-shim".into(),
            state_dir: "/s".into(),
            pool: None,
        }
    }

    #[test]
    fn debug_never_shows_the_environment() {
        let cfg = config("127.0.0.1:1".parse().unwrap(), HealthCheck::Tcp, Liveness::default());
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    /// An app on loopback that answers `GET` with 200 while `answering`,
    /// and otherwise accepts connections and says nothing (as a process
    /// stopped with SIGSTOP does: the kernel still accepts for it).
    async fn app(answering: Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = l.accept().await {
                if answering.load(std::sync::atomic::Ordering::SeqCst) {
                    let mut buf = [0u8; 512];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
                } else {
                    held.push(s);
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_sandbox_that_stops_answering_is_unhealthy_within_the_interval_healthy_again_and_given_up_on() {
        let answering = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let addr = app(answering.clone()).await;
        assert_eq!(Liveness::default().every(), Duration::from_millis(3333), "whole milliseconds");
        let liveness = Liveness { interval: Duration::from_millis(1500), restart_after: Duration::from_secs(3) };
        let check = HealthCheck::Http { path: "/healthz".into(), require_success: true };
        let mut cfg = config(addr, check, liveness);
        let me = crate::sys::effective_uid();
        cfg.host_ids = (me, me);
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&dir.path().join("app.log"), crate::logs::LogLimits::default()).unwrap();
        let (status, mut seen) = watch::channel(Status::Healthy { restarts: 4 });
        let checking = keep_checking(&cfg, &log, &status, 4);
        tokio::pin!(checking);
        let expected = format!(
            "failed its health check 2 times in a row: {addr} accepted the connection but sent no HTTP answer within 500ms"
        );

        // Answering: nothing changes.
        tokio::select! {
            _ = &mut checking => panic!("gave up on an answering sandbox"),
            _ = tokio::time::sleep(Duration::from_millis(1200)) => {}
        }
        assert_eq!(*seen.borrow_and_update(), Status::Healthy { restarts: 4 });

        // Hung: unhealthy within the interval (the bound is twice that, for
        // a loaded host), with the last failure.
        answering.store(false, std::sync::atomic::Ordering::SeqCst);
        let hung = Instant::now();
        tokio::select! {
            _ = &mut checking => panic!("gave up before restart_after"),
            r = seen.wait_for(|s| matches!(s, Status::Unhealthy { .. })) => {
                assert_eq!(*r.unwrap(), Status::Unhealthy { restarts: 4, reason: expected.clone() });
            }
        }
        assert!(hung.elapsed() < 2 * liveness.interval, "{:?}", hung.elapsed());

        // Answering again: healthy at the next probe.
        answering.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::select! {
            _ = &mut checking => panic!("gave up on a sandbox that answers again"),
            r = seen.wait_for(|s| matches!(s, Status::Healthy { .. })) => {
                assert_eq!(*r.unwrap(), Status::Healthy { restarts: 4 });
            }
        }

        // Hung for restart_after: given up on with the last failure.
        answering.store(false, std::sync::atomic::Ordering::SeqCst);
        let hung = Instant::now();
        let last = checking.await;
        assert_eq!(last, format!("{addr} accepted the connection but sent no HTTP answer within 500ms"));
        assert!(hung.elapsed() >= liveness.restart_after, "{:?}", hung.elapsed());
        assert!(matches!(*seen.borrow(), Status::Unhealthy { .. }));
        let lines = std::fs::read_to_string(dir.path().join("app.log")).unwrap();
        assert!(lines.contains(&format!("answers its health check again on {addr}")), "{lines}");
    }

    #[tokio::test]
    async fn an_answer_from_another_users_socket_on_the_port_is_a_failed_probe() {
        // The app's uid is 1; the socket answering on its port is this
        // process's: what a tenant that took over a closed port looks like.
        let addr = app(Arc::new(std::sync::atomic::AtomicBool::new(true))).await;
        let liveness = Liveness { interval: Duration::from_millis(600), restart_after: Duration::from_secs(60) };
        let cfg = config(addr, HealthCheck::default(), liveness);
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&dir.path().join("app.log"), crate::logs::LogLimits::default()).unwrap();
        let (status, mut seen) = watch::channel(Status::Healthy { restarts: 0 });
        let checking = keep_checking(&cfg, &log, &status, 0);
        let me = crate::sys::effective_uid();
        tokio::select! {
            _ = checking => panic!("gave up before restart_after"),
            r = seen.wait_for(|s| matches!(s, Status::Unhealthy { .. })) => {
                let Status::Unhealthy { reason, .. } = r.unwrap().clone() else { unreachable!() };
                assert!(
                    reason.starts_with(&format!(
                        "failed its health check 2 times in a row: {addr} is held by a socket of uid {me}, not this app's (uid 1)"
                    )),
                    "{reason}"
                );
            }
        }
    }
}
