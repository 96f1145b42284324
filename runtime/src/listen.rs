//! The listen guard: a sandbox's `listen` calls, decided by its shim.
//!
//! Landlock holds an app's TCP binds to its own port, but a socket that
//! listens without binding first is given a free port of the kernel's
//! automatic range, and Landlock does not see `listen`: an app holding every
//! such port made every `connect` on the host that needs a local port fail.
//! So the child installs one more filter before bwrap
//! ([`crate::seccomp::listen_filter`]) that hands each `listen` to the shim
//! as a user notification, and the shim ([`serve`]) takes the socket from
//! the calling thread (`pidfd_getfd`) and runs `listen` on that copy
//! itself, as the app's user (a unix socket records who listened), only
//! for a unix socket or one bound to the app's own port; anything else is
//! EACCES, the errno Landlock gives a bind it refuses. The shim never lets
//! the call go on in the caller (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`): the
//! caller could put another socket on that number between the check and
//! the call, and the socket checked is the socket listened on.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};

use crate::sys::{ListenCall, ListenNotices, Pidfd};

/// The most `listen` calls a shim answers a second. Each costs the shim
/// (root, outside the app's cgroup) a few system calls and the app only a
/// wait, so an app calling `listen` in a loop from many threads would spend
/// the shim's CPU; beyond this its calls wait, the app's threads with them.
/// An app listens a few times in its life.
pub const PER_SECOND: u32 = 1_000;

/// The calls a shim answered in the current second.
#[derive(Debug)]
pub struct Budget {
    since: Instant,
    answered: u32,
}

impl Budget {
    pub fn new(now: Instant) -> Budget {
        Budget { since: now, answered: 0 }
    }

    /// How many more calls may be answered at `now`.
    pub fn room(&mut self, now: Instant) -> u32 {
        if now.duration_since(self.since) >= Duration::from_secs(1) {
            *self = Budget::new(now);
        }
        PER_SECOND - self.answered
    }
}

/// The sandbox a shim answers for: its app's port and user, and the host's
/// `/proc`.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub port: u16,
    /// `(uid, gid)` the sandbox runs as: a unix socket records who listened
    /// on it, and its clients read that (`SO_PEERCRED`).
    pub user: (u32, u32),
    pub proc_root: PathBuf,
}

/// Answers the `listen` calls waiting in `sandbox`, as many as `budget`
/// leaves room for, a few at a time, without waiting for one (the shim's
/// loop wakes when one comes). False once every process of the sandbox has
/// ended and no call can come again.
pub fn serve(notices: &ListenNotices, sandbox: &Sandbox, budget: &mut Budget) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // A few a turn: the shim has its clients and the output to see to.
    for _ in 0..budget.room(Instant::now()).min(64) {
        let mut ready = [PollFd::new(notices.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut ready, PollTimeout::ZERO), Ok(n) if n > 0) {
            return true;
        }
        let events = ready[0].revents().unwrap_or(PollFlags::empty());
        if !events.contains(PollFlags::POLLIN) {
            return !events.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL);
        }
        let Ok(call) = notices.next() else { return true };
        budget.answered += 1;
        let result = decide(notices, &call, sandbox);
        // A caller that died meanwhile takes no answer.
        let _ = notices.answer(call.id, result);
    }
    true
}

fn decide(notices: &ListenNotices, call: &ListenCall, sandbox: &Sandbox) -> Result<(), Errno> {
    let caller = caller(call.pid, &sandbox.proc_root).map_err(|_| Errno::ESRCH)?;
    // Checked once the caller is held: a thread that ended and whose id
    // went to another would have ended the call.
    if !notices.waiting(call.id) {
        return Err(Errno::ESRCH);
    }
    let socket = caller.get_fd(call.fd).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))?;
    allowed(&socket, sandbox.port)?;
    as_user(sandbox.user, || crate::sys::listen(socket.as_fd(), call.backlog))
}

/// The calling thread `tid` (a notification names the thread, which need
/// not be its process's first), held by a pidfd: the thread itself where
/// the kernel opens threads (6.9), else its process, read from `/proc`.
fn caller(tid: i32, proc_root: &Path) -> std::io::Result<Pidfd> {
    match Pidfd::open_thread(tid) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let status = std::fs::read_to_string(proc_root.join(tid.to_string()).join("status"))?;
            let tgid = status
                .lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("no Tgid for thread {tid}")))?;
            Pidfd::open(tgid)
        }
        other => other,
    }
}

/// Runs `f` with the effective user and group `(uid, gid)`, then as root
/// again. The shim is one thread, so nothing else runs meanwhile. A unix
/// socket's listener pid (`SO_PEERCRED`, `SO_PEERPIDFD`) is the shim's all
/// the same: only the app's own process could give its own.
fn as_user<T>((uid, gid): (u32, u32), f: impl FnOnce() -> Result<T, Errno>) -> Result<T, Errno> {
    use nix::unistd::{setegid, seteuid, setgroups, Gid, Uid};
    // A unix socket records its listener's groups too (`SO_PEERGROUPS`):
    // none, the shim needing none of its own.
    setgroups(&[])?;
    setegid(Gid::from_raw(gid))?;
    if let Err(e) = seteuid(Uid::from_raw(uid)) {
        let _ = setegid(Gid::from_raw(0));
        return Err(e);
    }
    let result = f();
    // Root is the saved user: taking it back cannot fail, and a shim that
    // went on as the app's user would be no shim.
    if seteuid(Uid::from_raw(0)).and_then(|()| setegid(Gid::from_raw(0))).is_err() {
        crate::sys::exit_now(1);
    }
    result
}

/// Whether `socket` may listen in the sandbox whose app owns `port`: a unix
/// socket, or an IP one bound to that port.
fn allowed(socket: &OwnedFd, port: u16) -> Result<(), Errno> {
    let local: SockaddrStorage = getsockname(socket.as_raw_fd()).map_err(|_| Errno::ENOTSOCK)?;
    let bound = match local.family() {
        Some(AddressFamily::Unix) => return Ok(()),
        Some(AddressFamily::Inet) => local.as_sockaddr_in().map(|a| a.port()),
        Some(AddressFamily::Inet6) => local.as_sockaddr_in6().map(|a| a.port()),
        _ => None,
    };
    if port != 0 && bound == Some(port) {
        Ok(())
    } else {
        Err(Errno::EACCES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_a_thousand_calls_a_second() {
        let now = Instant::now();
        let mut budget = Budget::new(now);
        assert_eq!(budget.room(now), PER_SECOND);
        budget.answered = PER_SECOND;
        assert_eq!(budget.room(now + Duration::from_millis(999)), 0);
        assert_eq!(budget.room(now + Duration::from_secs(1)), PER_SECOND);
    }

    #[test]
    fn unix_sockets_and_the_apps_port_may_listen_and_nothing_else() {
        let own = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = own.local_addr().unwrap().port();
        let own: OwnedFd = own.into();
        assert_eq!(allowed(&own, port), Ok(()));
        assert_eq!(allowed(&own, port.wrapping_add(1)), Err(Errno::EACCES));
        // Unbound: the kernel would hand it a port of its choosing.
        let unbound: OwnedFd = nix::sys::socket::socket(
            AddressFamily::Inet6,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        assert_eq!(allowed(&unbound, port), Err(Errno::EACCES));
        assert_eq!(allowed(&unbound, 0), Err(Errno::EACCES), "port 0 is nobody's own");
        let (unix, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(allowed(&unix.into(), port), Ok(()));
        let file: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        assert_eq!(allowed(&file, port), Err(Errno::ENOTSOCK));
    }
}
