//! Who may promote from GitHub, and what a webhook may be made to do twice.
//! GitHub's example payloads, signed as GitHub signs them, approve and click
//! as people with read, write and admin permission (the fake GitHub answers
//! the collaborator permission, review list and team membership endpoints
//! with GitHub's published examples); each approval or click that does not
//! count says why on the deployment's check run and in the log. Deliveries
//! are taken once, replays under new delivery ids do nothing new, and a full
//! queue answers 503 with Retry-After.

use nx_e2e::fixtures::{self, Go};
use nx_e2e::github::{payload, summary, with, Call, Delivery, FakeGitHub};
use nx_e2e::receiver::psql;
use nx_e2e::{eventually, Receiver};

use crate::github::{
    button, linked_app, production, pull_request, receiver, review, run_action, run_action_with, sha, REPO, SECRET,
};

/// The first note on a check run (`PATCH .../check-runs/N` with an output)
/// whose text contains `needle`.
fn note(gh: &FakeGitHub, needle: &str) -> Call {
    eventually(20, &format!("a check run saying {needle:?}"), || {
        gh.calls_to("PATCH", &format!("/repos/{REPO}/check-runs/*"))
            .into_iter()
            .find(|c| c.body["output"]["summary"].as_str().is_some_and(|t| t.contains(needle)))
    })
}

/// Submits `reviewer`'s approval (review `id`) of commit `commit` of pull
/// request `pr`, opened by `author`.
fn approve(r: &Receiver, pr: i64, id: i64, reviewer: &str, author: &str, commit: &str) -> (u16, String) {
    Delivery::new("pull_request_review", &review(pr, id, reviewer, author, commit, "approved")).send(&r.api(), SECRET)
}

/// Waits for deployment `id` (`what`) to be production.
fn wait_production(r: &Receiver, id: &str, what: &str) {
    eventually(20, &format!("{what} to be production"), || (production(r).as_deref() == Some(id)).then_some(()));
}

fn queued() -> (u16, String) {
    (202, "queued\n".into())
}

/// How many production deployments the receiver reported on GitHub: one per
/// promotion.
fn promotions(gh: &FakeGitHub) -> usize {
    gh.calls_to("POST", &format!("/repos/{REPO}/deployments"))
        .iter()
        .filter(|c| c.body["environment"] == "production")
        .count()
}

#[test]
fn only_approvals_from_writers_on_the_previewed_commit_and_not_the_author_promote() {
    let gh = FakeGitHub::start();
    let r = receiver(&gh, &["--github-token", "ghp_test_token"]);
    let key = linked_app(&r);
    r.nx_ok(&["apps", "set", "web", "--promote-on", "approval"]);
    gh.set_permission("reader", "read");
    gh.set_permission("author", "admin");
    gh.set_permission("writer", "write");
    let goweb = fixtures::go(Go::Static);
    let (old_sha, head_sha) = (sha(), sha());
    let old = run_action(&r, &key, "pull_request", &pull_request("pull_request.opened", 12, &old_sha), &goweb);
    assert_eq!(old.out.code, 0, "{:?}", old.out);
    let head = run_action(&r, &key, "pull_request", &pull_request("pull_request.synchronize", 12, &head_sha), &goweb);
    assert_eq!(head.out.code, 0, "{:?}", head.out);
    let head_id = head.outputs["deployment-id"].clone();

    // Someone with read permission (anyone, on a public repository).
    assert_eq!(approve(&r, 12, 501, "reader", "author", &head_sha), queued());
    let said =
        note(&gh, "@reader has read permission on nx-test/web: only approvals from write, maintain or admin count");
    assert_eq!(said.body["output"]["title"], "The approval of @reader did not promote");
    // The pull request's author, admin though they are.
    assert_eq!(approve(&r, 12, 502, "author", "author", &head_sha), queued());
    note(&gh, "@author opened #12: an author's own approval does not count (`[promote] allow_author`)");
    // A writer, on a commit that is no longer the one previewed.
    assert_eq!(approve(&r, 12, 503, "writer", "author", &old_sha), queued());
    note(
        &gh,
        &format!(
            "the approval of @writer is on commit {}, but the commit last previewed on #12 is {}; approve that one",
            &old_sha[..12],
            &head_sha[..12]
        ),
    );
    assert_eq!(production(&r), None, "none of these approvals counts");
    let log = r.log();
    for field in ["reviewer=reader", "reviewer=author", "reviewer=writer", "review=503"] {
        let line = log.lines().find(|l| l.contains("approval does not promote") && l.contains(field));
        assert!(line.is_some_and(|l| l.contains("reason=")), "no log line with {field} and its reason:\n{log}");
    }
    assert!(
        gh.calls_to("GET", &format!("/repos/{REPO}/collaborators/author/permission")).is_empty(),
        "the author's own approval is refused before GitHub is asked:\n{}",
        summary(&gh.calls())
    );

    // A writer on the previewed commit: that exact deployment is production.
    assert_eq!(approve(&r, 12, 504, "writer", "author", &head_sha), queued());
    wait_production(&r, &head_id, "the approved preview");
    assert_eq!(
        gh.calls_to("GET", &format!("/repos/{REPO}/collaborators/writer/permission")).len(),
        1,
        "asked for the approval on the previewed commit alone: the stale one is refused before"
    );
}

