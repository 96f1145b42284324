//! Artifact storage: binaries by sha256 in an object store, plus the local copy
//! each sandbox runs from.
//!
//! An upload is streamed into a private temporary file while being hashed and
//! counted, so the size cap, the digest and the inspection are all checked before
//! anything becomes visible in the store. Only then is the object published
//! under `artifacts/<sha256>`: on the local filesystem store by fsync + atomic
//! rename into the store's directory (object_store's local store does not fsync),
//! on remote stores by a multipart upload whose completion is atomic. The
//! metadata row is written by the caller after [`ArtifactStore::publish`]
//! returns, so a row always points at a durable object.
//!
//! Uploads hold places: at most `--max-concurrent-uploads` across the
//! receiver, of which one app holds at most `--max-uploads-per-app`, each for
//! at most `--upload-timeout` (a slow or stalled upload is cut off, its file
//! removed), so one deploy key cannot keep every other app from pushing.
//!
//! Contract of this crate: nothing is visible under `artifacts/` that was not
//! received whole, hashed and found equal to what was signed; a failed or cut
//! upload leaves no file behind; URLs are shown without their credentials.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use nx_protocol::auth::{FooterKey, FOOTER_LEN};
use rand::distributions::{Alphanumeric, DistString};

pub mod shares;

pub use crate::shares::{Share, Shares};

/// Why an upload or a fetch failed; each variant maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the upload is larger than the limit of {limit} bytes; raise it with --max-upload on the receiver or push a smaller binary")]
    TooLarge { limit: u64 },
    #[error("the body was {got} bytes but Content-Length said {expected}; the upload was cut or altered, push again")]
    LengthMismatch { expected: u64, got: u64 },
    #[error("the body's sha256 is {got} but the request was signed for {expected}; the upload was altered in transit, push again")]
    DigestMismatch { expected: String, got: String },
    #[error(transparent)]
    Footer(#[from] nx_protocol::auth::FooterError),
    #[error("the upload stopped before its end: {0}")]
    Body(String),
    #[error("the server's disk is full ({path}); free space on the receiver and push again")]
    DiskFull { path: PathBuf },
    #[error("local storage failed at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the object store {store} is unavailable: {source}")]
    Unavailable { store: String, source: object_store::Error },
    #[error("artifact {sha256} is missing from the object store {store}")]
    Missing { sha256: String, store: String },
    #[error("the object store URL {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{max} uploads are in progress on this receiver, the most it takes at once; push again in a moment (or raise --max-concurrent-uploads on the receiver)")]
    Busy { max: usize },
    #[error("{share} uploads to {app} are in progress, the most one app may have at once; push again once one has finished (or raise --max-uploads-per-app on the receiver)")]
    AppBusy { app: String, share: usize },
    #[error("the upload did not finish within {}, the most this receiver gives one; nothing was kept: push again over a faster link (or raise --upload-timeout on the receiver)", nx_protocol::units::format_duration(*.after))]
    TimedOut { after: Duration },
}

fn io_error(path: &Path, source: std::io::Error) -> StoreError {
    if source.raw_os_error() == Some(libc::ENOSPC) {
        StoreError::DiskFull { path: path.to_owned() }
    } else {
        StoreError::Io { path: path.to_owned(), source }
    }
}

/// The digest an upload's bytes must have, and where it comes from.
#[derive(Debug, Clone, Copy)]
pub enum Expected<'a> {
    /// Known before the body (lowercase hex): the request's signed header.
    Digest(&'a str),
    /// In the body's last [`FOOTER_LEN`] bytes, which are not part of the
    /// upload, signed with this key: the client hashed while it sent.
    Footer(&'a FooterKey),
}

impl Expected<'_> {
    /// How many of the body's bytes are not the upload's.
    pub fn footer_len(&self) -> u64 {
        match self {
            Expected::Digest(_) => 0,
            Expected::Footer(_) => FOOTER_LEN,
        }
    }
}

/// An upload's place among those in progress: one of the receiver's and one
/// of its app's share. Given back when dropped.
#[derive(Debug)]
pub struct Slot {
    _place: OwnedSemaphorePermit,
    _share: Share<i64>,
}

