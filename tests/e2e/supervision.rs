//! Supervision: restarts after a crash, a crash loop ending as failed, logs
//! (and follows that end with their key), stops that leave nothing behind, and sandboxes that cannot be made (a
//! killed receiver: `outlive`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;
use nx_e2e::fixtures::{self, Go};
use nx_e2e::receiver::Options;
use nx_e2e::{bin, deployment_processes, eventually, Receiver};

fn with_args(args: &[&str]) -> Receiver {
    Receiver::start_with(Options { args: args.iter().map(|a| a.to_string()).collect(), ..Options::default() })
}

fn state(r: &Receiver, app: &str) -> serde_json::Value {
    r.nx(&["--json", "ls", app]).success().json()[0]["deployments"][0].clone()
}

#[test]
fn a_crashed_app_is_restarted_and_answers_again() {
    let r = with_args(&["--restart-backoff", "100ms"]);
    r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    let url = d["preview_url"].as_str().unwrap().to_owned();
    assert_eq!(r.get(&format!("{url}/exit")).body, "exiting\n");
    let id = d["id"].as_str().unwrap();
    eventually(30, "the restart to be logged", || {
        let logs = r.nx(&["logs", id]).success().stdout;
        logs.contains("exited (status 3), restarting").then_some(())
    });
    eventually(30, "the app to answer again", || (r.get(&url).status == 200).then_some(()));
    assert_eq!(state(&r, "web")["state"], "healthy");
}

#[test]
fn a_crash_loop_ends_failed_with_the_last_words() {
    let r = with_args(&["--max-restarts", "2", "--restart-backoff", "50ms"]);
    r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &["--env", "EXIT_AFTER_MS=400"]);
    assert_eq!(d["state"], "healthy", "it answers before it starts crashing");
    let failed = eventually(60, "the crash loop to end", || {
        let s = state(&r, "web");
        (s["state"] == "failed").then_some(s)
    });
    assert!(failed["error"].as_str().unwrap().contains("crashed 3 times"), "{failed}");
    let logs = r.nx(&["logs", d["id"].as_str().unwrap()]).success().stdout;
    assert!(logs.contains("exiting on purpose after 400 ms"), "{logs}");
    assert!(logs.contains("giving up"), "{logs}");
    let page = r.get(d["preview_url"].as_str().unwrap());
    assert_eq!(page.status, 502);
}

/// `nx logs -f -n 1 ID` running with `key`, and the lines it prints.
fn follow_logs(
    r: &Receiver,
    key: &str,
    id: &str,
) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut follow = Command::new(bin("nx"))
        .args(["logs", "-f", "-n", "1", id])
        .env("NX_SERVER", r.api())
        .env("NX_KEY", key)
        .env("HOME", r.dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    (follow, lines)
}

#[test]
fn logs_show_output_and_follow_new_lines() {
    let r = Receiver::start();
    r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    let id = d["id"].as_str().unwrap();
    let logs = r.nx(&["logs", id]).success().stdout;
    assert!(logs.contains("listening on 127.0.0.1:"), "{logs}");
    assert!(logs.contains("[nx] healthy on"), "{logs}");

    let (mut follow, mut lines) = follow_logs(&r, &r.admin_token, id);
    // One old line comes first; then every line written since, once each
    // and in order (the app's own start lines may still be on their way
    // from its shim), then what the app prints from now on.
    let stored: Vec<&str> = logs.lines().collect();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("20") && !first.contains("marker-4242"), "{first:?}");
    let url = d["preview_url"].as_str().unwrap();
    assert_eq!(r.get(&format!("{url}/print?text=marker-4242")).body, "printed\n");
    let mut seen = vec![first];
    loop {
        let line = lines.next().unwrap().unwrap();
        assert!(!seen.contains(&line), "{line:?} came twice: {seen:?}");
        if line.ends_with(" marker-4242") {
            break;
        }
        // A line `nx logs` showed comes after those it showed before it.
        if let Some(at) = stored.iter().position(|l| *l == line) {
            let before = seen.iter().filter_map(|l| stored.iter().position(|s| s == l)).max();
            assert!(before.is_none_or(|b| at > b), "{line:?} came after newer lines: {seen:?}");
        }
        seen.push(line);
    }
    follow.kill().unwrap();
    let _ = follow.wait();
}

