//! nx-router: forwarding headers, hop-by-hop headers, headers named with `_`
//! and absolute-form targets, WebSocket, server-sent events, streamed bodies,
//! error pages, TLS with HTTP/2 and its bounds, the bounds on slow clients and
//! silent apps, each address's share of the connections, its state file, and
//! zero failed requests through promotions, rollbacks and router reloads, and
//! a router holding a newer table than the receiver's clock numbers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nx_e2e::fixtures::{self, Go};
use nx_e2e::load::Load;
use nx_e2e::receiver::Options;
use nx_e2e::signed::Signed;
use nx_e2e::{bin, deployment_processes, eventually, Receiver};

fn host_of(url: &str) -> String {
    url.trim_start_matches("http://").split('/').next().unwrap().to_owned()
}

/// Sends a raw HTTP/1.1 request through the router and returns the whole answer.
fn raw(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn goweb(r: &Receiver, app: &str, extra: &[&str]) -> serde_json::Value {
    r.push(app, &fixtures::go(Go::Static), extra)
}

#[test]
fn forwarding_headers_request_ids_and_hop_by_hop_headers() {
    let r = Receiver::start();
    r.create_app("web");
    let host = host_of(goweb(&r, "web", &[])["preview_url"].as_str().unwrap());
    let answer = raw(
        r.router_port,
        &format!(
            "GET /headers HTTP/1.1\r\nHost: {host}\r\nConnection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\nX-Kept: yes\r\n\r\n"
        ),
    );
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    let id = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-request-id: ").map(str::to_owned))
        .expect("a request id");
    assert_eq!(id.len(), 32);
    let body = body.to_ascii_lowercase();
    assert!(body.contains(&format!("x-request-id: {id}")), "the app sees the same id: {body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1"), "{body}");
    assert!(body.contains("x-forwarded-proto: http"), "{body}");
    assert!(body.contains(&format!("x-forwarded-host: {}", host.split(':').next().unwrap())), "{body}");
    assert!(body.contains("x-kept: yes"), "{body}");
    for hop in ["x-secret-hop", "keep-alive", "proxy-authorization"] {
        assert!(!body.contains(hop), "{hop} crossed the hop: {body}");
    }
    // Forged forwarding claims: replaced by the router's or dropped; the
    // client's request id is passed on apart, never as the router's.
    let forged = raw(
        r.router_port,
        &format!(
            "GET /headers HTTP/1.1\r\nHost: {host}\r\nX-Request-Id: mine-123\r\nX-Forwarded-For: 10.0.0.1\r\n\
             X-Forwarded-For: 10.0.0.2\r\nX-Real-IP: 10.0.0.3\r\nForwarded: for=10.0.0.4\r\nX-Forwarded-Proto: https\r\n\
             X-Forwarded-Host: admin.example\r\nX-Client-Request-Id: forged\r\nConnection: close\r\n\r\n"
        ),
    );
    let (head, body) = forged.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{forged}");
    let id = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-request-id: ").map(str::to_owned))
        .expect("a request id");
    assert_eq!(id.len(), 32, "the router's own id, not the client's: {id}");
    let echoed: Vec<String> = body
        .lines()
        .map(str::to_ascii_lowercase)
        .filter(|l| l.starts_with("x-") || l.starts_with("forwarded"))
        .collect();
    assert_eq!(
        echoed,
        [
            "x-client-request-id: mine-123".to_owned(),
            "x-forwarded-for: 127.0.0.1".into(),
            format!("x-forwarded-host: {}", host.split(':').next().unwrap()),
            "x-forwarded-proto: http".into(),
            "x-real-ip: 127.0.0.1".into(),
            format!("x-request-id: {id}"),
        ]
    );
}

