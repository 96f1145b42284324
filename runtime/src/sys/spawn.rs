//! Starting children: what a child does between its creation and `exec`
//! ([`ChildSetup`]), and [`Spawn`], which creates it without copying this
//! process's memory map (or runs the setup and `exec`s in place, for a
//! parked sandbox).
//!
//! Why not `fork`: a `fork` copies the page tables of the whole process (the
//! receiver's heaps, its threads' stacks) only for `exec` to tear them down
//! again. With 1,000 sandboxes starting at once that copy and its teardown
//! were a sixth of all the CPU the host spent (`perf`, bench/RESULTS.md).
//! [`Spawn`] uses `clone(CLONE_VM | CLONE_VFORK)`, as glibc's `posix_spawn`
//! and Go's `os/exec` do: the child runs on a stack of its own inside this
//! process's memory while the thread that made it waits, until it `exec`s
//! (or fails and exits). A child that switches users is the exception and
//! gets a copy of the memory, as with `fork`: the kernel marks the memory
//! map of a process whose credentials change as not dumpable, and a shared
//! map would be the parent's (the shim, or PostgreSQL's start: small or rare).
//!
//! Because the child shares every page with its parent (or copies them from
//! a process with other threads), its code follows rules the compiler
//! cannot check:
//! - it allocates nothing, takes no lock and cannot panic: everything it
//!   reads was prepared before the clone;
//! - it changes credentials with raw system calls: glibc's `setuid` in a
//!   process it believes has several threads changes all of them, which here
//!   would be the parent's;
//! - every signal is blocked from before the clone until its handlers are
//!   reset to their defaults, so no handler of the parent runs in it.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;

use super::check;

/// A resource limit applied in the child before `exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rlimit {
    pub resource: RlimitResource,
    pub soft: u64,
    pub hard: u64,
}

/// The resource limits the runtime sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RlimitResource {
    /// Open file descriptors.
    NoFile,
    /// Processes of the (real) user id.
    NProc,
    /// Address space in bytes.
    AddressSpace,
    /// Largest file the process may create, in bytes.
    FileSize,
    /// Core dump size.
    Core,
    /// Data segment (heap and private writable mappings), in bytes.
    Data,
}

impl RlimitResource {
    fn raw(self) -> libc::__rlimit_resource_t {
        match self {
            Self::NoFile => libc::RLIMIT_NOFILE,
            Self::NProc => libc::RLIMIT_NPROC,
            Self::AddressSpace => libc::RLIMIT_AS,
            Self::FileSize => libc::RLIMIT_FSIZE,
            Self::Core => libc::RLIMIT_CORE,
            Self::Data => libc::RLIMIT_DATA,
        }
    }
}

/// What the child does between its start and `exec`, in this order: join cgroups,
/// set resource limits, start a new session, move inherited descriptors into
/// place and mark every other descriptor above stderr close-on-exec (whatever
/// this process inherited or a library opened without the flag never reaches a
/// child), drop to the target user (supplementary groups first), and last set
/// the parent-death signal, because the kernel clears it on every credential
/// change. A Landlock ruleset, if any, is applied after the user switch and
/// before the parent-death signal; the `listen` filter, if any, last.
#[derive(Debug, Default)]
pub struct ChildSetup {
    /// `cgroup.procs` (v1 and v2) files to write the child's pid into.
    pub cgroup_procs: Vec<CString>,
    /// The child's nice value, set before it changes users.
    pub nice: Option<i32>,
    pub rlimits: Vec<Rlimit>,
    pub new_session: bool,
    /// `(from, to)`: descriptors duplicated onto fixed numbers without close-on-exec.
    pub fd_moves: Vec<(RawFd, RawFd)>,
    /// `(uid, gid)` to switch to; supplementary groups are cleared.
    pub user: Option<(u32, u32)>,
    /// Signal sent to the child when the thread that spawned it exits.
    pub parent_death_signal: Option<i32>,
    /// A Landlock ruleset ([`super::landlock_ruleset`]) the child restricts itself
    /// to, after setting no_new_privs, once it runs as the target user.
    pub landlock: Option<RawFd>,
    /// The setup runs in this very process, which then `exec`s
    /// (`CommandExt::exec`, a parked sandbox), not in a forked child: the
    /// parent whose death it must outlive not is this process's parent.
    pub exec_in_place: bool,
    /// A filter whose user notifications go to whoever reads the descriptor
    /// it makes ([`crate::seccomp::listen_filter`], as
    /// [`crate::seccomp::to_bytes`] lays it out), installed last, and the
    /// socket that descriptor is sent on, with the one byte `L`. A kernel
    /// that makes no such descriptor (before Linux 5.0) gets no filter and
    /// nothing is sent.
    pub listen_notice: Option<(RawFd, Vec<u8>)>,
}

