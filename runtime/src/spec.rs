//! The sandbox specification and its translation into a `bwrap` command line.
//!
//! [`bwrap_args`] is a pure function of the spec and the host layout, so every
//! isolation flag can be unit tested without starting anything. The host layout
//! (where `/usr` and the loader live, and the sandbox's pid 1) is detected once
//! by [`HostLayout::detect`] from a root directory that tests can replace with
//! a temporary one.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// The uid and gid the app has inside its sandbox. The host uid is the app's own
/// (see `SandboxSpec` users); inside, every app is user 1000, named `app`.
pub const SANDBOX_UID: u32 = 1000;
pub const SANDBOX_GID: u32 = 1000;
/// Where the binary is mounted inside the sandbox.
pub const APP_DIR: &str = "/app";
/// The app's persistent, writable directory inside the sandbox.
pub const DATA_DIR: &str = "/data";
/// Where the sandbox's pid 1 ([`crate::init`]) is mounted inside the sandbox.
pub const INIT: &str = "/nx-init";
/// The descriptor number bwrap finds the seccomp program at.
pub const SECCOMP_FD: std::os::fd::RawFd = 10;
/// The descriptor number bwrap reads the app's environment from (`--args`).
pub const ENV_FD: std::os::fd::RawFd = 11;
/// The descriptor number nx-init of a sandbox made ready ahead of its start
/// waits on for its go ([`crate::ready`]).
pub const GO_FD: std::os::fd::RawFd = 13;
/// The whole environment of bwrap itself. The app's variables never go there:
/// bwrap is a dynamically linked host program, and `LD_PRELOAD`,
/// `LD_LIBRARY_PATH`, `GCONV_PATH` and friends in its environment would make
/// the host's loader run tenant code before any namespace or filter exists.
pub const HOST_ENV: [(&str, &str); 1] = [("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")];

/// Everything that varies between sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// Host name inside the sandbox.
    pub hostname: String,
    /// Host path of the binary, named `binary_name`. Its directory, which
    /// holds nothing else, is mounted read-only at `/app`: a sandbox made
    /// before its binary is there ([`crate::ready`]) runs the one placed
    /// there by its go.
    pub binary: PathBuf,
    pub binary_name: String,
    pub args: Vec<String>,
    /// Host directory mounted read-write at `/data`.
    pub data_dir: PathBuf,
    /// Host directory mounted read-only at `/etc`, as
    /// [`crate::root::write_etc`] writes it; without one `/etc` holds only
    /// what is bound below it.
    pub etc: Option<PathBuf>,
    /// The binary loads shared libraries: mount `/usr` and the loader read-only.
    pub dynamic: bool,
    /// Size of the private `/tmp`, in bytes.
    pub tmp_size_bytes: u64,
    /// A compiled seccomp program, passed to bwrap at this descriptor number.
    pub seccomp_fd: Option<RawFd>,
    /// The app's environment as bwrap arguments ([`env_args`]), passed at this
    /// descriptor number so no value is on a command line.
    pub env_fd: Option<RawFd>,
    /// nx-init waits for the byte `g` on this descriptor before it starts
    /// the app, and ends the sandbox without starting it at the
    /// descriptor's end ([`crate::ready`]).
    pub go_fd: Option<RawFd>,
    /// Keep the host's network namespace (the app binds its loopback port there).
    pub share_net: bool,
    /// Further read-only mounts: `(host path, sandbox path)`.
    pub ro_binds: Vec<(PathBuf, String)>,
}

impl SandboxSpec {
    /// The host path bound for the app: the binary's directory, or the
    /// binary alone where it has none but the host's root (which is never
    /// bound at `/app`).
    pub fn app_source(&self) -> &Path {
        match self.binary.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && dir != Path::new("/") => dir,
            _ => &self.binary,
        }
    }
}

/// How the host's shared libraries are laid out, as far as a dynamic binary
/// needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLayout {
    /// The host's `/usr`.
    pub usr: PathBuf,
    /// Top-level entries that lead into `/usr` or hold libraries.
    pub lib_entries: Vec<RootEntry>,
    /// `/etc/ld.so.cache`, when present.
    pub ld_cache: Option<PathBuf>,
    /// The host path of `nx-init`, every sandbox's pid 1 ([`install_init`]).
    pub init: PathBuf,
    /// The host directory bound as every sandbox's `/dev`
    /// ([`crate::root::install_dev`]); without one, bwrap builds `/dev` itself.
    pub dev: Option<PathBuf>,
}

