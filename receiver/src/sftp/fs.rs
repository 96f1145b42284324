//! The tree an SFTP user sees: `/` holds one folder per app its key is
//! registered for; `/APP` holds the files uploaded there and, next to each,
//! `NAME.deploy.txt` with what became of it. Writing `/APP/NAME` is a push:
//! when the file is closed it is verified, stored, started and routed like
//! `nx push`, and the outcome is written next to it.
//!
//! Everything else is refused with a status that says why: `..` in a path,
//! anything outside an app's folder, folders inside one, links, set-id bits,
//! renames and removals, reading binaries back, and writes past the upload
//! limit. A file whose connection drops before it is closed is discarded,
//! and so is one still open past --upload-timeout.
//!
//! The key is looked up again whenever a file or an app's folder is opened
//! and when an upload is closed: with a key revoked (or an app removed)
//! since login, nothing more is read and nothing is deployed.
//! Handles are counted per key, across its connections and sessions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nx_protocol::api::{DeploymentInfo, DeploymentState, PushMeta, Source};
use nx_protocol::logs::neutralise;
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Packet, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;

use crate::db::{AppRow, Db};
use crate::deploy::{Deployer, PushedBy};
use nx_store::shares::{Share, Shares};
use nx_store::{ArtifactStore, PartialUpload, StoreError};

/// Handles (files and folders) one key may hold open at once, over all its
/// connections and sessions: each holds memory or a temporary file, and a
/// client opening without closing must run out here, not in the receiver's
/// descriptors or disk.
pub const MAX_HANDLES: usize = 16;

/// The suffix of the outcome files.
pub const OUTCOME: &str = ".deploy.txt";

/// What every session shares.
#[derive(Debug)]
pub struct Shared {
    pub deployer: Arc<Deployer>,
    pub db: Db,
    pub store: ArtifactStore,
    pub max_upload: u64,
    /// How often live sessions look their key up again (--ssh-key-recheck).
    pub key_recheck: std::time::Duration,
    /// Handles open per key (by fingerprint), at most [`MAX_HANDLES`].
    pub handles: Shares<String>,
}

/// The key a session logged in with.
#[derive(Debug, Clone)]
pub struct Login {
    /// SHA256 fingerprint, as the database and the audit log name it.
    pub fingerprint: String,
    /// OpenSSH text without comment.
    pub public_key: String,
    /// Set once the key is found revoked; shared by the connection's sessions.
    pub revoked: Arc<AtomicBool>,
}

/// Where a path points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Root,
    App(String),
    File { app: String, name: String },
}

impl Place {
    /// Reads a client path: absolute or relative to `/`, `.` ignored, `..`
    /// and anything deeper than `/APP/FILE` refused.
    pub fn parse(path: &str) -> Result<Place, StatusReply> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        if parts.contains(&"..") {
            return Err(denied(format!("{path}: paths may not contain '..'; upload to APP/FILE")));
        }
        match parts.as_slice() {
            [] => Ok(Place::Root),
            [app] => Ok(Place::App((*app).to_owned())),
            [app, name] => Ok(Place::File { app: (*app).to_owned(), name: (*name).to_owned() }),
            _ => Err(denied(format!("{path}: there are no folders inside an app's folder; upload to APP/FILE"))),
        }
    }

    fn path(&self) -> String {
        match self {
            Place::Root => "/".into(),
            Place::App(a) => format!("/{a}"),
            Place::File { app, name } => format!("/{app}/{name}"),
        }
    }
}

fn denied(message: impl Into<String>) -> StatusReply {
    StatusCode::PermissionDenied.with_message(message)
}

fn missing(message: impl Into<String>) -> StatusReply {
    StatusCode::NoSuchFile.with_message(message)
}

fn failure(message: impl Into<String>) -> StatusReply {
    StatusCode::Failure.with_message(message)
}

fn internal(e: impl std::fmt::Display) -> StatusReply {
    tracing::error!(error = %e, "sftp request failed");
    failure("internal error on the receiver; see its log")
}

fn ok(id: u32, message: impl Into<String>) -> Status {
    Status { id, status_code: StatusCode::Ok, error_message: message.into(), language_tag: "en-US".into() }
}

