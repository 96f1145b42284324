//! Every system call the runtime makes that the standard library does not wrap:
//! starting children and their setup before `exec` (`spawn.rs`), reaping,
//! signals and the subreaper flag. This is the only module of the workspace
//! allowed to use `unsafe`.
#![allow(unsafe_code)]

mod spawn;

pub use spawn::{ChildSetup, Rlimit, RlimitResource, Spawn};

use std::ffi::CString;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// Whether this process's memory map is dumpable (`PR_GET_DUMPABLE`).
#[cfg(test)]
pub(crate) fn dumpable() -> io::Result<bool> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    check(r)?;
    Ok(r == 1)
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Marks this process as a child subreaper: orphans of its descendants (say, the
/// inner process of a sandbox whose outer process was killed) are re-parented to
/// it instead of to the host's init, so it can reap them.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) })
}

/// Forks this process, which must run one thread alone: `Some(child pid)`
/// in the parent, `None` in the child. With one thread no lock can be held
/// by another at the fork, so the child may allocate and run ordinary code
/// (a parked sandbox reads its launch spec after the fork). Refused when
/// `<proc_root>/self/task` lists more than one thread.
pub fn fork_single_threaded(proc_root: &Path) -> io::Result<Option<i32>> {
    let threads = std::fs::read_dir(proc_root.join("self/task"))?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork a parked sandbox: this process runs {threads} threads, and its child could inherit a lock \
             one of them holds"
        )));
    }
    // SAFETY: the process has a single thread (checked above), so the child
    // inherits no lock held by another thread and may run any code.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child.as_raw())),
        nix::unistd::ForkResult::Child => Ok(None),
    }
}

/// Clears this process's parent-death signal: it outlives its parent.
pub fn clear_parent_death_signal() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0 as libc::c_ulong, 0, 0, 0) })
}

/// Puts `fd` on descriptor number `target`, replacing what was there, and
/// closes its old number.
pub fn place_fd(fd: std::os::fd::OwnedFd, target: RawFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if fd.as_raw_fd() != target {
        nix::unistd::dup2(fd.as_raw_fd(), target)?;
    }
    // A descriptor already on its number keeps it: forget, do not close.
    if fd.as_raw_fd() == target {
        std::mem::forget(fd);
    }
    Ok(())
}

/// Ends this process at once, without running exit handlers or flushing
/// buffers it shares with the process it was forked from.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(code) }
}

/// Reaps one exited child, any child, without blocking: `Some((pid, raw wait
/// status))`, or `None` when no child has exited.
pub fn reap_one() -> Option<(i32, i32)> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes to a valid, owned integer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (pid > 0).then_some((pid, status))
}

/// Sends `signal` to one process. A process that is already gone is not an error.
pub fn signal_process(pid: i32, signal: Signal) -> io::Result<()> {
    ignore_gone(kill(Pid::from_raw(pid), signal))
}

/// Sets the nice value of process `pid` (a process that is gone is no error).
pub fn set_nice(pid: i32, nice: i32) -> io::Result<()> {
    // SAFETY: setpriority takes integers only.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS as _, pid as libc::id_t, nice) };
    match r {
        0 => Ok(()),
        _ => ignore_gone(Err(nix::errno::Errno::last())),
    }
}

/// Sends `signal` to a process group.
pub fn signal_group(pgid: i32, signal: Signal) -> io::Result<()> {
    ignore_gone(killpg(Pid::from_raw(pgid), signal))
}

