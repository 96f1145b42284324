//! The authorization model from the outside: every signed route, called with
//! every kind of key (the admin token, the app's own deploy key, another
//! app's deploy key, a read-only key), a workflow's GitHub OIDC token that
//! the app trusts and a fork preview's (a `pull_request_target` run's), is
//! let through or refused exactly as
//! `api::access` says; and the holes a deploy key used to open (lifting its
//! limits, minting keys, reading the database) stay shut.

use nx_e2e::oidc::{Issuer, Mint, REPOSITORY};
use nx_e2e::receiver::Options;
use nx_e2e::signed::{send_as, Signed};
use nx_e2e::Receiver;
use nx_protocol::auth::Credential;
use nx_receiver::api::access::{self, Role};
use nx_receiver::api::SIGNED_ROUTES;

/// The request a route gets in the walk. Bodies are signed as `{}` but sent
/// as `[]` (same length), so an allowed call stops at the body check and
/// nothing is changed; ids name nothing, so nothing is found and acted on.
fn request(method: &str, template: &str) -> (Signed, Vec<u8>) {
    let path = template
        .replace("{app}", "web")
        .replace("{id}", if template.contains("/deployments/") { "abcdefgh" } else { "nosuchkey1" })
        .replace("{pr}", "999")
        .replace("{domain}", "www.example.test");
    let bodied = matches!(method, "POST" | "PUT" | "PATCH");
    let signed = Signed::new(method, &path, if bodied { b"{}" } else { b"" }, None);
    (signed, if bodied { b"[]".to_vec() } else { Vec::new() })
}

#[test]
fn every_route_admits_exactly_the_keys_the_access_table_admits() {
    let issuer = Issuer::start();
    let r = Receiver::start_with(Options { args: issuer.receiver_args(), ..Options::default() });
    let web_key = r.create_app("web");
    let site_key = r.create_app("site");
    r.nx_ok(&["apps", "set", "web", "--github-trust", REPOSITORY]);
    r.nx_ok(&["apps", "set", "web", "--preview-forks", "label"]);
    issuer.next(Mint::with(&[("event_name", "pull_request_target".into())]));
    let fork_token = issuer.token(&r.api());
    issuer.next(Mint::default());
    let read_only = r.nx(&["--json", "keys", "create", "--read-only"]).success().json();
    let read_key = read_only["secret"].as_str().unwrap().to_owned();
    let key = |k: &str| Credential::parse(k).unwrap();
    let callers = [
        ("admin", key(&r.admin_token), Role::Admin),
        ("web's deploy key", key(&web_key), Role::Deploy { app_id: 0, app: "web".into() }),
        ("site's deploy key", key(&site_key), Role::Deploy { app_id: 0, app: "site".into() }),
        ("a read-only key", key(&read_key), Role::ReadOnly),
        // One token for the walk: it lives five minutes, and every request
        // still has its own nonce.
        (
            "web's trusted workflow",
            Credential::github_oidc(&issuer.token(&r.api())),
            Role::Workflow { app_id: 0, app: "web".into() },
        ),
        (
            "web's fork preview",
            Credential::github_oidc(&fork_token),
            Role::ForkPreview { app_id: 0, app: "web".into() },
        ),
    ];
    // Past the guard, a fork preview's push must name the labeled pull
    // request and commit, and this one names none.
    let fork_push = serde_json::json!({ "error": "a pull_request_target run's OIDC token pushes only a preview of a fork's pull request, and this push names no pull request; production is deployed by runs of the production branch" });

    assert!(SIGNED_ROUTES.len() >= 30, "the table lists every signed route");
    let mut refused = 0;
    for (method, template, action) in SIGNED_ROUTES {
        for (who, cred, role) in &callers {
            let (signed, body) = request(method, template);
            let (status, text) = send_as(&r.api(), &signed, cred, body);
            match access::decide(role, cred.key_id(), *action, if action.app_scoped() { "web" } else { "" }) {
                Ok(()) if matches!(role, Role::ForkPreview { .. }) => {
                    assert_eq!((status, serde_json::from_str(&text).unwrap()), (403, fork_push.clone()), "{who}")
                }
                Ok(()) => assert!(
                    status != 401 && status != 403,
                    "{method} {template} ({action:?}) by {who} must pass the guard, got {status}: {text}"
                ),
                Err(denied) => {
                    refused += 1;
                    assert_eq!(status, 403, "{method} {template} ({action:?}) by {who}: {text}");
                    let expected = serde_json::json!({ "error": denied.to_string(), "credential": true });
                    assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), expected, "{who}");
                }
            }
        }
    }
    assert!(refused > 40, "the walk refused {refused} calls");

    // The walk changed nothing: both deploy keys and the admin token still work.
    assert_eq!(r.nx_with_key(&web_key, &["ls"]).code, 0);
    assert_eq!(r.nx_with_key(&site_key, &["ls"]).code, 0);
    r.nx(&["ls"]).success();
}

