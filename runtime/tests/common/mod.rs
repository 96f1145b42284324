//! What the shim's and the pool's integration tests share: the real shim
//! binary, and a spec that runs a shell script as this user.

use std::path::{Path, PathBuf};

use nx_runtime::shim::ShimSpec;

/// The shim binary this package builds.
pub fn shim_program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nx-shim"))
}

/// A life of `/bin/sh -c script` as this process's user, its output in
/// `log`, in the cgroup directories `cgroup` (none: no cgroup).
pub fn script_spec(log: &Path, script: &str, cgroup: Vec<PathBuf>) -> ShimSpec {
    ShimSpec {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        user: (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw()),
        rlimits: vec![],
        cgroup,
        pass_fds: vec![],
        landlock: false,
        log: log.to_owned(),
        log_max_file_bytes: 1 << 20,
        log_keep_rotated: 1,
        proc_root: "/proc".into(),
        listen_port: None,
        hold: false,
    }
}

/// The user the listen checks run as: a unix socket records who listened.
pub const LISTEN_USER: (u32, u32) = (65534, 65534);

/// A script that tries to listen unbound, on `port` (bound first, from a
/// thread of its own: a notification names the thread), on `other` and on
/// an abstract unix socket, says how each went and who the unix socket's
/// listener is to a client, then connects to `port`;
/// [`assert_listen_checked`] reads what it said.
pub fn listen_check(port: u16, other: u16) -> String {
    let program = format!(
        r#"
import socket, struct, threading
def attempt(name, make):
    try:
        make()
        print(name, "listening", flush=True)
    except OSError as e:
        print(name, "refused:", e.strerror, flush=True)
def unbound():
    socket.socket().listen(1)
def own():
    s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen(1); own.keep = s
def other():
    s = socket.socket(); s.bind(("127.0.0.1", {other})); s.listen(1)
def unix():
    s = socket.socket(socket.AF_UNIX); s.bind("\0nx-listen-test-{port}"); s.listen(1); unix.keep = s
attempt("unbound", unbound)
t = threading.Thread(target=lambda: attempt("own", own)); t.start(); t.join()
attempt("other", other)
attempt("unix", unix)
c = socket.socket(socket.AF_UNIX); c.connect("\0nx-listen-test-{port}")
print("unix listener uid", struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1], flush=True)
c = socket.create_connection(("127.0.0.1", {port})); print("connected", flush=True)
"#
    );
    format!("exec python3 -c '{program}'")
}

/// Asserts the log of [`listen_check`] under a listen guard: only the
/// app's port and the unix socket listened, the unix one as the app's user.
pub fn assert_listen_checked(log: &str) {
    for line in [
        " unbound refused: Permission denied\n".to_owned(),
        " own listening\n".to_owned(),
        " other refused: Permission denied\n".to_owned(),
        " unix listening\n".to_owned(),
        format!(" unix listener uid {}\n", LISTEN_USER.0),
        " connected\n".to_owned(),
    ] {
        assert!(log.contains(&line), "no {line:?} in {log}");
    }
}
