//! The GitHub story end to end: the action runs as a runner runs it, the
//! receiver reports to a local stand-in for GitHub's API, and GitHub's own
//! example webhook payloads, signed as GitHub signs them, merge, promote and
//! roll back.

use std::collections::HashMap;
use std::path::Path;

use nx_e2e::fixtures::{self, Go};
use nx_e2e::github::{payload, summary, with, Delivery, FakeGitHub};
use nx_e2e::receiver::{psql, NxOutput, Options};
use nx_e2e::{eventually, require_program, Receiver};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub(crate) const SECRET: &str = "webhook-secret-for-tests";
pub(crate) const REPO: &str = "nx-test/web";
pub(crate) const REPO_ID: i64 = 700_001;

pub(crate) fn receiver(github: &FakeGitHub, auth: &[&str]) -> Receiver {
    let mut args = vec!["--github-api".to_owned(), github.url.clone(), "--github-webhook-secret".into(), SECRET.into()];
    args.extend(auth.iter().map(|a| (*a).to_owned()));
    Receiver::start_with(Options { args, ..Options::default() })
}

/// Creates the app `web` linked (by the admin) to our repository, and
/// returns its deploy key.
pub(crate) fn linked_app(r: &Receiver) -> String {
    let key = r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--github-repo", REPO]);
    key
}

pub(crate) fn sha() -> String {
    format!("{:040x}", rand::random::<u128>())
}

fn digest(file: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(file).unwrap()))
}

/// A pull request event of GitHub's examples, made to be about pull request
/// `pr` at commit `head` of our repository (closed just now, if closed: the
/// receiver ignores events older than a month).
pub(crate) fn pull_request(name: &str, pr: i64, head: &str) -> Value {
    let mut p = with(
        payload(name),
        &[
            ("/number", pr.into()),
            ("/pull_request/number", pr.into()),
            ("/pull_request/head/sha", head.into()),
            ("/repository/id", REPO_ID.into()),
            ("/repository/full_name", REPO.into()),
        ],
    );
    if !p["pull_request"]["closed_at"].is_null() {
        p["pull_request"]["closed_at"] = now().into();
    }
    p
}

/// The time now as GitHub writes it.
pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// An approving (or other) review by `reviewer` of commit `commit` of pull
/// request `pr`, which `author` opened: GitHub's example, submitted just now.
pub(crate) fn review(pr: i64, id: i64, reviewer: &str, author: &str, commit: &str, state: &str) -> Value {
    with(
        payload("pull_request_review.submitted"),
        &[
            ("/review/id", id.into()),
            ("/review/state", state.into()),
            ("/review/user/login", reviewer.into()),
            ("/review/commit_id", commit.into()),
            ("/review/submitted_at", now().into()),
            ("/sender/login", reviewer.into()),
            ("/pull_request/number", pr.into()),
            ("/pull_request/user/login", author.into()),
            ("/repository/id", REPO_ID.into()),
            ("/repository/full_name", REPO.into()),
        ],
    )
}

/// A click by `by` on the `action` button of `deployment`'s check run
/// (`check_run` its id, `head` its commit): GitHub's example made ours.
pub(crate) fn button(deployment: &str, check_run: i64, head: &str, action: &str, by: &str) -> Value {
    with(
        payload("check_run.requested_action"),
        &[
            ("/check_run/id", check_run.into()),
            ("/check_run/external_id", deployment.into()),
            ("/check_run/head_sha", head.into()),
            ("/check_run/completed_at", now().into()),
            ("/requested_action/identifier", action.into()),
            ("/sender/login", by.into()),
            ("/repository/id", REPO_ID.into()),
            ("/repository/full_name", REPO.into()),
        ],
    )
}

/// What a run of the action left: its outputs, its job summary, its output.
pub(crate) struct Run {
    pub(crate) outputs: HashMap<String, String>,
    pub(crate) summary: String,
    pub(crate) out: NxOutput,
}

/// Runs `nx github-action` as a GitHub runner runs the action's step.
pub(crate) fn run_action(r: &Receiver, key: &str, event: &str, payload: &Value, binary: &Path) -> Run {
    run_action_with(r, key, event, payload, binary, &[])
}