/// A [`ChildSetup`] with everything it needs computed, so applying it
/// allocates nothing.
#[derive(Debug)]
struct Prepared {
    setup: ChildSetup,
    /// The process whose death the child must not outlive.
    parent: libc::pid_t,
    /// Descriptors the child keeps open above stderr, sorted.
    kept: Vec<u32>,
}

impl Prepared {
    fn new(setup: ChildSetup) -> Prepared {
        let parent =
            if setup.exec_in_place { nix::unistd::getppid().as_raw() } else { std::process::id() as libc::pid_t };
        let mut kept: Vec<u32> = setup.fd_moves.iter().map(|&(_, to)| to as u32).filter(|&fd| fd > 2).collect();
        kept.sort_unstable();
        Prepared { setup, parent, kept }
    }

    /// Runs the setup in the child. Only async-signal-safe system calls, no
    /// allocation: see the module's rules.
    fn apply(&self) -> io::Result<()> {
        let setup = &self.setup;
        for path in &setup.cgroup_procs {
            write_pid_file(path)?;
        }
        if let Some(nice) = setup.nice {
            // SAFETY: setpriority takes integers only.
            check(unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, nice) })?;
        }
        for limit in &setup.rlimits {
            let value = libc::rlimit { rlim_cur: limit.soft, rlim_max: limit.hard };
            // SAFETY: setrlimit reads a valid, initialised struct.
            check(unsafe { libc::setrlimit(limit.resource.raw(), &value) })?;
        }
        if setup.new_session {
            // SAFETY: setsid has no memory-safety preconditions.
            check(unsafe { libc::setsid() })?;
        }
        for &(from, to) in &setup.fd_moves {
            if from == to {
                // SAFETY: fcntl on a descriptor number; an invalid one returns EBADF.
                check(unsafe { libc::fcntl(from, libc::F_SETFD, 0) })?;
            } else {
                // SAFETY: dup2 on descriptor numbers; errors are returned, not UB.
                check(unsafe { libc::dup2(from, to) })?;
            }
        }
        let mut first = 3u32;
        for keep in self.kept.iter().copied().chain(std::iter::once(u32::MAX)) {
            if keep > first {
                cloexec_range(first, keep - 1);
            }
            first = keep.saturating_add(1);
        }
        if let Some((uid, gid)) = setup.user {
            // Raw system calls, not glibc's wrappers: see the module's rules.
            // SAFETY: setgroups with a zero length never reads the pointer.
            check_long(unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) })?;
            // SAFETY: plain credential system calls with integer arguments.
            check_long(unsafe { libc::syscall(libc::SYS_setgid, gid) })?;
            // SAFETY: as above.
            check_long(unsafe { libc::syscall(libc::SYS_setuid, uid) })?;
        }
        if let Some(ruleset) = setup.landlock {
            // Landlock requires no_new_privs from an unprivileged process;
            // bwrap sets it for the app anyway.
            // SAFETY: prctl with integer arguments only.
            check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) })?;
            // SAFETY: landlock_restrict_self takes a descriptor and flags.
            check_long(unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) })?;
        }
        if let Some(sig) = setup.parent_death_signal {
            // SAFETY: prctl with integer arguments only.
            check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) })?;
            // The parent may have died before the flag was set; then nothing
            // would ever deliver the signal, so give up now.
            // SAFETY: getppid cannot fail.
            if unsafe { libc::getppid() } != self.parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        if let Some((socket, program)) = &setup.listen_notice {
            send_listen_notices(*socket, program)?;
        }
        Ok(())
    }
}

