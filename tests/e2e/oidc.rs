//! Keyless pushes: a GitHub Actions job with `permissions: id-token: write`
//! and no NX_KEY pushes with the OIDC token a local issuer signs (as GitHub's
//! does), the receiver verifies it against that issuer's published keys and
//! the app's trust policy, and records what it proved. Every way a token can
//! be wrong is refused with its own answer, and leaves no trace; a deploy key
//! cannot aim the platform's GitHub identity at another repository. And the
//! composite action itself, run as a runner runs it, installs its release and
//! deploys with the job's token alone.

use std::path::Path;

use nx_e2e::fixtures::{self, Go};
use nx_e2e::github::{payload, with, FakeGitHub};
use nx_e2e::oidc::{Issuer, Mint, Signing, OWNER_ID, REPOSITORY, REPOSITORY_ID, SHA, WORKFLOW};
use nx_e2e::receiver::{NxOutput, Options};
use nx_e2e::runner::{self, Releases};
use nx_e2e::{bin, eventually, Receiver};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn receiver(issuer: &Issuer, extra: &[&str]) -> Receiver {
    let mut args = issuer.receiver_args();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    Receiver::start_with(Options { args, ..Options::default() })
}

/// `nx` as a job with an OIDC token and no key runs it.
fn as_job(r: &Receiver, issuer: &Issuer, args: &[&str]) -> NxOutput {
    NxOutput::from(r.nx_command("").envs(issuer.job_env()).args(args).output().unwrap())
}

fn push_as_job(r: &Receiver, issuer: &Issuer, app: &str, binary: &Path) -> NxOutput {
    as_job(r, issuer, &["--json", "push", binary.to_str().unwrap(), "--app", app])
}

fn deployments(r: &Receiver, app: &str) -> Vec<Value> {
    let listing = r.nx_ok(&["--json", "ls", app]).json();
    listing[0]["deployments"].as_array().unwrap().clone()
}

fn link(r: &Receiver, app: &str) -> Value {
    r.nx_ok(&["--json", "ls", app]).json()[0]["app"]["settings"]["github"].clone()
}