#[test]
fn underscored_headers_are_dropped_and_absolute_targets_reach_the_app_in_origin_form() {
    let r = Receiver::start();
    r.create_app("web");
    let host = host_of(goweb(&r, "web", &[])["preview_url"].as_str().unwrap());
    let name = host.split(':').next().unwrap();
    let app_saw = |request: String| {
        let answer = raw(r.router_port, &request);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
        body.lines().map(str::to_ascii_lowercase).filter(|l| !l.starts_with("x-request-id: ")).collect::<Vec<_>>()
    };
    // Without Host: routed by the target's host, which the app gets as Host
    // and X-Forwarded-Host; the target arrives in origin-form. Headers named
    // with `_` (which Go, CGI and others fold into their `-` twins) are gone.
    let seen = app_saw(format!(
        "GET http://{host}/headers?x=1 HTTP/1.1\r\nX_Forwarded_For: 10.0.0.1\r\nX_Real_IP: 10.0.0.2\r\n\
         X-Forwarded_Host: admin.example\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(
        seen,
        [
            format!("host: {name}"),
            "uri: /headers?x=1".into(),
            "x-forwarded-for: 127.0.0.1".into(),
            format!("x-forwarded-host: {name}"),
            "x-forwarded-proto: http".into(),
            "x-real-ip: 127.0.0.1".into(),
        ]
    );
    // With the same Host: origin-form too, the client's Host kept.
    let seen = app_saw(format!("GET http://{host}/headers HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"));
    assert_eq!(seen[..2], [format!("host: {host}"), "uri: /headers".into()]);
    assert!(seen.contains(&format!("x-forwarded-host: {name}")), "{seen:?}");
    // A target naming another host than Host: refused, nothing forwarded.
    let answer = raw(
        r.router_port,
        &format!("GET http://other.localhost/headers HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[test]
fn websockets_and_server_sent_events_pass_through_unbuffered() {
    let r = Receiver::start();
    r.create_app("web");
    let host = host_of(goweb(&r, "web", &[])["preview_url"].as_str().unwrap());

    // WebSocket: an upgrade and a round trip of messages.
    let stream = TcpStream::connect(("127.0.0.1", r.router_port)).unwrap();
    let request = tungstenite::http::Request::builder()
        .uri(format!("ws://{host}/ws"))
        .header("Host", &host)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", tungstenite::handshake::client::generate_key())
        .body(())
        .unwrap();
    let (mut socket, response) = tungstenite::client(request, stream).unwrap();
    assert_eq!(response.status().as_u16(), 101);
    for word in ["hello", "again"] {
        socket.send(tungstenite::Message::text(word)).unwrap();
        let reply = socket.read().unwrap();
        assert_eq!(reply.to_text().unwrap(), format!("echo: {word}"));
    }
    socket.close(None).unwrap();

    // SSE: the first event must arrive while the app still holds the response
    // open; a buffering proxy would sit on it until the end.
    let mut sse = TcpStream::connect(("127.0.0.1", r.router_port)).unwrap();
    sse.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    sse.write_all(format!("GET /sse HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut reader = BufReader::new(sse);
    let mut seen = String::new();
    while !seen.contains("data: one") {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended before the first event: {seen}");
        seen.push_str(&line);
    }
    assert!(!seen.contains("data: two"));
    let released = raw(r.router_port, &format!("GET /release HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"));
    assert!(released.contains("released"), "{released}");
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    assert!(rest.contains("data: two"), "{rest}");
}

#[test]
fn request_bodies_are_streamed_and_broken_upstreams_get_clear_pages() {
    let r = Receiver::start_with(Options { args: vec!["--restart-backoff".into(), "3s".into()], ..Options::default() });
    r.create_app("web");
    let d = goweb(&r, "web", &[]);
    let url = d["preview_url"].as_str().unwrap();
    let host = host_of(url);
    // 64 MiB in chunks the router must pass on as they come.
    let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![7u8; 1 << 20]));
    let body = reqwest::blocking::Body::new(ChunkReader { chunks: Box::new(chunks), current: Vec::new(), at: 0 });
    let resp = reqwest::blocking::Client::new()
        .post(format!("http://127.0.0.1:{}/count", r.router_port))
        .header("Host", &host)
        .body(body)
        .send()
        .unwrap();
    assert_eq!(resp.text().unwrap().trim(), (64u64 << 20).to_string());

    // The app dies: the page says it is not answering (or restarting).
    for (pid, cmd) in deployment_processes(&r.data_dir(), d["id"].as_str().unwrap()) {
        if cmd.starts_with("/app/") {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        }
    }
    let page = eventually(10, "the app to be gone", || {
        let a = r.get(url);
        (a.status != 200).then_some(a)
    });
    assert!(page.status == 502 || page.status == 503, "{page:?}");
    assert!(page.body.contains(d["id"].as_str().unwrap()), "the page names the deployment: {}", page.body);
    eventually(30, "the restart", || (r.get(url).status == 200).then_some(()));
}

/// A blocking reader over a sequence of chunks, so reqwest streams the body.
struct ChunkReader {
    chunks: Box<dyn Iterator<Item = std::io::Result<Vec<u8>>> + Send>,
    current: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.chunks.next() {
                Some(c) => {
                    self.current = c?;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Sends a raw request on a new connection and returns the answer and how
/// long it took.
fn timed(port: u16, request: &str) -> (String, Duration) {
    let started = std::time::Instant::now();
    let answer = raw(port, request);
    (answer, started.elapsed())
}

#[test]
fn a_slow_client_a_silent_app_and_a_connection_flood_leave_other_apps_served() {
    const HEAD: Duration = Duration::from_secs(1);
    const RESPONSE: Duration = Duration::from_secs(1);
    const CAP: usize = 12;
    let r = Receiver::start_with(Options {
        args: vec![
            format!("--router-arg=--request-head-timeout={}ms", HEAD.as_millis()),
            format!("--router-arg=--upstream-response-timeout={}ms", RESPONSE.as_millis()),
            format!("--router-arg=--max-connections={CAP}"),
            format!("--router-arg=--max-connections-per-ip={CAP}"),
        ],
        ..Options::default()
    });
    r.create_app("web");
    r.create_app("other");
    let web = host_of(goweb(&r, "web", &[])["preview_url"].as_str().unwrap());
    let other = host_of(goweb(&r, "other", &[])["preview_url"].as_str().unwrap());
    let port = r.router_port;
    let other_request = format!("GET / HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n");
    let assert_other_served = || {
        let (answer, took) = timed(port, &other_request);
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("goweb\n"), "{answer}");
        assert!(took < Duration::from_millis(500), "the other app was served late: {took:?}");
    };

    // Slowloris: a header byte every 100 ms, cut at the head deadline.
    let slow = {
        let head = format!("GET / HTTP/1.1\r\nHost: {web}\r\nX-Padding: {}\r\n\r\n", "a".repeat(64));
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let started = std::time::Instant::now();
            let reader = s.try_clone().unwrap();
            let cut = std::thread::spawn(move || {
                let mut answer = String::new();
                let _ = (&reader).read_to_string(&mut answer);
                (answer, started.elapsed())
            });
            for byte in head.as_bytes() {
                if s.write_all(&[*byte]).is_err() || cut.is_finished() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            cut.join().unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_other_served();
    let (answer, elapsed) = slow.join().unwrap();
    assert_eq!(
        answer,
        "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    );
    assert!(elapsed >= HEAD && elapsed < HEAD + Duration::from_millis(500), "cut after {elapsed:?}");

    // An app that never answers: 504 at the response timeout, others served.
    let hang = std::thread::spawn(move || {
        timed(port, &format!("GET /hang HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n"))
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_other_served();
    let (answer, took) = hang.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("did not answer in time"), "{answer}");
    assert!(took >= RESPONSE && took < RESPONSE + Duration::from_millis(500), "504 after {took:?}");

    // The connection cap: CAP idle connections held, the next ones closed at
    // once, the held ones served; once the head deadline closes the idle
    // ones, new connections are served again.
    let mut held: Vec<TcpStream> = (0..CAP).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..3 {
        let mut extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
        extra.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = Vec::new();
        extra.read_to_end(&mut got).expect("a connection beyond the cap is closed at once");
        assert_eq!(got, b"", "a connection beyond the cap gets no answer");
    }
    let first = &mut held[0];
    first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    first.write_all(other_request.as_bytes()).unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "a connection within the cap is served: {answer}");
    std::thread::sleep(HEAD + Duration::from_millis(300));
    assert_other_served();
    drop(held);
}

/// A new TCP connection to the router from a loopback address of its own
/// (std cannot bind a socket before it connects; tokio can).
pub(crate) fn connect_from(from: [u8; 4], port: u16) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((from, 0).into()).unwrap();
        let stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap().into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream
    })
}

#[test]
fn one_client_address_gets_its_share_of_connections_and_a_slow_body_gets_408() {
    const SHARE: usize = 3;
    const BODY: Duration = Duration::from_secs(1);
    let r = Receiver::start_with(Options {
        args: vec![
            format!("--router-arg=--max-connections-per-ip={SHARE}"),
            format!("--router-arg=--request-body-timeout={}ms", BODY.as_millis()),
        ],
        ..Options::default()
    });
    r.create_app("web");
    let web = host_of(goweb(&r, "web", &[])["preview_url"].as_str().unwrap());
    let port = r.router_port;
    let request = format!("GET /headers HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n");
    let ask = |mut s: TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    // 127.0.0.1 holds its share; its next connection is closed at once.
    let held: Vec<TcpStream> = (0..SHARE).map(|_| connect_from([127, 0, 0, 1], port)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = connect_from([127, 0, 0, 1], port);
    extra.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = Vec::new();
    extra.read_to_end(&mut got).expect("a connection beyond the share is closed at once");
    assert_eq!(got, b"", "a connection beyond the share gets no answer");
    // 127.0.0.2 is another client: served.
    let answer = ask(connect_from([127, 0, 0, 2], port));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("X-Forwarded-For: 127.0.0.2"), "{answer}");
    // The held ones are served, and once they are gone 127.0.0.1 is again.
    for s in held {
        assert!(ask(s).starts_with("HTTP/1.1 200"));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(ask(connect_from([127, 0, 0, 1], port)).starts_with("HTTP/1.1 200"));

    // A body trickled a byte every 100 ms: 408 at the body deadline.
    let mut slow = connect_from([127, 0, 0, 1], port);
    slow.write_all(format!("POST /count HTTP/1.1\r\nHost: {web}\r\nContent-Length: 1000\r\n\r\n").as_bytes()).unwrap();
    let started = std::time::Instant::now();
    let reader = slow.try_clone().unwrap();
    let cut = std::thread::spawn(move || {
        let mut answer = String::new();
        let _ = (&reader).read_to_string(&mut answer);
        (answer, started.elapsed())
    });
    while !cut.is_finished() && slow.write_all(b"x").is_ok() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (answer, took) = cut.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{answer}");
    assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
    assert!(took >= BODY && took < BODY + Duration::from_millis(500), "408 after {took:?}");
}

#[test]
fn twenty_promotions_and_rollbacks_under_load_fail_no_request() {
    let r = Receiver::start();
    r.create_app("web");
    let a = goweb(&r, "web", &["--env", "GREETING=blue"]);
    let b = goweb(&r, "web", &["--env", "GREETING=green"]);
    let (a, b) = (a["id"].as_str().unwrap().to_owned(), b["id"].as_str().unwrap().to_owned());
    r.nx_ok(&["promote", &a]);
    let load = Load::start(r.router_port, format!("web.localhost:{}", r.router_port));
    eventually(10, "the load to run", || (load.ok.load(Ordering::Relaxed) > 50).then_some(()));
    for i in 0..20 {
        r.nx_ok(&["promote", if i % 2 == 0 { &b } else { &a }, "--app", "web"]);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, bodies) = load.finish_without_failures();
    assert_eq!(bodies, ["blue\n".to_owned(), "green\n".to_owned()].into_iter().collect(), "both versions served");
    assert!(ok > 200, "the load ran: {ok}");
}

/// The pid of the receiver's router, when exactly one runs.
fn router_pid(r: &Receiver) -> Option<i32> {
    let pids: Vec<i32> = nx_e2e::processes_of(&r.data_dir(), &[])
        .into_iter()
        .filter(|(_, c)| c.contains("nx-router"))
        .map(|(p, _)| p)
        .collect();
    (pids.len() == 1).then(|| pids[0])
}

/// `POST /v1/admin/router/reload`: a new router takes over the sockets.
fn reload_router(r: &Receiver) {
    let s = Signed::new("POST", "/v1/admin/router/reload", b"", None);
    let mut req = reqwest::blocking::Client::new().post(format!("{}/v1/admin/router/reload", r.api()));
    for (k, v) in s.headers(&r.admin_token) {
        req = req.header(k, v);
    }
    let resp = req.send().unwrap();
    assert_eq!(resp.status().as_u16(), 204, "{}", resp.text().unwrap());
}

#[test]
fn the_router_runs_unprivileged_under_seccomp_before_and_after_a_reload() {
    use std::os::unix::fs::MetadataExt;
    let r = Receiver::start();
    r.create_app("web");
    let d = goweb(&r, "web", &[]);
    let url = d["preview_url"].as_str().unwrap();
    let user = nix::unistd::User::from_name("nx-router").unwrap().expect("the receiver created nx-router");
    assert_ne!(user.uid.as_raw(), 0);
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    let mut before = None;
    for round in ["first", "reloaded"] {
        let pid = eventually(20, "one router process", || router_pid(&r).filter(|p| Some(*p) != before));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned()
        };
        assert_eq!(field("Uid:"), format!("{uid}\t{uid}\t{uid}\t{uid}"), "{round}: {status}");
        assert_eq!(field("Gid:"), format!("{gid}\t{gid}\t{gid}\t{gid}"), "{round}: {status}");
        assert_eq!(field("Groups:"), "", "{round}: no supplementary groups");
        assert_eq!(field("CapEff:"), "0000000000000000", "{round}");
        assert_eq!(field("CapPrm:"), "0000000000000000", "{round}");
        assert_eq!(field("NoNewPrivs:"), "1", "{round}");
        assert_eq!(field("Seccomp:"), "2", "{round}: a seccomp filter");
        let answer = r.get(url);
        assert_eq!(answer.status, 200, "{round}: {answer:?}");
        if before.is_none() {
            reload_router(&r);
        }
        before = Some(pid);
    }
    // The unprivileged router saved the table in its own directory; the
    // control socket stays root's, in root's directory.
    let router_dir = r.data_dir().join("router");
    let state = std::fs::metadata(router_dir.join("state/routes.json")).unwrap();
    assert_eq!((state.uid(), state.gid()), (uid, gid));
    let control = std::fs::metadata(router_dir.join("control.sock")).unwrap();
    assert_eq!((control.uid(), control.mode() & 0o777), (0, 0o600));
    let dir = std::fs::metadata(&router_dir).unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o777), (0, 0o711));
}

#[test]
fn a_router_reload_under_load_fails_no_request() {
    let r = Receiver::start();
    r.create_app("web");
    let d = goweb(&r, "web", &[]);
    r.nx_ok(&["promote", d["id"].as_str().unwrap()]);
    let router_pid = || router_pid(&r);
    let load = Load::start(r.router_port, format!("web.localhost:{}", r.router_port));
    eventually(10, "the load to run", || (load.ok.load(Ordering::Relaxed) > 50).then_some(()));
    for _ in 0..3 {
        let before = eventually(20, "one router process", &router_pid);
        reload_router(&r);
        eventually(20, "the old router to hand over and exit", || router_pid().filter(|p| *p != before));
        let seen = load.ok.load(Ordering::Relaxed);
        eventually(10, "requests through the new router", || {
            (load.ok.load(Ordering::Relaxed) > seen + 50).then_some(())
        });
    }
    load.finish_without_failures();
}

#[test]
fn tls_terminates_with_http2() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = nx_e2e::tls::self_signed(dir.path(), &["localhost", "web.localhost"]);
    let tls_port = nx_e2e::receiver::free_port();
    let r = Receiver::start_with(Options {
        args: vec![
            "--router-tls-listen".into(),
            format!("127.0.0.1:{tls_port}"),
            "--router-tls-cert".into(),
            cert.display().to_string(),
            "--router-tls-key".into(),
            key.display().to_string(),
            "--router-arg=--tls-handshake-timeout=1s".into(),
            "--router-arg=--h2-max-streams=4".into(),
            "--router-arg=--request-head-timeout=1s".into(),
            "--router-arg=--client-idle-timeout=2s".into(),
        ],
        ..Options::default()
    });
    r.create_app("web");
    r.nx_ok(&["promote", goweb(&r, "web", &[])["id"].as_str().unwrap()]);
    // HTTP/2 (pingora's proxy) and HTTP/1.1 (the router's own loop) over TLS.
    for (http1_only, version) in [(false, reqwest::Version::HTTP_2), (true, reqwest::Version::HTTP_11)] {
        let mut builder = reqwest::blocking::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap())
            .resolve("web.localhost", ([127, 0, 0, 1], tls_port).into());
        if http1_only {
            builder = builder.http1_only();
        }
        let client = builder.build().unwrap();
        let resp = client.get(format!("https://web.localhost:{tls_port}/headers")).send().unwrap();
        assert_eq!(resp.version(), version);
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["x-request-id"].len(), 32);
        let body = resp.text().unwrap().to_ascii_lowercase();
        assert!(body.contains("x-forwarded-proto: https"), "{version:?}: {body}");
        assert!(body.contains("x-forwarded-for: 127.0.0.1"), "{version:?}: {body}");
    }
    // A client that starts no handshake is closed at the handshake timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    silent.read_to_end(&mut got).expect("closed by the router, not by the read timeout");
    let waited = started.elapsed();
    assert_eq!(got, b"");
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(2), "closed after {waited:?}");
    // HTTP/2 (TLS with ALPN h2, OpenSSL's client): no preface, closed at the
    // head deadline (1 s); the preface and empty settings, then nothing,
    // closed at the idle timeout (2 s). Either way the router sent its own
    // SETTINGS frame first, and ended the connection without TLS close_notify.
    let hello = [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat();
    for (sent, bound) in [(&b""[..], Duration::from_secs(1)), (&hello[..], Duration::from_secs(2))] {
        let started = std::time::Instant::now();
        let mut client = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{tls_port}"), "-alpn", "h2", "-quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Its stdin stays open: only the router can end the connection.
        let mut stdin = client.stdin.take().unwrap();
        stdin.write_all(sent).unwrap();
        eventually(10, "openssl s_client to end", || client.try_wait().unwrap());
        let took = started.elapsed();
        let mut stdout = Vec::new();
        client.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
        let mut stderr = String::new();
        client.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert_eq!(stdout.get(3), Some(&4), "a SETTINGS frame first: {stdout:02x?}");
        assert!(stderr.contains("unexpected eof while reading"), "{stderr}");
        assert!(took >= bound && took < bound + Duration::from_millis(1500), "{sent:?}: closed after {took:?}");
        drop(stdin);
    }
}

#[test]
fn the_router_restores_its_table_at_boot_and_guards_its_control_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in backend.incoming().flatten() {
            let mut s = s;
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nrestored");
        }
    });
    let state = dir.path().join("routes.json");
    let table = serde_json::json!({
        "generation": 5,
        "routes": { "saved.localhost": { "app": "saved", "deployment": "abcdefgh", "target": { "kind": "live", "addr": backend_addr.to_string() } } }
    });
    std::fs::write(&state, table.to_string()).unwrap();
    let port = nx_e2e::receiver::free_port();
    let control = dir.path().join("run/control.sock");
    let mut router = std::process::Command::new(bin("nx-router"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--control")
        .arg(&control)
        .arg("--state")
        .arg(&state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let answer = eventually(20, "the router to serve", || {
        let a = std::panic::catch_unwind(|| {
            raw(port, "GET / HTTP/1.1\r\nHost: saved.localhost\r\nConnection: close\r\n\r\n")
        })
        .ok()?;
        (!a.is_empty()).then_some(a)
    });
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("restored"), "{answer}");
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the receiver's user may publish routes");
    let unknown = raw(port, "GET / HTTP/1.1\r\nHost: nope.localhost\r\nConnection: close\r\n\r\n");
    assert!(unknown.starts_with("HTTP/1.1 404") && unknown.contains("No app here"), "{unknown}");
    let _ = router.kill();
    let _ = router.wait();
}

/// `method /routes` on the router's control socket `sock`, over HTTP/1.1:
/// the status and the body.
fn control_routes(sock: &std::path::Path, method: &str, body: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} /routes HTTP/1.1\r\nHost: nx-router\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_owned())
}