fn dir_attrs() -> FileAttributes {
    FileAttributes { permissions: Some(0o040_755), ..FileAttributes::empty() }
}

fn file_attrs(size: u64, mtime: u32) -> FileAttributes {
    FileAttributes {
        size: Some(size),
        permissions: Some(0o100_644),
        mtime: Some(mtime),
        atime: Some(mtime),
        ..FileAttributes::empty()
    }
}

/// An open handle.
#[derive(Debug)]
enum Open {
    Upload { app: Box<AppRow>, name: String, upload: Option<PartialUpload>, refused: Option<String> },
    Read(Vec<u8>),
    Dir { entries: Vec<File>, sent: bool },
}

/// One SFTP session of a key.
#[derive(Debug)]
pub struct Session {
    shared: Arc<Shared>,
    /// The apps the key may upload to, as of its login.
    apps: Vec<AppRow>,
    login: Login,
    /// Recorded in the audit log: `ssh:<fingerprint>`.
    actor: String,
    /// Each with its place in the key's share.
    handles: HashMap<String, (Open, Share<String>)>,
    next: u64,
}

impl Session {
    pub fn new(shared: Arc<Shared>, apps: Vec<AppRow>, login: Login) -> Session {
        let actor = format!("ssh:{}", login.fingerprint);
        Session { shared, apps, login, actor, handles: HashMap::new(), next: 0 }
    }

    /// `app` as the database has it now, if the key still uploads to it:
    /// not revoked, and the app not removed (nor made anew under its name).
    /// Otherwise the connection is marked revoked: it serves nothing more.
    async fn still_allowed(&self, app: &AppRow) -> Result<AppRow, StatusReply> {
        let now = self.shared.db.apps_of_ssh_key(&self.login.fingerprint, &self.login.public_key).await;
        match now.map_err(internal)?.into_iter().find(|a| a.id == app.id) {
            Some(fresh) => Ok(fresh),
            None => {
                tracing::info!(fingerprint = %self.login.fingerprint, app = %app.name, "SSH key revoked: request refused");
                self.login.revoked.store(true, Ordering::SeqCst);
                Err(denied(format!(
                    "this SSH key was revoked or no longer uploads to {}; nothing more is read, stored or deployed with it",
                    app.name
                )))
            }
        }
    }

    fn app(&self, name: &str) -> Result<&AppRow, StatusReply> {
        self.apps.iter().find(|a| a.name == name).ok_or_else(|| {
            denied(format!(
                "{name}: this key may upload to {}; register it for {name} with `nx keys add-ssh {name} KEYFILE.pub`",
                self.app_names()
            ))
        })
    }

