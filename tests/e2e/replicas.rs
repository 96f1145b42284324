//! Replicas: production runs as N sandboxes, each on its own port, cgroup
//! and shim, and the router balances across the healthy ones. One replica
//! killed under load loses no request and comes back on its own; `nx ls`
//! and the API say how each replica is doing; the count is bounded by the
//! app's share of the host. Back-to-back changes of the count run one
//! scaling pass at a time and lose no request. A replica that hangs (alive,
//! not answering) is taken out of the route within one health interval, put
//! back when it answers again, and restarted when it stays hung.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nx_e2e::fixtures::{self, Go};
use nx_e2e::load::Load;
use nx_e2e::receiver::Options;
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
    replicas_of(r, app, |d| d["production"] == true)
}

/// The replicas of the app's first deployment `pick` chooses, as `nx ls --json` shows them.
fn replicas_of(r: &Receiver, app: &str, pick: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
    let listing = r.nx(&["--json", "ls", app]).success().json();
    let deployments = listing[0]["deployments"].as_array().unwrap().clone();
    let chosen = deployments.into_iter().find(pick).expect("the deployment is listed");
    chosen["replicas"].as_array().cloned().unwrap_or_default()
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

/// The addresses the router's own table sends `host` to: its state file,
/// which it writes before a table takes effect.
fn routed_addrs(r: &Receiver, host: &str) -> std::collections::BTreeSet<String> {
    let file = std::fs::read(r.data_dir().join("router/state/routes.json")).unwrap();
    let table: serde_json::Value = serde_json::from_slice(&file).unwrap();
    let target = &table["routes"][host]["target"];
    match target["kind"].as_str() {
        Some("live") => [target["addr"].as_str().unwrap().to_owned()].into(),
        Some("replicas") => {
            target["addrs"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect()
        }
        other => panic!("{host} is not routed to a sandbox ({other:?}): {table}"),
    }
}

#[test]
fn a_hung_replica_is_taken_out_within_the_health_interval_put_back_when_it_answers_and_restarted_when_it_stays_hung() {
    // Probes every 2 s, each given 2 s: a replica is unhealthy within 6 s of
    // stopping to answer, restarted after failing for 20 s.
    let r = Receiver::start_with(Options {
        args: ["--health-interval", "6s", "--unhealthy-restart-after", "20s"].map(String::from).to_vec(),
        ..Options::default()
    });
    r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--replicas", "3"]);
    let d = r.push("web", &fixtures::go(Go::Static), &["--env", "GREETING=probed", "--promote"]);
    let id = d["id"].as_str().unwrap().to_owned();
    let three = eventually(30, "three healthy replicas", || {
        let now = replicas(&r, "web");
        (all_healthy(&now, 3) && now.iter().all(|x| x["routed"] == true)).then_some(now)
    });
    let host = format!("web.localhost:{}", r.router_port);
    let addr = |x: &serde_json::Value| format!("127.0.0.1:{}", x["port"]);
    let addrs: Vec<String> = three.iter().map(addr).collect();
    assert_eq!(routed_addrs(&r, "web.localhost"), addrs.iter().cloned().collect());
    let pids: Vec<Vec<i32>> = (0..3).map(|i| replica_app_pids(&r, &replica_key(&id, i))).collect();
    assert!(pids.iter().all(|p| p.len() == 1), "one app process per replica: {pids:?}");
    let hung = Pid::from_raw(pids[1][0]);

    let load = Load::start(r.router_port, host.clone());
    eventually(30, "the load to be answered", || {
        (load.ok.load(std::sync::atomic::Ordering::Relaxed) > 50).then_some(())
    });

    // Stopped, the app's process neither exits nor refuses connections (the
    // kernel accepts for it): only its health check can tell.
    let stopped = std::time::Instant::now();
    kill(hung, Signal::SIGSTOP).unwrap();
    let reason = format!(
        "failed its health check 2 times in a row: {} accepted the connection but sent no HTTP answer within 2s",
        addrs[1]
    );
    let out = eventually(30, "the hung replica to be taken out", || {
        let now = replicas(&r, "web");
        (now[1]["state"] == "unhealthy" && now[1]["routed"] == false).then_some(now)
    });
    let taken_out = std::time::Instant::now();
    // Within one interval (6 s); the bound is twice that, for the polls of
    // `nx ls` on a loaded host.
    assert!(taken_out - stopped < Duration::from_secs(12), "{:?}", taken_out - stopped);
    assert_eq!(out[1]["error"], reason.as_str(), "{out:?}");
    assert_eq!(out[1]["restarts"], 0);
    for other in [&out[0], &out[2]] {
        assert_eq!((other["state"].as_str(), other["routed"].as_bool()), (Some("healthy"), Some(true)), "{other}");
    }
    assert_eq!(
        routed_addrs(&r, "web.localhost"),
        [addrs[0].clone(), addrs[2].clone()].into(),
        "the router's table leaves it out"
    );
    let text = r.nx_ok(&["ls", "web"]).stdout;
    assert!(text.contains(&format!("{id} replica 1 (port {}): unhealthy, not routed, up ", out[1]["port"])), "{text}");
    assert!(text.contains(&format!(", 0 restarts; {reason}")), "{text}");
    // Requests go on being answered by the two others.
    let answered = load.ok.load(std::sync::atomic::Ordering::Relaxed);
    eventually(30, "requests answered after the replica was taken out", || {
        (load.ok.load(std::sync::atomic::Ordering::Relaxed) > answered + 100).then_some(())
    });

    // Answering again: back in the route, the same process, no restart.
    kill(hung, Signal::SIGCONT).unwrap();
    eventually(30, "the replica to be put back", || {
        let now = replicas(&r, "web");
        (all_healthy(&now, 3) && now.iter().all(|x| x["routed"] == true)).then_some(())
    });
    assert_eq!(routed_addrs(&r, "web.localhost"), addrs.iter().cloned().collect());
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 1)), pids[1], "put back as it ran, not restarted");
    assert_eq!(replicas(&r, "web")[1]["restarts"], 0);
    let logs = r.nx_ok(&["logs", &id]).stdout;
    assert!(logs.contains(&format!("unhealthy: {reason}")), "{logs}");
    assert!(logs.contains(&format!("answers its health check again on {}", addrs[1])), "{logs}");

    // Hung for good: taken out again, then stopped and restarted through
    // the restart policy, and routed once healthy.
    let stopped_again = std::time::Instant::now();
    kill(hung, Signal::SIGSTOP).unwrap();
    eventually(30, "the replica to be taken out again", || {
        let now = replicas(&r, "web");
        (now[1]["state"] == "unhealthy" && now[1]["routed"] == false).then_some(())
    });
    let taken_out_again = std::time::Instant::now();
    let back = eventually(90, "the hung replica to be restarted", || {
        let now = replicas(&r, "web");
        (all_healthy(&now, 3) && now[1]["restarts"] == 1 && now.iter().all(|x| x["routed"] == true)).then_some(now)
    });
    let again = replica_app_pids(&r, &replica_key(&id, 1));
    assert_eq!(again.len(), 1);
    assert_ne!(again, pids[1], "a new process");
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 0)), pids[0], "replica 0 was not touched");
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 2)), pids[2], "replica 2 was not touched");
    assert_eq!(
        back[1]["last_exit"],
        format!(
            // bwrap's 128 + 9: the sandbox's init was killed after the stop
            // grace, the stopped app having never taken its SIGTERM.
            "status 137, stopped after failing its health check for 20s: {} accepted the connection but sent no \
             HTTP answer within 2s",
            addrs[1]
        )
        .as_str(),
        "{back:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failures, bodies) = load.finish_timed();
    assert_eq!(bodies.into_iter().collect::<Vec<_>>(), ["probed\n"]);
    // Requests the stopped process had (sent up to a second before it was
    // stopped, on a loaded host) or was sent before it was taken out may
    // wait for it until the client's timeout; none sent otherwise failed.
    let in_flight = Duration::from_secs(1);
    let hung_and_routed = |sent: &std::time::Instant| {
        (stopped - in_flight..taken_out).contains(sent) || (stopped_again - in_flight..taken_out_again).contains(sent)
    };
    let late: Vec<_> = failures.iter().filter(|(sent, _)| !hung_and_routed(sent)).collect();
    assert!(late.is_empty(), "{} requests sent after the replica was taken out failed: {late:?}", late.len());
    eprintln!("{ok} requests answered, {} sent before the hung replica was taken out failed", failures.len());
}