#[test]
fn a_log_follow_ends_once_its_key_is_revoked_or_replaced() {
    let r = Receiver::start();
    let key = r.create_app("web");
    let key_id = key.split('_').nth(1).unwrap();
    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    let id = d["id"].as_str().unwrap();
    let url = d["preview_url"].as_str().unwrap();
    let print = |text: &str| assert_eq!(r.get(&format!("{url}/print?text={text}")).body, "printed\n");
    let (mut follow, mut lines) = follow_logs(&r, &key, id);
    let (mut admins, mut admin_lines) = follow_logs(&r, &r.admin_token, id);
    lines.next().unwrap().unwrap();
    admin_lines.next().unwrap().unwrap();
    let sees = |lines: &mut dyn Iterator<Item = std::io::Result<String>>, text: &str| {
        lines.map(Result::unwrap).any(|l| l.ends_with(&format!(" {text}")))
    };
    // While the keys hold, the follows go on past their rechecks.
    std::thread::sleep(std::time::Duration::from_secs(6));
    print("still-followed");
    assert!(sees(&mut lines, "still-followed") && sees(&mut admin_lines, "still-followed"));

    // The follow ends by itself, saying why, within its recheck interval.
    let ended = "[nx] the key this follow was opened with was revoked or replaced, or its app removed: it ends here";
    // A follow that does not end is killed after 20 s, so the test fails
    // instead of waiting for ever.
    let until_end = |lines: &mut dyn Iterator<Item = std::io::Result<String>>, pid: u32| {
        let at = std::time::Instant::now();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if wait.recv_timeout(std::time::Duration::from_secs(20)).is_err() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        });
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        let _ = done.send(());
        watchdog.join().unwrap();
        assert_eq!(rest.last().map(String::as_str), Some(ended), "{rest:?}");
        assert!(at.elapsed() < std::time::Duration::from_secs(15), "{:?}", at.elapsed());
    };
    r.nx_ok(&["keys", "revoke", "web", key_id]);
    until_end(&mut lines, follow.id());
    let _ = follow.wait();
    // The admin's goes on, until its token is replaced.
    print("admin-only");
    assert!(sees(&mut admin_lines, "admin-only"));
    r.nx_ok(&["keys", "rotate-admin"]);
    until_end(&mut admin_lines, admins.id());
    let _ = admins.wait();
}

#[test]
fn a_stop_ends_log_follows_at_once_and_the_app_answers_on() {
    // The grace is long: a stop that waited for the follow would take it.
    let mut r = with_args(&["--shutdown-grace", "60s"]);
    r.create_app("web");
    let d = r.push("web", &fixtures::c_musl_static(), &[]);
    let id = d["id"].as_str().unwrap();
    let url = d["preview_url"].as_str().unwrap().to_owned();
    let (mut follow, mut lines) = follow_logs(&r, &r.admin_token, id);
    assert!(lines.next().is_some_and(|l| l.is_ok()), "the follow is open");

    let asked = std::time::Instant::now();
    let status = r.stop_with(Signal::SIGTERM);
    let took = asked.elapsed();
    assert!(status.success(), "nx-receiver exited with {status} on SIGTERM:\n{}", r.log());
    assert!(took < std::time::Duration::from_secs(20), "the stop waited {took:?} for the follow");
    // The follower is told why its log ended, and ends well.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(
        rest.last().map(String::as_str),
        Some("[nx] the receiver is stopping: this follow ends here; run it again once the receiver is back"),
        "{rest:?}"
    );
    assert!(follow.wait().unwrap().success());
    // The app outlived the receiver's stop.
    assert_eq!(r.get(&url).status, 200);
    r.start_again();
    assert_eq!(r.get(&url).status, 200);
}

