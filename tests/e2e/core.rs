//! The core loop: push a binary, get a preview URL, promote it, push again,
//! restart the receiver, and nothing is lost.

use nix::sys::signal::Signal;
use nx_e2e::{bin, processes_of, require_program, Receiver};

/// The visit number in the example app's answer.
fn visit_number(body: &str) -> u64 {
    body.trim().rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no visit number in {body:?}"))
}

fn caddy_args(body: &str) -> Vec<String> {
    ["respond", "--listen", "127.0.0.1:$PORT", "--body", body]
        .iter()
        .flat_map(|a| ["--arg".to_owned(), a.to_string()])
        .collect()
}

fn push_caddy(r: &Receiver, app: &str, body: &str) -> serde_json::Value {
    let caddy = require_program("caddy", "caddy");
    let args = caddy_args(body);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    r.push(app, &caddy, &args)
}

#[test]
fn push_preview_promote_switch_and_survive_a_restart() {
    let mut r = Receiver::start();
    r.create_app("web");
    r.create_app("site");
    let hello = bin("hello");

    // The example app: a preview that answers and counts in its own database.
    let v1 = r.push("web", &hello, &["--env", "GREETING=one"]);
    assert_eq!(v1["state"], "healthy", "{v1}");
    let v1_url = v1["preview_url"].as_str().unwrap().to_owned();
    assert!(
        v1_url.starts_with(&format!("http://{}--web.localhost:{}", v1["id"].as_str().unwrap(), r.router_port)),
        "{v1_url}"
    );
    let a = r.get(&v1_url);
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.starts_with("one from web deployment"), "{}", a.body);

    // Debian's caddy, a dynamically linked Go program, answering on $PORT.
    let c1 = push_caddy(&r, "site", "caddy one");
    let c1_url = c1["preview_url"].as_str().unwrap().to_owned();
    let a = r.get(&c1_url);
    assert_eq!((a.status, a.body.as_str()), (200, "caddy one"));

    // Nothing is production before a promotion.
    let prod = format!("http://web.localhost:{}/", r.router_port);
    assert_eq!(r.get(&prod).status, 404);

    r.nx(&["promote", v1["id"].as_str().unwrap()]).success();
    let a = r.get(&prod);
    assert!(a.body.starts_with("one from web"), "{}", a.body);
    let before = visit_number(&a.body);

    // A second version, promoted: production switches, the count goes on.
    let v2 = r.push("web", &hello, &["--env", "GREETING=two"]);
    assert_ne!(v2["id"], v1["id"]);
    r.nx(&["promote", v2["id"].as_str().unwrap(), "--app", "web"]).success();
    let a = r.get(&prod);
    assert!(a.body.starts_with("two from web"), "{}", a.body);
    assert!(visit_number(&a.body) > before, "the visit counter was reset: {} after {before}", a.body);
    // The previous version still answers on its own preview URL.
    assert!(r.get(&v1_url).body.starts_with("one from web"));

    let c2 = push_caddy(&r, "site", "caddy two");
    r.nx(&["promote", c1["id"].as_str().unwrap()]).success();
    let site = format!("http://site.localhost:{}/", r.router_port);
    assert_eq!(r.get(&site).body, "caddy one");
    r.nx(&["promote", c2["id"].as_str().unwrap()]).success();
    assert_eq!(r.get(&site).body, "caddy two");

    // Restart: every deployment answers again on the same URL, without a push.
    let count_before = visit_number(&r.get(&prod).body);
    r.restart();
    for (url, expect) in [(&v1_url, "one from web"), (&prod, "two from web")] {
        let a = r.get(url);
        assert_eq!(a.status, 200, "{url} after restart: {a:?}\n{}", r.log());
        assert!(a.body.starts_with(expect), "{url}: {}", a.body);
    }
    assert!(visit_number(&r.get(&prod).body) > count_before);
    // Two deployments of one app came back at once: both on its one volume.
    assert_eq!(r.get(&c1_url).body, "caddy one", "{}", r.log());
    assert_eq!(r.get(&site).body, "caddy two", "{}", r.log());
    let listing = r.nx(&["--json", "ls", "web"]).success().json();
    assert_eq!(listing[0]["deployments"].as_array().unwrap().len(), 2, "a restart must not create deployments");
}

#[test]
fn ls_shows_apps_deployments_states_and_urls() {
    let r = Receiver::start();
    r.create_app("web");
    let empty = r.nx(&["ls"]).success();
    assert!(empty.stdout.contains("no deployments yet"), "{}", empty.stdout);
    let d = r.push("web", &bin("hello"), &[]);
    let id = d["id"].as_str().unwrap();
    r.nx(&["promote", id]).success();
    let out = r.nx(&["ls"]).success();
    assert!(out.stdout.contains("http://web.localhost"), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("* {id}")), "production is marked: {}", out.stdout);
    assert!(out.stdout.contains("healthy"), "{}", out.stdout);
    assert!(out.stdout.contains(d["preview_url"].as_str().unwrap()), "{}", out.stdout);
    let json = r.nx(&["--json", "ls"]).success().json();
    assert_eq!(json[0]["app"]["name"], "web");
    assert_eq!(json[0]["deployments"][0]["production"], true);
}

