//! App databases: sealed from every other tenant, backups and restores that
//! lose nothing, previews with their own databases, and an external cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nx_e2e::receiver::{psql, Options};
use nx_e2e::{bin, eventually, Receiver};

/// `url` with another database (and, optionally, user) in it.
fn with_db(url: &str, database: &str) -> String {
    let (head, _) = url.rsplit_once('/').unwrap();
    format!("{head}/{database}")
}

fn with_user(url: &str, user: &str) -> String {
    let rest = url.strip_prefix("postgres://").unwrap();
    let (_, after) = rest.split_once(':').unwrap();
    format!("postgres://{user}:{after}")
}

fn visits(r: &Receiver, app: &str) -> i64 {
    psql(&r.db_url(app), "SELECT count(*) FROM visits").unwrap().parse().unwrap()
}

#[test]
fn an_app_reaches_its_own_database_and_nothing_else() {
    let r = Receiver::start();
    r.create_app("web");
    r.create_app("api");
    let web = r.db_url("web");
    assert!(web.starts_with("postgres://app_web:"), "{web}");
    assert_eq!(psql(&web, "SELECT current_user || ' ' || current_database()").unwrap(), "app_web app_web");
    psql(&web, "CREATE TABLE notes (t text); INSERT INTO notes VALUES ('mine')").unwrap();

    for (what, url) in [
        ("another app's database", with_db(&web, "app_api")),
        ("the metadata database", with_db(&web, "nx")),
        ("the postgres database", with_db(&web, "postgres")),
    ] {
        let err = psql(&url, "SELECT 1").expect_err(what);
        assert!(
            err.contains("no pg_hba.conf entry")
                || err.contains("password authentication failed")
                || err.contains("permission denied"),
            "{what}: {err}"
        );
    }
    for (what, sql) in [
        ("COPY PROGRAM", "COPY notes FROM PROGRAM 'id'"),
        ("pg_read_file", "SELECT pg_read_file('/etc/passwd')"),
        ("dblink", "CREATE EXTENSION dblink"),
        ("superuser", "ALTER ROLE app_web SUPERUSER"),
        ("new roles", "CREATE ROLE sneaky LOGIN"),
        ("new databases", "CREATE DATABASE sneaky"),
    ] {
        let err = psql(&web, sql).expect_err(what);
        assert!(
            err.contains("permission denied") || err.contains("must be superuser") || err.contains("must have"),
            "{what}: {err}"
        );
    }
    // The other app's data stays its own.
    let api = r.db_url("api");
    assert!(psql(&api, "SELECT * FROM notes").unwrap_err().contains("does not exist"));
}

