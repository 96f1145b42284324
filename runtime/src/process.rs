//! The process manager: one long-lived thread that starts every child process of
//! the program and reaps every child, including orphans re-parented to us.
//!
//! Why one thread: the parent-death signal fires when the *thread* that forked a
//! child exits, not the process, so children must be forked by a thread that
//! lives as long as the program. And why it reaps everything: the program is a
//! child subreaper, so `waitpid(-1)` is the only way to collect orphans, which in
//! turn means no other code may wait for its own children (`std::process` and
//! `tokio::process` would race with it). Every subprocess therefore goes through
//! [`ProcessManager::spawn`] or [`ProcessManager::output`].

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};

use crate::sys::{self, ChildSetup, Rlimit};

/// Where a child's standard stream goes.
#[derive(Debug, Default)]
pub enum Stream {
    /// `/dev/null`.
    #[default]
    Null,
    /// A pipe whose other end is handed back in [`Child`].
    Pipe,
    /// The same as this program's.
    Inherit,
    /// For stderr only: the same pipe as stdout, so both keep their relative order.
    ToStdout,
}

/// A command to start. The environment is always cleared first: a child sees only
/// what is listed in `env`.
#[derive(Debug, Default)]
pub struct Command {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: Option<PathBuf>,
    /// `(uid, gid)` to run as; supplementary groups are dropped.
    pub user: Option<(u32, u32)>,
    pub stdin: Stream,
    pub stdout: Stream,
    pub stderr: Stream,
    pub new_session: bool,
    /// Sent to the child when this program dies, however it dies.
    pub parent_death_signal: Option<Signal>,
    /// `cgroup.procs` files the child joins before `exec`.
    pub cgroup_procs: Vec<PathBuf>,
    pub rlimits: Vec<Rlimit>,
    /// Descriptors the child inherits at fixed numbers (for example a seccomp
    /// program for `bwrap --add-seccomp-fd`).
    pub pass_fds: Vec<(OwnedFd, RawFd)>,
    /// A Landlock ruleset the child restricts itself to before `exec`.
    pub landlock: Option<OwnedFd>,
}

impl Command {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self { program: program.into(), ..Self::default() }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A short description for error messages: the program and its arguments.
    /// Never the environment, which may hold secrets.
    pub fn describe(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// Failure to start a child.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {program}: {source}")]
    Start { program: String, source: std::io::Error },
    #[error("the process manager thread is gone")]
    ManagerGone,
}

/// A running (or exited, not yet noticed) child.
#[derive(Debug)]
pub struct Child {
    /// Writable end of the child's stdin when it was [`Stream::Pipe`].
    pub stdin: Option<OwnedFd>,
    /// Readable end of the child's stdout (and stderr, with [`Stream::ToStdout`]).
    pub stdout: Option<OwnedFd>,
    /// Readable end of the child's stderr when it was piped on its own.
    pub stderr: Option<OwnedFd>,
    watch: ExitWatch,
}

impl Child {
    pub fn pid(&self) -> i32 {
        self.watch.pid
    }

    /// Waits for the child to exit; can be called any number of times.
    pub async fn wait(&mut self) -> ExitStatus {
        self.watch.wait().await
    }

    /// The exit status if the child has exited.
    pub fn try_status(&self) -> Option<ExitStatus> {
        *self.watch.exit.borrow()
    }

    /// A handle that can wait for this child without owning its pipes.
    pub fn exit_watch(&self) -> ExitWatch {
        self.watch.clone()
    }

    /// Sends a signal unless the child was already reaped (so a recycled pid
    /// is never signalled).
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        self.watch.signal(signal)
    }
}

/// Waits for and signals a child; cheap to clone.
#[derive(Debug, Clone)]
pub struct ExitWatch {
    pid: i32,
    exit: watch::Receiver<Option<ExitStatus>>,
    manager: ProcessManager,
}

impl ExitWatch {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub async fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(status) = *self.exit.borrow_and_update() {
                return status;
            }
            if self.exit.changed().await.is_err() {
                // The sender lives in the manager's table until the exit is
                // published, so this only happens if the manager thread died.
                return ExitStatus::from_raw(libc::SIGKILL);
            }
        }
    }

    pub fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        self.manager.signal(self.pid, signal)
    }
}

