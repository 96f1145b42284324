//! The platform restarts and upgrades under load: in the default mode (the
//! receiver runs nx-router itself) PostgreSQL, nx-router and the apps all
//! outlive a receiver SIGTERM; the next receiver, the same binary or a new
//! one, adopts them, and no request fails meanwhile, not even an app's that
//! queries its database on every request. `stop-all` stops them all; a
//! router the receiver did not start is never taken over.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use nx_e2e::fixtures::{self, Go};
use nx_e2e::load::Load;
use nx_e2e::receiver::{psql, Options};
use nx_e2e::{bin, eventually, processes_of, Receiver};

/// The time the API may take to answer again after a receiver starts: a
/// generous bound for a loaded 2-core machine; the goal (and what the notes
/// report) is under a second.
const API_BACK_WITHIN: Duration = Duration::from_secs(10);

/// The pid in the cluster's `postmaster.pid`.
fn postmaster(r: &Receiver) -> i32 {
    let text = std::fs::read_to_string(r.data_dir().join("postgres/cluster/postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

/// The nx-router processes of this receiver (their command line names its data directory).
fn routers(r: &Receiver) -> Vec<i32> {
    processes_of(&r.data_dir(), &[]).into_iter().filter(|(_, c)| c.contains("nx-router")).map(|(p, _)| p).collect()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// Each app gets two keep-alive clients and one that opens a connection per
/// request (a refused or reset connection shows there).
fn loads(r: &Receiver, hosts: &[String]) -> Vec<Load> {
    hosts
        .iter()
        .flat_map(|h| {
            [Load::start_with(r.router_port, h.clone(), 2, true), Load::start_with(r.router_port, h.clone(), 1, false)]
        })
        .collect()
}

fn answered(loads: &[Load]) -> Vec<u64> {
    loads.iter().map(|l| l.ok.load(std::sync::atomic::Ordering::SeqCst)).collect()
}

/// Waits until every client has more answers than in `before`.
fn all_progress(loads: &[Load], before: &[u64], what: &str) {
    eventually(30, what, || answered(loads).iter().zip(before).all(|(now, then)| now > then).then_some(()));
}

/// A copy of the receiver, nx-router and nx-shim in another directory: a
/// new version of the platform's binaries.
fn new_binaries(r: &Receiver) -> PathBuf {
    let dir = r.dir.path().join("v2");
    std::fs::create_dir(&dir).unwrap();
    for name in ["nx-receiver", "nx-router", "nx-shim"] {
        std::fs::copy(bin(name), dir.join(name)).unwrap();
    }
    dir.join("nx-receiver")
}

#[test]
fn receiver_restarts_and_upgrades_under_load_on_three_apps_fail_no_request_and_keep_postgres_and_router() {
    let mut r = Receiver::start_with(Options {
        env: vec![("NX_DB_STATEMENT_TIMEOUT".into(), "2s".into()), ("NX_DB_WATCHDOG_INTERVAL".into(), "300ms".into())],
        ..Options::default()
    });
    let mut hosts = Vec::new();
    for (app, binary) in
        [("web", fixtures::go(Go::Static)), ("site", fixtures::go(Go::Static)), ("counter", bin("hello"))]
    {
        r.create_app(app);
        let d = r.push(app, &binary, &["--env", &format!("GREETING={app}-answers")]);
        r.nx_ok(&["promote", d["id"].as_str().unwrap(), "--app", app]);
        hosts.push(format!("{app}.localhost:{}", r.router_port));
    }
    let loads = loads(&r, &hosts);
    all_progress(&loads, &vec![20; loads.len()], "every client to be answered");
    let pg = postmaster(&r);
    let router = routers(&r);
    assert_eq!(router.len(), 1, "{router:?}");

    // 1. The same binary: SIGTERM, then start again.
    let status = r.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{status}:\n{}", r.log());
    assert!(alive(pg) && alive(router[0]), "PostgreSQL and nx-router outlive the receiver");
    // No receiver: every app answers, the one using its database too.
    all_progress(&loads, &answered(&loads), "every client to be answered while no receiver runs");
    r.start_again();
    let first = r.api_answered.unwrap();
    eprintln!("restart: the API answered {first:?} after the receiver started");
    assert_eq!(postmaster(&r), pg, "PostgreSQL was adopted, not restarted");
    assert_eq!(routers(&r), router, "nx-router was adopted, not restarted");
    assert!(r.log().contains("embedded PostgreSQL adopted"), "{}", r.log());
    assert!(r.log().contains("nx-router adopted"), "{}", r.log());
    // The watchdog holds apps to their limits through the adopted cluster:
    // it cancels the statement past the cap, or ends its session when its
    // first look at it comes past twice the cap (a round delayed while the
    // restarted receiver takes its deployments back on a loaded host).
    let err = psql(&r.db_url("counter"), "SET statement_timeout = 0; SELECT pg_sleep(60)").unwrap_err();
    assert!(
        err.contains("canceling statement due to user request")
            || err.contains("terminating connection due to administrator command"),
        "{err}"
    );

    // 2. A new binary (another path): the router is replaced as a reload
    // does, PostgreSQL is adopted again.
    all_progress(&loads, &answered(&loads), "every client to be answered");
    r.stop_with(Signal::SIGTERM);
    r.options.bin = Some(new_binaries(&r));
    r.start_again();
    let second = r.api_answered.unwrap();
    eprintln!("upgrade: the API answered {second:?} after the new receiver started");
    assert_eq!(postmaster(&r), pg, "PostgreSQL was adopted by the new receiver");
    let next = eventually(30, "the old nx-router to drain and exit", || {
        let now = routers(&r);
        (now.len() == 1 && now != router && !alive(router[0])).then_some(now)
    });
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", next[0])).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).starts_with(&format!("{}/v2/nx-router", r.dir.path().display())));
    assert!(r.log().contains("the running nx-router is not the one configured now"), "{}", r.log());
    all_progress(&loads, &answered(&loads), "every client to be answered by the new router");

    for (load, host) in loads.into_iter().zip(hosts.iter().flat_map(|h| [h, h])) {
        let (ok, bodies) = load.finish_without_failures();
        let app = host.split('.').next().unwrap();
        assert!(bodies.iter().all(|b| b.starts_with(&format!("{app}-answers"))), "{host}: {bodies:?}");
        eprintln!("{host}: {ok} requests answered, none failed");
    }
    for (what, took) in [("restart", first), ("upgrade", second)] {
        assert!(took < API_BACK_WITHIN, "{what}: the API took {took:?}");
    }
    for app in ["web", "site", "counter"] {
        let listing = r.nx_ok(&["--json", "ls", app]).json();
        assert_eq!(listing[0]["deployments"][0]["state"], "healthy", "{app}: {listing}");
    }
}

#[test]
fn stop_all_leaves_no_postmaster_and_no_router() {
    let mut r = Receiver::start();
    r.create_app("counter");
    let d = r.push("counter", &bin("hello"), &[]);
    let (pg, router) = (postmaster(&r), routers(&r));
    assert_eq!(router.len(), 1, "{router:?}");
    r.stop_with(Signal::SIGTERM);
    assert!(alive(pg) && alive(router[0]), "both outlive the receiver");
    let out = r.stop_all();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(&format!("stopped nx-router (pid {})", router[0])), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("stopped PostgreSQL (pid {pg})")), "{}", out.stdout);
    eventually(10, "PostgreSQL and nx-router to be gone", || (!alive(pg) && !alive(router[0])).then_some(()));
    let left = processes_of(&r.data_dir(), &[d["id"].as_str().unwrap()]);
    assert!(left.is_empty(), "processes outlived stop-all: {left:?}");
    assert!(!r.data_dir().join("postgres/cluster/postmaster.pid").exists(), "PostgreSQL shut down cleanly");
    // A second stop-all finds nothing to stop and says nothing of them.
    let again = r.stop_all();
    assert_eq!(again.code, 0, "{again:?}");
    assert!(!again.stdout.contains("nx-router") && !again.stdout.contains("PostgreSQL"), "{}", again.stdout);

    // A postmaster.pid naming a live process that is not the cluster's
    // postmaster (its pid recycled after a crash; here this test's own
    // process) is stale: removed, and one new postmaster starts.
    let planted = std::process::id() as i32;
    let pid_file = r.data_dir().join("postgres/cluster/postmaster.pid");
    std::fs::write(&pid_file, format!("{planted}\n{}\n", r.data_dir().join("postgres/cluster").display())).unwrap();
    r.start_again();
    assert!(r.log().contains("removing a stale postmaster.pid"), "{}", r.log());
    let fresh = postmaster(&r);
    assert!(fresh != planted && fresh != pg && alive(fresh), "{fresh}");
    let postmasters = processes_of(&r.data_dir(), &[]).into_iter().filter(|(_, c)| c.contains("postgres -D")).count();
    assert_eq!(postmasters, 1, "one postmaster on the data directory");
}

#[test]
fn a_router_no_receiver_started_is_neither_taken_over_nor_doubled() {
    let mut r = Receiver::start_with(Options { args: vec!["--no-router".into()], ..Options::default() });
    // Run on its own (as under systemd) on the receiver's control socket.
    let router = crate::outlive::Router::start(&r);
    let before = routers(&r);
    r.stop_with(Signal::SIGTERM);
    // The receiver is now started to run the router itself.
    r.options.args.clear();
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.start_again())).unwrap_err();
    let message = refused.downcast_ref::<String>().cloned().unwrap_or_default();
    let control = r.data_dir().join("router/control.sock");
    assert!(
        message.contains(&format!(
            "an nx-router answers on {} but this receiver cannot take it over: pid {} was not started by a receiver (no --listen-fd); stop it",
            control.display(),
            before[0]
        )),
        "{message}"
    );
    assert_eq!(routers(&r), before, "the router was neither replaced nor joined by a second one");
    drop(router);
}