#[test]
fn a_deploy_key_cannot_lift_its_limits_mint_keys_or_read_the_database() {
    let r = Receiver::start();
    let key = r.create_app("web");
    let as_tenant = |args: &[&str]| r.nx_with_key(&key, args);

    let lifted = as_tenant(&["apps", "set", "web", "--memory", "100000GiB", "--cpu", "64"]);
    assert_eq!(lifted.code, 1, "{lifted:?}");
    assert!(
        lifted.stderr.contains("raising memory (512 MiB to 102400000 MiB) needs the admin token"),
        "{}",
        lifted.stderr
    );
    let lowered = as_tenant(&["apps", "set", "web", "--memory", "256MiB"]);
    assert_eq!(lowered.code, 0, "a deploy key may lower its limits: {lowered:?}");
    let back_up = as_tenant(&["apps", "set", "web", "--memory", "512MiB"]);
    assert!(back_up.stderr.contains("raising memory (256 MiB to 512 MiB) needs the admin token"), "{back_up:?}");

    // The admin is held to the operator's caps too.
    let over_cap = r.nx(&["apps", "set", "web", "--memory", "100000GiB"]);
    assert_eq!(over_cap.code, 1);
    assert!(
        over_cap.stderr.contains("memory 102400000 MiB is over this server's cap of 8192 MiB")
            && over_cap.stderr.contains("--max-app-memory"),
        "{}",
        over_cap.stderr
    );
    let huge_disk = r.nx(&["apps", "set", "web", "--data", "100000GiB"]);
    assert!(huge_disk.stderr.contains("data 102400000 MiB is over this server's cap"), "{}", huge_disk.stderr);
    r.nx(&["apps", "set", "web", "--memory", "1GiB"]).success();

    for args in [
        &["keys", "create", "web"][..],
        &["keys", "rotate", "web", key.split('_').nth(1).unwrap()],
        &["keys", "create", "--read-only"],
        &["db", "url", "web"],
        &["apps", "set", "web", "--github-repo", "victim-org/victim-repo"],
    ] {
        let out = as_tenant(args);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains("needs the admin token"), "{args:?}: {}", out.stderr);
        // A refusal of the key tells how to use another one.
        assert!(out.stderr.contains("(set the key with `nx login --key KEY` or NX_KEY)"), "{}", out.stderr);
    }
    let ssh = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        ssh.path(),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGc8z0UQ8JtQ3ycW0YQ0b8rG0bPq9mnhK5ZpJ0W3bzq1 evil\n",
    )
    .unwrap();
    let out = as_tenant(&["keys", "add-ssh", "web", ssh.path().to_str().unwrap()]);
    assert!(out.stderr.contains("needs the admin token"), "{out:?}");

    // What the admin minted before the key leaked is all there is.
    let keys = r.nx(&["--json", "keys", "ls", "web"]).success().json();
    assert_eq!(keys["deploy_keys"].as_array().unwrap().len(), 1);
    assert!(keys["ssh_keys"].as_array().unwrap().is_empty());
}

