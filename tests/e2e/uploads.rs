//! The upload door: signatures, replays, tampering, size caps, cut uploads,
//! crashes mid-upload, full disks, S3 and its outages, retries, and keys.
//! Every refusal has its own message and leaves nothing behind.

use std::io::Read;

use nix::sys::signal::Signal;
use nx_e2e::fixtures::{self, Go};
use nx_e2e::moto::Moto;
use nx_e2e::receiver::Options;
use nx_e2e::signed::Signed;
use nx_e2e::{bin, eventually, Receiver};

/// Fails unless the receiver recorded and kept nothing: no deployment of `app`,
/// no stored artifact, no temporary upload.
fn nothing_recorded(r: &Receiver, app: &str) {
    let listing = r.nx(&["--json", "ls", app]).success().json();
    assert!(listing[0]["deployments"].as_array().unwrap().is_empty(), "a deployment was recorded: {listing}");
    let store = r.data_dir().join("store/artifacts");
    let stored = std::fs::read_dir(&store).map(|d| d.count()).unwrap_or(0);
    assert_eq!(stored, 0, "something was stored in {}", store.display());
    assert_eq!(std::fs::read_dir(r.data_dir().join("tmp")).unwrap().count(), 0, "a temporary upload was left");
    nothing_made(r);
}

/// Fails unless nothing is left of a sandbox made during an upload that
/// recorded no deployment: no process, no run or state directory, no log.
fn nothing_made(r: &Receiver) {
    let data = r.data_dir();
    let entries = |dir: &str| -> Vec<String> {
        std::fs::read_dir(data.join(dir))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    let run = format!("{}/run/", data.display());
    let left = || {
        let made: Vec<_> = nx_e2e::processes_of(&data, &[])
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(&run) || cmd.starts_with("/nx-init --go-fd"))
            .collect();
        (made, entries("run"), entries("shims"), entries("logs/deployments"))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while left() != (vec![], vec![], vec![], vec![]) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(left(), (vec![], vec![], vec![], vec![]), "left of a push that recorded nothing");
}

fn send(r: &Receiver, s: &Signed, key: &str, body: Vec<u8>) -> (u16, String) {
    nx_e2e::signed::send(&r.api(), s, key, body)
}

fn meta(json: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json).unwrap()
}

#[test]
fn forged_stale_replayed_and_tampered_requests_each_get_their_own_answer() {
    let r = Receiver::start_with(Options { args: vec!["--max-upload".into(), "4MiB".into()], ..Options::default() });
    let key = r.create_app("web");
    let body = std::fs::read(fixtures::c_musl_static()).unwrap();
    let path = "/v1/apps/web/deployments";
    let m = meta(serde_json::json!({ "filename": "hello" }));

    // Tampered body: same length, other bytes.
    let s = Signed::new("POST", path, &body, Some(&m));
    let mut other = body.clone();
    other[100] ^= 0xff;
    let (status, text) = send(&r, &s, &key, other);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("sha256") && text.contains("altered in transit"), "{text}");

    // Tampered metadata: the signature covers it.
    let s = Signed::new("POST", path, &body, Some(&m));
    let mut headers_for = s.clone();
    headers_for.meta = Some(meta(serde_json::json!({ "filename": "hello", "env": { "EVIL": "1" } })));
    let mut h = s.headers(&key);
    let forged = headers_for.headers(&key);
    let meta_header = forged.iter().find(|(k, _)| *k == "x-nx-meta").unwrap().clone();
    h.retain(|(k, _)| *k != "x-nx-meta");
    h.push(meta_header);
    let client = reqwest::blocking::Client::new();
    let mut req = client.post(format!("{}{path}", r.api())).body(body.clone());
    for (k, v) in h {
        req = req.header(k, v);
    }
    let resp = req.send().unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.text().unwrap().contains("signature (header x-nx-signature) does not match"));

    // A timestamp from ten minutes ago.
    let mut s = Signed::new("POST", path, &body, Some(&m));
    s.timestamp -= 600;
    let (status, text) = send(&r, &s, &key, body.clone());
    assert_eq!(status, 401);
    assert!(text.contains("away from the receiver's clock"), "{text}");

    // A replay: the same signed request twice (a small GET, answered in full).
    let s = Signed::new("GET", "/v1/apps/web", b"", None);
    assert_eq!(send(&r, &s, &key, vec![]).0, 200);
    let (status, text) = send(&r, &s, &key, vec![]);
    assert_eq!(status, 401);
    assert!(text.contains("already used") && text.contains("replay"), "{text}");

    // A key that does not exist, and a missing header.
    let s = Signed::new("GET", "/v1/apps/web", b"", None);
    let (status, text) = send(&r, &s, "nxk_nosuchkey1_0123456789abcdef0123456789abcdef", vec![]);
    assert_eq!(status, 401);
    assert!(text.contains("unknown key nosuchkey1"), "{text}");
    let resp = reqwest::blocking::Client::new()
        .get(format!("{}/v1/apps", r.api()))
        .header("x-nx-key", "admin")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.text().unwrap().contains("missing header x-nx-timestamp"));

    // An unknown app names the existing ones.
    let s = Signed::new("GET", "/v1/apps/wbe", b"", None);
    let (status, text) = send(&r, &s, &r.admin_token, vec![]);
    assert_eq!(status, 404);
    assert!(text.contains("did you mean 'web'"), "{text}");

    // Over the size cap: refused from Content-Length, before the body.
    let big = vec![0u8; 5 << 20];
    let s = Signed::new("POST", path, &big, Some(&m));
    let (status, text) = send(&r, &s, &key, big);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("--max-upload"), "{text}");

    nothing_recorded(&r, "web");
}

