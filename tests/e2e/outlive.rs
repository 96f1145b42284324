//! Apps outlive the receiver: each sandbox runs under its own shim, so a
//! receiver restart, upgrade or crash stops no app, and the next receiver
//! takes them back; a shim killed outright is noticed, and its sandbox
//! replaced without ever running twice.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nx_e2e::fixtures::{self, Go};
use nx_e2e::load::Load;
use nx_e2e::receiver::Options;
use nx_e2e::{bin, deployment_processes, eventually, Receiver};

/// nx-router run on its own (as under systemd, `--no-router` on the
/// receiver), on the receiver's control socket: it keeps serving while the
/// receiver is away.
pub(crate) struct Router(Child);

impl Router {
    pub(crate) fn start(r: &Receiver) -> Router {
        let log = std::fs::File::create(r.dir.path().join("router.log")).unwrap();
        let mut cmd = Command::new(bin("nx-router"));
        cmd.args(["--listen", &format!("127.0.0.1:{}", r.router_port)])
            .arg("--control")
            .arg(r.data_dir().join("router/control.sock"))
            .arg("--state")
            .arg(r.dir.path().join("routes.json"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let router = Router(nx_e2e::exec::spawn(&mut cmd).unwrap());
        eventually(30, "nx-router to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", r.router_port)).ok().map(|_| ())
        });
        router
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn receiver_without_router(extra: &[&str]) -> Receiver {
    let mut args = vec!["--no-router".to_owned()];
    args.extend(extra.iter().map(|a| a.to_string()));
    Receiver::start_with(Options { args, ..Options::default() })
}

/// The pids of the app's own processes (not bwrap's) in one deployment.
fn app_pids(r: &Receiver, id: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = deployment_processes(&r.data_dir(), id)
        .into_iter()
        .filter(|(_, cmd)| cmd.starts_with("/app/"))
        .map(|(pid, _)| pid)
        .collect();
    pids.sort_unstable();
    pids
}

/// The processes in a deployment's cgroup (bwrap, the namespace's init, the
/// app), read from its first cgroup directory as the shim's spec names it.
fn cgroup_processes(r: &Receiver, id: &str) -> usize {
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.data_dir().join("shims").join(id).join("spec.json")).unwrap()).unwrap();
    let dir = spec["cgroup"][0].as_str().expect("the sandbox has a cgroup on this host");
    std::fs::read_to_string(std::path::Path::new(dir).join("cgroup.procs")).unwrap_or_default().lines().count()
}

