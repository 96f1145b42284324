//! Pushing over plain SFTP: an SSH server (russh) that takes public keys only,
//! registered per app (`nx keys add-ssh`), and serves the SFTP subsystem over
//! the tree in [`fs`]. Its host key is made on the first start and kept in
//! the data directory, so clients see the same host every time.
//!
//! A connection serves at most [`MAX_SESSIONS`] session channels at once, and
//! stops serving the moment its key is found revoked (by the watch, or by an
//! upload's own check at open and close): no request read after that is
//! served, whatever the client had already sent.

pub mod fs;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use self::fs::{Login, Shared};

/// Session channels one connection may have open at once. OpenSSH's sftp and
/// scp use one; a client multiplexing more (`ControlMaster`) gets this many
/// and is refused the next (administratively prohibited) until one closes.
pub const MAX_SESSIONS: usize = 2;

/// Loads the host key, or makes and saves one (mode 0600).
pub fn host_key(path: &Path) -> anyhow::Result<PrivateKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            PrivateKey::from_openssh(&text).with_context(|| format!("{} is not an OpenSSH private key", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519)
                .context("cannot make an SSH host key")?;
            let text =
                key.to_openssh(russh::keys::ssh_key::LineEnding::LF).context("cannot encode the SSH host key")?;
            crate::secrets::create_private(path, text.as_bytes())
                .with_context(|| format!("cannot create {}", path.display()))?;
            tracing::info!(path = %path.display(), fingerprint = %key.public_key().fingerprint(HashAlg::Sha256), "SSH host key made");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

impl Connection {
    /// A connection from `peer`; `logged_in` is told when its client logs in.
    fn new(shared: Arc<Shared>, peer: SocketAddr, logged_in: tokio::sync::oneshot::Sender<()>) -> Connection {
        Connection {
            shared,
            peer,
            apps: Vec::new(),
            fingerprint: String::new(),
            key: None,
            alive: None,
            logged_in: Some(logged_in),
            channels: HashMap::new(),
            sessions: HashSet::new(),
            revoked: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// One SSH connection.
struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// The apps the authenticated key may upload to.
    apps: Vec<crate::db::AppRow>,
    fingerprint: String,
    /// The accepted key, as the database names it.
    key: Option<(String, String)>,
    /// Dropped with the connection, which stops its key's watch.
    alive: Option<tokio::sync::oneshot::Sender<()>>,
    /// Told at login, which lifts the login deadline (`--sftp-auth-timeout`).
    logged_in: Option<tokio::sync::oneshot::Sender<()>>,
    /// Session channels opened and not yet asked for a subsystem.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// Session channels open, at most [`MAX_SESSIONS`].
    sessions: HashSet<ChannelId>,
    /// Set once the key is found revoked: nothing more is served.
    revoked: Arc<AtomicBool>,
}

/// A channel's stream that ends (reads as closed) once its key is revoked,
/// so the SFTP server stops at the next request, buffered or not.
struct Revocable<S> {
    inner: S,
    revoked: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Revocable<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.revoked.load(Ordering::SeqCst) {
            // Nothing read: the end of the stream.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Revocable<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A key as the database stores it: its SHA256 fingerprint and its OpenSSH
/// text without comment.
fn key_names(key: &PublicKey) -> Result<(String, String), russh::Error> {
    let canonical = PublicKey::new(key.key_data().clone(), "").to_openssh().map_err(|_| russh::Error::Inconsistent)?;
    Ok((key.fingerprint(HashAlg::Sha256).to_string(), canonical))
}

/// The apps the key named `(fingerprint, canonical)` is registered for.
async fn apps_of(shared: &Shared, (fingerprint, canonical): &(String, String)) -> Result<Vec<String>, russh::Error> {
    let apps = shared.db.apps_of_ssh_key(fingerprint, canonical).await.map_err(|e| {
        tracing::error!(error = %e, "cannot look up an SSH key");
        russh::Error::Inconsistent
    })?;
    Ok(apps.into_iter().map(|a| a.name).collect())
}

impl Connection {
    /// The apps `key` is registered for.
    async fn apps_of(&self, key: &PublicKey) -> Result<Vec<crate::db::AppRow>, russh::Error> {
        let (fingerprint, canonical) = key_names(key)?;
        self.shared.db.apps_of_ssh_key(&fingerprint, &canonical).await.map_err(|e| {
            tracing::error!(error = %e, "cannot look up an SSH key");
            russh::Error::Inconsistent
        })
    }
}

/// Ends the connection behind `handle` as soon as its key no longer gives it
/// the apps it was let in with (revoked, or moved to other apps), every
/// --ssh-key-recheck. It runs on its own clock: traffic, keepalives
/// included, does not keep a session alive. Ends with the connection, when
/// `gone` (its sender, held by the connection) is dropped.
async fn watch_key(
    shared: Arc<Shared>,
    key: (String, String),
    apps: Vec<String>,
    revoked: Arc<AtomicBool>,
    handle: russh::server::Handle,
    mut gone: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.key_recheck) => {}
            _ = &mut gone => return,
        }
        // A lookup that fails (the database away) ends nothing: it says nothing
        // about the key.
        match apps_of(&shared, &key).await {
            Ok(now) if now == apps => continue,
            Ok(_) => {
                tracing::info!(fingerprint = %key.0, "SSH key revoked or changed: ending its session");
                // First: requests already received are not served either.
                revoked.store(true, Ordering::SeqCst);
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "this SSH key was revoked or its apps changed; connect again".into(),
                        String::new(),
                    )
                    .await;
                return;
            }
            Err(_) => continue,
        }
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(&mut self, _user: &str, key: &PublicKey) -> Result<Auth, Self::Error> {
        Ok(if self.apps_of(key).await?.is_empty() { Auth::reject() } else { Auth::Accept })
    }

    async fn auth_publickey(&mut self, user: &str, key: &PublicKey) -> Result<Auth, Self::Error> {
        let apps = self.apps_of(key).await?;
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        if apps.is_empty() {
            tracing::info!(peer = %self.peer, user, fingerprint, "SSH key refused: registered for no app");
            return Ok(Auth::reject());
        }
        tracing::info!(peer = %self.peer, user, fingerprint, apps = apps.len(), "SSH key accepted");
        // russh calls this only once the client signed with the key: only now
        // is the key used (an offer alone proves nothing).
        let names = key_names(key)?;
        if let Err(e) = self.shared.db.touch_ssh_key(&names.0, &names.1).await {
            tracing::warn!(error = %e, fingerprint, "cannot record the SSH key's use");
        }
        self.apps = apps;
        self.fingerprint = fingerprint;
        self.key = Some(names);
        Ok(Auth::Accept)
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        if let Some(logged_in) = self.logged_in.take() {
            let _ = logged_in.send(());
        }
        if let Some(key) = self.key.clone() {
            let apps = self.apps.iter().map(|a| a.name.clone()).collect();
            let (alive, gone) = tokio::sync::oneshot::channel();
            self.alive = Some(alive);
            tokio::spawn(watch_key(self.shared.clone(), key, apps, self.revoked.clone(), session.handle(), gone));
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if self.revoked.load(Ordering::SeqCst) {
            // The watch disconnects soon; until then nothing new opens.
            return Ok(false);
        }
        if self.sessions.len() >= MAX_SESSIONS {
            tracing::info!(peer = %self.peer, fingerprint = %self.fingerprint, "session channel refused: {MAX_SESSIONS} already open on this connection");
            return Ok(false);
        }
        self.sessions.insert(channel.id());
        self.channels.insert(channel.id(), channel);
        Ok(true)
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.sessions.remove(&channel);
        self.channels.remove(&channel);
        Ok(())
    }

    async fn subsystem_request(&mut self, id: ChannelId, name: &str, session: &mut Session) -> Result<(), Self::Error> {
        match (name, self.channels.remove(&id), &self.key) {
            ("sftp", Some(channel), Some((fingerprint, public_key))) => {
                session.channel_success(id)?;
                let login = Login {
                    fingerprint: fingerprint.clone(),
                    public_key: public_key.clone(),
                    revoked: self.revoked.clone(),
                };
                let sftp = fs::Session::new(self.shared.clone(), self.apps.clone(), login);
                let stream = Revocable { inner: channel.into_stream(), revoked: self.revoked.clone() };
                russh_sftp::server::run(stream, sftp).await;
            }
            _ => session.channel_failure(id)?,
        }
        Ok(())
    }

    async fn exec_request(&mut self, id: ChannelId, data: &[u8], session: &mut Session) -> Result<(), Self::Error> {
        // Legacy scp (`scp -O`) and shells ask for a command; only SFTP is served.
        let command = String::from_utf8_lossy(data);
        tracing::info!(command = %command, "exec request refused: only the sftp subsystem is served");
        if let Some(channel) = self.channels.get(&id) {
            let _ =
                channel.extended_data(1, "NX Sandbox serves SFTP only: use sftp, or scp without -O\n".as_bytes()).await;
        }
        session.channel_failure(id)?;
        session.close(id)?;
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        // The client is done. scp checks the exit status of the session, as
        // it would that of a remote sftp-server process.
        session.exit_status_request(channel, 0)?;
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }
}

/// Serves SFTP on `listener` until `stopping` (the receiver was told to stop:
/// no new session then), each connection admitted by `gate`, disconnected
/// unless it logs in within `auth_timeout`, and cut at `stop` (the end of
/// the API's shutdown grace).
pub async fn serve(
    listener: tokio::net::TcpListener,
    host_key: PrivateKey,
    shared: Shared,
    gate: crate::listeners::Gate,
    auth_timeout: Duration,
    mut stopping: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) {
    let config = Arc::new(russh::server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: Some(Duration::from_secs(600)),
        ..Default::default()
    });
    let shared = Arc::new(shared);
    loop {
        let (stream, peer, admitted) = tokio::select! {
            next = crate::listeners::accept(&listener, &gate, "sftp") => next,
            _ = stopping.wait_for(|s| *s) => return,
        };
        let (logged_in, login) = tokio::sync::oneshot::channel();
        let handler = Connection::new(shared.clone(), peer, logged_in);
        let (config, stop) = (config.clone(), stop.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            connection(config, stream, handler, login, auth_timeout, stop).await;
            drop(admitted);
        });
    }
}

/// Runs one SSH connection to its end: cut at `auth_timeout` unless `login`
/// comes first (the greeting and key exchange count against it too), and at
/// `stop`.
async fn connection(
    config: Arc<russh::server::Config>,
    stream: tokio::net::TcpStream,
    handler: Connection,
    login: tokio::sync::oneshot::Receiver<()>,
    auth_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let peer = handler.peer;
    let deadline = tokio::time::Instant::now() + auth_timeout;
    // russh reads a session's disconnect request only outside a key
    // exchange, which a client can leave unfinished: the socket is then shut
    // down through this second descriptor of it.
    let Ok(socket) = stream.as_fd().try_clone_to_owned().map(std::net::TcpStream::from) else {
        return tracing::warn!(%peer, "cannot duplicate an SSH connection's socket; closed");
    };
    let session = match tokio::time::timeout_at(deadline, russh::server::run_stream(config, stream, handler)).await {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "SSH connection setup failed"),
        // Dropping the setup closes the socket.
        Err(_) => return tracing::info!(%peer, "SSH client disconnected: no greeting before the login deadline"),
    };
    let handle = session.handle();
    let mut session = std::pin::pin!(session);
    let reason = tokio::select! {
        ended = &mut session => return session_ended(peer, ended),
        logged_in = tokio::time::timeout_at(deadline, login) => match logged_in {
            Ok(_) => None,
            Err(_) => Some(format!("not logged in within {}s", auth_timeout.as_secs_f32())),
        },
        _ = stop.changed() => Some("the receiver is stopping".to_owned()),
    };
    let reason = match reason {
        Some(reason) => reason,
        None => tokio::select! {
            ended = &mut session => return session_ended(peer, ended),
            _ = stop.changed() => "the receiver is stopping".to_owned(),
        },
    };
    tracing::info!(%peer, reason, "SSH client disconnected");
    let _ = handle.disconnect(russh::Disconnect::ByApplication, reason, String::new()).await;
    if tokio::time::timeout(DISCONNECT_GRACE, &mut session).await.is_err() {
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }
}

/// How long a disconnected client's session has to send its reason and end
/// before its socket is shut down under it.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

fn session_ended(peer: SocketAddr, ended: Result<(), russh::Error>) {
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "ssh session ended with an error");
    }
}
