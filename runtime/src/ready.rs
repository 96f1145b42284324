//! Sandboxes made ready ahead of their start: bwrap runs its whole setup
//! (namespaces, mounts, the cgroup join, Landlock, the system call filters,
//! the app's user) and `exec`s the sandbox's nx-init, which waits for the
//! byte `g` on a pipe of the shim's ([`crate::spec::GO_FD`]) before it
//! starts the app. A start from one costs the byte and the app's own start:
//! bwrap's setup, most of a start (bench/RESULTS.md), is paid when the
//! sandbox is made, not while a request waits for it.
//!
//! A ready sandbox is made from one configuration and started with the
//! configuration of the moment it is needed; it is used only if both make
//! the same sandbox: the same bwrap command and shim spec, cgroup and its
//! limits, environment, system call filter and Landlock support, and the
//! same files at the paths it binds (its data directory, its binary's
//! directory, `/etc`, nx-init, the loader's cache and the other read-only
//! binds, by device and inode: a bind made earlier keeps the file it found
//! then). The binary itself is not among them: `/app` is its directory, so
//! a sandbox can be made before its binary is placed there, and runs the
//! one the start placed (a push's, made during its upload). Anything else
//! discards it and the start goes the usual way, so a ready sandbox can
//! make a start faster but never different.
//!
//! Until `go` only nx-init runs in it, as the app's user. The pipe is made
//! by the shim, as root, before the child takes the app's uid, so a process
//! of that uid cannot open it again through `/proc` to write the byte
//! itself (EACCES: the pipe is root's, mode 0600). Its shim dies
//! with the process that made it (a later receiver would not know it), and
//! nx-init ends the sandbox without the app when the shim is gone (the
//! pipe's end: bwrap's own `--block-fd` would take that end as its go). A
//! stop kills it at once, and so does dropping the [`Ready`].

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use crate::cgroup::Cgroup;
use crate::shim::{Shim, ShimError, ShimSpec};
use crate::spec::GO_FD;
use crate::supervisor::{end_earlier, shim_spec, First, Sandbox, SandboxConfig};
use crate::{Log, ProcessManager};

/// Sandboxes started from one made ready, since this process started.
static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many sandboxes were started from one made ready (for the metrics).
pub fn started() -> u64 {
    STARTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// A sandbox set up and held before its app runs.
pub struct Ready {
    /// Taken by [`Ready::start`] or [`Ready::discard`]; one still here when
    /// it is dropped has its cgroup's processes killed.
    shim: Option<Shim>,
    /// What it was made from ([`made_from`]); holds the app's variables.
    made_from: MadeFrom,
    cgroup: Option<Cgroup>,
    /// Its shim's state directory.
    state_dir: std::path::PathBuf,
}

impl std::fmt::Debug for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ready").field("pid", &self.shim.as_ref().map(Shim::pid)).finish_non_exhaustive()
    }
}