#[test]
fn a_trusted_workflow_pushes_without_a_key_and_its_deployment_shows_what_github_proved() {
    let issuer = Issuer::start();
    let r = receiver(&issuer, &[]);
    let deploy_key = r.create_app("web");
    r.create_app("site");
    let goweb = fixtures::go(Go::Static);
    let set = r.nx_ok(&["apps", "set", "web", "--github-trust", &format!("{REPOSITORY}:deploy.yml@main")]);
    assert!(
        set.stdout.contains(&format!(
            "GitHub: linked to {REPOSITORY}; runs of {REPOSITORY}:{WORKFLOW}@refs/heads/main may push with their OIDC token"
        )),
        "{set:?}"
    );

    // The first push, with the job's token alone: healthy, and it says what
    // GitHub proved.
    let out = push_as_job(&r, &issuer, "web", &goweb);
    assert_eq!(out.code, 0, "{out:?}\n{}", r.log());
    let d = out.json()["deployment"].clone();
    assert_eq!(d["state"], "healthy");
    let proved = json!({
        "repository": REPOSITORY,
        "repository_id": REPOSITORY_ID,
        "repository_owner_id": OWNER_ID,
        "ref": "refs/heads/main",
        "sha": SHA,
        "workflow_ref": format!("{REPOSITORY}/{WORKFLOW}@refs/heads/main"),
        "event_name": "push",
        "actor": "octocat",
    });
    assert_eq!(d["github"], proved);
    assert_eq!(d["git_sha"], SHA, "the commit is the one the token was issued for");
    assert_eq!(deployments(&r, "web")[0]["github"], proved, "the API shows it too");
    let human = r.nx_ok(&["ls", "web"]).stdout;
    assert!(
        human.contains(&format!(
            "{} pushed by the GitHub workflow {REPOSITORY}/{WORKFLOW}@refs/heads/main (push of refs/heads/main at {}, repository {REPOSITORY} id {REPOSITORY_ID}, run by octocat)",
            d["id"].as_str().unwrap(),
            &SHA[..12]
        )),
        "{human}"
    );
    // The proved push pinned the repository's ids.
    let pinned = link(&r, "web");
    assert_eq!((pinned["id"].as_u64(), pinned["owner_id"].as_u64()), (Some(REPOSITORY_ID), Some(OWNER_ID)));

    // The repository is renamed: its id is what counts, and the link follows.
    let renamed = "nx-test/web-renamed";
    issuer.next(Mint::with(&[
        ("repository", renamed.into()),
        ("workflow_ref", format!("{renamed}/{WORKFLOW}@refs/heads/main").into()),
    ]));
    let out = push_as_job(&r, &issuer, "web", &goweb);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(link(&r, "web")["repository"], renamed);
    // A new repository under the old or the new name is another repository.
    issuer.next(Mint::with(&[
        ("repository", renamed.into()),
        ("repository_id", "700002".into()),
        ("workflow_ref", format!("{renamed}/{WORKFLOW}@refs/heads/main").into()),
    ]));
    let out = push_as_job(&r, &issuer, "web", &goweb);
    refused(
        &out,
        &format!(
            "the repository {renamed} (id 700002) is not trusted for app web: it trusts {renamed} (id {REPOSITORY_ID})"
        ),
    );
    // Moved to another owner: no longer what the admin trusted.
    issuer.next(Mint::with(&[
        ("repository", renamed.into()),
        ("repository_owner_id", "9002".into()),
        ("workflow_ref", format!("{renamed}/{WORKFLOW}@refs/heads/main").into()),
    ]));
    let out = push_as_job(&r, &issuer, "web", &goweb);
    assert!(
        out.stderr
            .contains(&format!("the repository {renamed} now belongs to another owner (id 9002, trusted {OWNER_ID})")),
        "{}",
        out.stderr
    );

    // The token does what a push needs on its app, and nothing more.
    issuer.next(Mint::with(&[
        ("repository", renamed.into()),
        ("workflow_ref", format!("{renamed}/{WORKFLOW}@refs/heads/main").into()),
    ]));
    let expected = "a GitHub workflow's OIDC token may push to the app that trusts its repository (named with --app), \
                    read its deployments and apply its nx.toml settings, nothing else";
    for args in [&["env", "set", "A=1", "--app", "web"][..], &["keys", "create", "web"], &["db", "url", "web"], &["ls"]]
    {
        // nx signs nothing but pushes with the job's token (the rest asks for
        // a key); the route, signed with it by hand, is refused.
        let out = as_job(&r, &issuer, args);
        assert_eq!(out.code, 2, "{args:?} without a key: {out:?}");
        let (status, text) = send_as_job(&r, &issuer, args);
        assert_eq!(status, 403, "{args:?}: {text}");
        assert!(text.contains(expected), "{args:?}: {text}");
    }
    let other_app = as_job(&r, &issuer, &["push", goweb.to_str().unwrap(), "--app", "site"]);
    assert_eq!(other_app.code, 1);
    assert!(
        other_app.stderr.contains("app site trusts no GitHub workflow, so it takes no OIDC token"),
        "{other_app:?}"
    );

    // Deploy keys keep working, and their deployments claim nothing.
    let d = r.nx_with_key(&deploy_key, &["--json", "push", goweb.to_str().unwrap(), "--app", "web"]).success().json();
    assert_eq!(d["deployment"]["state"], "healthy");
    assert!(d["deployment"].get("github").is_none(), "{d}");
}

