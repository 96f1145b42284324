//! One app's share of the host: a deploy key pushing in a loop, opening
//! previews with databases of their own, or growing its variables is refused
//! at its app's caps, with the exact reason and nothing recorded, while
//! other apps keep deploying and the app's production keeps getting its
//! variables.

use nx_e2e::fixtures::{self, Go};
use nx_e2e::receiver::{psql, Options};
use nx_e2e::signed::{send, Signed};
use nx_e2e::Receiver;

fn id(d: &serde_json::Value) -> String {
    d["id"].as_str().unwrap().to_owned()
}

fn receiver(args: &[&str]) -> Receiver {
    Receiver::start_with(Options { args: args.iter().map(|a| (*a).to_owned()).collect(), ..Options::default() })
}

/// A push made by hand, as a looping script would: `meta` is the push's
/// metadata; answers the status and body.
fn raw_push(r: &Receiver, key: &str, app: &str, binary: &[u8], meta: serde_json::Value) -> (u16, String) {
    let meta = serde_json::to_vec(&meta).unwrap();
    let s = Signed::new("POST", &format!("/v1/apps/{app}/deployments"), binary, Some(&meta));
    send(&r.api(), &s, key, binary.to_vec())
}

/// The error message of an API answer.
fn error(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["error"].as_str().unwrap().to_owned()
}

/// One SQL answer from the metadata database.
fn metadata(r: &Receiver, sql: &str) -> String {
    psql(&r.admin_url("nx"), sql).unwrap()
}

fn deployments_of(r: &Receiver, app: &str) -> String {
    metadata(r, &format!("SELECT count(*) FROM deployments d JOIN apps a ON a.id = d.app_id WHERE a.name = '{app}'"))
}

fn state(r: &Receiver, deployment: &str) -> String {
    metadata(r, &format!("SELECT state FROM deployments WHERE id = '{deployment}'"))
}

