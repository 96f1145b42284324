//! Parked sandboxes with the real shim binary, against a cgroup root made of
//! plain directories (the parked process "joins" by writing its `0` into
//! each `cgroup.procs`, as on cgroupfs): a claim renames the slot, writes
//! the limits before the app runs, and never hands one slot out twice; a
//! slot that died is not used; `clean` ends what is parked.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use nx_runtime::cgroup::{Driver, Limits};
use nx_runtime::pool::{clean, Claim, Pool, PoolConfig};
use nx_runtime::shim::{Outcome, ShimSpec};
use nx_runtime::ProcessManager;

/// A cgroup v1 layout with memory, cpu and pids hierarchies.
fn cgroup_root(dir: &Path) -> Driver {
    for (h, probe) in [("memory", "memory.limit_in_bytes"), ("cpu", "cpu.cfs_quota_us"), ("pids", "cgroup.procs")] {
        std::fs::create_dir_all(dir.join(h)).unwrap();
        std::fs::write(dir.join(h).join(probe), "").unwrap();
    }
    Driver::detect(dir)
}

fn pool(dir: &Path, size: usize) -> Pool {
    let cfg = PoolConfig {
        size,
        dir: dir.join("pool"),
        shim: common::shim_program(),
        cgroups: cgroup_root(&dir.join("cgroup")),
        group: "nx".into(),
        proc_root: "/proc".into(),
    };
    Pool::new(cfg, ProcessManager::global().unwrap())
}

fn limits() -> Limits {
    Limits { memory_bytes: Some(64 << 20), cpu_millis: Some(500), pids: Some(32), ..Limits::NONE }
}

fn spec(dir: &Path, name: &str, script: &str, cgroup: &nx_runtime::cgroup::Cgroup) -> ShimSpec {
    common::script_spec(&dir.join(format!("{name}.log")), script, cgroup.dirs().to_vec())
}

/// A start of `script` as deployment `name` through `pool`: its cgroup
/// (under `dir/cgroup`, with [`limits`]), spec and state directory
/// (`dir/shims/NAME`) made as the supervisor makes them.
async fn claim(pool: &Pool, dir: &Path, name: &str, script: &str) -> Claim {
    let target = Driver::detect(&dir.join("cgroup")).prepare("nx", name, &limits());
    let spec = spec(dir, name, script, &target);
    pool.launch(&target, &dir.join("shims").join(name), &spec, &[]).await
}

/// The parked slots' state directories.
fn slots(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("pool")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

/// The pid of a slot's parked process, as its shim tells a client that looks.
fn parked_pid(slot: &Path) -> i32 {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(slot.join("control.sock")).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    said.trim().strip_prefix("parked ").unwrap().parse().unwrap()
}

fn alive(pid: i32) -> bool {
    // A zombie has ended: read its state rather than probe with a signal.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// The parent of process `pid`, from `/proc`.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_claimed_slot_runs_the_sandbox_under_its_name_with_the_limits_already_written() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path(), 1);
    assert_eq!(pool.fill().await.unwrap(), 1);
    let slot = slots(dir.path()).pop().unwrap();
    let name = slot.file_name().unwrap().to_str().unwrap().to_owned();
    let cg = dir.path().join("cgroup");
    // The parked process joined its cgroup when it was parked.
    for h in ["memory", "cpu", "pids"] {
        let procs = std::fs::read_to_string(cg.join(h).join("nx").join(&name).join("cgroup.procs")).unwrap();
        assert_eq!(procs, "0", "{h}: joined at park time");
    }
    let pid = parked_pid(&slot);

    // The app's first act: read its limits.
    let script = format!("cat {}; echo; exec sleep 30", cg.join("pids/nx/d1/pids.max").display());
    let state = dir.path().join("shims/d1");
    let claim = claim(&pool, dir.path(), "d1", &script).await;
    let Claim::Started(shim) = claim else { panic!("{claim:?}") };
    assert_eq!(shim.pid(), pid, "the parked process itself runs the sandbox");
    assert_eq!(pool.starts(), (1, 0));
    assert!(!slot.exists(), "the slot's state directory is gone");
    assert!(!cg.join("pids/nx").join(&name).exists(), "the slot's cgroup now has the sandbox's name");
    assert_eq!(
        std::fs::read_to_string(cg.join("memory/nx/d1/memory.limit_in_bytes")).unwrap(),
        (64u64 << 20).to_string()
    );
    until("the app printed its pids limit", || {
        std::fs::read_to_string(dir.path().join("d1.log")).unwrap_or_default().contains(" 32\n")
    })
    .await;
    // Its state directory is any shim's: it is found there again.
    drop(shim);
    let mut shim = nx_runtime::shim::Shim::attach(&state).await.expect("attached by its state directory");
    assert_eq!(shim.pid(), pid);
    assert!(matches!(shim.stop(Duration::from_secs(5)).await, Outcome::Exited(_)));
}

/// A sandbox started from a parked slot has its `listen` calls decided by
/// its shim, as a fresh one's are: the parked child sends the shim its
/// filter's descriptor before it `exec`s.
#[tokio::test]
async fn a_claimed_slots_listen_calls_are_its_shims_to_decide() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path(), 1);
    assert_eq!(pool.fill().await.unwrap(), 1);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let target = Driver::detect(&dir.path().join("cgroup")).prepare("nx", "d1", &limits());
    let mut spec = spec(dir.path(), "d1", &common::listen_check(port, other), &target);
    spec.listen_port = Some(port);
    spec.user = common::LISTEN_USER;
    let claim = pool.launch(&target, &dir.path().join("shims/d1"), &spec, &[]).await;
    let Claim::Started(mut shim) = claim else { panic!("{claim:?}") };
    assert_eq!(pool.starts(), (1, 0));
    let outcome = shim.wait().await;
    assert!(matches!(outcome, Outcome::Exited(e) if e.status().code() == Some(0)), "{outcome:?}");
    common::assert_listen_checked(&std::fs::read_to_string(dir.path().join("d1.log")).unwrap());
}

