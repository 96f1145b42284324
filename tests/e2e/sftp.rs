//! Pushing with nothing but OpenSSH: `sftp` and `scp` upload binaries into an
//! app's folder, the preview answers, the outcome sits next to the upload,
//! and everything outside the rules is refused with nothing stored.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nx_e2e::fixtures::{self, Go};
use nx_e2e::receiver::{psql, Options};
use nx_e2e::{bin, eventually, require_program, Receiver};
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};

/// An ed25519 key pair made by ssh-keygen; returns the private key's path.
pub(crate) fn keypair(dir: &Path, name: &str) -> PathBuf {
    keypair_with_passphrase(dir, name, "")
}

/// [`keypair`], the private key encrypted with `passphrase`.
fn keypair_with_passphrase(dir: &Path, name: &str, passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new(require_program("ssh-keygen", "openssh-client"))
        .args(["-q", "-t", "ed25519", "-N", passphrase, "-C", name, "-f"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    path
}

/// The options every OpenSSH client here gets: this receiver's port, this
/// key only, its own known_hosts file.
fn ssh_options(r: &Receiver, key: &Path, port_flag: &str) -> Vec<String> {
    vec![
        port_flag.into(),
        r.sftp_port.to_string(),
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", r.dir.path().join("known_hosts").display()),
        "-o".into(),
        "StrictHostKeyChecking=accept-new".into(),
        "-o".into(),
        "ConnectTimeout=10".into(),
    ]
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Runs `sftp -b` with `commands`.
fn sftp(r: &Receiver, key: &Path, commands: &str) -> Output {
    let batch = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(batch.path(), commands).unwrap();
    Command::new(require_program("sftp", "openssh-client"))
        .args(ssh_options(r, key, "-P"))
        .arg("-b")
        .arg(batch.path())
        .arg("deploy@127.0.0.1")
        .output()
        .unwrap()
}

fn scp(r: &Receiver, key: &Path, file: &Path, dest: &str) -> Output {
    Command::new(require_program("scp", "openssh-client"))
        .args(ssh_options(r, key, "-P"))
        .arg(file)
        .arg(format!("deploy@127.0.0.1:{dest}"))
        .output()
        .unwrap()
}

/// The outcome file of an upload, fetched with sftp.
fn outcome(r: &Receiver, key: &Path, remote: &str) -> String {
    let local = tempfile::NamedTempFile::new().unwrap();
    let out = sftp(r, key, &format!("get {remote} {}\n", local.path().display()));
    assert!(out.status.success(), "{}", text(&out));
    std::fs::read_to_string(local.path()).unwrap()
}

fn preview_of(outcome: &str) -> String {
    outcome
        .lines()
        .find_map(|l| l.strip_prefix("preview: "))
        .unwrap_or_else(|| panic!("no preview in {outcome}"))
        .to_owned()
}

/// Files left in the receiver's temporary upload directory.
fn leftovers(r: &Receiver) -> Vec<String> {
    std::fs::read_dir(r.data_dir().join("tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("upload-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A receiver allowing `uploads` at once (and started with `more` flags),
/// with the app `web` and an SSH key of alice's that uploads to it (in a
/// directory that lives as long as the returned handle).
fn alice_uploads_to_web(uploads: u32, more: &[&str]) -> (Receiver, tempfile::TempDir, std::path::PathBuf) {
    let mut args = vec!["--max-concurrent-uploads".to_owned(), uploads.to_string()];
    args.extend(more.iter().map(|a| a.to_string()));
    let r = Receiver::start_with(Options { args, ..Options::default() });
    let dir = tempfile::tempdir().unwrap();
    let alice = keypair(dir.path(), "alice");
    r.create_app("web");
    r.nx_ok(&["keys", "add-ssh", "web", alice.with_extension("pub").to_str().unwrap()]);
    (r, dir, alice)
}

/// Starts an upload of `file` to `dest` at 800 kbit/s with OpenSSH's sftp,
/// and returns once the receiver holds part of it.
fn slow_upload(r: &Receiver, key: &Path, file: &Path, dest: &str) -> std::process::Child {
    use std::io::Write as _;
    let mut slow = Command::new("sftp")
        .args(ssh_options(r, key, "-P"))
        .args(["-l", "800", "-b", "-", "deploy@127.0.0.1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    writeln!(slow.stdin.take().unwrap(), "put {} {dest}", file.display()).unwrap();
    eventually(20, "the slow upload to begin", || (!leftovers(r).is_empty()).then_some(()));
    slow
}

#[test]
fn sftp_and_scp_uploads_deploy_and_say_how_it_went() {
    let mut r = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let key = keypair(dir.path(), "alice");
    r.create_app("site");
    r.create_app("hello");
    let body = [
        "--arg",
        "respond",
        "--arg",
        "--listen",
        "--arg",
        "127.0.0.1:$PORT",
        "--arg",
        "--body",
        "--arg",
        "caddy over sftp",
    ];
    r.nx_ok(&[&["apps", "set", "site"][..], &body[..]].concat());
    let pubkey = key.with_extension("pub");
    for app in ["site", "hello"] {
        let added = r.nx_ok(&["keys", "add-ssh", app, pubkey.to_str().unwrap()]);
        assert!(added.stdout.contains("SHA256:"), "{}", added.stdout);
    }

    let caddy = require_program("caddy", "caddy");
    let put = sftp(&r, &key, &format!("put {} site/caddy\nls -l site\n", caddy.display()));
    assert!(put.status.success(), "{}\n{}", text(&put), r.log());
    let listing = String::from_utf8_lossy(&put.stdout).into_owned();
    assert!(listing.contains("caddy.deploy.txt") && listing.contains(" caddy\n"), "{listing}");
    let site = outcome(&r, &key, "site/caddy.deploy.txt");
    assert!(site.contains("caddy deployed to site as") && site.contains(": healthy"), "{site}");
    assert_eq!(r.get(&preview_of(&site)).body, "caddy over sftp");

    let copied = scp(&r, &key, &bin("hello"), "hello/hello");
    assert!(copied.status.success(), "{}\n{}", text(&copied), r.log());
    let hello = outcome(&r, &key, "hello/hello.deploy.txt");
    assert!(r.get(&preview_of(&hello)).body.starts_with("hello from hello"), "{hello}");

    let listed = r.nx_ok(&["--json", "ls", "site"]).json();
    assert_eq!(listed[0]["deployments"][0]["source"], "sftp");
    let actors = psql(&r.admin_url("nx"), "SELECT string_agg(actor, ',') FROM events WHERE kind = 'push'").unwrap();
    assert!(actors.contains("ssh:SHA256:"), "pushes are in the audit log by key: {actors}");

    // The host key survives a restart: the known_hosts entry still matches.
    r.restart();
    let strict = Command::new("sftp")
        .args(ssh_options(&r, &key, "-P"))
        .args(["-o", "StrictHostKeyChecking=yes", "-b", "-", "deploy@127.0.0.1"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(strict.status.success(), "{}", text(&strict));

    // A binary that cannot run: refused, with the remedy in its outcome file.
    let script = dir.path().join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let refused = sftp(&r, &key, &format!("put {} site/run.sh\n", script.display()));
    assert!(!refused.status.success(), "{}", text(&refused));
    let why = outcome(&r, &key, "site/run.sh.deploy.txt");
    assert!(why.contains("run.sh was not deployed") && why.contains("will not run"), "{why}");
}

#[test]
fn what_sftp_must_refuse_it_refuses_and_stores_nothing() {
    let r = Receiver::start_with(Options { args: vec!["--max-upload".into(), "12MiB".into()], ..Options::default() });
    let dir = tempfile::tempdir().unwrap();
    let (alice, mallory) = (keypair(dir.path(), "alice"), keypair(dir.path(), "mallory"));
    r.create_app("web");
    r.create_app("other");
    r.nx_ok(&["keys", "add-ssh", "web", alice.with_extension("pub").to_str().unwrap()]);
    let goweb = fixtures::go(Go::Static);

    // Keys not registered, and passwords, get nowhere.
    let stranger = sftp(&r, &mallory, "ls\n");
    assert!(
        !stranger.status.success() && text(&stranger).contains("Permission denied (publickey)"),
        "{}",
        text(&stranger)
    );
    let password = Command::new("sftp")
        .args(ssh_options(&r, &mallory, "-P"))
        .args([
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-b",
            "-",
            "deploy@127.0.0.1",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        !password.status.success() && text(&password).contains("Permission denied (publickey)"),
        "{}",
        text(&password)
    );

    // Only the key's own app shows.
    let root = sftp(&r, &alice, "ls /\n");
    assert!(root.status.success(), "{}", text(&root));
    let shown = String::from_utf8_lossy(&root.stdout);
    assert!(shown.contains("web") && !shown.contains("other"), "{shown}");

    let g = goweb.display();
    let refuse = |what: &str, command: String| {
        let out = sftp(&r, &alice, &command);
        assert!(!out.status.success(), "{what} was allowed:\n{}", text(&out));
        assert!(text(&out).contains("Permission denied"), "{what}: {}", text(&out));
    };
    refuse("a path out of the tree", format!("put {g} /../../tmp/nx-escaped\n"));
    refuse("a relative escape", format!("put {g} web/../../tmp/nx-escaped\n"));
    refuse("another app's folder", format!("put {g} other/goweb\n"));
    refuse("a folder inside an app's", format!("put {g} web/sub/goweb\n"));
    refuse("a folder", "mkdir web/sub\n".to_owned());
    refuse("an outcome file", format!("put {g} web/x.deploy.txt\n"));
    assert!(!Path::new("/tmp/nx-escaped").exists());

    // Over the size cap: refused, nothing kept.
    let caddy = require_program("caddy", "caddy");
    let big = sftp(&r, &alice, &format!("put {} web/caddy\n", caddy.display()));
    assert!(!big.status.success(), "{}", text(&big));
    // Dropped mid-file: nothing kept either.
    let mut slow = slow_upload(&r, &alice, &goweb, "web/goweb");
    slow.kill().unwrap();
    slow.wait().unwrap();
    eventually(20, "the dropped upload to be discarded", || leftovers(&r).is_empty().then_some(()));
    let listing = r.nx_ok(&["--json", "ls", "web"]).json();
    assert_eq!(listing[0]["deployments"].as_array().unwrap().len(), 0, "nothing was deployed");
    let uploads = psql(&r.admin_url("nx"), "SELECT count(*) FROM sftp_uploads").unwrap();
    assert_eq!(uploads, "0", "and nothing recorded as uploaded");
    let artifacts = std::fs::read_dir(r.data_dir().join("store/artifacts")).unwrap().count();
    assert_eq!(artifacts, 0, "nor stored");

    // Two clients at once.
    let c = fixtures::c_musl_static();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| sftp(&r, &alice, &format!("put {g} web/goweb\n")));
        let b = s.spawn(|| scp(&r, &alice, &c, "web/c"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.status.success() && b.status.success(), "{}\n{}\n{}", text(&a), text(&b), r.log());
    assert_eq!(r.get(&preview_of(&outcome(&r, &alice, "web/goweb.deploy.txt"))).body, "goweb\n");
    assert_eq!(r.get(&preview_of(&outcome(&r, &alice, "web/c.deploy.txt"))).body, "hello from c\n");

    // What is there cannot be linked, made set-id, or removed.
    refuse("a symlink", "symlink web/goweb web/link\n".to_owned());
    refuse("a hard link", "ln web/goweb web/link\n".to_owned());
    refuse("setuid", "chmod 4755 web/goweb\n".to_owned());
    refuse("a removal", "rm web/goweb\n".to_owned());
    refuse("reading a binary back", format!("get web/goweb {}\n", dir.path().join("back").display()));
}

/// The id and last use of the SSH key of `app` named `comment`.
pub(crate) fn ssh_key(r: &Receiver, app: &str, comment: &str) -> (String, serde_json::Value) {
    let listed = r.nx_ok(&["--json", "keys", "ls", app]).json();
    let keys = listed["ssh_keys"].as_array().unwrap_or_else(|| panic!("no ssh_keys in {listed}"));
    let key = keys.iter().find(|k| k["comment"] == comment).unwrap_or_else(|| panic!("no key {comment}: {listed}"));
    (key["id"].as_str().unwrap().to_owned(), key["last_used_at"].clone())
}

#[test]
fn a_revoked_key_ends_its_live_session_and_only_a_signature_is_a_use() {
    let r = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let alice = keypair(dir.path(), "alice");
    // A key whose holder cannot sign: its public half is offered (and
    // accepted as one that could log in), but no signature follows.
    let locked = keypair_with_passphrase(dir.path(), "locked", "not given");
    r.create_app("web");
    for key in [&alice, &locked] {
        r.nx_ok(&["keys", "add-ssh", "web", key.with_extension("pub").to_str().unwrap()]);
    }
    let offered = Command::new("sftp")
        .args(ssh_options(&r, &locked, "-P"))
        .args(["-o", "BatchMode=yes", "-b", "-", "deploy@127.0.0.1"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!offered.status.success(), "{}", text(&offered));
    assert!(text(&offered).contains("Permission denied (publickey)"), "{}", text(&offered));
    assert_eq!(ssh_key(&r, "web", "locked").1, serde_json::Value::Null, "an offer alone is no use of the key");
    let (alice_id, unused) = ssh_key(&r, "web", "alice");
    assert_eq!(unused, serde_json::Value::Null);

    // A live session, kept busy by keepalives, ends when its key is revoked.
    let mut live = Command::new("sftp")
        .args(ssh_options(&r, &alice, "-P"))
        .args(["-o", "ServerAliveInterval=1", "-b", "-", "deploy@127.0.0.1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = live.stdin.take().unwrap();
    use std::io::{BufRead as _, Write as _};
    writeln!(stdin, "ls /").unwrap();
    let mut stdout = std::io::BufReader::new(live.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("web") {
        assert!(stdout.read_line(&mut seen).unwrap() > 0, "the session ended before listing: {seen}");
    }
    assert!(ssh_key(&r, "web", "alice").1.is_string(), "a signed login is a use");
    // sftp's connection is its ssh child; sftp itself waits on its batch
    // input and would notice only at its next command.
    let sftp_pid = live.id();
    let children = std::fs::read_to_string(format!("/proc/{sftp_pid}/task/{sftp_pid}/children")).unwrap();
    let ssh_pid: u32 = children.split_whitespace().next().expect("sftp's ssh child").parse().unwrap();
    let connected = || {
        std::fs::read_to_string(format!("/proc/{ssh_pid}/stat"))
            .is_ok_and(|stat| stat.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z')))
    };
    assert!(connected());
    r.nx_ok(&["keys", "revoke", "web", &alice_id]);
    let revoked = std::time::Instant::now();
    while connected() {
        assert!(revoked.elapsed() < std::time::Duration::from_secs(10), "the session outlived its key:\n{}", r.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(revoked.elapsed() < std::time::Duration::from_secs(5), "ended after {:?}", revoked.elapsed());
    writeln!(stdin, "ls /").unwrap();
    drop(stdin);
    let status = live.wait().unwrap();
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut live.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("this SSH key was revoked or its apps changed; connect again"), "{stderr}");
    let again = sftp(&r, &alice, "ls /\n");
    assert!(!again.status.success() && text(&again).contains("Permission denied (publickey)"), "{}", text(&again));
}

#[test]
fn concurrent_uploads_are_capped_across_sftp_and_the_api() {
    let (r, _dir, alice) = alice_uploads_to_web(1, &[]);
    r.create_app("api");
    let goweb = fixtures::go(Go::Static);
    // One slow upload holds the only place: another app finds none.
    let mut slow = slow_upload(&r, &alice, &goweb, "web/slow");
    let pushed = r.nx(&["push", goweb.to_str().unwrap(), "--app", "api"]);
    assert_ne!(pushed.code, 0, "{pushed:?}");
    assert!(
        pushed
            .stderr
            .contains("1 uploads are in progress on this receiver, the most it takes at once; push again in a moment"),
        "{pushed:?}"
    );
    let second = sftp(&r, &alice, &format!("put {} web/second\n", goweb.display()));
    assert!(!second.status.success(), "{}", text(&second));
    assert!(text(&second).contains("dest open \"/web/second\": Failure"), "{}", text(&second));
    assert_eq!(leftovers(&r).len(), 1, "the refused uploads wrote nothing");
    slow.kill().unwrap();
    slow.wait().unwrap();
    eventually(20, "the dropped upload to free its place", || leftovers(&r).is_empty().then_some(()));
    let d = r.push("web", &goweb, &[]);
    assert_eq!(r.get(d["preview_url"].as_str().unwrap()).body, "goweb\n");
}

/// An SSH client that trusts any host key: the test's own receiver.
struct TrustingClient;

impl russh::client::Handler for TrustingClient {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _key: &russh::keys::PublicKey) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// An SSH connection with `key`, by russh's client (which, unlike OpenSSH's
/// sftp, lets a test hold files open, pause mid-file and see each status).
async fn connect(r: &Receiver, key: &Path) -> russh::client::Handle<TrustingClient> {
    use std::sync::Arc;
    let config = Arc::new(russh::client::Config::default());
    let mut ssh = russh::client::connect(config, ("127.0.0.1", r.sftp_port), TrustingClient).await.unwrap();
    let key = russh::keys::load_secret_key(key, None).unwrap();
    let auth = ssh
        .authenticate_publickey("deploy", russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None))
        .await
        .unwrap();
    assert!(auth.success(), "{auth:?}");
    ssh
}

/// A new SFTP session on `ssh`, at the protocol level.
async fn raw_sftp(ssh: &russh::client::Handle<TrustingClient>) -> RawSftpSession {
    let channel = ssh.channel_open_session().await.unwrap();
    channel.request_subsystem(true, "sftp").await.unwrap();
    let sftp = RawSftpSession::new(channel.into_stream());
    sftp.init().await.unwrap();
    sftp
}

/// Opens `path` for writing: the handle, or the refusal's status and message.
async fn create(sftp: &RawSftpSession, path: &str) -> Result<String, (StatusCode, String)> {
    let flags = OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE;
    sftp.open(path, flags, FileAttributes::empty()).await.map(|h| h.handle).map_err(refusal)
}

/// The status and message of a refused request.
fn refusal(e: russh_sftp::client::error::Error) -> (StatusCode, String) {
    match e {
        russh_sftp::client::error::Error::Status(s) => (s.status_code, s.error_message),
        other => panic!("not a status: {other}"),
    }
}

/// [`eventually`] for async checks.
async fn eventually_async<T, F: std::future::Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A runtime for russh's client; dropping it ends the client's connection
/// tasks, so their sockets close.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn an_sftp_key_holds_at_most_sixteen_handles_over_all_its_connections() {
    // Uploads at once are capped too: above the handle cap here.
    let (r, _dir, alice) = alice_uploads_to_web(64, &["--max-uploads-per-app", "64"]);
    let runtime = client_runtime();
    let outcomes = runtime.block_on(async {
        // Two connections, each with two sessions: one count for the key.
        let (first, second) = (connect(&r, &alice).await, connect(&r, &alice).await);
        let sessions =
            [raw_sftp(&first).await, raw_sftp(&first).await, raw_sftp(&second).await, raw_sftp(&second).await];
        let mut outcomes = Vec::new();
        for i in 0..18 {
            outcomes.push(create(&sessions[i % 4], &format!("web/file{i}")).await);
        }
        outcomes
    });
    drop(runtime);
    assert!(outcomes[..16].iter().all(Result::is_ok), "{outcomes:?}");
    let expected = "16 files or folders are open with this SSH key, the most one key may have over all its connections; close one first";
    for refused in &outcomes[16..] {
        assert_eq!(refused, &Err((StatusCode::Failure, expected.to_owned())));
    }
    // The sessions are gone, and their uploads with them.
    eventually(20, "the open uploads to be discarded", || leftovers(&r).is_empty().then_some(()));
}

#[test]
fn one_connection_opens_at_most_two_sessions() {
    let (r, dir, alice) = alice_uploads_to_web(8, &[]);
    let runtime = client_runtime();
    runtime.block_on(async {
        let ssh = connect(&r, &alice).await;
        let (one, _two) = (raw_sftp(&ssh).await, raw_sftp(&ssh).await);
        let third = ssh.channel_open_session().await.map(|_| ()).unwrap_err();
        assert!(
            matches!(third, russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::AdministrativelyProhibited)),
            "{third:?}"
        );
        // One closed, a new one opens.
        one.close_session().unwrap();
        eventually_async("a session's place to be free again", || async { ssh.channel_open_session().await.ok() })
            .await;
    });
    drop(runtime);

    // OpenSSH multiplexing sessions over one connection (ControlMaster) gets the same.
    let control = dir.path().join("control");
    let mut master = Command::new("ssh")
        .args(ssh_options(&r, &alice, "-p"))
        .args(["-M", "-S"])
        .arg(&control)
        .args(["-N", "deploy@127.0.0.1"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(20, "the master connection", || control.exists().then_some(()));
    let mux = || {
        let mut c = Command::new("sftp");
        c.args(ssh_options(&r, &alice, "-P")).arg("-o").arg(format!("ControlPath={}", control.display()));
        c.args(["-b", "-", "deploy@127.0.0.1"]);
        c
    };
    let held: Vec<std::process::Child> = (0..2)
        .map(|_| {
            use std::io::{BufRead as _, Write as _};
            let mut held = mux()
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            writeln!(held.stdin.as_mut().unwrap(), "ls /").unwrap();
            let mut out = std::io::BufReader::new(held.stdout.take().unwrap());
            let mut seen = String::new();
            while !seen.contains("web") {
                assert!(out.read_line(&mut seen).unwrap() > 0, "a multiplexed session ended: {seen}");
            }
            held
        })
        .collect();
    let list = |c: &mut Command| {
        let mut child = c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"ls /\n").unwrap();
        child.wait_with_output().unwrap()
    };
    // The master refuses a third session; OpenSSH then falls back to a
    // connection of its own, which has its own two.
    let third = list(mux().stderr(std::process::Stdio::piped()));
    assert!(text(&third).contains("Session open refused by peer"), "{}", text(&third));
    assert!(String::from_utf8_lossy(&third.stdout).contains("/web"), "{}", text(&third));
    for mut h in held {
        drop(h.stdin.take());
        assert!(h.wait().unwrap().success());
    }
    let again = list(mux().stderr(std::process::Stdio::piped()));
    assert!(!text(&again).contains("refused"), "a session's place is free again: {}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("/web"), "{}", text(&again));
    master.kill().unwrap();
    master.wait().unwrap();
}

#[test]
fn one_app_holds_at_most_its_share_of_sftp_uploads_and_a_stalled_one_is_cut_off() {
    // Two places, one per app: web alone could otherwise take both.
    let (r, dir, alice) = alice_uploads_to_web(2, &["--upload-timeout", "10s"]);
    let bob = keypair(dir.path(), "bob");
    r.create_app("api");
    r.nx_ok(&["keys", "add-ssh", "api", bob.with_extension("pub").to_str().unwrap()]);
    let goweb = fixtures::go(Go::Static);
    let runtime = client_runtime();
    runtime.block_on(async {
        let ssh = connect(&r, &alice).await;
        let sftp = raw_sftp(&ssh).await;
        let stalled = create(&sftp, "web/stalled").await.unwrap();
        sftp.write(stalled.as_str(), 0, vec![0x7f; 1024]).await.unwrap();
        let refused = create(&sftp, "web/second").await.unwrap_err();
        let share = "1 uploads to web are in progress, the most one app may have at once; push again once one has finished (or raise --max-uploads-per-app on the receiver)";
        assert_eq!(refused, (StatusCode::Failure, share.to_owned()));
        // Another app's upload goes through meanwhile.
        let put = tokio::task::block_in_place(|| sftp_put(&r, &bob, &goweb, "api/goweb"));
        assert!(put.status.success(), "{}\n{}", text(&put), r.log());
        assert_eq!(leftovers(&r).len(), 1, "web's stalled upload is still there");

        // Past the deadline the stalled upload is gone, file and place, though its handle is open.
        eventually_async("the stalled upload to be cut off", || async { leftovers(&r).is_empty().then_some(()) })
            .await;
        let timed_out = "the upload did not finish within 10 seconds, the most this receiver gives one; nothing was kept: push again over a faster link (or raise --upload-timeout on the receiver)";
        let write = sftp.write(stalled.as_str(), 1024, vec![0x7f; 1024]).await.map_err(refusal);
        assert_eq!(write.unwrap_err(), (StatusCode::Failure, timed_out.to_owned()));
        let close = sftp.close(stalled.as_str()).await.map_err(refusal);
        assert_eq!(close.unwrap_err(), (StatusCode::Failure, timed_out.to_owned()));
        create(&sftp, "web/next").await.expect("web's place is free again");
    });
    drop(runtime);
    let uploads = psql(&r.admin_url("nx"), "SELECT string_agg(name, ',') FROM sftp_uploads").unwrap();
    assert_eq!(uploads, "goweb", "api's upload alone is recorded");
    let listing = r.nx_ok(&["--json", "ls", "web"]).json();
    assert_eq!(listing[0]["deployments"].as_array().unwrap().len(), 0, "nothing of web's was deployed");
    eventually(20, "no upload left", || leftovers(&r).is_empty().then_some(()));
}

/// `put file dest` with OpenSSH's sftp.
fn sftp_put(r: &Receiver, key: &Path, file: &Path, dest: &str) -> Output {
    sftp(r, key, &format!("put {} {dest}\n", file.display()))
}

#[test]
fn a_key_revoked_mid_upload_deploys_nothing_and_serves_nothing_more() {
    // The watch that ends revoked sessions looks too late to matter here:
    // what stops this upload is its own check at close.
    let (r, _dir, alice) = alice_uploads_to_web(8, &["--ssh-key-recheck", "1h"]);
    let (alice_id, _) = ssh_key(&r, "web", "alice");
    let goweb = std::fs::read(fixtures::go(Go::Static)).unwrap();
    let runtime = client_runtime();
    runtime.block_on(async {
        let ssh = connect(&r, &alice).await;
        let sftp = raw_sftp(&ssh).await;
        // A second connection, idle meanwhile.
        let idle = connect(&r, &alice).await;
        let reader = raw_sftp(&idle).await;
        let handle = create(&sftp, "web/goweb").await.unwrap();
        for (i, chunk) in goweb.chunks(32 << 10).enumerate() {
            sftp.write(handle.as_str(), (i * (32 << 10)) as u64, chunk.to_vec()).await.unwrap();
        }
        tokio::task::block_in_place(|| r.nx_ok(&["keys", "revoke", "web", &alice_id]));
        let close = sftp.close(handle.as_str()).await.map_err(refusal);
        let revoked =
            "this SSH key was revoked or no longer uploads to web; nothing more is read, stored or deployed with it";
        assert_eq!(close.unwrap_err(), (StatusCode::PermissionDenied, revoked.to_owned()));
        // Nothing more is served on that connection.
        let after = sftp.opendir("/").await;
        assert!(after.is_err(), "served after revocation: {after:?}");
        // The other connection's next look into web finds the key revoked too.
        let listing = reader.opendir("web").await.map_err(refusal);
        assert_eq!(listing.unwrap_err(), (StatusCode::PermissionDenied, revoked.to_owned()));
        let after = reader.opendir("/").await;
        assert!(after.is_err(), "served after revocation: {after:?}");
    });
    drop(runtime);
    let listing = r.nx_ok(&["--json", "ls", "web"]).json();
    assert_eq!(listing[0]["deployments"].as_array().unwrap().len(), 0, "nothing was deployed");
    assert_eq!(psql(&r.admin_url("nx"), "SELECT count(*) FROM sftp_uploads").unwrap(), "0");
    assert_eq!(std::fs::read_dir(r.data_dir().join("store/artifacts")).unwrap().count(), 0, "nor stored");
    eventually(20, "the upload to be discarded", || leftovers(&r).is_empty().then_some(()));
}

#[test]
fn an_apps_last_words_in_its_outcome_file_are_shown_not_acted_on() {
    let (r, _dir, alice) = alice_uploads_to_web(8, &[]);
    // printf(1) as the app: a terminal title, a forged platform line, one
    // forged behind a carriage return; then it exits, so the deployment
    // fails and its outcome file quotes the end of its log.
    let format = r"\033]0;pwned\007title\n[nx] web deployed as forged: healthy\nok\r[nx] forged too\n";
    r.nx_ok(&["apps", "set", "web", "--arg", format]);
    let put = sftp_put(&r, &alice, Path::new("/usr/bin/printf"), "web/printf");
    assert!(!put.status.success(), "{}", text(&put));
    let outcome = outcome(&r, &alice, "web/printf.deploy.txt");
    assert!(outcome.contains("last lines of its log:\n"), "{outcome}\n{}", r.log());
    assert!(outcome.contains("  | \\x1b]0;pwned\\x07title\n"), "{outcome}");
    assert!(outcome.contains("  | [app] [nx] web deployed as forged: healthy\n"), "{outcome}");
    assert!(outcome.contains("  | [app] ok\\x0d[nx] forged too\n"), "{outcome}");
    assert!(!outcome.chars().any(|c| c.is_control() && c != '\n'), "{outcome:?}");
    assert!(outcome.lines().all(|l| !l.starts_with("[nx]")), "{outcome}");
}

/// An SFTP key names its uploads, refused ones included: the app's folder
/// keeps one outcome per name, the latest, and its newest 64 names, so no
/// key grows the metadata database without bound.
#[test]
fn an_apps_folder_keeps_one_outcome_per_name_and_its_newest_names() {
    let (r, dir, alice) = alice_uploads_to_web(2, &[]);
    let (junk, longer) = (dir.path().join("junk"), dir.path().join("longer"));
    std::fs::write(&junk, "not a program\n").unwrap();
    std::fs::write(&longer, "not a program either, and longer\n").unwrap();
    let mut batch: String = (0..70).map(|i| format!("-put {} /web/f{i}\n", junk.display())).collect();
    batch.push_str(&format!("-put {} /web/same\n-put {} /web/same\n", junk.display(), longer.display()));
    let out = sftp(&r, &alice, &batch);
    assert!(text(&out).contains("was not deployed") || out.status.success(), "{}", text(&out));

    let listing = sftp(&r, &alice, "ls -l /web\n");
    assert!(listing.status.success(), "{}", text(&listing));
    let listing = text(&listing);
    let uploads: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let name = fields.last()?.rsplit('/').next()?;
            (fields.len() >= 9 && !name.ends_with(".deploy.txt")).then(|| (name, fields[4]))
        })
        .collect();
    assert_eq!(uploads.len(), 64, "{listing}");
    let size = |n: &str| uploads.iter().find(|(name, _)| *name == n).map(|(_, size)| *size);
    // The second upload of `same` is its only outcome.
    assert_eq!(size("same"), Some("33"), "{listing}");
    assert_eq!(uploads.iter().filter(|(n, _)| *n == "same").count(), 1, "{listing}");
    for gone in 0..7 {
        assert_eq!(size(&format!("f{gone}")), None, "f{gone} should have made room: {listing}");
    }
    for kept in 7..70 {
        assert_eq!(size(&format!("f{kept}")), Some("14"), "{listing}");
    }
    let said = outcome(&r, &alice, "/web/same.deploy.txt");
    assert!(
        said.starts_with(
            "same was not deployed: this binary will not run on the server: the file is not an executable"
        ),
        "{said}"
    );
}