#[test]
fn a_read_only_key_reads_everything_and_changes_nothing() {
    let r = Receiver::start();
    r.create_app("web");
    let created = r.nx(&["--json", "keys", "create", "--read-only"]).success().json();
    let key = created["secret"].as_str().unwrap().to_owned();
    let id = created["info"]["id"].as_str().unwrap().to_owned();
    let listing = r.nx_with_key(&key, &["--json", "apps", "ls"]).success().json();
    assert_eq!(listing.as_array().unwrap().len(), 1);
    let status = r.nx_with_key(&key, &["--json", "status"]).success().json();
    assert_eq!(status["apps"], 1);
    let refused = r.nx_with_key(&key, &["env", "set", "A=1", "--app", "web"]);
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains(&format!("the key {id} is read-only")), "{}", refused.stderr);

    let platform = r.nx(&["--json", "keys", "ls"]).success().json();
    let kinds: Vec<&str> =
        platform["platform_keys"].as_array().unwrap().iter().map(|k| k["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["admin", "read"]);
    r.nx(&["keys", "revoke-read-only", &id]).success();
    let revoked = r.nx_with_key(&key, &["apps", "ls"]);
    assert_eq!(revoked.code, 1);
    assert!(revoked.stderr.contains("was revoked"), "{}", revoked.stderr);
}

#[test]
fn a_deploy_key_counts_only_its_own_app_in_status() {
    let r = Receiver::start();
    let key = r.create_app("web");
    r.create_app("site");
    let status = r.nx_with_key(&key, &["--json", "status"]).success().json();
    assert_eq!(status["apps"], 1, "counts are of its own app: {status}");
    let all = r.nx(&["--json", "status"]).success().json();
    assert_eq!(all["apps"], 2);
}

/// Sends a request head announcing a body that never comes, and returns the
/// status line of the answer: a body refused before it is read is answered
/// at once.
fn answer_to_head_alone(port: u16, head: &str) -> String {
    use std::io::{BufRead, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut status = String::new();
    std::io::BufReader::new(stream).read_line(&mut status).expect("an answer before the body was sent");
    status.trim_end().to_owned()
}

#[test]
fn bodies_over_their_limit_are_refused_before_they_are_read() {
    let r = Receiver::start_with(nx_e2e::receiver::Options {
        args: vec!["--github-webhook-secret".into(), "a-webhook-secret".into()],
        ..Default::default()
    });
    let webhook = |headers: &str| {
        answer_to_head_alone(
            r.api_port,
            &format!("POST /v1/github/webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n{headers}\r\n"),
        )
    };
    // Unsigned: refused on the head, not after 20 MB.
    assert_eq!(webhook("X-GitHub-Event: ping\r\n"), "HTTP/1.1 401 Unauthorized");
    let signed = format!("X-Hub-Signature-256: sha256={}\r\n", "0".repeat(64));
    // Over GitHub's own 25 MB: refused on the declared length.
    let huge = answer_to_head_alone(
        r.api_port,
        &format!("POST /v1/github/webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000\r\n{signed}\r\n"),
    );
    assert_eq!(huge, "HTTP/1.1 413 Payload Too Large");

    // A signed API call announcing more JSON than any call takes.
    let s = Signed { content_length: 2 << 20, ..Signed::new("PATCH", "/v1/apps/web/env", b"{}", None) };
    let mut head = format!("PATCH /v1/apps/web/env HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n", 2 << 20);
    for (k, v) in s.headers(&r.admin_token) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    r.create_app("web");
    assert_eq!(answer_to_head_alone(r.api_port, &format!("{head}\r\n")), "HTTP/1.1 413 Payload Too Large");
}

#[test]
fn the_cli_sends_signed_requests_to_the_configured_host_alone() {
    use std::io::{Read, Write};
    let r = Receiver::start();
    // A server that redirects every request to another one, which counts
    // what reaches it.
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    elsewhere.set_nonblocking(true).unwrap();
    let redirector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!("http://{}/v1/apps", elsewhere.local_addr().unwrap());
    let port = redirector.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in redirector.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let answer = format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n");
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    let out = r.nx(&["--server", &format!("http://127.0.0.1:{port}"), "apps", "ls"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("307") && out.stderr.contains("does not follow redirects"), "{}", out.stderr);
    assert!(elsewhere.accept().is_err(), "no signed request reached the other host");

    let loopback = r.nx(&["--server", &format!("http://localhost:{}", r.api_port), "apps", "ls"]);
    assert_eq!(loopback.code, 0, "{loopback:?}");
}

#[test]
fn the_receivers_help_shows_no_secret_from_its_environment() {
    let out = std::process::Command::new(nx_e2e::bin("nx-receiver"))
        .args(["serve", "--help"])
        .env("NX_DATABASE_URL", "postgres://admin:hunter2-database@db.example/nx")
        .env("NX_ADMIN_TOKEN", "nxa_hunter2hunter2hunter2hunter2hunter2x")
        .env("NX_GITHUB_TOKEN", "ghp_hunter2")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--database-url"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}

/// Every route that names a deployment or key under an app, called under
/// one's own app with an id of another app's: not found, and the other app's
/// deployment, deploy key and SSH key are as they were. The walk above uses
/// ids that name nothing; this one uses real ones, so a handler that looked
/// an id up without its app would act.
#[test]
fn ids_of_another_app_are_not_found_under_ones_own() {
    let r = Receiver::start();
    let web_key = r.create_app("web");
    let site_key = r.create_app("site");
    let binary = nx_e2e::fixtures::c_musl_static();
    r.push("web", &binary, &[]);
    let site = r.push("site", &binary, &[]);
    let site_deployment = site["id"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let ssh = crate::sftp::keypair(dir.path(), "site-ssh");
    r.nx_ok(&["keys", "add-ssh", "site", ssh.with_extension("pub").to_str().unwrap()]);
    let (site_ssh, _) = crate::sftp::ssh_key(&r, "site", "site-ssh");
    let site_key_id = Credential::parse(&site_key).unwrap().key_id().to_owned();

    let mut tried = 0;
    for (method, template, _) in SIGNED_ROUTES.iter().filter(|(_, t, _)| t.starts_with("/v1/apps/{app}/")) {
        let (id, caller) = match template {
            t if t.contains("/deployments/{id}") => (site_deployment.as_str(), web_key.as_str()),
            t if t.contains("/ssh-keys/{id}") => (site_ssh.as_str(), r.admin_token.as_str()),
            t if t.contains("/keys/{id}") => (site_key_id.as_str(), r.admin_token.as_str()),
            _ => continue,
        };
        let path = template.replace("{app}", "web").replace("{id}", id);
        let body: &[u8] = if matches!(*method, "POST" | "PUT" | "PATCH") { b"{}" } else { b"" };
        let signed = Signed::new(method, &path, body, None);
        let (status, text) = send_as(&r.api(), &signed, &Credential::parse(caller).unwrap(), body.to_vec());
        assert_eq!(status, 404, "{method} {path}: {text}");
        assert!(text.contains(id) && text.contains("web"), "{method} {path} says what was not found where: {text}");
        tried += 1;
    }
    assert!(tried >= 7, "every id route was tried ({tried})");
    let listed = r.nx_ok(&["--json", "ls", "site"]).json();
    assert_eq!(listed[0]["deployments"][0]["state"], "healthy", "{listed}");
    assert_eq!(r.nx_with_key(&site_key, &["--json", "ls", "site"]).code, 0, "site's deploy key still works");
    assert_eq!(crate::sftp::ssh_key(&r, "site", "site-ssh").0, site_ssh, "site's SSH key is still there");
}

#[test]
fn a_settings_change_whose_body_arrives_after_the_admins_change_is_refused_and_changes_nothing() {
    use std::io::{Read, Write};
    let r = Receiver::start();
    let key = r.create_app("web");
    let memory = || r.nx_ok(&["--json", "apps", "ls"]).json()[0]["settings"]["limits"]["memory_mib"].clone();
    let settings = r.nx_ok(&["--json", "apps", "ls"]).json()[0]["settings"].clone();
    assert_eq!(memory(), serde_json::Value::Null, "the server's default");

    // The deploy key sends its app's settings as they are (the default
    // memory, no raise) with a body that takes its time...
    let body = settings.to_string().into_bytes();
    let signed = Signed::new("PUT", "/v1/apps/web/settings", &body, None);
    let api = r.api();
    let mut stream = std::net::TcpStream::connect(api.trim_start_matches("http://")).unwrap();
    let mut head = format!(
        "PUT /v1/apps/web/settings HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        api.trim_start_matches("http://"),
        body.len()
    );
    for (name, value) in signed.headers(&key) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body[..body.len() / 2]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // ...while the admin lowers the app's memory.
    r.nx_ok(&["apps", "set", "web", "--memory", "256MiB"]);
    stream.write_all(&body[body.len() / 2..]).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();

    // Checked against the settings before, the body would have put the
    // default (512 MiB) back: refused.
    assert!(answer.starts_with("HTTP/1.1 409"), "{answer}");
    assert!(
        answer.contains(
            "app web's settings changed while this request was made, so nothing was changed; make the change again \
             from the settings as they are now (`nx apps set` reads them first)"
        ),
        "{answer}"
    );
    assert_eq!(memory(), 256, "the admin's change stands");
    // Sent again from the settings as they are, the same key's change is taken.
    r.nx_with_key(&key, &["apps", "set", "web", "--memory", "128MiB"]).success();
    assert_eq!(memory(), 128);
}

#[test]
fn a_keys_last_use_is_shown_and_a_busy_key_is_not_written_on_every_request() {
    let r = Receiver::start();
    let key = r.create_app("web");
    let last_use = |r: &Receiver| {
        let listed = r.nx_ok(&["--json", "keys", "ls", "web"]).json();
        let keys = listed["deploy_keys"].as_array().unwrap_or_else(|| panic!("no deploy_keys in {listed}"));
        assert_eq!(keys.len(), 1, "{listed}");
        keys[0]["last_used_at"].clone()
    };
    assert_eq!(last_use(&r), serde_json::Value::Null, "a key nobody used yet");
    r.nx_with_key(&key, &["ls", "web"]).success();
    let first = last_use(&r);
    let at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(first.clone()).unwrap_or_else(|e| panic!("{first}: {e}"));
    assert!((chrono::Utc::now() - at).num_seconds().abs() < 30, "the use just made: {at}");
    r.nx_with_key(&key, &["ls", "web"]).success();
    assert_eq!(last_use(&r), first, "a second use within the minute writes nothing");
}
