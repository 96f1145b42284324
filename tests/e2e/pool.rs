//! Parked sandboxes (`--sandbox-pool`, on by default, so every other test
//! of the suite runs its sandboxes from the pool too): a start takes one,
//! under the deployment's own cgroup name with its limits, and what is
//! parked never outlives the receiver that parked it.

use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use nx_e2e::receiver::{free_port, Options};
use nx_e2e::{bin, eventually, Receiver};

/// The parked slots' state directories, once `count` are parked.
fn parked(r: &Receiver, count: usize) -> Vec<PathBuf> {
    let pool = r.data_dir().join("pool");
    eventually(30, "the pool to be filled", || {
        let mut slots: Vec<PathBuf> = std::fs::read_dir(&pool).ok()?.flatten().map(|e| e.path()).collect();
        // The shim binds its socket before it starts its parked child.
        slots.retain(|s| s.join("control.sock").exists() && parked_processes(s).len() == 2);
        slots.sort();
        (slots.len() == count).then_some(slots)
    })
}

/// The cgroup directories a slot's process waits in (its `park.json`).
fn slot_cgroups(slot: &Path) -> Vec<PathBuf> {
    let park: serde_json::Value = serde_json::from_slice(&std::fs::read(slot.join("park.json")).unwrap()).unwrap();
    park["cgroup"].as_array().unwrap().iter().map(|d| PathBuf::from(d.as_str().unwrap())).collect()
}

/// The processes running `nx-shim --park` for `slot` (its shim and the
/// process it parked).
fn parked_processes(slot: &Path) -> Vec<i32> {
    let slot = slot.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.iter().any(|a| a == "--park") && args.contains(&slot) {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let zombie = stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
            if !zombie {
                pids.push(pid);
            }
        }
    }
    pids
}

fn scrape(addr: &str) -> String {
    let resp = reqwest::blocking::get(format!("http://{addr}/metrics")).unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().unwrap()
}

#[test]
fn a_push_starts_from_a_parked_sandbox_under_its_own_cgroup_with_its_limits() {
    let metrics = format!("127.0.0.1:{}", free_port());
    // Without a sandbox made during the upload (`--push-ready`), which a
    // push would start from instead; restarts and wakes without one take
    // parked sandboxes the same way.
    let args = ["--metrics-listen", &metrics, "--push-ready", "0"].map(String::from).to_vec();
    let r = Receiver::start_with(Options { args, ..Options::default() });
    let slots = parked(&r, 2);
    for slot in &slots {
        // Parked: root's shim and its child, in a cgroup of their own; no
        // app's code or variables.
        let pids = parked_processes(slot);
        assert_eq!(pids.len(), 2, "a shim and its parked process: {pids:?}");
        for pid in pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            assert!(status.lines().any(|l| l.starts_with("Uid:\t0\t")), "{status}");
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            assert!(
                !String::from_utf8_lossy(&environ).contains("NX_DEPLOYMENT="),
                "a parked process has no app's variables"
            );
        }
        let cgroups = slot_cgroups(slot);
        assert!(!cgroups.is_empty(), "this host has cgroups");
        // The slot's socket is bound before its child forks and joins, so
        // the join may still be under way: wait for it, and for no more.
        for dir in &cgroups {
            let procs = || std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            eventually(10, "the parked process to join its cgroup", || (!procs().is_empty()).then_some(()));
            let procs = procs();
            assert_eq!(procs.lines().count(), 1, "{}: only the parked process joined: {procs}", dir.display());
        }
    }

    r.create_app("web");
    let d = r.push("web", &bin("hello"), &[]);
    let id = d["id"].as_str().unwrap();
    assert_eq!(r.get(d["preview_url"].as_str().unwrap()).status, 200);
    let logs = r.nx_ok(&["logs", id]).stdout;
    assert!(logs.contains("[nx] started from a parked sandbox"), "{logs}");
    let text = scrape(&metrics);
    assert!(text.contains("nx_sandbox_starts_total{from=\"pool\"} 1\n"), "{text}");
    assert!(text.contains("nx_sandbox_starts_total{from=\"fresh\"} 0\n"), "{text}");
    assert!(text.contains("nx_sandbox_starts_total{from=\"ready\"} 0\n"), "{text}");

    // The first slot's cgroup is now the deployment's, by its name, with the
    // deployment's limits, holding the app.
    let taken = &slots[0];
    assert!(!taken.exists(), "a claimed slot's state directory is gone");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.data_dir().join("shims").join(id).join("spec.json")).unwrap()).unwrap();
    let dirs: Vec<PathBuf> =
        spec["cgroup"].as_array().unwrap().iter().map(|d| PathBuf::from(d.as_str().unwrap())).collect();
    let old = slot_cgroups_named(taken, &dirs);
    assert_eq!(dirs.len(), old.len());
    for (dir, was) in dirs.iter().zip(&old) {
        assert_eq!(dir.file_name().unwrap().to_str().unwrap(), id, "{}", dir.display());
        assert!(!was.exists(), "{} was renamed, not copied", was.display());
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(procs.lines().count() >= 3, "bwrap, nx-init and the app: {procs}");
    }
    let limit = |file: &str| {
        dirs.iter().map(|d| d.join(file)).find(|f| f.exists()).map(|f| std::fs::read_to_string(f).unwrap())
    };
    match limit("memory.limit_in_bytes").or_else(|| limit("memory.max")) {
        Some(m) => assert_eq!(m.trim(), (512u64 << 20).to_string()),
        None => panic!("no memory limit file in {dirs:?}"),
    }
    assert_eq!(limit("pids.max").unwrap().trim(), "512");
    // And the pool is filled again for the next start.
    let again = parked(&r, 2);
    assert!(!again.contains(taken));
}