#[test]
fn previews_run_as_many_replicas_as_their_app_asks_of_previews_each_serving_within_the_caps() {
    let r = Receiver::start();
    r.create_app("web");
    // Each preview replica costs the app's limits too: five of the default
    // 1 cpu are over the default cap of 4 per app, and nothing is saved.
    let over = r.nx(&["apps", "set", "web", "--replicas", "5", "--role", "preview"]);
    assert_ne!(over.code, 0);
    assert!(
        over.stderr.contains(
            "5 preview replicas of 1 cpu each need 5 cpu, over this server's cap of 4 per app; lower the preview \
             replicas or the app's cpu limit (`nx apps set APP --cpu ...`), or the operator raises --max-app-cpu"
        ),
        "{}",
        over.stderr
    );
    let scale = || r.nx(&["--json", "apps", "ls"]).success().json()[0]["settings"]["scale"].clone();
    assert!(scale().is_null(), "nothing saved: {}", scale());
    r.nx_ok(&["apps", "set", "web", "--replicas", "2", "--role", "preview"]);
    assert_eq!(scale(), serde_json::json!({ "preview_replicas": 2 }), "production's count is not touched");

    r.push("web", &fixtures::go(Go::Static), &["--env", "GREETING=production", "--promote"]);
    let d = r.push("web", &fixtures::go(Go::Static), &["--env", "GREETING=preview"]);
    let id = d["id"].as_str().unwrap().to_owned();
    let preview = |d: &serde_json::Value| d["id"] == id.as_str();
    let two = eventually(30, "two healthy, routed preview replicas", || {
        let now = replicas_of(&r, "web", preview);
        (all_healthy(&now, 2) && now.iter().all(|x| x["routed"] == true)).then_some(now)
    });
    assert_eq!(replicas(&r, "web").len(), 1, "production runs one");
    // Two sandboxes, each with its own process, and each answering on its own port.
    let pids: Vec<Vec<i32>> = (0..2).map(|i| replica_app_pids(&r, &replica_key(&id, i))).collect();
    assert!(pids.iter().all(|p| p.len() == 1) && pids[0] != pids[1], "{pids:?}");
    for replica in &two {
        let answer = reqwest::blocking::get(format!("http://127.0.0.1:{}/", replica["port"])).unwrap();
        assert_eq!(answer.status(), 200, "{replica}");
        assert_eq!(answer.text().unwrap(), "preview\n", "{replica}");
    }
    // The router sends the preview's URL to both.
    let url = d["preview_url"].as_str().unwrap();
    let host = url.trim_start_matches("http://").split(':').next().unwrap();
    let addrs: std::collections::BTreeSet<String> = two.iter().map(|x| format!("127.0.0.1:{}", x["port"])).collect();
    assert_eq!(routed_addrs(&r, host), addrs);
    let answer = r.get(url);
    assert_eq!((answer.status, answer.body.as_str()), (200, "preview\n"));

    // Back to one: the running preview is scaled at once.
    r.nx_ok(&["apps", "set", "web", "--replicas", "1", "--role", "preview"]);
    eventually(30, "one preview replica", || all_healthy(&replicas_of(&r, "web", preview), 1).then_some(()));
    eventually(30, "the second replica's process to end", || {
        replica_app_pids(&r, &replica_key(&id, 1)).is_empty().then_some(())
    });
    assert_eq!(replica_app_pids(&r, &replica_key(&id, 0)), pids[0], "the first replica ran on");
}

