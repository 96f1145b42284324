//! The end-to-end harness: real `nx-receiver` (with its embedded PostgreSQL,
//! nx-router and bwrap sandboxes), the real `nx` CLI, and HTTP through the
//! router. Every test starts its own receiver in its own temporary directory
//! on its own ports, so tests run in parallel.
//!
//! The suite needs root, bubblewrap, PostgreSQL and Debian's caddy; the test
//! command installs them. A missing one fails the test with the fix, never a
//! silent pass.
// Harness code fails the test on the first surprise; unwrap says so plainly.
#![allow(clippy::unwrap_used)]

pub mod acme;
pub mod cloudflare;
pub mod drains;
pub mod exec;
pub mod fixtures;
pub mod github;
pub mod http;
pub mod load;
pub mod moto;
pub mod oidc;
pub mod postgres;
pub mod prometheus;
pub mod receiver;
pub mod runner;
pub mod server;
pub mod signed;
pub mod tls;

use std::path::{Path, PathBuf};

pub use receiver::Receiver;

/// The directory holding the workspace's built binaries (`target/debug`,
/// or `target/release` for the benchmarks), found from this executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-<hash> -> target/debug; target/release/nx-bench -> target/release
    let dir = exe.parent().expect("an executable lives in a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps lives in target/<profile>").to_owned()
    } else {
        dir.to_owned()
    }
}

/// A workspace binary, which must have been built (`cargo build --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace`; scripts/test.sh does it)",
        path.display()
    );
    path
}

/// Fails unless this process is root (the receiver gives every app its own uid).
pub fn require_root() {
    assert_eq!(nix::unistd::geteuid().as_raw(), 0, "the end-to-end suite must run as root (scripts/test.sh does)");
}

/// Fails unless `program` is installed, naming the package that provides it.
pub fn require_program(program: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|p| p.is_file()))
        .unwrap_or(None);
    found.unwrap_or_else(|| {
        panic!("{program} is not installed: apt-get install {package} (scripts/test.sh installs it)")
    })
}

fn scan_processes(mut keep: impl FnMut(&str, &str) -> bool) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let read = |f: &str| {
            String::from_utf8_lossy(&std::fs::read(entry.path().join(f)).unwrap_or_default()).replace('\0', " ")
        };
        let (cmdline, environ) = (read("cmdline"), read("environ"));
        if keep(&cmdline, &environ) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Processes that belong to a receiver: their command line names its data
/// directory (PostgreSQL's postmaster, nx-router, bwrap) or their environment
/// names one of `deployments` (the apps inside the sandboxes).
pub fn processes_of(data_dir: &Path, deployments: &[&str]) -> Vec<(i32, String)> {
    let data = data_dir.to_string_lossy().into_owned();
    scan_processes(|cmdline, environ| {
        cmdline.contains(&data) || deployments.iter().any(|d| environ.contains(&format!("NX_DEPLOYMENT={d} ")))
    })
}

/// The processes of one deployment: its bwrap, whose command line names the
/// deployment's run directory, and everything inside, whose environment names
/// the deployment.
pub fn deployment_processes(data_dir: &Path, deployment: &str) -> Vec<(i32, String)> {
    let run_dir = format!("{}/run/{deployment}/", data_dir.display());
    let env = format!("NX_DEPLOYMENT={deployment} ");
    scan_processes(|cmdline, environ| cmdline.contains(&run_dir) || environ.contains(&env))
}

/// The app's own processes (inside the sandbox) of one deployment: `(pid,
/// command line)`; not bwrap, nor the sandbox's nx-init.
pub fn app_processes(data_dir: &Path, deployment: &str) -> Vec<(i32, String)> {
    deployment_processes(data_dir, deployment).into_iter().filter(|(_, cmd)| cmd.starts_with("/app/")).collect()
}

/// Polls `f` until it returns `Some`, for at most `secs` seconds.
pub fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {secs}s waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
