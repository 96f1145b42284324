//! The shim binary on its own: one life of a process, its output in the log,
//! a re-attach after the first connection is gone, a stop on request, a
//! life that ends before its launcher connects, a flood of output held
//! to its budget, and a held life that runs only once told to go.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

use nx_runtime::shim::{last_exit, Outcome, Shim, ShimSpec};
use nx_runtime::ProcessManager;

fn spec(log: &Path, script: &str) -> ShimSpec {
    common::script_spec(log, script, Vec::new())
}

fn program_path() -> PathBuf {
    common::shim_program()
}

#[tokio::test]
async fn a_shim_runs_one_life_logs_it_and_outlives_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    let state = dir.path().join("shim");
    let pm = ProcessManager::global().unwrap();
    let spec = spec(&log, "echo out; echo err >&2; exec sleep 30");
    let first = Shim::launch(&pm, &program_path(), &state, &spec, vec![]).await.unwrap();
    let pid = first.pid();
    // Stopped only once it has printed (a stop before would end it first).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains(" err\n") {
        assert!(std::time::Instant::now() < deadline, "nothing printed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(first);
    // A new connection finds the same process: how a receiver re-attaches.
    let mut again = Shim::attach(&state).await.expect("the shim outlives the connection");
    assert_eq!(again.pid(), pid);
    let outcome = again.stop(Duration::from_secs(5)).await;
    let Outcome::Exited(exit) = outcome else { panic!("{outcome:?}") };
    assert_eq!(exit.status().signal(), Some(libc::SIGTERM), "{}", exit.describe());
    assert_eq!(last_exit(&state), Some(exit), "the exit is recorded for a receiver that was away");
    assert!(Shim::attach(&state).await.is_none(), "a shim runs one life");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(" out\n") && text.contains(" err\n"), "{text}");
    assert!(text.contains(" [nx] stopped\n"), "{text}");
}

#[tokio::test]
async fn an_exit_is_told_to_the_connected_receiver_and_a_failed_start_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    let pm = ProcessManager::global().unwrap();
    let mut shim = Shim::launch(&pm, &program_path(), &dir.path().join("a"), &spec(&log, "sleep 0.2; exit 3"), vec![])
        .await
        .unwrap();
    let outcome = shim.wait().await;
    assert!(matches!(outcome, Outcome::Exited(e) if e.status().code() == Some(3)), "{outcome:?}");

    let mut missing = spec(&log, "");
    missing.program = "/nonexistent/bwrap".into();
    let err = Shim::launch(&pm, &program_path(), &dir.path().join("b"), &missing, vec![]).await.unwrap_err();
    assert!(err.to_string().starts_with("cannot start /nonexistent/bwrap: "), "{err}");
}

#[tokio::test]
async fn an_app_that_exits_at_once_is_launched_and_ends_with_its_own_status() {
    // Such an app can end, and its shim remove its socket, between the shim's
    // "started" and the launcher's connection: the launch must still hand
    // back the life and how it ended, each time.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    let pm = ProcessManager::global().unwrap();
    for round in 0..20 {
        let state = dir.path().join(format!("s{round}"));
        let mut shim = Shim::launch(&pm, &program_path(), &state, &spec(&log, "exit 7"), vec![]).await.unwrap();
        let outcome = shim.wait().await;
        assert!(matches!(outcome, Outcome::Exited(e) if e.status().code() == Some(7)), "round {round}: {outcome:?}");
    }
}

