//! nx-router run on its own (as systemd runs it, the receiver started with
//! `--no-router`) and replaced by a new process with `--upgrade` under load:
//! the successor takes the sockets over, the old one drains and exits, no
//! request fails and no connection is reset (keep-alive clients and clients
//! opening a connection per request), HTTP/2 clients get GOAWAY, and a
//! successor that fails leaves the old router serving and taking tables.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nx_e2e::fixtures::{self, Go};
use nx_e2e::load::Load;
use nx_e2e::receiver::{free_port, Options};
use nx_e2e::{bin, eventually, Receiver};

/// nx-router started by hand on its own sockets, fed by a receiver started
/// with `--no-router`, in the receiver's temporary directory; its access log
/// goes into the receiver's FIFO as under systemd.
struct Standalone {
    port: u16,
    args: Vec<String>,
    dir: PathBuf,
    fifo: PathBuf,
}

impl Standalone {
    fn new(r: &Receiver, extra: &[String]) -> Standalone {
        // The receiver binds no router port: its URLs name this one.
        let port = r.router_port;
        let dir = r.dir.path().join("standalone-router");
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = vec![
            format!("--listen=127.0.0.1:{port}"),
            format!("--control={}", r.data_dir().join("router/control.sock").display()),
            format!("--state={}", dir.join("routes.json").display()),
            "--drain-timeout-secs=60".into(),
            "--threads=2".into(),
        ];
        args.extend_from_slice(extra);
        let fifo = r.data_dir().join("router/access.fifo");
        Standalone { port, args, dir, fifo }
    }

    /// Starts a router (`--upgrade` among `extra` for a successor; a flag of
    /// `extra` replaces the same one of the router's); its output goes to
    /// `name`.log in the router's directory, its access log into the
    /// receiver's FIFO, opened read-write as deploy/systemd/nx-router.service
    /// opens it.
    fn spawn(&self, name: &str, extra: &[&str]) -> Child {
        let flag = |arg: &str| arg.split('=').next().unwrap_or_default().to_owned();
        let replaced: Vec<String> = extra.iter().map(|a| flag(a)).collect();
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"fifo="$1"; shift; exec "$@" --access-log-fd 3 3<>"$fifo""#)
            .arg("sh")
            .arg(&self.fifo)
            .arg(bin("nx-router"))
            .args(self.args.iter().filter(|a| !replaced.contains(&flag(a))))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }
}

