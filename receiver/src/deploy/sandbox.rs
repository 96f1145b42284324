//! What a deployment's sandbox is made of: its binary, mounts, files in
//! `/etc`, environment (platform variables, the app's, the push's), arguments,
//! limits and health check.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nx_protocol::api::HealthSetting;
use nx_runtime::spec::{group_file, hosts_file, passwd_file, SandboxSpec};
use nx_runtime::supervisor::{Liveness, RestartPolicy, SandboxConfig};
use nx_runtime::HealthCheck;

use super::{io_err, DeployError, Deployer};
use crate::db::{AppRow, DeploymentRow};
use nx_cluster::app_database_env;

/// Variables the platform sets and pushes may not override.
pub const RESERVED_ENV: [&str; 4] = ["PORT", "HOST", "NX_APP", "NX_DEPLOYMENT"];

/// Checks pushed variables: names a shell would accept, no NUL bytes, nothing
/// the platform sets itself.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), DeployError> {
    for (k, v) in env {
        let valid = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(DeployError::Invalid(format!(
                "environment variable name {k:?} is invalid: use letters, digits and '_', not starting with a digit"
            )));
        }
        if RESERVED_ENV.contains(&k.as_str()) {
            return Err(DeployError::Invalid(format!("{k} is set by the platform and cannot be overridden")));
        }
        if v.contains('\0') {
            return Err(DeployError::Invalid(format!("the value of {k} contains a NUL byte")));
        }
    }
    Ok(())
}

/// Expands `$PORT`, `${PORT}`, `$HOST`, `$NX_APP` and `$NX_DEPLOYMENT` in an
/// argument; `$$` is a literal `$`. Secrets are never expanded: arguments are
/// visible to every user of the host.
pub fn expand_arg(arg: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let (name, after) = match rest.strip_prefix('{') {
            Some(r) => match r.find('}') {
                Some(end) => (&r[..end], &r[end + 1..]),
                None => ("", rest),
            },
            None => {
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                (&rest[..end], &rest[end..])
            }
        };
        match vars.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => {
                out.push_str(v);
                rest = after;
            }
            None => {
                // Unknown names stay as written.
                out.push('$');
            }
        }
    }
    out.push_str(rest);
    out
}

/// Creates `dir` (its parent is root's) and makes it root's with mode 0750 and
/// group `gid`, on the open descriptor.
fn group_only_dir(dir: &Path, gid: u32) -> Result<(), DeployError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(io_err(dir))?;
    std::os::unix::fs::fchown(&d, Some(0), Some(gid)).map_err(io_err(dir))?;
    d.set_permissions(std::fs::Permissions::from_mode(0o750)).map_err(io_err(dir))
}

/// Puts the stored binary `sha256` at `dest` (in a root-owned directory
/// that holds it alone, [`SandboxSpec::binary`]): a hard link, kept while
/// it is one to the stored file, or a copy where the store is on another
/// filesystem. Either is made in `scratch` and renamed over `dest`, so a
/// running replica's `/app` never misses its binary. A copy is made once
/// per deployment and kept by later starts while `scratch/binary.sha256`
/// names its digest: a restart or a wake binds the same file, and 100 MB
/// are not copied at every start.
fn link_or_copy(stored: &Path, sha256: &str, dest: &Path, scratch: &Path) -> Result<(), DeployError> {
    use std::os::unix::fs::MetadataExt;
    let identity = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let marker = scratch.join("binary.sha256");
    let linked = identity(dest).is_some_and(|d| Some(d) == identity(stored));
    if linked || (dest.exists() && std::fs::read_to_string(&marker).is_ok_and(|m| m == sha256)) {
        return Ok(());
    }
    let part = scratch.join("binary.part");
    for stale in [&marker, &part] {
        match std::fs::remove_file(stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(stale)(e)),
            _ => {}
        }
    }
    let copied = match std::fs::hard_link(stored, &part) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(stored, &part).map_err(io_err(&part))?;
            true
        }
        other => other.map(|()| false).map_err(io_err(&part))?,
    };
    std::fs::rename(&part, dest).map_err(io_err(dest))?;
    if copied {
        std::fs::write(&marker, sha256).map_err(io_err(&marker))?;
    }
    Ok(())
}

/// What a sandbox's configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// A start now: the deployment is recorded and its binary stored.
    Start,
    /// A sandbox made ahead of a push's deployment, while its binary is
    /// uploaded ([`super::ahead`]): nothing is recorded, and the binary is
    /// placed in its directory by the start that uses it.
    Ahead,
}

