//! The `nx` command line as a user meets it: login and its config file, every
//! misuse naming its fix, app removal (and a push racing it), variables,
//! rollback, open, status, completions, colour, and nx.toml.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Stdio;

use nx_e2e::fixtures::{self, Go};
use nx_e2e::load::Load;
use nx_e2e::receiver::{psql, NxOutput};
use nx_e2e::{bin, deployment_processes, eventually, Receiver};

/// Runs `nx` with `stdin` piped in.
fn nx_stdin(r: &Receiver, args: &[&str], stdin: &str) -> NxOutput {
    let mut child = r
        .nx_command(&r.admin_token)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    NxOutput::from(child.wait_with_output().unwrap())
}

fn id(d: &serde_json::Value) -> String {
    d["id"].as_str().unwrap().to_owned()
}

fn body(r: &Receiver, url: &str) -> String {
    r.get(url).body
}

#[test]
fn login_stores_a_private_config_and_every_misuse_names_its_fix() {
    let r = Receiver::start();
    r.create_app("web");
    let home = tempfile::tempdir().unwrap();
    let nx = |envs: &[(&str, &str)], args: &[&str]| {
        let mut cmd = std::process::Command::new(bin("nx"));
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap()).env("HOME", home.path()).args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        NxOutput::from(cmd.output().unwrap())
    };

    let none = nx(&[], &["ls"]);
    assert_eq!(none.code, 2, "{none:?}");
    assert!(
        none.stderr.contains("nx login --server URL --key KEY") && none.stderr.contains("NX_SERVER"),
        "{}",
        none.stderr
    );

    let down = nx(&[("NX_SERVER", "http://127.0.0.1:1"), ("NX_KEY", &r.admin_token)], &["ls"]);
    assert_eq!(down.code, 3, "{down:?}");
    assert!(down.stderr.contains("http://127.0.0.1:1") && down.stderr.contains("NX_SERVER"), "{}", down.stderr);

    let keyless = nx(&[("NX_SERVER", &r.api())], &["ls"]);
    assert_eq!(keyless.code, 2, "{keyless:?}");
    assert!(keyless.stderr.contains("no key") && keyless.stderr.contains("nx apps create"), "{}", keyless.stderr);

    let bad_login = nx(&[], &["login", "--server", &r.api(), "--key", "nxa_wrongwrongwrongwrongwrongwrongwrong12"]);
    assert_eq!(bad_login.code, 1, "a key the server refuses is not stored: {bad_login:?}");
    assert!(!home.path().join(".config/nx/config.toml").exists());

    let login = nx(&[], &["login", "--server", &r.api(), "--key", &r.admin_token]);
    assert_eq!(login.code, 0, "{login:?}");
    let config = home.path().join(".config/nx/config.toml");
    assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o600, "the key file is private");
    let listed = nx(&[], &["--json", "apps", "ls"]);
    assert_eq!(listed.json()[0]["name"], "web", "the stored server and key work: {listed:?}");

    let overridden = nx(&[("NX_KEY", "nxa_wrongwrongwrongwrongwrongwrongwrong12")], &["apps", "ls"]);
    assert_eq!(overridden.code, 1, "NX_KEY overrides the file: {overridden:?}");
    assert!(overridden.stderr.contains("nx login --key"), "{}", overridden.stderr);

    let typo = r.nx(&["ls", "wbe"]);
    assert_eq!(typo.code, 1, "{typo:?}");
    assert!(typo.stderr.contains("did you mean 'web'"), "{}", typo.stderr);

    let help = r.nx(&["--help"]);
    assert!(help.stdout.contains("Examples:") && help.stdout.contains("Exit codes:"), "{}", help.stdout);
}