/// A received, verified upload not yet published. Dropping it removes the file.
#[derive(Debug)]
pub struct Upload {
    path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// The upload's place among those in progress, until it is published or
    /// dropped (none for the platform's own fetches from a remote store).
    _slot: Option<Slot>,
    /// The file's fsync, begun once its last byte was written so that what
    /// comes next (the binary's inspection) runs while the disk flushes;
    /// [`ArtifactStore::publish`] waits for it before the file gets its
    /// name. None once the file is known durable.
    syncing: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Upload {
    /// The received bytes on local disk, for inspection.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the file's fsync, if it is still under way.
    async fn synced(&mut self) -> Result<(), StoreError> {
        if let Some(syncing) = self.syncing.take() {
            let synced =
                syncing.await.unwrap_or_else(|e| Err(std::io::Error::other(format!("its fsync stopped: {e}"))));
            synced.map_err(|e| io_error(&self.path, e))?;
        }
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Removed unless publish() moved it away first.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The file of a [`PartialUpload`] being written, and its place. Dropping
/// it (the upload's end, or its deadline) removes the file and frees the place.
#[derive(Debug)]
struct Receiving {
    path: PathBuf,
    file: std::fs::File,
    /// The end of the furthest write.
    len: u64,
    slot: Option<Slot>,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// An upload written piece by piece, at offsets (SFTP writes), and hashed
/// once complete. Dropping it before [`PartialUpload::finish`] (a dropped
/// connection, say) removes the file: nothing of it is stored. So does its
/// deadline, whether or not its client is still writing: a handle left open
/// does not keep its place.
#[derive(Debug)]
pub struct PartialUpload {
    /// Emptied at the deadline.
    receiving: Arc<Mutex<Option<Receiving>>>,
    limit: u64,
    timeout: Duration,
    deadline: tokio::task::JoinHandle<()>,
}

impl PartialUpload {
    fn receiving(&self) -> std::sync::MutexGuard<'_, Option<Receiving>> {
        self.receiving.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `data` at `offset`; refuses to grow past the limit, or once
    /// the deadline has passed.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let (limit, timeout) = (self.limit, self.timeout);
        let mut receiving = self.receiving();
        let Some(r) = receiving.as_mut() else { return Err(StoreError::TimedOut { after: timeout }) };
        let end = offset.checked_add(data.len() as u64).filter(|e| *e <= limit);
        let Some(end) = end else { return Err(StoreError::TooLarge { limit }) };
        r.file.write_all_at(data, offset).map_err(|e| io_error(&r.path, e))?;
        r.len = r.len.max(end);
        Ok(())
    }

    /// The end of the furthest write (0 once the deadline has passed).
    pub fn len(&self) -> u64 {
        self.receiving().as_ref().map_or(0, |r| r.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the file durable and hashes it: an [`Upload`] like a pushed one.
    pub async fn finish(self) -> Result<Upload, StoreError> {
        let taken = self.receiving().take();
        let Some(mut receiving) = taken else { return Err(StoreError::TimedOut { after: self.timeout }) };
        let path = std::mem::take(&mut receiving.path);
        let size = receiving.len;
        let file = receiving.file.try_clone().map_err(|e| io_error(&path, e))?;
        // From here on the Upload owns (and on failure removes) the file.
        let mut upload =
            Upload { path: path.clone(), sha256: String::new(), size, _slot: receiving.slot.take(), syncing: None };
        let sha256 = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            use std::io::Read;
            file.sync_all()?;
            let mut reader = std::fs::File::open(&path)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    return Ok(hex::encode(hasher.finalize()));
                }
                hasher.update(&buf[..n]);
            }
        })
        .await
        .map_err(|e| StoreError::Body(e.to_string()))?
        .map_err(|e| io_error(upload.path(), e))?;
        upload.sha256 = sha256;
        Ok(upload)
    }
}

impl Drop for PartialUpload {
    fn drop(&mut self) {
        // The file goes with the last reference to it, this one.
        self.deadline.abort();
    }
}

/// Uploads in progress at once unless [`ArtifactStore::with_upload_limits`] says otherwise.
pub const DEFAULT_MAX_UPLOADS: usize = 8;

/// How long an upload may take unless [`ArtifactStore::with_upload_limits`]
/// says otherwise: 512 MiB (the default size cap) at 7 Mbit/s.
pub const DEFAULT_UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Operations on the object store that failed since the process started.
static FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many operations on the object store failed since the process
/// started, for the platform's metrics.
pub fn failures() -> u64 {
    FAILURES.load(std::sync::atomic::Ordering::Relaxed)
}

/// The app an upload is for: its share of the uploads in progress is
/// counted by `id`, and a refusal names it by `name`.
#[derive(Debug, Clone, Copy)]
pub struct AppRef<'a> {
    pub id: i64,
    pub name: &'a str,
}

/// A name for an upload's temporary file that no other upload has.
fn temporary_name() -> String {
    format!("upload-{}", Alphanumeric.sample_string(&mut rand::rngs::OsRng, 16))
}

/// The uploads one app may have in progress at once out of `max`: a quarter,
/// at least one, so that an app using all of its share leaves room for three
/// others.
pub fn default_share(max: usize) -> usize {
    (max / 4).max(1)
}

/// The artifact store.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    /// Set when the store is the local filesystem: objects are files below it.
    local_root: Option<PathBuf>,
    /// Uploads in progress.
    tmp_dir: PathBuf,
    /// Local copies of artifacts from a remote store.
    cache_dir: PathBuf,
    description: String,
    /// Places for uploads in progress.
    uploads: Arc<Semaphore>,
    max_uploads: usize,
    /// Each app's share of them.
    shares: Shares<i64>,
    /// How long one upload may hold its place.
    upload_timeout: Duration,
}

fn object_key(sha256: &str) -> ObjectPath {
    ObjectPath::from(format!("artifacts/{sha256}"))
}

