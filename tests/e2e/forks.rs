//! Previews of pull requests from forks (`[preview] forks = "label"`): a
//! fork's `pull_request_target` run, which may execute the fork's code, pushes
//! with its OIDC token (from the local issuer), and the receiver takes it only
//! as a preview of the exact head commit that someone GitHub says may write
//! labeled (GitHub's example webhook payloads, adapted and signed as GitHub
//! signs them; the fake GitHub answers the permission). Every other use of
//! such a token is refused with its own answer, a new commit is not covered,
//! removing the label withdraws it, and without the setting nothing changes.

use std::path::Path;

use nx_e2e::fixtures::{self, Go};
use nx_e2e::github::{with, Delivery, FakeGitHub};
use nx_e2e::oidc::{Issuer, Mint, REPOSITORY};
use nx_e2e::receiver::{psql, NxOutput, Options};
use nx_e2e::signed::{send_as, Signed};
use nx_e2e::{eventually, Receiver};
use nx_protocol::auth::Credential;
use serde_json::{json, Value};

use crate::github::{now, pull_request, run_action_with, sha, state_of, Run, REPO, SECRET};

/// The fork's pull request.
const PR: i64 = 21;

/// A receiver that trusts the local issuer, reports to the fake GitHub and
/// takes its webhooks, with the app `web` trusting our repository's
/// workflows, its id pinned by a first keyless push of `main`.
fn receiver(issuer: &Issuer, gh: &FakeGitHub) -> (Receiver, String) {
    let mut args = issuer.receiver_args();
    args.extend(
        ["--github-api", &gh.url, "--github-webhook-secret", SECRET, "--github-token", "ghp_test_token"]
            .map(String::from),
    );
    let r = Receiver::start_with(Options { args, ..Options::default() });
    let key = r.create_app("web");
    r.nx_ok(&["apps", "set", "web", "--github-trust", REPOSITORY]);
    let pinned = NxOutput::from(
        r.nx_command("")
            .envs(issuer.job_env())
            .args(["push", fixtures::go(Go::Static).to_str().unwrap(), "--app", "web"])
            .output()
            .unwrap(),
    );
    assert_eq!(pinned.code, 0, "{pinned:?}");
    (r, key)
}

/// A pull request event of GitHub's examples about pull request [`PR`] from
/// the fork mallory/web at commit `head`, sent by `by` (`action`: `labeled`
/// or `unlabeled`, with the label `nx-preview`, just now).
fn fork_event(action: &str, head: &str, by: &str) -> Value {
    let mut p = with(
        pull_request("pull_request.opened", PR, head),
        &[
            ("/action", action.into()),
            ("/pull_request/head/repo/full_name", "mallory/web".into()),
            ("/pull_request/base/repo/full_name", REPO.into()),
            ("/pull_request/updated_at", now().into()),
            ("/sender/login", by.into()),
        ],
    );
    p["label"] = json!({ "id": 208045946, "name": "nx-preview", "color": "0e8a16", "default": false });
    p
}

/// Delivers `action` of the label by `by` on commit `head`, signed.
fn label(r: &Receiver, action: &str, head: &str, by: &str) -> Delivery {
    let delivery = Delivery::new("pull_request", &fork_event(action, head, by));
    assert_eq!(delivery.send(&r.api(), SECRET), (202, "queued\n".into()));
    delivery
}

/// The labels the receiver holds, as `by:allowed` lines.
fn labels(r: &Receiver) -> String {
    psql(&r.admin_url("nx"), "SELECT string_agg(labeled_by || ':' || allowed, ',') FROM fork_preview_labels").unwrap()
}

/// The fork-preview job of the templates for commit `head`: the action on
/// `pull_request_target`, with the job's OIDC token and no key.
fn fork_run(r: &Receiver, issuer: &Issuer, head: &str, binary: &Path) -> Run {
    let env = issuer.job_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run_action_with(r, "", "pull_request_target", &fork_event("labeled", head, "maintainer"), binary, &env)
}

/// The run failed with the `::error` annotation saying `says`.
fn refused(run: &Run, says: &str) {
    assert_eq!(run.out.code, 1, "{:?}", run.out);
    assert!(run.out.stdout.contains(says), "{says:?} missing from:\n{}", run.out.stdout);
}