/// Size of a file, 0 when it does not exist.
fn size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn a_tenants_warnings_keep_postgres_log_capped_even_with_no_receiver() {
    // The postmaster outlives the receiver, so its output cannot go through
    // a pipe of the receiver's; a tenant can write to it (`RAISE WARNING`),
    // so straight into a file it would grow without bound. Its keeper caps
    // it at the receiver's size (8 MiB, two rotated files) and runs on while
    // no receiver does.
    let mut r = Receiver::start();
    r.create_app("web");
    let url = r.db_url("web");
    let log = r.data_dir().join("logs/postgres.log");
    // 400 lines of 20 kB, each cut at 16 kB: ~6.5 MB, the file's size.
    let flood = "SET client_min_messages = error; \
                 DO $$ BEGIN FOR i IN 1..400 LOOP RAISE WARNING '%', repeat('x', 20000); END LOOP; END $$";
    psql(&url, flood).unwrap();
    eventually(10, "the warnings in postgres.log", || (size(&log) > 6_000_000).then_some(()));
    r.stop_with(Signal::SIGTERM);
    // No receiver now: the next floods still reach the log, which rotates.
    for _ in 0..3 {
        psql(&url, flood).unwrap();
    }
    let rotated = |i: u32| log.with_file_name(format!("postgres.log.{i}"));
    eventually(10, "postgres.log rotated twice", || rotated(2).exists().then_some(()));
    let cap = 8 << 20;
    for path in [log.clone(), rotated(1), rotated(2)] {
        assert!(size(&path) <= cap, "{} is {} bytes, over the cap", path.display(), size(&path));
    }
    assert!(!rotated(3).exists(), "only two rotated files are kept");
    let tail = std::fs::read_to_string(rotated(1)).unwrap();
    assert!(tail.contains("[line cut]"), "a 20 kB line is cut at 16 kB");
    r.start_again();
    assert_eq!(psql(&r.db_url("web"), "SELECT 1").unwrap(), "1");
}

