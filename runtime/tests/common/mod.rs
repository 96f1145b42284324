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
    }
}
