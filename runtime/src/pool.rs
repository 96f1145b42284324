//! Parked sandboxes: starts that do not wait on the kernel's cgroup lock.
//!
//! Joining a cgroup (writing a pid into `cgroup.procs`) takes the kernel's
//! `cgroup_threadgroup_rwsem` for writing, which waits for an RCU grace
//! period: 10-16 ms of an untuned host's 25 ms start (bench/RESULTS.md). On
//! cgroup v1 `clone3(CLONE_INTO_CGROUP)` does not apply, so the wait is paid
//! ahead of time instead: a [`Pool`] keeps a few shims parked, each with its
//! sandbox process already forked and already in a fresh cgroup of its own
//! (no limits, in the receiver's group), blocked until told to go.
//!
//! A start claims a parked slot: its cgroup directories are renamed to the
//! sandbox's names (a rename moves no task, so nothing waits) and the
//! sandbox's limits are written into them, then the parked shim gets `go`
//! with the launch spec and the sandbox's descriptors, on the connection
//! the pool opened when it parked the slot; the shim writes the spec into
//! the sandbox's state directory, as for any shim, while its child starts
//! bwrap. Its child does what a fresh shim's child
//! does after its cgroup join (rlimits, session, descriptors, user, no new
//! privileges, Landlock, parent-death signal) and `exec`s bwrap with the same
//! arguments; from then on the shim is like any other (its state directory,
//! control socket, log and exit record are the sandbox's), so adoption,
//! stop, `stop-all` and "never two instances" need nothing new. A claim that
//! fails at any step before the sandbox runs kills what the slot held and
//! says why; the caller then starts the sandbox the usual way.
//!
//! What stays true: the limits are in the cgroup before `go` is sent, so
//! before the app's first instruction; a slot is taken from the queue under
//! a lock and its shim accepts one `go` only (it stops listening on its
//! parked socket), so it is never claimed twice; until `go` the parked
//! process runs only this code, as root, in a cgroup no deployment's
//! figures read (`parked-*`); parked shims die with the receiver
//! (parent-death signal, cleared at `go`), and [`clean`] (at the receiver's
//! start and in `stop-all`) kills and removes whatever slots are left.
//!
//! Both sides live here: [`Pool`] in the receiver, [`park_main`] in
//! `nx-shim --park DIR`. The shim is one thread (no async runtime), which is
//! what lets its parked child run ordinary code after the fork; the fork
//! refuses to happen otherwise ([`sys::fork_single_threaded`]).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

use crate::cgroup::{Cgroup, Driver, Limits};
use crate::process::{Command, ProcessManager, Stream};
use crate::shim::{self, Prepared, Running, Shim, ShimError, ShimSpec, CONTROL, OUT_OF_THE_WAY, SPEC};
use crate::sys;

/// What a parked shim reads from its state directory.
const PARK: &str = "park.json";
/// The most descriptors a `go` carries (seccomp, environment, Landlock).
const MAX_FDS: usize = 8;
/// Clients a parked shim keeps at once (the pool's, and a few that look).
const MAX_CLIENTS: usize = 16;
/// How long no slot is taken before the pool refills: past the forks of
/// the start that took the last one (a pooled start's are over within 5 ms
/// of its claim), and short enough that starts a few tenths of a second
/// apart, a burst of pushes or wakes, each find a parked slot (with 200 ms
/// a push every 180 ms emptied the pool: 3 of 10 started the usual way).
const REFILL_AFTER: Duration = Duration::from_millis(50);

/// A parked slot's cgroup and how its process is run.
#[derive(Debug, Serialize, Deserialize)]
struct ParkSpec {
    cgroup: Vec<PathBuf>,
    proc_root: PathBuf,
}

/// `go`: run `spec` as the shim of state directory `dir`, with the
/// descriptors attached (in this order) put on these numbers. The spec
/// travels inside it rather than through `dir`, so neither the claim nor
/// the parked child waits on a file; the shim writes it there for
/// adoption while its child starts bwrap.
#[derive(Debug, Serialize, Deserialize)]
struct Go {
    dir: PathBuf,
    fds: Vec<RawFd>,
    spec: ShimSpec,
}

/// The longest message a parked shim reads: a `go` with its spec.
const MAX_MESSAGE: u64 = 1 << 20;

