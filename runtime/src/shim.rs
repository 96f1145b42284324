//! The shim: one small process per sandbox life that owns the sandbox, so the
//! sandbox does not belong to the receiver's process and a receiver restart (or
//! upgrade, or crash) stops no app. As containerd's shim and conmon do, it is
//! the sandbox's parent (and a child subreaper, so the sandbox's orphans stay
//! its own), owns the pipe the sandbox writes its output to and writes the
//! deployment's log, stops the sandbox on request, and records how it ended.
//!
//! It runs one life: the restart policy, health checks and states stay in the
//! receiver, which starts a new shim for each life. A shim is thus a loop over
//! `poll` with no runtime and no policy, and a crash while the receiver is
//! away waits for the receiver (seconds, during an upgrade) with its exit
//! recorded, rather than putting the policy in two places.
//!
//! Its state directory (root's, 0700) holds `spec.json` (what to run; no
//! secret: the app's environment comes by descriptor), `control.sock` while
//! it runs, and `exit` once the sandbox has ended. On the control socket the
//! shim says `running <pid>` to every client that connects and `exited <raw
//! wait status> <oom kills>` when the sandbox has ended; a client may send
//! `stop <grace in ms>`. A receiver that starts finds a live shim by
//! connecting: that is how it re-attaches. A shim killed outright takes its
//! sandbox along (parent-death signal), and whoever finds the cgroup still
//! populated without a shim kills what is in it: never two instances.

use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cgroup::Cgroup;
use crate::logs::{Log, LogLimits};
use crate::output::{self, Output};
use crate::process::{Command, ProcessManager, Stream};
use crate::supervisor::{children_of, describe_exit};
use crate::sys::{self, ChildSetup, Rlimit};

/// The descriptor a shim gets the sandbox's Landlock ruleset on (its
/// seccomp program and environment come on bwrap's own numbers).
pub const LANDLOCK_FD: RawFd = 12;

pub(crate) const SPEC: &str = "spec.json";
pub(crate) const CONTROL: &str = "control.sock";
const EXIT: &str = "exit";

/// What a shim runs: bwrap's command line and how to start it. No secret:
/// the app's environment reaches the shim by descriptor only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `(uid, gid)` the sandbox runs as.
    pub user: (u32, u32),
    pub rlimits: Vec<Rlimit>,
    /// The sandbox's cgroup directories: it joins them, and they say what
    /// is left of it.
    pub cgroup: Vec<PathBuf>,
    /// Descriptors the shim inherited and hands on at the same numbers.
    pub pass_fds: Vec<RawFd>,
    /// Whether a Landlock ruleset waits on [`LANDLOCK_FD`].
    pub landlock: bool,
    pub log: PathBuf,
    pub log_max_file_bytes: u64,
    pub log_keep_rotated: u32,
    /// The host's `/proc`.
    pub proc_root: PathBuf,
    /// The app's port: the sandbox's `listen` calls go to the shim, which
    /// allows them for unix sockets and this port alone ([`crate::listen`]).
    /// None (a spec of an earlier receiver's) leaves `listen` alone.
    #[serde(default)]
    pub listen_port: Option<u16>,
    /// Whether the sandbox is made and held ready: its nx-init (whose
    /// command names [`crate::spec::GO_FD`]) gets the read end of a pipe
    /// there and starts the app only when a client of the shim says `go`,
    /// and the shim writes it the byte. The shim dies with its launcher
    /// until then, and its death ends the sandbox without the app.
    #[serde(default)]
    pub hold: bool,
}

impl ShimSpec {
    /// The sandbox's cgroup.
    pub fn cgroup(&self) -> Cgroup {
        Cgroup::from_dirs(self.cgroup.clone())
    }
}

/// How a sandbox's life ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The raw wait status of bwrap's outer process.
    pub raw: i32,
    /// Processes the kernel killed in its cgroup for memory during this life.
    pub oom_kills: u64,
}

impl Exit {
    pub fn status(&self) -> ExitStatus {
        ExitStatus::from_raw(self.raw)
    }

    /// "status 3", or "signal 9 (SIGKILL), killed for memory".
    pub fn describe(&self) -> String {
        let status = describe_exit(self.status());
        if self.oom_kills > 0 {
            format!("{status}, killed for memory ({} OOM kills in its cgroup)", self.oom_kills)
        } else {
            status
        }
    }