fn ignore_gone(r: nix::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Registers `fd` to receive one byte on every SIGCHLD.
pub fn notify_on_sigchld(fd: std::os::unix::net::UnixStream) -> io::Result<()> {
    signal_hook::low_level::pipe::register(signal_hook::consts::SIGCHLD, fd).map(|_| ())
}

/// Waits until one of `fds` is readable or `timeout_ms` passed.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout_ms: u16) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut pollfds: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
    match poll(&mut pollfds, PollTimeout::from(timeout_ms)) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// A timer tokio can wait on with microsecond precision (a `timerfd`):
/// tokio's own timer rounds each sleep up to a whole millisecond and more,
/// which is as long as a static app takes to start listening.
#[derive(Debug)]
pub struct PreciseTimer(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl PreciseTimer {
    /// A timer of the monotonic clock; must be made inside a tokio runtime.
    pub fn new() -> io::Result<PreciseTimer> {
        use std::os::fd::FromRawFd;
        // SAFETY: timerfd_create takes no pointers; a non-negative result is
        // a new descriptor that nothing else owns.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns the descriptor, which stays open and the
        // same for as long as it lives (OwnedFd always answers the same number).
        let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
        Ok(PreciseTimer(registered.map_err(io::Error::from)?))
    }

    /// Returns once `pause` has passed (at least a microsecond).
    pub async fn sleep(&mut self, pause: Duration) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let pause = pause.max(Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(pause.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(pause.subsec_nanos()),
            },
        };
        // SAFETY: `spec` is a valid itimerspec for the call's duration; the
        // old value is not asked for (null).
        if unsafe { libc::timerfd_settime(self.0.get_ref().as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut ready = self.0.readable().await?;
            // The expiry count, read once the timer fired; would block before.
            let mut count = [0u8; 8];
            match ready.try_io(|fd| nix::unistd::read(fd.get_ref().as_raw_fd(), &mut count).map_err(io::Error::from)) {
                Ok(read) => return read.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }
}

/// A sealed memory file holding `contents`, positioned at its start: how a
/// program (a seccomp filter) or arguments (the app's environment) are handed
/// to a child by descriptor. Unlike a pipe it never blocks the writer however
/// large the contents, and its seals keep anyone who gets the descriptor from
/// changing what the child reads.
pub fn sealed_file_with(name: &str, contents: &[u8]) -> io::Result<std::os::fd::OwnedFd> {
    use std::io::{Seek, Write};
    use std::os::fd::FromRawFd;
    let name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: name is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    check(fd)?;
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let mut file = std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    file.write_all(contents)?;
    file.rewind()?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a descriptor owned by `file`, integer arguments only.
    check(unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_ADD_SEALS, seals) })?;
    Ok(file.into())
}

/// Makes a FIFO at `path` with `mode`, unless one is there already; any
/// other file there is an error.
pub fn make_fifo(path: &Path, mode: u32) -> io::Result<()> {
    match nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(mode)) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST) => {
            use std::os::unix::fs::FileTypeExt as _;
            if std::fs::symlink_metadata(path)?.file_type().is_fifo() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a FIFO", path.display()),
                ))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// `fd` itself if its number is at least `min`, else a close-on-exec duplicate
/// numbered `min` or above (and `fd` is closed).
pub fn renumber_above(fd: std::os::fd::OwnedFd, min: RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    if fd.as_raw_fd() >= min {
        return Ok(fd);
    }
    let dup = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min)).map_err(io::Error::from)?;
    // SAFETY: fcntl returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(dup) })
}