/// How the receiver keeps its parked sandboxes.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// How many are kept parked; 0 keeps none.
    pub size: usize,
    /// Their state directories, one each (root's, 0700).
    pub dir: PathBuf,
    /// The shim program (`nx-shim`).
    pub shim: PathBuf,
    pub cgroups: Driver,
    /// The cgroup group the sandboxes are made in: a slot's cgroup must be
    /// renamed, so it is made under the same parent.
    pub group: String,
    /// The host's `/proc`.
    pub proc_root: PathBuf,
}

/// Why a slot could not be parked.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("cannot prepare the parked slot {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error("cannot park a sandbox in {path}: {reason}")]
    Park { path: PathBuf, reason: String },
}

/// What came of asking the pool to start a sandbox.
#[derive(Debug)]
pub enum Claim {
    /// Started from a parked slot.
    Started(Shim),
    /// None was parked: start it the usual way.
    Empty,
    /// A parked slot could not be used (why); it was killed and removed and
    /// nothing of the sandbox runs: start it the usual way.
    Unusable(String),
    /// The slot was told to go and then the start failed or could not be
    /// followed; as a fresh start's error, not to be retried another way
    /// (it could run twice).
    Failed(ShimError),
}

/// Sandboxes parked ahead of their starts; cheap to clone.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

struct Inner {
    cfg: PoolConfig,
    pm: ProcessManager,
    ready: Mutex<VecDeque<Slot>>,
    /// Told when a slot was taken, for the refill.
    taken: tokio::sync::Notify,
    next: AtomicU64,
    from_pool: AtomicU64,
    fresh: AtomicU64,
}

/// One parked sandbox.
#[derive(Debug)]
struct Slot {
    dir: PathBuf,
    cgroup: Cgroup,
    /// Connected to its shim, which said `parked`, when it was parked: a
    /// claim then sends `go` at once (connecting was a tenth of a
    /// millisecond of every pooled start).
    conn: tokio::io::BufReader<tokio::net::UnixStream>,
}

impl Slot {
    /// Kills what the slot holds (its parked process; its shim then ends
    /// too) and removes its cgroup and state directory, on a blocking
    /// thread: killing waits for the processes to go.
    async fn discard(self) {
        let Slot { dir, cgroup, conn } = self;
        drop(conn);
        remove(dir, cgroup).await;
    }

    /// Whether its shim is still there: an ended shim has closed the
    /// connection (a parked shim sends nothing after `parked`).
    /// Asked of the socket itself: tokio's `try_read` answers `WouldBlock`
    /// without a look while its reactor has not yet seen the hang-up.
    fn answers(&self) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        let fd = std::os::fd::AsRawFd::as_raw_fd(self.conn.get_ref());
        matches!(recv(fd, &mut [0u8; 1], MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT), Err(nix::errno::Errno::EAGAIN))
    }
}