/// Whether the kernel has seccomp user notifications: it reports their
/// sizes. A kernel that has them refuses the listen filter only for a
/// reason that must fail the start (a host supervisor's seccomp profile
/// answering EINVAL, say), never for want of them.
fn has_notifications() -> bool {
    const SECCOMP_GET_NOTIF_SIZES: libc::c_uint = 3;
    let mut sizes = [0u16; 3];
    // SAFETY: the kernel writes three u16s (struct seccomp_notif_sizes)
    // into `sizes`, which outlives the call.
    unsafe { libc::syscall(libc::SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, sizes.as_mut_ptr()) == 0 }
}

/// Installs `program` (whole `sock_filter`s) with a notification descriptor
/// and sends that descriptor on `socket` with the byte `L`, then closes it
/// here: the reader is the only one to hold it. Raw system calls on the
/// stack only: see the module's rules.
fn send_listen_notices(socket: RawFd, program: &[u8]) -> io::Result<()> {
    // A filter needs no_new_privs from an unprivileged process.
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) })?;
    let prog = libc::sock_fprog {
        len: (program.len() / 8) as libc::c_ushort,
        // The kernel copies the program in; it reads it, never writes it.
        filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // Only a fatal signal interrupts a call the shim has taken, as nothing
    // interrupts a plain listen after it began (Linux 5.19; without it
    // before).
    const WAIT_KILLABLE_RECV: libc::c_ulong = 1 << 5;
    let mut notices = -1;
    for flags in [libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | WAIT_KILLABLE_RECV, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER] {
        // SAFETY: prog points at `program`, valid for the call; the flags
        // are the kernel's own constants.
        notices = unsafe {
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &prog as *const libc::sock_fprog)
        };
        if notices >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            break;
        }
    }
    if notices < 0 {
        let e = io::Error::last_os_error();
        // No notifications on this kernel (before 5.0): no filter went in,
        // and the shim says so. Anything else (a supervisor of this host
        // that has a listener of its own: EBUSY) fails the start rather
        // than run the app unguarded.
        return match e.raw_os_error() {
            Some(libc::EINVAL | libc::ENOSYS) if !has_notifications() => Ok(()),
            _ => Err(e),
        };
    }
    let notices = notices as libc::c_int;
    let byte = [b'L'];
    let mut iov = libc::iovec { iov_base: byte.as_ptr().cast_mut().cast(), iov_len: 1 };
    // Room for one descriptor's control message, aligned as cmsghdr is.
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE computes a size from an integer.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // SAFETY: msg_control points at `control`, large enough for one header
    // and one descriptor (CMSG_SPACE above is 24 bytes, `control` 32), so
    // the first header and its data are inside it.
    let sent = unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        libc::CMSG_DATA(header).cast::<libc::c_int>().write_unaligned(notices);
        libc::syscall(libc::SYS_sendmsg, socket, &msg as *const libc::msghdr, libc::MSG_NOSIGNAL)
    };
    let send_error = io::Error::last_os_error();
    // SAFETY: notices was made above and is closed exactly once.
    unsafe { libc::syscall(libc::SYS_close, notices) };
    // Unsent, nobody answers: the app's every `listen` fails (ENOSYS).
    if sent < 0 {
        return Err(send_error);
    }
    Ok(())
}