/// The parent pid in a `/proc/PID/stat` line (the field after the state).
fn parent(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Processes in state Z (zombies) whose command is `comm`.
fn zombies(names: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = &stat[open + 1..close];
        if stat[close + 1..].trim_start().starts_with('Z') && names.contains(&comm) {
            found.push(stat);
        }
    }
    found
}

#[test]
fn a_stop_leaves_no_process_and_no_zombie() {
    let mut r = Receiver::start();
    r.create_app("evil");
    let d = r.push("evil", &fixtures::evil(), &["--arg", "serve"]);
    let url = d["preview_url"].as_str().unwrap();
    assert_eq!(r.get(&format!("{url}/attack/daemonize")).body, "INFO left a daemon behind");
    // The namespace's pid 1 reaps what the app leaves to it as it ends.
    assert_eq!(r.get(&format!("{url}/attack/orphans")).body, "INFO pid 1 is nx-init, 0 of 3 orphans left as zombies");
    let id = d["id"].as_str().unwrap();
    let running = deployment_processes(&r.data_dir(), id);
    assert!(running.len() >= 4, "server, daemon, bwrap and nx-init run: {running:?}");
    let status = r.stop_with(Signal::SIGTERM);
    assert!(status.success());
    assert_eq!(r.stop_all().code, 0);
    let left = deployment_processes(&r.data_dir(), id);
    assert!(left.is_empty(), "{left:?}");
    // No process of ours leaves a zombie behind. The shims the stopped
    // receiver left were re-parented to the host's init (and so was a
    // sandbox's bwrap whose shim was killed at the end of the grace, as a
    // loaded machine can make happen), which reaps them when it gets to it.
    let z = zombies(&["evil", "bwrap", "nx-init", "nx-shim"]);
    let ours: Vec<&String> = z.iter().filter(|stat| parent(stat) != Some(1)).collect();
    assert!(ours.is_empty(), "zombies left: {ours:?}");
    eventually(10, "init to reap what it was given", || {
        zombies(&["evil", "bwrap", "nx-init", "nx-shim"]).is_empty().then_some(())
    });
    r.start_again();
}