pub(crate) fn run_action_with(
    r: &Receiver,
    key: &str,
    event: &str,
    payload: &Value,
    binary: &Path,
    env: &[(&str, &str)],
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (event_path, output, step_summary) =
        (dir.path().join("event.json"), dir.path().join("output"), dir.path().join("summary"));
    std::fs::write(&event_path, payload.to_string()).unwrap();
    let out = NxOutput::from(
        r.nx_command(key)
            .arg("github-action")
            .env("INPUT_BINARY", binary)
            .env("INPUT_APP", "web")
            .env("INPUT_WAIT", "true")
            .env("GITHUB_EVENT_NAME", event)
            .env("GITHUB_EVENT_PATH", &event_path)
            .env("GITHUB_SHA", sha())
            .env("GITHUB_REPOSITORY", REPO)
            .env("GITHUB_OUTPUT", &output)
            .env("GITHUB_STEP_SUMMARY", &step_summary)
            .envs(env.iter().copied())
            .output()
            .unwrap(),
    );
    let outputs = std::fs::read_to_string(&output)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    Run { outputs, summary: std::fs::read_to_string(&step_summary).unwrap_or_default(), out }
}

pub(crate) fn production(r: &Receiver) -> Option<String> {
    let apps = r.nx_ok(&["--json", "apps", "ls"]).json();
    apps[0]["production"].as_str().map(str::to_owned)
}

pub(crate) fn state_of(r: &Receiver, id: &str) -> String {
    let listing = r.nx_ok(&["--json", "ls", "web"]).json();
    let d = listing[0]["deployments"].as_array().unwrap().iter().find(|d| d["id"] == id).cloned();
    d.map_or_else(|| "gone".into(), |d| d["state"].as_str().unwrap().to_owned())
}

