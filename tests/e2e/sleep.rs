//! Scale to zero: idle deployments sleep (their sandbox stopped, their URL
//! still routed), and the first request wakes them and is answered once;
//! concurrent first requests share one start; a wake that fails says so
//! with a 503 page and leaves the app's lines in `nx logs`; what the app
//! keeps (its /data and its database) is there when it wakes; production
//! stays up unless asked, and an open request keeps a deployment awake;
//! the pull request comment says when a preview sleeps. Wakes that keep
//! failing back off and then fail it for good; a stop racing a wake wins.
//! A sleeping deployment's sandbox waits made ready for its wake, none of
//! the app running, and is used only if nothing it was made from changed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use nx_e2e::fixtures::{self, Go};
use nx_e2e::receiver::{psql, Options};
use nx_e2e::{app_processes, deployment_processes, eventually, processes_of, Receiver};

fn id(d: &serde_json::Value) -> String {
    d["id"].as_str().unwrap().to_owned()
}

/// The preview URL of `d`, ending in `/` so paths can follow.
fn url(d: &serde_json::Value) -> String {
    format!("{}/", d["preview_url"].as_str().unwrap().trim_end_matches('/'))
}

/// Deployment `id` of `app`, as `nx ls` reports it.
fn deployment(r: &Receiver, app: &str, id: &str) -> serde_json::Value {
    let listing = r.nx_ok(&["--json", "ls", app]).json();
    listing[0]["deployments"].as_array().unwrap().iter().find(|d| d["id"] == id).cloned().unwrap()
}

/// The state of deployment `id` of `app`, as `nx ls` reports it.
fn state(r: &Receiver, app: &str, id: &str) -> String {
    deployment(r, app, id)["state"].as_str().unwrap().to_owned()
}

/// The error of deployment `id` of app `web`, as `nx ls` reports it.
fn error_of(r: &Receiver, id: &str) -> String {
    let listing = r.nx_ok(&["--json", "ls", "web"]).json();
    let d = listing[0]["deployments"].as_array().unwrap().iter().find(|d| d["id"] == id).cloned().unwrap();
    d["error"].as_str().unwrap_or_default().to_owned()
}

fn wait_for_state(r: &Receiver, app: &str, id: &str, wanted: &str) {
    eventually(30, &format!("deployment {id} to be {wanted}"), || (state(r, app, id) == wanted).then_some(()));
}

/// Waits until deployment `id` of `app` is asleep: `sleeping`, and no
/// replica of it left running. The state says `sleeping` from the moment
/// it is put to sleep, while the requests already forwarded to it finish;
/// a request sent in that moment is answered by the sandbox on its way out
/// and wakes nothing.
fn wait_asleep(r: &Receiver, app: &str, id: &str) {
    eventually(30, &format!("deployment {id} to be asleep"), || {
        let d = deployment(r, app, id);
        // A deployment that runs nothing lists no replicas at all.
        (d["state"] == "sleeping" && d.get("replicas").is_none()).then_some(())
    });
}

/// An app `web` whose previews sleep after 2 s, with goweb pushed as a
/// preview that counts its starts in /data/starts.
fn sleepy(r: &Receiver) -> serde_json::Value {
    r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--sleep-after", "2s"]);
    r.push("web", &fixtures::go(Go::Static), &["--env", "COUNT_STARTS=1"])
}