#[tokio::test]
async fn a_slot_is_handed_out_once_and_an_empty_pool_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path(), 1);
    pool.fill().await.unwrap();
    let slot = slots(dir.path()).pop().unwrap();
    let claimed = claim(&pool, dir.path(), "a", "exec sleep 30").await;
    let Claim::Started(mut a) = claimed else { panic!("{claimed:?}") };
    // Nothing refills this pool: the next start is told to go the usual way.
    let claim = claim(&pool, dir.path(), "b", "exec sleep 30").await;
    assert!(matches!(claim, Claim::Empty), "{claim:?}");
    assert_eq!(pool.starts(), (1, 1));
    // And the shim that ran the first takes no second `go`: its parked
    // socket is gone with its slot.
    assert!(std::os::unix::net::UnixStream::connect(slot.join("control.sock")).is_err());
    a.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_go_longer_than_one_read_arrives_whole_after_others_looked_at_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path(), 1);
    pool.fill().await.unwrap();
    let slot = slots(dir.path()).pop().unwrap();
    // Clients that look while the pool holds its own connection open; one
    // stays connected and silent.
    let pid = parked_pid(&slot);
    assert_eq!(parked_pid(&slot), pid);
    let _silent = std::os::unix::net::UnixStream::connect(slot.join("control.sock")).unwrap();
    // The spec travels in `go`: a 100 KB command line is more than the
    // shim's first read takes.
    let padding = "x".repeat(100_000);
    let script = format!(": {padding}; echo the whole go arrived; exec sleep 30");
    let claimed = claim(&pool, dir.path(), "long", &script).await;
    let Claim::Started(mut shim) = claimed else { panic!("{claimed:?}") };
    assert_eq!(shim.pid(), pid);
    until("the app ran its command line to its end", || {
        std::fs::read_to_string(dir.path().join("long.log")).unwrap_or_default().contains("the whole go arrived")
    })
    .await;
    // And the shim wrote the spec it was sent where a restarted receiver
    // looks for it.
    let written = nx_runtime::shim::read_spec(&dir.path().join("shims/long")).expect("spec.json written");
    assert!(written.args.iter().any(|a| a.contains(&padding)));
    shim.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_slot_that_died_is_not_used_and_nothing_of_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path(), 1);
    pool.fill().await.unwrap();
    let slot = slots(dir.path()).pop().unwrap();
    let pid = parked_pid(&slot);
    let shim = parent_of(pid);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    // Its shim sees it gone and ends: its process, not only its socket's
    // file, which goes a moment before the connection the pool holds.
    until("the parked shim ended", || !alive(shim)).await;
    let claim = claim(&pool, dir.path(), "d1", "exit 0").await;
    let Claim::Unusable(why) = claim else { panic!("{claim:?}") };
    assert_eq!(why, format!("the parked slot {} does not answer: its shim has ended", slot.display()));
    assert!(!slot.exists(), "the dead slot is removed");
    assert!(
        !dir.path().join("cgroup/pids/nx/d1").exists(),
        "nothing of the sandbox was made: the usual start makes it"
    );
    assert_eq!(pool.starts(), (0, 1));
}

#[tokio::test]
async fn clean_ends_what_is_parked_and_a_killed_shim_takes_its_parked_process_along() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path(), 2);
    assert_eq!(pool.fill().await.unwrap(), 2);
    let parked: Vec<(PathBuf, i32)> = slots(dir.path()).into_iter().map(|s| (s.clone(), parked_pid(&s))).collect();

    // A parked shim killed outright (as with the receiver it dies with):
    // its parked process goes with it.
    let (_, victim) = &parked[0];
    let stat = std::fs::read_to_string(format!("/proc/{victim}/stat")).unwrap();
    let shim: i32 = stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::Signal::SIGKILL).unwrap();
    until("the parked process died with its shim", || !alive(*victim)).await;

    assert_eq!(clean(&dir.path().join("pool")), 2);
    let (_, other) = &parked[1];
    until("clean ended the other parked process", || !alive(*other)).await;
    assert!(slots(dir.path()).is_empty(), "no slot's state directory is left");
}