#[test]
fn a_binary_that_crashes_fails_with_its_last_words() {
    let r = Receiver::start();
    r.create_app("web");
    // The example app without a database URL it can reach exits at once.
    let out = r.nx(&["push", bin("hello").to_str().unwrap(), "--app", "web", "--env", "DATABASE_URL=not-a-url"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("before answering its health check"), "{}", out.stderr);
    assert!(out.stderr.contains("cannot connect to DATABASE_URL"), "the app's own error is shown: {}", out.stderr);
    let json = r.nx(&["--json", "ls", "web"]).success().json();
    let d = &json[0]["deployments"][0];
    assert_eq!(d["state"], "failed");
    let page = r.get(d["preview_url"].as_str().unwrap());
    assert_eq!(page.status, 502);
    assert!(page.body.contains("failed to start"), "{}", page.body);
}

#[test]
fn unsigned_and_wrongly_signed_pushes_are_refused_and_store_nothing() {
    let r = Receiver::start();
    r.create_app("web");
    let client = reqwest::blocking::Client::new();
    let resp = client.post(format!("{}/v1/apps/web/deployments", r.api())).body("\x7fELF not signed").send().unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let text = resp.text().unwrap();
    assert!(text.contains("missing header x-nx-key"), "{text}");

    let wrong = "nxa_0000000000000000000000000000000000000000";
    let out = r.nx_with_key(wrong, &["push", bin("hello").to_str().unwrap(), "--app", "web"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("signature") && out.stderr.contains("does not match"), "{}", out.stderr);

    let listing = r.nx(&["--json", "ls", "web"]).success().json();
    assert!(listing[0]["deployments"].as_array().unwrap().is_empty());
    let stored = std::fs::read_dir(r.data_dir().join("store/artifacts")).unwrap().count();
    assert_eq!(stored, 0, "nothing may be stored for a refused push");
    assert_eq!(std::fs::read_dir(r.data_dir().join("tmp")).unwrap().count(), 0);
}

#[test]
fn a_script_is_refused_before_upload_and_by_the_server() {
    let r = Receiver::start();
    r.create_app("web");
    let script = r.dir.path().join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let out = r.nx(&["push", script.to_str().unwrap(), "--app", "web"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("script"), "{}", out.stderr);
    // The server does not trust the client's check.
    let out = r.nx(&["push", script.to_str().unwrap(), "--app", "web", "--skip-verify"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("will not run on the server") && out.stderr.contains("script"), "{}", out.stderr);
    assert_eq!(std::fs::read_dir(r.data_dir().join("store/artifacts")).unwrap().count(), 0);
}

#[test]
fn sigint_stops_the_receiver_but_not_its_apps_and_stop_all_stops_them() {
    let mut r = Receiver::start();
    r.create_app("web");
    let d = r.push("web", &bin("hello"), &[]);
    let id = d["id"].as_str().unwrap();
    let running = processes_of(&r.data_dir(), &[id]);
    for what in ["postgres", "nx-router", "nx-shim", "bwrap", "/app/hello"] {
        assert!(running.iter().any(|(_, c)| c.contains(what)), "{what} is not running: {running:?}");
    }
    let status = r.stop_with(Signal::SIGINT);
    assert!(status.success(), "{status}:\n{}", r.log());
    // Everything runs on, the same processes: the app under its shim,
    // PostgreSQL and nx-router on their own, for the next receiver to adopt.
    let left = processes_of(&r.data_dir(), &[id]);
    let pid_of = |list: &[(i32, String)], what: &str| list.iter().find(|(_, c)| c.contains(what)).map(|(pid, _)| *pid);
    for what in ["postgres -D", "nx-router", "/app/hello"] {
        assert!(pid_of(&left, what).is_some(), "{what} stopped with the receiver: {left:?}");
        assert_eq!(pid_of(&left, what), pid_of(&running, what), "{what} was restarted: {left:?}");
    }
    // The explicit way to stop everything.
    let out = r.stop_all();
    assert_eq!(out.code, 0, "{out:?}");
    let left = processes_of(&r.data_dir(), &[id]);
    assert!(left.is_empty(), "processes outlived stop-all: {left:?}");

    r.start_again();
    let a = r.get(d["preview_url"].as_str().unwrap());
    assert_eq!(a.status, 200, "{a:?}");
}