    fn encode(&self) -> String {
        format!("exited {} {}", self.raw, self.oom_kills)
    }

    fn decode(line: &str) -> Option<Exit> {
        let mut words = line.trim().strip_prefix("exited ")?.split(' ');
        let raw = words.next()?.parse().ok()?;
        let oom_kills = words.next()?.parse().ok()?;
        Some(Exit { raw, oom_kills })
    }
}

/// Why a shim could not start its sandbox.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("cannot prepare the shim's directory {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error("cannot start the shim {program}: {reason}")]
    Start { program: String, reason: String },
    /// The shim ran but could not start the sandbox; its words.
    #[error("{0}")]
    Sandbox(String),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// The spec a shim in `dir` runs (or ran), if it is readable.
pub fn read_spec(dir: &Path) -> Option<ShimSpec> {
    serde_json::from_slice(&std::fs::read(dir.join(SPEC)).ok()?).ok()
}

/// How the last life run from `dir` ended, if its shim recorded it.
pub fn last_exit(dir: &Path) -> Option<Exit> {
    Exit::decode(&std::fs::read_to_string(dir.join(EXIT)).ok()?)
}

/// The nice value a held sandbox ([`ShimSpec::hold`]) runs at until `go`.
pub const HELD_NICE: i32 = 10;

/// Forgets the exit record in state directory `dir`: a sandbox made ready
/// and discarded ran nothing of the app, and a later start must not read
/// its end as the app's.
pub(crate) fn forget_exit(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(EXIT));
}

/// Ends whatever runs from the state directory `dir`: stops its shim's
/// sandbox (SIGKILL after `grace`), then kills what its cgroup still holds
/// and removes the cgroup. Returns whether a shim was running.
pub async fn stop_dir(dir: &Path, grace: Duration) -> bool {
    let running = match Shim::attach(dir).await {
        Some(mut shim) => {
            shim.stop(grace).await;
            true
        }
        None => false,
    };
    if let Some(spec) = read_spec(dir) {
        let cgroup = spec.cgroup();
        let _ = tokio::task::spawn_blocking(move || cgroup.destroy()).await;
    }
    running
}

/// What the receiver holds of a running shim: the connection to its control
/// socket. Dropping it leaves the shim and its sandbox running.
#[derive(Debug)]
pub struct Shim {
    pid: i32,
    exit: watch::Receiver<Option<Outcome>>,
    /// `None` for a life that had ended before it could be reached.
    control: Option<tokio::net::unix::OwnedWriteHalf>,
}

/// How a connection to a shim ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The sandbox ended so.
    Exited(Exit),
    /// The shim went away without saying (killed): its sandbox died with it
    /// unless something of it slipped away, which only its cgroup can tell.
    Lost,
}

/// A handle to wait for a shim's outcome without the connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct ExitProbe(watch::Receiver<Option<Outcome>>);

impl ExitProbe {
    pub fn exited(&self) -> bool {
        self.0.borrow().is_some()
    }
}