/// A flood of empty lines costs the shim (root, outside the app's cgroup)
/// its budget, not a write each: past it the shim stops reading, the app's
/// writes wait in the full pipe, and the shim still answers a stop at once.
#[tokio::test]
async fn a_flood_of_lines_is_read_to_the_budget_and_a_stop_answered() {
    use nx_runtime::output::{LINES_BURST, LINES_PER_SECOND, TURN_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    let pm = ProcessManager::global().unwrap();
    let flood = 3_000_000;
    let script = format!("head -c {flood} /dev/zero | tr '\\0' '\\n'; echo after; exec sleep 30");
    let started = std::time::Instant::now();
    let mut shim =
        Shim::launch(&pm, &program_path(), &dir.path().join("s"), &spec(&log, &script), vec![]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Stored empty lines are a timestamp and a space.
    let empty = |text: &str| text.lines().filter(|l| l.strip_suffix(' ').is_some_and(|t| !t.contains(' '))).count();
    let text = std::fs::read_to_string(&log).unwrap();
    let (stored, elapsed) = (empty(&text), started.elapsed().as_secs_f64());
    // A turn's read (one line a byte here), the burst, and the rate since.
    let most = TURN_BYTES as f64 + LINES_BURST + LINES_PER_SECOND * elapsed;
    assert!(stored > 0 && (stored as f64) < most, "{stored} of {flood} lines stored in {elapsed:.1} s");
    assert!(!text.contains(" after\n"), "the flood was read whole");
    // The shim, busy with the flood, still takes the stop and ends it.
    let outcome = shim.stop(Duration::from_secs(1)).await;
    assert!(matches!(outcome, Outcome::Exited(_)), "{outcome:?}");
}

/// A shim given the app's port decides every `listen` of its process: a
/// socket listening unbound would be handed a port of the kernel's choosing,
/// so only one bound to the app's port, or a unix socket, may listen.
#[tokio::test]
async fn only_the_apps_port_and_unix_sockets_may_listen() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    let pm = ProcessManager::global().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut spec = spec(&log, &common::listen_check(port, other));
    spec.listen_port = Some(port);
    spec.user = common::LISTEN_USER;
    let mut shim = Shim::launch(&pm, &program_path(), &dir.path().join("s"), &spec, vec![]).await.unwrap();
    let outcome = shim.wait().await;
    assert!(matches!(outcome, Outcome::Exited(e) if e.status().code() == Some(0)), "{outcome:?}");
    common::assert_listen_checked(&std::fs::read_to_string(&log).unwrap());
}

/// A held spec runs nx-init, as in every sandbox, with the shim's pipe on
/// its go descriptor: `script` runs only after `go`.
fn held_spec(dir: &Path, log: &Path, script: &str) -> ShimSpec {
    let init = nx_runtime::spec::install_init(dir).unwrap();
    let mut spec = spec(log, "");
    spec.program = init;
    let go = nx_runtime::spec::GO_FD.to_string();
    spec.args = ["--go-fd", &go, "/bin/sh", "-c", script].into_iter().map(Into::into).collect();
    spec.hold = true;
    spec
}

/// The parent of `pid`, from `/proc`.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Waits up to 10 s for `what`.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The nice value of process `pid` (the 19th field of its `stat`).
fn nice_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[16].parse().unwrap()
}

/// A held sandbox waits, set up, until its shim is told `go`; told to stop
/// before, it ends without its program ever running (and the log says
/// nothing of a stop the app never saw); and a shim that dies while it
/// holds one takes it along without its program running.
#[tokio::test]
async fn a_held_sandbox_runs_its_program_only_once_told_to_go() {
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let script = format!("echo ran > {}; echo running; exec sleep 30", ran.display());
    let pm = ProcessManager::global().unwrap();

    let log = dir.path().join("go.log");
    let spec = held_spec(dir.path(), &log, &script);
    let mut shim = Shim::launch(&pm, &program_path(), &dir.path().join("go"), &spec, vec![]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!ran.exists(), "the program ran before go");
    assert!(!shim.exited(), "a held sandbox waits");
    // Held, it yields the CPU; the program it starts runs as any app.
    assert_eq!(nice_of(shim.pid()), nx_runtime::shim::HELD_NICE);
    shim.go().await.unwrap();
    until("the program to run after go", || ran.exists()).await;
    assert_eq!(nice_of(shim.pid()), 0, "the program runs at the held sandbox's priority");
    // Once it went, it is a sandbox like any: its shim outlives the
    // connection. (Without bwrap in between, the shim's SIGTERM misses
    // the app here, hence the short grace.)
    drop(shim);
    let mut again = Shim::attach(&dir.path().join("go")).await.expect("its shim outlives the connection");
    let outcome = again.stop(Duration::from_millis(100)).await;
    assert!(matches!(outcome, Outcome::Exited(_)), "{outcome:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(" running\n"), "{text}");

    std::fs::remove_file(&ran).unwrap();
    let log = dir.path().join("discarded.log");
    let spec = held_spec(dir.path(), &log, &script);
    let mut shim = Shim::launch(&pm, &program_path(), &dir.path().join("discard"), &spec, vec![]).await.unwrap();
    let started = std::time::Instant::now();
    let outcome = shim.stop(Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "a held sandbox waited out the grace period");
    let Outcome::Exited(exit) = outcome else { panic!("{outcome:?}") };
    assert_eq!(exit.status().signal(), Some(libc::SIGKILL), "{}", exit.describe());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("running") && !text.contains("killed") && !text.contains("stopped"), "{text}");

    let log = dir.path().join("orphaned.log");
    let spec = held_spec(dir.path(), &log, &script);
    let shim = Shim::launch(&pm, &program_path(), &dir.path().join("orphaned"), &spec, vec![]).await.unwrap();
    let init = shim.pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(parent_of(init)), nix::sys::signal::Signal::SIGKILL).unwrap();
    until("nx-init to end with its shim", || !Path::new(&format!("/proc/{init}")).exists()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!ran.exists(), "a sandbox whose shim died ran its program");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("running"), "{text}");
}
