//! Log drains: an app's output, its events and the router's access lines for
//! it reach a real rsyslog over TLS and an HTTPS sink exactly as shipped, a
//! platform-wide drain gets them too, URLs are never echoed with their
//! credentials, a deploy key manages its own app's drains only, and a drain
//! that is down drops its oldest records with a count while the app keeps
//! answering.

use nx_e2e::drains::{HttpsSink, Rsyslog};
use nx_e2e::fixtures::{self, Go};
use nx_e2e::receiver::{free_port, Options};
use nx_e2e::{eventually, tls, Receiver};
use std::time::Duration;

/// The receiver's `/metrics` text.
fn scrape(metrics: &str) -> String {
    reqwest::blocking::get(format!("http://{metrics}/metrics")).unwrap().text().unwrap()
}

/// One sample of a scrape, by its exact name and labels.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The RFC 5424 message's fields after the timestamp: `HOSTNAME APP PROCID MSGID SD MSG`.
fn after_timestamp(message: &str) -> Option<(&str, &str)> {
    let (pri, rest) = message.split_once(' ')?;
    let (_, rest) = rest.split_once(' ')?;
    Some((pri, rest))
}

/// Listens on `port` of loopback and passes on what a drain writes there.
fn syslog_listener(port: u16) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else { return };
        let mut buf = [0u8; 64 << 10];
        while let Ok(n @ 1..) = std::io::Read::read(&mut conn, &mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn drains_ship_app_output_events_and_access_lines_to_syslog_over_tls_and_https() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = tls::self_signed(certs.path(), &["localhost"]);
    let rsyslog = Rsyslog::start(&cert, &key);
    let sink = HttpsSink::start(&cert, &key);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut r = Receiver::start_with(Options {
        args: vec![
            "--drain-allow-loopback".into(),
            "--drain-ca".into(),
            cert.display().to_string(),
            "--drain-buffer".into(),
            "200".into(),
            "--metrics-listen".into(),
            metrics.clone(),
        ],
        ..Options::default()
    });
    let web_key = r.create_app("web");
    r.create_app("site");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned();

    // The app's deploy key adds its own app's drains; the URL's secrets never come back.
    let tls_drain = r
        .nx_with_key(
            &web_key,
            &["--json", "drains", "add", "web", &format!("syslog+tls://localhost:{}", rsyslog.tls_port)],
        )
        .success()
        .json();
    assert_eq!(tls_drain["url"], format!("syslog+tls://localhost:{}", rsyslog.tls_port));
    let secret_url = format!("https://user:s3cret@localhost:{}/ingest?token=s3cret", sink.port);
    let https_drain = r.nx_with_key(&web_key, &["--json", "drains", "add", "web", &secret_url]).success().json();
    let shown = format!("https://***@localhost:{}/ingest?***", sink.port);
    assert_eq!(https_drain["url"], shown);
    let listed = r.nx_with_key(&web_key, &["drains", "ls", "web"]).success();
    assert!(listed.stdout.contains(&shown) && !listed.stdout.contains("s3cret"), "{}", listed.stdout);

    // Not another app's, not the platform's.
    let other = r.nx_with_key(&web_key, &["drains", "add", "site", "syslog+tcp://localhost:1"]);
    assert_eq!(other.code, 1);
    let web_key_id = web_key.split('_').nth(1).unwrap();
    assert!(
        other.stderr.contains(&format!(
            "the key {web_key_id} belongs to app 'web' and cannot act on app 'site'; use that app's deploy key"
        )),
        "{}",
        other.stderr
    );
    let platform = r.nx_with_key(&web_key, &["drains", "add", "--platform", "syslog+tcp://localhost:1"]);
    assert_eq!(platform.code, 1);
    assert!(platform.stderr.contains("this needs the admin token"), "{}", platform.stderr);
    // Plain http is refused, saying what to write.
    let plain = r.nx(&["drains", "add", "web", "http://localhost:1/x"]);
    assert!(
        plain.stderr.contains("the drain URL's scheme is \"http\"; write syslog+tls://HOST:PORT"),
        "{}",
        plain.stderr
    );
    // With loopback allowed, private networks and cloud metadata stay closed.
    for (url, addr, why) in [
        ("https://169.254.169.254/latest/meta-data", "169.254.169.254", "whatever the receiver allows"),
        ("syslog+tcp://[fd00:ec2::254]:514", "fd00:ec2::254", "whatever the receiver allows"),
        ("syslog+tcp://10.0.0.1:514", "10.0.0.1", "unless the operator starts the receiver with --drain-allow-private"),
    ] {
        let refused = r.nx_with_key(&web_key, &["drains", "add", "web", url]);
        assert_eq!(refused.code, 1, "{url}");
        assert!(
            refused
                .stderr
                .contains(&format!("reaches {addr}, which is not a public address; drains may not go there {why}")),
            "{}",
            refused.stderr
        );
    }

    // The admin's platform-wide drain (plain TCP) gets every app's records.
    let platform_drain = r
        .nx(&["--json", "drains", "add", "--platform", &format!("syslog+tcp://127.0.0.1:{}", rsyslog.tcp_port)])
        .success()
        .json();
    assert_eq!(platform_drain["app"], serde_json::Value::Null);

    let d = r.push("web", &fixtures::go(Go::Static), &[]);
    let id = d["id"].as_str().unwrap().to_owned();
    let base = d["preview_url"].as_str().unwrap().trim_end_matches('/').to_owned();
    // The drains find a new deployment up to a second after it started;
    // what it printed before, from its start on, is shipped all the same.
    assert_eq!(r.get(&format!("{base}/print?text=hello-drain-1")).status, 200);
    let healthy = eventually(30, "the deployment's start in the HTTPS drain", || {
        sink.lines().into_iter().find(|l| l["message"].as_str().is_some_and(|m| m.starts_with("[nx] healthy on ")))
    });
    assert_eq!(healthy["deployment"], id.as_str());

    // rsyslog: the app's line, once from the app's TLS drain and once from the platform's TCP drain.
    let app_line = format!("{hostname} web {id} app - hello-drain-1");
    let found = eventually(30, "the app's line twice in rsyslog", || {
        let lines: Vec<String> = rsyslog.messages();
        let hits: Vec<String> =
            lines.iter().filter(|m| after_timestamp(m).is_some_and(|(_, rest)| rest == app_line)).cloned().collect();
        (hits.len() == 2).then_some(hits)
    });
    for m in &found {
        assert_eq!(after_timestamp(m).unwrap().0, "<14>1", "{m}");
    }
    let access = eventually(30, "the access line in rsyslog", || {
        rsyslog.messages().into_iter().find(|m| {
            after_timestamp(m).is_some_and(|(_, rest)| {
                rest.starts_with(&format!("{hostname} web {id} access - ")) && rest.contains(" GET /print 200 ")
            })
        })
    });
    assert!(access.contains(" request_id="), "{access}");
    // The HTTPS drain's add event reached the TLS drain, masked.
    let event = format!(
        "{hostname} web - event - drain.add by key:{web_key_id}@web {{\"drain\":\"{}\",\"url\":\"{shown}\"}}",
        https_drain["id"].as_str().unwrap()
    );
    eventually(30, "the drain.add event in rsyslog", || {
        rsyslog
            .messages()
            .iter()
            .any(|m| after_timestamp(m).is_some_and(|(pri, rest)| pri == "<13>1" && rest == event))
            .then_some(())
    });

    // HTTPS: the same app line as NDJSON, POSTed to the URL with its query.
    let line = eventually(30, "the app's line in the HTTPS sink", || {
        sink.lines().into_iter().find(|l| l["message"] == "hello-drain-1")
    });
    assert_eq!(line["app"], "web");
    assert_eq!(line["deployment"], id.as_str());
    assert_eq!(line["source"], "app");
    let access = eventually(30, "the access line in the HTTPS sink", || {
        sink.lines().into_iter().find(|l| l["source"] == "access" && l["access"]["path"] == "/print")
    });
    assert_eq!(access["access"]["status"], 200);
    assert_eq!(access["access"]["app"], "web");
    assert!(sink.lines().iter().all(|l| l["app"] == "web"), "only web's records reach web's drain");
    let (target, content_type) = sink.posts()[0].clone();
    assert_eq!((target.as_str(), content_type.as_str()), ("/ingest?token=s3cret", "application/x-ndjson"));
    assert!(!rsyslog.messages().iter().any(|m| m.contains("s3cret")), "a drain's secret reached a log");

    // A drain that is down: its queue holds 200 records, drops the oldest
    // with a count, and the app keeps answering.
    let down_port = free_port();
    let down =
        r.nx(&["--json", "drains", "add", "web", &format!("syslog+tcp://127.0.0.1:{down_port}")]).success().json();
    let down_id = down["id"].as_str().unwrap().to_owned();
    for n in 0..200 {
        assert_eq!(r.get(&format!("{base}/print?text=down-{n}")).status, 200, "request {n}");
    }
    let labels = format!("{{drain=\"{down_id}\",app=\"web\"}}");
    // Nothing reached it; what it took is dropped or waiting, the queue
    // full. The counters are read one by one while records still arrive
    // (the burst's access lines come in batches), so the test waits for a
    // scrape taken after the last of them.
    let consistent = |text: &str| {
        let series = |name: &str| sample(text, &format!("{name}{labels}")).unwrap_or(-1.0);
        let dropped = series("nx_drain_dropped_total");
        dropped >= 200.0
            && (series("nx_drain_waiting"), series("nx_drain_sent_total"), series("nx_drain_up")) == (200.0, 0.0, 0.0)
            && series("nx_drain_records_total") == dropped + 200.0
    };
    let text = eventually(30, "the down drain's drops in /metrics", || {
        let text = scrape(&metrics);
        consistent(&text).then_some(text)
    });
    let tls_labels = format!("{{drain=\"{}\",app=\"web\"}}", tls_drain["id"].as_str().unwrap());
    assert_eq!(sample(&text, &format!("nx_drain_dropped_total{tls_labels}")), Some(0.0), "{text}");
    // The up drains got every line of the burst.
    eventually(30, "the burst's last line in rsyslog over TLS", || {
        let last = format!("{hostname} web {id} app - down-199");
        (rsyslog.messages().iter().filter(|m| after_timestamp(m).is_some_and(|(_, rest)| rest == last)).count() == 2)
            .then_some(())
    });
    assert_eq!(r.get(&format!("{base}/print?text=still-here")).status, 200);

    // The receiver restarts (an upgrade) while the drain is down: what its
    // queue held is kept and reaches the drain once it is up.
    r.restart();
    assert!(r.log().contains("kept a drain's records for the next start"), "{}", r.log());
    let received = syslog_listener(down_port);
    let last = format!("{hostname} web {id} app - down-199");
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains(&last) {
        match received.recv_timeout(Duration::from_secs(30)) {
            Ok(bytes) => got.extend(bytes),
            Err(e) => {
                panic!("{e}: the kept records never reached the drain; it got {:?}", String::from_utf8_lossy(&got))
            }
        }
    }
    assert!(r.log().contains("took back a drain's records kept at the last stop"), "{}", r.log());

    // Removed: nothing more is shipped to it, and it leaves /metrics.
    r.nx(&["drains", "rm", "web", &down_id]).success();
    eventually(10, "the removed drain gone from /metrics", || {
        sample(&scrape(&metrics), &format!("nx_drain_records_total{labels}")).is_none().then_some(())
    });
    let gone = r.nx(&["drains", "rm", "web", &down_id]);
    assert!(gone.stderr.contains(&format!("app 'web' has no log drain {down_id}")), "{}", gone.stderr);
}

