//! The host directories a sandbox's minimal root is bound from, one mount
//! each: its `/dev` ([`install_dev`], one per host) and its `/etc`
//! ([`write_etc`], one per app in the receiver).
//!
//! bwrap's own `--dev` builds `/dev` from a tmpfs, six binds of the host's
//! device nodes and a devpts, and bwrap re-reads the whole mount table after
//! every bind; `/etc` was bound file by file. On the VM of bench/RESULTS.md
//! that was about 1.5 ms of every sandbox's start, and two superblocks of its
//! kernel memory. A directory of the same device nodes, made once, is bound
//! instead, and so is a directory of the app's `/etc` files.
//!
//! What the sandbox sees does not widen: the same six nodes, none of the
//! host's others; `/dev` and `/etc` belong to root, so the app (an
//! unprivileged uid whose host owner is not root) can add nothing to either.
//! What it loses is the devpts of bwrap's `--dev`: no pseudo-terminals, and
//! `/dev/shm` leads into the sandbox's own size-limited `/tmp`.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::spec::{bwrap_args, HostLayout, SandboxSpec};
use crate::sys;

/// Every sandbox's device nodes, `(name, (major, minor))`: the ones bwrap's
/// `--dev` binds from the host.
const DEVICES: [(&str, (u64, u64)); 6] =
    [("null", (1, 3)), ("zero", (1, 5)), ("full", (1, 7)), ("random", (1, 8)), ("urandom", (1, 9)), ("tty", (5, 0))];

/// And its links, `(name, target)`, resolved inside the sandbox. `shm` leads
/// into its `/tmp`, so POSIX shared memory counts against that size.
const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("shm", "/tmp"),
];

/// Why a directory of a sandbox's root could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// Another user could change every sandbox's `/dev` through `dir`.
    #[error("{} must be a directory of uid {uid} that no other user can write to: whoever can change files there changes every sandbox's /dev", .dir.display())]
    UnsafeDir { dir: PathBuf, uid: u32 },
    #[error("cannot write {}: {source}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    /// Device nodes there cannot be opened, by root neither.
    #[error("the device nodes in {} cannot be opened (is its file system mounted nodev?): {source}", .path.display())]
    NoDevices { path: PathBuf, source: io::Error },
    #[error("{path:?} is not a plain path below /etc")]
    MountPoint { path: String },
}

/// Makes `dir/dev`, the `/dev` of every sandbox ([`HostLayout::dev`]),
/// unless it is there as this process's uid made it, and returns its path.
/// `dir` must be this process's and writable by no one else (the directory
/// [`crate::spec::install_init`] takes). A directory in the way that is not
/// exactly right is renamed aside, never emptied: a sandbox still running
/// may have it bound. Making device nodes takes root; a file system mounted
/// `nodev` is refused. Either way the caller can fall back to bwrap's own
/// `--dev` (a `HostLayout` without `dev`).
pub fn install_dev(dir: &Path) -> Result<PathBuf, RootError> {
    let uid = sys::effective_uid();
    if !crate::spec::ours_alone(dir, uid) {
        return Err(RootError::UnsafeDir { dir: dir.to_owned(), uid });
    }
    let path = dir.join("dev");
    if !is_current(&path, uid) {
        let tmp = dir.join(".dev.tmp");
        make_dev(&tmp).map_err(|source| RootError::Write { path: tmp.clone(), source })?;
        if std::fs::symlink_metadata(&path).is_ok() {
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let aside = dir.join(format!(".dev.replaced-{}", stamp.as_nanos()));
            std::fs::rename(&path, &aside).map_err(|source| RootError::Write { path: path.clone(), source })?;
        }
        std::fs::rename(&tmp, &path).map_err(|source| RootError::Write { path: path.clone(), source })?;
    }
    let null = path.join("null");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&null)
        .map_err(|source| RootError::NoDevices { path: path.clone(), source })?;
    Ok(path)
}

