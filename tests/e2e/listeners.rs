//! The receiver's own listeners under a hostile client: heads, bodies and
//! SSH logins that never finish are cut at their deadlines, one address
//! cannot take every connection, and one address trickling webhook bodies
//! does not keep GitHub's deliveries out.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nx_e2e::github::{payload, Delivery};
use nx_e2e::receiver::Options;
use nx_e2e::signed::Signed;
use nx_e2e::Receiver;

use crate::router::connect_from;

/// Everything the server sends until it closes the connection, and how long
/// that took. A reset counts as a close: what was read before it is kept.
fn until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    stream.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection was not closed within {within:?} ({e}); got {:?}", text(&got)),
        }
    }
    (got, started.elapsed())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether `elapsed` is the deadline `expected`, generously: not before it
/// (less a margin for the clocks) and well within a loaded machine's delay.
fn at_deadline(elapsed: Duration, expected: Duration) -> bool {
    elapsed >= expected - Duration::from_millis(300) && elapsed < expected + Duration::from_secs(8)
}

/// The answer to a health request, or `None` when the connection is closed
/// (or reset, as a refusal of a request already sent is) without one.
fn answer(stream: &mut TcpStream) -> Option<String> {
    stream.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(0) => None,
        Ok(n) => Some(text(&buf[..n])),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => None,
        Err(e) => panic!("no answer to a health request within 10 s: {e}"),
    }
}

fn health(stream: &mut TcpStream) -> String {
    answer(stream).expect("an answer")
}