#[test]
fn removing_an_app_takes_everything_and_never_reuses_its_uid() {
    let r = Receiver::start();
    let key = r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &["--promote"]);
    let data = r.data_dir().join("apps/web/data");
    let old_uid = std::fs::metadata(&data).unwrap().uid();
    psql(&r.db_url("web"), "CREATE TABLE kept (x int)").unwrap();

    let unconfirmed = r.nx(&["apps", "rm", "web"]);
    assert_eq!(unconfirmed.code, 2, "{unconfirmed:?}");
    assert!(unconfirmed.stderr.contains("--yes"), "{}", unconfirmed.stderr);
    let by_deploy_key = r.nx_with_key(&key, &["apps", "rm", "web", "--yes"]);
    assert_eq!(by_deploy_key.code, 1, "a deploy key cannot remove its app: {by_deploy_key:?}");
    assert!(by_deploy_key.stderr.contains("admin token"), "{}", by_deploy_key.stderr);
    assert_eq!(body(&r, &format!("http://web.localhost:{}/", r.router_port)), "goweb\n", "nothing went yet");

    r.nx_ok(&["apps", "rm", "web", "--yes"]);
    assert_eq!(r.nx_ok(&["--json", "apps", "ls"]).json(), serde_json::json!([]));
    assert_eq!(r.get(&format!("http://web.localhost:{}/", r.router_port)).status, 404);
    assert!(deployment_processes(&r.data_dir(), &id(&d)).is_empty(), "its sandbox is gone");
    assert!(!r.data_dir().join("apps/web").exists(), "its data is gone");
    let databases =
        psql(&r.admin_url("postgres"), "SELECT datname FROM pg_database WHERE datname LIKE '%web%'").unwrap();
    assert_eq!(databases, "", "its database is gone");
    assert_eq!(r.nx_with_key(&key, &["ls"]).code, 1, "its keys are gone");

    // A new app of the same name starts from nothing, under a new uid.
    r.create_app("web");
    r.push("web", &fixtures::go(Go::Static), &[]);
    let new_uid = std::fs::metadata(r.data_dir().join("apps/web/data")).unwrap().uid();
    assert!(new_uid > old_uid, "uid {new_uid} must not reuse {old_uid}");
    assert!(psql(&r.db_url("web"), "SELECT * FROM kept").is_err(), "no data of the old app");
}

#[test]
fn a_push_racing_its_apps_removal_is_refused_and_leaves_nothing_behind() {
    let r = Receiver::start();
    r.create_app("web");
    let goweb = fixtures::go(Go::Static);
    r.push("web", &goweb, &["--promote"]);
    // Enough data that copying it into the preview's database takes
    // seconds: the removal begins while the push is under way.
    psql(&r.db_url("web"), "CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1500000) g")
        .unwrap();
    r.nx_ok(&["apps", "set", "web", "--preview-db", "copy"]);
    std::thread::scope(|s| {
        let push = s.spawn(|| r.nx(&["push", goweb.to_str().unwrap(), "--app", "web", "--pr", "7"]));
        let preview = eventually(60, "the preview's deployment to be recorded", || {
            let listing = r.nx_ok(&["--json", "ls", "web"]).json();
            let found = listing[0]["deployments"].as_array()?.iter().find(|d| d["pr"] == 7)?["id"].clone();
            found.as_str().map(str::to_owned)
        });
        r.nx_ok(&["apps", "rm", "web", "--yes"]);
        let push = push.join().unwrap();
        assert_eq!(push.code, 1, "{push:?}");
        assert!(
            push.stderr.contains(
                "app web is being removed, so nothing is deployed to it any more; if its removal stopped half way, \
                 `nx apps rm web` again finishes it"
            ),
            "{}",
            push.stderr
        );
        assert!(deployment_processes(&r.data_dir(), &preview).is_empty(), "the preview's sandbox is gone");
    });
    assert_eq!(r.nx_ok(&["--json", "apps", "ls"]).json(), serde_json::json!([]));
    let databases =
        psql(&r.admin_url("postgres"), "SELECT datname FROM pg_database WHERE datname LIKE '%web%'").unwrap();
    assert_eq!(databases, "", "neither the app's database nor the preview's is left");
    assert!(!r.data_dir().join("apps/web").exists(), "nor its data");
}