/// The route a command calls, signed with a fresh token as `nx push` signs:
/// status and answer.
fn send_as_job(r: &Receiver, issuer: &Issuer, args: &[&str]) -> (u16, String) {
    let (method, path, body): (&str, &str, &[u8]) = match args {
        ["env", "set", ..] => ("PATCH", "/v1/apps/web/env", br#"{"set":{"A":"1"}}"#),
        ["keys", "create", ..] => ("POST", "/v1/apps/web/keys", b"{}"),
        ["db", "url", ..] => ("GET", "/v1/apps/web/db", b""),
        _ => ("GET", "/v1/apps", b""),
    };
    nx_e2e::signed::send_with_token(&r.api(), method, path, body, &issuer.token(&r.api()))
}

#[test]
fn bad_tokens_are_refused_each_with_its_reason_and_leave_no_trace() {
    let issuer = Issuer::start();
    let r = receiver(&issuer, &["--github-oidc-refresh", "1h"]);
    r.create_app("web");
    let goweb = fixtures::go(Go::Static);
    let api = r.api();
    let url = issuer.url.clone();
    let now = chrono::Utc::now().timestamp();

    // No key and no token to ask for.
    let bare =
        NxOutput::from(r.nx_command("").args(["push", goweb.to_str().unwrap(), "--app", "web"]).output().unwrap());
    assert_eq!(bare.code, 2, "{bare:?}");
    assert!(bare.stderr.contains("set NX_KEY or grant `permissions: id-token: write`"), "{}", bare.stderr);

    // No trust policy: neither an unlinked app, nor one linked without
    // trust, nor one that does not exist takes a token, and all say the same.
    for (app, link) in [("web", None), ("web", Some("--github-repo")), ("nosuchapp", None)] {
        if let Some(flag) = link {
            r.nx_ok(&["apps", "set", app, flag, REPOSITORY]);
        }
        let out = push_as_job(&r, &issuer, app, &goweb);
        refused(&out, &format!("app {app} trusts no GitHub workflow, so it takes no OIDC token; the admin allows one with `nx apps set {app} --github-trust owner/repo[:workflow][@ref]`"));
    }
    r.nx_ok(&["apps", "set", "web", "--github-trust", &format!("{REPOSITORY}:{WORKFLOW}@main")]);

    let expired = now - 3600;
    let cases: Vec<(&str, Mint, String)> = vec![
        (
            "expired",
            Mint::with(&[("exp", expired.into()), ("iat", (expired - 300).into()), ("nbf", (expired - 300).into())]),
            format!("the GitHub OIDC token expired at {expired} (unix time; now "),
        ),
        (
            "not yet valid",
            Mint::with(&[("nbf", (now + 3600).into())]),
            format!("the GitHub OIDC token is not valid before {} (unix time; now ", now + 3600),
        ),
        (
            "wrong audience",
            Mint::with(&[("aud", "https://nx.elsewhere.example".into())]),
            format!(
                "the GitHub OIDC token is for audience \"https://nx.elsewhere.example\", not for this receiver ({api}); the action asks for its server URL as audience"
            ),
        ),
        (
            "wrong issuer",
            Mint::with(&[("iss", "https://token.actions.githubusercontent.com".into())]),
            format!(
                "the GitHub OIDC token was issued by \"https://token.actions.githubusercontent.com\", not by {url} (the receiver's --github-oidc-issuer)"
            ),
        ),
        (
            "unknown key",
            Mint::signed(Signing::UnknownKid),
            format!("the GitHub OIDC token is signed with key \"nx-test-key-never-published\", which {url} does not publish"),
        ),
        (
            "unknown key again",
            Mint::signed(Signing::UnknownKid),
            format!("the GitHub OIDC token is signed with key \"nx-test-key-never-published\", which {url} does not publish"),
        ),
        (
            "another key",
            Mint::signed(Signing::OtherKey),
            format!("the GitHub OIDC token's signature does not verify with key \"nx-test-key-1\" of {url}"),
        ),
        (
            "alg none",
            Mint::signed(Signing::None),
            "the GitHub OIDC token is signed with \"none\"; only RS256 tokens are accepted".into(),
        ),
        (
            "HS256 keyed with the public key",
            Mint::signed(Signing::Hs256),
            "the GitHub OIDC token is signed with \"HS256\"; only RS256 tokens are accepted".into(),
        ),
        (
            "another repository",
            Mint::with(&[
                ("repository", "evil-org/web".into()),
                ("repository_id", "666".into()),
                ("workflow_ref", format!("evil-org/web/{WORKFLOW}@refs/heads/main").into()),
            ]),
            format!("the repository evil-org/web (id 666) is not trusted for app web: it trusts {REPOSITORY}"),
        ),
        (
            "a ref outside the pattern",
            Mint::with(&[("ref", "refs/heads/feature".into())]),
            "the ref refs/heads/feature is not trusted for app web: it trusts refs/heads/main".into(),
        ),
        (
            "another workflow",
            Mint::with(&[("workflow_ref", format!("{REPOSITORY}/.github/workflows/ci.yml@refs/heads/main").into())]),
            format!(
                "the workflow {REPOSITORY}/.github/workflows/ci.yml@refs/heads/main is not trusted for app web: it trusts {WORKFLOW}"
            ),
        ),
        (
            "pull_request_target",
            Mint::with(&[("event_name", "pull_request_target".into())]),
            "tokens of pull_request_target runs are never trusted".into(),
        ),
        (
            "no repository id",
            Mint::with(&[("repository_id", Value::Null)]),
            "the GitHub OIDC token lacks the claim repository_id, or it is not what GitHub sends".into(),
        ),
    ];
    for (what, mint, expected) in cases {
        issuer.next(mint);
        let out = push_as_job(&r, &issuer, "web", &goweb);
        assert_eq!(out.code, 1, "{what}: {out:?}");
        assert!(out.stderr.contains(&expected), "{what}: expected {expected:?} in\n{}", out.stderr);
        assert!(out.stderr.contains("(the workflow's GitHub OIDC token was used, as no NX_KEY is set)"), "{what}");
    }
    // Nothing was written: no deployment, no link learned, no nonce.
    assert!(deployments(&r, "web").is_empty());
    let l = link(&r, "web");
    assert_eq!((l["id"].as_u64(), l["owner_id"].as_u64()), (None, None), "{l}");
    let nonces =
        nx_e2e::receiver::psql(&r.admin_url("nx"), "SELECT count(*) FROM nonces WHERE key_id = 'github-oidc'").unwrap();
    assert_eq!(nonces.trim(), "0");
    // Unknown keys made the receiver fetch the issuer's keys once, not once
    // per token: the refresh is bounded.
    assert_eq!(issuer.jwks_fetches(), 1);

    // A good token still works afterwards.
    issuer.next(Mint::default());
    let out = push_as_job(&r, &issuer, "web", &goweb);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn a_deploy_key_cannot_choose_the_repository_a_trusted_app_reports_to() {
    let issuer = Issuer::start();
    let gh = FakeGitHub::start();
    let r = receiver(&issuer, &["--github-api", &gh.url, "--github-token", "ghp_test_token"]);
    let key = r.create_app("web");
    let goweb = fixtures::go(Go::Static);
    r.nx_ok(&["apps", "set", "web", "--github-trust", REPOSITORY]);

    // Before any proved push, a tenant's action names the trusted repository
    // with another repository's id: it deploys, but pins nothing and reports
    // nowhere.
    let planted = action_with_key(&r, &key, &goweb, REPOSITORY, 999_999);
    assert_eq!(planted.code, 0, "{planted:?}");
    assert_eq!(link(&r, "web")["id"], Value::Null);

    // The first proved push pins the repository and reports there.
    let out = push_as_job(&r, &issuer, "web", &goweb);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(link(&r, "web")["id"].as_u64(), Some(REPOSITORY_ID));
    eventually(20, "the commit status on the trusted repository", || {
        gh.calls_to("POST", &format!("/repos/{REPOSITORY}/statuses/{SHA}")).pop()
    });

    // Now the tenant names a victim's repository: refused, and the
    // platform's token goes nowhere near it.
    let victim = "victim-org/victim-repo";
    let refused = action_with_key(&r, &key, &goweb, victim, 424_242);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains(&format!(
            "app web is linked to the GitHub repository {REPOSITORY}, but this push comes from {victim}"
        )),
        "{}",
        refused.stderr
    );
    // Nor may the deploy key relink the app or change its trust.
    for args in [
        &["apps", "set", "web", "--github-repo", victim][..],
        &["apps", "set", "web", "--github-trust", &format!("{victim}@*")],
    ] {
        let out = r.nx_with_key(&key, args);
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains("this needs the admin token"), "{args:?}: {}", out.stderr);
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let leaked: Vec<String> = gh.calls().into_iter().map(|c| c.path).filter(|p| p.contains("victim")).collect();
    assert!(leaked.is_empty(), "the platform's token reached {leaked:?}");
    assert!(gh.calls_to("POST", "/repos/*").iter().all(|c| c.path.starts_with(&format!("/repos/{REPOSITORY}/"))));
}

/// `nx github-action` with a deploy key, for a push event whose repository
/// (name and id) is whatever the tenant says.
fn action_with_key(r: &Receiver, key: &str, binary: &Path, repository: &str, id: u64) -> NxOutput {
    NxOutput::from(
        r.nx_command(key)
            .arg("github-action")
            .env("INPUT_BINARY", binary)
            .env("INPUT_APP", "web")
            .env("INPUT_PROMOTE", "false")
            .env("GITHUB_EVENT_NAME", "push")
            .env("GITHUB_REPOSITORY", repository)
            .env("GITHUB_REPOSITORY_ID", id.to_string())
            .env("GITHUB_SHA", "1".repeat(40))
            .env("GITHUB_REF_NAME", "main")
            .output()
            .unwrap(),
    )
}

/// A job of our repository on `event`, as GitHub's runner describes it to a
/// step, with `permissions: id-token: write` when `oidc`.
fn job(issuer: &Issuer, tag: &str, event: &str, payload: Value, sha: &str, oidc: bool) -> runner::Job {
    let mut env: Vec<(String, String)> = vec![
        ("GITHUB_EVENT_NAME".into(), event.into()),
        ("GITHUB_SHA".into(), sha.into()),
        ("GITHUB_REPOSITORY".into(), REPOSITORY.into()),
        ("GITHUB_REPOSITORY_ID".into(), REPOSITORY_ID.to_string()),
        ("GITHUB_REF_NAME".into(), "main".into()),
        ("GITHUB_REF".into(), "refs/heads/main".into()),
    ];
    if oidc {
        env.extend(issuer.job_env().into_iter().map(|(k, v)| (k.to_owned(), v)));
    }
    runner::Job { action_repository: "nx-sandbox/nx-sandbox".into(), action_ref: tag.into(), env, event: payload }
}

/// One of GitHub's example payloads, about our repository (default branch `main`).
fn ours(name: &str, changes: &[(&str, Value)]) -> Value {
    let mut all = vec![
        ("/repository/full_name", REPOSITORY.into()),
        ("/repository/id", REPOSITORY_ID.into()),
        ("/repository/default_branch", "main".into()),
    ];
    all.extend(changes.iter().cloned());
    with(payload(name), &all)
}

#[test]
fn the_composite_action_installs_its_release_and_deploys_with_the_jobs_oidc_token_alone() {
    let issuer = Issuer::start();
    let r = receiver(&issuer, &[]);
    r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--github-trust", &format!("{REPOSITORY}:deploy.yml")]);
    let goweb = fixtures::go(Go::Static);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The release the install script downloads: this build's nx, with its checksum.
    let releases = Releases::new();
    let asset = "nx-x86_64-unknown-linux-musl";
    let nx = std::fs::read(bin("nx")).unwrap();
    let checksum = format!("{}  {asset}\n", hex::encode(Sha256::digest(&nx)));
    releases.publish("nx-sandbox/nx-sandbox", "v1.2.3", asset, &nx);
    releases.publish("nx-sandbox/nx-sandbox", "v1.2.3", &format!("{asset}.sha256"), checksum.as_bytes());
    let inputs = [("server", r.api()), ("binary", goweb.to_str().unwrap().to_owned()), ("app", "web".to_owned())];
    let inputs: Vec<(&str, &str)> = inputs.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // A push to main, no key: installed, deployed, promoted, told.
    let push = job(&issuer, "v1.2.3", "push", ours("push", &[("/after", SHA.into())]), SHA, true);
    let run = runner::run(&root, &inputs, &push, &releases);
    assert_eq!(run.code, 0, "{}\n{}", run.log, r.log());
    assert!(run.log.contains("using released nx v1.2.3 (x86_64-unknown-linux-musl, sha256 "), "{}", run.log);
    let id = run.outputs["deployment-id"].clone();
    assert_eq!(run.outputs["digest"], hex::encode(Sha256::digest(std::fs::read(&goweb).unwrap())));
    assert_eq!(r.get(&run.outputs["preview-url"]).body, "goweb\n");
    let production = r.nx_ok(&["--json", "apps", "ls"]).json()[0]["production"].clone();
    assert_eq!(production, id.as_str(), "a push to the default branch promotes");
    for expected in [id.as_str(), &SHA[..12], "| production |"] {
        assert!(run.summary.contains(expected), "{expected:?} missing from the summary:\n{}", run.summary);
    }
    let d = deployments(&r, "web").into_iter().find(|d| d["id"] == id.as_str()).unwrap();
    assert_eq!(
        (d["github"]["event_name"].as_str(), d["github"]["ref"].as_str()),
        (Some("push"), Some("refs/heads/main"))
    );

    // A pull request's run: its token names refs/pull/7/merge; a preview, not production.
    let head = "0123456789abcdef0123456789abcdef01234567";
    let merge = "89abcdef0123456789abcdef0123456789abcdef";
    issuer.next(Mint::with(&[
        ("ref", "refs/pull/7/merge".into()),
        ("event_name", "pull_request".into()),
        ("sha", merge.into()),
    ]));
    let event = ours(
        "pull_request.opened",
        &[("/number", 7.into()), ("/pull_request/number", 7.into()), ("/pull_request/head/sha", head.into())],
    );
    let run = runner::run(&root, &inputs, &job(&issuer, "v1.2.3", "pull_request", event, merge, true), &releases);
    assert_eq!(run.code, 0, "{}", run.log);
    assert!(run.summary.contains("| pull request | #7 |"), "{}", run.summary);
    let preview =
        deployments(&r, "web").into_iter().find(|d| d["id"] == run.outputs["deployment-id"].as_str()).unwrap();
    assert_eq!((preview["pr"].as_u64(), preview["git_sha"].as_str()), (Some(7), Some(head)));
    assert_eq!(r.nx_ok(&["--json", "apps", "ls"]).json()[0]["production"], id.as_str());

    // A release whose bytes are not the ones its checksum names is not run.
    releases.publish("nx-sandbox/nx-sandbox", "v1.2.4", asset, b"#!/bin/sh\necho pwned\n");
    releases.publish("nx-sandbox/nx-sandbox", "v1.2.4", &format!("{asset}.sha256"), checksum.as_bytes());
    issuer.next(Mint::default());
    let before = deployments(&r, "web").len();
    let run = runner::run(&root, &inputs, &job(&issuer, "v1.2.4", "push", ours("push", &[]), SHA, true), &releases);
    assert_eq!(run.code, 1, "{}", run.log);
    assert!(run.log.contains("but its release says"), "{}", run.log);
    assert!(run.log.contains("refusing to run it") && !run.log.contains("pwned"), "{}", run.log);

    // No key and no `id-token: write`: the step says what to do.
    let run = runner::run(&root, &inputs, &job(&issuer, "v1.2.3", "push", ours("push", &[]), SHA, false), &releases);
    assert_eq!(run.code, 2, "{}", run.log);
    assert!(
        run.log.contains("::error title=NX Sandbox push failed::no key to push with: set NX_KEY or grant `permissions: id-token: write`"),
        "{}",
        run.log
    );
    assert_eq!(deployments(&r, "web").len(), before, "nothing was pushed");
}

/// `nx` failed (exit 1) saying `says`.
fn refused(out: &nx_e2e::receiver::NxOutput, says: &str) {
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(says), "{}", out.stderr);
}