/// The directories a claimed slot's cgroup had, paired with the
/// sandbox's: the slot's name under the same parents.
fn slot_cgroups_named(slot: &Path, dirs: &[PathBuf]) -> Vec<PathBuf> {
    let name = slot.file_name().unwrap();
    dirs.iter().map(|d| d.parent().unwrap().join(name)).collect()
}

#[test]
fn parked_sandboxes_end_with_their_receiver_and_stop_all_or_the_next_start_removes_them() {
    let mut r = Receiver::start();
    let first = parked(&r, 2);
    let first_cgroups: Vec<PathBuf> = first.iter().flat_map(|s| slot_cgroups(s)).collect();
    let processes: Vec<i32> = first.iter().flat_map(|s| parked_processes(s)).collect();
    assert_eq!(processes.len(), 4, "{processes:?}");
    let status = r.stop_with(Signal::SIGINT);
    assert!(status.success(), "{status}:\n{}", r.log());
    eventually(10, "the parked processes to end with the receiver", || {
        first.iter().all(|s| parked_processes(s).is_empty()).then_some(())
    });
    let out = r.stop_all();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("removed 2 parked sandboxes"), "{out:?}");
    for slot in &first {
        assert!(!slot.exists(), "{} is left", slot.display());
    }
    for dir in &first_cgroups {
        assert!(!dir.exists(), "the cgroup {} is left", dir.display());
    }

    // A receiver killed outright: its parked sandboxes die with it, and the
    // next start removes what they left (state and cgroup directories).
    r.start_again();
    let second = parked(&r, 2);
    let cgroups: Vec<PathBuf> = second.iter().flat_map(|s| slot_cgroups(s)).collect();
    r.stop_with(Signal::SIGKILL);
    eventually(10, "the parked processes to die with the killed receiver", || {
        second.iter().all(|s| parked_processes(s).is_empty()).then_some(())
    });
    assert!(second.iter().all(|s| s.exists()), "nothing removed them yet");
    r.start_again();
    let third = parked(&r, 2);
    for slot in &second {
        assert!(!slot.exists() && !third.contains(slot), "{} is left", slot.display());
    }
    for dir in &cgroups {
        assert!(!dir.exists(), "the cgroup {} is left", dir.display());
    }
    assert!(r.log().contains("removed the parked sandboxes an earlier receiver left"), "{}", r.log());
}