#[test]
fn a_digest_in_the_footer_is_held_to_its_own_request() {
    let binary = std::fs::read(fixtures::go(Go::Static)).unwrap();
    // The binary is exactly as large as this receiver takes: the footer is
    // not counted against the limit.
    let limit = binary.len().to_string();
    let r = Receiver::start_with(Options { args: vec!["--max-upload".into(), limit], ..Options::default() });
    let key = r.create_app("web");
    let sha = nx_protocol::auth::sha256_hex(&binary);
    let (path, len) = ("/v1/apps/web/deployments", binary.len() as u64);
    let m = meta(serde_json::json!({ "filename": "goweb" }));
    let with = |bytes: &[u8], footer: Vec<u8>| [bytes, &footer].concat();

    // A footer of another request by the same key, for the same bytes: a
    // footer vouches for its own request's body only.
    let s = Signed::with_footer("POST", path, len, Some(&m));
    let other = Signed::with_footer("POST", path, len, Some(&m));
    let (status, text) = send(&r, &s, &key, with(&binary, other.footer(&key, &sha)));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("footer is not signed with this request's key"), "{text}");

    // Bytes changed under their request's own footer.
    let s = Signed::with_footer("POST", path, len, Some(&m));
    let mut changed = binary.clone();
    changed[100] ^= 0xff;
    let (status, text) = send(&r, &s, &key, with(&changed, s.footer(&key, &sha)));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("altered in transit"), "{text}");

    // A byte more than the limit, refused from the signed length.
    let s = Signed::with_footer("POST", path, len + 1, Some(&m));
    let (status, text) = send(&r, &s, &key, with(&[binary.as_slice(), b"x"].concat(), s.footer(&key, &sha)));
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("--max-upload"), "{text}");

    // A body too short to end in a footer.
    let mut s = Signed::with_footer("POST", path, 0, Some(&m));
    s.content_length = 100;
    let (status, text) = send(&r, &s, &key, vec![b'0'; 100]);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("are not a footer"), "{text}");

    // A call that takes JSON: its body is checked whole, against a digest
    // in its head.
    let body = br#"{"name":"other"}"#;
    let mut s = Signed::with_footer("POST", "/v1/apps", 0, None);
    s.content_length = body.len() as u64;
    let (status, text) = send(&r, &s, &r.admin_token, body.to_vec());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("is for uploads"), "{text}");
    assert!(!r.nx_ok(&["apps", "ls"]).stdout.contains("other"), "no app was made");
    nothing_recorded(&r, "web");

    // Its own footer: deployed, and stored under the binary's digest, footer
    // not included.
    let s = Signed::with_footer("POST", path, len, Some(&m));
    let (status, text) = send(&r, &s, &key, with(&binary, s.footer(&key, &sha)));
    assert_eq!(status, 201, "{text}");
    let info: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((info["state"].as_str(), info["digest"].as_str()), (Some("healthy"), Some(sha.as_str())), "{info}");
    assert_eq!(std::fs::read(r.data_dir().join("store/artifacts").join(&sha)).unwrap(), binary);
}