    fn app_names(&self) -> String {
        self.apps.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// A place for a new handle, or a refusal once the key holds [`MAX_HANDLES`].
    fn room(&self) -> Result<Share<String>, StatusReply> {
        self.shared.handles.take(self.login.fingerprint.clone()).ok_or_else(|| {
            failure(format!(
                "{MAX_HANDLES} files or folders are open with this SSH key, the most one key may have over all its connections; close one first"
            ))
        })
    }

    fn handle(&mut self, open: Open, room: Share<String>) -> String {
        self.next += 1;
        let h = format!("h{}", self.next);
        self.handles.insert(h.clone(), (open, room));
        h
    }

    /// What the folder of `app` lists: each upload's latest version and its
    /// outcome file.
    async fn listing(&self, app: &AppRow) -> Result<Vec<File>, StatusReply> {
        let uploads = self.shared.db.uploads(app.id).await.map_err(internal)?;
        let mut files = Vec::new();
        for u in uploads {
            let t = u.created_at.timestamp() as u32;
            files.push(File::new(&u.name, file_attrs(u.size as u64, t)));
            files.push(File::new(format!("{}{OUTCOME}", u.name), file_attrs(u.outcome.len() as u64, t)));
        }
        Ok(files)
    }

    async fn attrs(&self, path: &str) -> Result<FileAttributes, StatusReply> {
        match Place::parse(path)? {
            Place::Root => Ok(dir_attrs()),
            Place::App(a) => self.app(&a).map(|_| dir_attrs()).map_err(|_| missing(format!("{path}: no such folder"))),
            Place::File { app, name } => {
                let app = self.app(&app)?;
                let listing = self.listing(app).await?;
                listing
                    .into_iter()
                    .find(|f| f.filename == name)
                    .map(|f| f.attrs)
                    .ok_or_else(|| missing(format!("{path}: no such file")))
            }
        }
    }

    /// Verifies and deploys a closed upload; returns the outcome text and
    /// whether it is healthy.
    async fn deploy(
        &self,
        app: &AppRow,
        name: &str,
        upload: PartialUpload,
    ) -> Result<(String, Option<DeploymentInfo>), StatusReply> {
        let upload = upload.finish().await.map_err(store_failure)?;
        let size = upload.size;
        let meta = PushMeta { filename: Some(name.to_owned()), source: Source::Sftp, ..PushMeta::default() };
        let result = self
            .shared
            .deployer
            .push(app, upload, &meta, &PushedBy { proved: None, may_link: false, actor: &self.actor, ahead: None })
            .await;
        let (outcome, info) = match result {
            Ok(info) => (describe(name, &app.name, &info), Some(info)),
            Err(e) => (format!("{name} was not deployed: {e}\n"), None),
        };
        let deployment = info.as_ref().map(|i| i.id.to_string());
        self.shared
            .db
            .record_upload(app.id, name, size as i64, deployment.as_deref(), &outcome)
            .await
            .map_err(internal)?;
        Ok((outcome, info))
    }
}

/// The outcome file of a deployment.
fn describe(name: &str, app: &str, info: &DeploymentInfo) -> String {
    let mut text = format!(
        "{name} deployed to {app} as {}: {}\npreview: {}\ndigest: sha256:{}\n",
        info.id, info.state, info.preview_url, info.digest
    );
    if let Some(e) = &info.error {
        text.push_str(&format!("error: {}\n", neutralise(e)));
    }
    if !info.log_tail.is_empty() {
        // The app's own bytes: shown, never acted on by whoever reads the
        // file on a terminal (a forged [nx] line is already behind [app]).
        text.push_str("last lines of its log:\n");
        for l in &info.log_tail {
            text.push_str(&format!("  | {}\n", neutralise(l)));
        }
    }
    text
}

/// The status for a refused or failed upload: the store's reason when it is
/// the client's to act on, otherwise an internal error.
fn store_failure(e: StoreError) -> StatusReply {
    match e {
        StoreError::Busy { .. } | StoreError::AppBusy { .. } | StoreError::TimedOut { .. } => failure(e.to_string()),
        e => internal(e),
    }
}

/// A name an upload may have.
fn check_name(name: &str) -> Result<(), StatusReply> {
    if name.ends_with(OUTCOME) {
        return Err(denied(format!("{name}: files ending in {OUTCOME} are written by the receiver")));
    }
    if name.len() > 255 || name.contains('\0') {
        return Err(denied(format!("{name}: file names are at most 255 bytes, without NUL")));
    }
    Ok(())
}

impl russh_sftp::server::Handler for Session {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.with_message("not supported by the NX Sandbox receiver")
    }