/// One top-level library entry of the host root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootEntry {
    /// A merged-/usr symlink such as `/lib -> usr/lib`.
    Symlink { path: String, target: String },
    /// A real directory, bound read-only.
    Dir { host: PathBuf, path: String },
}

impl HostLayout {
    /// Reads the layout below `root` (`/` in production); `init` is where
    /// [`install_init`] put the sandbox's pid 1, `dev` where
    /// [`crate::root::install_dev`] put its `/dev`.
    pub fn detect(root: &Path, init: PathBuf, dev: Option<PathBuf>) -> HostLayout {
        let mut lib_entries = Vec::new();
        for name in ["lib", "lib64", "lib32", "libx32", "bin", "sbin"] {
            let host = root.join(name);
            let Ok(meta) = std::fs::symlink_metadata(&host) else { continue };
            let path = format!("/{name}");
            if meta.file_type().is_symlink() {
                if let Ok(target) = std::fs::read_link(&host) {
                    lib_entries.push(RootEntry::Symlink { path, target: target.to_string_lossy().into_owned() });
                }
            } else if meta.is_dir() {
                lib_entries.push(RootEntry::Dir { host, path });
            }
        }
        let ld_cache = Some(root.join("etc/ld.so.cache")).filter(|p| p.exists());
        HostLayout { usr: root.join("usr"), lib_entries, ld_cache, init, dev }
    }
}

/// Whether `dir` is a directory of `uid` that no other user can write to.
pub(crate) fn ours_alone(dir: &Path, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o022 == 0)
}

/// `nx-init` as `build.rs` made it.
const INIT_PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nx-init"));

/// Why `nx-init` could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallInitError {
    /// Another user could replace every sandbox's pid 1 through `dir`.
    #[error("{} must be a directory of uid {uid} that no other user can write to: whoever can replace files there runs code in every sandbox", .dir.display())]
    UnsafeDir { dir: PathBuf, uid: u32 },
    #[error("cannot write {}: {source}", .path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// Writes `nx-init` to `dir/nx-init` (this process's, mode 0755, so every
/// app's uid can run it) unless the same program is there as a regular
/// file of this process's uid, and returns its path. `dir` must be this
/// process's and writable by no one else. A new program goes to a fresh
/// file (never through a link), synced, then renamed over the old one:
/// sandboxes still running keep the one they were started with, bound by
/// inode.
pub fn install_init(dir: &Path) -> Result<PathBuf, InstallInitError> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let uid = crate::sys::effective_uid();
    if !ours_alone(dir, uid) {
        return Err(InstallInitError::UnsafeDir { dir: dir.to_owned(), uid });
    }
    let path = dir.join("nx-init");
    let current = std::fs::symlink_metadata(&path)
        .is_ok_and(|m| m.file_type().is_file() && m.uid() == uid && m.mode() & 0o7777 == 0o755)
        && std::fs::read(&path).is_ok_and(|bytes| bytes == INIT_PROGRAM);
    if current {
        return Ok(path);
    }
    let tmp = dir.join(".nx-init.tmp");
    let write = |at: &Path| -> std::io::Result<()> {
        match std::fs::remove_file(at) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .custom_flags(libc::O_NOFOLLOW)
            .open(at)?;
        file.write_all(INIT_PROGRAM)?;
        // Set on the open file: the mode given at creation is cut by the umask.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        file.sync_all()
    };
    write(&tmp).map_err(|source| InstallInitError::Write { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, &path).map_err(|source| InstallInitError::Write { path: path.clone(), source })?;
    Ok(path)
}

fn push(args: &mut Vec<OsString>, items: &[&str]) {
    args.extend(items.iter().map(OsString::from));
}

fn push_bind(args: &mut Vec<OsString>, flag: &str, host: &Path, dest: &str) {
    args.push(flag.into());
    args.push(host.as_os_str().to_owned());
    args.push(dest.into());
}