#[test]
fn nx_toml_can_ask_for_two_approvers_and_one_of_a_team() {
    let gh = FakeGitHub::start();
    let r = receiver(&gh, &["--github-token", "ghp_test_token"]);
    let key = linked_app(&r);
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("nx.toml");
    std::fs::write(&manifest, "[promote]\non = \"approval\"\napprovals = 2\nreviewers = [\"@nx-test/release\"]\n")
        .unwrap();
    let head_sha = sha();
    let run = run_action_with(
        &r,
        &key,
        "pull_request",
        &pull_request("pull_request.opened", 14, &head_sha),
        &fixtures::go(Go::Static),
        &[("INPUT_MANIFEST", manifest.to_str().unwrap())],
    );
    assert_eq!(run.out.code, 0, "{:?}", run.out);
    let id = run.outputs["deployment-id"].clone();
    let settings = r.nx_ok(&["--json", "apps", "ls"]).json()[0]["settings"].clone();
    assert_eq!(settings["promote_on"], "approval", "{settings}");
    assert_eq!(settings["approval"]["approvals"], 2, "{settings}");
    for writer in ["alice", "bob", "carol"] {
        gh.set_permission(writer, "write");
    }
    gh.set_team("nx-test", "release", &["carol"]);
    let short = &head_sha[..12];
    // GitHub lists each review as it is submitted.
    let submit = |id: i64, reviewer: &str| {
        gh.add_review(14, id, reviewer, "APPROVED", &head_sha);
        assert_eq!(approve(&r, 14, id, reviewer, "author", &head_sha), queued());
    };

    submit(601, "alice");
    note(&gh, &format!("1 of 2 approvals on {short} so far (@alice); `[promote] approvals` asks for 2"));
    // A reader's approval is listed but counts for nothing.
    submit(602, "reader");
    note(&gh, "@reader has read permission on nx-test/web");
    submit(603, "bob");
    note(
        &gh,
        &format!("`[promote] reviewers` asks for an approval of {short} from @nx-test/release; so far @alice, @bob"),
    );
    assert_eq!(production(&r), None, "two writers, but nobody of the release team");

    submit(604, "carol");
    wait_production(&r, &id, "the preview");
    assert_eq!(
        gh.calls_to("GET", &format!("/repos/{REPO}/collaborators/alice/permission")).len(),
        1,
        "alice's review was judged three times, GitHub asked once (per review)"
    );
    assert!(
        !gh.calls_to("GET", "/orgs/nx-test/teams/release/memberships/carol").is_empty(),
        "team membership asked of GitHub:\n{}",
        summary(&gh.calls())
    );

    // A rule nobody could meet is refused with the file named.
    std::fs::write(&manifest, "[promote]\non = \"approval\"\napprovals = 0\n").unwrap();
    let refused = run_action_with(
        &r,
        &key,
        "pull_request",
        &pull_request("pull_request.synchronize", 14, &sha()),
        &fixtures::go(Go::Static),
        &[("INPUT_MANIFEST", manifest.to_str().unwrap())],
    );
    assert_eq!(refused.out.code, 2, "{:?}", refused.out);
    let said = format!("{}{}", refused.out.stdout, refused.out.stderr);
    assert!(said.contains("nx.toml") && said.contains("[promote] approvals must be at least 1"), "{said}");
}