    async fn init(&mut self, _version: u32, _extensions: HashMap<String, String>) -> Result<Version, Self::Error> {
        let mut v = Version::new();
        // Announced so that clients send hard link requests, which are then
        // refused with a reason instead of failing client-side.
        v.extensions.insert("hardlink@openssh.com".into(), "1".into());
        Ok(v)
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        Ok(Name { id, files: vec![File::dummy(Place::parse(&path)?.path())] })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        Ok(Attrs { id, attrs: self.attrs(&path).await? })
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        Ok(Attrs { id, attrs: self.attrs(&path).await? })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let attrs = match self.handles.get(&handle).map(|(open, _)| open) {
            Some(Open::Upload { upload, .. }) => file_attrs(upload.as_ref().map_or(0, PartialUpload::len), 0),
            Some(Open::Read(data)) => file_attrs(data.len() as u64, 0),
            Some(Open::Dir { .. }) => dir_attrs(),
            None => return Err(failure("no such handle")),
        };
        Ok(Attrs { id, attrs })
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let room = self.room()?;
        let entries = match Place::parse(&path)? {
            Place::Root => self.apps.iter().map(|a| File::new(&a.name, dir_attrs())).collect(),
            Place::App(a) => {
                let app = self.still_allowed(self.app(&a)?).await?;
                self.listing(&app).await?
            }
            Place::File { .. } => return Err(failure(format!("{path}: not a folder"))),
        };
        Ok(Handle { id, handle: self.handle(Open::Dir { entries, sent: false }, room) })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        match self.handles.get_mut(&handle).map(|(open, _)| open) {
            Some(Open::Dir { entries, sent }) if !*sent && !entries.is_empty() => {
                *sent = true;
                Ok(Name { id, files: std::mem::take(entries) })
            }
            Some(Open::Dir { .. }) => Err(StatusCode::Eof.into()),
            _ => Err(failure("not a folder handle")),
        }
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        _attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let room = self.room()?;
        let Place::File { app, name } = Place::parse(&filename)? else {
            return Err(failure(format!("{filename}: upload into an app's folder, as APP/FILE")));
        };
        let app = self.still_allowed(self.app(&app)?).await?;
        let open = if pflags.intersects(OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::APPEND)
        {
            check_name(&name)?;
            let upload =
                self.shared.store.partial_upload(app.store_ref(), self.shared.max_upload).map_err(store_failure)?;
            Open::Upload { app: Box::new(app), name, upload: Some(upload), refused: None }
        } else if let Some(binary) = name.strip_suffix(OUTCOME) {
            let uploads = self.shared.db.uploads(app.id).await.map_err(internal)?;
            let u = uploads
                .into_iter()
                .find(|u| u.name == binary)
                .ok_or_else(|| missing(format!("{filename}: no such file")))?;
            Open::Read(u.outcome.into_bytes())
        } else {
            return Err(denied(format!(
                "{filename}: uploads are not served back; read {name}{OUTCOME} for what became of it"
            )));
        };
        Ok(Handle { id, handle: self.handle(open, room) })
    }