/// What [`ProcessManager::output`] collects.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    /// The last non-empty line of stderr (or stdout), for error messages.
    pub fn last_words(&self) -> String {
        let text = if self.stderr.iter().any(|b| !b.is_ascii_whitespace()) { &self.stderr } else { &self.stdout };
        let text = String::from_utf8_lossy(text);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" / ")
    }
}

type ChildTable = HashMap<i32, watch::Sender<Option<ExitStatus>>>;

struct SpawnRequest {
    command: Command,
    reply: oneshot::Sender<Result<Spawned, SpawnError>>,
}

struct Spawned {
    pid: i32,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

struct Inner {
    requests: Mutex<mpsc::Sender<SpawnRequest>>,
    wake: UnixStream,
    children: Arc<Mutex<ChildTable>>,
}

/// Handle to the process-wide manager; see the module documentation.
#[derive(Clone)]
pub struct ProcessManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessManager").finish_non_exhaustive()
    }
}

static GLOBAL: OnceLock<ProcessManager> = OnceLock::new();

impl ProcessManager {
    /// The manager of this process, started on first use. There is exactly one,
    /// because reaping with `waitpid(-1)` is process-wide.
    pub fn global() -> std::io::Result<ProcessManager> {
        if let Some(pm) = GLOBAL.get() {
            return Ok(pm.clone());
        }
        let pm = Self::start()?;
        Ok(GLOBAL.get_or_init(|| pm).clone())
    }

    /// The manager of this process if one has been started. A program that
    /// has one must start every child through it: the manager reaps with
    /// `waitpid(-1)`, so a child started beside it loses its exit status
    /// (`ECHILD`) whenever the manager collects it first.
    pub fn current() -> Option<ProcessManager> {
        GLOBAL.get().cloned()
    }

    fn start() -> std::io::Result<ProcessManager> {
        sys::set_child_subreaper()?;
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        let (sig_tx, sig_rx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        sig_rx.set_nonblocking(true)?;
        sys::notify_on_sigchld(sig_tx)?;
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let children: Arc<Mutex<ChildTable>> = Arc::default();
        let table = children.clone();
        std::thread::Builder::new()
            .name("nx-process-manager".into())
            .spawn(move || manager_loop(rx, wake_rx, sig_rx, table))?;
        Ok(ProcessManager { inner: Arc::new(Inner { requests: Mutex::new(tx), wake: wake_tx, children }) })
    }

    /// Starts `command` on the manager thread.
    pub async fn spawn(&self, command: Command) -> Result<Child, SpawnError> {
        let (reply, answer) = oneshot::channel();
        {
            let tx = self.inner.requests.lock().map_err(|_| SpawnError::ManagerGone)?;
            tx.send(SpawnRequest { command, reply }).map_err(|_| SpawnError::ManagerGone)?;
        }
        // A lost wake-up byte only delays the spawn until the next poll timeout.
        let _ = std::io::Write::write(&mut &self.inner.wake, b"s");
        let spawned = answer.await.map_err(|_| SpawnError::ManagerGone)??;
        Ok(Child {
            stdin: spawned.stdin,
            stdout: spawned.stdout,
            stderr: spawned.stderr,
            watch: ExitWatch { pid: spawned.pid, exit: spawned.exit, manager: self.clone() },
        })
    }

    /// Runs `command` to completion and collects its output (stdout and stderr
    /// piped separately; stdin is `/dev/null`).
    pub async fn output(&self, mut command: Command) -> Result<Output, SpawnError> {
        command.stdout = Stream::Pipe;
        command.stderr = Stream::Pipe;
        let describe = command.describe();
        let mut child = self.spawn(command).await?;
        let read = |fd: Option<OwnedFd>| async move {
            let mut buf = Vec::new();
            if let Some(fd) = fd {
                if let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
                    let _ = pipe.read_to_end(&mut buf).await;
                }
            }
            buf
        };
        let (stdout, stderr) = tokio::join!(read(child.stdout.take()), read(child.stderr.take()));
        let status = child.wait().await;
        tracing::debug!(command = %describe, %status, "subprocess finished");
        Ok(Output { status, stdout, stderr })
    }