#[test]
fn buttons_need_write_permission_and_replayed_events_do_nothing_the_first_did_not() {
    let gh = FakeGitHub::start();
    let r = receiver(&gh, &["--github-token", "ghp_test_token"]);
    let key = linked_app(&r);
    r.nx_ok(&["apps", "set", "web", "--promote-on", "merge"]);
    gh.set_permission("writer", "write");
    let (a_sha, b_sha) = (sha(), sha());
    let goweb = fixtures::go(Go::Static);
    let a = run_action(&r, &key, "pull_request", &pull_request("pull_request.opened", 8, &a_sha), &goweb);
    let b = run_action(&r, &key, "pull_request", &pull_request("pull_request.opened", 9, &b_sha), &goweb);
    let (a, b) = (a.outputs["deployment-id"].clone(), b.outputs["deployment-id"].clone());
    let send = |d: &Delivery| d.send(&r.api(), SECRET);

    // A read user's click does nothing, and A's check run says why.
    let by_reader = Delivery::new("check_run", &button(&a, 1, &a_sha, "promote", "reader"));
    assert_eq!(send(&by_reader), queued());
    let said = note(&gh, "@reader has read permission on nx-test/web: the buttons need write, maintain or admin");
    assert_eq!(said.body["output"]["title"], "The promote button did nothing");
    assert_eq!(production(&r), None);
    assert!(r.log().lines().any(|l| l.contains("check run button refused") && l.contains("reader")), "{}", r.log());

    // A writer's click promotes; the same delivery again is ignored.
    let promote_a = Delivery::new("check_run", &button(&a, 1, &a_sha, "promote", "writer"));
    assert_eq!(send(&promote_a), queued());
    wait_production(&r, &a, "A");
    assert_eq!(send(&promote_a), (200, "duplicate delivery, ignored\n".into()));
    assert_eq!(send(&Delivery::new("check_run", &button(&b, 2, &b_sha, "promote", "writer"))), queued());
    wait_production(&r, &b, "B");
    // PR #9 merged: B, its head commit's preview, is production already.
    let merged = with(pull_request("pull_request.closed", 9, &b_sha), &[("/pull_request/merged", true.into())]);
    let merge = Delivery::new("pull_request", &merged);
    assert_eq!(send(&merge), queued());
    eventually(20, "the merge to be handled", || {
        r.log().contains("already production: nothing to promote").then_some(())
    });
    // Rolled back from B's check run by the writer.
    let rollback = Delivery::new("check_run", &button(&b, 2, &b_sha, "rollback", "writer"));
    assert_eq!(send(&rollback), queued());
    wait_production(&r, &a, "A, again");
    eventually(20, "three promotions reported", || (promotions(&gh) == 3).then_some(()));

    // Captured bodies replayed under new delivery ids: A's promotion, the
    // merge of PR #9 and the rollback would each move production again.
    for (n, captured) in [&promote_a, &merge, &rollback].into_iter().enumerate() {
        let replay = Delivery { id: format!("replayed-{n}"), ..captured.clone() };
        assert_eq!(send(&replay), queued());
    }
    eventually(20, "the three replays to be ignored", || {
        (r.log().matches("event already acted on; replay ignored").count() == 3).then_some(())
    });
    assert_eq!(production(&r).as_deref(), Some(a.as_str()));
    assert_eq!(promotions(&gh), 3, "no promotion reported again:\n{}", summary(&gh.calls()));
}