#[test]
fn api_heads_and_json_bodies_that_never_finish_are_cut_at_their_deadlines() {
    const HEAD: Duration = Duration::from_secs(2);
    const BODY: Duration = Duration::from_secs(2);
    let r = Receiver::start_with(Options {
        args: vec!["--api-header-timeout".into(), "2s".into(), "--api-body-timeout".into(), "2s".into()],
        ..Options::default()
    });
    let port = r.api_port;

    // Half a head, then nothing: closed at the header deadline, unanswered.
    let mut half = connect_from([127, 0, 0, 1], port);
    half.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n").unwrap();
    let (got, took) = until_closed(&mut half, HEAD * 6);
    assert_eq!(text(&got), "", "a half head gets no answer");
    assert!(at_deadline(took, HEAD), "closed after {took:?}, the deadline is {HEAD:?}");

    // A head trickled a byte every 200 ms (which keeps a per-read timeout
    // happy for ever): cut at the same deadline, counted from the accept.
    let mut trickled = connect_from([127, 0, 0, 1], port);
    let mut writer = trickled.try_clone().unwrap();
    let started = Instant::now();
    std::thread::spawn(move || {
        for b in b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a')) {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let (got, _) = until_closed(&mut trickled, HEAD * 6);
    assert_eq!(text(&got), "", "a trickled head gets no answer");
    assert!(at_deadline(started.elapsed(), HEAD), "closed after {:?}", started.elapsed());

    // A keep-alive connection left idle after its answer: closed at the same
    // deadline (it is also the idle timeout).
    let mut idle = connect_from([127, 0, 0, 1], port);
    let answer = health(&mut idle);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    let (got, took) = until_closed(&mut idle, HEAD * 6);
    assert_eq!(text(&got), "");
    assert!(at_deadline(took, HEAD), "idle connection closed after {took:?}");

    // A signed JSON call whose body stops arriving: 408 at the body deadline,
    // through the API's error shape.
    r.create_app("web");
    let body = br#"{"set":{"GREETING":"hello"},"unset":[]}"#;
    let s = Signed::new("PATCH", "/v1/apps/web/env", body, None);
    let mut head = format!("PATCH /v1/apps/web/env HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in s.headers(&r.admin_token) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut slow = connect_from([127, 0, 0, 1], port);
    slow.write_all(head.as_bytes()).unwrap();
    let started = Instant::now();
    for b in &body[..5] {
        slow.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let (got, _) = until_closed(&mut slow, BODY * 6);
    let got = text(&got);
    assert!(got.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{got}");
    assert!(
        got.ends_with(r#"{"error":"the request body did not arrive whole within 2s (--api-body-timeout)"}"#),
        "{got}"
    );
    assert!(at_deadline(started.elapsed(), BODY), "answered after {:?}", started.elapsed());
    // Nothing of it was applied, and the API still serves.
    assert!(!r.nx_ok(&["env", "ls", "--app", "web"]).stdout.contains("GREETING"));
    assert!(health(&mut connect_from([127, 0, 0, 1], port)).starts_with("HTTP/1.1 200 OK"));
}

/// `n` API connections from `from`, each answered once (so each is known to
/// hold its place), kept open.
fn held_api(from: [u8; 4], port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = connect_from(from, port);
            let answer = health(&mut s);
            assert!(answer.starts_with("HTTP/1.1 200 OK"), "connection {i} from {from:?}: {answer}");
            s
        })
        .collect()
}

/// Whether a new connection from `from` is closed before anything is read.
fn refused(from: [u8; 4], port: u16) -> bool {
    let mut s = connect_from(from, port);
    let _ = s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
    let (got, _) = until_closed(&mut s, Duration::from_secs(5));
    got.is_empty()
}

#[test]
fn one_address_holds_its_share_of_api_connections_and_others_are_served_up_to_the_cap() {
    // The receiver inherits a soft open-file limit below its hard one (each
    // test runs in its own process: only this one's children see it).
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard).unwrap();
    // A cap of 20: each address may hold 16 (the share's floor).
    let r = Receiver::start_with(Options {
        args: vec!["--api-max-connections".into(), "20".into(), "--api-header-timeout".into(), "60s".into()],
        ..Options::default()
    });
    let port = r.api_port;
    // Its open-file limit was raised to the hard limit: connections within
    // the caps cannot use up the descriptors sandbox starts need.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", r.pid().unwrap())).unwrap();
    let files: Vec<&str> =
        limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().collect();
    assert_eq!((files[3], files[4]), (&*hard.to_string(), &*hard.to_string()), "{limits}");
    let mut mine = held_api([127, 0, 0, 1], port, 16);
    assert!(refused([127, 0, 0, 1], port), "127.0.0.1's 17th connection is closed unanswered");
    // Loopback is not exempt, but another address is another client.
    let theirs = held_api([127, 0, 0, 2], port, 4);
    // 20 open: the cap, whoever asks next.
    assert!(refused([127, 0, 0, 3], port), "a 21st connection is closed unanswered");
    // A closed connection gives its place back.
    drop(mine.pop());
    // Refused (closed unanswered) until the receiver has seen the close.
    nx_e2e::eventually(10, "a freed place to be taken", || {
        let mut s = connect_from([127, 0, 0, 3], port);
        answer(&mut s)?.starts_with("HTTP/1.1 200 OK").then_some(())
    });
    // Those held are still served.
    for mut s in mine.into_iter().chain(theirs) {
        assert!(health(&mut s).starts_with("HTTP/1.1 200 OK"));
    }
}

#[test]
fn an_ssh_client_that_never_logs_in_is_disconnected_at_the_login_deadline() {
    const LOGIN: Duration = Duration::from_secs(3);
    let r = Receiver::start_with(Options {
        args: vec!["--sftp-auth-timeout".into(), "3s".into(), "--sftp-max-connections".into(), "20".into()],
        ..Options::default()
    });
    let port = r.sftp_port;

    // Silent after connecting: the server's greeting, then the end.
    let mut silent = connect_from([127, 0, 0, 1], port);
    let (got, took) = until_closed(&mut silent, LOGIN * 6);
    let got = text(&got);
    assert!(got.starts_with("SSH-2.0-") && got.ends_with("\r\n") && got.lines().count() == 1, "{got:?}");
    assert!(at_deadline(took, LOGIN), "closed after {took:?}");

    // Greets back and stops in the key exchange (where russh would not
    // send a disconnect): closed at the deadline and its grace second.
    let mut stalled = connect_from([127, 0, 0, 1], port);
    stalled.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap();
    let (got, took) = until_closed(&mut stalled, LOGIN * 6);
    assert!(text(&got).contains("curve25519-sha256"), "the server's key exchange offer came: {:?}", text(&got));
    assert!(at_deadline(took, LOGIN + Duration::from_secs(1)), "closed after {took:?}");

    // A real SSH client that finishes the key exchange and never
    // authenticates: told why, at the deadline.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (reason, took) = runtime.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let config = std::sync::Arc::new(russh::client::Config::default());
        let started = Instant::now();
        let client = Disconnected(Some(tx));
        let _ssh = russh::client::connect(config, ("127.0.0.1", port), client).await.unwrap();
        let reason = tokio::time::timeout(LOGIN * 6, rx).await.expect("disconnected").unwrap();
        (reason, started.elapsed())
    });
    assert_eq!(reason, "not logged in within 3s");
    assert!(at_deadline(took, LOGIN), "disconnected after {took:?}");
    drop(runtime);

    // Connections beyond one address's share get no greeting at all; another
    // address still does.
    let greeted = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).is_ok() && &buf == b"SSH-2.0-"
    };
    let held: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = connect_from([127, 0, 0, 1], port);
            assert!(greeted(&mut s));
            s
        })
        .collect();
    let mut extra = connect_from([127, 0, 0, 1], port);
    let (got, _) = until_closed(&mut extra, Duration::from_secs(5));
    assert_eq!(text(&got), "", "the 17th connection from one address is closed before the greeting");
    assert!(greeted(&mut connect_from([127, 0, 0, 2], port)), "another address is greeted");
    drop(held);
}