/// Kills a router left running at the end of a test, and reaps it.
fn reap(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for `child` to exit; its status.
fn exited(child: &mut Child, secs: u64, what: &str) -> std::process::ExitStatus {
    eventually(secs, what, || child.try_wait().unwrap())
}

/// A receiver without its own router, and a standalone router serving
/// `apps`, each with a promoted deployment answering `GREETING=<app>`.
fn platform(apps: &[&str], router_args: &[String]) -> (Receiver, Standalone, Child) {
    let r = Receiver::start_with(Options { args: vec!["--no-router".into()], ..Options::default() });
    let router = Standalone::new(&r, router_args);
    let first = router.spawn("first", &[]);
    eventually(20, "the standalone router to listen", || std::net::TcpStream::connect(("127.0.0.1", router.port)).ok());
    for app in apps {
        r.create_app(app);
        let d = r.push(app, &fixtures::go(Go::Static), &["--env", &format!("GREETING={app}")]);
        r.nx_ok(&["promote", d["id"].as_str().unwrap()]);
    }
    for app in apps {
        let host = format!("{app}.localhost:{}", router.port);
        let answer = eventually(20, "the standalone router to serve the app", || {
            let a = nx_e2e::http::get_host(router.port, &host, "/");
            (a.status == 200).then_some(a)
        });
        assert_eq!(answer.body, format!("{app}\n"));
    }
    (r, router, first)
}

/// Waits until `loads` have all served `more` further requests.
fn served_more(loads: &[Load], more: u64) {
    let seen: Vec<u64> = loads.iter().map(|l| l.ok.load(Ordering::Relaxed)).collect();
    eventually(20, "requests through the router", || {
        loads.iter().zip(&seen).all(|(l, s)| l.ok.load(Ordering::Relaxed) >= s + more).then_some(())
    });
}

#[test]
fn a_standalone_router_replaced_twice_under_load_on_three_apps_fails_no_request() {
    let apps = ["one", "two", "three"];
    let (r, router, mut current) = platform(&apps, &[]);
    // Per app: two keep-alive clients and one opening a connection per request.
    let loads: Vec<Load> = apps
        .iter()
        .flat_map(|app| {
            let host = format!("{app}.localhost:{}", router.port);
            [Load::start_with(router.port, host.clone(), 2, true), Load::start_with(router.port, host, 1, false)]
        })
        .collect();
    served_more(&loads, 30);
    for round in ["second", "third"] {
        let old = current.id();
        let mut next = router.spawn(round, &["--upgrade"]);
        let status = exited(&mut current, 30, "the old router to drain and exit");
        assert!(status.success(), "the old router exited with {status}: {}", router.log("first"));
        assert!(next.try_wait().unwrap().is_none(), "{round}: the successor serves: {}", router.log(round));
        assert!(!Path::new(&format!("/proc/{old}")).exists(), "{round}: the old router is gone");
        served_more(&loads, 30);
        current = next;
    }
    let log = router.log("third");
    assert!(log.contains("took over from the running router, which now drains"), "{log}");
    // Route changes reach the last successor through the same control socket.
    let d = r.push("one", &fixtures::go(Go::Static), &["--env", "GREETING=later"]);
    let preview = nx_e2e::http::get_url(router.port, d["preview_url"].as_str().unwrap());
    assert_eq!((preview.status, preview.body.as_str()), (200, "later\n"));
    let mut total = 0;
    for load in loads {
        // Any failure (a status other than 200, a reset, a refused or
        // closed connection) is listed with its cause.
        let (ok, bodies) = load.finish_without_failures();
        assert_eq!(bodies.len(), 1, "{bodies:?}");
        total += ok;
    }
    assert!(total > 500, "the load ran: {total} requests");
    // Every router's access lines reached the receiver through the FIFO
    // (what it passes on to the apps' log drains), the last one's included.
    let access = std::fs::read_to_string(r.data_dir().join("logs/router.log")).unwrap();
    for app in apps {
        assert!(access.contains(&format!(r#""host":"{app}.localhost""#)), "{app}: {access}");
    }
    assert!(access.contains(r#""path":"/","status":200"#), "{access}");
    let last = nx_e2e::http::get_host(router.port, &format!("two.localhost:{}", router.port), "/after-the-upgrades");
    assert_eq!(last.status, 200);
    eventually(10, "the last router's access line", || {
        let text = std::fs::read_to_string(r.data_dir().join("logs/router.log")).unwrap();
        text.contains(r#""path":"/after-the-upgrades""#).then_some(())
    });
    reap(current);
}

#[test]
fn a_successor_that_fails_leaves_the_old_router_serving_and_taking_tables() {
    let (r, router, mut current) = platform(&["web"], &[]);
    let host = format!("web.localhost:{}", router.port);
    let loads = [Load::start_with(router.port, host.clone(), 2, true), Load::start_with(router.port, host, 1, false)];
    served_more(&loads, 30);

    // It takes the sockets, then finds its state file older than the
    // running table, and exits.
    let stale = router.dir.join("stale.json");
    std::fs::write(&stale, r#"{"generation": 1, "routes": {}}"#).unwrap();
    let mut failed = router.spawn("stale", &["--upgrade", &format!("--state={}", stale.display())]);
    let status = exited(&mut failed, 20, "the successor to fail");
    assert_eq!(status.code(), Some(1));
    let log = router.log("stale");
    let expected = format!(
        "nx-router: error: the state file {} holds table generation 1, older than the running router's ",
        stale.display()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(log.ends_with("; give the successor the same --state\n"), "{log}");

    // HTTPS settings the running router has no socket for: refused before
    // anything is served.
    let mut tls = router.spawn("tls", &["--upgrade", "--tls-listen=127.0.0.1:1"]);
    assert_eq!(exited(&mut tls, 20, "the successor to fail").code(), Some(1));
    let log = router.log("tls");
    assert!(
        log.contains(
            "nx-router: error: the running nx-router serves no HTTPS, so it has no socket for --tls-listen; stop it and start this one without --upgrade"
        ),
        "{log}"
    );

    served_more(&loads, 30);
    assert!(current.try_wait().unwrap().is_none(), "the old router still runs: {}", router.log("first"));
    let log = router.log("first");
    assert!(log.contains("the successor did not take over; this router keeps serving"), "{log}");
    // Table changes were held during each attempt, then taken again.
    let d = r.push("web", &fixtures::go(Go::Static), &["--env", "GREETING=after"]);
    let preview = nx_e2e::http::get_url(router.port, d["preview_url"].as_str().unwrap());
    assert_eq!((preview.status, preview.body.as_str()), (200, "after\n"));
    for load in loads {
        load.finish_without_failures();
    }
    // And a good successor still takes over.
    let next = router.spawn("next", &["--upgrade"]);
    assert!(exited(&mut current, 30, "the old router to exit").success());
    assert_eq!(nx_e2e::http::get_host(router.port, &format!("web.localhost:{}", router.port), "/").status, 200);
    reap(next);
}

/// Reads HTTP/2 frames from `out` until a GOAWAY: its last stream id and error code.
fn goaway(out: &mut impl Read, settings_seen: std::sync::mpsc::Sender<()>) -> Option<(u32, u32)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, payload) = (buf[3], &buf[9..9 + len]);
            match kind {
                4 => {
                    let _ = settings_seen.send(());
                }
                7 => {
                    let word = |i: usize| u32::from_be_bytes(payload[i..i + 4].try_into().unwrap());
                    return Some((word(0) & 0x7fff_ffff, word(4)));
                }
                _ => {}
            }
            buf.drain(..9 + len);
        }
        match out.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn http2_clients_get_goaway_and_carry_on_through_an_upgrade() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = nx_e2e::tls::self_signed(certs.path(), &["web.localhost"]);
    let tls_port = free_port();
    let tls_args = vec![
        format!("--tls-listen=127.0.0.1:{tls_port}"),
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
    ];
    let (_r, router, mut current) = platform(&["web"], &tls_args);

    // A raw HTTP/2 connection (OpenSSL's client): preface, SETTINGS, and the
    // acknowledgement of the router's.
    let mut raw = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{tls_port}"), "-alpn", "h2", "-quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = raw.stdin.take().unwrap();
    stdin.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    stdin.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0]).unwrap();
    let mut stdout = raw.stdout.take().unwrap();
    let (settings_tx, settings_rx) = std::sync::mpsc::channel();
    let frames = std::thread::spawn(move || goaway(&mut stdout, settings_tx));
    settings_rx.recv_timeout(Duration::from_secs(10)).expect("the router's SETTINGS");

    // reqwest's HTTP/2 client requesting without a pause.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (stop, cert) = (stop.clone(), cert.clone());
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(cert).unwrap()).unwrap())
                .resolve("web.localhost", ([127, 0, 0, 1], tls_port).into())
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let (mut ok, mut failures) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match client.get(format!("https://web.localhost:{tls_port}/")).send() {
                    Ok(resp) if resp.status() == 200 && resp.version() == reqwest::Version::HTTP_2 => ok += 1,
                    Ok(resp) => failures.push(format!("{:?} {}", resp.version(), resp.status())),
                    Err(e) => failures.push(format!("{e:?}")),
                }
            }
            (ok, failures)
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    // The successor has the same HTTPS settings (and so may load a renewed certificate).
    let mut next = router.spawn("second", &["--upgrade"]);
    let (last_stream, code) = frames.join().unwrap().expect("a GOAWAY frame before the connection ended");
    assert_eq!(code, 0, "NO_ERROR");
    assert_eq!(last_stream, 0x7fff_ffff, "the graceful first GOAWAY: streams already sent are still served");
    // The raw client never answers the router's PING: it goes away itself.
    drop(stdin);
    let _ = raw.kill();
    let _ = raw.wait();
    // Every connection left (reqwest's after GOAWAY) long before the 60 s drain timeout.
    let status = exited(&mut current, 30, "the old router to drain and exit");
    assert!(status.success(), "{status}: {}", router.log("first"));
    assert!(started.elapsed() < Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = client.join().unwrap();
    assert!(failures.is_empty(), "{} of {} HTTP/2 requests failed: {failures:?}", failures.len(), ok);
    assert!(ok > 20, "the HTTP/2 client ran: {ok}");
    assert!(next.try_wait().unwrap().is_none(), "the successor serves: {}", router.log("second"));
    reap(next);
}

#[test]
fn the_systemd_units_verify_and_set_only_real_settings() {
    let analyze = nx_e2e::require_program("systemd-analyze", "systemd");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for (unit, binary, help) in [
        ("nx-router.service", "nx-router", &["--help"][..]),
        ("nx-receiver.service", "nx-receiver", &["serve", "--help"]),
    ] {
        let text = std::fs::read_to_string(shipped.join(unit)).unwrap();
        let help = Command::new(bin(binary)).args(help).output().unwrap();
        // Unwrapped: clap wraps its help at 100 columns.
        let help = String::from_utf8_lossy(&help.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
        // Every variable a unit sets is the fallback of one of its binary's flags.
        let set: Vec<&str> =
            text.lines().filter_map(|l| l.strip_prefix("Environment=")).map(|v| v.split('=').next().unwrap()).collect();
        assert!(set.len() >= 3, "{unit}: {set:?}");
        for name in set {
            assert!(help.contains(&format!("[env: {name}=")), "{unit} sets {name}, which {binary} does not read");
        }
        // systemd's own check, on the binaries just built.
        let here = format!("{}/", bin(binary).parent().unwrap().display());
        let path = dir.path().join(unit);
        std::fs::write(&path, text.replace("/usr/local/bin/", &here)).unwrap();
        units.push(path);
    }
    let has = |unit: &str, line: &str| {
        let text = std::fs::read_to_string(shipped.join(unit)).unwrap();
        assert!(text.lines().any(|l| l == line), "{unit} lacks {line:?}");
    };
    has(
        "nx-router.service",
        "ExecReload=/usr/bin/setsid -f /bin/sh -c 'exec /usr/local/bin/nx-router --upgrade --access-log-fd 3 \
         3<>/var/lib/nx-sandbox/router/access.fifo'",
    );
    has(
        "nx-router.service",
        "ExecStart=/bin/sh -c 'exec /usr/local/bin/nx-router --access-log-fd 3 3<>/var/lib/nx-sandbox/router/access.fifo'",
    );
    // The successor's MAINPID= comes from a process that is not the main one yet.
    has("nx-router.service", "Type=notify");
    has("nx-router.service", "NotifyAccess=all");
    has("nx-receiver.service", "Environment=NX_NO_ROUTER=true");
    has("nx-receiver.service", "KillMode=process");
    let out = Command::new(analyze).arg("verify").args(&units).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "systemd-analyze verify: {stderr}");
}