#[test]
fn a_pull_request_gets_its_preview_reported_and_merging_it_makes_that_binary_production() {
    let gh = FakeGitHub::start();
    let r = receiver(&gh, &["--github-token", "ghp_test_token"]);
    let key = linked_app(&r);
    r.nx_ok(&["apps", "set", "web", "--promote-on", "merge"]);
    let goweb = fixtures::go(Go::Static);

    // PR #7 opened: the action pushes; its outputs and summary say what came of it.
    let first_sha = sha();
    let first = run_action(&r, &key, "pull_request", &pull_request("pull_request.opened", 7, &first_sha), &goweb);
    assert_eq!(first.out.code, 0, "{:?}\n{}", first.out, r.log());
    let first_id = first.outputs["deployment-id"].clone();
    let preview = first.outputs["preview-url"].clone();
    assert_eq!(first.outputs["digest"], digest(&goweb));
    for expected in [preview.as_str(), "#7", &first_sha[..12], &first_id] {
        assert!(first.summary.contains(expected), "{expected:?} missing from the summary:\n{}", first.summary);
    }

    // GitHub hears about it: a comment whose link answers, a status, a check
    // run with a Promote button, a deployment in `preview`.
    let comment = eventually(20, "the pull request comment", || {
        gh.calls_to("POST", &format!("/repos/{REPO}/issues/7/comments")).pop()
    });
    let text = comment.body["body"].as_str().unwrap();
    assert!(text.contains(&preview) && text.contains(&first_id) && text.contains("healthy"), "{text}");
    assert_eq!(r.get(&preview).body, "goweb\n", "the link in the comment answers");
    assert!(comment.authorization.contains("ghp_test_token"), "{}", comment.authorization);
    let status = eventually(20, "the commit status", || {
        gh.calls_to("POST", &format!("/repos/{REPO}/statuses/{first_sha}")).pop()
    });
    assert_eq!(
        (status.body["state"].as_str(), status.body["target_url"].as_str()),
        (Some("success"), Some(preview.as_str()))
    );
    let check = eventually(20, "the check run", || gh.calls_to("POST", &format!("/repos/{REPO}/check-runs")).pop());
    assert_eq!(check.body["head_sha"], first_sha.as_str());
    assert_eq!(check.body["external_id"], first_id.as_str());
    assert_eq!(check.body["conclusion"], "success");
    assert_eq!(check.body["actions"][0]["identifier"], "promote");
    let deployment =
        eventually(20, "the GitHub deployment", || gh.calls_to("POST", &format!("/repos/{REPO}/deployments")).pop());
    assert_eq!(deployment.body["environment"], "preview");
    let env_status =
        eventually(20, "its status", || gh.calls_to("POST", &format!("/repos/{REPO}/deployments/*")).pop());
    assert_eq!(env_status.body["environment_url"], preview.as_str());

    // A new commit on the PR: the same comment is edited, not a second one made.
    let c = fixtures::c_musl_static();
    let second_sha = sha();
    let second = run_action(&r, &key, "pull_request", &pull_request("pull_request.synchronize", 7, &second_sha), &c);
    assert_eq!(second.out.code, 0, "{:?}", second.out);
    let second_id = second.outputs["deployment-id"].clone();
    let edit = eventually(20, "the comment to be edited", || {
        gh.calls_to("PATCH", "/repos/nx-test/web/issues/comments/*")
            .into_iter()
            .find(|c| c.body["body"].as_str().unwrap_or_default().contains(&second_id))
    });
    let created = gh.calls_to("POST", &format!("/repos/{REPO}/issues/7/comments"));
    assert_eq!(created.len(), 1, "one comment per app and pull request:\n{}", summary(&gh.calls()));
    assert_eq!(edit.path, format!("/repos/{REPO}/issues/comments/{}", created[0].response["id"]));

    // A push from another repository is refused: the app is linked to this one.
    let elsewhere = with(
        pull_request("pull_request.opened", 9, &sha()),
        &[("/repository/id", 999.into()), ("/repository/full_name", "evil/fork".into())],
    );
    let refused = run_action(&r, &key, "pull_request", &elsewhere, &goweb);
    assert_eq!(refused.out.code, 1, "{:?}", refused.out);
    assert!(refused.out.stdout.contains("linked to the GitHub repository nx-test/web"), "{}", refused.out.stdout);
    assert!(refused.out.stdout.starts_with("::error title="), "an annotation on the run: {}", refused.out.stdout);

    // A forged merge changes nothing.
    let merged = with(pull_request("pull_request.closed", 7, &second_sha), &[("/pull_request/merged", true.into())]);
    let delivery = Delivery::new("pull_request", &merged);
    let forged = delivery.send_signed(&r.api(), &Delivery::new("pull_request", &json!({})).signature(SECRET));
    assert_eq!(forged.0, 401, "{forged:?}");
    assert_eq!(delivery.send(&r.api(), "not-the-secret").0, 401);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(production(&r), None, "nothing was promoted");

    // The real merge: the exact binary of the PR's head commit is production,
    // and the PR's other preview stops.
    assert_eq!(delivery.send(&r.api(), SECRET), (202, "queued\n".into()));
    eventually(20, "the merged preview to be production", || {
        (production(&r).as_deref() == Some(second_id.as_str())).then_some(())
    });
    // The route follows the recorded promotion: the router is sent the new
    // table once the production pointer is committed.
    let prod_url = format!("http://web.localhost:{}/", r.router_port);
    eventually(10, "production to be routed", || (r.get(&prod_url).body == "hello from c\n").then_some(()));
    let listing = r.nx_ok(&["--json", "ls", "web"]).json();
    let prod = listing[0]["deployments"].as_array().unwrap().iter().find(|d| d["production"] == true).unwrap().clone();
    assert_eq!(prod["digest"], digest(&c).as_str(), "production runs the binary that was pushed for the PR");
    eventually(20, "the older preview of the PR to stop", || (state_of(&r, &first_id) == "stopped").then_some(()));
    eventually(20, "a production deployment on GitHub", || {
        gh.calls_to("POST", &format!("/repos/{REPO}/deployments"))
            .into_iter()
            .find(|c| c.body["environment"] == "production")
    });

    // Delivered again, it is ignored.
    assert_eq!(delivery.send(&r.api(), SECRET), (200, "duplicate delivery, ignored\n".into()));
}

