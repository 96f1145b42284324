//! Replicas: production runs as N sandboxes, each on its own port, cgroup
//! and shim, and the router balances across the healthy ones. One replica
//! killed under load loses no request and comes back on its own; `nx ls`
//! and the API say how each replica is doing; the count is bounded by the
//! app's share of the host. Back-to-back changes of the count run one
//! scaling pass at a time and lose no request.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nx_e2e::fixtures::{self, Go};
use nx_e2e::load::Load;
use nx_e2e::{eventually, Receiver};

/// The app's own processes (not bwrap's) in the cgroup of one replica's
/// sandbox, named as its shim directory is (`<id>` for the first,
/// `<id>-<index>` for the others).
fn replica_app_pids(r: &Receiver, key: &str) -> Vec<i32> {
    let spec = std::fs::read(r.data_dir().join("shims").join(key).join("spec.json"));
    let Ok(spec) = spec.map(|s| serde_json::from_slice::<serde_json::Value>(&s).unwrap()) else { return Vec::new() };
    let dir = spec["cgroup"][0].as_str().expect("the sandbox has a cgroup on this host");
    let procs = std::fs::read_to_string(std::path::Path::new(dir).join("cgroup.procs")).unwrap_or_default();
    procs
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"/app/")))
        .collect()
}

/// The replicas of the app's production, as `nx ls --json` shows them.
fn replicas(r: &Receiver, app: &str) -> Vec<serde_json::Value> {
    let listing = r.nx(&["--json", "ls", app]).success().json();
    let deployments = listing[0]["deployments"].as_array().unwrap().clone();
    let production = deployments.into_iter().find(|d| d["production"] == true).expect("a production");
    production["replicas"].as_array().cloned().unwrap_or_default()
}

fn all_healthy(replicas: &[serde_json::Value], count: usize) -> bool {
    replicas.len() == count && replicas.iter().all(|r| r["state"] == "healthy")
}

