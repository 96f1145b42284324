//! Previews that clean up after themselves: idle ones stop, closed pull
//! requests take theirs along, old deployments and unused binaries go, and
//! production and the rollback target are never touched.

use std::time::{Duration, Instant};

use nx_e2e::fixtures::{self, Go};
use nx_e2e::receiver::{psql, NxOutput, Options};
use nx_e2e::{bin, eventually, Receiver};

fn id(d: &serde_json::Value) -> String {
    d["id"].as_str().unwrap().to_owned()
}

/// The state of each deployment of `app`, by id.
fn states(r: &Receiver, app: &str) -> std::collections::BTreeMap<String, String> {
    let listing = r.nx_ok(&["--json", "ls", app]).json();
    listing[0]["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (id(d), d["state"].as_str().unwrap().to_owned()))
        .collect()
}

/// A receiver whose app `web` gives pull requests' previews a database of
/// their own, and a preview of pull request #7 pushed with variable `env`.
fn preview_of_pr7(env: Option<&str>) -> (Receiver, serde_json::Value) {
    let r = Receiver::start();
    r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--preview-db", "empty"]);
    let mut args = vec!["--pr", "7"];
    args.extend(env.into_iter().flat_map(|e| ["--env", e]));
    let preview = r.push("web", &fixtures::go(Go::Static), &args);
    (r, preview)
}

fn receiver(args: &[&str]) -> Receiver {
    Receiver::start_with(Options { args: args.iter().map(|a| (*a).to_owned()).collect(), ..Options::default() })
}

#[test]
fn idle_previews_stop_and_say_why_while_production_and_its_rollback_target_stay() {
    let r = receiver(&["--preview-idle", "4s", "--janitor-interval", "1s"]);
    r.create_app("web");
    let goweb = fixtures::go(Go::Static);
    let old = r.push("web", &goweb, &["--promote"]);
    let production = r.push("web", &goweb, &["--promote"]);
    let idle = r.push("web", &goweb, &[]);
    let busy = r.push("web", &goweb, &[]);

    // The busy preview is visited every half second for longer than the idle time.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        assert_eq!(r.get(busy["preview_url"].as_str().unwrap()).status, 200);
        std::thread::sleep(Duration::from_millis(500));
    }
    let s = states(&r, "web");
    assert_eq!(s[&id(&idle)], "stopped", "{s:?}");
    assert_eq!(s[&id(&busy)], "healthy", "a visited preview stays: {s:?}");
    assert_eq!(s[&id(&production)], "healthy", "production is never idle-stopped: {s:?}");
    assert_eq!(s[&id(&old)], "healthy", "nor is the rollback target: {s:?}");
    let page = r.get(idle["preview_url"].as_str().unwrap());
    assert_eq!(page.status, 410);
    assert!(page.body.contains("no requests for 4 seconds"), "{}", page.body);

    // Left alone, the busy one goes too.
    eventually(15, "the no longer visited preview to stop", || {
        (states(&r, "web")[&id(&busy)] == "stopped").then_some(())
    });
    r.nx_ok(&["rollback", "--app", "web"]);
}