impl Deployer {
    /// The limits a deployment gets unless its app asks otherwise, and what
    /// enforces each on this host.
    pub fn default_limits(&self) -> Vec<nx_protocol::api::Enforcement> {
        let limits = self.services.config.limits_for(&nx_protocol::api::LimitSettings::default());
        let (mut report, _) = nx_runtime::cgroup::plan(&self.services.cgroups, &limits);
        report.push(self.services.volumes.plan(limits.data_bytes.unwrap_or(0)));
        report
    }

    /// Isolation besides limits: the system call filter, the devices, the
    /// network, ports and abstract sockets.
    pub fn isolation(&self) -> Vec<nx_protocol::api::Enforcement> {
        let devices = "null zero full random urandom tty".to_owned();
        let mut report = vec![
            nx_protocol::api::Enforcement::enforced("syscalls", "filtered".into(), "seccomp"),
            match &self.services.host.dev {
                Some(_) => nx_protocol::api::Enforcement::enforced("devices", devices, "a directory of root's"),
                // bwrap's /dev is the app's own tmpfs, with a devpts.
                None => nx_protocol::api::Enforcement::enforced("devices", devices + " ptmx", "bwrap --dev"),
            },
            self.services.network.clone(),
        ];
        report.extend(self.services.landlock.report());
        report
    }

    /// The sandbox of replica `index` of `row`, listening on `port`: its
    /// own cgroup and shim (named by [`super::replica_key`]), the
    /// deployment's binary, /data and database.
    pub(super) async fn sandbox_config(
        &self,
        app: &AppRow,
        row: &DeploymentRow,
        index: u32,
        port: u16,
    ) -> Result<SandboxConfig, DeployError> {
        self.configure(app, row, index, port, Stage::Start).await
    }