#[test]
fn a_tenant_naming_another_repository_gets_no_report_there() {
    let gh = FakeGitHub::start();
    let r = receiver(&gh, &["--github-token", "ghp_test_token"]);
    let key = r.create_app("web");
    let goweb = fixtures::go(Go::Static);
    // A deploy key cannot link an unlinked app to the repository it names.
    let victim = "victim-org/victim-repo";
    let unlinked = with(pull_request("pull_request.opened", 6, &sha()), &[("/repository/full_name", victim.into())]);
    let refused = run_action_with(&r, &key, "pull_request", &unlinked, &goweb, &[("GITHUB_REPOSITORY", victim)]);
    assert_eq!(refused.out.code, 1, "{:?}", refused.out);
    assert!(
        refused.out.stderr.contains(&format!("a deploy key may not link it to {victim}")),
        "{}",
        refused.out.stderr
    );
    // The admin links it by name; GitHub gives its id (REPO_ID).
    let linked = r.nx_ok(&["apps", "set", "web", "--github-repo", REPO]);
    assert!(linked.stdout.contains(&format!("linked to {REPO} (repository id {REPO_ID})")), "{}", linked.stdout);
    let first = run_action(&r, &key, "pull_request", &pull_request("pull_request.opened", 7, &sha()), &goweb);
    assert_eq!(first.out.code, 0, "{:?}", first.out);
    eventually(20, "the first comment", || gh.calls_to("POST", &format!("/repos/{REPO}/issues/7/comments")).pop());

    // The tenant's push claims the victim's name with its own repository's id:
    // the reports go to the linked repository alone.
    let claimed =
        with(pull_request("pull_request.synchronize", 8, &sha()), &[("/repository/full_name", victim.into())]);
    let run = run_action_with(&r, &key, "pull_request", &claimed, &goweb, &[("GITHUB_REPOSITORY", victim)]);
    assert_eq!(run.out.code, 0, "{:?}", run.out);
    eventually(20, "the comment on the linked repository", || {
        gh.calls_to("POST", &format!("/repos/{REPO}/issues/8/comments")).pop()
    });
    // And a push from another repository id is refused outright.
    let other = with(claimed.clone(), &[("/repository/id", 999_999.into())]);
    let refused = run_action_with(&r, &key, "pull_request", &other, &goweb, &[("GITHUB_REPOSITORY", victim)]);
    assert_eq!(refused.out.code, 1, "{:?}", refused.out);
    assert!(
        refused.out.stderr.contains(&format!("is linked to the GitHub repository {REPO}")),
        "{}",
        refused.out.stderr
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    let leaked: Vec<String> = gh.calls().into_iter().map(|c| c.path).filter(|p| p.contains("victim")).collect();
    assert!(leaked.is_empty(), "the platform's token reached {leaked:?}");
}

/// An app linked by name whose id GitHub does not give (the receiver's
/// token cannot see the repository): a deploy key's push naming the
/// repository and an id deploys, but links nothing, so webhooks of that id
/// act on nothing and nothing is reported; the admin's own push sets the id.
#[test]
fn a_deploy_keys_claim_links_nothing_and_its_reports_go_nowhere() {
    let gh = FakeGitHub::start();
    gh.hide_repositories();
    let r = receiver(&gh, &["--github-token", "ghp_test_token"]);
    let key = r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--promote-on", "merge"]);
    let linked = r.nx_ok(&["apps", "set", "web", "--github-repo", REPO]);
    assert!(linked.stdout.contains("whose id GitHub did not give the receiver"), "{}", linked.stdout);
    let id = |r: &Receiver| r.nx_ok(&["--json", "ls", "web"]).json()[0]["app"]["settings"]["github"]["id"].clone();
    assert_eq!(id(&r), Value::Null);

    let head = sha();
    let run = run_action(
        &r,
        &key,
        "pull_request",
        &pull_request("pull_request.opened", 12, &head),
        &fixtures::go(Go::Static),
    );
    assert_eq!(run.out.code, 0, "{:?}", run.out);
    assert_eq!(id(&r), Value::Null, "the deploy key's claim set no id");
    let preview = run.outputs["deployment-id"].clone();
    // A merge webhook of the id it claimed promotes nothing, closes nothing.
    let merged = with(pull_request("pull_request.closed", 12, &head), &[("/pull_request/merged", true.into())]);
    assert_eq!(Delivery::new("pull_request", &merged).send(&r.api(), SECRET), (202, "queued\n".into()));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(production(&r), None);
    assert_eq!(state_of(&r, &preview), "healthy");
    let reported: Vec<String> = gh.calls().into_iter().filter(|c| c.method != "GET").map(|c| c.path).collect();
    assert!(reported.is_empty(), "nothing is reported anywhere: {reported:?}");

    // The admin's push is the admin's word: it sets the id, and the
    // platform reports there from then on.
    let admin = run_action(
        &r,
        &r.admin_token,
        "pull_request",
        &pull_request("pull_request.synchronize", 12, &sha()),
        &fixtures::go(Go::Static),
    );
    assert_eq!(admin.out.code, 0, "{:?}", admin.out);
    assert_eq!(id(&r).as_i64(), Some(REPO_ID));
    eventually(20, "the comment on the linked repository", || {
        gh.calls_to("POST", &format!("/repos/{REPO}/issues/12/comments")).pop()
    });
}

#[test]
fn pushes_to_the_production_branch_promote_unless_the_app_waits_for_merges() {
    let r = Receiver::start();
    let key = linked_app(&r);
    let push = with(payload("push"), &[("/repository/id", REPO_ID.into()), ("/repository/full_name", REPO.into())]);
    let goweb = fixtures::go(Go::Static);
    let branch = |name: &str| run_action_with(&r, &key, "push", &push, &goweb, &[("GITHUB_REF_NAME", name)]);
    let feature = branch("feature");
    assert_eq!(feature.out.code, 0, "{:?}", feature.out);
    assert_eq!(production(&r), None, "another branch only gets a preview");
    let main = branch("master");
    assert_eq!(main.out.code, 0, "{:?}", main.out);
    assert_eq!(production(&r), Some(main.outputs["deployment-id"].clone()), "the default branch is promoted");
    assert!(main.summary.contains("| production |"), "{}", main.summary);

    r.nx_ok(&["apps", "set", "web", "--promote-on", "merge"]);
    let later = branch("master");
    assert_eq!(later.out.code, 0, "{:?}", later.out);
    assert_eq!(production(&r), Some(main.outputs["deployment-id"].clone()), "merges promote on the receiver, not here");
}

#[test]
fn check_run_buttons_and_approvals_promote_and_roll_back() {
    let gh = FakeGitHub::start();
    let r = receiver(&gh, &["--github-token", "ghp_test_token"]);
    let key = linked_app(&r);
    r.nx_ok(&["apps", "set", "web", "--promote-on", "approval"]);
    let goweb = fixtures::go(Go::Static);
    let (a_sha, b_sha) = (sha(), sha());
    let a = run_action(&r, &key, "pull_request", &pull_request("pull_request.opened", 8, &a_sha), &goweb);
    let b = run_action(
        &r,
        &key,
        "pull_request",
        &pull_request("pull_request.opened", 9, &b_sha),
        &fixtures::c_musl_static(),
    );
    let (a, b) = (a.outputs["deployment-id"].clone(), b.outputs["deployment-id"].clone());
    gh.set_permission("maintainer", "write");
    let click = |deployment: &str, action: &str, repository_id: i64| {
        let (check_run, head) = if deployment == a { (1, &a_sha) } else { (2, &b_sha) };
        let p = with(
            button(deployment, check_run, head, action, "maintainer"),
            &[("/repository/id", repository_id.into())],
        );
        Delivery::new("check_run", &p).send(&r.api(), SECRET)
    };

    // A button from another repository is ignored.
    assert_eq!(click(&a, "promote", 12345).0, 202);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(production(&r), None);

    assert_eq!(click(&a, "promote", REPO_ID).0, 202);
    eventually(20, "A to be production", || (production(&r).as_deref() == Some(a.as_str())).then_some(()));
    assert_eq!(click(&b, "promote", REPO_ID).0, 202);
    eventually(20, "B to be production", || (production(&r).as_deref() == Some(b.as_str())).then_some(()));
    // B's check run now offers the way back.
    eventually(20, "a Rollback button on B's check run", || {
        gh.calls_to("PATCH", "/repos/nx-test/web/check-runs/*")
            .into_iter()
            .find(|c| c.body["external_id"] == b.as_str() && c.body["actions"].to_string().contains("rollback"))
    });
    assert_eq!(click(&b, "rollback", REPO_ID).0, 202);
    eventually(20, "A to be production again", || (production(&r).as_deref() == Some(a.as_str())).then_some(()));

    // An approving review of PR #9 by a maintainer promotes its head
    // commit's deployment; a mere comment does not.
    let submit = |id: i64, state: &str| {
        let p = review(9, id, "maintainer", "Codertocat", &b_sha, state);
        Delivery::new("pull_request_review", &p).send(&r.api(), SECRET)
    };
    assert_eq!(submit(1, "commented"), (202, "ignored\n".into()));
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(production(&r).as_deref(), Some(a.as_str()));
    assert_eq!(submit(2, "approved"), (202, "queued\n".into()));
    eventually(20, "the approved PR to be production", || {
        (production(&r).as_deref() == Some(b.as_str())).then_some(())
    });

    // A pull request closed without merging takes its previews along.
    let c = run_action(&r, &key, "pull_request", &pull_request("pull_request.opened", 10, &sha()), &goweb);
    let c = c.outputs["deployment-id"].clone();
    assert_eq!(state_of(&r, &c), "healthy");
    let closed = Delivery::new("pull_request", &pull_request("pull_request.closed", 10, &sha()));
    assert_eq!(closed.send(&r.api(), SECRET).0, 202);
    eventually(20, "the closed pull request's preview to stop", || (state_of(&r, &c) == "stopped").then_some(()));
    assert_eq!(production(&r).as_deref(), Some(b.as_str()), "an unmerged pull request promotes nothing");

    // Pings are answered, unknown events ignored (oversized bodies are
    // refused on their head: access::bodies_over_their_limit_are_refused_before_they_are_read).
    assert_eq!(Delivery::new("ping", &payload("ping")).send(&r.api(), SECRET), (200, "pong\n".into()));
    assert_eq!(Delivery::new("star", &json!({ "action": "created" })).send(&r.api(), SECRET).0, 202);
}

#[test]
fn as_a_github_app_with_installation_tokens_and_github_down_a_deploy_never_waits() {
    let openssl = require_program("openssl", "openssl");
    let gh = FakeGitHub::start();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("app.pem");
    let made = std::process::Command::new(openssl).args(["genrsa", "-out"]).arg(&pem).arg("2048").output().unwrap();
    assert!(made.status.success(), "{made:?}");
    let r = receiver(&gh, &["--github-app-id", "77", "--github-app-key", pem.to_str().unwrap()]);
    let installed = with(
        payload("installation.created"),
        &[("/installation/id", 555.into()), ("/installation/account/login", "nx-test".into())],
    );
    assert_eq!(Delivery::new("installation", &installed).send(&r.api(), SECRET).0, 202);
    // Linked once the installation is known: the link asks GitHub for the
    // repository's id with the installation's token.
    eventually(20, "the installation to be recorded", || {
        (psql(&r.admin_url("nx"), "SELECT count(*) FROM github_installations").unwrap() == "1").then_some(())
    });
    let key = linked_app(&r);

    // GitHub fails its next calls: the push is healthy all the same, and the
    // report arrives once GitHub is back.
    gh.fail_next(3);
    let run = run_action(
        &r,
        &key,
        "pull_request",
        &pull_request("pull_request.opened", 3, &sha()),
        &fixtures::go(Go::Static),
    );
    assert_eq!(run.out.code, 0, "{:?}", run.out);
    let comment = eventually(40, "the comment after GitHub recovered", || {
        gh.calls_to("POST", &format!("/repos/{REPO}/issues/3/comments")).pop()
    });
    assert!(comment.authorization.contains("ghs_fake"), "an installation token: {}", comment.authorization);
    let token = gh
        .calls_to("POST", "/app/installations/555/access_tokens")
        .pop()
        .expect("a token of the installation from the webhook");
    let jwt = token.authorization.trim_start_matches("Bearer ").to_owned();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT: {jwt}");
    let header: Value = serde_json::from_slice(&base64_url(parts[0])).unwrap();
    assert_eq!(header["alg"], "RS256");
    let claims: Value = serde_json::from_slice(&base64_url(parts[1])).unwrap();
    assert_eq!(claims["iss"].to_string().trim_matches('"'), "77");
    assert!(gh.calls_to("GET", &format!("/repos/{REPO}/installation")).is_empty(), "known from the webhook");

    // Uninstalled: the next report asks GitHub which installation covers the
    // repository now.
    let removed = with(
        payload("installation.deleted"),
        &[("/installation/id", 555.into()), ("/installation/account/login", "nx-test".into())],
    );
    assert_eq!(Delivery::new("installation", &removed).send(&r.api(), SECRET).0, 202);
    // The deletion is handled in milliseconds; the push below reports only
    // once its deployment is healthy, well after.
    let again = run_action(
        &r,
        &key,
        "pull_request",
        &pull_request("pull_request.opened", 4, &sha()),
        &fixtures::go(Go::Static),
    );
    assert_eq!(again.out.code, 0, "{:?}", again.out);
    eventually(20, "GitHub to be asked for the installation", || {
        gh.calls_to("GET", &format!("/repos/{REPO}/installation")).pop()
    });
    eventually(20, "a token of the installation GitHub named", || {
        gh.calls_to("POST", "/app/installations/4242/access_tokens").pop()
    });
}

fn base64_url(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap()
}

#[test]
fn the_action_and_the_workflows_pass_actionlint_and_githubs_schemas() {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin");
    let tool = |name: &str| {
        let path = venv.join(name);
        assert!(path.exists(), "{} is missing: scripts/test.sh installs it into target/test-venv", path.display());
        path
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let workflows = ["workflows/deploy-go.yml", "workflows/deploy-rust.yml", ".github/workflows/release.yml"];
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.current_dir(&root).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(std::process::Command::new(tool("actionlint")).args(workflows));
    run(std::process::Command::new(tool("check-jsonschema")).args([
        "--builtin-schema",
        "vendor.github-actions",
        "action.yml",
    ]));
    run(std::process::Command::new(tool("check-jsonschema"))
        .args(["--builtin-schema", "vendor.github-workflows"])
        .args(workflows));
}

/// A pull request from a fork has no secrets and no OIDC token in GitHub: the
/// step says why there is no preview and succeeds, and nothing is deployed.
#[test]
fn a_pull_request_from_a_fork_gets_no_preview_and_the_step_says_why() {
    let r = Receiver::start();
    r.create_app("web");
    let from_fork = with(
        pull_request("pull_request.opened", 11, &sha()),
        &[
            ("/pull_request/head/repo/full_name", "mallory/web".into()),
            ("/pull_request/base/repo/full_name", REPO.into()),
        ],
    );
    // No key at all, as in a fork's run.
    let run = run_action(&r, "", "pull_request", &from_fork, &fixtures::go(Go::Static));
    assert_eq!(run.out.code, 0, "{:?}", run.out);
    assert!(
        run.summary.contains("No preview for pull request #11: it comes from the fork mallory/web"),
        "{}",
        run.summary
    );
    assert!(run.out.stdout.contains("::notice title=NX Sandbox: no preview for a fork::"), "{}", run.out.stdout);
    let listed = r.nx_ok(&["--json", "ls", "web"]).json();
    assert_eq!(listed[0]["deployments"], serde_json::json!([]), "{listed}");
}