fn ensure_dir(path: &Path, mode: u32) -> Result<(), StoreError> {
    std::fs::create_dir_all(path).map_err(|e| io_error(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| io_error(path, e))
}

/// A store URL as it may be shown (status, errors, logs): a user name,
/// password or query (where credentials can be given) is left out.
fn without_secrets(url: &url::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// [`without_secrets`] for text that may not even parse: then none of it.
fn without_secrets_str(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => without_secrets(&parsed),
        Err(_) => "(a store URL that does not parse)".to_owned(),
    }
}

impl ArtifactStore {
    /// Opens the store named by `url` (an object_store URL), or the local
    /// filesystem store under `<data>/store` when `url` is `None`.
    pub fn open(url: Option<&str>, data_dir: &Path) -> Result<ArtifactStore, StoreError> {
        let tmp_dir = data_dir.join("tmp");
        let cache_dir = data_dir.join("cache");
        ensure_dir(&tmp_dir, 0o700)?;
        // Closed to every uid but root: an artifact's digest is public (check
        // runs show it), so a path by digest must lead nowhere for other users.
        // Sandboxes reach their binary through a link in their run directory.
        ensure_dir(&cache_dir, 0o700)?;
        let local = |root: PathBuf| -> Result<ArtifactStore, StoreError> {
            ensure_dir(&root, 0o700)?;
            ensure_dir(&root.join("artifacts"), 0o700)?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&root)
                .map_err(|e| StoreError::BadUrl { url: root.display().to_string(), reason: e.to_string() })?;
            Ok(ArtifactStore {
                store: Arc::new(fs),
                description: format!("file://{}", root.display()),
                local_root: Some(root),
                tmp_dir: tmp_dir.clone(),
                cache_dir: cache_dir.clone(),
                uploads: Arc::new(Semaphore::new(DEFAULT_MAX_UPLOADS)),
                max_uploads: DEFAULT_MAX_UPLOADS,
                shares: Shares::new(default_share(DEFAULT_MAX_UPLOADS)),
                upload_timeout: DEFAULT_UPLOAD_TIMEOUT,
            })
        };
        let Some(url) = url else { return local(data_dir.join("store")) };
        let bad = |reason: String| StoreError::BadUrl { url: without_secrets_str(url), reason };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        if parsed.scheme() == "file" {
            let path = parsed.to_file_path().map_err(|_| bad("not a local path".into()))?;
            return local(path);
        }
        // Credentials and endpoints come from the usual AWS_*, GOOGLE_* and AZURE_*
        // variables, as each cloud's own tools read them.
        let options = std::env::vars()
            .filter(|(k, _)| ["AWS_", "GOOGLE_", "AZURE_"].iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.to_ascii_lowercase(), v));
        let (store, prefix) = object_store::parse_url_opts(&parsed, options).map_err(|e| bad(e.to_string()))?;
        let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            Arc::from(store)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        };
        Ok(ArtifactStore {
            store,
            local_root: None,
            tmp_dir,
            cache_dir,
            description: without_secrets(&parsed),
            uploads: Arc::new(Semaphore::new(DEFAULT_MAX_UPLOADS)),
            max_uploads: DEFAULT_MAX_UPLOADS,
            shares: Shares::new(default_share(DEFAULT_MAX_UPLOADS)),
            upload_timeout: DEFAULT_UPLOAD_TIMEOUT,
        })
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Caps the uploads in progress at once, SFTP and HTTP together (each
    /// holds a temporary file of up to --max-upload bytes), those of one app
    /// at `per_app`, and how long each may take.
    pub fn with_upload_limits(mut self, max: usize, per_app: usize, timeout: Duration) -> ArtifactStore {
        self.uploads = Arc::new(Semaphore::new(max));
        self.max_uploads = max;
        self.shares = Shares::new(per_app);
        self.upload_timeout = timeout;
        self
    }

    /// A place among the uploads in progress for an upload to `app`, or
    /// [`StoreError::AppBusy`] when the app holds its whole share, or
    /// [`StoreError::Busy`] when the receiver has none left. Taken by
    /// [`ArtifactStore::receive`], or ahead of it by a caller that does more
    /// for an upload than receive it.
    pub fn upload_slot(&self, app: AppRef<'_>) -> Result<Slot, StoreError> {
        let share = self
            .shares
            .take(app.id)
            .ok_or_else(|| StoreError::AppBusy { app: app.name.to_owned(), share: self.shares.cap() })?;
        let place = self.uploads.clone().try_acquire_owned().map_err(|_| StoreError::Busy { max: self.max_uploads })?;
        Ok(Slot { _place: place, _share: share })
    }

    /// A new upload to `app` written at offsets, at most `limit` bytes, for at
    /// most the upload timeout. Needs a tokio runtime (for the deadline).
    pub fn partial_upload(&self, app: AppRef<'_>, limit: u64) -> Result<PartialUpload, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let slot = self.upload_slot(app)?;
        let path = self.tmp_dir.join(temporary_name());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        let receiving = Arc::new(Mutex::new(Some(Receiving { path, file, len: 0, slot: Some(slot) })));
        let expiring = Arc::downgrade(&receiving);
        let timeout = self.upload_timeout;
        let deadline = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(receiving) = expiring.upgrade() {
                let expired = receiving.lock().unwrap_or_else(PoisonError::into_inner).take();
                if let Some(r) = expired {
                    tracing::info!(path = %r.path.display(), "an SFTP upload passed --upload-timeout: discarded");
                }
            }
        });
        Ok(PartialUpload { receiving, limit, timeout, deadline })
    }

    /// Streams `body` (an upload to `app`, `expected_len` bytes with its
    /// footer if it has one) into a temporary file while hashing it,
    /// enforcing `limit` on the upload's bytes as they arrive and the upload
    /// timeout, then checks length and digest against what was signed. It
    /// takes its place among the uploads in progress now, refused with
    /// [`StoreError::AppBusy`] or [`StoreError::Busy`] when there is none,
    /// unless the caller took `slot` ahead ([`ArtifactStore::upload_slot`]).
    pub async fn receive<S, E>(
        &self,
        app: AppRef<'_>,
        slot: Option<Slot>,
        body: S,
        expected: Expected<'_>,
        expected_len: u64,
        limit: u64,
    ) -> Result<Upload, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        let slot = match slot {
            Some(slot) => slot,
            None => self.upload_slot(app)?,
        };
        let timeout = self.upload_timeout;
        let received = self.receive_into(body, expected, expected_len, limit, Some(slot));
        // On timeout the future is dropped, and with it the Upload that removes the file.
        tokio::time::timeout(timeout, received).await.map_err(|_| StoreError::TimedOut { after: timeout })?
    }

    /// [`ArtifactStore::receive`], holding `slot` (none for the platform's
    /// own fetches from a remote store).
    async fn receive_into<S, E>(
        &self,
        body: S,
        expected: Expected<'_>,
        expected_len: u64,
        limit: u64,
        slot: Option<Slot>,
    ) -> Result<Upload, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        // The upload's bytes end where its footer, if any, begins.
        let upload_len = expected_len
            .checked_sub(expected.footer_len())
            .ok_or(StoreError::Footer(nx_protocol::auth::FooterError::Malformed))?;
        let path = self.tmp_dir.join(temporary_name());
        // Created before anything can fail, so Drop always cleans up.
        let mut upload = Upload { path: path.clone(), sha256: String::new(), size: 0, _slot: None, syncing: None };
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(|e| io_error(&path, e))?
            .into_std()
            .await;
        // One blocking thread writes each piece and another hashes it while
        // the next one arrives: on the connection's task the hashing (about
        // 0.6 ms per megabyte) held up the reading of the socket, and on one
        // thread the write waited for the hash. The writer holds the
        // upload's place until it ends, which it does once this side stops
        // sending, even if this side was given up on (a timeout, a cut
        // connection).
        let (to_disk, pieces) = tokio::sync::mpsc::channel::<Bytes>(8);
        let (to_hash, hashed) = tokio::sync::mpsc::channel::<Bytes>(8);
        let disk = tokio::task::spawn_blocking({
            let path = path.clone();
            move || write_pieces(file, pieces, &path).map(|file| (file, slot))
        });
        let hashing = tokio::task::spawn_blocking(move || hash_pieces(hashed));
        let mut size: u64 = 0;
        let mut footer = Vec::new();
        futures_util::pin_mut!(body);
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
            let received = size + footer.len() as u64 + chunk.len() as u64;
            if received > expected_len {
                return Err(StoreError::LengthMismatch { expected: expected_len, got: received });
            }
            if size + chunk.len() as u64 > upload_len {
                let tail = chunk.split_off(usize::try_from(upload_len - size).unwrap_or(usize::MAX));
                footer.extend_from_slice(&tail);
            }
            size += chunk.len() as u64;
            if size > limit {
                return Err(StoreError::TooLarge { limit });
            }
            // The hasher only stops when this side does; the writer on an
            // error, which its result says.
            if !chunk.is_empty() && (to_hash.send(chunk.clone()).await.is_err() || to_disk.send(chunk).await.is_err()) {
                break;
            }
        }
        drop((to_disk, to_hash));
        let stopped = |which: &str, e: tokio::task::JoinError| {
            io_error(&path, std::io::Error::other(format!("its {which} stopped: {e}")))
        };
        let (file, slot) = disk.await.map_err(|e| stopped("writer", e))??;
        let sha256 = hashing.await.map_err(|e| stopped("hasher", e))?;
        upload._slot = slot;
        let received = size + footer.len() as u64;
        if received != expected_len {
            return Err(StoreError::LengthMismatch { expected: expected_len, got: received });
        }
        let signed = match expected {
            Expected::Digest(sha256) => sha256.to_owned(),
            Expected::Footer(key) => key.open(&footer)?,
        };
        if sha256 != signed {
            return Err(StoreError::DigestMismatch { expected: signed, got: sha256 });
        }
        upload.syncing = Some(tokio::task::spawn_blocking(move || file.sync_all()));
        upload.sha256 = sha256;
        upload.size = size;
        Ok(upload)
    }

    /// Makes a received upload durable in the store under its digest and returns
    /// the local path sandboxes run it from.
    pub async fn publish(&self, mut upload: Upload) -> Result<PathBuf, StoreError> {
        upload.synced().await?;
        let sha = upload.sha256.clone();
        set_mode(&upload.path, 0o555)?;
        match &self.local_root {
            Some(root) => {
                let dest = root.join("artifacts").join(&sha);
                rename_durably(&upload.path, &dest)?;
                upload.path = PathBuf::new();
                Ok(dest)
            }
            None => {
                self.upload_file(&upload.path, &object_key(&sha)).await?;
                let dest = self.cache_dir.join(&sha);
                rename_durably(&upload.path, &dest)?;
                upload.path = PathBuf::new();
                Ok(dest)
            }
        }
    }

    /// Stores the file at `path` under `key` (backups): on the local store a
    /// durable copy, elsewhere a multipart upload.
    pub async fn put_file(&self, path: &Path, key: &str) -> Result<(), StoreError> {
        match &self.local_root {
            Some(root) => {
                let dest = root.join(key);
                let dir = dest.parent().unwrap_or(root);
                ensure_dir(dir, 0o700)?;
                let tmp = dest.with_extension("partial");
                std::fs::copy(path, &tmp).map_err(|e| io_error(&tmp, e))?;
                std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io_error(&tmp, e))?;
                rename_durably(&tmp, &dest)
            }
            None => self.upload_file(path, &ObjectPath::from(key)).await,
        }
    }

    /// The object store failed `source`; counted for the metrics.
    fn unavailable(&self, source: object_store::Error) -> StoreError {
        FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StoreError::Unavailable { store: self.description.clone(), source }
    }

    /// Removes the object `key`; a missing one is not an error.
    pub async fn delete_key(&self, key: &str) -> Result<(), StoreError> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(self.unavailable(source)),
        }
    }

    async fn upload_file(&self, path: &Path, key: &ObjectPath) -> Result<(), StoreError> {
        use tokio::io::AsyncReadExt;
        let unavailable = |source| self.unavailable(source);
        let multipart = self.store.put_multipart(key).await.map_err(unavailable)?;
        let mut writer = WriteMultipart::new_with_chunk_size(multipart, 8 << 20);
        let mut file = tokio::fs::File::open(path).await.map_err(|e| io_error(path, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(io_error(path, e));
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = writer.wait_for_capacity(4).await {
                let _ = writer.abort().await;
                return Err(unavailable(e));
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(unavailable)?;
        Ok(())
    }

    /// The local path of an artifact, fetched from the store when this machine
    /// does not have it yet (and verified against its digest).
    pub async fn materialize(&self, sha: &str) -> Result<PathBuf, StoreError> {
        if let Some(root) = &self.local_root {
            let path = root.join("artifacts").join(sha);
            return if path.exists() {
                Ok(path)
            } else {
                Err(StoreError::Missing { sha256: sha.into(), store: self.description.clone() })
            };
        }
        let dest = self.cache_dir.join(sha);
        if dest.exists() {
            return Ok(dest);
        }
        let unavailable = |source| self.unavailable(source);
        let result = match self.store.get(&object_key(sha)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::Missing { sha256: sha.into(), store: self.description.clone() })
            }
            Err(e) => return Err(unavailable(e)),
        };
        let size = result.meta.size;
        let upload = self.receive_into(result.into_stream(), Expected::Digest(sha), size, u64::MAX, None).await?;
        self.publish_local_copy(upload).await
    }

    async fn publish_local_copy(&self, mut upload: Upload) -> Result<PathBuf, StoreError> {
        upload.synced().await?;
        set_mode(&upload.path, 0o555)?;
        let dest = self.cache_dir.join(&upload.sha256);
        rename_durably(&upload.path, &dest)?;
        upload.path = PathBuf::new();
        Ok(dest)
    }

    /// The digests of the artifacts in the store last written more than `age`
    /// ago (other objects, backups and anything not named by a digest, are
    /// left out).
    pub async fn artifacts_older_than(&self, age: std::time::Duration) -> Result<Vec<String>, StoreError> {
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        let prefix = ObjectPath::from("artifacts");
        let mut listing = self.store.list(Some(&prefix));
        let mut old = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|source| self.unavailable(source))?;
            let Some(name) = meta.location.filename() else { continue };
            if meta.last_modified < cutoff && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                old.push(name.to_owned());
            }
        }
        Ok(old)
    }

    /// Removes an artifact from the store and from the local cache.
    pub async fn delete(&self, sha: &str) -> Result<(), StoreError> {
        match self.store.delete(&object_key(sha)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => return Err(self.unavailable(source)),
        }
        let _ = std::fs::remove_file(self.cache_dir.join(sha));
        Ok(())
    }

    /// Removes uploads left behind by a crash. Run at startup, before the API
    /// accepts requests.
    pub fn clean_temporary(&self) -> usize {
        let mut removed = 0;
        let mut sweep = |dir: &Path, keep: &dyn Fn(&str) -> bool| {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if !keep(&name) && std::fs::remove_file(e.path()).is_ok() {
                        removed += 1;
                    }
                }
            }
        };
        sweep(&self.tmp_dir, &|_| false);
        // object_store's local store stages multipart uploads as `<name>#<n>`.
        if let Some(root) = &self.local_root {
            sweep(&root.join("artifacts"), &|name| !name.contains('#'));
        }
        removed
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StoreError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| io_error(path, e))
}