fn check_long(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Marks descriptors `first..=last` close-on-exec, with `close_range` where the
/// kernel has it (5.11+), else one by one.
fn cloexec_range(first: u32, last: u32) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes integers only and touches no memory.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, CLOSE_RANGE_CLOEXEC) };
    if r == 0 {
        return;
    }
    for fd in first..=last.min(4095) {
        // SAFETY: fcntl on a descriptor number; unused numbers return EBADF.
        unsafe { libc::fcntl(fd as libc::c_int, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// Moves the calling process into the cgroup of `path`, a `cgroup.procs`
/// file. Raw system calls: glibc's `open`, `write` and `close` are
/// cancellation points, which touch the calling thread's state, here the
/// parent's.
fn write_pid_file(path: &CString) -> io::Result<()> {
    // SAFETY: path is a valid NUL-terminated string that outlives the call.
    let fd =
        unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    check_long(fd)?;
    // Writing "0" to cgroup.procs moves the writing process itself.
    // SAFETY: the buffer is a valid one-byte static string.
    let written = unsafe { libc::syscall(libc::SYS_write, fd, b"0".as_ptr(), 1usize) };
    let write_error = io::Error::last_os_error();
    // SAFETY: fd was opened above and is closed exactly once.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    if written < 0 {
        return Err(write_error);
    }
    Ok(())
}

/// A program to start with [`Spawn::spawn`], with everything the child
/// needs prepared: the child may not allocate.
#[derive(Debug)]
pub struct Spawn {
    /// Paths to try with `execve`, in order, as `execvp` would: the program
    /// itself when its name has a slash, else the name in each directory of
    /// `PATH`.
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// The directory to change to, if any.
    cwd: Option<CString>,
    /// Descriptors the child gets as stdin, stdout and stderr; `None` keeps
    /// this process's.
    stdio: [Option<RawFd>; 3],
    setup: Prepared,
}

/// The child's stack: the child uses a few kilobytes; the rest of the
/// mapping is never touched and costs nothing.
const STACK_BYTES: usize = 256 * 1024;

/// Where `execvp` looks when the child's environment has no `PATH` (glibc's
/// default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

impl Spawn {
    /// `program` with `args` (not counting the program itself) and exactly
    /// the environment `env`, set up by `setup` in the child. A name without
    /// a slash is looked up in the environment's `PATH`, as `execvp` does;
    /// unlike `execvp`, a file without `#!` that the kernel cannot run is an
    /// error (`ENOEXEC`), not handed to `/bin/sh`.
    pub fn new(
        program: &OsStr,
        args: &[OsString],
        env: &[(OsString, OsString)],
        setup: ChildSetup,
    ) -> io::Result<Spawn> {
        let c = |s: &[u8]| {
            CString::new(s).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a program's name, argument or environment")
            })
        };
        let candidates = if program.as_bytes().contains(&b'/') {
            vec![c(program.as_bytes())?]
        } else {
            let path = env
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.as_bytes())
                .unwrap_or(DEFAULT_PATH.as_bytes());
            path.split(|&b| b == b':')
                .map(|dir| {
                    // An empty entry is the working directory.
                    let dir = if dir.is_empty() { b".".as_slice() } else { dir };
                    c(&[dir, b"/", program.as_bytes()].concat())
                })
                .collect::<io::Result<_>>()?
        };
        let argv = std::iter::once(program)
            .chain(args.iter().map(OsString::as_os_str))
            .map(|a| c(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        // A name given twice takes its last value, as with `std`'s `Command`.
        let envp = env
            .iter()
            .enumerate()
            .filter(|(i, (k, _))| !env[i + 1..].iter().any(|(later, _)| later == k))
            .map(|(_, (k, v))| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<io::Result<_>>()?;
        Ok(Spawn { candidates, argv, envp, cwd: None, stdio: [None; 3], setup: Prepared::new(setup) })
    }

    /// Starts the child in `dir`.
    pub fn current_dir(&mut self, dir: &std::path::Path) -> io::Result<()> {
        self.cwd = Some(
            CString::new(dir.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a working directory"))?,
        );
        Ok(())
    }

    /// Gives the child `fd` as its descriptor `n` (0, 1 or 2). `fd` must be
    /// numbered above 2, so placing one stream never overwrites another's source.
    pub fn stdio(&mut self, n: usize, fd: RawFd) {
        debug_assert!(fd > 2, "a stream's source must be numbered above stderr");
        self.stdio[n] = Some(fd);
    }

    /// Starts the child and returns its pid once it has `exec`ed. If it
    /// cannot (a setup step or `exec` failed), it has been reaped here and
    /// the error is the step's.
    pub fn spawn(&self) -> io::Result<i32> {
        use std::os::fd::AsRawFd;
        let argv = null_terminated(&self.argv);
        let envp = null_terminated(&self.envp);
        // The child says why it could not `exec` on a close-on-exec pipe,
        // which a successful `exec` closes unwritten.
        let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let cloned =
            Cloned { child: Child { spawn: self, argv: &argv, envp: &envp }, report: report_write.as_raw_fd() };
        let stack = Stack::new()?;
        // A child that switches users gets a copy of this process's memory
        // instead: the kernel resets the "dumpable" flag of the memory map
        // of a process whose credentials change, and under CLONE_VM that
        // map, and so the flag, would be this process's.
        let flags = if self.setup.setup.user.is_some() {
            libc::SIGCHLD
        } else {
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD
        };
        let all: u64 = !0;
        let mut old: u64 = 0;
        sigprocmask(libc::SIG_SETMASK, &all, &mut old)?;
        // SAFETY: the child runs `child_main` on `stack`, which stays mapped
        // until after the clone returns; with CLONE_VM, CLONE_VFORK keeps
        // this thread (and so `cloned`, `argv` and `envp` on its stack)
        // waiting until the child has `exec`ed or exited; without it the
        // child has a copy of all of them. The child follows the module's
        // rules: it only reads what `cloned` points to.
        let pid = unsafe { libc::clone(child_main, stack.top(), flags, std::ptr::addr_of!(cloned).cast_mut().cast()) };
        let clone_error = io::Error::last_os_error();
        // Restoring a mask read a moment ago cannot fail; were it to, the
        // child must still be recorded by the caller, so it is not an error.
        let _ = sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        drop(report_write);
        if pid < 0 {
            return Err(clone_error);
        }
        let mut errno = [0u8; 4];
        let read = loop {
            match nix::unistd::read(report_read.as_raw_fd(), &mut errno) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other,
            }
        };
        if read == Ok(errno.len()) {
            // It exited without `exec`: collect it now, so no zombie stays
            // and no reaper reports a child nobody knows.
            let mut status = 0;
            // SAFETY: waitpid writes to a valid, owned integer.
            while unsafe { libc::waitpid(pid, &mut status, libc::__WALL) } < 0
                && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
            return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
        }
        Ok(pid)
    }

    /// Runs the setup in this very process and `exec`s (a parked sandbox,
    /// whose setup has `exec_in_place`); returns only the error that stopped it.
    pub fn exec(&self) -> io::Error {
        let argv = null_terminated(&self.argv);
        let envp = null_terminated(&self.envp);
        match (Child { spawn: self, argv: &argv, envp: &envp }).run() {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

/// `rt_sigprocmask` itself: glibc's wrappers leave its own two signals
/// unblocked, and one of them (the one `setuid` broadcasts) would run a
/// handler of the parent in the child.
fn sigprocmask(how: libc::c_int, set: *const u64, old: *mut u64) -> io::Result<()> {
    // SAFETY: `set` and `old` are null or point to a u64, the kernel's
    // sigset_t of 8 bytes, the size passed.
    check_long(unsafe { libc::syscall(libc::SYS_rt_sigprocmask, how, set, old, 8usize) })
}

/// What the child reads: a borrowed view of the [`Spawn`].
struct Child<'a> {
    spawn: &'a Spawn,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
}

/// What a cloned child is given: what it reads, and the pipe it reports
/// its error on.
struct Cloned<'a> {
    child: Child<'a>,
    report: RawFd,
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Cloned` the parent passed to clone: alive while
    // the parent waits (CLONE_VFORK), or the child's own copy.
    let cloned = unsafe { &*(arg as *const Cloned<'_>) };
    let errno = match cloned.child.run() {
        Ok(never) => match never {},
        Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
    };
    let errno = errno.to_ne_bytes();
    // SAFETY: a raw write of a 4-byte buffer that outlives the call. A
    // short or failed write leaves the parent taking the start as done; the
    // child's exit status 127 still says it failed.
    unsafe { libc::syscall(libc::SYS_write, cloned.report, errno.as_ptr(), errno.len()) };
    // SAFETY: _exit ends this child only; it runs no handler and flushes
    // no buffer shared with the parent.
    unsafe { libc::_exit(127) }
}

impl Child<'_> {
    /// Sets the child up and `exec`s; returns only with the error that
    /// stopped it.
    fn run(&self) -> Result<std::convert::Infallible, io::Error> {
        let spawn = self.spawn;
        for (n, fd) in spawn.stdio.iter().enumerate() {
            if let Some(fd) = fd {
                // SAFETY: dup2 on descriptor numbers; errors are returned.
                check(unsafe { libc::dup2(*fd, n as libc::c_int) })?;
            }
        }
        if let Some(dir) = &spawn.cwd {
            // SAFETY: a valid NUL-terminated path that outlives the call.
            check(unsafe { libc::chdir(dir.as_ptr()) })?;
        }
        reset_signal_handlers();
        spawn.setup.apply()?;
        // The program starts with no signal blocked, as `std` starts its children.
        let none: u64 = 0;
        sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut())?;
        // As execvp: a missing file or a directory not searchable moves on
        // to the next candidate; a file found but not executable is the
        // error if no later one runs.
        let mut error = libc::ENOENT;
        for path in &spawn.candidates {
            // SAFETY: path, argv and envp are NUL-terminated strings and
            // null-terminated arrays that outlive the call.
            unsafe { libc::execve(path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
            match io::Error::last_os_error().raw_os_error().unwrap_or(libc::ENOENT) {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => error = libc::EACCES,
                other => return Err(io::Error::from_raw_os_error(other)),
            }
        }
        Err(io::Error::from_raw_os_error(error))
    }
}

/// Puts every signal the parent handles back to its default action, and
/// SIGPIPE too (Rust programs ignore it; their children should not). Ignored
/// signals stay ignored across `exec`, as with `fork`.
fn reset_signal_handlers() {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: an all-zero sigaction is a valid value to be overwritten.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: queries the disposition into a valid struct.
        if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
            // glibc's own signals cannot be queried; they are blocked.
            continue;
        }
        if old.sa_sigaction != libc::SIG_DFL && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE) {
            // SAFETY: an all-zero sigaction is SIG_DFL with no flags.
            let default: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: sets a valid disposition; the old one is not asked for.
            unsafe { libc::sigaction(sig, &default, std::ptr::null_mut()) };
        }
    }
}

/// The child's stack: an anonymous mapping with a guard page below it,
/// unmapped when the spawn is over.
struct Stack(*mut libc::c_void);

impl Stack {
    fn new() -> io::Result<Stack> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                STACK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack(base);
        // The lowest page faults instead of letting an overflow write below.
        // SAFETY: the first page of the mapping made above.
        check(unsafe { libc::mprotect(base, page_size(), libc::PROT_NONE) })?;
        Ok(stack)
    }

    /// The top of the stack (it grows down), 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping, which is page-aligned.
        unsafe { self.0.cast::<u8>().add(STACK_BYTES).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the child that
        // used it has `exec`ed or exited.
        unsafe { libc::munmap(self.0, STACK_BYTES) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf takes an integer.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}