#[test]
fn a_sandbox_that_cannot_be_made_fails_closed() {
    let r = with_args(&["--bwrap", "/nonexistent/bwrap"]);
    r.create_app("web");
    let out = r.nx(&["push", fixtures::go(Go::Static).to_str().unwrap(), "--app", "web"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("cannot create the sandbox") && out.stderr.contains("/nonexistent/bwrap"),
        "{}",
        out.stderr
    );
    let s = state(&r, "web");
    assert_eq!(s["state"], "failed");
    assert!(deployment_processes(&r.data_dir(), s["id"].as_str().unwrap()).is_empty());
}

#[test]
fn an_explicit_health_path_must_answer_success() {
    let r = with_args(&["--start-timeout", "3s"]);
    r.create_app("web");
    r.nx(&["apps", "set", "web", "--health-path", "/nope"]).success();
    // The example app answers /nope with 404: not healthy.
    let out = r.nx(&["push", bin("hello").to_str().unwrap(), "--app", "web"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("answered /nope with status 404"), "{}", out.stderr);
    r.nx(&["apps", "set", "web", "--health-path", "/healthz"]).success();
    let d = r.push("web", &bin("hello"), &[]);
    assert_eq!(d["state"], "healthy");
    r.nx(&["apps", "set", "web", "--health-tcp"]).success();
    assert_eq!(r.push("web", &fixtures::go(Go::Static), &[])["state"], "healthy");
}

#[test]
fn an_app_cannot_forge_platform_lines_or_drive_the_terminal_of_nx_logs() {
    let r = Receiver::start();
    r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    let id = d["id"].as_str().unwrap();
    let url = d["preview_url"].as_str().unwrap();
    // "[nx] healthy on forged", then a terminal title change and a clear screen.
    for text in ["%5Bnx%5D%20healthy%20on%20forged", "title%1B%5D0%3Bpwned%07%1B%5B2Jcleared"] {
        assert_eq!(r.get(&format!("{url}/print?text={text}")).body, "printed\n");
    }
    // Into a pipe: the lines as stored, the forged one behind the app's mark.
    let logs = eventually(10, "the printed lines in the log", || {
        let logs = r.nx(&["logs", id]).success().stdout;
        logs.contains("cleared").then_some(logs)
    });
    let platform: Vec<&str> = logs
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(_, text)| text)
        .filter(|t| t.starts_with("[nx]"))
        .collect();
    assert!(!platform.is_empty() && platform.iter().all(|t| !t.contains("forged")), "{platform:?}");
    assert!(logs.contains(" [app] [nx] healthy on forged\n"), "{logs}");
    assert!(logs.contains(" title\u{1b}]0;pwned\u{7}\u{1b}[2Jcleared\n"), "stored as printed: {logs}");
    // On a terminal (a pseudo-terminal from script(1)): shown, not acted on.
    let on_terminal = |extra: &str| {
        let command = format!("{} logs {extra} {id}", bin("nx").display());
        let out = Command::new(nx_e2e::require_program("script", "bsdutils"))
            .args(["-qec", &command, "/dev/null"])
            .env("NX_SERVER", r.api())
            .env("NX_KEY", &r.admin_token)
            .env("HOME", r.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = on_terminal("");
    assert!(shown.contains(" title\\x1b]0;pwned\\x07\\x1b[2Jcleared\r\n"), "{shown:?}");
    assert!(!shown.contains('\u{1b}'), "{shown:?}");
    let raw = on_terminal("--raw");
    assert!(raw.contains(" title\u{1b}]0;pwned\u{7}\u{1b}[2Jcleared"), "{raw:?}");
}

/// The receiver reaps every child with `waitpid(-1)`; a tool it ran beside
/// its process manager would lose its exit status at random. Dumps, restores,
/// filesystem creation and app creation all keep theirs while a sandbox
/// crashes and restarts many times a second.
#[test]
fn tools_keep_their_exit_status_while_sandboxes_exit_around_them() {
    let r = with_args(&["--max-restarts", "100000", "--restart-backoff", "10ms"]);
    r.create_app("web");
    // It may be between two lives when the push answers: healthy or not, it
    // is the deployment that matters.
    // Each life ends soon, but only after its first health check can pass
    // on a loaded host: a first life that ends unanswered fails the
    // deployment instead of restarting it (30 ms did, under load).
    let goweb = fixtures::go(Go::Static);
    let pushed = r.nx(&["--json", "push", goweb.to_str().unwrap(), "--app", "web", "--env", "EXIT_AFTER_MS=250"]);
    let id = pushed.json()["deployment"]["id"].as_str().unwrap().to_owned();
    let restarts = |r: &Receiver| r.nx(&["logs", &id]).success().stdout.matches("restarting").count();
    eventually(30, "the app to crash and restart", || (restarts(&r) >= 3).then_some(()));
    let before = restarts(&r);
    let dir = tempfile::tempdir().unwrap();
    for round in 0..4 {
        let dump = dir.path().join(format!("web-{round}.dump"));
        r.nx(&["db", "backup", "web", "-o", dump.to_str().unwrap()]).success();
        assert!(std::fs::metadata(&dump).unwrap().len() > 0, "a dump was written");
        r.nx(&["db", "restore", "web", dump.to_str().unwrap()]).success();
        r.create_app(&format!("other{round}"));
    }
    assert!(restarts(&r) > before, "sandboxes kept exiting during the tools' runs");
}