#[test]
fn variables_restart_previews_and_replace_production_without_a_failed_request() {
    let r = Receiver::start();
    r.create_app("web");
    let goweb = fixtures::go(Go::Static);
    let a = r.push("web", &goweb, &["--promote"]);
    let b = r.push("web", &goweb, &[]);
    let production = format!("http://web.localhost:{}/", r.router_port);
    assert_eq!(body(&r, &production), "goweb\n");

    let load = Load::start(r.router_port, format!("web.localhost:{}", r.router_port));
    eventually(10, "the load to run", || (load.ok.load(std::sync::atomic::Ordering::Relaxed) > 20).then_some(()));
    let set = r.nx_ok(&["env", "set", "GREETING=hello", "API_TOKEN=s3cr3t-value", "--app", "web"]);
    let (_, bodies) = load.finish_without_failures();
    assert!(bodies.contains("goweb\n") && bodies.contains("hello\n"), "both served: {bodies:?}\n{set:?}\n{}", r.log());
    assert!(!set.stdout.contains("s3cr3t") && !set.stderr.contains("s3cr3t"), "values are never printed");
    assert!(set.stdout.contains(&format!("{} restarted", id(&b))), "{}", set.stdout);
    assert!(set.stdout.contains("production is now"), "{}", set.stdout);

    assert_eq!(body(&r, &production), "hello\n");
    assert_eq!(body(&r, b["preview_url"].as_str().unwrap()), "hello\n", "the preview restarted with it");
    let listed = r.nx_ok(&["ls", "--json", "web"]).json();
    let deployments = listed[0]["deployments"].as_array().unwrap();
    let prod = deployments.iter().find(|d| d["production"] == true).unwrap();
    assert_ne!(id(prod), id(&a), "production was replaced by a new deployment");
    assert_eq!(prod["digest"], a["digest"], "of the same binary");
    assert_eq!(r.nx_ok(&["--json", "rollback"]).json()["production"], id(&a), "the old one is the rollback target");
    r.nx_ok(&["rollback"]);

    let ls = r.nx_ok(&["env", "ls", "--json", "--app", "web"]);
    let vars = ls.json();
    let names: Vec<&str> = vars.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["API_TOKEN", "GREETING"]);
    assert!(!ls.stdout.contains("s3cr3t") && !r.nx_ok(&["env", "ls"]).stdout.contains("s3cr3t"));
    let stored = psql(&r.admin_url("nx"), "SELECT string_agg(encode(value, 'hex'), '') FROM app_env").unwrap();
    assert!(!stored.contains(&hex::encode("s3cr3t")), "sealed at rest");

    let piped = nx_stdin(&r, &["env", "set", "GREETING", "--app", "web"], "from stdin\n");
    assert_eq!(piped.code, 0, "{piped:?}");
    assert_eq!(body(&r, &production), "from stdin\n");
    r.nx_ok(&["env", "unset", "GREETING", "--app", "web"]);
    assert_eq!(body(&r, &production), "goweb\n");
    let own = r.push("web", &goweb, &["--env", "GREETING=own"]);
    r.nx_ok(&["env", "set", "GREETING=app"]);
    assert_eq!(body(&r, own["preview_url"].as_str().unwrap()), "own\n", "a push's own variables win");

    let reserved = r.nx(&["env", "set", "PORT=1", "--app", "web"]);
    assert_eq!(reserved.code, 1, "{reserved:?}");
    assert!(reserved.stderr.contains("set by the platform"), "{}", reserved.stderr);
    let two_from_stdin = r.nx(&["env", "set", "A", "B", "--app", "web"]);
    assert_eq!(two_from_stdin.code, 2, "{two_from_stdin:?}");
    // An app named without --app is a bare KEY, and nothing is piped in:
    // refused with the fix, not set to an empty value.
    let listed = || r.nx_ok(&["--json", "env", "ls", "--app", "web"]).json();
    let before = listed();
    let no_value = r.nx(&["env", "set", "web", "GREETING=x"]);
    assert_eq!(no_value.code, 2, "{no_value:?}");
    assert!(
        no_value.stderr.contains("no value for web: nothing was piped in; write web=VALUE")
            && no_value.stderr.contains("to choose the app, use --app web"),
        "{}",
        no_value.stderr
    );
    assert_eq!(listed(), before, "nothing changed");
}

