//! Size-limited app data: each app's `/data` is an ext4 filesystem in a sparse
//! image file, loop-mounted (nosuid, nodev) on the app's data directory, so an
//! app that fills its disk fills only its own. Where the host has no loop
//! devices or no mkfs.ext4, the directory stays a plain directory and the data
//! limit is reported as not enforced.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nx_runtime::cgroup::{mib, Enforcement};
use nx_runtime::process::{Command, ProcessManager};

const MKFS: &str = "/usr/sbin/mkfs.ext4";

/// Failures to prepare a volume; the command's own words are kept.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot prepare the data volume {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{command} failed for {path}: {reason}")]
    Command { command: String, path: PathBuf, reason: String },
    #[error(transparent)]
    Spawn(#[from] nx_runtime::process::SpawnError),
}

/// Opens (creating, or emptying with `truncate`) an image file as root's with mode 0600, set on
/// the descriptor: the image holds the app's whole `/data`, readable through
/// it by anyone who can read the file.
fn private_file(path: &Path, truncate: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    std::os::unix::fs::fchown(&file, Some(0), Some(0))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Whether `dir` is a mount point (it sits on another device than its parent).
pub fn is_mount_point(dir: &Path) -> bool {
    let (Ok(me), Some(Ok(parent))) = (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) else {
        return false;
    };
    me.dev() != parent.dev()
}

/// Bytes in use on the data volume of the app whose directory is `app_dir`
/// (as `df` counts them); none when it has no volume of its own, since its
/// filesystem's use is then not the app's.
pub fn used_bytes(app_dir: &Path) -> Option<u64> {
    let data = app_dir.join("data");
    if !is_mount_point(&data) {
        return None;
    }
    let s = nix::sys::statvfs::statvfs(&data).ok()?;
    Some((s.blocks() - s.blocks_free()) as u64 * s.fragment_size() as u64)
}

/// Creates and mounts data volumes.
#[derive(Debug, Clone)]
pub struct Volumes {
    pm: ProcessManager,
    /// Why volumes cannot be made here, when they cannot.
    unavailable: Option<String>,
    /// Held while a volume is checked and mounted or removed: the
    /// deployments of one app start concurrently (after a restart, say) and
    /// would otherwise both find the volume unmounted and both mount it.
    mounting: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Volumes {
    /// Checks once whether this host can make loop-mounted volumes.
    pub fn probe(pm: ProcessManager) -> Volumes {
        let unavailable = if !Path::new(MKFS).exists() {
            Some(format!("{MKFS} is missing (apt-get install e2fsprogs)"))
        } else if !Path::new("/dev/loop-control").exists() {
            Some("this host has no loop devices".to_owned())
        } else {
            None
        };
        Volumes { pm, unavailable, mounting: Default::default() }
    }

    async fn run(&self, program: &str, args: &[&str], path: &Path) -> Result<(), VolumeError> {
        let out = self.pm.output(Command::new(program).args(args.iter().copied())).await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(VolumeError::Command { command: program.into(), path: path.to_owned(), reason: out.last_words() })
        }
    }

    /// Makes sure `<app_dir>/data` is a mounted volume of `size` bytes owned by
    /// `uid`, creating the image on first use. Existing data in a plain
    /// directory is never hidden: such an app keeps its directory and the limit
    /// is reported as not enforced.
    pub async fn ensure(&self, app_dir: &Path, uid: u32, size: u64) -> Result<Enforcement, VolumeError> {
        let _mounting = self.mounting.lock().await;
        let data = app_dir.join("data");
        let image = app_dir.join("data.img");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| VolumeError::Io { path, source }
        };
        std::fs::create_dir_all(&data).map_err(io(&data))?;
        if is_mount_point(&data) {
            return Ok(Enforcement::enforced("data", mib(size), "ext4 volume"));
        }
        if let Some(why) = &self.unavailable {
            return Ok(Enforcement::missing("data", mib(size), why));
        }
        if !image.exists() {
            let has_files = std::fs::read_dir(&data).map_err(io(&data))?.next().is_some();
            if has_files {
                return Ok(Enforcement::missing(
                    "data",
                    mib(size),
                    "the app's data directory predates volumes and is kept as it is",
                ));
            }
            let tmp = app_dir.join("data.img.tmp");
            let file = private_file(&tmp, true).map_err(io(&tmp))?;
            file.set_len(size).map_err(io(&tmp))?;
            drop(file);
            let owner = format!("root_owner={uid}:{uid}");
            let tmp_s = tmp.to_string_lossy().into_owned();
            self.run(MKFS, &["-q", "-F", "-m", "0", "-E", &owner, &tmp_s], &tmp).await?;
            std::fs::rename(&tmp, &image).map_err(io(&image))?;
        }
        // Images made before they were private are made so before each mount.
        private_file(&image, false).map_err(io(&image))?;
        let (image_s, data_s) = (image.to_string_lossy().into_owned(), data.to_string_lossy().into_owned());
        self.run("/usr/bin/mount", &["-o", "loop,nosuid,nodev", &image_s, &data_s], &data).await?;
        // The filesystem root is the app's alone; lost+found is not needed.
        let _ = std::fs::remove_dir(data.join("lost+found"));
        std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(io(&data))?;
        Ok(Enforcement::enforced("data", mib(size), "ext4 volume"))
    }

    /// How a data volume of `size` bytes would be limited on this host.
    pub fn plan(&self, size: u64) -> Enforcement {
        match &self.unavailable {
            Some(why) => Enforcement::missing("data", mib(size), why),
            None => Enforcement::enforced("data", mib(size), "ext4 volume"),
        }
    }

    /// Removes an app's directory with its data volume (unmounted first), once
    /// its sandboxes are gone.
    pub async fn remove(&self, app_dir: &Path) -> Result<(), VolumeError> {
        let _mounting = self.mounting.lock().await;
        let data = app_dir.join("data");
        if is_mount_point(&data) {
            let d = data.to_string_lossy().into_owned();
            self.run("/usr/bin/umount", &[&d], &data).await?;
        }
        match std::fs::remove_dir_all(app_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(VolumeError::Io { path: app_dir.to_owned(), source }),
        }
    }

    /// Unmounts every app volume below `apps_dir` (at shutdown, after the
    /// sandboxes stopped).
    pub async fn unmount_all(&self, apps_dir: &Path) {
        let Ok(entries) = std::fs::read_dir(apps_dir) else { return };
        for e in entries.flatten() {
            let data = e.path().join("data");
            if is_mount_point(&data) {
                let d = data.to_string_lossy().into_owned();
                if let Err(err) = self.run("/usr/bin/umount", &[&d], &data).await {
                    tracing::warn!(path = %data.display(), error = %err, "cannot unmount a data volume");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_told_apart() {
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(&std::env::temp_dir().join("nonexistent-nx-dir")));
        let d = std::env::temp_dir().join(format!("nx-vol-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert!(!is_mount_point(&d));
    }
}