/// `struct landlock_ruleset_attr` (linux/landlock.h); older kernels accept it
/// whole as long as the fields they do not know are zero.
#[repr(C)]
struct LandlockRulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_net_port_attr`.
#[repr(C)]
struct LandlockNetPortAttr {
    allowed_access: u64,
    port: u64,
}

const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
const LANDLOCK_RULE_NET_PORT: libc::c_uint = 2;
/// `LANDLOCK_ACCESS_NET_BIND_TCP` (ABI 4).
pub const LANDLOCK_NET_BIND_TCP: u64 = 1 << 0;
/// `LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET` (ABI 6).
pub const LANDLOCK_SCOPE_ABSTRACT_UNIX: u64 = 1 << 0;
/// `LANDLOCK_SCOPE_SIGNAL` (ABI 6).
pub const LANDLOCK_SCOPE_SIGNAL: u64 = 1 << 1;

/// The Landlock ABI version the running kernel offers, or the errno that says
/// why there is none (`ENOSYS`: not built in, `EOPNOTSUPP`: disabled at boot).
pub fn landlock_abi() -> Result<u32, Errno> {
    // SAFETY: with the VERSION flag the kernel reads neither pointer nor size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<LandlockRulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as u32)
    }
}

/// A Landlock ruleset that handles `handled_net` accesses, allows TCP binds
/// only to `bind_ports`, and applies the `scoped` restrictions. Returned as a
/// close-on-exec descriptor for [`ChildSetup::landlock`].
pub fn landlock_ruleset(handled_net: u64, bind_ports: &[u16], scoped: u64) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let attr = LandlockRulesetAttr { handled_access_fs: 0, handled_access_net: handled_net, scoped };
    // SAFETY: attr is a valid struct of the size given, read during the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const LandlockRulesetAttr,
            std::mem::size_of::<LandlockRulesetAttr>(),
            0u32,
        )
    };
    check(r as libc::c_int)?;
    // SAFETY: the kernel returned a new descriptor (close-on-exec) that nothing else owns.
    let ruleset = unsafe { std::os::fd::OwnedFd::from_raw_fd(r as RawFd) };
    for &port in bind_ports {
        let rule = LandlockNetPortAttr { allowed_access: LANDLOCK_NET_BIND_TCP, port: u64::from(port) };
        // SAFETY: rule is a valid struct read during the call; the descriptor is owned above.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset.as_raw_fd(),
                LANDLOCK_RULE_NET_PORT,
                &rule as *const LandlockNetPortAttr,
                0u32,
            )
        };
        check(r as libc::c_int)?;
    }
    Ok(ruleset)
}

/// Confines this process, every thread of it, for the rest of its life:
/// no_new_privs, then the seccomp `program` ([`crate::seccomp`] builds it).
pub fn confine_self(program: &[crate::seccomp::Insn]) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) })?;
    let mut filter: Vec<libc::sock_filter> =
        program.iter().map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k }).collect();
    let len = u16::try_from(filter.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a seccomp program has at most 65535 instructions"))?;
    let prog = libc::sock_fprog { len, filter: filter.as_mut_ptr() };
    // SAFETY: `prog` points at `filter`, both alive for the call; the kernel
    // copies the program. TSYNC puts every thread of the process under it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &prog as *const libc::sock_fprog,
        )
    };
    match ret {
        0 => Ok(()),
        r if r < 0 => Err(io::Error::last_os_error()),
        thread => Err(io::Error::other(format!("thread {thread} could not take the seccomp filter"))),
    }
}

/// This process's parent-death signal (0 for none) and its parent's pid.
pub fn parent_death_signal() -> io::Result<(i32, i32)> {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer, which
    // points at a live local.
    check(unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int as libc::c_ulong, 0, 0, 0) })?;
    // SAFETY: getppid has no arguments and cannot fail.
    Ok((signal, unsafe { libc::getppid() }))
}

/// Sets the parent-death signal again after a change of user: the kernel
/// clears it then, and a process that must not outlive its parent would
/// otherwise do so. If the parent (`parent`) is already gone, the signal is
/// raised at once, as the kernel would have.
pub fn restore_parent_death_signal(signal: i32, parent: i32) -> io::Result<()> {
    if signal == 0 {
        return Ok(());
    }
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) })?;
    // SAFETY: getppid has no arguments and cannot fail.
    if unsafe { libc::getppid() } != parent {
        // SAFETY: raising a signal at this process.
        check(unsafe { libc::raise(signal) })?;
    }
    Ok(())
}

/// Raises this process's soft limit on open files to its hard limit, so a
/// server's many client connections cannot leave it without descriptors for
/// its own work (files, sandboxes, databases). Returns the hard limit.
pub fn raise_open_files() -> Result<u64, Errno> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Takes ownership of a listening TCP socket this process inherited at `fd`
/// (the receiver keeps the router's sockets and passes them on). Refused
/// unless `fd` is an open socket that is listening, so a wrong number given
/// on the command line cannot make the caller own (and later close) a
/// descriptor something else in the process holds.
pub fn inherited_listener(fd: RawFd) -> io::Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: the descriptor is only borrowed for the duration of the check;
    // getsockopt fails with EBADF or ENOTSOCK if it is not an open socket.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if !nix::sys::socket::getsockopt(&borrowed, nix::sys::socket::sockopt::AcceptConn)? {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("descriptor {fd} is not a listening socket")));
    }
    // SAFETY: `fd` is an open listening socket (checked above), and the caller
    // states that nothing else in this process owns it.
    Ok(unsafe { std::net::TcpListener::from_raw_fd(fd) })
}

/// One netlink dump over `NETLINK_SOCK_DIAG`: sends `request` (a complete
/// message, header included) and returns the payload of every answer
/// message up to `NLMSG_DONE`. How the health check learns who owns the
/// sockets listening on a port: the kernel answers from its listening
/// table alone, where reading `/proc/net/tcp` walks every connection bucket
/// (5 ms each for IPv4 and IPv6 on a 24 GiB host, on every start).
pub fn sock_diag_dump(request: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    const HEADER: usize = 16;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkSockDiag)?;
    // A dump that stalls is an error, never a hang.
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(2, 0))?;
    again_if_interrupted(|| sendto(fd.as_raw_fd(), request, &NetlinkAddr::new(0, 0), MsgFlags::empty()))?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag answered {what}"));
    let mut payloads = Vec::new();
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let n = again_if_interrupted(|| recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()))?;
        if n == 0 {
            return Err(bad("nothing"));
        }
        let mut at = 0;
        while at + HEADER <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().map_err(|_| bad("a short header"))?) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < HEADER || at + len > n {
                return Err(bad("a message of a wrong length"));
            }
            let payload = &buf[at + HEADER..at + len];
            // Both end messages carry a status first: negative is an errno.
            let status = || {
                payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| bad("a short status"))
            };
            match kind {
                NLMSG_DONE | NLMSG_ERROR => {
                    let code = status()?;
                    return if code < 0 { Err(io::Error::from_raw_os_error(-code)) } else { Ok(payloads) };
                }
                _ => payloads.push(payload.to_vec()),
            }
            // Messages are aligned to 4 bytes.
            at += (len + 3) & !3;
        }
    }
}

/// Runs `call` again while a signal interrupts it. A socket with a receive
/// timeout is never restarted by the kernel, whatever `SA_RESTART` says
/// (signal(7)), and the receiver's process manager takes a SIGCHLD for each
/// of its children that ends (helper commands, the launches of shims):
/// without this, one landing during a start's socket check failed the start.
fn again_if_interrupted<T>(mut call: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match call() {
            Err(Errno::EINTR) => continue,
            done => return done,
        }
    }
}

/// Sends `data` with the descriptors `fds` attached (`SCM_RIGHTS`) over a
/// connected unix stream socket: how a router hands its listening sockets to
/// its successor. The receiving process gets its own copies; ours stay open.
pub fn send_fds(socket: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [io::IoSlice::new(data)];
    let sent = sendmsg::<()>(socket.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&raw)], MsgFlags::empty(), None)?;
    if sent != data.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, format!("sent {sent} of {} bytes", data.len())));
    }
    Ok(())
}

/// Receives one message of at most `buf.len()` bytes and the descriptors
/// attached to it (at most `MAX_FDS`, close-on-exec), as sent by
/// [`send_fds`]. Returns the bytes read and the descriptors, now owned here.
pub fn receive_fds<const MAX_FDS: usize>(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = c {
            // SAFETY: the kernel installed these descriptors in this process
            // for this message; nothing else knows their numbers yet.
            fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "more descriptors were sent than expected"));
    }
    Ok((msg.bytes, fds))
}

/// Takes ownership of descriptor `fd`, which this process inherited (a shim
/// gets a sandbox's seccomp program, environment and Landlock ruleset this
/// way). Refused unless `fd` is open, so a wrong number cannot make the
/// caller own a descriptor it never had.
pub fn inherited_fd(fd: RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(io::Error::from)?;
    // SAFETY: `fd` is open (checked above), and the caller states that it
    // was inherited and nothing else in this process owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Makes reads of `fd` return `WouldBlock` instead of waiting.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// An exclusive lock on `file` (`flock`), held until the returned value is
/// dropped or the process dies however it dies; `None` when another open
/// file description holds it.
pub fn try_lock(file: std::fs::File) -> io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io::Error::from(e)),
    }
}

/// An exclusive lock on `file` (`flock`), waited for; held until the
/// returned value is dropped or the process dies.
pub fn lock(file: std::fs::File) -> io::Result<nix::fcntl::Flock<std::fs::File>> {
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))
}

/// Looks up a user by name: `(uid, gid)`.
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    nix::unistd::User::from_name(name).ok().flatten().map(|u| (u.uid.as_raw(), u.gid.as_raw()))
}

/// Makes the character device node `path` (`major`, `minor`) with `mode`
/// (cut by the umask, as `mknod` does).
pub fn make_char_device(path: &Path, mode: u32, (major, minor): (u64, u64)) -> io::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    mknod(path, SFlag::S_IFCHR, Mode::from_bits_truncate(mode), makedev(major, minor)).map_err(io::Error::from)
}

/// The `(major, minor)` numbers of a device number (`st_rdev`).
pub fn device_numbers(rdev: u64) -> (u64, u64) {
    (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
}

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Replaces the file `name` in directory `dir` with `contents`, owned by
/// `owner` with `mode`, when another user (the one who will read the file)
/// owns `dir` and may plant links in it at any moment. Nothing here acts by
/// path inside `dir`: the directory is opened without following a link, the
/// new file is created under a fresh name that must not exist (`O_EXCL`, so a
/// planted link makes it fail rather than be followed), its owner and mode
/// are set on the open descriptor, and it is renamed over `name` within the
/// same open directory (a rename replaces a link, never follows it).
pub fn replace_file_in(dir: &Path, name: &str, contents: &[u8], mode: u32, owner: (u32, u32)) -> io::Result<()> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;

    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;

    let dir_file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW).bits())
        .open(dir)?;
    let dirfd = dir_file.as_raw_fd();
    let tmp = format!(".{name}.{:016x}.tmp", rand_u64());
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let raw = nix::fcntl::openat(Some(dirfd), tmp.as_str(), flags, Mode::from_bits_truncate(0o600))?;
    // SAFETY: `openat` just returned this descriptor and nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let written = (|| -> io::Result<()> {
        file.write_all(contents)?;
        nix::unistd::fchown(
            file.as_raw_fd(),
            Some(nix::unistd::Uid::from_raw(owner.0)),
            Some(nix::unistd::Gid::from_raw(owner.1)),
        )?;
        nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode))?;
        file.sync_all()?;
        nix::fcntl::renameat(Some(dirfd), tmp.as_str(), Some(dirfd), name)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = nix::unistd::unlinkat(Some(dirfd), tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
    written
}

/// Starts writing `len` bytes of `file` from `offset` out to its disk
/// without waiting for the writes to end (`sync_file_range(
/// SYNC_FILE_RANGE_WRITE)`; it may still wait for a busy disk's queue). A
/// file written this way piece by piece, as an upload arrives, reaches the
/// disk while the rest is still coming, and the fsync at its end waits only
/// for the last piece: for 20 MB here 0.7 ms against 11 ms. It makes nothing
/// durable by itself (no metadata, no cache flush); the fsync still does.
pub fn start_writeback(file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off64_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = libc::off64_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the call reads no memory of ours; the descriptor is borrowed
    // from `file`, open for the duration of the call.
    let done = unsafe {
        libc::sync_file_range(std::os::fd::AsRawFd::as_raw_fd(file), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A random number for a temporary name: std's hasher keys are random per
/// instance. A name someone guessed and planted only makes the `O_EXCL`
/// creation fail, never follow their link.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// A whole file mapped read-only and private: how the receiver inspects an
/// upload of up to `--max-upload` bytes without a copy of it in its own
/// memory (the kernel reads pages in from the page cache as they are looked
/// at, and may drop them again). Only for files nobody else can write: a
/// read past the end of a file that shrank while mapped is a SIGBUS.
pub struct MappedFile {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and private, owned by this value alone
// (unmapped once, in Drop); reading it from any thread is like reading a
// `Box<[u8]>`.
unsafe impl Send for MappedFile {}
// SAFETY: as above; nothing writes through the mapping.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `file` as it is now, from its first byte to its last.
    pub fn map(file: &std::fs::File) -> io::Result<MappedFile> {
        let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
        if len == 0 {
            // mmap refuses a length of 0; an empty file is an empty slice.
            return Ok(MappedFile { ptr: std::ptr::null_mut(), len: 0 });
        }
        // SAFETY: a new mapping chosen by the kernel (no address given), of a
        // descriptor `file` keeps open for the call; nothing aliases it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MappedFile { ptr, len })
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is a live readable mapping of `len` bytes until Drop,
        // and the returned slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping made in `map`, once; no
            // slice of it outlives `self`.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedFile({} bytes)", self.len)
    }
}

/// A process that is not (or no longer) this program's child, held by a
/// pidfd: signals and descriptor copies reach that process and never one
/// that later got its pid. What the receiver holds of a PostgreSQL or an
/// nx-router started by an earlier receiver.
#[derive(Debug)]
pub struct Pidfd {
    pid: i32,
    fd: std::os::fd::OwnedFd,
}

impl Pidfd {
    /// Opens `pid`; fails with `ESRCH` when no such process runs.
    pub fn open(pid: i32) -> io::Result<Pidfd> {
        Self::open_with(pid, libc::PIDFD_NONBLOCK)
    }

    /// Opens thread `tid` itself, which need not be its process's first
    /// (`PIDFD_THREAD`); `EINVAL` before Linux 6.9.
    pub fn open_thread(tid: i32) -> io::Result<Pidfd> {
        // PIDFD_THREAD is O_EXCL's bit (linux/pidfd.h).
        Self::open_with(tid, libc::PIDFD_NONBLOCK | libc::O_EXCL as libc::c_uint)
    }

    fn open_with(pid: i32, flags: libc::c_uint) -> io::Result<Pidfd> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags; it returns a new
        // descriptor or -1, and reads no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just created this descriptor for us alone.
        Ok(Pidfd { pid, fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) } })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal`; a process that has exited is not an error.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal with a null siginfo reads no memory.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return ignore_gone(Err(Errno::last()));
        }
        Ok(())
    }

    /// Whether the process has exited (its pidfd turns readable then).
    pub fn exited(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// A copy of the process's descriptor `target` (`pidfd_getfd`, which needs
    /// the right to ptrace it: root's): how a receiver takes back the
    /// listening sockets of a router it did not start.
    pub fn get_fd(&self, target: RawFd) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: pidfd_getfd takes descriptor numbers and flags only.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.fd.as_raw_fd(), target, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel installed a new descriptor (close-on-exec) for us alone.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn an_interrupted_call_is_made_again_and_other_errors_are_returned() {
        let mut calls = 0;
        let done = again_if_interrupted(|| {
            calls += 1;
            if calls < 3 {
                Err(Errno::EINTR)
            } else {
                Ok(7)
            }
        });
        assert_eq!((done, calls), (Ok(7), 3));
        let mut calls = 0;
        let failed = again_if_interrupted(|| -> nix::Result<()> {
            calls += 1;
            Err(Errno::EAGAIN)
        });
        assert_eq!((failed, calls), (Err(Errno::EAGAIN), 1));
    }

    #[test]
    fn writeback_starts_on_a_file_and_a_pipe_is_refused() {
        use std::io::Write;
        let mut file = tempfile_in_tmp();
        file.write_all(&[7u8; 3 << 20]).unwrap();
        start_writeback(&file, 0, 3 << 20).unwrap();
        start_writeback(&file, 1 << 20, 1 << 20).unwrap();
        let err = start_writeback(&file, u64::MAX, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let (read, _write) = nix::unistd::pipe().unwrap();
        let err = start_writeback(&std::fs::File::from(read), 0, 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESPIPE), "{err}");
    }

    #[test]
    fn a_mapped_file_reads_as_its_bytes_and_an_empty_one_as_nothing() {
        use std::io::Write;
        let mut file = tempfile_in_tmp();
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&bytes).unwrap();
        assert_eq!(&*MappedFile::map(&file).unwrap(), &bytes[..]);
        assert_eq!(&*MappedFile::map(&tempfile_in_tmp()).unwrap(), b"");
    }

    /// An unnamed temporary file.
    fn tempfile_in_tmp() -> std::fs::File {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open("/tmp")
            .unwrap()
    }

    #[test]
    fn only_a_listening_socket_is_taken_as_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let taken = inherited_listener(listener.into_raw_fd()).unwrap();
        assert_eq!(taken.local_addr().unwrap(), addr);

        let file = std::fs::File::open("/proc/self/status").unwrap();
        let err = inherited_listener(std::os::fd::AsRawFd::as_raw_fd(&file)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK), "{err}");

        let stream = std::net::TcpStream::connect(addr).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let err = inherited_listener(fd).unwrap_err();
        assert_eq!(err.to_string(), format!("descriptor {fd} is not a listening socket"));
    }
}

/// One `listen` a sandbox's process asked for, held by its filter's user
/// notification until [`ListenNotices::answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenCall {
    pub id: u64,
    /// The caller, in this process's pid namespace.
    pub pid: i32,
    /// Its socket's number, in the caller.
    pub fd: RawFd,
    pub backlog: i32,
}

/// The notification descriptor of a sandbox's `listen` filter
/// ([`ChildSetup::listen_notice`]).
#[derive(Debug)]
pub struct ListenNotices(std::os::fd::OwnedFd);

impl ListenNotices {
    pub fn new(fd: std::os::fd::OwnedFd) -> ListenNotices {
        ListenNotices(fd)
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }

    /// The next call; blocks until there is one (poll the descriptor first).
    /// A caller that died meanwhile is `ENOENT`.
    pub fn next(&self) -> io::Result<ListenCall> {
        use std::os::fd::AsRawFd;
        // SAFETY: an all-zero seccomp_notif is what the kernel requires.
        let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: the ioctl fills `notif`, which outlives the call.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut notif) })?;
        Ok(ListenCall {
            id: notif.id,
            pid: notif.pid as i32,
            fd: notif.data.args[0] as RawFd,
            backlog: notif.data.args[1] as i32,
        })
    }

    /// Whether call `id` still waits (its caller has not died since).
    pub fn waiting(&self, id: u64) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: the ioctl reads the id, which outlives the call.
        unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0 }
    }

    /// Ends call `id`: it returns 0, or -1 with `errno`.
    pub fn answer(&self, id: u64, result: Result<(), Errno>) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let resp = libc::seccomp_notif_resp { id, val: 0, error: result.err().map_or(0, |e| -(e as i32)), flags: 0 };
        // SAFETY: the ioctl reads `resp`, which outlives the call.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) })
    }
}

/// `listen(2)` on `socket` with `backlog` as given: the kernel holds it to
/// `net.core.somaxconn`, as it does for the caller it stands in for.
pub fn listen(socket: BorrowedFd<'_>, backlog: i32) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: listen takes a descriptor and an integer.
    Errno::result(unsafe { libc::listen(socket.as_raw_fd(), backlog) }).map(drop)
}
