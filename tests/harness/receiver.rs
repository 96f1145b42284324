//! A real `nx-receiver serve` in a temporary directory, and the `nx` CLI
//! pointed at it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;

use crate::http::{self, Answer};
use crate::{bin, require_program, require_root};

/// Ports handed to tests: above the receiver's default app ports
/// (20000-29999) and below the kernel's ephemeral ports (32768 up), so
/// neither an app nor an outgoing connection of another test takes one
/// between the moment it is chosen and the moment it is bound.
const TEST_PORTS: std::ops::Range<u16> = 30000..32768;

/// Locks held on the ports this test process was given; released when it exits.
static HELD: std::sync::Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> = std::sync::Mutex::new(Vec::new());

/// A free loopback TCP port for something to bind later. Tests run as
/// parallel processes: each port is taken under a file lock the process
/// keeps, so no two tests are given the same one.
pub fn free_port() -> u16 {
    take_locked(|port| port.to_string(), TEST_PORTS, |port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .unwrap_or_else(|| panic!("no free port in {TEST_PORTS:?}"))
}

/// The apps' port range of one receiver: one of 50 blocks of 200 ports
/// below the tests' own ports and the kernel's automatic range (a receiver
/// reserves what of its range lies in that one), under a lock as ports
/// are, so parallel receivers never share one.
fn app_ports() -> std::ops::RangeInclusive<u16> {
    let block = take_locked(|i| format!("apps-{i}"), 0..50, |_| true).expect("a free block of app ports");
    let base = 20_000 + block * 200;
    base..=base + 199
}

/// The first of `choices`, tried from a random one on, whose lock file
/// (`name`) no other test process holds and that is `usable`; its lock is
/// kept until this process exits.
fn take_locked(
    name: impl Fn(u16) -> String,
    choices: std::ops::Range<u16>,
    usable: impl Fn(u16) -> bool,
) -> Option<u16> {
    let locks = std::env::temp_dir().join("nx-e2e-ports");
    std::fs::create_dir_all(&locks).expect("port lock directory");
    let span = choices.end - choices.start;
    let first = rand::thread_rng().gen_range(0..span);
    (0..span).map(|i| choices.start + (first + i) % span).find(|&choice| {
        let file = std::fs::File::create(locks.join(name(choice))).expect("port lock file");
        let Ok(lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) else {
            return false;
        };
        let ok = usable(choice);
        if ok {
            HELD.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(lock);
        }
        ok
    })
}

/// Settings a test may change before start.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Extra `nx-receiver serve` flags.
    pub args: Vec<String>,
    /// Extra environment for the receiver.
    pub env: Vec<(String, String)>,
    /// The nx-receiver executable (default: the built one); a copy elsewhere
    /// stands for a new version, with nx-router and nx-shim beside it.
    pub bin: Option<PathBuf>,
    /// The database's port (default: a free port of the tests' range).
    pub pg_port: Option<u16>,
}

/// One receiver with its own data directory and ports.
#[derive(Debug)]
pub struct Receiver {
    pub dir: tempfile::TempDir,
    pub api_port: u16,
    pub router_port: u16,
    pub pg_port: u16,
    pub sftp_port: u16,
    pub admin_token: String,
    /// First app uid: distinct per receiver, so parallel receivers never share
    /// uids, cgroups or network rules.
    pub uid_base: u32,
    pub options: Options,
    /// How long after its last start the receiver's API first answered.
    pub api_answered: Option<Duration>,
    child: Option<Child>,
}

impl Receiver {
    pub fn start() -> Receiver {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Receiver {
        require_root();
        require_program("bwrap", "bubblewrap");
        let dir = tempfile::Builder::new().prefix("nx-e2e-").tempdir_in("/tmp").expect("tempdir");
        let token: String =
            rand::thread_rng().sample_iter(rand::distributions::Alphanumeric).take(40).map(char::from).collect();
        let mut r = Receiver {
            dir,
            api_port: free_port(),
            router_port: free_port(),
            pg_port: options.pg_port.unwrap_or_else(free_port),
            sftp_port: free_port(),
            admin_token: format!("nxa_{token}"),
            uid_base: 1_000_000 + rand::thread_rng().gen_range(0..4000u32) * 65_536,
            options,
            api_answered: None,
            child: None,
        };
        r.spawn();
        r
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("receiver.log")
    }

    /// The receiver's own output so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let started = self.launch();
        self.wait_up(started);
    }