/// A drain is a channel its adder keeps: revoking a leaked deploy key, or
/// rotating it away, removes the drains it added (the event names them),
/// and leaves those anyone else added.
#[test]
fn revoking_or_rotating_a_deploy_key_removes_the_drains_it_added_and_only_those() {
    let r = Receiver::start_with(Options { args: vec!["--drain-allow-loopback".into()], ..Options::default() });
    let leaked = r.create_app("web");
    let leaked_id = leaked.split('_').nth(1).unwrap().to_owned();
    let theirs = r.nx_with_key(&leaked, &["--json", "drains", "add", "web", "syslog+tcp://127.0.0.1:1"]).success();
    let theirs = theirs.json()["id"].as_str().unwrap().to_owned();
    let admins = r.nx_ok(&["--json", "drains", "add", "web", "syslog+tcp://127.0.0.1:2"]).json()["id"].clone();
    // The admin's drain is not the key's to remove: a leaked key would
    // silence the app's record off the host before acting.
    let refused = r.nx_with_key(&leaked, &["drains", "rm", "web", admins.as_str().unwrap()]);
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains(&format!(
            "log drain {} was added by the admin key, and only the admin key removes it",
            admins.as_str().unwrap()
        )),
        "{}",
        refused.stderr
    );

    r.nx_ok(&["keys", "revoke", "web", &leaked_id]);
    let left = r.nx_ok(&["--json", "drains", "ls", "web"]).json();
    let ids: Vec<&serde_json::Value> = left.as_array().unwrap().iter().map(|d| &d["id"]).collect();
    assert_eq!(ids, [&admins], "{left}");
    let events = r.nx_ok(&["--json", "events", "--app", "web"]).json();
    let revoked = events.as_array().unwrap().iter().find(|e| e["kind"] == "key.revoke").unwrap().clone();
    assert_eq!(revoked["detail"]["drains_removed"], serde_json::json!([theirs]), "{revoked}");

    // A rotation retires the key as a revocation does.
    let second = r.nx_ok(&["--json", "keys", "create", "web"]).json();
    let (second_key, second_id) =
        (second["secret"].as_str().unwrap().to_owned(), second["info"]["id"].as_str().unwrap().to_owned());
    let theirs = r.nx_with_key(&second_key, &["--json", "drains", "add", "web", "syslog+tcp://127.0.0.1:3"]).success();
    let theirs = theirs.json()["id"].as_str().unwrap().to_owned();
    r.nx_ok(&["keys", "rotate", "web", &second_id]);
    let left = r.nx_ok(&["--json", "drains", "ls", "web"]).json();
    let ids: Vec<&serde_json::Value> = left.as_array().unwrap().iter().map(|d| &d["id"]).collect();
    assert_eq!(ids, [&admins], "{left}");
    let events = r.nx_ok(&["--json", "events", "--app", "web"]).json();
    let rotated = events.as_array().unwrap().iter().find(|e| e["kind"] == "key.rotate").unwrap().clone();
    assert_eq!(rotated["detail"]["drains_removed"], serde_json::json!([theirs]), "{rotated}");
    assert_eq!(rotated["detail"]["replaces"], second_id.as_str(), "{rotated}");
}