fn shim_pid(r: &Receiver, id: &str) -> Option<i32> {
    let text = std::fs::read_to_string(r.data_dir().join("shims").join(id).join("pid")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn states(r: &Receiver, app: &str) -> Vec<String> {
    let listing = r.nx(&["--json", "ls", app]).success().json();
    listing[0]["deployments"].as_array().unwrap().iter().map(|d| d["state"].as_str().unwrap().to_owned()).collect()
}

fn push_promoted(r: &Receiver, app: &str, greeting: &str) -> (String, String) {
    r.create_app(app);
    let d = r.push(app, &fixtures::go(Go::Static), &["--env", &format!("GREETING={greeting}")]);
    let id = d["id"].as_str().unwrap().to_owned();
    r.nx_ok(&["promote", &id, "--app", app]);
    (id, format!("{app}.localhost:{}", r.router_port))
}

#[test]
fn apps_answer_every_request_while_the_receiver_restarts_and_are_taken_back_as_they_are() {
    let mut r = receiver_without_router(&[]);
    let _router = Router::start(&r);
    let (web, web_host) = push_promoted(&r, "web", "web-answers");
    let (site, site_host) = push_promoted(&r, "site", "site-answers");
    let before = (app_pids(&r, &web), app_pids(&r, &site));
    assert_eq!((before.0.len(), before.1.len()), (1, 1), "{before:?}");

    let loads = [Load::start(r.router_port, web_host), Load::start(r.router_port, site_host)];
    eventually(30, "both apps to answer the load", || loads.iter().all(|l| l.ok.load(SEQ) > 20).then_some(()));
    let stopped_at = Instant::now();
    let status = r.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{status}:\n{}", r.log());
    // With no receiver at all, both apps go on answering.
    let while_away: Vec<u64> = loads.iter().map(|l| l.ok.load(SEQ)).collect();
    std::thread::sleep(Duration::from_millis(500));
    for (load, then) in loads.iter().zip(&while_away) {
        assert!(load.ok.load(SEQ) > then + 10, "an app stopped answering while the receiver was away");
    }
    r.start_again();
    eprintln!("the receiver's API answered {:?} after its SIGTERM", stopped_at.elapsed());
    assert_eq!(states(&r, "web"), ["healthy"]);
    assert_eq!(states(&r, "site"), ["healthy"]);
    std::thread::sleep(Duration::from_millis(500));
    let [web_load, site_load] = loads;
    let (web_ok, web_bodies) = web_load.finish_without_failures();
    let (site_ok, site_bodies) = site_load.finish_without_failures();
    assert_eq!(web_bodies.into_iter().collect::<Vec<_>>(), ["web-answers\n"]);
    assert_eq!(site_bodies.into_iter().collect::<Vec<_>>(), ["site-answers\n"]);
    eprintln!("{web_ok} and {site_ok} requests answered, none failed");
    assert_eq!((app_pids(&r, &web), app_pids(&r, &site)), before, "the apps were not restarted");
    let logs = r.nx_ok(&["logs", &web]).stdout;
    assert!(logs.contains("adopted, healthy on 127.0.0.1:"), "{logs}");
}

#[test]
fn a_killed_receiver_leaves_its_apps_serving_and_what_they_print_meanwhile_reaches_nx_logs() {
    let mut r = receiver_without_router(&[]);
    let _router = Router::start(&r);
    r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    let id = d["id"].as_str().unwrap().to_owned();
    let url = d["preview_url"].as_str().unwrap().to_owned();
    let before = app_pids(&r, &id);
    assert_eq!(before.len(), 1);
    r.stop_with(Signal::SIGKILL);
    assert_eq!(r.get(&format!("{url}/print?text=printed-while-away-7312")).body, "printed\n");
    r.start_again();
    assert_eq!(r.get(&url).status, 200);
    assert_eq!(app_pids(&r, &id), before, "adopted, never started twice");
    let logs = eventually(10, "the line printed while away in nx logs", || {
        let logs = r.nx_ok(&["logs", &id]).stdout;
        logs.contains(" printed-while-away-7312\n").then_some(logs)
    });
    assert!(logs.contains("adopted"), "{logs}");
    assert_eq!(states(&r, "web"), ["healthy"]);
}

#[test]
fn a_killed_shim_is_noticed_and_its_sandbox_replaced_never_two_at_once() {
    let r =
        Receiver::start_with(Options { args: vec!["--restart-backoff".into(), "100ms".into()], ..Options::default() });
    r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    let id = d["id"].as_str().unwrap().to_owned();
    let url = d["preview_url"].as_str().unwrap().to_owned();
    let in_cgroup = cgroup_processes(&r, &id);
    assert!(in_cgroup >= 3, "bwrap, its init and the app are in the cgroup: {in_cgroup}");
    let first = app_pids(&r, &id);
    let shim = shim_pid(&r, &id).unwrap();
    kill(Pid::from_raw(shim), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let apps = app_pids(&r, &id);
        assert!(apps.len() <= 1, "two instances of one deployment: {apps:?}");
        assert!(cgroup_processes(&r, &id) <= in_cgroup, "more processes in the cgroup than one sandbox has");
        let replaced = apps.len() == 1 && apps != first && shim_pid(&r, &id).is_some_and(|p| p != shim);
        if replaced && r.get(&url).status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the sandbox was not replaced:\n{}", r.nx(&["logs", &id]).stdout);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cgroup_processes(&r, &id), in_cgroup);
    let logs = r.nx_ok(&["logs", &id]).stdout;
    assert!(logs.contains("exited (its shim was killed, and the sandbox with it), restarting"), "{logs}");
    eventually(30, "the deployment to be healthy again", || (states(&r, "web") == ["healthy"]).then_some(()));
}

#[test]
fn stop_all_stops_what_a_stopped_receiver_left_running_and_refuses_while_one_runs() {
    let mut r = receiver_without_router(&[]);
    r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    let id = d["id"].as_str().unwrap().to_owned();
    let refused = r.stop_all();
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains(&format!(
            "an nx-receiver runs on {}; stop it first (its apps keep running until stop-all)",
            r.data_dir().display()
        )),
        "{}",
        refused.stderr
    );
    assert_eq!(app_pids(&r, &id).len(), 1, "a refused stop-all stops nothing");
    r.stop_with(Signal::SIGTERM);
    assert_eq!(app_pids(&r, &id).len(), 1);
    // The receiver's cgroup, in every hierarchy the host has.
    let groups = || -> Vec<std::path::PathBuf> {
        ["", "unified", "memory", "cpu", "pids"]
            .iter()
            .map(|h| std::path::Path::new("/sys/fs/cgroup").join(h).join(format!("nx-sandbox-{}", r.uid_base)))
            .filter(|d| d.is_dir())
            .collect()
    };
    assert!(!groups().is_empty(), "the sandbox runs in the receiver's cgroup");
    let out = r.stop_all();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("stopped 1 sandboxes of"), "{}", out.stdout);
    assert!(deployment_processes(&r.data_dir(), &id).is_empty());
    assert_eq!(groups(), Vec::<std::path::PathBuf>::new(), "stop-all leaves no cgroup behind");
    // The deployment is not recorded as stopped: the next start brings it back.
    r.start_again();
    let _router = Router::start(&r);
    eventually(30, "the deployment to answer again", || {
        (r.get(d["preview_url"].as_str().unwrap()).status == 200).then_some(())
    });
}

const SEQ: std::sync::atomic::Ordering = std::sync::atomic::Ordering::SeqCst;

#[test]
fn a_sandbox_left_running_for_a_deployment_no_longer_running_is_stopped_at_the_next_start() {
    let mut r = Receiver::start();
    r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    let id = d["id"].as_str().unwrap().to_owned();
    assert_eq!(app_pids(&r, &id).len(), 1);
    // The row changes behind the receiver's back, as when it changed while
    // no receiver ran: the next start must not leave the sandbox running.
    let set = format!("UPDATE deployments SET state = 'stopped' WHERE id = '{id}'");
    nx_e2e::receiver::psql(&r.admin_url("nx"), &set).unwrap();
    r.restart();
    assert!(deployment_processes(&r.data_dir(), &id).is_empty(), "{:?}", deployment_processes(&r.data_dir(), &id));
    assert!(r.log().contains("stopped a sandbox whose deployment is no longer running"), "{}", r.log());
}