/// The arguments to pass to `bwrap`: isolation flags, the minimal root, then
/// after `--` the sandbox's pid 1 and the app's command line.
pub fn bwrap_args(spec: &SandboxSpec, host: &HostLayout) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::with_capacity(64);
    push(&mut a, &["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]);
    // nx-init is pid 1 rather than a copy of bwrap (see crate::init).
    push(&mut a, &["--as-pid-1"]);
    if !spec.share_net {
        push(&mut a, &["--unshare-net"]);
    }
    // No nested user namespaces: they are the usual first step of a kernel exploit.
    push(&mut a, &["--disable-userns"]);
    let (uid, gid) = (SANDBOX_UID.to_string(), SANDBOX_GID.to_string());
    push(&mut a, &["--uid", &uid, "--gid", &gid, "--hostname", &spec.hostname]);
    // A new session keeps the app from injecting input into a terminal (TIOCSTI).
    push(&mut a, &["--die-with-parent", "--new-session", "--cap-drop", "ALL"]);
    if let Some(fd) = spec.seccomp_fd {
        push(&mut a, &["--add-seccomp-fd", &fd.to_string()]);
    }
    if let Some(fd) = spec.env_fd {
        push(&mut a, &["--args", &fd.to_string()]);
    }
    push(&mut a, &["--proc", "/proc"]);
    match &host.dev {
        Some(dev) => push_bind(&mut a, "--dev-bind", dev, "/dev"),
        None => push(&mut a, &["--dev", "/dev"]),
    }
    push(&mut a, &["--size", &spec.tmp_size_bytes.to_string(), "--perms", "1777", "--tmpfs", "/tmp"]);
    // Before the binds below /etc, which it must not cover.
    if let Some(etc) = &spec.etc {
        push_bind(&mut a, "--ro-bind", etc, "/etc");
    }
    if spec.dynamic {
        push_bind(&mut a, "--ro-bind", &host.usr, "/usr");
        for entry in &host.lib_entries {
            match entry {
                RootEntry::Symlink { path, target } => push(&mut a, &["--symlink", target, path]),
                RootEntry::Dir { host, path } => push_bind(&mut a, "--ro-bind", host, path),
            }
        }
        if let Some(cache) = &host.ld_cache {
            push_bind(&mut a, "--ro-bind", cache, "/etc/ld.so.cache");
        }
    }
    for (hostp, dest) in &spec.ro_binds {
        push_bind(&mut a, "--ro-bind", hostp, dest);
    }
    let binary_in_sandbox = format!("{APP_DIR}/{}", spec.binary_name);
    let app = spec.app_source();
    push_bind(&mut a, "--ro-bind", app, if app == spec.binary { &binary_in_sandbox } else { APP_DIR });
    push_bind(&mut a, "--ro-bind", &host.init, INIT);
    push_bind(&mut a, "--bind", &spec.data_dir, DATA_DIR);
    // The root is a tmpfs bwrap made; without this the app could create files
    // anywhere in it.
    push(&mut a, &["--remount-ro", "/", "--chdir", DATA_DIR, "--", INIT]);
    if let Some(fd) = spec.go_fd {
        push(&mut a, &["--go-fd", &fd.to_string()]);
    }
    push(&mut a, &[&binary_in_sandbox]);
    a.extend(spec.args.iter().map(OsString::from));
    a
}

/// A variable that cannot be passed to the app.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "environment variable {name:?} cannot be passed: names must be non-empty without '=' or NUL, values without NUL"
)]
pub struct InvalidEnv {
    pub name: String,
}

/// The app's environment as the NUL-separated arguments bwrap's `--args`
/// reads: `--clearenv`, then `--setenv NAME VALUE` for each variable. bwrap
/// applies them to the app only after its own loader has run.
pub fn env_args(env: &[(String, String)]) -> Result<Vec<u8>, InvalidEnv> {
    let mut out = b"--clearenv\0".to_vec();
    for (name, value) in env {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            return Err(InvalidEnv { name: name.clone() });
        }
        for part in ["--setenv", name, value] {
            out.extend_from_slice(part.as_bytes());
            out.push(0);
        }
    }
    Ok(out)
}

/// The synthetic `/etc/passwd` of every sandbox: the app user and nobody, no root
/// shell and no host accounts.
pub fn passwd_file(app: &str) -> String {
    format!("{app}:x:{SANDBOX_UID}:{SANDBOX_GID}:{app}:{DATA_DIR}:/nonexistent\nnobody:x:65534:65534:nobody:/nonexistent:/nonexistent\n")
}

/// The synthetic `/etc/group`.
pub fn group_file(app: &str) -> String {
    format!("{app}:x:{SANDBOX_GID}:\nnogroup:x:65534:\n")
}