/// Why a ready sandbox was not used; the start goes the usual way.
#[derive(Debug, thiserror::Error)]
pub enum Unused {
    #[error("it ended while it waited")]
    Ended,
    #[error("what it was made from has changed since ({0})")]
    Changed(&'static str),
    #[error("cannot compare it with the sandbox asked for: {0}")]
    Compare(std::io::Error),
    #[error("cannot tell it to go: {0}")]
    Go(std::io::Error),
}

/// Everything of a configuration that decides what its sandbox is, in
/// parts named for a message, as bytes to compare.
type MadeFrom = [(&'static str, Vec<u8>); 3];

/// What `cfg` makes: a ready sandbox is used only when these are equal.
/// `spec` is its shim's spec ([`shim_spec`]).
fn made_from(cfg: &SandboxConfig, spec: &ShimSpec) -> std::io::Result<MadeFrom> {
    let identity = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let bound = [cfg.spec.data_dir.as_path(), cfg.spec.app_source(), cfg.host.init.as_path()]
        .into_iter()
        .chain(cfg.spec.etc.as_deref())
        .chain(cfg.host.ld_cache.as_deref().filter(|_| cfg.spec.dynamic))
        .chain(cfg.spec.ro_binds.iter().map(|(host, _)| host.as_path()))
        .map(identity)
        .collect::<std::io::Result<Vec<_>>>()?;
    let json = |v: serde_json::Result<Vec<u8>>| v.map_err(std::io::Error::other);
    Ok([
        (
            "its sandbox's command, cgroup or limits",
            json(serde_json::to_vec(&(spec, format!("{:?} {:?}", cfg.landlock, cfg.cgroup))))?,
        ),
        ("its variables or system call filter", json(serde_json::to_vec(&(&cfg.env, cfg.seccomp.as_deref())))?),
        ("the files it binds", json(serde_json::to_vec(&bound))?),
    ])
}

/// The part of what a sandbox was made from that differs now, if any.
fn changed(was: &MadeFrom, now: &MadeFrom) -> Option<&'static str> {
    was.iter().zip(now).find(|(a, b)| a.1 != b.1).map(|(a, _)| a.0)
}

impl Ready {
    /// Makes `config`'s sandbox and holds it before its app runs. A sandbox
    /// of the same state directory that still runs is ended first, as for
    /// any start.
    pub async fn make(config: &SandboxConfig, pm: &ProcessManager, log: &Log) -> Result<Ready, ShimError> {
        end_earlier(config, log).await;
        let state = |source| ShimError::State { path: config.state_dir.clone(), source };
        let made_from = shim_spec(config, log).and_then(|(spec, _)| made_from(config, &spec)).map_err(state)?;
        let mut held = config.clone();
        held.spec.go_fd = Some(GO_FD);
        let (mut spec, fds) = shim_spec(&held, log).map_err(state)?;
        spec.hold = true;
        let cgroup = config.cgroup.clone();
        cgroup.clone().unwrap_or_default().create()?;
        match Shim::launch(pm, &config.shim, &config.state_dir, &spec, fds).await {
            Ok(shim) => Ok(Ready { shim: Some(shim), made_from, cgroup, state_dir: config.state_dir.clone() }),
            Err(e) => {
                if let Some(cg) = cgroup {
                    let _ = tokio::task::spawn_blocking(move || cg.destroy()).await;
                }
                Err(e)
            }
        }
    }

    /// Starts `config`'s sandbox from this one if it is the same sandbox
    /// and still waits; otherwise discards it and gives `config` back, with
    /// why, for a start the usual way.
    pub async fn start(
        mut self,
        config: SandboxConfig,
        pm: ProcessManager,
        log: Log,
    ) -> Result<Sandbox, (SandboxConfig, Unused)> {
        let unused = match self.compare(&config, &log) {
            Ok(()) => match self.shim.take() {
                Some(mut shim) => match shim.go().await {
                    Ok(()) => {
                        STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Ok(Sandbox::supervised(config, pm, log, First::Released(shim)));
                    }
                    Err(e) => {
                        self.shim = Some(shim);
                        Unused::Go(e)
                    }
                },
                None => Unused::Ended,
            },
            Err(why) => why,
        };
        self.discard().await;
        Err((config, unused))
    }

    fn compare(&self, config: &SandboxConfig, log: &Log) -> Result<(), Unused> {
        if self.shim.as_ref().is_none_or(Shim::exited) {
            return Err(Unused::Ended);
        }
        let (spec, _fds) = shim_spec(config, log).map_err(Unused::Compare)?;
        let now = made_from(config, &spec).map_err(Unused::Compare)?;
        match changed(&self.made_from, &now) {
            None => Ok(()),
            Some(what) => Err(Unused::Changed(what)),
        }
    }

    /// Ends it (nothing of its app ever ran) and frees its cgroup, in a
    /// task of its own: a caller that gives up waiting leaves nothing held.
    pub async fn discard(self) {
        let _ = tokio::spawn(self.end()).await;
    }

    async fn end(mut self) {
        if let Some(mut shim) = self.shim.take() {
            match shim.stop(Duration::ZERO).await {
                crate::shim::Outcome::Lost => {
                    if let Some(cg) = self.cgroup.clone() {
                        let _ = tokio::task::spawn_blocking(move || cg.kill_all()).await;
                    }
                }
                _ => crate::shim::forget_exit(&self.state_dir),
            }
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = tokio::task::spawn_blocking(move || cg.destroy()).await;
        }
    }
}

impl Drop for Ready {
    /// One dropped without [`Ready::discard`] (a caller's error path) is
    /// killed all the same: nothing may wait on for a go that never comes.
    fn drop(&mut self) {
        // The sandbox's processes are all in its cgroup; their end ends the
        // shim. Without one, bwrap is signalled only while its shim has not
        // said it ended (its pid could be another process's by then).
        if let Some(shim) = self.shim.take() {
            match &self.cgroup {
                Some(cg) => cg.kill_all(),
                None if !shim.exited() => {
                    let _ = crate::sys::signal_process(shim.pid(), nix::sys::signal::Signal::SIGKILL);
                }
                None => {}
            }
        }
    }
}