/// A stand-in for a receiver in front of a real one: what its `/v1/target`
/// says of footers is the test's, every request is passed on, each push's
/// signed digest and body length are recorded, and `/v1/target` requests
/// counted.
#[derive(Debug)]
struct Relay {
    api: String,
    footers: bool,
    pushes: std::sync::Mutex<Vec<(String, usize)>>,
    targets: std::sync::atomic::AtomicUsize,
}

async fn relay(
    req: hyper::Request<hyper::body::Incoming>,
    relay: std::sync::Arc<Relay>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
    if parts.method == hyper::Method::POST && path.ends_with("/deployments") {
        let signed = parts.headers.get("x-nx-content-sha256").and_then(|v| v.to_str().ok()).unwrap_or("");
        relay.pushes.lock().unwrap().push((signed.to_owned(), body.len()));
    }
    let mut out = reqwest::Client::new().request(parts.method.clone(), format!("{}{path}", relay.api)).body(body);
    for (name, value) in parts.headers.iter().filter(|(n, _)| *n != hyper::header::HOST) {
        out = out.header(name, value);
    }
    let answer = out.send().await.expect("the receiver answers");
    let status = answer.status();
    let mut text = answer.bytes().await.unwrap_or_default();
    if path == "/v1/target" {
        relay.targets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut target: serde_json::Value = serde_json::from_slice(&text).unwrap();
        if relay.footers {
            assert_eq!(target["digest_in_footer"], true, "this receiver takes footers: {target}");
        } else {
            target.as_object_mut().unwrap().remove("digest_in_footer");
        }
        text = serde_json::to_vec(&target).unwrap().into();
    }
    Ok(hyper::Response::builder().status(status.as_u16()).body(http_body_util::Full::new(text)).unwrap())
}

#[test]
fn nx_sends_the_digest_after_the_bytes_only_to_a_receiver_that_takes_it() {
    let r = Receiver::start();
    let key = r.create_app("web");
    let binary = fixtures::go(Go::Static);
    let bytes = std::fs::read(&binary).unwrap();
    let sha = nx_protocol::auth::sha256_hex(&bytes);
    // A project whose build is a copy of the binary: `nx push DIR` asks
    // the target for its build and then pushes without asking again.
    let project = tempfile::tempdir().unwrap();
    let build = format!("build = \"cp {} goweb\"\nbinary = \"goweb\"\n", binary.display());
    std::fs::write(project.path().join("nx.toml"), build).unwrap();
    let (file, dir) = (binary.to_str().unwrap(), project.path().to_str().unwrap());
    for (footers, signed, len) in [(true, "footer", bytes.len() + 128), (false, sha.as_str(), bytes.len())] {
        let api = r.api();
        let (server, seen) = nx_e2e::server::serve(
            |_| Relay { api, footers, pushes: Default::default(), targets: Default::default() },
            relay,
        );
        for args in [&[file][..], &[file, "--skip-verify"][..], &[dir][..]] {
            let mut nx = r.nx_command(&key);
            nx.env("NX_SERVER", &server.url).args(["--json", "push", "--app", "web"]).args(args);
            let out = nx_e2e::receiver::NxOutput::from(nx_e2e::exec::output(&mut nx).unwrap()).success();
            let deployment = &out.json()["deployment"];
            assert_eq!((deployment["state"].as_str(), deployment["digest"].as_str()), (Some("healthy"), Some(&*sha)));
            let pushes = std::mem::take(&mut *seen.pushes.lock().unwrap());
            assert_eq!(pushes, [(signed.to_owned(), len)], "footers: {footers}, {args:?}");
            let targets = seen.targets.swap(0, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(targets, 1, "the target is asked once a push: footers: {footers}, {args:?}");
        }
    }
}

/// Sends the head of a push to `app` signed with `key` and the first half of
/// its body, and returns the connection, still open.
fn half_upload(r: &Receiver, app: &str, key: &str, body: &[u8], meta: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let s = Signed::new("POST", &format!("/v1/apps/{app}/deployments"), body, Some(meta));
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", r.api_port)).unwrap();
    let mut head = format!("POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n", s.path, body.len());
    for (k, v) in s.headers(key) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body[..body.len() / 2]).unwrap();
    stream
}