#[test]
fn a_full_webhook_queue_answers_503_with_retry_after_and_takes_the_redelivery() {
    let gh = FakeGitHub::start();
    let r = receiver(&gh, &["--github-token", "ghp_test_token", "--github-webhook-queue", "1"]);
    let key = linked_app(&r);
    gh.set_permission("writer", "write");
    let a_sha = sha();
    let a = run_action(
        &r,
        &key,
        "pull_request",
        &pull_request("pull_request.opened", 8, &a_sha),
        &fixtures::go(Go::Static),
    );
    let a = a.outputs["deployment-id"].clone();

    // The worker waits on GitHub with one click; one more delivery fills the queue.
    gh.stall(true);
    let click = Delivery::new("check_run", &button(&a, 1, &a_sha, "promote", "writer"));
    assert_eq!(click.send(&r.api(), SECRET), queued());
    eventually(20, "the worker to ask GitHub", || {
        gh.calls_to("GET", &format!("/repos/{REPO}/collaborators/writer/permission")).pop()
    });
    let installed = |id: i64| {
        let p = with(payload("installation.created"), &[("/installation/id", id.into())]);
        Delivery::new("installation", &p)
    };
    assert_eq!(installed(1).send(&r.api(), SECRET), queued());
    let refused = installed(2);
    let answer = refused.post(&r.api(), SECRET);
    assert_eq!(answer.status().as_u16(), 503);
    assert_eq!(answer.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("10"));
    let body = answer.text().unwrap();
    assert!(
        body.contains("the receiver's webhook queue is full (1 waiting); redeliver this delivery once it drains"),
        "{body}"
    );

    // GitHub answers again: the click is done, and the refused delivery,
    // redelivered (the same delivery id), is taken.
    gh.stall(false);
    wait_production(&r, &a, "the clicked preview");
    eventually(20, "the redelivery to be queued", || (refused.send(&r.api(), SECRET) == queued()).then_some(()));
    assert_eq!(refused.send(&r.api(), SECRET), (200, "duplicate delivery, ignored\n".into()));
}

#[test]
fn delivery_ids_are_kept_fourteen_days_and_events_a_month_and_older_events_are_not_acted_on() {
    let gh = FakeGitHub::start();
    let mut r = receiver(&gh, &["--github-token", "ghp_test_token"]);
    linked_app(&r);
    let count = |r: &Receiver, table: &str| psql(&r.admin_url("nx"), &format!("SELECT count(*) FROM {table}")).unwrap();
    let closed = Delivery::new("pull_request", &pull_request("pull_request.closed", 5, &sha()));
    assert_eq!(closed.send(&r.api(), SECRET), queued());
    eventually(20, "the closing to be acted on", || (count(&r, "github_events") == "1").then_some(()));

    // Fifteen days on (a restart prunes at once): the delivery id is
    // forgotten, the event is not, so the same delivery is taken and ignored.
    age(&r, "github_deliveries", "received_at", 15);
    age(&r, "github_events", "handled_at", 15);
    r.restart();
    assert_eq!(count(&r, "github_deliveries"), "0", "deliveries older than 14 days are pruned");
    assert_eq!(count(&r, "github_events"), "1", "events are kept a month");
    assert_eq!(closed.send(&r.api(), SECRET), queued());
    eventually(20, "the replay to be ignored", || {
        r.log().contains("event already acted on; replay ignored").then_some(())
    });

    // A month on, the event is forgotten too; an event that old is not acted
    // on at all, whatever its delivery id.
    age(&r, "github_events", "handled_at", 31);
    r.restart();
    assert_eq!(count(&r, "github_events"), "0", "events older than 30 days are pruned");
    let month_ago =
        (chrono::Utc::now() - chrono::Duration::days(31)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let old = with(body_of(&closed), &[("/pull_request/closed_at", month_ago.clone().into())]);
    assert_eq!(Delivery::new("pull_request", &old).send(&r.api(), SECRET), queued());
    eventually(20, "the old event to be ignored", || {
        r.log().contains("event older than 30 days ignored").then_some(())
    });
    assert_eq!(count(&r, "github_events"), "0", "an event not acted on is not recorded");
    // A click is as old as the check run it is on: a captured Promote click
    // replayed a month on does nothing either.
    let click =
        with(button("7kq3mz2a", 1, &sha(), "promote", "writer"), &[("/check_run/completed_at", month_ago.into())]);
    assert_eq!(Delivery::new("check_run", &click).send(&r.api(), SECRET), queued());
    eventually(20, "the old click to be ignored", || {
        (r.log().matches("event older than 30 days ignored").count() == 2).then_some(())
    });
    assert_eq!(count(&r, "github_events"), "0");
}

/// Makes every row of `table` `days` older, by its time `column`.
fn age(r: &Receiver, table: &str, column: &str, days: u32) {
    psql(&r.admin_url("nx"), &format!("UPDATE {table} SET {column} = now() - interval '{days} days'")).unwrap();
}

/// The JSON body of a delivery.
fn body_of(d: &Delivery) -> serde_json::Value {
    serde_json::from_slice(&d.body).unwrap()
}