fn make_dev(at: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(at) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::create_dir(at)?;
    // Set after creation: the mode given to mkdir and mknod is cut by the umask.
    std::fs::set_permissions(at, PermissionsExt::from_mode(0o755))?;
    for (name, numbers) in DEVICES {
        let node = at.join(name);
        sys::make_char_device(&node, 0o666, numbers)?;
        std::fs::set_permissions(&node, PermissionsExt::from_mode(0o666))?;
    }
    for (name, target) in DEV_LINKS {
        std::os::unix::fs::symlink(target, at.join(name))?;
    }
    Ok(())
}

/// Whether `path` is a directory of `uid` (0755) holding exactly
/// [`DEVICES`] (0666, of `uid`) and [`DEV_LINKS`].
fn is_current(path: &Path, uid: u32) -> bool {
    let dir_ok =
        std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o7777 == 0o755);
    let Ok(entries) = std::fs::read_dir(path) else { return false };
    let mut seen = 0;
    for entry in entries {
        let Ok(entry) = entry else { return false };
        let Ok(meta) = entry.path().symlink_metadata() else { return false };
        let name = entry.file_name();
        let device = DEVICES.iter().find(|(n, _)| name == *n);
        let link = DEV_LINKS.iter().find(|(n, _)| name == *n);
        let right = match (device, link) {
            (Some((_, numbers)), _) => {
                meta.file_type().is_char_device()
                    && sys::device_numbers(meta.rdev()) == *numbers
                    && meta.mode() & 0o7777 == 0o666
                    && meta.uid() == uid
            }
            (None, Some((_, target))) => {
                meta.file_type().is_symlink() && std::fs::read_link(entry.path()).is_ok_and(|t| t == Path::new(target))
            }
            (None, None) => false,
        };
        if !right {
            return false;
        }
        seen += 1;
    }
    dir_ok && seen == DEVICES.len() + DEV_LINKS.len()
}

/// Writes the sandbox's `/etc` into `spec.etc` (nothing without one):
/// `files` as `(name, contents)`, mode 0644; then an empty file at each
/// point below `/etc` where [`bwrap_args`] binds a host file (the loader's
/// cache, the CA certificates), which bwrap cannot create inside the
/// directory it has bound read-only. Running sandboxes see the directory
/// live: a file whose bytes are already there is left alone, and a changed
/// one is written aside and renamed over the old, so a sandbox reads the
/// old file or the new one, never a torn one. Modes are set, not left to
/// the umask: the app's uid must read all of it. The directory may be
/// shared by sandboxes whose files are the same (the receiver's deployments
/// of one app): an empty file left for a bind one of them does not make is
/// harmless to the others.
pub fn write_etc(spec: &SandboxSpec, host: &HostLayout, files: &[(&str, String)]) -> Result<(), RootError> {
    static TMP: AtomicU64 = AtomicU64::new(0);
    let Some(dir) = &spec.etc else { return Ok(()) };
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| RootError::Write { path, source }
    };
    make_dir(dir).map_err(failed(dir))?;
    for (name, contents) in files {
        let path = dir.join(name);
        if std::fs::read(&path).ok().as_deref() == Some(contents.as_bytes()) {
            continue;
        }
        // Not `sys::replace_file_in`: that one guards a directory another
        // user owns and syncs each file; this one is root's alone, and its
        // files are written again at every start, so a sync would only add
        // a disk flush per file to every push.
        // Named for this writer alone: deployments of one app share the
        // directory, and two may be written at once.
        let tmp = dir.join(format!(".{name}.{}-{}.tmp", std::process::id(), TMP.fetch_add(1, Ordering::Relaxed)));
        let written = std::fs::write(&tmp, contents)
            .and_then(|()| std::fs::set_permissions(&tmp, PermissionsExt::from_mode(0o644)))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            // Every deployment of the app sees this directory: a failed
            // write (a full disk) leaves nothing of its own behind.
            let _ = std::fs::remove_file(&tmp);
            return Err(failed(&path)(e));
        }
    }
    // Only bwrap's own options count: after `--` come the app's arguments.
    let args = bwrap_args(spec, host);
    let options = &args[..args.iter().position(|a| a == "--").unwrap_or(args.len())];
    let points =
        options.windows(3).filter(|w| w[0] == "--ro-bind").filter_map(|w| w[2].to_str()?.strip_prefix("/etc/"));
    for point in points {
        if !Path::new(point).components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(RootError::MountPoint { path: format!("/etc/{point}") });
        }
        let path = dir.join(point);
        if std::fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        let mut parent = dir.to_path_buf();
        for part in Path::new(point).parent().into_iter().flat_map(Path::components) {
            parent.push(part);
            make_dir(&parent).map_err(failed(&parent))?;
        }
        std::fs::write(&path, b"")
            .and_then(|()| std::fs::set_permissions(&path, PermissionsExt::from_mode(0o644)))
            .map_err(failed(&path))?;
    }
    Ok(())
}