fn data_dir(r: &Receiver) -> std::path::PathBuf {
    r.data_dir().join("apps/web/data")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under `dir` but those named in `except`, with its contents.
fn files(dir: &Path, except: &[&str]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let name = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                todo.push(p);
            } else if !except.contains(&name.as_str()) {
                out.insert(name, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Waits until deployment `dep`, asleep, runs nothing of its app and its
/// sandbox waits made ready for its wake: bwrap set up, its nx-init
/// waiting for the go.
fn wait_ready(r: &Receiver, dep: &str) {
    eventually(10, "a sleeping deployment to run nothing of its app, its sandbox made ready", || {
        (app_processes(&r.data_dir(), dep).is_empty() && waits_ready(r, dep)).then_some(())
    });
}

/// Whether `dep`'s sandbox waits made ready (its nx-init waiting for go).
fn waits_ready(r: &Receiver, dep: &str) -> bool {
    processes_of(&r.data_dir(), &[dep]).iter().any(|(_, cmd)| cmd.starts_with("/nx-init --go-fd "))
}

/// Past its app's share of places (`--wake-ready-per-app`), the deployment
/// that fell asleep last gets the place and the one that slept longer gives
/// its up: its sandbox ends, and it wakes the usual way, answered all the same.
#[test]
fn an_app_past_its_share_of_ready_sandboxes_gives_up_the_place_of_its_longest_sleeper() {
    let r =
        Receiver::start_with(Options { args: vec!["--wake-ready-per-app".into(), "1".into()], ..Options::default() });
    let first = sleepy(&r);
    let (first_id, first_url) = (id(&first), url(&first));
    let held_starts =
        |id: &str| r.nx_ok(&["logs", id, "--app", "web"]).stdout.matches("started from a sandbox held ready").count();
    wait_asleep(&r, "web", &first_id);
    wait_ready(&r, &first_id);
    let second = r.push("web", &fixtures::go(Go::Static), &["--env", "COUNT_STARTS=1"]);
    let (second_id, second_url) = (id(&second), url(&second));
    wait_asleep(&r, "web", &second_id);
    wait_ready(&r, &second_id);
    eventually(10, "the first preview's ready sandbox to give its place up", || {
        deployment_processes(&r.data_dir(), &first_id).is_empty().then_some(())
    });
    assert!(waits_ready(&r, &second_id), "the later sleeper lost its place");

    // Each push's start was from a sandbox made during its upload.
    let (first_before, second_before) = (held_starts(&first_id), held_starts(&second_id));
    assert_eq!(r.get(&first_url).body, "goweb\n");
    assert_eq!(held_starts(&first_id), first_before, "the wake that gave its place up started from one");
    let logs = r.nx_ok(&["logs", &first_id, "--app", "web"]).stdout;
    assert!(!logs.contains("while no receiver watched it"), "a discarded ready sandbox is no exit of the app: {logs}");
    assert_eq!(r.get(&second_url).body, "goweb\n");
    assert_eq!(held_starts(&second_id), second_before + 1);
}

#[test]
fn an_idle_preview_sleeps_and_its_next_request_wakes_it_answered_once_with_data_and_database_unchanged() {
    let r = Receiver::start();
    let d = sleepy(&r);
    let (dep, url) = (id(&d), url(&d));
    let hit = |which: &str| r.get(&format!("{url}hit?id={which}"));
    assert_eq!(hit("before").body, "hit before\n");
    std::fs::write(data_dir(&r).join("notes.txt"), "kept across sleep\n").unwrap();
    let db = r.db_url("web");
    psql(&db, "CREATE TABLE kept (v TEXT); INSERT INTO kept VALUES ('asleep and back')").unwrap();
    let before = files(&data_dir(&r), &["starts", "hits"]);

    wait_asleep(&r, "web", &dep);
    // The state turns `sleeping` first (requests from then on are held),
    // then the requests in flight drain and the sandbox stops.
    wait_ready(&r, &dep);
    let ls = r.nx_ok(&["ls", "web"]).stdout;
    assert!(ls.contains("sleeping"), "nx ls shows it sleeping:\n{ls}");
    // The audit log says so once the sandbox has stopped.
    eventually(10, "the audit log to say it went to sleep", || {
        r.nx_ok(&["events", "--app", "web"]).stdout.contains("sleep").then_some(())
    });

    // The request that wakes it is answered by the woken app, once.
    let woke = hit("wake");
    assert_eq!((woke.status, woke.body.as_str()), (200, "hit wake\n"));
    assert_eq!(read(&data_dir(&r).join("hits")), "before\nwake\n", "not lost, not duplicated");
    assert_eq!(read(&data_dir(&r).join("starts")), "started\nstarted\n", "started once more");
    // The held requests go on as soon as the router routes it; the state
    // is recorded right after.
    wait_for_state(&r, "web", &dep, "healthy");
    assert_eq!(files(&data_dir(&r), &["starts", "hits"]), before, "/data is as it was");
    assert_eq!(psql(&db, "SELECT v FROM kept").unwrap(), "asleep and back");

    // And it sleeps again when left alone.
    wait_asleep(&r, "web", &dep);
}

#[test]
fn fifty_concurrent_first_requests_to_a_sleeping_app_are_all_answered_after_one_start() {
    let r = Receiver::start();
    let d = sleepy(&r);
    let (dep, url) = (id(&d), url(&d));
    wait_asleep(&r, "web", &dep);
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (r, url) = (&r, &url);
                s.spawn(move || {
                    let a = r.get(&format!("{url}hit?id={i}"));
                    (a.status, a.body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!((*status, body.as_str()), (200, format!("hit {i}\n").as_str()), "request {i}");
    }
    let mut hits: Vec<u32> = read(&data_dir(&r).join("hits")).lines().map(|l| l.parse().unwrap()).collect();
    hits.sort_unstable();
    assert_eq!(hits, (0..50).collect::<Vec<u32>>(), "each request reached the app exactly once");
    assert_eq!(read(&data_dir(&r).join("starts")), "started\nstarted\n", "one start for all fifty");
}

#[test]
fn a_wake_that_fails_answers_503_with_retry_after_and_nx_logs_shows_the_apps_last_lines() {
    // One restart, quickly: the wake fails within seconds.
    let r = Receiver::start_with(Options {
        args: ["--max-restarts", "1", "--restart-backoff", "100ms"].map(str::to_owned).to_vec(),
        ..Options::default()
    });
    let d = sleepy(&r);
    let (dep, url) = (id(&d), url(&d));
    assert_eq!(r.get(&format!("{url}break?text=disk-42-is-gone")).body, "broken\n");
    wait_asleep(&r, "web", &dep);

    let page = r.get(&url);
    assert_eq!(page.status, 503, "{}", page.body);
    assert_eq!(page.headers.get("retry-after").map(|v| v.to_str().unwrap()), Some("2"));
    assert!(page.body.contains("Could not wake"), "{}", page.body);
    assert!(page.body.contains(&format!("nx logs {dep}")), "{}", page.body);
    let logs = r.nx_ok(&["logs", &dep, "--app", "web"]).stdout;
    assert!(logs.contains("refusing to start: disk-42-is-gone"), "the app's last lines:\n{logs}");

    // Back asleep, saying why: a later request tries again, after a pause.
    assert_eq!(state(&r, "web", &dep), "sleeping");
    let error = error_of(&r, &dep);
    assert!(error.starts_with("could not wake (1 in a row; next try in 5 seconds): "), "{error}");
    std::fs::remove_file(data_dir(&r).join("broken")).unwrap();
    let again = eventually(30, "a later request to wake it", || {
        let a = r.get(&url);
        (a.status == 200).then_some(a)
    });
    assert_eq!(again.body, "goweb\n");
}

#[test]
fn production_does_not_sleep_by_default_and_an_open_request_keeps_a_preview_awake() {
    let r = Receiver::start();
    r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--sleep-after", "2s"]);
    let goweb = fixtures::go(Go::Static);
    let production = r.push("web", &goweb, &["--promote"]);
    let preview = r.push("web", &goweb, &[]);
    let streaming = r.push("web", &goweb, &[]);

    // A server-sent event stream open for longer than the idle time.
    let host = url(&streaming).trim_start_matches("http://").trim_end_matches('/').to_owned();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", r.router_port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "GET /sse HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data: one") {
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the stream ended before its first event: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }

    wait_asleep(&r, "web", &id(&preview));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(state(&r, "web", &id(&production)), "healthy", "production does not sleep by default");
    assert_eq!(state(&r, "web", &id(&streaming)), "healthy", "an open request keeps it awake");
    assert_eq!(r.get(&format!("{}release", url(&streaming))).body, "released\n");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(String::from_utf8_lossy(&rest).contains("data: two"));
    wait_asleep(&r, "web", &id(&streaming));

    // Asked to, production sleeps too, and its URL wakes it.
    let app = r.nx_ok(&["--json", "apps", "set", "web", "--sleep-after", "2s", "--role", "production"]).json();
    assert_eq!(app["settings"]["scale"]["production_sleep_secs"], 2);
    wait_asleep(&r, "web", &id(&production));
    let page = r.get(app["production_url"].as_str().unwrap());
    assert_eq!((page.status, page.body.as_str()), (200, "goweb\n"));
    wait_for_state(&r, "web", &id(&production), "healthy");
}

#[test]
fn sleep_settings_below_the_minimum_are_refused_with_the_fix() {
    let r = Receiver::start();
    r.create_app("web");
    let out = r.nx(&["apps", "set", "web", "--sleep-after", "1s"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("--sleep-after: sleep_after \"1s\" must be whole seconds, at least 2s"),
        "{}",
        out.stderr
    );
    let app = r.nx_ok(&["--json", "apps", "set", "web", "--sleep-after", "off"]).json();
    assert_eq!(app["settings"]["scale"]["preview_sleep_secs"], 0);
}

#[test]
fn a_sleeping_preview_stopped_for_good_or_expired_is_never_woken_by_its_url() {
    // Previews expire after 6 s without a request; they sleep after 2 s first.
    let r = Receiver::start_with(Options {
        args: ["--preview-idle", "6s", "--janitor-interval", "1s"].map(str::to_owned).to_vec(),
        ..Options::default()
    });
    let stopped = sleepy(&r);
    let expired = r.push("web", &fixtures::go(Go::Static), &["--env", "COUNT_STARTS=1"]);
    wait_asleep(&r, "web", &id(&stopped));
    r.nx_ok(&["stop", &id(&stopped), "--app", "web"]);
    let page = r.get(&url(&stopped));
    assert_eq!(page.status, 410, "{}", page.body);
    assert!(page.body.contains("Preview stopped"), "{}", page.body);
    assert_eq!(state(&r, "web", &id(&stopped)), "stopped", "a request does not start it");

    wait_asleep(&r, "web", &id(&expired));
    wait_for_state(&r, "web", &id(&expired), "stopped");
    let page = r.get(&url(&expired));
    assert_eq!(page.status, 410, "{}", page.body);
    assert!(page.body.contains("no requests for 6 seconds"), "{}", page.body);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(state(&r, "web", &id(&expired)), "stopped", "an expired preview stays stopped");
    // Both pushes started once each, and neither ever again.
    assert_eq!(read(&data_dir(&r).join("starts")), "started\nstarted\n");
    assert!(deployment_processes(&r.data_dir(), &id(&expired)).is_empty());
}

#[test]
fn the_pull_request_comment_says_a_preview_sleeps_and_then_that_it_is_healthy_again() {
    use crate::github::{linked_app, pull_request, receiver, run_action, sha, REPO};
    let gh = nx_e2e::github::FakeGitHub::start();
    let r = receiver(&gh, &["--github-token", "ghp_test_token"]);
    let key = linked_app(&r);
    r.nx_ok(&["apps", "set", "web", "--sleep-after", "2s"]);
    let head = sha();
    let run =
        run_action(&r, &key, "pull_request", &pull_request("pull_request.opened", 7, &head), &fixtures::go(Go::Static));
    assert_eq!(run.out.code, 0, "{:?}", run.out);
    let (dep, preview) = (run.outputs["deployment-id"].clone(), run.outputs["preview-url"].clone());
    let comment_says = |what: &'static str| {
        eventually(30, what, || {
            gh.calls_to("PATCH", &format!("/repos/{REPO}/issues/comments/*"))
                .into_iter()
                .chain(gh.calls_to("POST", &format!("/repos/{REPO}/issues/7/comments")))
                .map(|c| c.body["body"].as_str().unwrap_or_default().to_owned())
                .find(|b| b.contains(&dep) && b.contains(what))
        })
    };
    comment_says("sleeping: its next request wakes it");
    let status = eventually(30, "a commit status for the sleeping preview", || {
        gh.calls_to("POST", &format!("/repos/{REPO}/statuses/{head}"))
            .into_iter()
            .find(|c| c.body["description"].as_str().is_some_and(|d| d.contains("sleeps")))
    });
    assert_eq!(status.body["state"], "success", "a sleeping preview is no failure");
    let asleep = gh.calls_to("PATCH", &format!("/repos/{REPO}/issues/comments/*")).len();
    assert_eq!(r.get(&preview).body, "goweb\n");
    eventually(30, "the comment to say healthy again", || {
        let edits = gh.calls_to("PATCH", &format!("/repos/{REPO}/issues/comments/*"));
        (edits.len() > asleep && edits.last().unwrap().body["body"].as_str().unwrap_or_default().contains("healthy"))
            .then_some(())
    });
}

#[test]
fn wakes_that_keep_failing_back_off_and_the_third_in_a_row_fails_it_so_traffic_never_starts_it_again() {
    let r = Receiver::start_with(Options {
        args: ["--max-restarts", "1", "--restart-backoff", "100ms"].map(str::to_owned).to_vec(),
        ..Options::default()
    });
    let d = sleepy(&r);
    let (dep, url) = (id(&d), url(&d));
    assert_eq!(r.get(&format!("{url}break?text=disk-42-is-gone")).body, "broken\n");
    wait_asleep(&r, "web", &dep);
    let refusals = || {
        let logs = r.nx_ok(&["logs", &dep, "--app", "web"]).stdout;
        logs.matches("refusing to start: disk-42-is-gone").count()
    };

    // An outside client asks for it once a second, as the attack would.
    eventually(120, "the third failed wake in a row to fail it", || {
        let _ = r.get(&url);
        (state(&r, "web", &dep) == "failed").then_some(())
    });
    let error = error_of(&r, &dep);
    assert!(
        error.starts_with("could not wake 3 times in a row, so no request wakes it again (push again to run it): "),
        "{error}"
    );
    let tried = refusals();
    assert!(tried >= 3, "three wakes tried:\n{tried}");
    // From now on requests start nothing.
    for _ in 0..5 {
        let _ = r.get(&url);
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(state(&r, "web", &dep), "failed");
    assert_eq!(refusals(), tried, "no start after it failed");
    assert!(deployment_processes(&r.data_dir(), &dep).is_empty());
}

#[test]
fn a_preview_stopped_while_its_wake_is_in_flight_stays_stopped() {
    let r = Receiver::start();
    let d = sleepy(&r);
    let (dep, url) = (id(&d), url(&d));
    wait_asleep(&r, "web", &dep);
    std::thread::scope(|s| {
        // The request asks for a wake; `nx stop` races it.
        let waking = s.spawn(|| r.get(&url));
        std::thread::sleep(Duration::from_millis(100));
        r.nx_ok(&["stop", &dep, "--app", "web"]);
        let _ = waking.join().unwrap();
    });
    assert_eq!(state(&r, "web", &dep), "stopped");
    let page = r.get(&url);
    assert_eq!(page.status, 410, "{}", page.body);
    assert!(page.body.contains("Preview stopped"), "{}", page.body);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state(&r, "web", &dep), "stopped", "nothing woke it afterwards");
    assert!(deployment_processes(&r.data_dir(), &dep).is_empty());
}

/// A wake starts from the sandbox made ready while it slept; a change of
/// the app's variables makes it again (the app gets the new ones from it);
/// one that binds a directory made anew since is not used; a receiver killed
/// outright takes it along unstarted and the next makes it again; a stop
/// for good ends the one waiting.
#[test]
fn a_wake_starts_from_the_sandbox_made_ready_while_it_slept_unless_what_it_was_made_from_changed() {
    let mut r = Receiver::start();
    let d = sleepy(&r);
    let (dep, url) = (id(&d), url(&d));
    let logs = |r: &Receiver| r.nx_ok(&["logs", &dep, "--app", "web"]).stdout;
    // Its push's start was one too (made during the upload).
    let used = |r: &Receiver| logs(r).matches("started from a sandbox held ready").count() - 1;
    wait_asleep(&r, "web", &dep);
    wait_ready(&r, &dep);
    assert_eq!(r.get(&url).body, "goweb\n");
    assert_eq!(used(&r), 1, "{}", logs(&r));
    assert_eq!(read(&data_dir(&r).join("starts")), "started\nstarted\n", "its program ran once per start");

    // Variables changed while it sleeps: its sandbox is made again with them.
    wait_asleep(&r, "web", &dep);
    wait_ready(&r, &dep);
    r.nx_ok(&["env", "set", "GREETING=changed", "--app", "web"]);
    wait_ready(&r, &dep);
    assert_eq!(r.get(&url).body, "changed\n", "the wake ran with the new variables");
    assert_eq!(used(&r), 2, "{}", logs(&r));
    assert!(!logs(&r).contains("was not used"), "{}", logs(&r));

    // A directory it binds made anew while it sleeps (the app's /etc,
    // removed by an operator: the next start writes it again): the sandbox
    // made ready binds the one it found then, so the wake starts the usual
    // way. (Its binary's directory stays, and the binary placed in it by
    // the wake is the one that runs.)
    wait_asleep(&r, "web", &dep);
    wait_ready(&r, &dep);
    let etc = r.data_dir().join("apps/web/etc");
    std::fs::rename(&etc, etc.with_extension("gone")).unwrap();
    assert_eq!(r.get(&url).body, "changed\n");
    let said = "the sandbox made ready ahead was not used: \
                what it was made from has changed since (the files it binds)";
    assert!(logs(&r).contains(said), "{}", logs(&r));
    assert_eq!(used(&r), 2, "{}", logs(&r));

    // A receiver killed outright takes its ready sandbox along without
    // the app ever starting; the next one makes it ready again.
    wait_asleep(&r, "web", &dep);
    wait_ready(&r, &dep);
    let starts = read(&data_dir(&r).join("starts"));
    r.stop_with(nix::sys::signal::Signal::SIGKILL);
    eventually(10, "the ready sandbox to end with its receiver", || {
        deployment_processes(&r.data_dir(), &dep).is_empty().then_some(())
    });
    assert_eq!(read(&data_dir(&r).join("starts")), starts, "the app started without a wake");
    r.start_again();
    wait_ready(&r, &dep);
    assert_eq!(r.get(&url).body, "changed\n");
    assert_eq!(used(&r), 3, "{}", logs(&r));

    wait_asleep(&r, "web", &dep);
    wait_ready(&r, &dep);
    r.nx_ok(&["stop", &dep, "--app", "web"]);
    assert!(deployment_processes(&r.data_dir(), &dep).is_empty(), "the sandbox made ready is gone with the stop");
}