impl Shim {
    /// Starts a shim running `spec` from `dir` with `fds` (moved onto their
    /// numbers), and connects to it once it has started the sandbox.
    pub async fn launch(
        pm: &ProcessManager,
        program: &Path,
        dir: &Path,
        spec: &ShimSpec,
        fds: Vec<(OwnedFd, RawFd)>,
    ) -> Result<Shim, ShimError> {
        write_spec(dir, spec).map_err(|source| ShimError::State { path: dir.to_owned(), source })?;
        let mut cmd = Command::new(program).arg(dir);
        cmd.pass_fds = fds;
        cmd.cwd = Some(PathBuf::from("/"));
        cmd.stdout = Stream::Pipe;
        // Its own session and no parent-death signal: it outlives the
        // receiver. A held one dies with it until `go` (nothing of the
        // sandbox runs yet, and no later receiver would know it).
        cmd.new_session = true;
        cmd.parent_death_signal = spec.hold.then_some(Signal::SIGKILL);
        let describe = program.display().to_string();
        let start = |reason: String| ShimError::Start { program: describe.clone(), reason };
        let mut child = pm.spawn(cmd).await.map_err(|e| start(e.to_string()))?;
        let out = child.stdout.take().ok_or_else(|| start("no pipe to it".into()))?;
        let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(out).map_err(|e| start(e.to_string()))?;
        let mut first = String::new();
        let mut said = tokio::io::BufReader::new(pipe);
        let read = tokio::io::AsyncBufReadExt::read_line(&mut said, &mut first);
        match tokio::time::timeout(Duration::from_secs(30), read).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(start(e.to_string())),
            Err(_) => {
                let _ = child.signal(Signal::SIGKILL);
                return Err(start("it said nothing within 30s".into()));
            }
        }
        if let Some(words) = first.trim_end().strip_prefix("error ") {
            return Err(ShimError::Sandbox(words.to_owned()));
        }
        let Some(pid) = first.trim_end().strip_prefix("started ").and_then(|p| p.parse().ok()) else {
            let status = child.wait().await;
            return Err(start(format!("it exited ({}) before starting the sandbox", describe_exit(status))));
        };
        Shim::attach_started(dir, pid).await.ok_or_else(|| start("its control socket does not answer".into()))
    }

    /// Connects to the shim in `dir` that has just said it started its
    /// sandbox as `pid`, or hands back the life it has already ended.
    pub(crate) async fn attach_started(dir: &Path, pid: i32) -> Option<Shim> {
        match Shim::attach(dir).await {
            Some(shim) => Some(shim),
            None => Shim::ended(dir, pid),
        }
    }

    /// The life a shim in `dir` ran as `pid` and has already ended: an app
    /// that exits at once can be gone before its launcher connects, and its
    /// shim has then recorded how it ended and removed its socket. Reading
    /// the record gives the launcher the app's own ending instead of a
    /// connection error.
    fn ended(dir: &Path, pid: i32) -> Option<Shim> {
        let record = std::fs::read_to_string(dir.join(EXIT)).ok()?;
        // An earlier life's shim still ending could have written one.
        if record.split(' ').nth(3).and_then(|p| p.trim().parse::<i32>().ok()) != Some(pid) {
            return None;
        }
        let exit = Exit::decode(&record)?;
        let (_, exit_rx) = watch::channel(Some(Outcome::Exited(exit)));
        Some(Shim { pid, exit: exit_rx, control: None })
    }

    /// Connects to the shim running in `dir`; `None` when none runs there.
    pub async fn attach(dir: &Path) -> Option<Shim> {
        let stream = tokio::net::UnixStream::connect(dir.join(CONTROL)).await.ok()?;
        let (read, control) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(read);
        let mut first = String::new();
        let said =
            tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut first))
                .await;
        let pid = match said {
            Ok(Ok(_)) => first.trim().strip_prefix("running ")?.parse().ok()?,
            _ => return None,
        };
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let mut line = String::new();
            let outcome = loop {
                line.clear();
                match tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line).await {
                    Ok(0) | Err(_) => break Outcome::Lost,
                    Ok(_) => {
                        if let Some(exit) = Exit::decode(&line) {
                            break Outcome::Exited(exit);
                        }
                    }
                }
            };
            let _ = tx.send(Some(outcome));
        });
        Some(Shim { pid, exit, control: Some(control) })
    }

    /// The sandbox's pid (bwrap's outer process) on the host.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    pub fn probe(&self) -> ExitProbe {
        ExitProbe(self.exit.clone())
    }

    /// Waits until the sandbox has ended or the shim is gone; cancel-safe.
    pub async fn wait(&mut self) -> Outcome {
        match self.exit.wait_for(Option::is_some).await {
            Ok(o) => o.unwrap_or(Outcome::Lost),
            Err(_) => Outcome::Lost,
        }
    }

    /// Tells the shim of a held sandbox ([`ShimSpec::hold`]) to let it run.
    pub async fn go(&mut self) -> std::io::Result<()> {
        let control = self.control.as_mut().ok_or_else(|| std::io::Error::other("its shim has ended"))?;
        tokio::io::AsyncWriteExt::write_all(control, b"go\n").await
    }

    /// Asks the shim to stop the sandbox (SIGTERM to the app, SIGKILL after
    /// `grace`) and waits for the outcome, at most `grace` and 10s more.
    pub async fn stop(&mut self, grace: Duration) -> Outcome {
        let ask = format!("stop {}\n", grace.as_millis());
        let Some(control) = &mut self.control else { return self.wait().await };
        if tokio::io::AsyncWriteExt::write_all(control, ask.as_bytes()).await.is_err() {
            return self.wait().await;
        }
        tokio::time::timeout(grace + Duration::from_secs(10), self.wait()).await.unwrap_or(Outcome::Lost)
    }
}