/// Kills what a slot's cgroup holds (its parked process; its shim then
/// ends too) and removes the cgroup and the slot's state directory.
async fn remove(dir: PathBuf, cgroup: Cgroup) {
    let _ = tokio::task::spawn_blocking(move || {
        cgroup.destroy();
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("size", &self.0.cfg.size).field("parked", &self.parked()).finish()
    }
}

impl Pool {
    /// A pool that parks nothing until [`Pool::fill`] or [`Pool::refill`]
    /// runs. Whatever an earlier process left in `cfg.dir` must have been
    /// [`clean`]ed first.
    pub fn new(mut cfg: PoolConfig, pm: ProcessManager) -> Pool {
        // A claim moves the slot's cgroup by renaming it, which cgroup v2
        // refuses; and without cgroups there is no join to pay ahead. A
        // pool there would fail every claim and park anew for nothing.
        if cfg.size > 0 && !matches!(cfg.cgroups, Driver::V1 { .. }) {
            tracing::info!(
                size = cfg.size,
                "no sandbox pool: parked sandboxes need cgroup v1, where a cgroup can be renamed"
            );
            cfg.size = 0;
        }
        Pool(Arc::new(Inner {
            cfg,
            pm,
            ready: Mutex::new(VecDeque::new()),
            taken: tokio::sync::Notify::new(),
            next: AtomicU64::new(0),
            from_pool: AtomicU64::new(0),
            fresh: AtomicU64::new(0),
        }))
    }

    /// How many slots are parked now.
    pub fn parked(&self) -> usize {
        self.0.ready.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Starts so far: `(from a parked slot, the usual way)`.
    pub fn starts(&self) -> (u64, u64) {
        (self.0.from_pool.load(Ordering::Relaxed), self.0.fresh.load(Ordering::Relaxed))
    }

    /// Parks slots until the pool is full; returns how many are parked.
    pub async fn fill(&self) -> Result<usize, PoolError> {
        while self.parked() < self.0.cfg.size {
            let slot = self.park().await?;
            // The guard is gone before any await.
            let unqueued = match self.0.ready.lock() {
                Ok(mut ready) => {
                    ready.push_back(slot);
                    None
                }
                Err(_) => Some(slot),
            };
            if let Some(slot) = unqueued {
                slot.discard().await;
            }
        }
        Ok(self.parked())
    }

    /// Keeps the pool full, forever: refills once claims pause, and after a
    /// failure to park waits a while (saying why) rather than spin.
    pub async fn refill(self) {
        loop {
            if let Err(e) = self.fill().await {
                tracing::warn!(error = %e, "cannot park a sandbox; starts go the usual way until one is parked");
                tokio::time::sleep(Duration::from_secs(10)).await;
                continue;
            }
            self.0.taken.notified().await;
            // Parking joins a cgroup, which holds every fork on the host
            // (the claimed sandbox's bwrap among them) for an RCU grace
            // period: a refill at once would slow the very start the slot
            // was taken for. It waits until no slot was taken for a while.
            while tokio::time::timeout(REFILL_AFTER, self.0.taken.notified()).await.is_ok() {}
        }
    }

    /// Parks one slot: a fresh cgroup without limits, and a shim whose
    /// child has joined it.
    async fn park(&self) -> Result<Slot, PoolError> {
        let cfg = &self.0.cfg;
        let name = format!("parked-{}-{}", std::process::id(), self.0.next.fetch_add(1, Ordering::Relaxed));
        let dir = cfg.dir.join(&name);
        let state = |source| PoolError::State { path: dir.clone(), source };
        // The slot's record is written before its cgroup is made, so a
        // receiver killed in between leaves nothing `clean` cannot find.
        let cgroup = cfg.cgroups.prepare(&cfg.group, &name, &Limits::NONE);
        let park = ParkSpec { cgroup: cgroup.dirs().to_vec(), proc_root: cfg.proc_root.clone() };
        let recorded = shim::prepare_dir(&dir).and_then(|()| {
            let json = serde_json::to_vec(&park).map_err(std::io::Error::other)?;
            std::fs::write(dir.join(PARK), json)
        });
        if let Err(e) = recorded {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(state(e));
        }
        if let Err(e) = cgroup.create() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        let parked = async {
            let mut cmd = Command::new(&cfg.shim).arg("--park").arg(&dir);
            cmd.cwd = Some(PathBuf::from("/"));
            cmd.stdout = Stream::Pipe;
            cmd.new_session = true;
            // A parked shim dies with the receiver; at `go` it clears this
            // and outlives it like any shim.
            cmd.parent_death_signal = Some(Signal::SIGKILL);
            let failed = |reason: String| PoolError::Park { path: dir.clone(), reason };
            let mut child = self.0.pm.spawn(cmd).await.map_err(|e| failed(e.to_string()))?;
            let out = child.stdout.take().ok_or_else(|| failed("no pipe to its shim".into()))?;
            let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(out).map_err(|e| failed(e.to_string()))?;
            let mut first = String::new();
            let mut said = tokio::io::BufReader::new(pipe);
            let read = said.read_line(&mut first);
            match tokio::time::timeout(Duration::from_secs(30), read).await {
                Ok(Ok(_)) if first.starts_with("parked ") => {}
                Ok(Ok(_)) => {
                    return Err(failed(
                        first.trim().strip_prefix("error ").unwrap_or("its shim ended at once").to_owned(),
                    ))
                }
                Ok(Err(e)) => return Err(failed(e.to_string())),
                Err(_) => {
                    let _ = child.signal(Signal::SIGKILL);
                    return Err(failed("its shim said nothing within 30s".into()));
                }
            }
            let stream = tokio::net::UnixStream::connect(dir.join(CONTROL)).await.map_err(|e| failed(e.to_string()))?;
            let mut conn = tokio::io::BufReader::new(stream);
            let mut hello = String::new();
            match tokio::time::timeout(Duration::from_secs(2), conn.read_line(&mut hello)).await {
                Ok(Ok(_)) if hello.starts_with("parked ") => Ok(conn),
                _ => Err(failed("its shim does not answer its socket".into())),
            }
        };
        match parked.await {
            Ok(conn) => Ok(Slot { dir, cgroup, conn }),
            Err(e) => {
                remove(dir, cgroup).await;
                Err(e)
            }
        }
    }

    /// Starts the sandbox `spec` (state directory `dir`, cgroup `cgroup`,
    /// descriptors `fds`: copies are sent, these stay the caller's for a
    /// start the usual way) from a parked slot if one is there.
    pub async fn launch(&self, cgroup: &Cgroup, dir: &Path, spec: &ShimSpec, fds: &[(OwnedFd, RawFd)]) -> Claim {
        let slot = self.0.ready.lock().ok().and_then(|mut r| r.pop_front());
        let Some(slot) = slot else {
            self.0.fresh.fetch_add(1, Ordering::Relaxed);
            return Claim::Empty;
        };
        self.0.taken.notify_one();
        let claim = claim(slot, &self.0.cfg.shim, (cgroup, dir), spec, fds).await;
        let counter = if matches!(claim, Claim::Unusable(_)) { &self.0.fresh } else { &self.0.from_pool };
        counter.fetch_add(1, Ordering::Relaxed);
        claim
    }
}

/// Hands `slot` the sandbox: see the module's documentation.
async fn claim(
    slot: Slot,
    program: &Path,
    (cgroup, dir): (&Cgroup, &Path),
    spec: &ShimSpec,
    fds: &[(OwnedFd, RawFd)],
) -> Claim {
    let unusable = |slot: Slot, why: String| async move {
        slot.discard().await;
        Claim::Unusable(why)
    };
    // Alive and waiting since it was parked, or nothing of the sandbox is made.
    if !slot.answers() {
        let why = format!("the parked slot {} does not answer: its shim has ended", slot.dir.display());
        return unusable(slot, why).await;
    }
    // The limits are written here, before `go`.
    if let Err(e) = cgroup.claim(&slot.cgroup) {
        let left = cgroup.claim_leftovers(&slot.cgroup);
        let _ = tokio::task::spawn_blocking(move || left.destroy()).await;
        return unusable(slot, e.to_string()).await;
    }
    let Slot { dir: slot_dir, mut conn, .. } = slot;
    let sent = (|| {
        let go = Go { dir: dir.to_owned(), fds: fds.iter().map(|(_, n)| *n).collect(), spec: spec.clone() };
        let mut msg = serde_json::to_vec(&go).map_err(|e| e.to_string())?;
        msg.push(b'\n');
        let borrowed: Vec<_> = fds.iter().map(|(fd, _)| fd.as_fd()).collect();
        sys::send_fds(conn.get_ref().as_fd(), &msg, &borrowed).map_err(|e| format!("cannot send go: {e}"))
    })();
    if let Err(why) = sent {
        // Nothing was told to go: the sandbox's cgroup (now under its own
        // name) stays for the usual start.
        let target = cgroup.clone();
        let _ = tokio::task::spawn_blocking(move || target.kill_all()).await;
        let _ = std::fs::remove_dir_all(&slot_dir);
        return Claim::Unusable(why);
    }
    let _ = std::fs::remove_dir_all(&slot_dir);
    // Told to go, the slot's shim is this sandbox's: whatever goes wrong
    // now fails the start as a fresh start's failure would, and is never
    // followed by a start the usual way (two shims would share the state
    // directory, and the sandbox could run twice).
    let failed = |reason: String| {
        let target = cgroup.clone();
        async move {
            let _ = tokio::task::spawn_blocking(move || target.kill_all()).await;
            Claim::Failed(ShimError::Start { program: program.display().to_string(), reason })
        }
    };
    let mut reply = String::new();
    match tokio::time::timeout(Duration::from_secs(30), conn.read_line(&mut reply)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return failed(format!("no answer to go: {e}")).await,
        Err(_) => return failed("no answer to go within 30s".into()).await,
    }
    let pid = match reply.trim_end().strip_prefix("started ").map(str::parse::<i32>) {
        Some(Ok(pid)) => pid,
        _ => match reply.trim_end().strip_prefix("error ") {
            Some(words) => return Claim::Failed(ShimError::Sandbox(words.to_owned())),
            None => return failed(format!("its shim said {:?} to go", reply.trim_end())).await,
        },
    };
    // An app that exits at once may be gone before the connection: its
    // recorded end is handed back, never a second start.
    match Shim::attach_started(dir, pid).await {
        Some(shim) => Claim::Started(shim),
        None => Claim::Failed(ShimError::Start {
            program: program.display().to_string(),
            reason: "its control socket does not answer".into(),
        }),
    }
}

/// Ends and removes every parked slot under `dir` (a receiver's that is no
/// longer running: at its next start, or `stop-all`); returns how many were
/// there. A slot whose shim had been told `go` is a sandbox's shim by now
/// and is left to that sandbox's own state directory.
pub fn clean(dir: &Path) -> usize {
    let mut cleaned = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let slot = entry.path();
        // A shim still parked kills its child and ends when told `stop`.
        if let Ok(mut s) = UnixStream::connect(slot.join(CONTROL)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"stop\n");
            let _ = s.read_to_end(&mut Vec::new());
        }
        if let Some(park) =
            std::fs::read(slot.join(PARK)).ok().and_then(|b| serde_json::from_slice::<ParkSpec>(&b).ok())
        {
            Cgroup::from_dirs(park.cgroup).destroy();
        }
        let _ = std::fs::remove_dir_all(&slot);
        cleaned += 1;
    }
    cleaned
}