#[test]
fn a_push_past_the_running_cap_is_refused_naming_the_running_ones_while_env_changes_still_replace_production() {
    let r = receiver(&["--max-running-per-app", "3"]);
    let key = r.create_app("web");
    r.create_app("other");
    let goweb = fixtures::go(Go::Static);
    let rollback = r.push("web", &goweb, &["--promote"]);
    let production = r.push("web", &goweb, &["--promote"]);
    let bytes = std::fs::read(&goweb).unwrap();
    let third = serde_json::json!({ "filename": "goweb", "pr": 4, "push_id": "quotas-third-push-1" });
    let (status, preview) = raw_push(&r, &key, "web", &bytes, third.clone());
    assert_eq!(status, 201, "{preview}");
    let preview: serde_json::Value = serde_json::from_str(&preview).unwrap();
    let rollback_url = rollback["preview_url"].as_str().unwrap().to_owned();
    let (rollback, production, preview) = (id(&rollback), id(&production), id(&preview));
    let refusal = format!(
        "app web already runs 3 deployments, the most one app may run on this server (--max-running-per-app 3): \
         {rollback} (rollback target), {production} (production), {preview} (pull request #4); stop one it no \
         longer needs with `nx stop ID --app web`, or ask the operator to raise --max-running-per-app"
    );

    // The app's own deploy key, waiting or not for the outcome: 409, the
    // running ones named, nothing recorded.
    for meta in
        [serde_json::json!({ "filename": "goweb" }), serde_json::json!({ "filename": "goweb", "no_wait": true })]
    {
        let (status, body) = raw_push(&r, &key, "web", &bytes, meta);
        assert_eq!((status, error(&body)), (409, refusal.clone()));
    }
    let cli = r.nx_with_key(&key, &["push", goweb.to_str().unwrap(), "--app", "web"]);
    assert_eq!(cli.code, 1, "{cli:?}");
    assert!(cli.stderr.contains(&refusal), "{}", cli.stderr);
    assert_eq!(deployments_of(&r, "web"), "3", "a refused push records nothing");
    // A retry of a push already recorded takes no new place: it gets its deployment.
    let (status, retried) = raw_push(&r, &key, "web", &bytes, third);
    assert_eq!(status, 201, "{retried}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&retried).unwrap()["id"], preview.as_str());

    // Another app is not held back by it.
    r.push("other", &goweb, &["--promote"]);

    // At the cap, a variable still reaches production: its replacement runs
    // next to it, and the deployment it pushes out of the rollback place is
    // stopped to bring the app back within the cap.
    let set = r.nx_ok(&["--json", "env", "set", "GREETING=capped", "--app", "web"]).json();
    let replacement = set["production"]["production"].as_str().unwrap().to_owned();
    assert_eq!(set["production"]["previous"], production.as_str(), "{set}");
    assert_eq!(r.get(&format!("http://web.localhost:{}/", r.router_port)).body, "capped\n");
    assert_eq!(state(&r, &rollback), "stopped");
    let page = r.get(&rollback_url);
    assert_eq!(page.status, 410);
    assert!(
        page.body.contains(
            "stopped to keep app web within --max-running-per-app 3: an environment change replaced production and \
             this was the rollback target before it"
        ),
        "{}",
        page.body
    );
    let running = metadata(
        &r,
        "SELECT string_agg(d.id, ',' ORDER BY d.created_at) FROM deployments d JOIN apps a ON a.id = d.app_id \
         WHERE a.name = 'web' AND d.state IN ('pending', 'starting', 'healthy')",
    );
    assert_eq!(running, format!("{production},{preview},{replacement}"));
    assert_eq!(state(&r, &preview), "healthy", "the preview restarted with the variable");

    // Stopping one makes room for the next push.
    r.nx_ok(&["stop", &preview, "--app", "web"]);
    r.push("web", &goweb, &[]);
}

#[test]
fn a_preview_past_the_database_cap_is_refused_and_racing_pushes_take_the_last_place_once() {
    // Three uploads of one app at once are within the upload caps, so the
    // race below is decided by the database cap alone.
    let r = receiver(&["--max-preview-databases-per-app", "2", "--max-uploads-per-app", "3"]);
    let key = r.create_app("web");
    r.create_app("other");
    for app in ["web", "other"] {
        r.nx_ok(&["apps", "set", app, "--preview-db", "empty"]);
    }
    let binary = fixtures::c_musl_static();
    let one = id(&r.push("web", &binary, &["--pr", "1"]));
    let two = id(&r.push("web", &binary, &["--pr", "2"]));
    let databases = || {
        psql(&r.admin_url("postgres"), "SELECT count(*) FROM pg_database WHERE datname LIKE 'prv\\_web\\_%'").unwrap()
    };
    assert_eq!(databases(), "2");

    let refusal = |held: &str| {
        format!(
            "app web already has 2 previews with a database of their own, the most one app may have on this server \
             (--max-preview-databases-per-app 2): {held}; stop previews it no longer needs with `nx stop ID --app web` \
             or `nx stop --pr N --app web` (their databases are dropped), or ask the operator to raise \
             --max-preview-databases-per-app"
        )
    };
    let bytes = std::fs::read(&binary).unwrap();
    let (status, body) = raw_push(&r, &key, "web", &bytes, serde_json::json!({ "filename": "hello", "pr": 3 }));
    assert_eq!((status, error(&body)), (409, refusal(&format!("{one} (pull request #1), {two} (pull request #2)"))));
    assert_eq!((databases(), deployments_of(&r, "web")), ("2".into(), "2".into()), "nothing made or recorded");

    // Pushes without a database of their own, and other apps' previews, go on.
    r.push("web", &binary, &[]);
    r.push("other", &binary, &["--pr", "1"]);

    // One place left, three previews at once: exactly one gets it.
    r.nx_ok(&["stop", "--pr", "1", "--app", "web"]);
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let racers: Vec<_> = (10..13)
            .map(|pr| {
                let (r, key, bytes) = (&r, &key, &bytes);
                s.spawn(move || {
                    raw_push(
                        r,
                        key,
                        "web",
                        bytes,
                        serde_json::json!({ "filename": "hello", "pr": pr, "no_wait": true }),
                    )
                })
            })
            .collect();
        racers.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let won: Vec<&(u16, String)> = answers.iter().filter(|(status, _)| *status == 201).collect();
    assert_eq!(won.len(), 1, "{answers:?}");
    let winner: serde_json::Value = serde_json::from_str(&won[0].1).unwrap();
    let pr = winner["pr"].as_u64().unwrap();
    for (status, body) in answers.iter().filter(|(status, _)| *status != 201) {
        assert_eq!(
            (*status, error(body)),
            (409, refusal(&format!("{two} (pull request #2), {} (pull request #{pr})", id(&winner))))
        );
    }
    assert_eq!(databases(), "2");

    // A reserved database that was never made (the receiver stopped between
    // the two) fails its preview at the next start: never production's
    // database in its place.
    let mut r = r;
    let winner = id(&winner);
    metadata(&r, &format!("UPDATE deployments SET db_password = NULL WHERE id = '{winner}'"));
    r.restart();
    let failed = metadata(&r, &format!("SELECT state || ': ' || error FROM deployments WHERE id = '{winner}'"));
    assert_eq!(
        failed,
        format!(
            "failed: cannot prepare the sandbox: its own database prv_web_{winner} was never made; push again to get \
             a preview that has one"
        )
    );
}

#[test]
fn variables_past_the_cap_are_refused_on_env_set_and_on_push_with_nothing_stored() {
    let r = Receiver::start();
    let key = r.create_app("web");
    let many: Vec<String> = (0..257).map(|i| format!("V{i}=x")).collect();
    let many_bytes: usize = many.iter().map(|kv| kv.len() - 1).sum();
    let names_and_sizes = |names: usize, bytes: usize| {
        format!(
            "would be {names} variables of {bytes} bytes (names and values), over the limit of 256 variables and \
             65536 bytes per app"
        )
    };
    let app_refusal = |names, bytes| {
        format!(
            "app web's variables {}; remove ones it no longer needs with `nx env unset NAME --app web` first; \
             nothing was changed",
            names_and_sizes(names, bytes)
        )
    };
    let stored = || metadata(&r, "SELECT count(*) FROM app_env");

    // `nx env set` with 257 names: refused, none stored.
    let mut args = vec!["env", "set"];
    args.extend(many.iter().map(String::as_str));
    args.extend(["--app", "web"]);
    let out = r.nx_with_key(&key, &args);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(&app_refusal(257, many_bytes)), "{}", out.stderr);
    assert_eq!(stored(), "0");

    // 256 fit; one more, or one value that takes the bytes past 64 KiB, does
    // not: 413, and what was there stays.
    let mut args = vec!["env", "set"];
    args.extend(many[..256].iter().map(String::as_str));
    args.extend(["--app", "web"]);
    r.nx_ok(&args);
    assert_eq!(stored(), "256");
    let patch = |body: serde_json::Value| {
        let body = serde_json::to_vec(&body).unwrap();
        let s = Signed::new("PATCH", "/v1/apps/web/env", &body, None);
        send(&r.api(), &s, &key, body)
    };
    let (status, body) = patch(serde_json::json!({ "set": { "EXTRA": "1" } }));
    let at_256: usize = many[..256].iter().map(|kv| kv.len() - 1).sum();
    assert_eq!((status, error(&body)), (413, app_refusal(257, at_256 + "EXTRA1".len())));
    let big = "y".repeat(65_536);
    let (status, body) = patch(serde_json::json!({ "set": { "V0": big }, "unset": ["V1"] }));
    assert_eq!((status, error(&body)), (413, app_refusal(255, at_256 - "V0x".len() - "V1x".len() + 2 + 65_536)));
    assert_eq!(stored(), "256", "the unset of the refused change did not happen either");
    let v1 = metadata(&r, "SELECT count(*) FROM app_env WHERE name = 'V1'");
    assert_eq!(v1, "1");
    r.nx_ok(&["env", "unset", "V0", "V1", "--app", "web"]);
    assert_eq!(stored(), "254");

    // A push's own variables: refused before the binary is read, nothing
    // recorded or stored.
    let bytes = std::fs::read(fixtures::c_musl_static()).unwrap();
    let env: serde_json::Map<String, serde_json::Value> =
        (0..257).map(|i| (format!("V{i}"), serde_json::Value::from("x"))).collect();
    let (status, body) = raw_push(&r, &key, "web", &bytes, serde_json::json!({ "filename": "hello", "env": env }));
    let push_refusal = format!(
        "the push's own variables {}; pass fewer with --env, and keep the ones every deployment needs with `nx env set`",
        names_and_sizes(257, many_bytes)
    );
    assert_eq!((status, error(&body)), (413, push_refusal));
    let out = r.nx_with_key(
        &key,
        &["push", fixtures::c_musl_static().to_str().unwrap(), "--app", "web", "--env", &format!("BIG={big}")],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(&format!("the push's own variables {}", names_and_sizes(1, 3 + 65_536))),
        "{}",
        out.stderr
    );
    assert_eq!(deployments_of(&r, "web"), "0");
    assert_eq!(metadata(&r, "SELECT count(*) FROM artifacts"), "0", "not even the binary was taken");
}