/// Where a child's own descriptors go, above those it hands on at fixed
/// numbers.
pub(crate) const OUT_OF_THE_WAY: RawFd = 64;

/// What a child said on `socket` once it `exec`ed (its end closed) or
/// failed: its `listen` filter's descriptor, which comes first with the
/// byte `L` (none on a kernel without user notifications), and the words
/// after it, a failure's.
pub(crate) fn listen_notices(socket: &UnixStream) -> std::io::Result<(Option<sys::ListenNotices>, Vec<u8>)> {
    let mut first = [0u8; 1];
    let (n, mut fds) = match sys::receive_fds::<1>(socket.as_fd(), &mut first) {
        Ok(got) => got,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok((None, Vec::new())),
        Err(e) => return Err(e),
    };
    if n == 1 && first[0] == b'L' {
        return Ok((fds.pop().map(sys::ListenNotices::new), Vec::new()));
    }
    Ok((None, first[..n].to_vec()))
}

/// What a shim is started with: its state directory `dir`, cleared of an
/// earlier life's socket and exit, and the spec it runs.
pub(crate) fn write_spec(dir: &Path, spec: &ShimSpec) -> std::io::Result<()> {
    prepare_dir(dir)?;
    let json = serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(SPEC), json)
}

/// Makes `dir` root's alone and clears what an earlier life left there.
pub(crate) fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for name in [CONTROL, EXIT] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The shim's program: runs the spec in `dir` and returns its exit code.
/// Before the sandbox runs, a failure is one line `error <why>` on stdout;
/// once it runs, `started <pid>`.
pub fn main(dir: &Path) -> i32 {
    let spec = match read_spec(dir) {
        Some(s) => s,
        None => return say_error(&format!("cannot read {}", dir.join(SPEC).display())),
    };
    match Running::start(dir, &spec) {
        Ok(mut running) => {
            println!("started {}", running.pid);
            let _ = std::io::stdout().flush();
            running.run();
            0
        }
        Err(e) => say_error(&e.to_string()),
    }
}

pub(crate) fn say_error(words: &str) -> i32 {
    println!("error {}", words.replace('\n', " "));
    let _ = std::io::stdout().flush();
    1
}

/// A sandbox the shim started and watches.
pub(crate) struct Running<'a> {
    dir: &'a Path,
    spec: &'a ShimSpec,
    pid: i32,
    log: Log,
    output: Option<std::fs::File>,
    /// The app's output not yet stored, and its budget.
    taken: Output,
    /// The pipe is read again from then on ([`output::TURN_GAP`]).
    next_turn: Instant,
    listener: UnixListener,
    clients: Vec<UnixStream>,
    sigchld: UnixStream,
    cgroup: Cgroup,
    oom_before: u64,
    status: Option<(i32, Instant)>,
    stopping: Option<Stopping>,
    /// The sandbox's `listen` calls, whose they are, and how many more may
    /// be answered this second.
    listens: Option<(sys::ListenNotices, crate::listen::Sandbox, crate::listen::Budget)>,
    /// A held sandbox's pipe to its nx-init, until `go` writes its byte.
    block: Option<OwnedFd>,
    /// Stopped while held: nothing of the sandbox's program ever ran.
    discarded: bool,
}

/// Where a requested stop is.
struct Stopping {
    grace: Duration,
    since: Instant,
    killed: Option<Instant>,
}

/// Makes this process the reaper of its sandbox's orphans and returns the
/// socket that gets a byte on every SIGCHLD.
pub(crate) fn watch_children() -> std::io::Result<UnixStream> {
    sys::set_child_subreaper()?;
    let (sig_tx, sigchld) = UnixStream::pair()?;
    sigchld.set_nonblocking(true)?;
    sys::notify_on_sigchld(sig_tx)?;
    Ok(sigchld)
}

/// What a shim holds ready before its sandbox runs: the control socket in
/// its state directory, the log, and the cgroup's OOM kills so far (this
/// life counts its own).
pub(crate) struct Prepared {
    listener: UnixListener,
    log: Log,
    cgroup: Cgroup,
    oom_before: u64,
}