#[test]
fn a_hung_single_replica_stays_routed_while_it_is_the_only_one_and_is_restarted() {
    let r = Receiver::start_with(Options {
        args: ["--health-interval", "3s", "--unhealthy-restart-after", "8s"].map(String::from).to_vec(),
        ..Options::default()
    });
    r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &["--env", "GREETING=alone", "--promote"]);
    let id = d["id"].as_str().unwrap().to_owned();
    let one = eventually(30, "one healthy replica", || {
        let now = replicas(&r, "web");
        (all_healthy(&now, 1) && now[0]["routed"] == true).then_some(now)
    });
    let addr = format!("127.0.0.1:{}", one[0]["port"]);
    let pid = replica_app_pids(&r, &id);
    assert_eq!(pid.len(), 1, "{pid:?}");

    // Unhealthy, but the deployment's only replica: it stays routed (it
    // may answer some requests; no route answers none) and the deployment
    // stays healthy until the restart.
    kill(Pid::from_raw(pid[0]), Signal::SIGSTOP).unwrap();
    let out = eventually(30, "the replica to be unhealthy", || {
        let now = replicas(&r, "web");
        (now[0]["state"] == "unhealthy").then_some(now)
    });
    assert_eq!(out[0]["routed"], true, "{out:?}");
    assert_eq!(routed_addrs(&r, "web.localhost"), [addr.clone()].into());
    let listing = r.nx(&["--json", "ls", "web"]).success().json();
    assert_eq!(listing[0]["deployments"][0]["state"], "healthy", "{listing}");
    let text = r.nx_ok(&["ls", "web"]).stdout;
    assert!(
        text.contains(&format!(
            "{id} replica 0 (port {}): unhealthy, still routed (no replica is healthy)",
            out[0]["port"]
        )),
        "{text}"
    );

    // Still hung after 8 s: stopped and restarted, a new process serving.
    let back = eventually(60, "the replica to be restarted", || {
        let now = replicas(&r, "web");
        (all_healthy(&now, 1) && now[0]["restarts"] == 1 && now[0]["routed"] == true).then_some(now)
    });
    assert!(
        back[0]["last_exit"].as_str().unwrap().ends_with(&format!(
            ", stopped after failing its health check for 8s: {addr} accepted the connection but sent no HTTP answer \
             within 1s"
        )),
        "{back:?}"
    );
    let again = replica_app_pids(&r, &id);
    assert!(again.len() == 1 && again != pid, "{again:?} {pid:?}");
    let answer = r.get(&format!("http://web.localhost:{}/", r.router_port));
    assert_eq!((answer.status, answer.body.as_str()), (200, "alone\n"));
}