#[test]
fn rollback_swaps_back_and_forth_and_says_when_it_cannot() {
    let r = Receiver::start();
    r.create_app("web");
    let goweb = fixtures::go(Go::Static);
    let a = r.push("web", &goweb, &["--env", "GREETING=a", "--promote"]);
    let none = r.nx(&["rollback", "--app", "web"]);
    assert_eq!(none.code, 1, "{none:?}");
    assert!(none.stderr.contains("no earlier production") && none.stderr.contains("nx promote"), "{}", none.stderr);
    let b = r.push("web", &goweb, &["--env", "GREETING=b", "--promote"]);
    let production = format!("http://web.localhost:{}/", r.router_port);
    assert_eq!(body(&r, &production), "b\n");
    let back = r.nx_ok(&["--json", "rollback", "--app", "web"]).json();
    assert_eq!(
        (back["production"].as_str(), back["previous"].as_str()),
        (Some(id(&a).as_str()), Some(id(&b).as_str()))
    );
    assert_eq!(body(&r, &production), "a\n");
    let human = r.nx_ok(&["rollback"]);
    assert!(human.stdout.contains(&format!("{} is now production", id(&b))), "{}", human.stdout);
    assert_eq!(body(&r, &production), "b\n");
}

#[test]
fn open_status_completions_and_colour() {
    let r = Receiver::start();
    r.create_app("web");
    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    let no_production = r.nx(&["open", "--app", "web"]);
    assert_eq!(no_production.code, 1, "{no_production:?}");
    assert!(no_production.stderr.contains("nx promote"), "{}", no_production.stderr);
    r.nx_ok(&["promote", &id(&d)]);

    let dir = tempfile::tempdir().unwrap();
    let opened = dir.path().join("opened");
    let browser = dir.path().join("browser");
    std::fs::write(&browser, format!("#!/bin/sh\necho \"$1\" >> {}\n", opened.display())).unwrap();
    std::fs::set_permissions(&browser, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = r.nx_command(&r.admin_token).env("BROWSER", &browser).args(["open", "--app", "web"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let preview = r.nx_command(&r.admin_token).env("BROWSER", &browser).args(["open", &id(&d)]).output().unwrap();
    assert!(preview.status.success(), "{preview:?}");
    let urls = std::fs::read_to_string(&opened).unwrap();
    assert_eq!(
        urls.lines().collect::<Vec<_>>(),
        [format!("http://web.localhost:{}", r.router_port).as_str(), d["preview_url"].as_str().unwrap()]
    );
    let headless = r.nx_ok(&["open"]);
    assert_eq!(headless.stdout.trim(), format!("http://web.localhost:{}", r.router_port), "printed when no browser");

    let status = r.nx_ok(&["status"]);
    for expected in [env!("CARGO_PKG_VERSION"), "apps: 1", "1 healthy", "memory", "512 MiB", "seccomp", "7 days"] {
        assert!(status.stdout.contains(expected), "{expected:?} missing from:\n{}", status.stdout);
    }
    let json = r.nx_ok(&["status", "--json"]).json();
    assert_eq!(json["apps"], 1);
    assert!(json["default_limits"].as_array().unwrap().iter().any(|e| e["limit"] == "pids" && e["value"] == "512"));
    let anonymous = r.nx_command("").env_remove("NX_KEY").arg("status").output().unwrap();
    assert!(String::from_utf8_lossy(&anonymous.stdout).contains("is up"), "{anonymous:?}");

    let bash = r.nx_ok(&["completions", "bash"]).stdout;
    let mut shell = std::process::Command::new("bash")
        .args(["-c", "source /dev/stdin; complete -p nx"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    shell.stdin.take().unwrap().write_all(bash.as_bytes()).unwrap();
    let registered = shell.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&registered.stdout).contains(" nx"), "{registered:?}");
    for s in ["zsh", "fish"] {
        assert!(r.nx_ok(&["completions", s]).stdout.contains("promote"), "{s} completions name the commands");
    }

    // Colour on a terminal, never with NO_COLOR or into a pipe.
    let on_tty = |no_color: bool| {
        let mut script = std::process::Command::new("script");
        script
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap())
            .env("HOME", r.dir.path())
            .env("NX_SERVER", r.api())
            .env("NX_KEY", &r.admin_token)
            .env("TERM", "xterm")
            .args(["-qec", &format!("{} ls", bin("nx").display()), "/dev/null"]);
        if no_color {
            script.env("NO_COLOR", "1");
        }
        let out = script.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(on_tty(false).contains("\x1b[32mhealthy"), "green on a terminal");
    assert!(!on_tty(true).contains('\x1b'), "NO_COLOR is respected");
    assert!(!r.nx_ok(&["ls"]).stdout.contains('\x1b'), "no escapes into a pipe");
}

#[test]
fn nx_toml_names_the_app_and_sets_its_args_variables_and_settings() {
    let r = Receiver::start();
    r.create_app("web");
    r.create_app("other");
    let repo = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(repo.path().join(".git")).unwrap();
    std::fs::create_dir_all(repo.path().join("service/bin")).unwrap();
    std::fs::write(
        repo.path().join("service/nx.toml"),
        r#"app = "web"
args = ["--from-toml"]
[env]
GREETING = "from toml"
[health]
path = "/headers"
[limits]
memory = "128MiB"
[preview]
database = "empty"
"#,
    )
    .unwrap();
    let goweb = fixtures::go(Go::Static);
    let run_in = |dir: &std::path::Path, args: &[&str]| {
        NxOutput::from(r.nx_command(&r.admin_token).current_dir(dir).args(args).output().unwrap())
    };
    let pushed = run_in(&repo.path().join("service/bin"), &["--json", "push", goweb.to_str().unwrap()]);
    assert_eq!(pushed.code, 0, "{pushed:?}\n{}", r.log());
    let d = pushed.json()["deployment"].clone();
    assert_eq!(d["app"], "web", "the app came from nx.toml in a parent directory");
    assert_eq!(body(&r, d["preview_url"].as_str().unwrap()), "from toml\n");
    let memory = d["limits"].as_array().unwrap().iter().find(|e| e["limit"] == "memory").unwrap().clone();
    assert_eq!(memory["value"], "128 MiB");
    let cmdlines = deployment_processes(&r.data_dir(), &id(&d));
    assert!(cmdlines.iter().any(|(_, c)| c.contains("--from-toml")), "{cmdlines:?}");
    let app = r.nx_ok(&["--json", "apps", "ls"]).json();
    let web = app.as_array().unwrap().iter().find(|a| a["name"] == "web").unwrap().clone();
    assert_eq!(web["settings"]["health"], serde_json::json!({ "kind": "http", "path": "/headers" }));
    assert_eq!(web["settings"]["preview_db"], "empty");

    let flagged = run_in(
        repo.path(),
        &[
            "--json",
            "--manifest",
            repo.path().join("service/nx.toml").to_str().unwrap(),
            "push",
            goweb.to_str().unwrap(),
            "--env",
            "GREETING=from flag",
        ],
    );
    assert_eq!(flagged.code, 0, "{flagged:?}");
    assert_eq!(body(&r, flagged.json()["deployment"]["preview_url"].as_str().unwrap()), "from flag\n", "flags win");

    let without = run_in(repo.path(), &["push", goweb.to_str().unwrap()]);
    assert_eq!(without.code, 2, "two apps and no nx.toml: {without:?}");
    assert!(without.stderr.contains("--app") && without.stderr.contains("other, web"), "{}", without.stderr);

    std::fs::write(repo.path().join("nx.toml"), "app = \"web\"\n[limits]\nmemroy = \"1GiB\"\n").unwrap();
    let broken = run_in(repo.path(), &["push", goweb.to_str().unwrap()]);
    assert_eq!(broken.code, 2, "{broken:?}");
    assert!(
        broken.stderr.contains("nx.toml") && broken.stderr.contains("line 3") && broken.stderr.contains("memroy"),
        "{}",
        broken.stderr
    );
}

/// `nx events` answers "who did this?": pushes, promotions, variable changes
/// (names, never values) and key changes, each with the key that did it; a
/// deploy key reads its own app's events alone, none of an earlier app's of
/// the same name.
#[test]
fn the_audit_log_says_who_did_what_and_shows_each_key_its_own() {
    let r = Receiver::start();
    let web_key = r.create_app("web");
    let site_key = r.create_app("site");
    let web_key_id = nx_protocol::auth::Credential::parse(&web_key).unwrap().key_id().to_owned();
    let binary = nx_e2e::fixtures::c_musl_static();
    let pushed = r.nx_with_key(&web_key, &["--json", "push", binary.to_str().unwrap(), "--app", "web"]).success();
    let d = pushed.json()["deployment"].clone();
    let id = d["id"].as_str().unwrap();
    assert_eq!(r.nx_with_key(&web_key, &["promote", id, "--app", "web"]).code, 0);
    assert_eq!(r.nx_with_key(&web_key, &["env", "set", "API_TOKEN=hunter2-secret", "--app", "web"]).code, 0);
    r.nx_ok(&["keys", "create", "web"]);

    let events = r.nx_ok(&["--json", "events", "--app", "web"]).json();
    let by_kind = |kind: &str| {
        events
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}: {events}"))
            .clone()
    };
    let tenant = format!("key:{web_key_id}@web");
    assert_eq!(by_kind("push")["actor"], tenant.as_str());
    assert_eq!(by_kind("push")["deployment"], id);
    assert_eq!(by_kind("promote")["actor"], tenant.as_str());
    assert_eq!(by_kind("env")["actor"], tenant.as_str());
    assert_eq!(by_kind("key.create")["actor"], "admin");
    assert_eq!(by_kind("app.create")["actor"], "admin");
    let text = events.to_string();
    assert!(text.contains("API_TOKEN") && !text.contains("hunter2"), "names, never values: {text}");
    assert!(events.as_array().unwrap().iter().all(|e| e["app"] == "web"), "{events}");

    // A deploy key reads its own app's events, and no other's.
    let own = r.nx_with_key(&site_key, &["--json", "events"]).success().json();
    assert!(own.as_array().unwrap().iter().all(|e| e["app"] == "site"), "{own}");
    let other = r.nx_with_key(&site_key, &["events", "--app", "web"]);
    assert_eq!(other.code, 1, "{other:?}");
    assert!(other.stderr.contains("belongs to app 'site' and reads that app's events alone"), "{}", other.stderr);
    let bad = r.nx(&["events", "--since", "yesterday"]);
    assert!(bad.stderr.contains("since \"yesterday\" is neither a duration (24h, 7d) nor an RFC 3339 time"), "{bad:?}");
    let table = r.nx_ok(&["events", "--app", "web"]).stdout;
    assert!(table.lines().next().unwrap().starts_with("time"), "{table}");
    assert!(table.contains(&tenant), "{table}");

    // A new app of a removed app's name is another tenant: its key reads
    // nothing of the old one's log, which the admin still reads.
    r.nx_ok(&["apps", "rm", "web", "--yes"]);
    let new_key = r.create_app("web");
    let mine = r.nx_with_key(&new_key, &["--json", "events", "--since", "7d"]).success().json();
    let kinds: Vec<&str> = mine.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["app.create"], "{mine}");
    let all = r.nx_ok(&["--json", "events", "--app", "web", "--since", "7d"]).json();
    assert!(all.as_array().unwrap().iter().any(|e| e["kind"] == "app.remove"), "{all}");
}