/// An SSH client that trusts any host key and tells why it was disconnected.
struct Disconnected(Option<tokio::sync::oneshot::Sender<String>>);

impl russh::client::Handler for Disconnected {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _key: &russh::keys::PublicKey) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn disconnected(&mut self, reason: russh::client::DisconnectReason<Self::Error>) -> Result<(), Self::Error> {
        let said = match reason {
            russh::client::DisconnectReason::ReceivedDisconnect(info) => info.message,
            russh::client::DisconnectReason::Error(e) => format!("error: {e}"),
        };
        if let Some(tx) = self.0.take() {
            let _ = tx.send(said);
        }
        Ok(())
    }
}

/// Starts a webhook delivery from `from` with a well-formed but bogus
/// signature, announcing 1000 bytes and sending 10.
fn trickled_delivery(from: [u8; 4], port: u16) -> TcpStream {
    let mut s = connect_from(from, port);
    let head = format!(
        "POST /v1/github/webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nX-GitHub-Event: ping\r\n\
         X-GitHub-Delivery: bogus\r\nX-Hub-Signature-256: sha256={}\r\n\r\n{{\"zen\": \"",
        "0".repeat(64)
    );
    s.write_all(head.as_bytes()).unwrap();
    s
}

#[test]
fn one_address_trickling_webhook_bodies_does_not_keep_githubs_deliveries_out() {
    const SECRET: &str = "listeners-webhook-secret";
    let r = Receiver::start_with(Options {
        args: vec!["--github-webhook-secret".into(), SECRET.into()],
        ..Options::default()
    });
    let port = r.api_port;
    let started = Instant::now();
    let mut holder = trickled_delivery([127, 0, 0, 1], port);
    std::thread::sleep(Duration::from_millis(300));
    // The same address's second slow delivery finds its share taken.
    let mut second = trickled_delivery([127, 0, 0, 1], port);
    let (got, _) = until_closed(&mut second, Duration::from_secs(5));
    let got = text(&got);
    assert!(got.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{got}");
    assert!(got.contains("4 deliveries are being read already (1 at most from one address)"), "{got}");

    // A real delivery from another address is read and answered.
    let ping = Delivery::new("ping", &payload("ping"));
    let mut real = connect_from([127, 0, 0, 2], port);
    let head = format!(
        "POST /v1/github/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         X-GitHub-Event: ping\r\nX-GitHub-Delivery: {}\r\nX-Hub-Signature-256: {}\r\nConnection: close\r\n\r\n",
        ping.body.len(),
        ping.id,
        ping.signature(SECRET)
    );
    real.write_all(head.as_bytes()).unwrap();
    real.write_all(&ping.body).unwrap();
    let (got, _) = until_closed(&mut real, Duration::from_secs(10));
    let got = text(&got);
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("\r\n\r\npong\n"), "{got}");

    // The trickler loses its place at the deadline for 1000 bytes (10 s)...
    let (got, _) = until_closed(&mut holder, Duration::from_secs(30));
    let got = text(&got);
    assert!(got.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{got}");
    assert!(got.ends_with(r#"{"error":"the delivery's 1000 bytes did not arrive within 10s"}"#), "{got}");
    assert!(at_deadline(started.elapsed(), Duration::from_secs(10)), "after {:?}", started.elapsed());
    // ...and its address may deliver again.
    assert_eq!(Delivery::new("ping", &payload("ping")).send(&r.api(), SECRET), (200, "pong\n".into()));
}

#[test]
fn a_20_mb_push_and_a_graceful_stop_still_work_under_short_api_deadlines() {
    let mut r = Receiver::start_with(Options {
        args: vec!["--api-header-timeout".into(), "1s".into(), "--api-body-timeout".into(), "1s".into()],
        ..Options::default()
    });
    // An upload is not a JSON body: --upload-timeout bounds it, not the
    // one-second JSON deadline. Random padding after the program: 20 MB.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("goweb-20mb");
    let mut bytes = std::fs::read(nx_e2e::fixtures::go(nx_e2e::fixtures::Go::Static)).unwrap();
    let padding = 20_000_000 - bytes.len();
    bytes.extend((0..padding).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]));
    std::fs::write(&big, &bytes).unwrap();
    std::fs::set_permissions(&big, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    r.create_app("web");
    let d = r.push("web", &big, &[]);
    assert_eq!(d["state"], "healthy", "{d}");

    // A stop with a client in the middle of a head: the receiver still
    // stops cleanly, and the client is closed unanswered.
    let mut half = connect_from([127, 0, 0, 1], r.api_port);
    half.write_all(b"GET /v1/health HTTP/1.1\r\n").unwrap();
    let status = r.stop_with(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "{status}");
    let (got, _) = until_closed(&mut half, Duration::from_secs(5));
    assert_eq!(text(&got), "");
    r.start_again();
}