#[test]
fn an_adopted_routers_access_lines_still_reach_the_receiver_even_those_served_while_none_ran() {
    // The router outlives the receiver, so its access log cannot be a pipe
    // of the receiver's: it is a FIFO the next receiver opens again. What
    // the router served while no receiver ran waits in it.
    let mut r = Receiver::start();
    r.create_app("web");
    let url = r.push("web", &bin("hello"), &[])["preview_url"].as_str().unwrap().to_owned();
    let router_log = r.data_dir().join("logs/router.log");
    let logged = |path: &str| std::fs::read_to_string(&router_log).unwrap_or_default().contains(path);
    // The app's answer to these paths (its 404) is beside the point: every
    // answer has its access line.
    let answer = r.get(&format!("{url}/before-restart"));
    eventually(10, "the access line of a request", || logged("/before-restart").then_some(()));
    r.stop_with(Signal::SIGTERM);
    let away = r.get(&format!("{url}/while-away"));
    assert_eq!((away.status, &away.body), (answer.status, &answer.body), "the router serves with no receiver");
    assert!(!logged("/while-away"), "nobody reads the access log while no receiver runs");
    r.start_again();
    eventually(10, "the line of the request served while away", || logged("/while-away").then_some(()));
    assert_eq!(r.get(&format!("{url}/after-restart")).status, answer.status);
    eventually(10, "the access line of a request to the adopted router", || logged("/after-restart").then_some(()));
    assert!(r.log().contains("nx-router adopted"), "{}", r.log());
}