    async fn read(&mut self, id: u32, handle: String, offset: u64, len: u32) -> Result<Data, Self::Error> {
        match self.handles.get(&handle).map(|(open, _)| open) {
            Some(Open::Read(data)) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
                if start == data.len() {
                    return Err(StatusCode::Eof.into());
                }
                let end = start.saturating_add(len as usize).min(data.len());
                Ok(Data { id, data: data[start..end].to_vec() })
            }
            _ => Err(denied("this handle is not open for reading")),
        }
    }

    async fn write(&mut self, id: u32, handle: String, offset: u64, data: Vec<u8>) -> Result<Status, Self::Error> {
        let max = self.shared.max_upload;
        match self.handles.get_mut(&handle).map(|(open, _)| open) {
            Some(Open::Upload { upload, refused, name, .. }) => {
                if let Some(why) = refused {
                    return Err(failure(why.clone()));
                }
                let Some(file) = upload.as_mut() else { return Err(failure("the upload was discarded")) };
                match file.write_at(offset, &data) {
                    Ok(()) => Ok(ok(id, "")),
                    Err(nx_store::StoreError::TooLarge { .. }) => {
                        // Dropped now: nothing of it stays on disk.
                        *upload = None;
                        let why = format!("{name} is larger than this receiver's upload limit of {max} bytes; nothing was stored (raise --max-upload on the receiver)");
                        *refused = Some(why.clone());
                        Err(failure(why))
                    }
                    Err(e) => Err(store_failure(e)),
                }
            }
            _ => Err(denied("this handle is not open for writing")),
        }
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle).map(|(open, _)| open) {
            Some(Open::Upload { refused: Some(why), .. }) => Err(failure(why)),
            Some(Open::Upload { app, name, upload: Some(upload), .. }) => {
                // Dropped (and its file removed) if the key is gone.
                let app = self.still_allowed(&app).await?;
                let (outcome, info) = self.deploy(&app, &name, upload).await?;
                match info {
                    Some(info) if info.state == DeploymentState::Healthy => {
                        Ok(ok(id, format!("deployed as {}: {}", info.id, info.preview_url)))
                    }
                    _ => Err(failure(format!(
                        "{} (details in {name}{OUTCOME})",
                        outcome.lines().next().unwrap_or_default()
                    ))),
                }
            }
            Some(_) => Ok(ok(id, "")),
            None => Err(failure("no such handle")),
        }
    }

    async fn setstat(&mut self, id: u32, path: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        Place::parse(&path)?;
        check_attrs(id, &attrs)
    }

    async fn fsetstat(&mut self, id: u32, _handle: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        check_attrs(id, &attrs)
    }

    async fn remove(&mut self, _id: u32, filename: String) -> Result<Status, Self::Error> {
        Err(denied(format!("{filename}: uploads are kept; stop deployments with `nx stop`")))
    }

    async fn rename(&mut self, _id: u32, oldpath: String, _newpath: String) -> Result<Status, Self::Error> {
        Err(denied(format!("{oldpath}: uploads cannot be renamed")))
    }

    async fn mkdir(&mut self, _id: u32, path: String, _attrs: FileAttributes) -> Result<Status, Self::Error> {
        Err(denied(format!("{path}: folders are the apps'; create an app with `nx apps create`")))
    }

    async fn rmdir(&mut self, _id: u32, path: String) -> Result<Status, Self::Error> {
        Err(denied(format!("{path}: folders are the apps'; remove an app with `nx apps rm`")))
    }

    async fn symlink(&mut self, _id: u32, linkpath: String, _targetpath: String) -> Result<Status, Self::Error> {
        Err(denied(format!("{linkpath}: links are refused; upload plain files")))
    }

    async fn readlink(&mut self, _id: u32, path: String) -> Result<Name, Self::Error> {
        Err(failure(format!("{path}: there are no links here")))
    }

    async fn extended(&mut self, _id: u32, request: String, _data: Vec<u8>) -> Result<Packet, Self::Error> {
        match request.as_str() {
            "hardlink@openssh.com" => Err(denied("links are refused; upload plain files")),
            other => Err(StatusCode::OpUnsupported.with_message(format!("{other} is not supported"))),
        }
    }
}

/// Attribute changes are accepted (and ignored: uploads are not files of
/// anyone's) unless they ask for set-id or sticky bits.
fn check_attrs(id: u32, attrs: &FileAttributes) -> Result<Status, StatusReply> {
    if attrs.permissions.is_some_and(|p| p & 0o7000 != 0) {
        return Err(denied("setuid, setgid and sticky bits are refused"));
    }
    Ok(ok(id, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_app_folders() {
        assert_eq!(Place::parse("/").unwrap(), Place::Root);
        assert_eq!(Place::parse(".").unwrap(), Place::Root);
        assert_eq!(Place::parse("web").unwrap(), Place::App("web".into()));
        assert_eq!(Place::parse("/web/./caddy").unwrap(), Place::File { app: "web".into(), name: "caddy".into() });
        assert_eq!(Place::parse("//web//caddy").unwrap(), Place::File { app: "web".into(), name: "caddy".into() });
        for bad in ["/web/../other/x", "..", "/../../etc/passwd", "/web/a/b", "/etc/ssh/sshd_config"] {
            let e = Place::parse(bad).unwrap_err();
            assert_eq!(e.status_code, StatusCode::PermissionDenied, "{bad}");
        }
    }

    #[test]
    fn outcome_files_cannot_be_uploaded_and_set_id_bits_are_refused() {
        assert!(check_name("caddy").is_ok());
        assert_eq!(check_name("caddy.deploy.txt").unwrap_err().status_code, StatusCode::PermissionDenied);
        let setuid = FileAttributes { permissions: Some(0o104_755), ..FileAttributes::empty() };
        assert_eq!(check_attrs(1, &setuid).unwrap_err().status_code, StatusCode::PermissionDenied);
        let plain = FileAttributes { permissions: Some(0o100_755), ..FileAttributes::empty() };
        assert!(check_attrs(1, &plain).is_ok());
    }
}