/// How much of an upload is written before it is sent on to the disk.
const WRITEBACK_STEP: u64 = 1 << 20;

/// Writes to `file` what `pieces` brings, until it ends; returns the file.
/// Each megabyte written is sent on to the disk at once, so the upload's
/// fsync, on the push's path after its last byte, waits for the last one
/// only (a 20 MB upload's went from about 11 ms to under 1 ms here).
fn write_pieces(
    mut file: std::fs::File,
    mut pieces: tokio::sync::mpsc::Receiver<Bytes>,
    path: &Path,
) -> Result<std::fs::File, StoreError> {
    use std::io::Write as _;
    let (mut written, mut sent) = (0u64, 0u64);
    while let Some(piece) = pieces.blocking_recv() {
        file.write_all(&piece).map_err(|e| io_error(path, e))?;
        written += piece.len() as u64;
        if written - sent >= WRITEBACK_STEP {
            // Only a head start: a failure here is the fsync's to report.
            let _ = nx_runtime::sys::start_writeback(&file, sent, written - sent);
            sent = written;
        }
    }
    Ok(file)
}

/// The lowercase hex SHA-256 of the pieces, in order.
fn hash_pieces(mut pieces: tokio::sync::mpsc::Receiver<Bytes>) -> String {
    let mut hasher = Sha256::new();
    while let Some(piece) = pieces.blocking_recv() {
        hasher.update(&piece);
    }
    hex::encode(hasher.finalize())
}

