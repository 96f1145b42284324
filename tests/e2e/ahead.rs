//! Sandboxes made during a push's upload (`--push-ready`): the push starts
//! from the one made for its deployment's id and port while its binary
//! came in, if it is the same sandbox its start asks for; a push that goes
//! no further leaves nothing of it (tests/e2e/uploads.rs checks that for
//! every refused and cut upload).

use nx_e2e::fixtures::{self, Go};
use nx_e2e::Receiver;

const USED: &str = "[nx] started from a sandbox held ready";

#[test]
fn a_push_starts_from_the_sandbox_made_during_its_upload_unless_it_is_not_the_same() {
    let r = Receiver::start();
    r.create_app("web");
    let logs = |d: &serde_json::Value| r.nx_ok(&["logs", d["id"].as_str().unwrap(), "--app", "web"]).stdout;
    let answers = |d: &serde_json::Value| {
        assert_eq!(d["state"], "healthy", "{d}");
        assert_eq!(r.get(d["preview_url"].as_str().unwrap()).body, "goweb\n");
    };

    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    answers(&d);
    assert!(logs(&d).contains(USED), "{}", logs(&d));

    // Made before its binary is in, as the app's last binary was linked:
    // a dynamic one after a static one is not the same sandbox (its /usr
    // and loader), so it starts the usual way, and the next is made right.
    let d = r.push("web", &fixtures::go(Go::Cgo), &[]);
    answers(&d);
    let said = "the sandbox made ready ahead was not used: \
                what it was made from has changed since (its sandbox's command, cgroup or limits)";
    assert!(logs(&d).contains(said), "{}", logs(&d));
    let d = r.push("web", &fixtures::go(Go::Cgo), &[]);
    answers(&d);
    assert!(logs(&d).contains(USED), "{}", logs(&d));

    // Variables pushed with it are among what it was made from.
    let d = r.push("web", &fixtures::go(Go::Cgo), &["--env", "GREETING=pushed"]);
    assert_eq!(r.get(d["preview_url"].as_str().unwrap()).body, "pushed\n");
    assert!(logs(&d).contains(USED), "{}", logs(&d));

    // A preview with a database of its own gets none: its variables are
    // known only once that database is made.
    r.nx_ok(&["apps", "set", "web", "--preview-db", "empty"]);
    let d = r.push("web", &fixtures::go(Go::Cgo), &["--pr", "7"]);
    answers(&d);
    assert!(!logs(&d).contains(USED), "{}", logs(&d));
}