/// `dir`, made if missing, mode 0755.
fn make_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    std::fs::set_permissions(dir, PermissionsExt::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dev: Option<PathBuf>) -> HostLayout {
        HostLayout {
            usr: "/usr".into(),
            lib_entries: vec![],
            ld_cache: Some("/etc/ld.so.cache".into()),
            init: "/srv/nx/bin/nx-init".into(),
            dev,
        }
    }

    fn spec(etc: &Path, dynamic: bool) -> SandboxSpec {
        SandboxSpec {
            hostname: "web".into(),
            binary: "/b".into(),
            binary_name: "b".into(),
            args: vec![],
            data_dir: "/d".into(),
            etc: Some(etc.to_owned()),
            dynamic,
            tmp_size_bytes: 1,
            seccomp_fd: None,
            env_fd: None,
            go_fd: None,
            share_net: true,
            ro_binds: vec![("/etc/ssl/certs/ca-certificates.crt".into(), "/etc/ssl/certs/ca-certificates.crt".into())],
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn etc_holds_its_files_and_a_mount_point_for_every_bind_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        let files = [("passwd", "web:x:1000\n".to_owned()), ("hosts", "127.0.0.1 web\n".to_owned())];
        write_etc(&spec(&etc, false), &layout(None), &files).unwrap();
        assert_eq!(names(&etc), ["hosts", "passwd", "ssl"]);
        assert_eq!(std::fs::read_to_string(etc.join("passwd")).unwrap(), "web:x:1000\n");
        assert_eq!(std::fs::metadata(etc.join("passwd")).unwrap().mode() & 0o777, 0o644);
        assert_eq!(std::fs::read(etc.join("ssl/certs/ca-certificates.crt")).unwrap(), b"");

        // A dynamic binary also gets the loader's cache bound over /etc.
        let ino = std::fs::metadata(etc.join("passwd")).unwrap().ino();
        write_etc(&spec(&etc, true), &layout(None), &files).unwrap();
        assert_eq!(names(&etc), ["hosts", "ld.so.cache", "passwd", "ssl"]);
        assert_eq!(std::fs::metadata(etc.join("passwd")).unwrap().ino(), ino, "the same bytes are left alone");
        // Changed contents replace the file whole, by rename, and leave
        // nothing aside; modes are set whatever the umask.
        let changed = [("passwd", "web:x:1000:changed\n".to_owned())];
        write_etc(&spec(&etc, true), &layout(None), &changed).unwrap();
        assert_eq!(std::fs::read_to_string(etc.join("passwd")).unwrap(), "web:x:1000:changed\n");
        assert_ne!(std::fs::metadata(etc.join("passwd")).unwrap().ino(), ino);
        assert_eq!(names(&etc), ["hosts", "ld.so.cache", "passwd", "ssl"]);
        for path in [etc.clone(), etc.join("ssl"), etc.join("ssl/certs")] {
            assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o755, "{}", path.display());
        }
        assert_eq!(std::fs::metadata(etc.join("ld.so.cache")).unwrap().mode() & 0o7777, 0o644);
    }

    #[test]
    fn writers_sharing_one_etc_never_leave_a_torn_or_stray_file() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        // Two versions of the files, as when the resolver changes while
        // deployments of one app start.
        let version = |n: usize| [("passwd", format!("web:x:1000:{n}\n").repeat(500)), ("hosts", format!("{n}\n"))];
        std::thread::scope(|scope| {
            for writer in 0..8 {
                let etc = &etc;
                scope.spawn(move || {
                    for round in 0..40 {
                        write_etc(&spec(etc, writer % 2 == 0), &layout(None), &version(round % 2)).unwrap();
                        let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
                        assert!(passwd == version(0)[0].1 || passwd == version(1)[0].1, "torn: {} bytes", passwd.len());
                    }
                });
            }
        });
        assert_eq!(names(&etc), ["hosts", "ld.so.cache", "passwd", "ssl"], "no writer's file left aside");
    }

    #[test]
    fn a_file_that_cannot_be_replaced_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(etc.join("hosts/inside")).unwrap();
        let err = write_etc(&spec(&etc, false), &layout(None), &[("hosts", "x\n".to_owned())]).unwrap_err();
        assert!(err.to_string().contains("hosts"), "{err}");
        assert_eq!(names(&etc), ["hosts"], "only what was there");
    }

    #[test]
    fn the_apps_own_arguments_make_no_mount_point() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        let mut s = spec(&etc, false);
        s.args = vec!["--ro-bind".into(), "x".into(), "/etc/planted".into()];
        write_etc(&s, &layout(None), &[]).unwrap();
        assert_eq!(names(&etc), ["ssl"]);
    }

    #[test]
    fn a_bind_that_would_leave_etc_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(&dir.path().join("etc"), false);
        s.ro_binds = vec![("/x".into(), "/etc/../escape".into())];
        let err = write_etc(&s, &layout(None), &[]).unwrap_err();
        assert_eq!(err.to_string(), "\"/etc/../escape\" is not a plain path below /etc");
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn dev_holds_the_six_nodes_and_is_made_again_only_when_it_differs() {
        if sys::effective_uid() != 0 {
            assert!(std::env::var_os("CI").is_none(), "making device nodes needs root, and CI runs as root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let dev = install_dev(dir.path()).unwrap();
        assert_eq!(dev, dir.path().join("dev"));
        assert_eq!(
            names(&dev),
            ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"]
        );
        let urandom = std::fs::metadata(dev.join("urandom")).unwrap();
        assert!(urandom.file_type().is_char_device());
        assert_eq!(sys::device_numbers(urandom.rdev()), (1, 9));
        assert_eq!(urandom.mode() & 0o7777, 0o666);
        assert_eq!(std::fs::metadata(&dev).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::read_link(dev.join("shm")).unwrap(), Path::new("/tmp"));

        // Right as it is: left alone (a running sandbox's bind stays valid).
        let ino = std::fs::metadata(&dev).unwrap().ino();
        install_dev(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&dev).unwrap().ino(), ino);
        // One node more (the host's disk, say): set aside whole, and made anew.
        sys::make_char_device(&dev.join("vda"), 0o666, (254, 0)).unwrap();
        install_dev(dir.path()).unwrap();
        assert!(!dev.join("vda").exists());
        assert_ne!(std::fs::metadata(&dev).unwrap().ino(), ino);
        let aside: Vec<_> = names(dir.path()).into_iter().filter(|n| n.starts_with(".dev.replaced-")).collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(dir.path().join(&aside[0]).join("vda").exists(), "what a sandbox may have bound is not emptied");
    }

    #[test]
    fn dev_is_never_made_in_a_directory_others_can_write() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o777)).unwrap();
        let err = install_dev(dir.path()).unwrap_err();
        assert!(matches!(err, RootError::UnsafeDir { .. }), "{err}");
        assert!(!dir.path().join("dev").exists());
    }
}