/// Renames `from` to `to` and fsyncs the target directory, so the new name
/// survives a crash. Both are on the same filesystem (the data directory).
fn rename_durably(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::rename(from, to).map_err(|e| io_error(to, e))?;
    let dir = to.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_are_shown_without_credentials() {
        let shown = without_secrets_str("s3://AKIA:s3cr3t@bucket/prefix?secret_access_key=hunter2&region=x");
        assert_eq!(shown, "s3://bucket/prefix");
        assert!(!without_secrets_str("s3//AKIA:hunter2@bucket").contains("hunter2"));
    }

    fn data_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nx-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn body(chunks: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::iter(chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect::<Vec<_>>())
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    fn files_in(dir: &Path) -> usize {
        std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
    }

    fn app(id: i64, name: &str) -> AppRef<'_> {
        AppRef { id, name }
    }

    #[tokio::test]
    async fn uploads_are_verified_then_published_by_digest() {
        let d = data_dir("ok");
        let store = ArtifactStore::open(None, &d).unwrap();
        let up = store
            .receive(app(1, "web"), None, body(&[b"hello ", b"world"]), Expected::Digest(&sha(b"hello world")), 11, 100)
            .await
            .unwrap();
        assert_eq!(up.size, 11);
        let path = store.publish(up).await.unwrap();
        assert_eq!(path, d.join("store/artifacts").join(sha(b"hello world")));
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o555);
        assert_eq!(files_in(&d.join("tmp")), 0);
        assert_eq!(store.materialize(&sha(b"hello world")).await.unwrap(), path);
    }

    #[tokio::test]
    async fn an_upload_of_many_megabytes_is_stored_byte_for_byte() {
        // Pieces of odd sizes, so the megabytes sent on to the disk as they
        // are written end inside pieces and the last one is partial: what
        // is stored is still the upload, byte for byte. (That the writes
        // reach the disk early shows only in time; the bench measures it.)
        let d = data_dir("large");
        let store = ArtifactStore::open(None, &d).unwrap();
        let bytes: Vec<u8> = (0..(5u32 << 20) + 12_345).map(|i| (i % 253) as u8).collect();
        let pieces: Vec<Result<Bytes, std::io::Error>> =
            bytes.chunks(377_000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let len = bytes.len() as u64;
        let up = store
            .receive(app(1, "web"), None, futures_util::stream::iter(pieces), Expected::Digest(&sha(&bytes)), len, len)
            .await
            .unwrap();
        let path = store.publish(up).await.unwrap();
        assert!(std::fs::read(&path).unwrap() == bytes, "the stored file differs from the upload");
    }

    #[tokio::test]
    async fn uploads_beyond_the_cap_are_refused_until_one_ends() {
        let d = data_dir("busy");
        let store = ArtifactStore::open(None, &d).unwrap().with_upload_limits(2, 2, DEFAULT_UPLOAD_TIMEOUT);
        let web = app(1, "web");
        let sftp = store.partial_upload(web, 100).unwrap();
        let http = store
            .receive(app(2, "api"), None, body(&[b"hello"]), Expected::Digest(&sha(b"hello")), 5, 100)
            .await
            .unwrap();
        let err = store.partial_upload(web, 100).unwrap_err();
        assert!(matches!(err, StoreError::Busy { max: 2 }), "{err}");
        assert_eq!(
            err.to_string(),
            "2 uploads are in progress on this receiver, the most it takes at once; push again in a moment (or raise --max-concurrent-uploads on the receiver)"
        );
        let err =
            store.receive(web, None, body(&[b"hello"]), Expected::Digest(&sha(b"hello")), 5, 100).await.unwrap_err();
        assert!(matches!(err, StoreError::Busy { max: 2 }), "{err}");
        assert_eq!(files_in(&d.join("tmp")), 2, "a refused upload writes nothing");
        // A finished SFTP upload keeps its place until published.
        let finished = sftp.finish().await.unwrap();
        assert!(matches!(store.partial_upload(web, 100), Err(StoreError::Busy { .. })));
        store.publish(finished).await.unwrap();
        drop(store.partial_upload(web, 100).unwrap());
        drop(http);
        assert!(store.receive(web, None, body(&[b"x"]), Expected::Digest(&sha(b"x")), 1, 100).await.is_ok());
    }

    #[tokio::test]
    async fn one_app_holds_at_most_its_share_of_the_places() {
        let d = data_dir("share");
        let store = ArtifactStore::open(None, &d).unwrap().with_upload_limits(4, 1, DEFAULT_UPLOAD_TIMEOUT);
        let (web, api) = (app(1, "web"), app(2, "api"));
        let held = store.partial_upload(web, 100).unwrap();
        let err =
            store.receive(web, None, body(&[b"hello"]), Expected::Digest(&sha(b"hello")), 5, 100).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "1 uploads to web are in progress, the most one app may have at once; push again once one has finished (or raise --max-uploads-per-app on the receiver)"
        );
        assert!(matches!(store.partial_upload(web, 100), Err(StoreError::AppBusy { share: 1, .. })));
        assert!(
            store.receive(api, None, body(&[b"hello"]), Expected::Digest(&sha(b"hello")), 5, 100).await.is_ok(),
            "api is not held back"
        );
        drop(held);
        assert!(store.receive(web, None, body(&[b"x"]), Expected::Digest(&sha(b"x")), 1, 100).await.is_ok());
    }

    #[tokio::test]
    async fn an_upload_refused_for_want_of_a_place_is_not_read_and_leaves_no_file() {
        let d = data_dir("refused");
        let store = ArtifactStore::open(None, &d).unwrap().with_upload_limits(1, 1, DEFAULT_UPLOAD_TIMEOUT);
        let web = app(1, "web");
        let _held = store.partial_upload(web, 100).unwrap();
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = body(&[b"hel", b"lo"]).inspect({
            let read = read.clone();
            move |_| _ = read.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        });
        let err = store.receive(web, None, counted, Expected::Digest(&sha(b"hello")), 5, 100).await.unwrap_err();
        assert!(matches!(err, StoreError::AppBusy { share: 1, .. }), "{err}");
        // The rest of the body is the connection's to read on (the receiver's
        // `listeners`), not the store's.
        assert_eq!(read.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing was read for a refused upload");
        assert_eq!(files_in(&d.join("tmp")), 1, "only the held upload has a file");
    }

    #[tokio::test]
    async fn an_upload_past_its_deadline_is_cut_off_and_leaves_nothing() {
        let d = data_dir("deadline");
        let timeout = Duration::from_secs(2);
        let store = ArtifactStore::open(None, &d).unwrap().with_upload_limits(1, 1, timeout);
        let web = app(1, "web");
        // A body that sends two bytes, then nothing.
        let stalled = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"he"))])
            .chain(futures_util::stream::pending());
        let err = store.receive(web, None, stalled, Expected::Digest(&sha(b"hello")), 5, 100).await.unwrap_err();
        assert!(matches!(err, StoreError::TimedOut { after } if after == timeout), "{err}");
        assert_eq!(
            err.to_string(),
            "the upload did not finish within 2 seconds, the most this receiver gives one; nothing was kept: push again over a faster link (or raise --upload-timeout on the receiver)"
        );
        assert_eq!(files_in(&d.join("tmp")), 0);
        // Its place comes back as soon as its writer has stopped.
        let asked = std::time::Instant::now();
        let mut open = loop {
            match store.partial_upload(web, 100) {
                Ok(open) => break open,
                Err(StoreError::AppBusy { .. }) if asked.elapsed() < Duration::from_secs(1) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => panic!("the cut upload's place did not come back: {e}"),
            }
        };
        // An SFTP upload loses its file and its place at the deadline, written to or not.
        open.write_at(0, b"he").unwrap();
        tokio::time::sleep(timeout * 2).await;
        assert_eq!(files_in(&d.join("tmp")), 0);
        let next = store.partial_upload(web, 100).expect("the place is free again");
        assert!(matches!(open.write_at(2, b"llo"), Err(StoreError::TimedOut { .. })));
        assert!(matches!(open.finish().await, Err(StoreError::TimedOut { .. })));
        drop(next);
        assert_eq!(files_in(&d.join("tmp")), 0);
    }

    #[tokio::test]
    async fn a_digest_in_the_footer_is_checked_and_never_stored() {
        let d = data_dir("footer");
        let store = ArtifactStore::open(None, &d).unwrap();
        let key = FooterKey::derive("nxk_k1_0123456789abcdefghijklmnopqrstuv", &"ab".repeat(32));
        let binary = b"hello world";
        let whole = [binary.as_slice(), &key.footer(&sha(binary))].concat();
        let len = whole.len() as u64;
        // Cut so that one piece holds the binary's end and the footer's start,
        // and the footer is split again.
        for cuts in [vec![11], vec![5, 20, 100], vec![1, 2, 3, 135], vec![len as usize]] {
            let mut pieces = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([len as usize]) {
                pieces.push(Ok::<_, std::io::Error>(Bytes::copy_from_slice(&whole[at..cut.max(at)])));
                at = cut.max(at);
            }
            let body = futures_util::stream::iter(pieces);
            let up = store.receive(app(1, "web"), None, body, Expected::Footer(&key), len, 11).await.unwrap();
            assert_eq!((up.size, up.sha256.as_str()), (11, sha(binary).as_str()));
            assert_eq!(std::fs::read(up.path()).unwrap(), binary, "the footer is not part of the upload");
        }

        let refused = |body: Vec<u8>, key: &FooterKey, len: u64| {
            let store = &store;
            let key = key.clone();
            async move {
                let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(body))]);
                store.receive(app(1, "web"), None, body, Expected::Footer(&key), len, 100).await.unwrap_err()
            }
        };
        // Another request's key, a changed binary under the right footer, a
        // footer that vouches for another body, a cut footer, a body without one.
        let other = FooterKey::derive("nxk_k1_0123456789abcdefghijklmnopqrstuv", &"cd".repeat(32));
        let err = refused(whole.clone(), &other, len).await;
        assert!(matches!(err, StoreError::Footer(nx_protocol::auth::FooterError::Forged)), "{err}");
        let mut changed = whole.clone();
        changed[0] = b'j';
        let err = refused(changed, &key, len).await;
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        let err = refused([b"jello world".as_slice(), &key.footer(&sha(b"jello"))].concat(), &key, len).await;
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        let err = refused(whole[..whole.len() - 1].to_vec(), &key, len).await;
        assert!(matches!(err, StoreError::LengthMismatch { .. }), "{err}");
        let err = refused(binary.to_vec(), &key, 11).await;
        assert!(matches!(err, StoreError::Footer(nx_protocol::auth::FooterError::Malformed)), "{err}");
        let err = refused(whole.clone(), &key, len - 1).await;
        assert!(matches!(err, StoreError::LengthMismatch { .. }), "{err}");
        // The limit is on the binary, not on its footer.
        let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(whole.clone()))]);
        let err = store.receive(app(1, "web"), None, body, Expected::Footer(&key), len, 10).await.unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { limit: 10 }), "{err}");
        assert_eq!(files_in(&d.join("tmp")), 0);
    }

    #[tokio::test]
    async fn bad_uploads_leave_nothing_behind() {
        let d = data_dir("bad");
        let store = ArtifactStore::open(None, &d).unwrap();
        let err = store
            .receive(app(1, "web"), None, body(&[b"hello"]), Expected::Digest(&sha(b"other")), 5, 100)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        let err = store
            .receive(app(1, "web"), None, body(&[b"hello"]), Expected::Digest(&sha(b"hello")), 6, 100)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::LengthMismatch { expected: 6, got: 5 }), "{err}");
        let err = store
            .receive(app(1, "web"), None, body(&[b"hello", b"hello"]), Expected::Digest(&sha(b"hellohello")), 10, 7)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { limit: 7 }), "{err}");
        let broken = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"he")),
            Err(std::io::Error::other("connection reset")),
        ]);
        let err =
            store.receive(app(1, "web"), None, broken, Expected::Digest(&sha(b"hello")), 5, 100).await.unwrap_err();
        assert!(err.to_string().contains("connection reset"), "{err}");
        assert_eq!(files_in(&d.join("tmp")), 0);
        assert_eq!(files_in(&d.join("store/artifacts")), 0);
    }

    #[tokio::test]
    async fn leftovers_of_a_crash_are_swept() {
        let d = data_dir("sweep");
        let store = ArtifactStore::open(None, &d).unwrap();
        std::fs::write(d.join("tmp/upload-abandoned"), b"x").unwrap();
        std::fs::write(d.join("store/artifacts/abc#1"), b"x").unwrap();
        std::fs::write(d.join("store/artifacts/keep"), b"x").unwrap();
        assert_eq!(store.clean_temporary(), 2);
        assert!(d.join("store/artifacts/keep").exists());
    }

    #[tokio::test]
    async fn missing_artifacts_are_named() {
        let d = data_dir("missing");
        let store = ArtifactStore::open(None, &d).unwrap();
        let err = store.materialize(&"0".repeat(64)).await.unwrap_err();
        assert!(matches!(err, StoreError::Missing { .. }), "{err}");
    }
}