    /// [`Deployer::sandbox_config`] for `stage`.
    pub(super) async fn configure(
        &self,
        app: &AppRow,
        row: &DeploymentRow,
        index: u32,
        port: u16,
        stage: Stage,
    ) -> Result<SandboxConfig, DeployError> {
        let key = super::replica_key(&row.id, index);
        let uid = app.uid as u32;
        let data_root = &self.services.config.data_dir;
        let app_dir = data_root.join("apps").join(&app.name);
        let data_dir = app_dir.join("data");
        for (dir, mode) in [(data_root.join("apps"), 0o711), (app_dir.clone(), 0o711)] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).map_err(io_err(&dir))?;
        }
        let limits = self.services.config.limits_for(&app.settings.limits);
        // A fork's code gets none of the app's data: an empty /data it
        // cannot write to (made below), and none of its variables.
        let fork = row.is_fork_preview();
        let data_limit = if fork {
            nx_protocol::api::Enforcement::enforced(
                "data",
                "none".into(),
                "an empty read-only /data (a fork's preview)",
            )
        } else {
            let limit = self.services.volumes.ensure(&app_dir, uid, limits.data_bytes.unwrap_or(0)).await?;
            std::os::unix::fs::chown(&data_dir, Some(uid), Some(uid)).map_err(io_err(&data_dir))?;
            std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(&data_dir))?;
            limit
        };
        let group = self.services.config.cgroup_group();
        let mut enforced = nx_runtime::cgroup::enforce(&self.services.cgroups, &group, &key, &limits);
        enforced.report.push(data_limit);
        enforced.report.push(self.services.network.clone());
        enforced.report.extend(self.services.landlock.report());
        // A restart or a wake finds them as recorded: no commit for that.
        if row.limits.0 != enforced.report && stage == Stage::Start {
            self.services.db.set_limits(&row.id, &enforced.report).await?;
        }

        // The deployment's directory is root's and open to the app's group
        // alone: the store is closed to app uids (a binary's digest is no
        // secret), so the binary is reached through a link in here.
        let run = data_root.join("run").join(&row.id);
        group_only_dir(&run, uid)?;
        let binary_name = row
            .filename
            .as_deref()
            .map(|f| f.rsplit('/').next().unwrap_or(f))
            .filter(|f| {
                !f.is_empty()
                    && !f.starts_with('.')
                    && f.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
            .unwrap_or("app")
            .to_owned();
        let app_bin = run.join("app");
        group_only_dir(&app_bin, uid)?;
        let binary = app_bin.join(&binary_name);
        if stage == Stage::Start {
            let stored = self.services.store.materialize(&row.artifact_sha256).await?;
            link_or_copy(&stored, &row.artifact_sha256, &binary, &run)?;
        }
        let data_dir = if fork {
            let empty = run.join("data");
            std::fs::create_dir_all(&empty).map_err(io_err(&empty))?;
            std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o555)).map_err(io_err(&empty))?;
            empty
        } else {
            data_dir
        };
        // Written once the spec says what is bound below /etc.
        let etc_files = [
            ("passwd", passwd_file(&app.name)),
            ("group", group_file(&app.name)),
            ("hosts", hosts_file(&app.name)),
            ("resolv.conf", self.services.resolv_conf.clone()),
            ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n".to_owned()),
        ];
        let mut ro_binds = Vec::new();
        let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
        if ca.exists() {
            ro_binds.push((ca.to_owned(), "/etc/ssl/certs/ca-certificates.crt".to_owned()));
        }

        let password = self
            .services
            .master
            .open_str(&app.db_password)
            .map_err(|source| DeployError::Secret { app: app.name.clone(), source })?;
        let port_s = port.to_string();
        let mut env: Vec<(String, String)> = vec![
            ("PORT".into(), port_s.clone()),
            ("HOST".into(), "127.0.0.1".into()),
            ("NX_APP".into(), app.name.clone()),
            ("NX_DEPLOYMENT".into(), row.id.clone()),
            ("HOME".into(), "/data".into()),
            ("TMPDIR".into(), "/tmp".into()),
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("SSL_CERT_FILE".into(), "/etc/ssl/certs/ca-certificates.crt".into()),
        ];
        match (&row.db_name, &row.db_password) {
            (Some(name), Some(sealed)) => {
                let own = self
                    .services
                    .master
                    .open_str(sealed)
                    .map_err(|source| DeployError::Secret { app: app.name.clone(), source })?;
                env.extend(app_database_env(&self.services.endpoint, name, name, &own));
            }
            // Reserved, never made (the receiver stopped while making it):
            // never fall back to production's database.
            (Some(name), None) => {
                return Err(DeployError::Invalid(format!(
                    "its own database {name} was never made; push again to get a preview that has one"
                )))
            }
            (None, _) if fork => {
                return Err(DeployError::Invalid(
                    "a fork's preview runs on a database of its own, and it has none; push again".into(),
                ))
            }
            (None, _) => env.extend(app_database_env(&self.services.endpoint, &app.db_role, &app.db_name, &password)),
        }
        // The app's variables (none for a fork's code: they are the app's
        // secrets), then the push's own over them.
        let app_env = if fork { Vec::new() } else { self.services.db.env_sealed(app.id).await? };
        for (k, sealed) in app_env {
            let v = self
                .services
                .master
                .open_str(&sealed)
                .map_err(|source| DeployError::Secret { app: app.name.clone(), source })?;
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        }
        if let Some(sealed) = &row.env {
            let json = self
                .services
                .master
                .open(sealed)
                .map_err(|source| DeployError::Secret { app: app.name.clone(), source })?;
            let own: BTreeMap<String, String> = serde_json::from_slice(&json)
                .map_err(|e| DeployError::Internal(format!("stored environment is damaged: {e}")))?;
            for (k, v) in own {
                env.retain(|(name, _)| *name != k);
                env.push((k, v));
            }
        }
        let vars = [
            ("PORT", port_s.as_str()),
            ("HOST", "127.0.0.1"),
            ("NX_APP", app.name.as_str()),
            ("NX_DEPLOYMENT", row.id.as_str()),
        ];
        let args = row.args.0.iter().map(|a| expand_arg(a, &vars)).collect();
        let spec = SandboxSpec {
            hostname: app.name.clone(),
            binary,
            binary_name,
            args,
            data_dir,
            // One per app, not per deployment: its files name only the
            // app, so a push of an app that ran before writes nothing new
            // there (each new file costs a start a fraction of a
            // millisecond), and removing a deployment's run directory
            // cannot empty the /etc of one still running.
            etc: Some(app_dir.join("etc")),
            dynamic: row.linkage == "dynamic",
            tmp_size_bytes: limits.tmp_bytes,
            seccomp_fd: None,
            env_fd: None,
            go_fd: None,
            share_net: true,
            ro_binds,
        };
        nx_runtime::root::write_etc(&spec, &self.services.host, &etc_files)?;
        Ok(SandboxConfig {
            spec,
            host: self.services.host.clone(),
            bwrap: self.services.config.bwrap.clone(),
            host_ids: (uid, uid),
            env,
            addr: ([127, 0, 0, 1], port).into(),
            health: match &app.settings.health {
                None => HealthCheck::default(),
                Some(HealthSetting::Http { path }) => HealthCheck::Http { path: path.clone(), require_success: true },
                Some(HealthSetting::Tcp) => HealthCheck::Tcp,
            },
            start_timeout: self.services.config.start_timeout,
            stop_grace: self.services.config.stop_grace,
            restart: RestartPolicy {
                max_restarts: self.services.config.max_restarts,
                window: self.services.config.restart_window,
                backoff_base: self.services.config.restart_backoff,
                backoff_cap: std::time::Duration::from_secs(30),
            },
            liveness: Liveness {
                interval: self.services.config.health_interval,
                restart_after: self.services.config.unhealthy_restart_after,
            },
            seccomp: Some(self.services.seccomp.clone()),
            cgroup: Some(enforced.cgroup),
            rlimits: enforced.rlimits,
            proc_root: PathBuf::from("/proc"),
            landlock: self.services.landlock,
            shim: self.services.shim.clone(),
            state_dir: self.shim_dir(&key),
            pool: Some(self.services.pool.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_expand_platform_variables_only() {
        let vars = [("PORT", "20001"), ("HOST", "127.0.0.1")];
        assert_eq!(expand_arg("127.0.0.1:$PORT", &vars), "127.0.0.1:20001");
        assert_eq!(expand_arg("${HOST}:${PORT}", &vars), "127.0.0.1:20001");
        assert_eq!(expand_arg("$$PORT", &vars), "$PORT");
        assert_eq!(expand_arg("$DATABASE_URL", &vars), "$DATABASE_URL");
        assert_eq!(expand_arg("${SECRET}x", &vars), "${SECRET}x");
        assert_eq!(expand_arg("cost: 5$", &vars), "cost: 5$");
        assert_eq!(expand_arg("${PORT", &vars), "${PORT");
    }

    #[test]
    fn a_binary_copied_from_another_file_system_is_copied_once_per_digest() {
        use std::os::unix::fs::MetadataExt;
        // /dev/shm is a tmpfs and the temporary directory is not: the hard
        // link fails with EXDEV, as for a store on a disk of its own.
        let store = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
        let run = tempfile::tempdir().expect("a temporary directory");
        let dev = |p: &Path| std::fs::metadata(p).expect("metadata").dev();
        assert_ne!(
            dev(store.path()),
            dev(run.path()),
            "/dev/shm must be another file system than the temporary directory"
        );
        let stored = store.path().join("abc");
        std::fs::write(&stored, b"the first binary").expect("write");
        let dest = run.path().join("server");
        let inode = |p: &Path| std::fs::metadata(p).expect("metadata").ino();

        link_or_copy(&stored, "abc", &dest, run.path()).expect("copied");
        let first = inode(&dest);
        link_or_copy(&stored, "abc", &dest, run.path()).expect("kept");
        assert_eq!(inode(&dest), first, "a second start copied the same binary again");
        assert_eq!(std::fs::read(&dest).expect("read"), b"the first binary");

        let other = store.path().join("def");
        std::fs::write(&other, b"another binary").expect("write");
        link_or_copy(&other, "def", &dest, run.path()).expect("copied");
        assert_eq!(std::fs::read(&dest).expect("read"), b"another binary");
        assert!(!run.path().join("binary.part").exists(), "the partial copy was left behind");

        // A copy whose marker is gone (a crash between the two) is made again.
        std::fs::write(&dest, b"half a copy").expect("write");
        std::fs::remove_file(run.path().join("binary.sha256")).expect("remove");
        link_or_copy(&other, "def", &dest, run.path()).expect("copied");
        assert_eq!(std::fs::read(&dest).expect("read"), b"another binary");
    }

    #[test]
    fn env_names_and_reserved_variables_are_checked() {
        let ok: BTreeMap<String, String> = [("API_KEY".to_owned(), "x".to_owned())].into();
        assert!(validate_env(&ok).is_ok());
        for bad in ["1X", "A-B", "PORT", "NX_APP", ""] {
            let env: BTreeMap<String, String> = [(bad.to_owned(), "x".to_owned())].into();
            assert!(validate_env(&env).is_err(), "{bad}");
        }
        let nul: BTreeMap<String, String> = [("A".to_owned(), "a\0b".to_owned())].into();
        assert!(validate_env(&nul).is_err());
    }
}