impl Prepared {
    /// `oom_before` is the cgroup's count of OOM kills from before the
    /// sandbox's first process ran, so that only its own OOM kills count.
    pub(crate) fn open(dir: &Path, spec: &ShimSpec, oom_before: u64) -> std::io::Result<Prepared> {
        let control = dir.join(CONTROL);
        let _ = std::fs::remove_file(&control);
        let listener = UnixListener::bind(&control)?;
        listener.set_nonblocking(true)?;
        let limits = LogLimits { max_file_bytes: spec.log_max_file_bytes, keep_rotated: spec.log_keep_rotated };
        let log = Log::open_writer(&spec.log, limits)?;
        Ok(Prepared { listener, log, cgroup: spec.cgroup(), oom_before })
    }
}

/// bwrap's command for `spec` as the shim runs it, and the descriptors it
/// hands on (the shim's to drop once it runs: the secrets and rules are the
/// sandbox's then). The child joins the sandbox's cgroup first unless it is
/// `parked` (then it joined when it was parked, and it `exec`s in place).
/// Its stdin is `/dev/null` (among the descriptors held).
///
/// With `notices`, a socket of the child's, the child sends the shim its
/// `listen` filter's descriptor on it ([`crate::listen`]). With `block`,
/// the read end of a pipe, the sandbox's nx-init gets it on
/// [`crate::spec::GO_FD`].
pub(crate) fn sandbox_command(
    spec: &ShimSpec,
    parked: bool,
    notices: Option<RawFd>,
    block: Option<RawFd>,
) -> std::io::Result<(sys::Spawn, Vec<OwnedFd>)> {
    let mut held: Vec<OwnedFd> = spec.pass_fds.iter().map(|fd| sys::inherited_fd(*fd)).collect::<Result<_, _>>()?;
    let landlock = spec.landlock.then(|| sys::inherited_fd(LANDLOCK_FD)).transpose()?;
    let cgroup_procs = if parked {
        Vec::new()
    } else {
        spec.cgroup()
            .procs_files()
            .iter()
            .map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other))
            .collect::<Result<_, _>>()?
    };
    let setup = ChildSetup {
        cgroup_procs,
        // Held, its setup runs beside the work that asked for it (a push's
        // upload, a sleep) and yields the CPU to it; `go` gives it back.
        nice: block.map(|_| HELD_NICE),
        rlimits: spec.rlimits.clone(),
        new_session: true,
        // stderr joins stdout, in order; the rest keep their numbers.
        fd_moves: std::iter::once((1, 2))
            .chain(spec.pass_fds.iter().map(|fd| (*fd, *fd)))
            .chain(block.map(|fd| (fd, crate::spec::GO_FD)))
            .collect(),
        user: Some(spec.user),
        // The shim is one thread that lives as long as the sandbox: a
        // shim killed outright takes its sandbox along.
        parent_death_signal: Some(libc::SIGKILL),
        landlock: landlock.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
        exec_in_place: parked,
        listen_notice: notices.zip(crate::seccomp::Arch::host()).and_then(|(socket, arch)| {
            spec.listen_port.map(|_| (socket, crate::seccomp::to_bytes(&crate::seccomp::listen_filter(arch))))
        }),
    };
    let program = spec.program.as_os_str();
    let args: Vec<std::ffi::OsString> = spec.args.iter().map(Into::into).collect();
    let env: Vec<(std::ffi::OsString, std::ffi::OsString)> =
        spec.env.iter().map(|(k, v)| (k.into(), v.into())).collect();
    let mut cmd = sys::Spawn::new(program, &args, &env, setup)?;
    cmd.current_dir(Path::new("/"))?;
    let null = sys::renumber_above(std::fs::File::open("/dev/null")?.into(), 3)?;
    cmd.stdio(0, std::os::fd::AsRawFd::as_raw_fd(&null));
    held.push(null);
    held.extend(landlock);
    Ok((cmd, held))
}