#[test]
fn a_cut_upload_and_a_crash_mid_upload_leave_nothing_and_the_push_then_works() {
    let mut r = Receiver::start();
    r.create_app("web");
    let binary = fixtures::go(Go::Static);
    let body = std::fs::read(&binary).unwrap();
    let m = meta(serde_json::json!({ "filename": "goweb" }));

    // Half the body, then the connection closes.
    let mut stream = half_upload(&r, "web", &r.admin_token, &body, &m);
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    eventually(10, "the cut upload to be cleaned up", || {
        (std::fs::read_dir(r.data_dir().join("tmp")).unwrap().count() == 0).then_some(())
    });
    nothing_recorded(&r, "web");

    // Half the body, then the receiver dies.
    let stream = half_upload(&r, "web", &r.admin_token, &body, &m);
    eventually(10, "the upload to reach the disk", || {
        let tmp: Vec<_> = std::fs::read_dir(r.data_dir().join("tmp")).unwrap().flatten().collect();
        tmp.iter().any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false)).then_some(())
    });
    r.stop_with(Signal::SIGKILL);
    drop(stream);
    r.start_again();
    nothing_recorded(&r, "web");
    let d = r.push("web", &binary, &[]);
    assert_eq!(d["state"], "healthy");
}

/// The status and the error message of the answer on `stream`, read until
/// its body is complete.
fn answer(stream: &mut std::net::TcpStream) -> (u16, String) {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(120))).unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, body) = loop {
        let n = stream.read(&mut chunk).unwrap_or_else(|e| panic!("no answer: {e}"));
        assert!(n > 0, "the connection closed without an answer: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(body) {
                break (head.to_owned(), json);
            }
        }
    };
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    (status, body["error"].as_str().unwrap_or_else(|| panic!("{body}")).to_owned())
}

/// The uploads in progress: files in the receiver's temporary directory.
fn in_progress(r: &Receiver) -> usize {
    std::fs::read_dir(r.data_dir().join("tmp")).unwrap().count()
}

#[test]
fn one_app_cannot_take_every_upload_place_and_a_stalled_upload_is_cut_off() {
    // Four places, two per app: web's stalled uploads alone could otherwise take them all.
    let args = ["--max-concurrent-uploads", "4", "--max-uploads-per-app", "2", "--upload-timeout", "30s"];
    let r = Receiver::start_with(Options { args: args.map(String::from).to_vec(), ..Options::default() });
    let web = r.create_app("web");
    let api = r.create_app("api");
    let body = std::fs::read(fixtures::c_musl_static()).unwrap();
    let m = meta(serde_json::json!({ "filename": "hello" }));

    // web's deploy key: two pushes that stop halfway, then a third.
    let mut stalled: Vec<_> = (0..2).map(|_| half_upload(&r, "web", &web, &body, &m)).collect();
    eventually(10, "both stalled uploads to hold their places", || (in_progress(&r) == 2).then_some(()));
    let third = Signed::new("POST", "/v1/apps/web/deployments", &body, Some(&m));
    let (status, text) = send(&r, &third, &web, body.clone());
    assert_eq!(status, 429, "{text}");
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        error["error"],
        "2 uploads to web are in progress, the most one app may have at once; push again once one has finished (or raise --max-uploads-per-app on the receiver)"
    );
    // api, with its own key, pushes meanwhile.
    let goweb = fixtures::go(Go::Static);
    let pushed = r.nx_with_key(&api, &["--json", "push", goweb.to_str().unwrap(), "--app", "api"]);
    assert_eq!(pushed.json()["deployment"]["state"], "healthy", "{pushed:?}");
    assert_eq!(in_progress(&r), 2, "web's stalled uploads still held their places");

    // At the deadline both are cut off: 408, their files gone, nothing recorded.
    for stream in &mut stalled {
        assert_eq!(
            answer(stream),
            (
                408,
                "the upload did not finish within 30 seconds, the most this receiver gives one; nothing was kept: push again over a faster link (or raise --upload-timeout on the receiver)".to_owned()
            )
        );
    }
    eventually(10, "the stalled uploads to be removed", || (in_progress(&r) == 0).then_some(()));
    let listing = r.nx(&["--json", "ls", "web"]).success().json();
    assert!(listing[0]["deployments"].as_array().unwrap().is_empty(), "{listing}");
    let stored = std::fs::read_dir(r.data_dir().join("store/artifacts")).unwrap().count();
    assert_eq!(stored, 1, "api's binary alone is stored");
    // And web's places are back.
    let d = r.nx_with_key(&web, &["--json", "push", goweb.to_str().unwrap(), "--app", "web"]);
    assert_eq!(d.json()["deployment"]["state"], "healthy", "{d:?}");
}

