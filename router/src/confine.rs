//! What the router gives up once its listening sockets, control socket and
//! TLS key are open: root (it becomes `--user`, without supplementary groups
//! or capabilities) and most of the kernel (no_new_privs and a seccomp filter
//! that refuses, among others, ptrace, the mount family, module loading, bpf
//! and any exec). A router taken over through a parser bug is then an
//! unprivileged process that cannot start a shell.

use nix::unistd::{Gid, Uid, User};

/// Why the router could not confine itself; it then refuses to serve.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("user {user} does not exist; create it (useradd --system {user}) or pass another --user")]
    UnknownUser { user: String },
    #[error("cannot look up user {user}: {source}")]
    Lookup { user: String, source: nix::errno::Errno },
    #[error("cannot become user {user} (uid {uid}): {source}; start nx-router as root, or without --user")]
    Switch { user: String, uid: u32, source: nix::errno::Errno },
    #[error("this machine's architecture has no seccomp filter; nx-router runs on x86-64 and arm64")]
    Arch,
    #[error("cannot install the seccomp filter: {0}")]
    Filter(std::io::Error),
    #[error("cannot keep the parent-death signal across the change of user: {0}")]
    DeathSignal(std::io::Error),
}

/// Becomes `user` (when given and not already it), then installs the router's
/// seccomp filter on every thread.
pub fn confine(user: Option<&str>) -> Result<(), ConfineError> {
    if let Some(name) = user {
        become_user(name)?;
    }
    let arch = nx_runtime::seccomp::Arch::host().ok_or(ConfineError::Arch)?;
    nx_runtime::sys::confine_self(&nx_runtime::seccomp::router_filter(arch)).map_err(ConfineError::Filter)
}

/// Drops supplementary groups, then the group, then the user: in this order,
/// as each step needs the privileges the next one gives up. Leaving uid 0
/// clears every capability.
fn become_user(name: &str) -> Result<(), ConfineError> {
    let user = User::from_name(name)
        .map_err(|source| ConfineError::Lookup { user: name.into(), source })?
        .ok_or_else(|| ConfineError::UnknownUser { user: name.into() })?;
    if Uid::current() == user.uid && Uid::effective() == user.uid {
        return Ok(());
    }
    let switch = |source| ConfineError::Switch { user: name.into(), uid: user.uid.as_raw(), source };
    // The receiver gave the router a parent-death signal; changing user
    // clears it, and a router left behind by a killed receiver would keep
    // the listening sockets from the next one.
    let (death_signal, parent) = nx_runtime::sys::parent_death_signal().map_err(ConfineError::DeathSignal)?;
    nix::unistd::setgroups(&[]).map_err(switch)?;
    nix::unistd::setgid(user.gid).map_err(switch)?;
    nix::unistd::setuid(user.uid).map_err(switch)?;
    // Both ids, real and effective, are the user's: there is no way back.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() || Gid::effective() != user.gid {
        return Err(switch(nix::errno::Errno::EPERM));
    }
    nx_runtime::sys::restore_parent_death_signal(death_signal, parent).map_err(ConfineError::DeathSignal)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process the test below runs itself as.
    const CHILD: &str = "NX_ROUTER_CONFINE_TEST_CHILD";
    const TEST: &str = "confine::tests::a_confined_router_cannot_exec_unshare_or_mount";

    /// What a confined process observes, one `name=outcome` line each.
    fn observe() -> String {
        let errno = |r: Result<(), nix::errno::Errno>| match r {
            Ok(()) => "allowed".to_owned(),
            Err(e) => format!("{e:?}"),
        };
        let exec = std::process::Command::new("/bin/true")
            .status()
            .map(|_| ())
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)));
        // An unprivileged user may create a user namespace; the filter refuses.
        let unshare = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER);
        // A path that does not exist: without the filter this could mount nothing.
        let mount = nix::mount::mount(
            Some("none"),
            "/nonexistent-nx-router-confine-test",
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        let socket = std::net::TcpListener::bind("127.0.0.1:0").map(|_| ()).map_err(|_| nix::errno::Errno::EIO);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned()
        };
        format!(
            "uid={}\nexec={}\nunshare={}\nmount={}\nsocket={}\nSeccomp={}\nNoNewPrivs={}\nCapEff={}\n",
            Uid::current(),
            errno(exec),
            errno(unshare),
            errno(mount),
            errno(socket),
            field("Seccomp:"),
            field("NoNewPrivs:"),
            field("CapEff:"),
        )
    }

    /// Confinement is for the whole process and for good, so the test runs
    /// in a child: this same test binary, asked to run only this test, with
    /// [`CHILD`] set. The child confines itself (as `nobody` when root) and
    /// prints what it could still do.
    #[test]
    fn a_confined_router_cannot_exec_unshare_or_mount() {
        let root = Uid::effective().is_root();
        if std::env::var_os(CHILD).is_some() {
            confine(root.then_some("nobody")).unwrap();
            println!("<<<\n{}>>>", observe());
            return;
        }
        if std::env::var_os("CI").is_some() {
            assert!(root, "this test needs root under CI (it switches to nobody)");
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let report = stdout.split("<<<\n").nth(1).and_then(|r| r.split(">>>").next()).expect("the child's report");
        let nobody = User::from_name("nobody").unwrap().map(|u| u.uid);
        let uid = if root { nobody.expect("a nobody user") } else { Uid::current() };
        assert_eq!(
            report,
            format!(
                "uid={uid}\nexec=EPERM\nunshare=EPERM\nmount=EPERM\nsocket=allowed\n\
                 Seccomp=2\nNoNewPrivs=1\nCapEff=0000000000000000\n"
            )
        );
    }
}