#[test]
fn a_router_holding_a_newer_table_than_the_receivers_clock_gives_its_number_and_takes_the_next() {
    let r = Receiver::start();
    r.create_app("web");
    let goweb = fixtures::go(Go::Static);
    r.push("web", &goweb, &["--promote"]);
    // The router's table numbered an hour ahead of the receiver's clock, as
    // after the clock was set back an hour.
    let sock = r.data_dir().join("router/control.sock");
    let (status, body) = control_routes(&sock, "GET", "");
    assert_eq!(status, 200, "{body}");
    let mut table: serde_json::Value = serde_json::from_str(&body).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
    let ahead = now + 3_600_000_000;
    table["generation"] = ahead.into();
    assert_eq!(control_routes(&sock, "PUT", &table.to_string()).0, 204);

    // The next table the receiver sends is refused as older (409); it asks
    // the router for its number and sends the table again after it, so the
    // new preview answers.
    let preview = r.push("web", &goweb, &[]);
    assert_eq!(r.get(preview["preview_url"].as_str().unwrap()).body, "goweb\n", "{}", r.log());
    let (_, body) = control_routes(&sock, "GET", "");
    let generation = serde_json::from_str::<serde_json::Value>(&body).unwrap()["generation"].as_u64().unwrap();
    assert!(generation > ahead, "{generation} follows {ahead}");
    assert_eq!(r.get(&format!("http://web.localhost:{}/", r.router_port)).body, "goweb\n");
}