    fn signal(&self, pid: i32, signal: Signal) -> std::io::Result<()> {
        // Holding the table lock keeps the reaper from collecting (and the kernel
        // from recycling) this pid while the signal is sent.
        let table = self.inner.children.lock().map_err(|_| std::io::Error::other("process table poisoned"))?;
        match table.get(&pid) {
            Some(tx) if tx.borrow().is_none() => sys::signal_process(pid, signal),
            _ => Ok(()),
        }
    }
}

fn manager_loop(
    rx: mpsc::Receiver<SpawnRequest>,
    mut wake: UnixStream,
    mut sig: UnixStream,
    children: Arc<Mutex<ChildTable>>,
) {
    let mut scratch = [0u8; 64];
    loop {
        if let Err(e) = sys::wait_readable(&[wake.as_fd(), sig.as_fd()], 1000) {
            tracing::error!(error = %e, "process manager poll failed");
        }
        while matches!(wake.read(&mut scratch), Ok(n) if n > 0) {}
        while matches!(sig.read(&mut scratch), Ok(n) if n > 0) {}
        loop {
            match rx.try_recv() {
                Ok(req) => {
                    let result = spawn_now(req.command, &children);
                    let _ = req.reply.send(result);
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        }
        reap(&children);
    }
}

fn reap(children: &Mutex<ChildTable>) {
    let Ok(mut table) = children.lock() else { return };
    while let Some((pid, raw)) = sys::reap_one() {
        match table.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(Some(ExitStatus::from_raw(raw)));
            }
            None => tracing::debug!(pid, "reaped an orphaned descendant"),
        }
    }
}