#[test]
fn a_key_revoked_while_its_push_is_uploading_deploys_nothing() {
    let r = Receiver::start();
    let web = r.create_app("web");
    let key_id = web.split('_').nth(1).unwrap();
    let body = std::fs::read(fixtures::go(Go::Static)).unwrap();
    let m = meta(serde_json::json!({ "filename": "goweb" }));
    let mut stream = half_upload(&r, "web", &web, &body, &m);
    eventually(10, "the upload to begin", || (in_progress(&r) == 1).then_some(()));
    r.nx(&["keys", "revoke", "web", key_id]).success();
    std::io::Write::write_all(&mut stream, &body[body.len() / 2..]).unwrap();
    assert_eq!(
        answer(&mut stream),
        (
            401,
            format!(
                "key {key_id} was revoked, or its app removed, while its upload was in progress; nothing was deployed"
            )
        )
    );
    nothing_recorded(&r, "web");
}

#[test]
fn a_full_disk_is_a_clear_error_and_records_nothing() {
    let r = Receiver::start();
    r.create_app("web");
    let tmp = r.data_dir().join("tmp");
    let status =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&tmp).status().unwrap();
    assert!(status.success());
    let out = r.nx(&["push", bin("hello").to_str().unwrap(), "--app", "web"]);
    let _ = std::process::Command::new("umount").arg(&tmp).status();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("the server's disk is full; push again once its operator freed space"),
        "{}",
        out.stderr
    );
    // Where it filled is in the receiver's log, not told to the client.
    let data = r.data_dir().to_string_lossy().into_owned();
    assert!(!out.stderr.contains(&data), "{}", out.stderr);
    assert!(r.log().contains("an upload found the disk full"), "{}", r.log());
    nothing_recorded(&r, "web");
}

#[test]
fn the_same_bytes_are_stored_once_and_a_retried_push_gets_the_same_deployment() {
    let r = Receiver::start();
    r.create_app("web");
    let body = std::fs::read(fixtures::go(Go::Static)).unwrap();
    let m = meta(serde_json::json!({ "filename": "goweb", "push_id": "0123456789abcdef-retry" }));
    let first =
        send(&r, &Signed::new("POST", "/v1/apps/web/deployments", &body, Some(&m)), &r.admin_token, body.clone());
    let again =
        send(&r, &Signed::new("POST", "/v1/apps/web/deployments", &body, Some(&m)), &r.admin_token, body.clone());
    assert_eq!((first.0, again.0), (201, 201), "{first:?} {again:?}");
    let (a, b): (serde_json::Value, serde_json::Value) =
        (serde_json::from_str(&first.1).unwrap(), serde_json::from_str(&again.1).unwrap());
    assert_eq!(a["id"], b["id"], "a retry must not make a second deployment");
    // A new push of the same bytes is a new deployment of the same artifact.
    let third = r.push("web", &fixtures::go(Go::Static), &[]);
    assert_ne!(third["id"], a["id"]);
    assert_eq!(third["digest"], a["digest"]);
    assert_eq!(std::fs::read_dir(r.data_dir().join("store/artifacts")).unwrap().count(), 1, "stored once");
    // A push id reused for other bytes is refused.
    let other = std::fs::read(fixtures::c_musl_static()).unwrap();
    let (status, text) =
        send(&r, &Signed::new("POST", "/v1/apps/web/deployments", &other, Some(&m)), &r.admin_token, other);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("was used for other bytes"), "{text}");
}