/// `GET /v1/health` of `r`, once its API answers.
fn health(r: &Receiver) -> Option<serde_json::Value> {
    let answer = reqwest::blocking::get(format!("{}/v1/health", r.api())).ok()?;
    assert_eq!(answer.status(), 200, "health answers 200 or nothing");
    answer.json().ok()
}

#[test]
fn while_deployments_are_taken_back_the_api_answers_reads_and_holds_writes_until_done() {
    // After stop-all every deployment starts afresh at the next start, and
    // an app that listens only after 8 s keeps that reconcile busy while the
    // API already answers.
    let mut r = Receiver::start();
    r.create_app("slow");
    r.push("slow", &fixtures::go(Go::Static), &["--env", "START_DELAY_MS=8000", "--promote"]);
    r.stop_with(Signal::SIGTERM);
    assert_eq!(r.stop_all().code, 0);
    let started = r.launch_again();
    let first = eventually(30, "the API to answer", || health(&r));
    assert_eq!(first["reconciled"], false, "the API answers before the deployments are back: {first}");
    // Reads are served at once, before the reconcile is done.
    let listing = r.nx_ok(&["--json", "apps", "ls"]).json();
    assert!(listing.to_string().contains("\"slow\""), "{listing}");
    assert_eq!(health(&r).unwrap()["reconciled"], false, "the read did not wait for the reconcile");
    // A write sent now waits for the reconcile, then succeeds.
    let created = r.nx(&["--json", "apps", "create", "later"]);
    let after = health(&r).unwrap();
    assert_eq!(created.code, 0, "{created:?}");
    assert!(created.json()["deploy_key"].as_str().is_some_and(|k| !k.is_empty()), "{}", created.stdout);
    assert_eq!(after["reconciled"], true, "the write was answered only once the deployments were back: {after}");
    r.wait_up(started);
    let apps = r.nx_ok(&["--json", "apps", "ls"]).json().to_string();
    assert!(apps.contains("\"later\""), "{apps}");
    assert_eq!(r.nx_ok(&["--json", "ls", "slow"]).json()[0]["deployments"][0]["state"], "healthy");
}