#[test]
fn a_closed_pull_request_stops_its_previews_and_drops_their_databases() {
    let r = Receiver::start();
    r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--preview-db", "empty"]);
    let goweb = fixtures::go(Go::Static);
    let first = r.push("web", &goweb, &["--pr", "7"]);
    let second = r.push("web", &goweb, &["--pr", "7"]);
    let other = r.push("web", &goweb, &["--pr", "2"]);
    let databases =
        || psql(&r.admin_url("postgres"), "SELECT count(*) FROM pg_database WHERE datname LIKE '%web\\_%'").unwrap();
    assert_eq!(databases(), "3", "each preview has its own database");

    let closed = r.nx_ok(&["--json", "stop", "--pr", "7"]).json();
    let mut stopped: Vec<String> =
        closed["stopped"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    stopped.sort();
    let mut expected = vec![id(&first), id(&second)];
    expected.sort();
    assert_eq!(stopped, expected);
    assert_eq!(states(&r, "web")[&id(&other)], "healthy");
    assert_eq!(databases(), "1", "the closed pull request's databases are gone");
    let page = r.get(first["preview_url"].as_str().unwrap());
    assert_eq!(page.status, 410);
    assert!(page.body.contains("pull request #7 was closed"), "{}", page.body);

    // The GitHub Action on the real `pull_request` `closed` event (pull
    // request #2 in GitHub's example payload) does the same.
    let event =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/github/webhooks/pull_request.closed.json");
    let summary = tempfile::NamedTempFile::new().unwrap();
    let action = NxOutput::from(
        r.nx_command(&r.admin_token)
            .arg("github-action")
            .env("INPUT_APP", "web")
            .env("GITHUB_EVENT_NAME", "pull_request")
            .env("GITHUB_EVENT_PATH", &event)
            .env("GITHUB_STEP_SUMMARY", summary.path())
            .output()
            .unwrap(),
    );
    assert_eq!(action.code, 0, "{action:?}");
    assert!(action.stdout.contains(&id(&other)), "{}", action.stdout);
    assert_eq!(states(&r, "web")[&id(&other)], "stopped");
    assert!(std::fs::read_to_string(summary.path()).unwrap().contains("Pull request #2 closed"));
    assert_eq!(databases(), "0");
}

#[test]
fn a_preview_stopped_while_its_promotion_waits_is_neither_started_again_nor_promoted() {
    let (r, preview) = preview_of_pr7(None);

    std::thread::scope(|s| {
        // An environment change restarts the preview, which takes 3 s to
        // answer; whatever else is asked of it waits its turn.
        let change = s.spawn(|| r.nx_ok(&["env", "set", "--app", "web", "START_DELAY_MS=3000"]));
        eventually(20, "the restart to begin", || (states(&r, "web")[&id(&preview)] == "starting").then_some(()));
        // Pull request #7 closes, then a promotion of its preview is asked
        // for: the close comes first and drops the preview's own database.
        let close = s.spawn(|| r.nx_ok(&["stop", "--pr", "7", "--app", "web"]));
        std::thread::sleep(Duration::from_secs(1));
        let promote = r.nx(&["promote", &id(&preview), "--app", "web"]);
        assert_eq!(promote.code, 1, "{promote:?}");
        assert!(
            promote
                .stderr
                .contains(&format!("deployment {} is stopped, only healthy deployments can be promoted", id(&preview))),
            "{promote:?}"
        );
        close.join().unwrap();
        change.join().unwrap();
    });
    // Neither started again on the app's production database nor production.
    assert_eq!(states(&r, "web")[&id(&preview)], "stopped");
    let listing = r.nx_ok(&["--json", "ls", "web"]).json();
    assert!(listing[0]["app"]["production"].is_null(), "{listing}");
    let page = r.get(preview["preview_url"].as_str().unwrap());
    assert_eq!(page.status, 410);
    assert!(page.body.contains("pull request #7 was closed"), "{}", page.body);
}

#[test]
fn a_pull_request_closing_while_its_preview_is_promoted_leaves_the_new_production_running() {
    // Its start on the app's database, part of the promotion, takes 3 s.
    let (r, preview) = preview_of_pr7(Some("START_DELAY_MS=3000"));

    std::thread::scope(|s| {
        let promote = s.spawn(|| r.nx_ok(&["promote", &id(&preview), "--app", "web"]));
        eventually(20, "the promotion's restart to begin", || {
            (states(&r, "web")[&id(&preview)] == "starting").then_some(())
        });
        // The pull request closes meanwhile; the close waits for the
        // promotion, and then finds production, which it leaves alone.
        let closed = r.nx_ok(&["--json", "stop", "--pr", "7", "--app", "web"]).json();
        assert_eq!(closed["stopped"], serde_json::json!([]), "{closed}");
        promote.join().unwrap();
    });
    let listing = r.nx_ok(&["--json", "ls", "web"]).json();
    assert_eq!(listing[0]["app"]["production"], preview["id"], "{listing}");
    assert_eq!(states(&r, "web")[&id(&preview)], "healthy");
    let url = listing[0]["app"]["production_url"].as_str().unwrap().to_owned();
    assert_eq!(r.get(&url).status, 200);
}

#[test]
fn a_promotion_that_fails_on_the_apps_database_puts_the_preview_back_on_its_own() {
    let (r, preview) = preview_of_pr7(Some("EXIT_ON_DATABASE=app_web"));
    let own = || {
        psql(
            &r.admin_url("nx"),
            &format!("SELECT coalesce(db_name, '-') FROM deployments WHERE id = '{}'", id(&preview)),
        )
        .unwrap()
    };
    let databases =
        || psql(&r.admin_url("postgres"), "SELECT count(*) FROM pg_database WHERE datname LIKE '%web\\_%'").unwrap();
    let db = own();
    assert_ne!(db, "-");
    assert_eq!(databases(), "1");

    let promote = r.nx(&["promote", &id(&preview), "--app", "web"]);
    assert_eq!(promote.code, 1, "{promote:?}");
    assert!(promote.stderr.contains("failed on the app's database"), "{promote:?}");
    // Still the preview's, and still counted: not leaked off the books.
    assert_eq!(own(), db);
    assert_eq!(databases(), "1");
    assert!(r.nx_ok(&["--json", "ls", "web"]).json()[0]["app"]["production"].is_null());
    // Stopping it drops it as for any preview.
    r.nx_ok(&["stop", &id(&preview), "--app", "web"]);
    assert_eq!(databases(), "0");
}

#[test]
fn old_deployments_and_binaries_nothing_uses_are_removed() {
    let r = receiver(&["--keep-deployments", "2", "--artifact-grace", "0s", "--janitor-interval", "1s"]);
    r.create_app("web");
    let hello = r.push("web", &bin("hello"), &["--promote"]);
    let goweb = r.push("web", &fixtures::go(Go::Static), &[]);
    let c = fixtures::c_musl_static();
    let c1 = r.push("web", &c, &[]);
    let c2 = r.push("web", &c, &[]);
    let artifacts = r.data_dir().join("store/artifacts");
    let stored = |d: &serde_json::Value| artifacts.join(d["digest"].as_str().unwrap()).exists();
    // An object no row names, as a crash between the collector's commit and
    // its delete leaves: collected too.
    let orphan = artifacts.join("ab".repeat(32));
    std::fs::write(&orphan, b"left by a crash").unwrap();

    eventually(15, "the oldest preview to be removed", || (!states(&r, "web").contains_key(&id(&goweb))).then_some(()));
    let s = states(&r, "web");
    assert_eq!(
        s.keys().cloned().collect::<std::collections::BTreeSet<_>>(),
        [id(&hello), id(&c1), id(&c2)].into_iter().collect(),
        "the two newest and production stay"
    );
    // Its row goes first, then its files, then the router's table.
    eventually(10, "its URL to be gone with it", || {
        (r.get(goweb["preview_url"].as_str().unwrap()).status == 404).then_some(())
    });
    assert!(!r.data_dir().join(format!("logs/deployments/{}.log", id(&goweb))).exists(), "and its log");
    eventually(15, "the binary nothing uses to be deleted", || (!stored(&goweb)).then_some(()));
    assert!(stored(&hello) && stored(&c1), "binaries in use stay");
    eventually(15, "the object no row names to be deleted", || (!orphan.exists()).then_some(()));
    assert_eq!(r.get(c2["preview_url"].as_str().unwrap()).body, "hello from c\n");
}