/// `nx-shim --park DIR`: parks a sandbox as `DIR/park.json` says, prints
/// `parked <pid>` (or `error <why>`), waits for `go` and runs that life.
/// Returns the exit code.
pub fn park_main(dir: &Path) -> i32 {
    let spec = std::fs::read(dir.join(PARK)).ok().and_then(|b| serde_json::from_slice::<ParkSpec>(&b).ok());
    let Some(spec) = spec else {
        return shim::say_error(&format!("cannot read {}", dir.join(PARK).display()));
    };
    match Parked::park(dir, &spec) {
        Ok(parked) => {
            println!("parked {}", parked.child);
            let _ = std::io::stdout().flush();
            parked.wait()
        }
        Err(e) => shim::say_error(&e.to_string()),
    }
}

/// A parked shim: its child waits in its cgroup on `channel`.
struct Parked {
    child: i32,
    channel: UnixStream,
    output: std::fs::File,
    listener: UnixListener,
    sigchld: UnixStream,
}

/// Reads one line (without its `\n`) of at most a few kilobytes, byte by
/// byte so nothing after it is taken; empty at end of file.
fn read_line(from: &mut impl Read) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 && from.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Reads one message: a line (`stop`, or `go` and its spec) and the
/// descriptors that came with its first bytes; empty at end of file. The
/// first read is as the socket is set (a parked shim's clients do not
/// block: `WouldBlock` says nothing came); a message longer than that read
/// is read to its newline within a few seconds.
fn read_message(socket: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use std::io::BufRead;
    let mut msg = vec![0u8; 64 * 1024];
    let (n, fds) = sys::receive_fds::<MAX_FDS>(socket.as_fd(), &mut msg)?;
    msg.truncate(n);
    if n > 0 && !msg.ends_with(b"\n") {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut rest = std::io::BufReader::new(socket.take(MAX_MESSAGE));
        rest.read_until(b'\n', &mut msg)?;
        if !msg.ends_with(b"\n") {
            return Err(std::io::Error::other("a message to a parked shim ended before its newline"));
        }
    }
    Ok((msg, fds))
}

