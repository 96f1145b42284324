//! The attack suite: a hostile app of our own (`tests/fixtures/evil/evil.c`)
//! runs inside its sandbox next to an innocent one and tries every escape in
//! the book. Each attack must fail, and the host and the other app must be
//! intact afterwards.

use std::os::unix::fs::PermissionsExt;

use nx_e2e::fixtures::{self, Go};
use nx_e2e::{deployment_processes, processes_of, Receiver};

struct Lab {
    r: Receiver,
    evil_id: String,
    evil_url: String,
    victim_url: String,
    victim_port: u16,
}

impl Lab {
    fn attack(&self, what: &str) -> String {
        let a = self.r.get(&format!("{}attack/{what}", self.evil_url));
        assert_eq!(a.status, 200, "attack {what}: {a:?}");
        eprintln!("attack {what}: {}", a.body);
        a.body
    }

    /// Fails the test unless the attack says it was blocked; returns the details.
    fn blocked(&self, what: &str) -> String {
        let out = self.attack(what);
        assert!(out.starts_with("BLOCKED"), "attack {what} was not blocked: {out}");
        out
    }

    fn info(&self, what: &str) -> String {
        let out = self.attack(what);
        assert!(out.starts_with("INFO "), "attack {what}: {out}");
        out
    }
}

fn number_after(text: &str, word: &str) -> u64 {
    text.split(word)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {word:?} in {text:?}"))
}