    /// Starts the receiver process and returns at once, with the instant
    /// just before its exec; [`Receiver::wait_up`] waits for it.
    fn launch(&mut self) -> Instant {
        let apps = app_ports();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log file");
        let mut cmd = Command::new(self.options.bin.clone().unwrap_or_else(|| bin("nx-receiver")));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen", &format!("127.0.0.1:{}", self.api_port)])
            .args(["--router-listen", &format!("127.0.0.1:{}", self.router_port)])
            .args(["--pg-port", &self.pg_port.to_string()])
            .args(["--sftp-listen", &format!("127.0.0.1:{}", self.sftp_port)])
            .args(["--port-range", &format!("{}-{}", apps.start(), apps.end())])
            .args(["--stop-grace", "3s"])
            .args(["--uid-base", &self.uid_base.to_string()])
            .args(&self.options.args)
            .env("NX_ADMIN_TOKEN", &self.admin_token)
            .env("RUST_LOG", "info,sqlx=warn")
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let started = Instant::now();
        let child = crate::exec::spawn(&mut cmd).expect("start nx-receiver");
        self.child = Some(child);
        started
    }

    /// Waits until the receiver launched at `started` has taken back its
    /// deployments (`"reconciled": true`), noting when its API first answered.
    pub fn wait_up(&mut self, started: Instant) {
        let deadline = Instant::now() + Duration::from_secs(60);
        self.api_answered = None;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("nx-receiver exited ({status}) during startup:\n{}", self.log());
            }
            // The API answers first; the deployments are taken back after.
            let health = reqwest::blocking::get(format!("{}/v1/health", self.api()))
                .ok()
                .filter(|r| r.status().is_success())
                .and_then(|r| r.json::<serde_json::Value>().ok());
            if let Some(health) = health {
                self.api_answered.get_or_insert(started.elapsed());
                if health["reconciled"] == true {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "nx-receiver did not come up within 60s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` and waits for the receiver to exit; returns its exit status.
    pub fn stop_with(&mut self, signal: Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("receiver is running");
        kill(Pid::from_raw(child.id() as i32), signal).expect("signal receiver");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("nx-receiver did not stop within 60s of {signal}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts again after [`Receiver::stop_with`], on the same data directory and ports.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the receiver is still running");
        self.spawn();
    }

    /// Starts again as [`Receiver::start_again`] does, without waiting: for
    /// a caller that watches the start itself, then calls
    /// [`Receiver::wait_up`] with the instant returned (just before exec).
    pub fn launch_again(&mut self) -> Instant {
        assert!(self.child.is_none(), "the receiver is still running");
        self.launch()
    }

    /// Stops with SIGTERM and starts again on the same data directory and ports.
    pub fn restart(&mut self) {
        let status = self.stop_with(Signal::SIGTERM);
        assert!(status.success(), "nx-receiver exited with {status} on SIGTERM:\n{}", self.log());
        self.spawn();
    }

    /// Runs `nx-receiver stop-all` on this receiver's data directory (it
    /// must be stopped): the apps it left running under their shims stop.
    pub fn stop_all(&self) -> NxOutput {
        let mut cmd = Command::new(bin("nx-receiver"));
        cmd.arg("stop-all")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--uid-base", &self.uid_base.to_string(), "--stop-grace", "3s"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        NxOutput::from(crate::exec::output(&mut cmd).expect("run nx-receiver stop-all"))
    }

    /// Runs `nx` with this receiver and the admin token.
    pub fn nx(&self, args: &[&str]) -> NxOutput {
        self.nx_with_key(&self.admin_token, args)
    }

    /// Runs `nx` and fails the test, with the receiver's log, unless it exits 0.
    pub fn nx_ok(&self, args: &[&str]) -> NxOutput {
        let out = self.nx(args);
        assert_eq!(
            out.code,
            0,
            "nx {args:?} failed:\nstdout: {}\nstderr: {}\nreceiver log:\n{}",
            out.stdout,
            out.stderr,
            self.log()
        );
        out
    }

    /// Runs `nx` with another key.
    pub fn nx_with_key(&self, key: &str, args: &[&str]) -> NxOutput {
        NxOutput::from(crate::exec::output(self.nx_command(key).args(args)).expect("run nx"))
    }

    /// An `nx` command with a clean environment pointed at this receiver
    /// with `key`, for tests that set more (a working directory, stdin,
    /// variables).
    pub fn nx_command(&self, key: &str) -> Command {
        let mut cmd = Command::new(bin("nx"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("NX_SERVER", self.api())
            .env("NX_KEY", key)
            .stdin(Stdio::null());
        cmd
    }

    /// Creates an app and returns its deploy key.
    pub fn create_app(&self, name: &str) -> String {
        let out = self.nx(&["--json", "apps", "create", name]).success();
        out.json()["deploy_key"].as_str().expect("deploy_key").to_owned()
    }

    /// Pushes and returns the deployment as JSON (fails the test unless healthy).
    pub fn push(&self, app: &str, binary: &Path, extra: &[&str]) -> serde_json::Value {
        let path = binary.to_str().expect("utf-8 path");
        let mut args = vec!["--json", "push", path, "--app", app];
        args.extend_from_slice(extra);
        let out = self.nx(&args).success();
        out.json()["deployment"].clone()
    }

    /// GET a URL printed by nx, through this receiver's router.
    pub fn get(&self, url: &str) -> Answer {
        http::get_url(self.router_port, url)
    }
}

/// How much of each log a failing test prints.
const LOG_TAIL_LINES: usize = 120;

/// Prints the last [`LOG_TAIL_LINES`] lines of `whose` log on stderr.
fn print_tail(whose: &str, log: &str) {
    let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL_LINES).collect();
    eprintln!("--- the last {} lines of {whose} log ---", tail.len());
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
}

impl Drop for Receiver {
    /// Stops the receiver, then the apps it leaves running. A failing test
    /// gets the end of the receiver's log and of its router's on its stderr
    /// first: a timeout in CI says only what it waited for, the logs say
    /// why (a request the router ended early shows only in the router's).
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_tail("the receiver's", &self.log());
            let router = std::fs::read(self.data_dir().join("logs/router.log")).unwrap_or_default();
            print_tail("the router's", &String::from_utf8_lossy(&router));
        }
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut exited = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if self.data_dir().is_dir() {
            let _ = self.stop_all();
        }
    }
}

/// What a run of `nx` produced.
#[derive(Debug)]
pub struct NxOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for NxOutput {
    fn from(o: Output) -> Self {
        NxOutput {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl NxOutput {
    /// Fails the test unless nx exited 0.
    pub fn success(self) -> NxOutput {
        assert_eq!(self.code, 0, "nx failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("nx printed no JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs one SQL statement with psql against `url`: the output (unaligned,
/// tuples only), or psql's error.
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = crate::exec::output(
        Command::new("psql").args([url, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]).env("PGCONNECT_TIMEOUT", "5"),
    )
    .expect("run psql (apt-get install postgresql-client)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

impl Receiver {
    /// The admin's connection URL for `database`, over the cluster's socket.
    pub fn admin_url(&self, database: &str) -> String {
        let password =
            std::fs::read_to_string(self.data_dir().join("secrets/postgres-admin.password")).expect("admin password");
        format!(
            "postgresql://nx_admin:{}@/{database}?host={}&port={}",
            password.trim(),
            self.data_dir().join("postgres/run").display(),
            self.pg_port
        )
    }

    /// An app's database URL, as `nx db url` prints it.
    pub fn db_url(&self, app: &str) -> String {
        self.nx(&["db", "url", app]).success().stdout.trim().to_owned()
    }
}