impl Parked {
    fn park(dir: &Path, spec: &ParkSpec) -> std::io::Result<Parked> {
        let sigchld = shim::watch_children()?;
        let control = dir.join(CONTROL);
        let _ = std::fs::remove_file(&control);
        let listener = UnixListener::bind(&control)?;
        listener.set_nonblocking(true)?;
        let (output, output_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (mut channel, theirs) = UnixStream::pair()?;
        let shim_pid = std::process::id() as i32;
        let Some(child) = sys::fork_single_threaded(&spec.proc_root)? else {
            drop((listener, output, channel));
            parked_child(spec, theirs, output_tx, shim_pid)
        };
        drop((theirs, output_tx));
        channel.set_read_timeout(Some(Duration::from_secs(30)))?;
        let said = read_line(&mut channel)?;
        if said != "joined" {
            let _ = sys::signal_process(child, Signal::SIGKILL);
            let why = said.strip_prefix("error ").unwrap_or("it ended before joining its cgroup");
            return Err(std::io::Error::other(format!("the parked process: {why}")));
        }
        channel.set_read_timeout(None)?;
        Ok(Parked { child, channel, output: std::fs::File::from(output), listener, sigchld })
    }

    /// Waits parked until `go` (then runs the sandbox's life), `stop`, or the
    /// parked process's end. Every client that connects hears `parked
    /// <pid>` and may then send one of the two, at any time: the pool
    /// keeps its connection from parking until its claim.
    fn wait(self) -> i32 {
        let mut clients: Vec<UnixStream> = Vec::new();
        loop {
            let mut watched = vec![self.listener.as_fd(), self.sigchld.as_fd()];
            watched.extend(clients.iter().map(AsFd::as_fd));
            let _ = sys::wait_readable(&watched, 1000);
            let mut scratch = [0u8; 64];
            while matches!((&self.sigchld).read(&mut scratch), Ok(n) if n > 0) {}
            while let Some((pid, _)) = sys::reap_one() {
                if pid == self.child {
                    return 1;
                }
            }
            if let Ok((mut client, _)) = self.listener.accept() {
                // Only root reaches the socket; the bound keeps a stuck
                // client from taking every descriptor.
                let hello = format!("parked {}\n", self.child);
                if clients.len() < MAX_CLIENTS
                    && client.set_nonblocking(true).is_ok()
                    && client.write_all(hello.as_bytes()).is_ok()
                {
                    clients.push(client);
                }
            }
            let mut i = 0;
            while i < clients.len() {
                match read_message(&clients[i]) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => i += 1,
                    // A look, or a client gone: stay parked.
                    Ok((msg, _)) if msg.is_empty() => drop(clients.swap_remove(i)),
                    Err(_) => drop(clients.swap_remove(i)),
                    Ok((msg, _)) if msg.starts_with(b"stop") => {
                        let _ = sys::signal_process(self.child, Signal::SIGKILL);
                        return 0;
                    }
                    Ok((msg, fds)) => {
                        let client = clients.swap_remove(i);
                        return self.go(client, &msg, fds);
                    }
                }
            }
        }
    }