#[test]
fn a_replica_killed_under_load_loses_no_request_and_comes_back() {
    let r = Receiver::start();
    r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--replicas", "3"]);
    let d = r.push("web", &fixtures::go(Go::Static), &["--env", "GREETING=replicated", "--promote"]);
    let id = d["id"].as_str().unwrap().to_owned();

    // The promotion brought up three replicas, healthy, each on a port and
    // a cgroup of its own.
    let three = eventually(30, "three healthy replicas", || {
        let now = replicas(&r, "web");
        all_healthy(&now, 3).then_some(now)
    });
    let ports: std::collections::BTreeSet<u64> = three.iter().map(|x| x["port"].as_u64().unwrap()).collect();
    assert_eq!(ports.len(), 3, "{three:?}");
    assert_eq!(three.iter().map(|x| x["index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2]);
    let pids: Vec<Vec<i32>> = (0..3).map(|i| replica_app_pids(&r, &replica_key(&id, i))).collect();
    assert!(pids.iter().all(|p| p.len() == 1), "one app process per replica: {pids:?}");

    let load = Load::start(r.router_port, format!("web.localhost:{}", r.router_port));
    eventually(30, "the load to be answered", || {
        (load.ok.load(std::sync::atomic::Ordering::Relaxed) > 50).then_some(())
    });
    kill(Pid::from_raw(pids[1][0]), Signal::SIGKILL).unwrap();

    // The killed replica is restarted by its supervisor, the others untouched.
    let back = eventually(60, "the killed replica to come back", || {
        let now = replicas(&r, "web");
        (all_healthy(&now, 3) && now[1]["restarts"] == 1).then_some(now)
    });
    let again = replica_app_pids(&r, &replica_key(&id, 1));
    assert_eq!(again.len(), 1);
    assert_ne!(again, pids[1], "a new process");
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 0)), pids[0], "replica 0 was not touched");
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 2)), pids[2], "replica 2 was not touched");
    let exit = back[1]["last_exit"].as_str().expect("the killed replica's exit is shown").to_owned();
    assert_eq!(back[1]["oom_killed"], false);
    for other in [&back[0], &back[2]] {
        assert_eq!(other["restarts"], 0, "{other}");
        assert!(other["last_exit"].is_null(), "{other}");
        assert!(other["uptime_secs"].as_u64().is_some(), "{other}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let (ok, bodies) = load.finish_without_failures();
    assert_eq!(bodies.into_iter().collect::<Vec<_>>(), ["replicated\n"]);
    eprintln!("{ok} requests answered while a replica was killed ({exit}), none failed");

    let text = r.nx_ok(&["ls", "web"]).stdout;
    let port1 = back[1]["port"].as_u64().unwrap();
    assert!(
        text.contains(&format!("{id} replica 1 (port {port1}): healthy, up ")),
        "nx ls shows each replica:\n{text}"
    );
    assert!(text.contains(&format!(", 1 restart, last exit: {exit}")), "{text}");
}

/// The name of replica `index`'s shim directory and cgroup.
fn replica_key(id: &str, index: u32) -> String {
    if index == 0 {
        id.to_owned()
    } else {
        format!("{id}-{index}")
    }
}

#[test]
fn replicas_beyond_the_range_or_the_apps_share_are_refused_with_what_to_do() {
    let r = Receiver::start();
    let key = r.create_app("web");
    let zero = r.nx(&["apps", "set", "web", "--replicas", "0"]);
    assert_ne!(zero.code, 0);
    assert!(zero.stderr.contains("replicas must be between 1 and 16, not 0"), "{}", zero.stderr);
    let many = r.nx(&["apps", "set", "web", "--replicas", "17"]);
    assert!(many.stderr.contains("replicas must be between 1 and 16, not 17"), "{}", many.stderr);
    // Each replica costs the app's limits: five of the default 1 cpu are
    // over the default cap of 4 per app, for the deploy key and the admin alike.
    let expected = "5 replicas of 1 cpu each need 5 cpu, over this server's cap of 4 per app; lower the replicas \
                    or the app's cpu limit (`nx apps set APP --cpu ...`), or the operator raises --max-app-cpu";
    for who in [key.as_str(), r.admin_token.as_str()] {
        let out = r.nx_with_key(who, &["apps", "set", "web", "--replicas", "5"]);
        assert_ne!(out.code, 0);
        assert!(out.stderr.contains(expected), "{}", out.stderr);
        // Another key would be refused alike, so none is suggested.
        assert!(!out.stderr.contains("nx login"), "{}", out.stderr);
    }
    // Nothing was saved; smaller cpu and /tmp limits make room for them
    // (five of the default 256 MiB /tmp are over the 1 GiB cap too).
    let replicas_setting =
        || r.nx(&["--json", "apps", "ls"]).success().json()[0]["settings"]["scale"]["replicas"].clone();
    assert!(replicas_setting().is_null());
    let tmp = r.nx(&["apps", "set", "web", "--replicas", "5", "--cpu", "0.5"]);
    assert!(tmp.stderr.contains("5 replicas of 256 MiB tmp each need 1280 MiB tmp"), "{}", tmp.stderr);
    r.nx_ok(&["apps", "set", "web", "--replicas", "5", "--cpu", "0.5", "--tmp", "128MiB"]);
    let set = r.nx_with_key(&key, &["apps", "set", "web", "--replicas", "4"]);
    assert_eq!(set.code, 0, "the deploy key may change the replicas within the app's share: {}", set.stderr);
    assert_eq!(replicas_setting(), 4);
}

#[test]
fn each_replica_is_adopted_as_it_runs_by_a_restarted_receiver_and_scaling_keeps_the_ones_that_stay() {
    let mut r = Receiver::start();
    r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--replicas", "2"]);
    let d = r.push("web", &fixtures::go(Go::Static), &["--promote"]);
    let id = d["id"].as_str().unwrap().to_owned();
    eventually(30, "two healthy replicas", || all_healthy(&replicas(&r, "web"), 2).then_some(()));
    let before: Vec<Vec<i32>> = (0..2).map(|i| replica_app_pids(&r, &replica_key(&id, i))).collect();
    assert!(before.iter().all(|p| p.len() == 1), "{before:?}");

    let status = r.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{status}:\n{}", r.log());
    r.start_again();
    eventually(30, "both replicas adopted", || all_healthy(&replicas(&r, "web"), 2).then_some(()));
    let after: Vec<Vec<i32>> = (0..2).map(|i| replica_app_pids(&r, &replica_key(&id, i))).collect();
    assert_eq!(after, before, "neither replica was restarted");
    let logs = r.nx_ok(&["logs", &id]).stdout;
    assert_eq!(logs.matches("adopted, healthy on 127.0.0.1:").count(), 2, "{logs}");

    // Three: the two that run stay as they are, a third starts.
    r.nx_ok(&["apps", "set", "web", "--replicas", "3"]);
    eventually(30, "a third replica", || all_healthy(&replicas(&r, "web"), 3).then_some(()));
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 0)), before[0]);
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 1)), before[1]);
    // One: the others stop, and their sandboxes are gone.
    r.nx_ok(&["apps", "set", "web", "--replicas", "1"]);
    eventually(30, "one replica", || all_healthy(&replicas(&r, "web"), 1).then_some(()));
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 0)), before[0]);
    eventually(30, "the other replicas' processes to end", || {
        (1..3).all(|i| replica_app_pids(&r, &replica_key(&id, i)).is_empty()).then_some(())
    });
    let answer = r.get(&format!("http://web.localhost:{}/", r.router_port));
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[test]
fn back_to_back_replica_changes_under_load_run_each_replica_once_and_lose_no_request() {
    let r = Receiver::start();
    r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--replicas", "3"]);
    let d = r.push("web", &fixtures::go(Go::Static), &["--env", "GREETING=scaled", "--promote"]);
    let id = d["id"].as_str().unwrap().to_owned();
    eventually(30, "three healthy replicas", || all_healthy(&replicas(&r, "web"), 3).then_some(()));
    let first = replica_app_pids(&r, &replica_key(&id, 0));
    assert_eq!(first.len(), 1, "{first:?}");

    let load = Load::start(r.router_port, format!("web.localhost:{}", r.router_port));
    eventually(30, "the load to be answered", || {
        (load.ok.load(std::sync::atomic::Ordering::Relaxed) > 50).then_some(())
    });
    // Each change starts a scaling pass at once: they run one after the
    // other, never two on one replica.
    for count in ["2", "4", "3", "1"] {
        r.nx_ok(&["apps", "set", "web", "--replicas", count]);
    }
    eventually(60, "one replica", || all_healthy(&replicas(&r, "web"), 1).then_some(()));
    eventually(30, "the other replicas' processes to end", || {
        (1..4).all(|i| replica_app_pids(&r, &replica_key(&id, i)).is_empty()).then_some(())
    });
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 0)), first, "replica 0 ran on, once");
    // The router stopped sending to each going replica before it stopped.
    std::thread::sleep(Duration::from_millis(500));
    let (ok, bodies) = load.finish_without_failures();
    assert_eq!(bodies.into_iter().collect::<Vec<_>>(), ["scaled\n"]);
    eprintln!("{ok} requests answered while scaling 3 → 2 → 4 → 3 → 1, none failed");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 0)), first, "no second supervisor restarted it");
    assert!((1..4).all(|i| replica_app_pids(&r, &replica_key(&id, i)).is_empty()), "no orphan replica");
}