/// `method path` signed with `token`, with push metadata `meta`.
fn call(r: &Receiver, token: &str, method: &str, path: &str, meta: Option<&Value>) -> (u16, Value) {
    let meta = meta.map(|m| m.to_string().into_bytes());
    let signed = Signed::new(method, path, b"{}", meta.as_deref());
    let (status, text) = send_as(&r.api(), &signed, &Credential::github_oidc(token), b"{}".to_vec());
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[test]
fn a_forks_pull_request_is_previewed_only_at_the_commit_a_writer_labeled() {
    let issuer = Issuer::start();
    let gh = FakeGitHub::start();
    let (r, key) = receiver(&issuer, &gh);
    r.nx_ok(&["env", "set", "--app", "web", "GREETING=the app's secret"]);
    let goweb = fixtures::go(Go::Static);
    issuer.next(Mint::with(&[("event_name", "pull_request_target".into())]));
    let (head, later) = (sha(), sha());

    // Without `[preview] forks = "label"`, such a token is refused as before.
    refused(
        &fork_run(&r, &issuer, &head, &goweb),
        "tokens of pull_request_target runs are never trusted as workflows: they run with the base repository's \
         rights on code a pull request may have written; deploy from push, pull_request or workflow_dispatch runs, \
         or let the app preview forks' pull requests a maintainer labels (`[preview] forks = \"label\"`)",
    );
    // The job runs the fork's code: the action takes no key there (a usage
    // error, exit 2).
    let keyed =
        run_action_with(&r, &key, "pull_request_target", &fork_event("labeled", &head, "maintainer"), &goweb, &[]);
    assert_eq!(keyed.out.code, 2, "{:?}", keyed.out);
    assert!(
        keyed.out.stdout.starts_with(
            "::error title=NX Sandbox push failed::a pull_request_target run must not be given a key (input `key`, \
             NX_KEY): a fork's code runs in this job"
        ),
        "{}",
        keyed.out.stdout
    );
    // Letting fork previews in is part of the trust: the app's own deploy
    // key cannot, nor name another label.
    for args in [&["apps", "set", "web", "--preview-forks", "label"][..], &["apps", "set", "web", "--fork-label", "ok"]]
    {
        let by_key = r.nx_with_key(&key, args);
        assert_eq!(by_key.code, 1, "{by_key:?}");
        assert!(
            by_key.stderr.contains(
                "letting forks' pull requests be previewed (`[preview] forks`, `fork_label`) needs the admin token"
            ),
            "{}",
            by_key.stderr
        );
    }
    r.nx_ok(&["apps", "set", "web", "--preview-forks", "label"]);

    // Not labeled yet.
    let not_labeled = |sha: &str| {
        format!(
            "pull request #{PR} at commit {sha} is not labeled \"nx-preview\" for a preview of app web: someone with \
             write access to the repository adds that label once they have read the commit"
        )
    };
    refused(&fork_run(&r, &issuer, &head, &goweb), &not_labeled(&head));

    // Labeled by someone GitHub says may only read: refused, saying so.
    label(&r, "labeled", &head, "reader");
    eventually(20, "the reader's label to be recorded", || (labels(&r) == "reader:false").then_some(()));
    refused(
        &fork_run(&r, &issuer, &head, &goweb),
        &format!(
            "the label \"nx-preview\" on commit {head} of pull request #{PR} was added by @reader, who has read \
             permission on {REPO}: only a label from someone with write, maintain or admin permission opts a fork's \
             pull request in"
        ),
    );

    // Removed, and added by a writer: the labeled commit is previewed.
    gh.set_permission("maintainer", "write");
    let first_removal = label(&r, "unlabeled", &head, "maintainer");
    eventually(20, "the label to be withdrawn", || labels(&r).is_empty().then_some(()));
    let writers = label(&r, "labeled", &head, "maintainer");
    eventually(20, "the writer's label to be recorded", || (labels(&r) == "maintainer:true").then_some(()));
    // The token names no pull request: a run somebody else started (another
    // pull request's, a re-run) does not ride on this label.
    refused(
        &fork_run(&r, &issuer, &head, &goweb),
        &format!(
            "the label \"nx-preview\" on commit {head} of pull request #{PR} was added by @maintainer, and this run \
             was started by @octocat: only the run the label started pushes its preview"
        ),
    );
    issuer.next(Mint::with(&[("event_name", "pull_request_target".into()), ("actor", "maintainer".into())]));
    let run = fork_run(&r, &issuer, &head, &goweb);
    assert_eq!(run.out.code, 0, "{:?}\n{}", run.out, r.log());
    // Each label serves one push.
    refused(
        &fork_run(&r, &issuer, &head, &goweb),
        &format!(
            "the label \"nx-preview\" on commit {head} of pull request #{PR} has served its push already: each \
             label previews once"
        ),
    );
    let id = run.outputs["deployment-id"].clone();
    assert!(run.summary.contains(&format!("| pull request | #{PR} |")), "{}", run.summary);
    let listing = r.nx_ok(&["--json", "ls", "web"]).json();
    let d = listing[0]["deployments"].as_array().unwrap().iter().find(|d| d["id"] == id.as_str()).unwrap().clone();
    assert_eq!((d["pr"].as_i64(), d["git_sha"].as_str()), (Some(PR), Some(head.as_str())));
    assert_eq!(d["github"]["event_name"], "pull_request_target");
    assert_eq!(d["production"], false);
    assert!(d["database"].as_str().is_some_and(|db| db.starts_with("prv_")), "a database of its own: {d}");
    let data = d["limits"].as_array().unwrap().iter().find(|l| l["limit"] == "data").unwrap().clone();
    assert_eq!(data["by"], "an empty read-only /data (a fork's preview)");
    // None of the app's variables: the default greeting, not the secret.
    assert_eq!(r.get(&run.outputs["preview-url"]).body, "goweb\n");
    // Reported on the pull request, in the linked repository, with no
    // Promote button on its check run.
    eventually(20, "the commit status of the fork's head", || {
        gh.calls_to("POST", &format!("/repos/{REPO}/statuses/{head}")).pop()
    });
    let check = eventually(20, "the check run of the fork's head", || {
        gh.calls_to("POST", &format!("/repos/{REPO}/check-runs"))
            .into_iter()
            .find(|c| c.body["head_sha"] == head.as_str())
    });
    assert_eq!(check.body["external_id"], id.as_str());
    assert_eq!(check.body["actions"], json!([]), "a fork's preview offers no Promote button");

    // The same token does nothing else: each refused with the same answer.
    let token = issuer.token(&r.api());
    let only_a_preview = json!({ "error": "a pull_request_target run's OIDC token may only push a preview of the head commit of a fork's pull request that a maintainer labeled, to the app that previews it; it cannot promote, roll back, stop, configure, read the app or its database, or act on another app", "credential": true });
    for (method, path) in [
        ("POST", format!("/v1/apps/web/deployments/{id}/promote")),
        ("POST", format!("/v1/apps/web/deployments/{id}/stop")),
        ("POST", "/v1/apps/web/rollback".to_owned()),
        ("PUT", "/v1/apps/web/settings".to_owned()),
        ("GET", "/v1/apps/web".to_owned()),
        ("GET", "/v1/apps/web/env".to_owned()),
        ("GET", "/v1/apps/web/db".to_owned()),
        ("GET", "/v1/apps".to_owned()),
    ] {
        assert_eq!(call(&r, &token, method, &path, None), (403, only_a_preview.clone()), "{method} {path}");
    }
    // A push for production, or for a commit nobody labeled, is refused
    // before its binary is read.
    let production = json!({ "git_sha": head });
    assert_eq!(
        call(&r, &token, "POST", "/v1/apps/web/deployments", Some(&production)),
        (
            403,
            json!({ "error": "a pull_request_target run's OIDC token pushes only a preview of a fork's pull request, and this push names no pull request; production is deployed by runs of the production branch" })
        )
    );
    refused(&fork_run(&r, &issuer, &later, &goweb), &not_labeled(&later));
    // Nor does anyone else make it production.
    let promoted = r.nx(&["promote", &id, "--app", "web"]);
    assert_eq!(promoted.code, 1, "{promoted:?}");
    assert!(
        promoted.stderr.contains(&format!(
            "deployment {id} is a preview of pull request #{PR} from a fork, pushed by a pull_request_target run: it never becomes production"
        )),
        "{}",
        promoted.stderr
    );
    let apps = r.nx_ok(&["--json", "apps", "ls"]).json();
    assert_ne!(apps[0]["production"], id.as_str());

    // Removing the label withdraws it and stops the preview, even with the
    // pull request's time of the first removal (GitHub's times have whole
    // seconds: both can fall in one); the writer's label replayed under a
    // new delivery id brings nothing back.
    let at = serde_json::from_slice::<Value>(&first_removal.body).unwrap()["pull_request"]["updated_at"].clone();
    let removal = Delivery::new(
        "pull_request",
        &with(fork_event("unlabeled", &head, "maintainer"), &[("/pull_request/updated_at", at)]),
    );
    assert_eq!(removal.send(&r.api(), SECRET), (202, "queued\n".into()));
    eventually(20, "the preview to stop", || (state_of(&r, &id) == "stopped").then_some(()));
    assert_eq!(labels(&r), "");
    let replay = Delivery::new("pull_request", &serde_json::from_slice::<Value>(&writers.body).unwrap());
    assert_eq!(replay.send(&r.api(), SECRET), (202, "queued\n".into()));
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(labels(&r), "", "a replayed label opts nothing in");
    refused(&fork_run(&r, &issuer, &head, &goweb), &not_labeled(&head));

    // A pull request that closes takes its labels with it.
    label(&r, "labeled", &head, "maintainer");
    eventually(20, "the label to be recorded again", || (labels(&r) == "maintainer:true").then_some(()));
    let closed = Delivery::new(
        "pull_request",
        &with(fork_event("closed", &head, "maintainer"), &[("/pull_request/state", "closed".into())]),
    );
    assert_eq!(closed.send(&r.api(), SECRET), (202, "queued\n".into()));
    eventually(20, "the closed pull request's labels to go", || labels(&r).is_empty().then_some(()));
    refused(&fork_run(&r, &issuer, &head, &goweb), &not_labeled(&head));
}
