//! The embedded PostgreSQL cluster: `initdb` on first start, then `postgres`
//! running as an unprivileged system user, listening on a unix socket in the
//! data directory and on a loopback port. The postmaster outlives the receiver
//! that started it (apps keep their database through a receiver restart or
//! upgrade); the next receiver adopts it through `postmaster.pid`, and
//! `nx-receiver stop-all` stops it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use nx_runtime::process::{Command, ProcessManager};
use nx_runtime::Log;
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions as _;

use rand::distributions::{Alphanumeric, DistString};

/// The cluster's superuser; the receiver is its only user.
pub const ADMIN_ROLE: &str = "nx_admin";

/// Failures of the embedded cluster, each naming what to do.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("PostgreSQL's programs were not found under /usr/lib/postgresql; install them with `apt-get install postgresql` or pass --pg-bin DIR")]
    NotInstalled,
    #[error("{path} has no {program}; pass --pg-bin with the directory that holds initdb and postgres")]
    MissingProgram { path: PathBuf, program: &'static str },
    #[error("cannot create the system user {user} for PostgreSQL: {reason}")]
    User { user: String, reason: String },
    #[error("cannot prepare {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("initdb failed: {0}")]
    Initdb(String),
    #[error("a PostgreSQL (pid {pid}) runs on {data} but does not accept the receiver's connection ({reason}); stop it (kill -INT {pid}) and start again")]
    Unanswering { pid: i32, data: PathBuf, reason: String },
    #[error("PostgreSQL did not start: {0}; see {1}")]
    Start(String, PathBuf),
    #[error(transparent)]
    Spawn(#[from] nx_runtime::process::SpawnError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EmbeddedError + '_ {
    move |source| EmbeddedError::Io { path: path.to_owned(), source }
}

/// Where PostgreSQL's programs live: the given directory, or the newest version
/// under /usr/lib/postgresql; it must hold every program in `required`.
pub fn find_bin_dir(given: Option<&Path>, required: &[&'static str]) -> Result<PathBuf, EmbeddedError> {
    let dir = match given {
        Some(d) => d.to_owned(),
        None => {
            let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
                .map_err(|_| EmbeddedError::NotInstalled)?
                .flatten()
                .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
                .collect();
            versions.sort();
            versions.pop().ok_or(EmbeddedError::NotInstalled)?.1
        }
    };
    for &program in required {
        if !dir.join(program).is_file() {
            return Err(EmbeddedError::MissingProgram { path: dir, program });
        }
    }
    Ok(dir)
}

/// The unprivileged user the cluster runs as: `(uid, gid)`, created as a system
/// user when missing. PostgreSQL refuses to run as root.
pub async fn ensure_system_user(pm: &ProcessManager, name: &str) -> Result<(u32, u32), EmbeddedError> {
    if let Some(ids) = nx_runtime::sys::lookup_user(name) {
        return Ok(ids);
    }
    let out = pm
        .output(Command::new("/usr/sbin/useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ]))
        .await?;
    if !out.status.success() {
        return Err(EmbeddedError::User { user: name.into(), reason: out.last_words() });
    }
    nx_runtime::sys::lookup_user(name).ok_or_else(|| EmbeddedError::User {
        user: name.into(),
        reason: "useradd succeeded but the user is not there".into(),
    })
}

/// Layout and settings of the embedded cluster.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    pub bin: PathBuf,
    /// `<data>/postgres`: holds `cluster/` and `run/`.
    pub root: PathBuf,
    pub port: u16,
    pub ids: (u32, u32),
    pub log_path: PathBuf,
    pub max_connections: u32,
    /// The nx-shim program, which keeps the postmaster's log (`--keep-log`).
    pub shim: PathBuf,
}

impl EmbeddedConfig {
    pub fn cluster_dir(&self) -> PathBuf {
        self.root.join("cluster")
    }

    /// Directory of the unix socket; mode 0700, owned by the cluster's user, so
    /// only root and that user can reach it.
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Options to connect as the superuser over the unix socket.
    pub fn admin_options(&self, password: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(self.socket_dir())
            .port(self.port)
            .username(ADMIN_ROLE)
            .password(password)
            .database("postgres")
            .application_name("nx-receiver")
            .log_statements(tracing::log::LevelFilter::Trace)
    }
}

/// What `postmaster.pid` says of a running postmaster of the cluster.
#[derive(Debug)]
struct Running {
    process: nx_runtime::sys::Pidfd,
    port: Option<u16>,
    socket_dir: Option<PathBuf>,
}

/// Rules that admit the superuser only over the unix socket (whose directory
/// only root and the cluster's user can enter), refuse it over the network
/// before any password is asked, so a sandbox has nothing to guess, and admit
/// every other role only to the database of the role's name or of a role it
/// is a member of (`samerole`: the platform's pg_dump role holds the app's
/// role), by password.
fn hba_rules() -> String {
    format!(
        "# Written by nx-receiver at every start; edits are lost.\n\
         local all {ADMIN_ROLE} scram-sha-256\n\
         host all {ADMIN_ROLE} all reject\n\
         host samerole all 127.0.0.1/32 scram-sha-256\n\
         host samerole all ::1/128 scram-sha-256\n"
    )
}

fn ensure_dir(path: &Path, mode: u32, ids: Option<(u32, u32)>) -> Result<(), EmbeddedError> {
    std::fs::create_dir_all(path).map_err(io_err(path))?;
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io_err(path))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// Writes a file the cluster's user reads into a directory that user owns
/// (and could plant links in): never by path, see `replace_file_in`.
fn write_owned(dir: &Path, name: &str, contents: &str, ids: (u32, u32)) -> Result<(), EmbeddedError> {
    nx_runtime::sys::replace_file_in(dir, name, contents.as_bytes(), 0o600, ids).map_err(io_err(&dir.join(name)))
}

/// The embedded cluster: started by a receiver, outliving it, stopped only
/// by [`stop`] (`nx-receiver stop-all`).
#[derive(Debug)]
pub struct Embedded;

impl Embedded {
    /// Initialises the cluster when needed and makes sure one postmaster, and
    /// only one, serves it with this configuration: the one an earlier
    /// receiver left running when it answers the superuser with the same
    /// settings, else a new one (after the previous one stopped). Returns
    /// once it accepts the superuser's connections.
    pub async fn start(
        pm: &ProcessManager,
        config: EmbeddedConfig,
        password: &str,
        log: Log,
    ) -> Result<(), EmbeddedError> {
        let ids = config.ids;
        ensure_dir(&config.root, 0o711, None)?;
        let cluster = config.cluster_dir();
        ensure_dir(&cluster, 0o700, Some(ids))?;
        ensure_dir(&config.socket_dir(), 0o700, Some(ids))?;
        if !cluster.join("PG_VERSION").exists() {
            initdb(pm, &config, password).await?;
        }
        write_owned(&cluster, "pg_hba.conf", &hba_rules(), ids)?;
        if let Some(running) = running_postmaster(&cluster)? {
            if adopt(&config, password, running).await? {
                return Ok(());
            }
        }
        spawn(pm, &config, password, &log).await
    }
}

/// Takes over a postmaster of the cluster that an earlier receiver left:
/// `true` once it answers with this configuration; `false` once it has
/// stopped (it was stopping, or ran with other settings and was stopped
/// here), so a new one may start. One that runs on and never answers is an
/// error: a second postmaster is never started beside it.
async fn adopt(config: &EmbeddedConfig, password: &str, running: Running) -> Result<bool, EmbeddedError> {
    let pid = running.process.pid();
    let moved = running.port.is_some_and(|p| p != config.port)
        || running.socket_dir.as_ref().is_some_and(|d| !same_path(d, &config.socket_dir()));
    if moved {
        tracing::info!(pid, "the running PostgreSQL listens elsewhere than configured now; restarting it");
        stop_process(&running.process).await;
        return Ok(false);
    }
    let options = config.admin_options(password);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let conn = loop {
        if running.process.exited() {
            return Ok(false);
        }
        match options.connect().await {
            Ok(conn) => break conn,
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(EmbeddedError::Unanswering { pid, data: config.cluster_dir(), reason: e.to_string() })
            }
            // Starting up, or shutting down (then it exits, see above).
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut conn = conn;
    let max: Result<String, _> = sqlx::query_scalar("SHOW max_connections").fetch_one(&mut conn).await;
    let _ = sqlx::Connection::close(conn).await;
    if max.ok().as_deref() != Some(config.max_connections.to_string().as_str()) {
        tracing::info!(pid, "the running PostgreSQL has another max_connections than configured now; restarting it");
        stop_process(&running.process).await;
        return Ok(false);
    }
    // pg_hba.conf was just written again: make it read.
    let _ = running.process.signal(Signal::SIGHUP);
    tracing::info!(pid, port = config.port, "embedded PostgreSQL adopted: it kept running since the last receiver");
    Ok(true)
}

fn same_path(a: &Path, b: &Path) -> bool {
    std::fs::canonicalize(a).ok().zip(std::fs::canonicalize(b).ok()).is_some_and(|(a, b)| a == b)
}

/// Starts a postmaster and waits until it accepts the superuser.
async fn spawn(pm: &ProcessManager, config: &EmbeddedConfig, password: &str, log: &Log) -> Result<(), EmbeddedError> {
    let cluster = config.cluster_dir();
    let mut cmd = Command::new(config.bin.join("postgres")).args([
        "-D".into(),
        cluster.clone().into_os_string(),
        "-p".into(),
        config.port.to_string().into(),
        "-k".into(),
        config.socket_dir().into_os_string(),
        "-c".into(),
        "listen_addresses=127.0.0.1".into(),
        "-c".into(),
        "password_encryption=scram-sha-256".into(),
        "-c".into(),
        format!("max_connections={}", config.max_connections).into(),
    ]);
    cmd.env = vec![("LC_ALL".into(), "C".into())];
    cmd.cwd = Some(cluster.clone());
    cmd.user = Some(config.ids);
    // It outlives the receiver: no parent-death signal, its own session (a
    // terminal's Ctrl-C to the receiver does not reach it), and its output
    // goes to a log keeper of its own rather than through a pipe that would
    // break with the receiver; the keeper caps and rotates the log, which a
    // tenant's `RAISE WARNING` could otherwise grow without bound.
    cmd.new_session = true;
    let out = log.keeper(pm, &config.shim).await?;
    let err = out.try_clone().map_err(io_err(&config.log_path))?;
    cmd.pass_fds = vec![(out, 1), (err, 2)];
    let child = pm.spawn(cmd).await?;
    let pid = child.pid();

    let options = config.admin_options(password);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_status().is_some() {
            let tail = log.tail(5).join(" / ");
            return Err(EmbeddedError::Start(format!("postgres exited: {tail}"), config.log_path.clone()));
        }
        match options.connect().await {
            Ok(conn) => {
                let _ = sqlx::Connection::close(conn).await;
                break;
            }
            Err(e) if tokio::time::Instant::now() > deadline => {
                let _ = child.signal(Signal::SIGINT);
                return Err(EmbeddedError::Start(
                    format!("not accepting connections after 60s: {e}"),
                    config.log_path.clone(),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    tracing::info!(pid, port = config.port, socket = %config.socket_dir().display(), "embedded PostgreSQL ready");
    Ok(())
}

/// Stops the postmaster of the cluster under `root` (`<data>/postgres`), if
/// one runs: fast shutdown, then an immediate one if it lingers. Returns its pid.
pub async fn stop(root: &Path) -> Result<Option<i32>, EmbeddedError> {
    let Some(running) = running_postmaster(&root.join("cluster"))? else { return Ok(None) };
    stop_process(&running.process).await;
    Ok(Some(running.process.pid()))
}

/// SIGINT (fast shutdown: sessions ended, a checkpoint written), then
/// SIGQUIT after 30 s; returns once the postmaster is gone.
async fn stop_process(postmaster: &nx_runtime::sys::Pidfd) {
    let pid = postmaster.pid();
    for (signal, wait) in [(Signal::SIGINT, 30), (Signal::SIGQUIT, 30), (Signal::SIGKILL, 30)] {
        let _ = postmaster.signal(signal);
        for _ in 0..wait * 10 {
            if postmaster.exited() {
                tracing::info!(pid, "embedded PostgreSQL stopped");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(pid, ?signal, "PostgreSQL did not stop; sending a stronger signal");
    }
}

async fn initdb(pm: &ProcessManager, config: &EmbeddedConfig, password: &str) -> Result<(), EmbeddedError> {
    let cluster = config.cluster_dir();
    // initdb reads the superuser password from a file the cluster's user can read.
    let pwname = format!("pwfile-{}", Alphanumeric.sample_string(&mut rand::rngs::OsRng, 8));
    let pwfile = config.socket_dir().join(&pwname);
    write_owned(&config.socket_dir(), &pwname, password, config.ids)?;
    let mut cmd = Command::new(config.bin.join("initdb")).args([
        "-D".into(),
        cluster.clone().into_os_string(),
        "-U".into(),
        ADMIN_ROLE.into(),
        "--auth-local=scram-sha-256".into(),
        "--auth-host=scram-sha-256".into(),
        "--encoding=UTF8".into(),
        "--no-locale".into(),
        format!("--pwfile={}", pwfile.display()).into(),
    ]);
    cmd.env = vec![("LC_ALL".into(), "C".into())];
    cmd.cwd = Some(config.root.clone());
    cmd.user = Some(config.ids);
    tracing::info!(data = %cluster.display(), "initialising the embedded PostgreSQL cluster");
    let out = pm.output(cmd).await;
    let _ = std::fs::remove_file(&pwfile);
    let out = out?;
    if !out.status.success() {
        // Leave an empty directory, so the next start runs initdb again.
        if let Ok(entries) = std::fs::read_dir(&cluster) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
        return Err(EmbeddedError::Initdb(out.last_words()));
    }
    Ok(())
}

/// The postmaster serving `cluster`, from its `postmaster.pid`: a process
/// with that pid, named postgres, working in that directory (a postmaster
/// keeps its data directory as its working directory). A file naming any
/// other process (the pid was recycled after a crash) is stale and removed
/// here, since PostgreSQL itself would take a live process of another user
/// for a running postmaster and refuse to start; its shared memory check
/// still stops it if backends of a dead postmaster linger.
fn running_postmaster(cluster: &Path) -> Result<Option<Running>, EmbeddedError> {
    let pid_file = cluster.join("postmaster.pid");
    let text = match std::fs::read_to_string(&pid_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EmbeddedError::Io { path: pid_file, source: e }),
    };
    let lines: Vec<&str> = text.lines().collect();
    let field = |i: usize| lines.get(i).map(|l| l.trim()).filter(|l| !l.is_empty());
    let process = field(0)
        .and_then(|l| l.parse::<i32>().ok())
        .filter(|&pid| pid > 0)
        .and_then(|pid| nx_runtime::sys::Pidfd::open(pid).ok())
        .filter(|p| is_postmaster_of(p.pid(), cluster));
    let Some(process) = process else {
        tracing::info!(file = %pid_file.display(), "removing a stale postmaster.pid (its process is gone)");
        std::fs::remove_file(&pid_file).map_err(io_err(&pid_file))?;
        return Ok(None);
    };
    Ok(Some(Running { process, port: field(3).and_then(|l| l.parse().ok()), socket_dir: field(4).map(PathBuf::from) }))
}

/// Whether process `pid` is a postgres working in `cluster`.
fn is_postmaster_of(pid: i32, cluster: &Path) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let named_postgres = std::fs::read_to_string(proc.join("comm")).is_ok_and(|c| c.trim() == "postgres");
    named_postgres && std::fs::read_link(proc.join("cwd")).is_ok_and(|cwd| same_path(&cwd, cluster))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hba_admits_apps_only_to_their_own_database_and_the_superuser_only_locally() {
        let rules = hba_rules();
        assert!(rules.contains("host samerole all 127.0.0.1/32 scram-sha-256"));
        assert!(!rules.contains("trust"));
        assert!(!rules.lines().any(|l| l.starts_with("host all all")));
        // First match wins: the superuser's reject comes before any host rule
        // that would ask it for a password.
        let host_rules: Vec<&str> = rules.lines().filter(|l| l.starts_with("host")).collect();
        assert_eq!(host_rules[0], format!("host all {ADMIN_ROLE} all reject"));
    }

    /// A fresh directory under the system's temporary directory.
    fn scratch_dir(what: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("nx-{what}-{}", Alphanumeric.sample_string(&mut rand::rngs::OsRng, 8)));
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn a_link_planted_where_the_file_goes_is_replaced_not_followed() {
        use std::os::unix::fs::MetadataExt;
        let dir = scratch_dir("hba");
        let victim = dir.join("victim");
        std::fs::write(&victim, "root's own").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let before = std::fs::metadata(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("pg_hba.conf")).unwrap();
        // Root hands the file to another user; anyone else hands it to itself.
        let ids = if nx_runtime::sys::effective_uid() == 0 { (65534, 65534) } else { (before.uid(), before.gid()) };

        write_owned(&dir, "pg_hba.conf", "rules\n", ids).unwrap();

        let written = std::fs::symlink_metadata(dir.join("pg_hba.conf")).unwrap();
        assert!(written.file_type().is_file(), "the link itself was replaced by a file");
        assert_eq!((written.uid(), written.gid(), written.mode() & 0o7777), (ids.0, ids.1, 0o600));
        assert_eq!(std::fs::read_to_string(dir.join("pg_hba.conf")).unwrap(), "rules\n");
        let after = std::fs::metadata(&victim).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's own", "the link's target was not written");
        assert_eq!((after.uid(), after.gid(), after.mode()), (before.uid(), before.gid(), before.mode()));
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_swapped_for_a_link_is_refused() {
        let dir = scratch_dir("hba-dir");
        let elsewhere = scratch_dir("hba-elsewhere");
        let link = dir.join("cluster");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let err = write_owned(&link, "pg_hba.conf", "rules\n", (0, 0)).unwrap_err();
        let EmbeddedError::Io { source, .. } = &err else { panic!("{err}") };
        // O_DIRECTORY|O_NOFOLLOW on a link: Linux answers ENOTDIR.
        assert_eq!(source.raw_os_error(), Some(nix::errno::Errno::ENOTDIR as i32), "{err}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "nothing written through the link");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&elsewhere).unwrap();
    }

    #[test]
    fn a_postmaster_pid_naming_another_process_is_stale_and_removed() {
        let cluster = scratch_dir("stale-pid");
        // This test's own process: alive, but not a postgres working there.
        std::fs::write(cluster.join("postmaster.pid"), format!("{}\n{}\n", std::process::id(), cluster.display()))
            .unwrap();
        assert!(running_postmaster(&cluster).unwrap().is_none());
        assert!(!cluster.join("postmaster.pid").exists(), "the stale file is removed");
        // A file naming no process at all, and none at all.
        std::fs::write(cluster.join("postmaster.pid"), "not a pid\n").unwrap();
        assert!(running_postmaster(&cluster).unwrap().is_none());
        assert!(running_postmaster(&cluster).unwrap().is_none());
        std::fs::remove_dir_all(&cluster).unwrap();
    }

    #[test]
    fn a_missing_bin_dir_names_the_fix() {
        let err = find_bin_dir(Some(Path::new("/nonexistent")), &["initdb"]).unwrap_err();
        assert!(err.to_string().contains("--pg-bin"), "{err}");
    }
}