#[test]
fn the_superuser_cannot_be_tried_over_the_network_even_with_its_password() {
    let r = Receiver::start();
    r.create_app("web");
    let web = r.db_url("web");
    let real = r.admin_url("postgres");
    let password = real.strip_prefix("postgresql://nx_admin:").unwrap().split_once('@').unwrap().0.to_owned();
    // As a sandbox would: TCP to 127.0.0.1, a guess, the real password, and
    // the database named like the role (which a `samerole` rule would match).
    for (what, url) in [
        ("a guess", with_user(&web, "nx_admin")),
        ("the real password", format!("postgres://nx_admin:{password}@127.0.0.1:{}/postgres", r.pg_port)),
        ("its own name", format!("postgres://nx_admin:{password}@127.0.0.1:{}/nx_admin", r.pg_port)),
    ] {
        let err = psql(&url, "SELECT 1").expect_err(what);
        assert!(
            err.contains("pg_hba.conf rejects connection for host \"127.0.0.1\", user \"nx_admin\""),
            "{what}: {err}"
        );
    }
    // Over its socket, which only root and the cluster's user can enter, it logs in.
    assert_eq!(psql(&real, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").unwrap(), "t");
}

/// Whether `role` is a superuser, as the cluster says.
fn is_superuser(r: &Receiver, role: &str) -> String {
    psql(&r.admin_url("postgres"), &format!("SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'")).unwrap()
}

/// The roles the platform makes for one restore or dump, left in the cluster.
fn operation_roles(r: &Receiver) -> String {
    let sql = "SELECT coalesce(string_agg(rolname, ','), '') FROM pg_roles WHERE rolname LIKE '%\\_\\_%'";
    psql(&r.admin_url("postgres"), sql).unwrap()
}

/// A backup of `app` written by `nx db backup` itself, with the text of a
/// table comment replaced by `payload` of the same length: a dump anyone with
/// the app's deploy key can make and upload.
fn crafted_dump(r: &Receiver, app: &str, tag: usize, payload: &str) -> PathBuf {
    let padding = "x".repeat(400);
    psql(
        &r.db_url(app),
        &format!("CREATE TABLE IF NOT EXISTS carrier (x int); COMMENT ON TABLE carrier IS '{padding}'"),
    )
    .unwrap();
    let clean = r.dir.path().join(format!("{app}-clean.dump"));
    r.nx(&["db", "backup", app, "-o", clean.to_str().unwrap()]).success();
    let mut bytes = std::fs::read(&clean).unwrap();
    let entry = format!("COMMENT ON TABLE public.carrier IS '{padding}';");
    let at = bytes.windows(entry.len()).position(|w| w == entry.as_bytes()).expect("the comment's TOC entry");
    assert!(payload.len() <= entry.len(), "payload too long");
    let replacement = format!("{payload:<width$}", width = entry.len());
    bytes[at..at + entry.len()].copy_from_slice(replacement.as_bytes());
    let crafted = r.dir.path().join(format!("crafted-{tag}.dump"));
    std::fs::write(&crafted, bytes).unwrap();
    crafted
}

fn restore(r: &Receiver, app: &str, dump: &Path) -> nx_e2e::receiver::NxOutput {
    r.nx(&["db", "restore", app, dump.to_str().unwrap()])
}

#[test]
fn a_crafted_dump_can_do_no_more_than_the_app_itself() {
    let r = Receiver::start();
    r.create_app("web");
    r.create_app("api");
    psql(&r.db_url("web"), "CREATE TABLE notes (t text); INSERT INTO notes VALUES ('web before')").unwrap();
    psql(&r.db_url("api"), "CREATE TABLE secrets (t text); INSERT INTO secrets VALUES ('api only')").unwrap();
    // Where the cluster's user could write, were the program run.
    let marker = std::env::temp_dir().join(format!("nx-copy-to-program-{}", std::process::id()));
    let refused = [
        (
            "RESET ROLE; ALTER ROLE app_web SUPERUSER; --",
            "must be superuser to alter superuser roles or change superuser attribute",
        ),
        ("SET SESSION AUTHORIZATION nx_admin; ALTER ROLE app_web SUPERUSER;", "permission denied to set session authorization"),
        ("RESET SESSION AUTHORIZATION; ALTER ROLE app_web SUPERUSER;", "must be superuser to alter superuser roles"),
        ("SET ROLE app_web; DROP TABLE public.notes;", "permission denied to set role \"app_web\""),
        (
            &*format!("COPY (SELECT 1) TO PROGRAM 'touch {}';", marker.display()),
            "must be superuser or have privileges of the pg_execute_server_program role to COPY to or from an external program",
        ),
        ("CREATE EXTENSION dblink SCHEMA public;", "permission denied to create extension \"dblink\""),
        ("ALTER ROLE app_api PASSWORD 'known';", "permission denied"),
        ("GRANT pg_read_server_files TO app_web;", "must have admin option on role \"pg_read_server_files\""),
    ];
    for (tag, (payload, error)) in refused.into_iter().enumerate() {
        let dump = crafted_dump(&r, "web", tag, payload);
        let out = restore(&r, "web", &dump);
        assert_eq!(out.code, 1, "{payload}: {out:?}");
        assert!(
            out.stderr.contains("the dump could not be restored, so nothing was changed"),
            "{payload}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(error), "{payload}: {}", out.stderr);
        assert_eq!(is_superuser(&r, "app_web"), "f", "{payload}");
        assert_eq!(psql(&r.db_url("web"), "SELECT string_agg(t, ',') FROM notes").unwrap(), "web before", "{payload}");
        assert_eq!(operation_roles(&r), "", "{payload}: no staging or dump role is left");
    }
    assert!(!marker.exists(), "no program ran");
    assert_eq!(psql(&r.db_url("api"), "SELECT string_agg(t, ',') FROM secrets").unwrap(), "api only");
    assert_eq!(is_superuser(&r, "app_api"), "f");

    // A SECURITY DEFINER function restores, and runs as the app: the role it
    // was restored by is gone, and the superuser never owned it.
    let definer =
        "CREATE FUNCTION public.whoami() RETURNS text LANGUAGE sql SECURITY DEFINER AS 'SELECT current_user::text';";
    let dump = crafted_dump(&r, "web", 100, definer);
    restore(&r, "web", &dump).success();
    let web = r.db_url("web");
    assert_eq!(psql(&web, "SELECT public.whoami()").unwrap(), "app_web");
    let owners = "SELECT string_agg(DISTINCT pg_get_userbyid(relowner), ',') FROM pg_class WHERE relnamespace = 'public'::regnamespace";
    assert_eq!(psql(&web, owners).unwrap(), "app_web", "every restored object belongs to the app");
    let owner =
        psql(&r.admin_url("postgres"), "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app_web'");
    assert_eq!(owner.unwrap(), "app_web");
    assert_eq!(is_superuser(&r, "app_web"), "f");
    assert_eq!(operation_roles(&r), "");

    // Another app's dump: web gets a copy of the rows, api keeps its own and
    // is reached by nothing of web's.
    let api_dump = r.dir.path().join("api.dump");
    r.nx(&["db", "backup", "api", "-o", api_dump.to_str().unwrap()]).success();
    restore(&r, "web", &api_dump).success();
    psql(&web, "UPDATE secrets SET t = 'changed by web'").unwrap();
    assert_eq!(psql(&r.db_url("api"), "SELECT string_agg(t, ',') FROM secrets").unwrap(), "api only");
    assert_eq!(
        psql(&web, "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'secrets'").unwrap(),
        "app_web"
    );
    let databases = psql(&r.admin_url("postgres"), "SELECT string_agg(datname, ',') FROM pg_database").unwrap();
    assert!(!databases.contains("__"), "no staging database is left: {databases}");
}

/// The spare databases of the cluster, sorted.
fn spares(r: &Receiver) -> Vec<String> {
    let sql = "SELECT coalesce(string_agg(datname, ',' ORDER BY datname), '') FROM pg_database WHERE datname LIKE 'nx\\_spare\\_%'";
    psql(&r.admin_url("postgres"), sql).unwrap().split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

#[test]
fn a_new_app_gets_a_spare_made_beforehand_sealed_and_owned_like_any_other() {
    let mut r = Receiver::start();
    let before = eventually(30, "two spare databases", || Some(spares(&r)).filter(|s| s.len() == 2));
    r.create_app("web");
    let admin = r.admin_url("postgres");
    let owner = psql(&admin, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app_web'").unwrap();
    assert_eq!(owner, "app_web", "the app's role owns its database");
    let acl = psql(&admin, "SELECT datacl::text FROM pg_database WHERE datname = 'app_web'").unwrap();
    assert!(!acl.trim_matches(['{', '}']).split(',').any(|e| e.starts_with('=')), "PUBLIC has no rights: {acl}");
    let after =
        eventually(30, "the spare taken replaced", || Some(spares(&r)).filter(|s| s.len() == 2 && *s != before));
    assert_eq!(before.iter().filter(|s| !after.contains(s)).count(), 1, "one spare was taken: {before:?} -> {after:?}");

    let web = r.db_url("web");
    psql(&web, "CREATE TABLE notes (t text); INSERT INTO notes VALUES ('mine')").unwrap();
    for spare in &after {
        let err = psql(&with_db(&web, spare), "SELECT 1").expect_err("a spare is not the app's");
        assert!(err.contains("no pg_hba.conf entry") || err.contains("permission denied"), "{spare}: {err}");
    }

    // Turned off, the spares go and apps are created the slow way.
    r.options.args.extend(["--spare-databases".into(), "0".into()]);
    r.restart();
    eventually(30, "the spares dropped", || spares(&r).is_empty().then_some(()));
    r.create_app("api");
    assert_eq!(psql(&r.db_url("api"), "SELECT current_database()").unwrap(), "app_api");
    assert!(spares(&r).is_empty());
}

#[test]
fn connections_over_the_limit_are_refused_while_the_platform_still_connects() {
    let r = Receiver::start();
    r.create_app("web");
    let web = r.db_url("web");
    let mut sleepers: Vec<_> = (0..20)
        .map(|_| {
            Command::new("psql")
                .args([web.as_str(), "-X", "-c", "SELECT pg_sleep(60)"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let admin = r.admin_url("postgres");
    eventually(30, "20 connections of app_web", || {
        let n: i64 =
            psql(&admin, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_web'").ok()?.parse().ok()?;
        (n == 20).then_some(())
    });
    let err = psql(&web, "SELECT 1").unwrap_err();
    assert!(err.contains("too many connections for role"), "{err}");
    // The platform's own sessions are not counted against the app.
    r.nx(&["db", "backup", "web", "-o", r.dir.path().join("while-full.dump").to_str().unwrap()]).success();
    for s in &mut sleepers {
        let _ = s.kill();
        let _ = s.wait();
    }
}

#[test]
fn backup_then_delete_then_restore_gives_back_exactly_the_rows_and_a_bad_dump_changes_nothing() {
    // The app counts a visit per GET of `/`, which is also its health path:
    // liveness probes would add rows between the reading and the backup.
    let r = Receiver::start_with(Options { args: vec!["--health-interval=1h".into()], ..Options::default() });
    r.create_app("web");
    let d = r.push("web", &bin("hello"), &[]);
    let url = d["preview_url"].as_str().unwrap();
    for _ in 0..5 {
        assert_eq!(r.get(url).status, 200);
    }
    let before = psql(&r.db_url("web"), "SELECT string_agg(id::text, ',' ORDER BY id) FROM visits").unwrap();
    let dump = r.dir.path().join("web.dump");
    let out = r.nx(&["db", "backup", "web", "-o", dump.to_str().unwrap()]).success();
    assert!(out.stderr.contains("saved"), "{}", out.stderr);
    assert!(std::fs::read(&dump).unwrap().starts_with(b"PGDMP"), "a pg_dump custom-format file");

    psql(&r.db_url("web"), "DELETE FROM visits").unwrap();
    assert_eq!(visits(&r, "web"), 0);
    r.nx(&["db", "restore", "web", dump.to_str().unwrap()]).success();
    let after = psql(&r.db_url("web"), "SELECT string_agg(id::text, ',' ORDER BY id) FROM visits").unwrap();
    assert_eq!(after, before, "exactly the rows of the backup");
    // The app goes on counting on the restored data.
    let body = r.get(url).body;
    assert!(body.trim().ends_with(&format!("visit number {}", before.split(',').count() + 1)), "{body}");

    // A damaged dump: refused, and the data is untouched.
    let mut bad = std::fs::read(&dump).unwrap();
    let half = bad.len() / 2;
    bad.truncate(half);
    let bad_path = r.dir.path().join("bad.dump");
    std::fs::write(&bad_path, bad).unwrap();
    let rows = visits(&r, "web");
    let out = r.nx(&["db", "restore", "web", bad_path.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("nothing was changed"), "{}", out.stderr);
    assert_eq!(visits(&r, "web"), rows);
    let databases = psql(&r.admin_url("postgres"), "SELECT string_agg(datname, ',') FROM pg_database").unwrap();
    assert!(!databases.contains("__restore") && !databases.contains("__old"), "{databases}");
}

#[test]
fn a_restore_whose_digest_follows_the_dump_is_held_to_its_own_footer() {
    use nx_e2e::signed::{send, Signed};
    let r = Receiver::start_with(Options { args: vec!["--health-interval=1h".into()], ..Options::default() });
    let deploy_key = r.create_app("web");
    let d = r.push("web", &bin("hello"), &[]);
    for _ in 0..3 {
        assert_eq!(r.get(d["preview_url"].as_str().unwrap()).status, 200);
    }
    let before = visits(&r, "web");
    assert!(before >= 3, "the three visits were counted: {before}");
    let dump_path = r.dir.path().join("web.dump");
    r.nx(&["db", "backup", "web", "-o", dump_path.to_str().unwrap()]).success();
    let dump = std::fs::read(&dump_path).unwrap();
    psql(&r.db_url("web"), "DELETE FROM visits").unwrap();
    let sha = nx_protocol::auth::sha256_hex(&dump);
    let (path, len) = ("/v1/apps/web/db/restore", dump.len() as u64);
    let with = |bytes: &[u8], footer: Vec<u8>| [bytes, &footer].concat();
    let untouched = |r: &Receiver| {
        assert_eq!(visits(r, "web"), 0, "the database was changed");
        assert_eq!(std::fs::read_dir(r.data_dir().join("tmp")).unwrap().count(), 0, "a temporary upload was left");
    };

    // The app's own deploy key, with a footer of its own: restores are the
    // admin's, whatever the body's form.
    let s = Signed::with_footer("POST", path, len, None);
    let (status, text) = send(&r.api(), &s, &deploy_key, with(&dump, s.footer(&deploy_key, &sha)));
    assert_eq!(status, 403, "{text}");
    untouched(&r);

    // Another request's footer for the same bytes, by the same key.
    let s = Signed::with_footer("POST", path, len, None);
    let other = Signed::with_footer("POST", path, len, None);
    let (status, text) = send(&r.api(), &s, &r.admin_token, with(&dump, other.footer(&r.admin_token, &sha)));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("footer is not signed with this request's key"), "{text}");
    untouched(&r);

    // The dump changed under its request's own footer.
    let s = Signed::with_footer("POST", path, len, None);
    let mut changed = dump.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0xff;
    let (status, text) = send(&r.api(), &s, &r.admin_token, with(&changed, s.footer(&r.admin_token, &sha)));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("altered in transit"), "{text}");
    untouched(&r);

    // Its own footer: restored, every row back.
    let s = Signed::with_footer("POST", path, len, None);
    let (status, text) = send(&r.api(), &s, &r.admin_token, with(&dump, s.footer(&r.admin_token, &sha)));
    assert_eq!(status, 204, "{text}");
    assert_eq!(visits(&r, "web"), before, "every visit of the backup");
}

#[test]
fn stored_backups_are_verified_and_kept_to_the_retention_count() {
    let r = Receiver::start();
    r.create_app("web");
    psql(&r.db_url("web"), "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)").unwrap();
    for _ in 0..3 {
        let b = r.nx_ok(&["--json", "db", "backup", "web", "--store", "--keep", "2"]).json();
        assert!(b["verified_at"].is_string(), "{b}");
    }
    let list = r.nx(&["--json", "db", "backups", "web"]).success().json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let stored = std::fs::read_dir(r.data_dir().join("store/backups/web")).unwrap().count();
    assert_eq!(stored, 2, "older backups are deleted from the store too");
    let databases = psql(&r.admin_url("postgres"), "SELECT string_agg(datname, ',') FROM pg_database").unwrap();
    assert!(!databases.contains("__verify"), "scratch databases are dropped: {databases}");
}

#[test]
fn previews_get_their_own_database_which_goes_when_they_stop_or_are_promoted() {
    // No health checks after the start: hello counts a visit for each GET /.
    let r = Receiver::start_with(Options { args: vec!["--health-interval=1h".into()], ..Options::default() });
    r.create_app("web");
    let hello = bin("hello");
    let main = r.push("web", &hello, &[]);
    for _ in 0..3 {
        r.get(main["preview_url"].as_str().unwrap());
    }
    let main_rows = visits(&r, "web");

    // copy: the preview counts on from production's data, in its own database.
    r.nx(&["apps", "set", "web", "--preview-db", "copy"]).success();
    let copy = r.push("web", &hello, &["--pr", "7"]);
    let db = copy["database"].as_str().expect("a preview database").to_owned();
    assert!(db.starts_with("prv_web_"), "{db}");
    let body = r.get(copy["preview_url"].as_str().unwrap()).body;
    let n: i64 = body.trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n > main_rows, "the copy holds production's rows: {body}");
    assert_eq!(visits(&r, "web"), main_rows, "production's data is untouched by the preview");
    let databases = || psql(&r.admin_url("postgres"), "SELECT string_agg(datname, ',') FROM pg_database").unwrap();
    assert!(databases().contains(&db));
    r.nx(&["stop", copy["id"].as_str().unwrap()]).success();
    assert!(!databases().contains(&db), "the preview's database is dropped with it");
    assert_eq!(r.get(copy["preview_url"].as_str().unwrap()).status, 410);

    // empty: a fresh database.
    r.nx(&["apps", "set", "web", "--preview-db", "empty"]).success();
    let empty = r.push("web", &hello, &["--pr", "8"]);
    let body = r.get(empty["preview_url"].as_str().unwrap()).body;
    assert!(body.trim().ends_with("visit number 2"), "the health check was visit 1: {body}");
    // Promoting it moves it onto the app's database.
    let edb = empty["database"].as_str().unwrap().to_owned();
    r.nx(&["promote", empty["id"].as_str().unwrap()]).success();
    let prod = r.get(&format!("http://web.localhost:{}/", r.router_port)).body;
    let n: i64 = prod.trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n > main_rows, "production counts on the app's data: {prod}");
    assert!(!databases().contains(&edb));
}

#[test]
fn an_external_cluster_given_by_database_url_works_the_same() {
    let cluster = nx_e2e::postgres::ExternalCluster::start();
    let r = Receiver::start_with(Options {
        env: vec![("NX_DATABASE_URL".into(), cluster.admin_url())],
        ..Options::default()
    });
    assert!(!r.data_dir().join("postgres").exists(), "no embedded cluster");
    r.create_app("web");
    let d = r.push("web", &bin("hello"), &[]);
    assert!(r.get(d["preview_url"].as_str().unwrap()).body.starts_with("hello from web"));
    let url = r.db_url("web");
    assert!(url.contains(&format!(":{}/", cluster.port)), "{url}");
    assert!(visits(&r, "web") >= 1);
    assert!(psql(&with_db(&url, "app_nope"), "SELECT 1").is_err());
    let dump = r.dir.path().join("ext.dump");
    r.nx(&["db", "backup", "web", "-o", dump.to_str().unwrap()]).success();
}

/// The app's entry in `nx apps ls --json`.
/// A receiver with these environment settings.
fn receiver_with(env: &[(&str, &str)]) -> Receiver {
    Receiver::start_with(Options {
        env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Options::default()
    })
}

fn app_info(r: &Receiver, app: &str) -> serde_json::Value {
    let list = r.nx(&["--json", "apps", "ls"]).success().json();
    list.as_array().unwrap().iter().find(|a| a["name"] == app).cloned().expect("the app is listed")
}

#[test]
fn one_app_cannot_starve_the_others_through_the_database() {
    let mut r = receiver_with(&[
        ("NX_DB_MAX_CONNECTIONS", "100"),
        ("NX_DB_RESERVED_CONNECTIONS", "50"),
        ("NX_DB_APP_CONNECTIONS", "20"),
        ("NX_DB_STATEMENT_TIMEOUT", "2s"),
        ("NX_DB_TEMP_FILE_LIMIT", "1MiB"),
        ("NX_DB_QUOTA", "24MiB"),
        ("NX_DB_WATCHDOG_INTERVAL", "300ms"),
    ]);
    // Connections: two apps of 20 fit in 100 less 50 reserved; a third does not.
    r.create_app("web");
    r.create_app("api");
    let out = r.nx(&["apps", "create", "big"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("no database connections are left for app_big")
            && out.stderr.contains("hold 40 of the cluster's max_connections of 100, 50 are reserved")
            && out.stderr.contains("--db-max-connections"),
        "{}",
        out.stderr
    );
    let admin = r.admin_url("postgres");
    let roles = psql(&admin, "SELECT count(*) FROM pg_roles WHERE rolname = 'app_big'").unwrap();
    assert_eq!(roles, "0", "a refused app leaves no role behind");
    // A preview with a database of its own needs a share too.
    r.nx(&["apps", "set", "web", "--preview-db", "empty"]).success();
    let hello = bin("hello");
    let out = r.nx(&["push", hello.to_str().unwrap(), "--app", "web", "--pr", "1"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no database connections are left for prv_web_"), "{}", out.stderr);

    // temp_file_limit: set on the role, and the app can lift it neither for
    // its session nor for its role.
    let web = r.db_url("web");
    assert_eq!(psql(&web, "SHOW temp_file_limit").unwrap(), "1MB");
    for sql in ["SET temp_file_limit = '10GB'", "ALTER ROLE app_web SET temp_file_limit = '10GB'"] {
        let err = psql(&web, sql).unwrap_err();
        assert!(err.contains("permission denied to set parameter \"temp_file_limit\""), "{sql}: {err}");
    }
    let sort =
        "SET work_mem = '64kB'; SELECT count(*) FROM (SELECT g FROM generate_series(1, 500000) g ORDER BY g DESC) s";
    let err = psql(&web, sort).unwrap_err();
    assert!(err.contains("temporary file size exceeds temp_file_limit (1024kB)"), "{err}");

    // Statement time: the app turns its own timeout off, the watchdog cancels
    // the statement anyway.
    let started = std::time::Instant::now();
    let err = psql(&web, "SET statement_timeout = 0; SELECT pg_sleep(60)").unwrap_err();
    let took = started.elapsed();
    assert!(err.contains("canceling statement due to user request"), "{err}");
    assert!(took >= std::time::Duration::from_secs(2) && took < std::time::Duration::from_secs(20), "{took:?}");

    // A dump's SQL is held to the same: a restore that sleeps or fills the
    // disk is stopped, and nothing changes.
    for (tag, (payload, error)) in [
        ("SELECT pg_sleep(60);", "canceling statement due to user request"),
        (
            "CREATE TABLE public.fill AS SELECT repeat('x', 1000) AS t FROM generate_series(1, 100000);",
            "restoring it grew app_web__restore over the quota of 25165824 bytes (--db-quota)",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dump = crafted_dump(&r, "web", tag, payload);
        let out = restore(&r, "web", &dump);
        assert_eq!(out.code, 1, "{payload}: {out:?}");
        assert!(out.stderr.contains("nothing was changed") && out.stderr.contains(error), "{payload}: {}", out.stderr);
        assert_eq!(operation_roles(&r), "", "{payload}: the staging role is dropped");
    }
    assert!(psql(&web, "SELECT 1 FROM carrier").is_ok(), "web's own database is the same");

    // Size: over the quota the app reads but its sessions start read-only.
    let api = r.db_url("api");
    // Rows of 1 kB are stored as they are, uncompressed; a session writing
    // when the quota is crossed is ended, and its transaction with it.
    psql(&api, "CREATE TABLE big (t text)").unwrap();
    let fill = "INSERT INTO big SELECT repeat('x', 1000) FROM generate_series(1, 5000)";
    let mut committed = 0;
    eventually(60, "api read-only", || {
        if psql(&api, fill).is_ok() {
            committed += 5000;
        }
        (app_info(&r, "api")["database_quota"] == "read-only").then_some(())
    });
    assert!(app_info(&r, "web").get("database_quota").is_none(), "the neighbour is not affected");
    let err = psql(&api, "INSERT INTO big VALUES ('y')").unwrap_err();
    assert!(err.contains("cannot execute INSERT in a read-only transaction"), "{err}");
    assert_eq!(psql(&api, "SELECT count(*) FROM big").unwrap(), committed.to_string());
    psql(&web, "CREATE TABLE ok (x int); INSERT INTO ok VALUES (1)").unwrap();

    // An app that lifts read-only and goes on writing loses its login; what
    // it committed stays.
    let lifted = format!("{api}?options=-cdefault_transaction_read_only%3Doff");
    assert_eq!(psql(&lifted, "SHOW transaction_read_only").unwrap(), "off", "an app can lift read-only");
    let read_only_rows = committed;
    eventually(60, "api locked", || {
        if psql(&lifted, fill).is_ok() {
            committed += 5000;
        }
        (app_info(&r, "api")["database_quota"] == "locked").then_some(())
    });
    assert!(committed > read_only_rows, "the lifted writes went through until the lock");
    let status = r.nx_ok(&["--json", "status"]).json();
    assert_eq!(status["databases_over_quota"], serde_json::json!({ "api": "locked" }), "nx status says so");
    let err = psql(&api, "SELECT 1").unwrap_err();
    assert!(err.contains("role \"app_api\" is not permitted to log in"), "{err}");
    let listed = r.nx(&["apps", "ls"]).success();
    assert!(listed.stderr.contains("api: its database went on growing over its size quota"), "{}", listed.stderr);
    let rows = psql(&r.admin_url("app_api"), "SELECT count(*) FROM big").unwrap();
    assert_eq!(rows, committed.to_string(), "nothing is deleted");

    // A larger quota gives everything back.
    r.options.env.push(("NX_DB_QUOTA".into(), "1GiB".into()));
    r.restart();
    eventually(30, "api writable again", || psql(&api, "INSERT INTO big VALUES ('z')").ok());
    assert!(app_info(&r, "api").get("database_quota").is_none());
}

#[test]
fn preview_and_app_database_names_never_meet_and_creation_takes_over_nothing() {
    let r = Receiver::start();
    r.create_app("web");
    r.nx(&["apps", "set", "web", "--preview-db", "empty"]).success();
    let preview = r.push("web", &bin("hello"), &["--pr", "3"]);
    let id = preview["id"].as_str().unwrap().to_owned();
    let db = preview["database"].as_str().unwrap().to_owned();
    assert_eq!(db, format!("prv_web_{id}"));
    let visits_before = r.get(preview["preview_url"].as_str().unwrap()).body;

    // The app whose database name a preview used to share.
    r.create_app(&format!("web-{id}"));
    let twin = r.db_url(&format!("web-{id}"));
    assert_eq!(psql(&twin, "SELECT current_database()").unwrap(), format!("app_web_{id}"));
    assert!(
        psql(&twin, "SELECT count(*) FROM visits").unwrap_err().contains("does not exist"),
        "a database of its own"
    );
    let body = r.get(preview["preview_url"].as_str().unwrap()).body;
    assert_ne!(body, visits_before, "the preview still counts on its own database: {body}");

    // A database already there under an app's name is refused, not taken over.
    let admin = r.admin_url("postgres");
    psql(&admin, "CREATE DATABASE app_stray").unwrap();
    psql(&r.admin_url("app_stray"), "CREATE TABLE keep (x int); INSERT INTO keep VALUES (7)").unwrap();
    let out = r.nx(&["apps", "create", "stray"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("a database named app_stray already exists in the cluster and nothing was changed"),
        "{}",
        out.stderr
    );
    assert_eq!(psql(&r.admin_url("app_stray"), "SELECT x FROM keep").unwrap(), "7");
    assert_eq!(psql(&admin, "SELECT count(*) FROM pg_roles WHERE rolname = 'app_stray'").unwrap(), "0");
    // So is a role of that name (whose password creation used to reset).
    psql(&admin, "CREATE ROLE app_lone LOGIN").unwrap();
    let out = r.nx(&["apps", "create", "lone"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("a role named app_lone already exists"), "{}", out.stderr);
    assert_eq!(psql(&admin, "SELECT count(*) FROM pg_database WHERE datname = 'app_lone'").unwrap(), "0");
}

/// A psql session kept open: what is written to it runs as it comes.
fn open_session(url: &str) -> std::process::Child {
    Command::new("psql")
        .args([url, "-X", "-q", "-v", "ON_ERROR_STOP=0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_tenant_holding_its_role_locked_neither_stops_the_watchdog_nor_keeps_a_transaction() {
    use std::io::Write as _;
    let r = receiver_with(&[
        ("NX_DB_STATEMENT_TIMEOUT", "2s"),
        ("NX_DB_QUOTA", "24MiB"),
        ("NX_DB_WATCHDOG_INTERVAL", "300ms"),
    ]);
    r.create_app("api");
    let api = r.db_url("api");
    // Session A takes the role's catalog row and sits in its transaction.
    let mut holder = open_session(&api);
    writeln!(holder.stdin.as_mut().unwrap(), "BEGIN; ALTER ROLE app_api SET work_mem = '8MB';").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Other sessions fill the database past the quota, a few MB at a time
    // (the watchdog may end one of them as it turns the database read-only).
    psql(&api, "CREATE TABLE fill (g int, pad text)").unwrap();
    eventually(30, "api read-only although its role row was held", || {
        let _ = psql(&api, "INSERT INTO fill SELECT g, repeat('x', 1000) FROM generate_series(1, 5000) g");
        (app_info(&r, "api")["database_quota"] == "read-only").then_some(())
    });
    // The session holding the row was ended: its next statement finds out.
    writeln!(holder.stdin.as_mut().unwrap(), "SELECT 1;").unwrap();
    drop(holder.stdin.take());
    let out = holder.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("terminating connection"), "{said}");
    let admin = r.admin_url("postgres");
    let settings = psql(
        &admin,
        "SELECT count(*) FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole \
        WHERE r.rolname = 'app_api' AND array_to_string(s.setconfig, ',') LIKE '%work_mem%'",
    )
    .unwrap();
    assert_eq!(settings, "0", "the held ALTER ROLE never committed");
}

#[test]
fn an_app_cannot_keep_a_previews_role_alive_by_granting_it_something() {
    let r = Receiver::start();
    r.create_app("web");
    r.nx(&["apps", "set", "web", "--preview-db", "empty"]).success();
    let d = r.push("web", &bin("hello"), &["--pr", "3"]);
    let id = d["id"].as_str().unwrap();
    let role = format!("prv_web_{id}");
    let web = r.db_url("web");
    psql(&web, "CREATE TABLE t (x int)").unwrap();
    psql(&web, &format!("GRANT SELECT ON t TO {role}")).unwrap();
    psql(&web, &format!("GRANT CONNECT ON DATABASE app_web TO {role}")).unwrap();
    r.nx(&["stop", "--pr", "3", "--app", "web"]).success();
    let admin = r.admin_url("postgres");
    eventually(20, "the preview's role dropped", || {
        let left = psql(&admin, &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{role}'")).unwrap();
        (left == "0").then_some(())
    });
    assert_eq!(psql(&web, "SELECT count(*) FROM t").unwrap(), "0", "the app's own table is untouched");
}

#[test]
fn what_an_app_stores_in_the_shared_catalogs_counts_against_its_quota() {
    let r = receiver_with(&[("NX_DB_QUOTA", "24MiB"), ("NX_DB_WATCHDOG_INTERVAL", "300ms")]);
    r.create_app("api");
    // 32 MB of hex, which does not compress, as a comment on its database:
    // stored in pg_shdescription, outside pg_database_size.
    psql(
        &r.db_url("api"),
        "DO $$ BEGIN EXECUTE format('COMMENT ON DATABASE app_api IS %L', \
         (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 1000000) g)); END $$",
    )
    .unwrap();
    eventually(30, "api read-only for its comment", || {
        let listed = r.nx(&["--json", "apps", "ls"]);
        assert_eq!(listed.code, 0, "{listed:?}\n{}", r.log());
        let api = listed.json().as_array().unwrap().iter().find(|a| a["name"] == "api").cloned().unwrap();
        (api["database_quota"] == "read-only").then_some(())
    });
}