impl<'a> Running<'a> {
    fn start(dir: &'a Path, spec: &'a ShimSpec) -> std::io::Result<Running<'a>> {
        let sigchld = watch_children()?;
        let prepared = Prepared::open(dir, spec, spec.cgroup().oom_kills())?;
        let (notices, theirs) = match spec.listen_port {
            Some(_) => {
                let (ours, theirs) = UnixStream::pair()?;
                (Some(ours), Some(sys::renumber_above(theirs.into(), OUT_OF_THE_WAY)?))
            }
            None => (None, None),
        };
        // The shim alone holds the write end: the child gets the read end
        // on `GO_FD`, from a number no other descriptor moves to.
        let block = match spec.hold {
            true => {
                let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
                Some((sys::renumber_above(read, OUT_OF_THE_WAY)?, write))
            }
            false => None,
        };
        let (mut cmd, held) = sandbox_command(
            spec,
            false,
            theirs.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
            block.as_ref().map(|(read, _)| std::os::fd::AsRawFd::as_raw_fd(read)),
        )?;
        let (output, to_output) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let to_output = sys::renumber_above(to_output, 3)?;
        cmd.stdio(1, std::os::fd::AsRawFd::as_raw_fd(&to_output));
        // The loop reaps it with waitpid(-1).
        let pid = cmd
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {}: {e}", spec.program.display())))?;
        let block = block.map(|(read, write)| {
            drop(read);
            write
        });
        drop((held, to_output, theirs));
        // Sent before the child's `exec`, which `spawn` has waited for; none
        // on a kernel without user notifications.
        let notices = match notices {
            Some(ours) => {
                ours.set_nonblocking(true)?;
                listen_notices(&ours)?.0
            }
            None => None,
        };
        let mut running =
            Running::new(dir, spec, (pid, Some(std::fs::File::from(output))), sigchld, prepared, notices)?;
        running.block = block;
        Ok(running)
    }

    /// The shim's hold on its running sandbox `pid` whose output comes on
    /// `output`.
    pub(crate) fn new(
        dir: &'a Path,
        spec: &'a ShimSpec,
        (pid, output): (i32, Option<std::fs::File>),
        sigchld: UnixStream,
        prepared: Prepared,
        notices: Option<sys::ListenNotices>,
    ) -> std::io::Result<Running<'a>> {
        if let Some(o) = &output {
            sys::set_nonblocking(o.as_fd())?;
        }
        let _ = std::fs::write(dir.join("pid"), format!("{} {pid}\n", std::process::id()));
        if spec.listen_port.is_some() && notices.is_none() {
            prepared.log.system_line(
                "this kernel has no seccomp user notifications (Linux 5.0): the app's listen calls are not checked",
            );
        }
        let Prepared { listener, log, cgroup, oom_before } = prepared;
        Ok(Running {
            dir,
            spec,
            pid,
            log,
            output,
            taken: Output::new(Instant::now()),
            next_turn: Instant::now(),
            listener,
            clients: Vec::new(),
            sigchld,
            cgroup,
            oom_before,
            status: None,
            stopping: None,
            block: None,
            discarded: false,
            listens: notices.zip(spec.listen_port).map(|(notices, port)| {
                let sandbox = crate::listen::Sandbox { port, user: spec.user, proc_root: spec.proc_root.clone() };
                (notices, sandbox, crate::listen::Budget::new(Instant::now()))
            }),
        })
    }

    /// The sandbox's pid on the host.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    pub(crate) fn run(&mut self) {
        loop {
            self.accept();
            self.read_clients();
            self.pump();
            if let Some((notices, sandbox, budget)) = &mut self.listens {
                if !crate::listen::serve(notices, sandbox, budget) {
                    // Every process of the sandbox has ended.
                    self.listens = None;
                }
            }
            self.reap();
            self.advance_stop();
            if let Some((_, at)) = self.status {
                // The pipe closes when the last process of the sandbox exits;
                // do not wait long for one that escaped into its own session.
                if self.output.is_none() || at.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
            let mut timeout = if self.stopping.is_some() || self.status.is_some() { 100 } else { 1000 };
            // Over its budget the app's output waits in its pipe, without
            // waking the loop, until the budget allows.
            let held = self.held();
            if let Some(wait) = held {
                timeout = timeout.min(wait.as_millis().clamp(1, 1000) as u16);
            }
            // Over its budget the sandbox's calls wait for the next second,
            // without waking the loop meanwhile.
            let listening = self.listens.as_mut().is_some_and(|(_, _, budget)| budget.room(Instant::now()) > 0);
            let mut fds = vec![self.listener.as_fd(), self.sigchld.as_fd()];
            fds.extend(self.output.as_ref().filter(|_| held.is_none()).map(AsFd::as_fd));
            fds.extend(self.clients.iter().map(AsFd::as_fd));
            if listening {
                fds.extend(self.listens.as_ref().map(|(notices, _, _)| notices.as_fd()));
            }
            let _ = sys::wait_readable(&fds, timeout);
        }
        self.finish();
    }

    fn accept(&mut self) {
        while let Ok((mut client, _)) = self.listener.accept() {
            if client.write_all(format!("running {}\n", self.pid).as_bytes()).is_ok()
                && client.set_nonblocking(true).is_ok()
            {
                self.clients.push(client);
            }
        }
    }

    fn read_clients(&mut self) {
        let (mut asked, mut go) = (None, false);
        self.clients.retain_mut(|client| {
            let mut buf = [0u8; 128];
            match client.read(&mut buf) {
                Ok(0) => false,
                Ok(n) => {
                    for line in buf[..n].lines().map_while(Result::ok) {
                        if let Some(ms) = line.strip_prefix("stop ").and_then(|m| m.trim().parse::<u64>().ok()) {
                            asked = Some(Duration::from_millis(ms));
                        }
                        go |= line.trim() == "go";
                    }
                    true
                }
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            }
        });
        if let (Some(grace), None) = (asked, &self.stopping) {
            self.begin_stop(grace);
        }
        if go && self.stopping.is_none() {
            self.go();
        }
    }

    /// Lets a held sandbox's nx-init start the app; from here on the shim
    /// outlives its launcher like any shim.
    fn go(&mut self) {
        let Some(block) = self.block.take() else { return };
        if let Err(e) = sys::clear_parent_death_signal() {
            self.log.system_line(&format!("the shim stays tied to its launcher: {e}"));
        }
        // Back to an app's priority before the app starts: each process
        // before its children are read, so one started meanwhile inherits
        // the new value or is among them.
        let mut todo = vec![self.pid];
        while let Some(pid) = todo.pop() {
            if let Err(e) = sys::set_nice(pid, 0) {
                self.log.system_line(&format!("cannot give the held sandbox its priority back: {e}"));
            }
            todo.extend(crate::supervisor::children_of(Path::new("/proc"), pid));
        }
        if let Err(e) = nix::unistd::write(&block, b"g") {
            // nx-init ends the sandbox at the pipe's end: the start fails.
            self.log.system_line(&format!("cannot tell the held sandbox to go: {e}"));
        }
    }

    /// SIGTERM to the app, and to its process group should it lead one
    /// (bwrap's outer process -> the namespace's init, nx-init -> the app).
    fn begin_stop(&mut self, grace: Duration) {
        self.stopping = Some(Stopping { grace, since: Instant::now(), killed: None });
        if self.status.is_some() {
            return;
        }
        if self.block.is_some() {
            // Held: only nx-init runs, waiting; it has nothing to end gracefully.
            self.discarded = true;
            for pid in children_of(&self.spec.proc_root, self.pid).into_iter().chain([self.pid]) {
                let _ = sys::signal_process(pid, Signal::SIGKILL);
            }
            self.stopping = Some(Stopping { grace, since: Instant::now(), killed: Some(Instant::now()) });
            return;
        }
        match children_of(&self.spec.proc_root, self.pid).into_iter().next() {
            Some(init) => {
                for app in children_of(&self.spec.proc_root, init) {
                    let _ = sys::signal_group(app, Signal::SIGTERM);
                    let _ = sys::signal_process(app, Signal::SIGTERM);
                }
            }
            None => {
                let _ = sys::signal_process(self.pid, Signal::SIGTERM);
            }
        }
    }

    /// After the grace period SIGKILL goes to the sandbox's init (from an
    /// ancestor namespace it is always delivered), which takes the whole
    /// namespace along; bwrap itself if that did not end it.
    fn advance_stop(&mut self) {
        let (Some(stop), None) = (&mut self.stopping, self.status) else { return };
        match stop.killed {
            None if stop.since.elapsed() >= stop.grace => {
                self.log.system_line(&format!("did not exit within {:?} of SIGTERM, killing it", stop.grace));
                match children_of(&self.spec.proc_root, self.pid).into_iter().next() {
                    Some(init) => {
                        let _ = sys::signal_process(init, Signal::SIGKILL);
                    }
                    None => {
                        let _ = sys::signal_process(self.pid, Signal::SIGKILL);
                    }
                }
                stop.killed = Some(Instant::now());
            }
            Some(at) if at.elapsed() > Duration::from_secs(2) => {
                let _ = sys::signal_process(self.pid, Signal::SIGKILL);
            }
            _ => {}
        }
    }

    /// Stores what the app wrote, at most [`output::TURN_BYTES`] a turn: the
    /// loop comes back to it once clients are answered and children reaped.
    fn pump(&mut self) {
        if self.held().is_some() {
            return;
        }
        let Some(pipe) = &mut self.output else { return };
        let mut buf = [0u8; 16 * 1024];
        let (mut lines, mut taken) = (Vec::new(), 0);
        while taken < output::TURN_BYTES {
            match pipe.read(&mut buf) {
                Ok(0) => {
                    self.output = None;
                    break;
                }
                Ok(n) => {
                    let now = Instant::now();
                    lines.extend(self.taken.take(&buf[..n], now));
                    taken += n;
                    if self.taken.wait(now).is_some() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if taken > 0 {
                        self.next_turn = Instant::now() + output::TURN_GAP;
                    }
                    break;
                }
                Err(_) => {
                    self.output = None;
                    break;
                }
            }
        }
        self.log.app_lines(&lines);
    }

    /// How long the app's output waits in its pipe before the next turn:
    /// for the budget, or the pause after a turn that drained it.
    fn held(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let gap = self.next_turn.saturating_duration_since(now);
        match self.taken.wait(now) {
            Some(wait) => Some(wait.max(gap)),
            None => (!gap.is_zero()).then_some(gap),
        }
    }

    fn reap(&mut self) {
        let mut scratch = [0u8; 64];
        while matches!(self.sigchld.read(&mut scratch), Ok(n) if n > 0) {}
        while let Some((pid, raw)) = sys::reap_one() {
            if pid == self.pid {
                self.status = Some((raw, Instant::now()));
            }
        }
    }

    fn finish(&mut self) {
        self.log.app_lines(&Vec::from_iter(self.taken.finish()));
        let raw = self.status.map_or(libc::SIGKILL, |(raw, _)| raw);
        let exit = Exit { raw, oom_kills: self.cgroup.oom_kills().saturating_sub(self.oom_before) };
        match &self.stopping {
            Some(_) if self.discarded => {}
            Some(stop) => self.log.system_line(if stop.killed.is_some() { "killed" } else { "stopped" }),
            None => {}
        }
        let tmp = self.dir.join(".exit.tmp");
        // The sandbox's pid follows, so a launcher reading the record after
        // the fact knows it is this life's (`Shim::ended`).
        if std::fs::write(&tmp, format!("{} {}", exit.encode(), self.pid)).is_ok() {
            let _ = std::fs::rename(&tmp, self.dir.join(EXIT));
        }
        let _ = std::fs::remove_file(self.dir.join(CONTROL));
        let line = format!("{}\n", exit.encode());
        for client in &mut self.clients {
            let _ = client.set_nonblocking(false);
            let _ = client.write_all(line.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_travel_as_one_line_and_say_what_killed() {
        let e = Exit { raw: 9, oom_kills: 1 };
        assert_eq!(Exit::decode(&e.encode()), Some(e));
        assert_eq!(e.describe(), "signal 9 (SIGKILL), killed for memory (1 OOM kills in its cgroup)");
        assert_eq!(Exit { raw: 3 << 8, oom_kills: 0 }.describe(), "status 3");
        assert_eq!(Exit::decode("running 12"), None);
    }

    #[tokio::test]
    async fn a_life_that_ended_before_its_launcher_connected_is_read_from_its_record() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Shim::ended(dir.path(), 42).is_none(), "no record, no life to hand back");
        let exit = Exit { raw: 7 << 8, oom_kills: 0 };
        std::fs::write(dir.path().join(EXIT), format!("{} 41", exit.encode())).unwrap();
        assert!(Shim::ended(dir.path(), 42).is_none(), "another life's record");
        std::fs::write(dir.path().join(EXIT), format!("{} 42", exit.encode())).unwrap();
        let mut shim = Shim::ended(dir.path(), 42).unwrap();
        assert_eq!(shim.pid(), 42);
        assert!(shim.exited());
        assert_eq!(shim.wait().await, Outcome::Exited(exit));
        assert_eq!(shim.stop(Duration::from_secs(1)).await, Outcome::Exited(exit), "nothing left to stop");
    }
}