    /// Hands the parked child the sandbox and runs its life as any shim
    /// does; the claimer hears `started <pid>` or `error <why>`.
    fn go(self, mut client: UnixStream, msg: &[u8], fds: Vec<OwnedFd>) -> i32 {
        let Parked { child, channel, output, listener, sigchld } = self;
        // One `go` only: nobody else reaches this slot from now on.
        drop(listener);
        let started = (|| -> std::io::Result<(Go, Prepared, Option<sys::ListenNotices>)> {
            client.set_nonblocking(false)?;
            let go: Go = serde_json::from_slice(msg).map_err(std::io::Error::other)?;
            // From here on it is a sandbox's shim: it outlives the receiver.
            sys::clear_parent_death_signal()?;
            let oom_before = go.spec.cgroup().oom_kills();
            let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
            sys::send_fds(channel.as_fd(), msg, &borrowed)?;
            // The secrets and rules are the sandbox's now; the shim keeps none.
            drop(fds);
            // What a receiver that restarts finds this sandbox by, written
            // while the child starts bwrap; before `started`, so a claimer
            // never sees a sandbox without it.
            shim::write_spec(&go.dir, &go.spec).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot write {}: {e}", go.dir.join(SPEC).display()))
            })?;
            // Made while the child starts bwrap rather than before: the app's
            // output waits in its pipe, and the claimer connects to the
            // control socket only once it hears `started`. Should either
            // fail (a full disk, no descriptors left), the app has run for
            // a moment: it is killed, and the claimer hears the error and
            // empties the cgroup, as after any failed start.
            let prepared = Prepared::open(&go.dir, &go.spec, oom_before)?;
            // The child's end closes when it `exec`s, after the descriptor
            // of its `listen` filter; words mean it could not.
            let (notices, first) = shim::listen_notices(&channel)?;
            let said = String::from_utf8_lossy(&first).into_owned() + &read_line(&mut &channel)?;
            if !said.is_empty() {
                return Err(std::io::Error::other(said.strip_prefix("error ").unwrap_or(&said).to_owned()));
            }
            Ok((go, prepared, notices))
        })();
        let (go, prepared, notices) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = sys::signal_process(child, Signal::SIGKILL);
                let _ = client.write_all(format!("error {}\n", e.to_string().replace('\n', " ")).as_bytes());
                return 1;
            }
        };
        let mut running = match Running::new(&go.dir, &go.spec, (child, Some(output)), sigchld, prepared, notices) {
            Ok(r) => r,
            Err(e) => {
                let _ = sys::signal_process(child, Signal::SIGKILL);
                let _ = client.write_all(format!("error {e}\n").as_bytes());
                return 1;
            }
        };
        let _ = client.write_all(format!("started {}\n", running.pid()).as_bytes());
        drop(client);
        running.run();
        0
    }
}