#[test]
fn artifacts_round_trip_through_s3_with_multipart_uploads() {
    let moto = Moto::start();
    let mut r = Receiver::start_with(Options { env: moto.receiver_env(), ..Options::default() });
    r.create_app("web");
    // The example app is well over the 8 MiB part size: a multipart upload.
    let hello = bin("hello");
    assert!(std::fs::metadata(&hello).unwrap().len() > 16 << 20);
    let d = r.push("web", &hello, &[]);
    let digest = d["digest"].as_str().unwrap();
    assert!(moto.keys().contains(&format!("prefix/artifacts/{digest}")), "{:?}", moto.keys());
    assert_eq!(std::fs::read_dir(r.data_dir().join("tmp")).unwrap().count(), 0);
    // A restart without the local copy fetches it back from S3, verified.
    r.stop_with(Signal::SIGTERM);
    std::fs::remove_file(r.data_dir().join("cache").join(digest)).unwrap();
    r.start_again();
    let a = r.get(d["preview_url"].as_str().unwrap());
    assert_eq!(a.status, 200, "{a:?}\n{}", r.log());
    assert!(r.data_dir().join("cache").join(digest).exists());
}

#[test]
fn an_unavailable_store_is_a_503_and_records_nothing() {
    let mut moto = Moto::start();
    let r = Receiver::start_with(Options { env: moto.receiver_env(), ..Options::default() });
    r.create_app("web");
    moto.stop();
    let out = r.nx(&["push", fixtures::go(Go::Static).to_str().unwrap(), "--app", "web"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("object store") && out.stderr.contains("is unavailable"), "{}", out.stderr);
    let listing = r.nx(&["--json", "ls", "web"]).success().json();
    assert!(listing[0]["deployments"].as_array().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(r.data_dir().join("tmp")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(r.data_dir().join("cache")).unwrap().count(), 0);
}

#[test]
fn keys_are_created_listed_rotated_and_revoked_and_never_readable_in_the_database() {
    let r = Receiver::start();
    let web_key = r.create_app("web");
    r.create_app("api");
    let goweb = fixtures::go(Go::Static);
    let goweb = goweb.to_str().unwrap();
    let push = |key: &str, app: &str| r.nx_with_key(key, &["push", goweb, "--app", app]);

    assert_eq!(push(&web_key, "web").code, 0);
    let other_app = push(&web_key, "api");
    assert_eq!(other_app.code, 1);
    assert!(other_app.stderr.contains("cannot act on app 'api'"), "{}", other_app.stderr);

    let created = r.nx(&["--json", "keys", "create", "web"]).success().json();
    let second = created["secret"].as_str().unwrap().to_owned();
    let second_id = created["info"]["id"].as_str().unwrap().to_owned();
    assert_eq!(push(&second, "web").code, 0);
    let listed = r.nx(&["--json", "keys", "ls", "web"]).success();
    assert!(!listed.stdout.contains(&second) && !listed.stdout.contains(&web_key), "secrets are never listed");
    assert_eq!(listed.json()["deploy_keys"].as_array().unwrap().len(), 2);

    let rotated = r.nx(&["--json", "keys", "rotate", "web", &second_id]).success().json();
    let third = rotated["secret"].as_str().unwrap().to_owned();
    let refused = push(&second, "web");
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("was revoked"), "{}", refused.stderr);
    assert_eq!(push(&third, "web").code, 0);

    r.nx(&["keys", "revoke", "web", rotated["info"]["id"].as_str().unwrap()]).success();
    assert_eq!(push(&third, "web").code, 1);

    let admin = r.nx(&["--json", "keys", "rotate-admin"]).success().json();
    let new_admin = admin["secret"].as_str().unwrap().to_owned();
    assert_eq!(r.nx(&["ls"]).code, 1, "the old admin token no longer works");
    assert_eq!(r.nx_with_key(&new_admin, &["ls"]).code, 0);

    // A dump of the metadata database shows none of the secrets.
    let password = std::fs::read_to_string(r.data_dir().join("secrets/postgres-admin.password")).unwrap();
    let dump = std::process::Command::new("pg_dump")
        .args(["-h"])
        .arg(r.data_dir().join("postgres/run"))
        .args(["-p", &r.pg_port.to_string(), "-U", "nx_admin", "nx"])
        .env("PGPASSWORD", password.trim())
        .output()
        .unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("CREATE TABLE public.keys"), "the dump is real");
    for secret in [&web_key, &second, &third, &new_admin, &r.admin_token] {
        let random_part = secret.rsplit('_').next().unwrap();
        assert!(!dump.contains(random_part), "a key is readable in the dump");
    }
}