fn lab() -> Lab {
    let r = Receiver::start();
    r.create_app("victim");
    r.create_app("evil");
    r.nx(&[
        "apps", "set", "evil", "--memory", "64MiB", "--pids", "48", "--nofile", "256", "--tmp", "16MiB", "--data",
        "32MiB",
    ])
    .success();
    let victim = r.push("victim", &fixtures::go(Go::Static), &[]);
    let evil = r.push("evil", &fixtures::evil(), &["--arg", "serve"]);
    // A setuid-root copy of the hostile program inside its own /data: the
    // classic way to try to turn a file on disk into privilege.
    let suid = r.data_dir().join("apps/evil/data/suid-evil");
    std::fs::copy(fixtures::evil(), &suid).unwrap();
    std::os::unix::fs::chown(&suid, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    Lab {
        evil_id: evil["id"].as_str().unwrap().to_owned(),
        evil_url: format!("{}/", evil["preview_url"].as_str().unwrap()),
        victim_url: victim["preview_url"].as_str().unwrap().to_owned(),
        victim_port: victim["port"].as_u64().unwrap() as u16,
        r,
    }
}

#[test]
fn hostile_app_cannot_escape_its_sandbox() {
    let lab = lab();
    let r = &lab.r;
    assert_eq!(r.get(&lab.evil_url).body, "evil is up");

    // Files of the host and of other apps.
    lab.blocked("shadow");
    let victim_data = r.data_dir().join("apps/victim/data");
    std::fs::write(victim_data.join("secret"), "victim's").unwrap();
    lab.blocked(&format!("open?path={}/secret", victim_data.display()));
    lab.blocked(&format!("open?path={}/secrets/master.key", r.data_dir().display()));
    lab.blocked("writebin");

    // Other processes.
    let procs = lab.blocked("procs");
    assert!(number_after(&procs, "BLOCKED") <= 4, "{procs}");
    lab.blocked(&format!("kill-pid?pid={}", r.pid().unwrap()));
    lab.blocked("ptrace");

    // Privilege.
    lab.blocked("mount");
    lab.blocked("unshare");
    let setuid = lab.blocked("setuid?path=/data/suid-evil");
    assert!(setuid.contains("euid=1000"), "{setuid}");
    let tiocsti = lab.blocked("tiocsti");
    assert!(tiocsti.contains("TIOCSTI: Operation not permitted"), "the seccomp filter refused it: {tiocsti}");
    lab.blocked("rawsock");
    lab.blocked("bind?port=80");

    // The network: other apps, the receiver, the router, the metadata address.
    for port in [lab.victim_port, r.api_port, r.router_port] {
        let out = lab.blocked(&format!("connect?host=127.0.0.1&port={port}"));
        assert!(out.contains("Connection refused"), "{out}");
    }
    lab.blocked("connect?host=169.254.169.254&port=80");
    // Its own database it may reach.
    let db = lab.attack(&format!("connect?host=127.0.0.1&port={}", r.pg_port));
    assert!(db.starts_with("ESCAPED connected"), "an app must reach its database: {db}");

    // What it was given: three descriptors and its own variables.
    assert_eq!(lab.info("fds"), "INFO 0,1,2,");
    let env = lab.info("env");
    // PWD is bwrap's, set by --chdir /data.
    let allowed = [
        "PWD",
        "PORT",
        "HOST",
        "NX_APP",
        "NX_DEPLOYMENT",
        "HOME",
        "TMPDIR",
        "PATH",
        "SSL_CERT_FILE",
        "DATABASE_URL",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
        "PGDATABASE",
    ];
    for name in env.trim_start_matches("INFO ").split_whitespace() {
        assert!(allowed.contains(&name), "unexpected variable {name} in the sandbox: {env}");
    }
    assert!(!env.contains("NX_ADMIN_TOKEN") && !env.contains("RUST_LOG"));

    // Limits: each exhaustion stops at the app's own limit.
    let forks = lab.info("forkbomb");
    assert!(number_after(&forks, "forked") < 48, "{forks}");
    assert!(forks.contains("Resource temporarily unavailable"), "{forks}");
    let files = lab.info("nofile");
    assert!(number_after(&files, "opened") <= 256, "{files}");
    assert!(files.contains("Too many open files"), "{files}");
    let tmp = lab.info("filltmp");
    assert!(number_after(&tmp, "wrote") <= 16, "{tmp}");
    assert!(tmp.contains("No space left on device"), "{tmp}");
    let data = lab.info("filldata");
    assert!(number_after(&data, "wrote") <= 32, "{data}");
    assert!(data.contains("No space left on device"), "{data}");
    let hog = lab.blocked("memhog?mb=512");
    assert!(hog.contains("killed by signal 9"), "the memory limit killed the hog: {hog}");
    assert_eq!(r.get(&lab.evil_url).body, "evil is up", "only the hog died, not its app");

    // kill -1 reaches nothing outside the sandbox.
    lab.info("kill-all");

    // No secret on a command line or in a log: the database password the app
    // was given appears in no process's arguments and in no log file.
    let evil_id = lab.evil_id.clone();
    let app_pid = deployment_processes(&r.data_dir(), &evil_id)
        .into_iter()
        .find(|(_, cmd)| cmd.starts_with("/app/evil"))
        .map(|(pid, _)| pid)
        .expect("the evil app runs");
    let environ = std::fs::read(format!("/proc/{app_pid}/environ")).unwrap();
    let password = String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|v| v.strip_prefix("PGPASSWORD=").map(str::to_owned))
        .expect("the app has a database password");
    for (pid, cmd) in processes_of(&r.data_dir(), &[&evil_id]) {
        assert!(!cmd.contains(&password), "process {pid} has the password on its command line: {cmd}");
    }
    for log in [
        r.log_path(),
        r.data_dir().join("logs/postgres.log"),
        r.data_dir().join(format!("logs/deployments/{evil_id}.log")),
    ] {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains(&password), "{} has the password", log.display());
    }

    // Every limit is reported with what enforces it.
    let listing = r.nx(&["--json", "ls", "evil"]).success().json();
    let limits = listing[0]["deployments"][0]["limits"].as_array().unwrap().clone();
    let by = |l: &str| {
        limits.iter().find(|e| e["limit"] == l).and_then(|e| e["by"].as_str()).unwrap_or("NOT ENFORCED").to_owned()
    };
    for l in ["memory", "cpu", "pids"] {
        assert!(by(l).starts_with("cgroup") || by(l).starts_with("rlimit"), "{l}: {}", by(l));
    }
    assert_eq!(
        (by("nofile").as_str(), by("tmp").as_str(), by("data").as_str(), by("network").as_str()),
        ("rlimit", "tmpfs", "ext4 volume", "nftables")
    );

    // The host and the other app are intact.
    let victim = r.get(&lab.victim_url);
    assert_eq!((victim.status, victim.body.as_str()), (200, "goweb\n"));
    assert_eq!(std::fs::read_to_string(victim_data.join("secret")).unwrap(), "victim's");
    let health = reqwest::blocking::get(format!("{}/v1/health", r.api())).unwrap();
    assert!(health.status().is_success());
    assert!(r.pid().is_some());
}