/// The parked process, forked from a one-thread shim: joins the cgroup,
/// waits for `go`, puts the sandbox's descriptors on their numbers and
/// `exec`s bwrap as a fresh shim's child would. Never returns; a failure is
/// one line `error <why>` to the shim.
fn parked_child(spec: &ParkSpec, channel: UnixStream, output: OwnedFd, shim_pid: i32) -> ! {
    let channel = match sys::renumber_above(channel.into(), OUT_OF_THE_WAY) {
        Ok(fd) => UnixStream::from(fd),
        Err(_) => sys::exit_now(1),
    };
    let fail = |e: std::io::Error| -> ! {
        let _ = (&channel).write_all(format!("error {}\n", e.to_string().replace('\n', " ")).as_bytes());
        sys::exit_now(1)
    };
    // Dies with the shim, parked or not.
    if let Err(e) = sys::restore_parent_death_signal(libc::SIGKILL, shim_pid) {
        fail(e)
    }
    // The wait this pool exists for, paid while nobody waits.
    for procs in Cgroup::from_dirs(spec.cgroup.clone()).procs_files() {
        if let Err(e) = std::fs::write(&procs, "0") {
            fail(std::io::Error::new(e.kind(), format!("cannot join {}: {e}", procs.display())))
        }
    }
    if let Err(e) = sys::place_fd(output, 1).and_then(|()| (&channel).write_all(b"joined\n")) {
        fail(e)
    }
    let (msg, fds) = match read_message(&channel) {
        Ok(got) => got,
        Err(e) => fail(e),
    };
    if msg.is_empty() {
        // The shim ended or stopped it: nothing was ever run.
        sys::exit_now(0);
    }
    let e = match exec_sandbox(&msg, fds, std::os::fd::AsRawFd::as_raw_fd(&channel)) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    fail(e)
}

/// The part of [`parked_child`] after `go`: returns only on failure. The
/// `listen` filter's descriptor goes to the shim on `channel`.
fn exec_sandbox(msg: &[u8], fds: Vec<OwnedFd>, channel: RawFd) -> std::io::Result<std::convert::Infallible> {
    let go: Go = serde_json::from_slice(msg).map_err(std::io::Error::other)?;
    if fds.len() != go.fds.len() {
        return Err(std::io::Error::other(format!("{} descriptors came for {} numbers", fds.len(), go.fds.len())));
    }
    // First all out of the way, then onto their numbers: none lands on
    // another that is still to be placed.
    let fds = fds.into_iter().map(|fd| sys::renumber_above(fd, OUT_OF_THE_WAY)).collect::<Result<Vec<_>, _>>()?;
    for (fd, target) in fds.into_iter().zip(&go.fds) {
        sys::place_fd(fd, *target)?;
    }
    let (cmd, _held) = shim::sandbox_command(&go.spec, true, Some(channel), None)?;
    let e = cmd.exec();
    Err(std::io::Error::new(e.kind(), format!("cannot start {}: {e}", go.spec.program.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_cgroup_v1_hosts_park_sandboxes() {
        let pm = ProcessManager::global().unwrap();
        let cfg = |cgroups| PoolConfig {
            size: 2,
            dir: "/nonexistent".into(),
            shim: "/nonexistent/nx-shim".into(),
            cgroups,
            group: "nx".into(),
            proc_root: "/proc".into(),
        };
        let v1 = Driver::V1 { memory: Some("/sys/fs/cgroup/memory".into()), cpu: None, pids: None };
        let v2 = Driver::V2 { root: "/sys/fs/cgroup".into(), controllers: vec!["memory".into()] };
        assert_eq!(Pool::new(cfg(v1), pm.clone()).0.cfg.size, 2);
        assert_eq!(Pool::new(cfg(v2), pm.clone()).0.cfg.size, 0, "v2 refuses the claim's rename");
        assert_eq!(Pool::new(cfg(Driver::None), pm).0.cfg.size, 0, "no cgroup join to pay ahead");
    }
}