fn spawn_now(mut command: Command, children: &Mutex<ChildTable>) -> Result<Spawned, SpawnError> {
    let program = command.program.display().to_string();
    let start_err = |source: std::io::Error| SpawnError::Start { program: program.clone(), source };
    // The child moves descriptors onto fixed numbers one after the other, and
    // applies the Landlock ruleset after that: a descriptor that already sat
    // on one of those numbers would be overwritten first. So every descriptor
    // handed over is numbered above them all.
    let above = command.pass_fds.iter().map(|(_, to)| *to).max().unwrap_or(2) + 1;
    command.pass_fds = std::mem::take(&mut command.pass_fds)
        .into_iter()
        .map(|(fd, to)| Ok((sys::renumber_above(fd, above)?, to)))
        .collect::<std::io::Result<_>>()
        .map_err(start_err)?;
    command.landlock =
        command.landlock.take().map(|fd| sys::renumber_above(fd, above)).transpose().map_err(start_err)?;
    let mut setup = ChildSetup {
        cgroup_procs: command
            .cgroup_procs
            .iter()
            .map(|p| CString::new(p.as_os_str().as_bytes()).map_err(|e| start_err(std::io::Error::other(e))))
            .collect::<Result<_, _>>()?,
        rlimits: command.rlimits.clone(),
        new_session: command.new_session,
        fd_moves: command.pass_fds.iter().map(|(fd, to)| (std::os::fd::AsRawFd::as_raw_fd(fd), *to)).collect(),
        user: command.user,
        parent_death_signal: command.parent_death_signal.map(|s| s as i32),
        landlock: command.landlock.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
        exec_in_place: false,
        listen_notice: None,
        nice: None,
    };
    if matches!(command.stderr, Stream::ToStdout) {
        // dup2(1, 2) once stdout is in place.
        setup.fd_moves.insert(0, (1, 2));
    }
    let mut spawn =
        sys::Spawn::new(command.program.as_os_str(), &command.args, &command.env, setup).map_err(start_err)?;
    if let Some(cwd) = &command.cwd {
        spawn.current_dir(cwd).map_err(start_err)?;
    }
    // The child's ends of its streams, kept open here until it has `exec`ed;
    // the parent's ends go back to the caller.
    let mut child_ends = Vec::new();
    let mut parent_ends: [Option<OwnedFd>; 3] = [None, None, None];
    for (n, stream) in [&command.stdin, &command.stdout, &command.stderr].into_iter().enumerate() {
        let end = match stream {
            Stream::Inherit => continue,
            // stderr joins stdout through the setup's descriptor moves;
            // `ToStdout` means nothing for the other two streams.
            Stream::ToStdout if n == 2 => continue,
            Stream::Null | Stream::ToStdout => {
                std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map(OwnedFd::from)
            }
            Stream::Pipe => {
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from).map(|(read, write)| {
                    let (child, parent) = if n == 0 { (read, write) } else { (write, read) };
                    parent_ends[n] = Some(parent);
                    child
                })
            }
        };
        // Above stderr, so placing one stream never overwrites another's source.
        let end = end.and_then(|fd| sys::renumber_above(fd, 3)).map_err(start_err)?;
        spawn.stdio(n, std::os::fd::AsRawFd::as_raw_fd(&end));
        child_ends.push(end);
    }

    // The table lock is held from the start until the pid is recorded, so
    // the reaper (same thread today, but the lock makes the invariant local)
    // cannot miss it.
    let mut table = children.lock().map_err(|_| SpawnError::ManagerGone)?;
    let pid = spawn.spawn().map_err(start_err)?;
    let (tx, rx) = watch::channel(None);
    table.insert(pid, tx);
    drop(table);
    // The descriptors passed to the child are closed here, in the parent.
    drop(child_ends);
    drop(command.pass_fds);
    drop(command.landlock);
    let [stdin, stdout, stderr] = parent_ends;
    Ok(Spawned { pid, stdin, stdout, stderr, exit: rx })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_collects_both_streams_and_the_status() {
        let pm = ProcessManager::global().unwrap();
        let out = pm.output(Command::new("/bin/sh").args(["-c", "echo out; echo err >&2; exit 3"])).await.unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.last_words(), "err");
    }

    #[tokio::test]
    async fn environment_is_cleared() {
        let pm = ProcessManager::global().unwrap();
        // A name given twice takes its last value.
        let out = pm.output(Command::new("/usr/bin/env").env("ONLY", "first").env("ONLY", "this")).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ONLY=this\n");
    }

    #[tokio::test]
    async fn missing_program_is_a_clear_error() {
        let pm = ProcessManager::global().unwrap();
        let err = pm.spawn(Command::new("/nonexistent/prog")).await.unwrap_err();
        assert!(err.to_string().contains("cannot start /nonexistent/prog"), "{err}");
    }

    #[tokio::test]
    async fn signal_and_wait() {
        let pm = ProcessManager::global().unwrap();
        let mut child = pm.spawn(Command::new("/bin/sleep").arg("30")).await.unwrap();
        assert!(child.try_status().is_none());
        child.signal(Signal::SIGTERM).unwrap();
        let status = child.wait().await;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        // Signalling a reaped child is a no-op, never a stray signal to a recycled pid.
        child.signal(Signal::SIGKILL).unwrap();
    }

    #[tokio::test]
    async fn merged_streams_keep_order() {
        let pm = ProcessManager::global().unwrap();
        let mut c = Command::new("/bin/sh").args(["-c", "echo 1; echo 2 >&2; echo 3"]);
        c.stdout = Stream::Pipe;
        c.stderr = Stream::ToStdout;
        let mut child = pm.spawn(c).await.unwrap();
        assert!(child.stderr.is_none());
        let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(child.stdout.take().unwrap()).unwrap();
        let mut text = String::new();
        pipe.read_to_string(&mut text).await.unwrap();
        child.wait().await;
        assert_eq!(text, "1\n2\n3\n");
    }

    #[tokio::test]
    async fn passed_descriptors_never_overwrite_each_other() {
        let pm = ProcessManager::global().unwrap();
        // Each file sits on the number the other one is to be moved to.
        let a = sys::renumber_above(sys::sealed_file_with("a", b"A").unwrap(), 500).unwrap();
        let b = sys::renumber_above(sys::sealed_file_with("b", b"B").unwrap(), 501).unwrap();
        let numbers = [std::os::fd::AsRawFd::as_raw_fd(&a), std::os::fd::AsRawFd::as_raw_fd(&b)];
        assert_eq!(numbers, [500, 501]);
        let mut c = Command::new("/bin/cat").args(["/proc/self/fd/500", "/proc/self/fd/501"]);
        c.pass_fds = vec![(a, 501), (b, 500)];
        let out = pm.output(c).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "BA");
    }

    /// Children share this process's memory until they `exec`, or copy it
    /// from a process with threads when they switch users (`sys::Spawn`):
    /// the switch must change the child alone.
    #[tokio::test]
    async fn a_child_that_switches_users_leaves_every_thread_of_this_process_as_it_was() {
        assert_eq!(sys::effective_uid(), 0, "this test switches users: run it as root");
        let pm = ProcessManager::global().unwrap();
        let mut c = Command::new("/usr/bin/id").args(["-u", "-r"]);
        c.user = Some((65534, 65534));
        let out = pm.output(c).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\n");
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            assert_eq!(uid.split_whitespace().collect::<Vec<_>>(), ["Uid:", "0", "0", "0", "0"], "{status}");
        }
        // The kernel marks a memory map not dumpable when its process
        // changes credentials; it must have been the child's, not ours.
        assert!(sys::dumpable().unwrap(), "this process was made not dumpable");
    }

    #[tokio::test]
    async fn a_child_starts_with_no_signal_blocked_and_sigpipe_at_its_default() {
        let pm = ProcessManager::global().unwrap();
        let out =
            pm.output(Command::new("/bin/grep").args(["-E", "^Sig(Blk|Ign)", "/proc/self/status"])).await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mask = |name: &str| {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(mask("SigBlk:"), 0, "{text}");
        assert_eq!(mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE must not stay ignored: {text}");
    }

    #[tokio::test]
    async fn a_name_is_looked_up_in_the_childs_path_and_a_failed_start_says_why() {
        let pm = ProcessManager::global().unwrap();
        // Without PATH in its environment, as execvp: /bin and /usr/bin.
        let out = pm.output(Command::new("sh").args(["-c", "echo $0"])).await.unwrap();
        assert_eq!(out.stdout, b"sh\n");
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hello");
        std::fs::write(&script, "#!/bin/sh\necho from the path\n").unwrap();
        let out = pm.output(Command::new("hello").env("PATH", format!("/nonexistent:{}", dir.path().display()))).await;
        let err = out.unwrap_err().to_string();
        assert!(err.contains("cannot start hello") && err.contains("ermission denied"), "{err}");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let out = pm.output(Command::new("hello").env("PATH", format!("/nonexistent:{}", dir.path().display()))).await;
        assert_eq!(out.unwrap().stdout, b"from the path\n");
        let err = pm.spawn(Command::new("nx-no-such-program")).await.unwrap_err().to_string();
        assert!(err.contains("No such file or directory"), "{err}");
        let mut c = Command::new("/bin/true");
        c.cwd = Some(dir.path().join("missing"));
        let err = pm.spawn(c).await.unwrap_err().to_string();
        assert!(err.contains("cannot start /bin/true") && err.contains("No such file or directory"), "{err}");
    }

    #[test]
    fn a_child_that_cannot_start_is_collected_at_once() {
        // Started from a thread of a name of its own, so the child (which
        // keeps that name until it `exec`s) is told apart from any other.
        let name = "nx-spawn-fails";
        let me = std::process::id().to_string();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(|| {
                let spawn =
                    sys::Spawn::new(std::ffi::OsStr::new("/nonexistent/prog"), &[], &[], sys::ChildSetup::default())
                        .unwrap();
                let err = spawn.spawn().unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
            })
            .unwrap()
            .join()
            .unwrap();
        for entry in std::fs::read_dir("/proc").unwrap() {
            let Ok(stat) = std::fs::read_to_string(entry.unwrap().path().join("stat")) else { continue };
            let Some((head, rest)) = stat.rsplit_once(')') else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ours = head.ends_with(&format!("({name}")) && fields.get(1) == Some(&me.as_str());
            assert!(!ours, "the child that failed was left behind: {stat}");
        }
    }

    #[tokio::test]
    async fn orphans_are_reaped() {
        let pm = ProcessManager::global().unwrap();
        // The shell exits at once; its background child is re-parented to this
        // test process (a subreaper) and must not stay a zombie.
        let out = pm.output(Command::new("/bin/sh").args(["-c", "sleep 0.2 & echo $!"])).await.unwrap();
        let orphan: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let stat = format!("/proc/{orphan}/stat");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::path::Path::new(&stat).exists() {
            assert!(std::time::Instant::now() < deadline, "orphan {orphan} was never reaped");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