/// The synthetic `/etc/hosts`.
pub fn hosts_file(hostname: &str) -> String {
    format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            hostname: "web".into(),
            binary: "/srv/nx/run/d1/app/server".into(),
            binary_name: "server".into(),
            args: vec!["--port".into(), "20001".into()],
            data_dir: "/srv/nx/apps/web/data".into(),
            etc: Some("/srv/nx/run/d1/etc".into()),
            dynamic: false,
            tmp_size_bytes: 64 << 20,
            seccomp_fd: Some(9),
            env_fd: Some(11),
            go_fd: None,
            share_net: true,
            ro_binds: vec![],
        }
    }

    fn layout() -> HostLayout {
        HostLayout {
            usr: "/usr".into(),
            lib_entries: vec![RootEntry::Symlink { path: "/lib".into(), target: "usr/lib".into() }],
            ld_cache: Some("/etc/ld.so.cache".into()),
            init: "/srv/nx/bin/nx-init".into(),
            dev: Some("/srv/nx/bin/dev".into()),
        }
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    fn has_seq(args: &[String], seq: &[&str]) -> bool {
        args.windows(seq.len()).any(|w| w.iter().zip(seq).all(|(a, b)| a == b))
    }

    #[test]
    fn every_namespace_is_new_and_privileges_are_dropped() {
        let a = strings(bwrap_args(&spec(), &layout()));
        for flag in [
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--disable-userns",
            "--new-session",
            "--die-with-parent",
            "--as-pid-1",
        ] {
            assert!(a.contains(&flag.to_string()), "{flag} missing");
        }
        assert!(has_seq(&a, &["--cap-drop", "ALL"]));
        assert!(has_seq(&a, &["--uid", "1000", "--gid", "1000"]));
        assert!(has_seq(&a, &["--add-seccomp-fd", "9"]));
        assert!(has_seq(&a, &["--args", "11"]));
        assert!(!a.contains(&"--unshare-net".to_string()));
        assert!(!a.iter().any(|x| x == "--setenv"), "environment values must never be on the command line");
    }

    #[test]
    fn the_environment_goes_to_bwrap_as_setenv_arguments() {
        let env = [("PGPASSWORD".to_owned(), "s3cret value".to_owned()), ("EMPTY".to_owned(), String::new())];
        assert_eq!(
            env_args(&env).unwrap(),
            b"--clearenv\0--setenv\0PGPASSWORD\0s3cret value\0--setenv\0EMPTY\0\0".to_vec()
        );
        assert_eq!(env_args(&[]).unwrap(), b"--clearenv\0".to_vec());
        for (name, value) in [("A=B", "x"), ("", "x"), ("A\0", "x"), ("A", "x\0y")] {
            let err = env_args(&[(name.to_owned(), value.to_owned())]).unwrap_err();
            assert_eq!(err, InvalidEnv { name: name.to_owned() });
        }
    }

    #[test]
    fn isolated_network_unshares_it() {
        let mut s = spec();
        s.share_net = false;
        assert!(strings(bwrap_args(&s, &layout())).contains(&"--unshare-net".to_string()));
    }

    #[test]
    fn static_binaries_get_no_host_libraries() {
        let a = strings(bwrap_args(&spec(), &layout()));
        assert!(!a.contains(&"/usr".to_string()));
        assert!(!a.contains(&"/etc/ld.so.cache".to_string()));
        // The binary's directory, which holds it alone, so that a binary
        // placed there after the sandbox was made is the one it runs.
        assert!(has_seq(&a, &["--ro-bind", "/srv/nx/run/d1/app", "/app"]));
        let mut bare = spec();
        bare.binary = "/server".into();
        let a = strings(bwrap_args(&bare, &layout()));
        assert!(has_seq(&a, &["--ro-bind", "/server", "/app/server"]), "the host's root is never bound at /app");
        assert!(has_seq(&a, &["--bind", "/srv/nx/apps/web/data", "/data"]));
        assert!(has_seq(&a, &["--size", "67108864", "--perms", "1777", "--tmpfs", "/tmp"]));
        assert!(has_seq(&a, &["--ro-bind", "/srv/nx/run/d1/etc", "/etc"]));
    }

    #[test]
    fn dev_is_the_hosts_prepared_directory_or_else_bwraps_own() {
        let a = strings(bwrap_args(&spec(), &layout()));
        assert!(has_seq(&a, &["--proc", "/proc", "--dev-bind", "/srv/nx/bin/dev", "/dev"]));
        assert!(!a.contains(&"--dev".to_string()));
        let bare = HostLayout { dev: None, ..layout() };
        let a = strings(bwrap_args(&spec(), &bare));
        assert!(has_seq(&a, &["--proc", "/proc", "--dev", "/dev"]));
        assert!(!a.contains(&"--dev-bind".to_string()));
    }

    #[test]
    fn dynamic_binaries_get_usr_read_only() {
        let mut s = spec();
        s.dynamic = true;
        let a = strings(bwrap_args(&s, &layout()));
        assert!(has_seq(&a, &["--ro-bind", "/usr", "/usr"]));
        assert!(has_seq(&a, &["--symlink", "usr/lib", "/lib"]));
        assert!(has_seq(&a, &["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]));
        // The cache is bound over the /etc directory, not under it.
        let etc = a.iter().position(|x| x == "/etc").unwrap();
        let cache = a.iter().rposition(|x| x == "/etc/ld.so.cache").unwrap();
        assert!(etc < cache);
    }

    #[test]
    fn the_command_comes_last_after_the_root_is_sealed_under_nx_init() {
        let a = strings(bwrap_args(&spec(), &layout()));
        let sep = a.iter().position(|x| x == "--").unwrap();
        assert_eq!(&a[sep + 1..], ["/nx-init", "/app/server", "--port", "20001"]);
        assert!(has_seq(&a, &["--ro-bind", "/srv/nx/bin/nx-init", "/nx-init"]));
        assert!(has_seq(&a, &["--remount-ro", "/", "--chdir", "/data", "--"]));
        let held = strings(bwrap_args(&SandboxSpec { go_fd: Some(GO_FD), ..spec() }, &layout()));
        assert_eq!(&held[sep + 1..], ["/nx-init", "--go-fd", "13", "/app/server", "--port", "20001"]);
    }

    #[test]
    fn host_layout_is_read_from_the_given_root() {
        let root = std::env::temp_dir().join(format!("nx-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::create_dir_all(root.join("lib64")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        let l = HostLayout::detect(&root, "/i".into(), Some("/dev-dir".into()));
        assert_eq!(l.usr, root.join("usr"));
        assert_eq!(l.init, PathBuf::from("/i"));
        assert_eq!(l.dev, Some(PathBuf::from("/dev-dir")));
        assert!(l.lib_entries.contains(&RootEntry::Symlink { path: "/lib".into(), target: "usr/lib".into() }));
        assert!(l.lib_entries.contains(&RootEntry::Dir { host: root.join("lib64"), path: "/lib64".into() }));
        assert_eq!(l.ld_cache, None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn nx_init_is_installed_runnable_by_all_and_replaced_only_when_it_differs() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = install_init(dir.path()).unwrap();
        assert_eq!(path, dir.path().join("nx-init"));
        let first = std::fs::metadata(&path).unwrap();
        assert_eq!(first.permissions().mode() & 0o7777, 0o755);
        assert!(std::fs::read(&path).unwrap().starts_with(b"\x7fELF"));
        // The same program is left alone (a running sandbox's bind stays valid).
        install_init(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), first.ino());
        // Another one (an older receiver's) is replaced, by a new file.
        std::fs::write(&path, b"old").unwrap();
        install_init(dir.path()).unwrap();
        let now = std::fs::metadata(&path).unwrap();
        assert_ne!(now.ino(), first.ino());
        assert_eq!(std::fs::read(&path).unwrap(), INIT_PROGRAM);
        assert!(!dir.path().join(".nx-init.tmp").exists());
        // The same bytes with a mode others could write through are replaced.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        install_init(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o755);
    }

    #[test]
    fn nx_init_is_never_written_through_a_link_nor_into_a_directory_others_can_write() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"not to be touched").unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        // Links at the file and at the temporary file are replaced, not followed.
        std::os::unix::fs::symlink(&elsewhere, bin.join("nx-init")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, bin.join(".nx-init.tmp")).unwrap();
        let path = install_init(&bin).unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_file());
        assert_eq!(std::fs::read(&path).unwrap(), INIT_PROGRAM);
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"not to be touched");

        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = install_init(&bin).unwrap_err();
        assert!(matches!(err, InstallInitError::UnsafeDir { .. }), "{err}");
        assert!(err.to_string().contains("that no other user can write to"), "{err}");
    }

    #[test]
    fn synthetic_etc_names_only_the_app() {
        assert!(passwd_file("web").starts_with("web:x:1000:1000:"));
        assert!(!passwd_file("web").contains("root"));
        assert!(hosts_file("web").contains("localhost web"));
    }
}
