//! Replacing a running router by a new process (a new binary, or the same one
//! restarted) without refusing a connection or failing a request, when no
//! receiver holds the listening sockets for it (nx-router under systemd).
//!
//! Every router listens on its upgrade socket (`--upgrade-socket`, mode 0600,
//! beside the control socket). A successor started with `--upgrade` connects
//! to it; the running router then holds route table changes (a table being
//! written is finished first) and sends, with `SCM_RIGHTS`, its HTTP and
//! HTTPS listening sockets, its control socket and its upgrade socket, with
//! the generation of its table. The successor reads the state file (which
//! holds that generation or a newer one, else it refuses), starts accepting
//! on the same sockets (both routers accept for a moment; the kernel queues
//! each connection once, so none is refused), tells systemd its pid, and
//! answers `R`. Only then does the old router stop accepting, answer table
//! changes still held with 503 (the receiver publishes again, to the
//! successor), and drain: every further HTTP/1 response closes its
//! connection, HTTP/2 connections get GOAWAY, and it exits when its last
//! connection is gone or at `--drain-timeout-secs`.
//!
//! A successor that fails before answering (a crash, a state file it cannot
//! read, HTTPS settings that do not match) closes the connection: the old
//! router keeps serving and takes table changes again. Nothing on disk is
//! renamed or rebound during a handoff, so a failed one leaves nothing behind.

use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage};
use tokio::io::AsyncReadExt;

use crate::control::Gate;
use crate::table::RouteStore;

/// The file name of the upgrade socket when `--upgrade-socket` is not given:
/// beside the control socket.
pub const DEFAULT_NAME: &str = "upgrade.sock";

/// What a handoff message starts with: the protocol and its version.
const MAGIC: &[u8; 9] = b"nxrouter1";
/// Magic, a flags byte (bit 0: an HTTPS socket follows the HTTP one), the
/// table's generation (little-endian).
const HEADER_LEN: usize = MAGIC.len() + 1 + 8;
const HAS_TLS: u8 = 1;
/// HTTP, HTTPS, control, upgrade.
const MAX_FDS: usize = 4;
/// The successor's answer once it accepts connections.
const SERVING: u8 = b'R';
/// How long a successor holding the sockets may take to start serving; the
/// old router holds table changes meanwhile, then gives up on it.
const SERVING_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a successor could not take over; the running router keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no running nx-router answers on {path}: {error}; start nx-router without --upgrade")]
    NoPredecessor { path: PathBuf, error: std::io::Error },
    #[error("cannot take the sockets of the nx-router on {path}: {reason}")]
    Handoff { path: PathBuf, reason: String },
    #[error("the running nx-router serves HTTPS and this one has no --tls-listen; give it the same HTTPS settings")]
    MissingTls,
    #[error(
        "the running nx-router serves no HTTPS, so it has no socket for --tls-listen; stop it and start this one without --upgrade"
    )]
    NoTls,
    #[error(
        "the state file {path} holds table generation {ours}, older than the running router's {theirs}; give the successor the same --state"
    )]
    StaleState { path: PathBuf, ours: u64, theirs: u64 },
}

/// The sockets a router hands over, borrowed from the running one.
#[derive(Debug, Clone, Copy)]
pub struct Handing<'a> {
    pub http: BorrowedFd<'a>,
    pub tls: Option<BorrowedFd<'a>>,
    pub control: BorrowedFd<'a>,
    pub upgrade: BorrowedFd<'a>,
}

/// The sockets a successor took over.
#[derive(Debug)]
pub struct Taken {
    pub http: TcpListener,
    pub tls: Option<TcpListener>,
    pub control: UnixListener,
    pub upgrade: UnixListener,
    /// The generation of the old router's table: the state file must hold it.
    pub generation: u64,
}

/// The connection to the router being replaced: answered once the successor serves.
#[derive(Debug)]
pub struct Predecessor(UnixStream);

impl Predecessor {
    /// Tells the old router that this one accepts connections: it stops and drains.
    pub fn serving(mut self) -> std::io::Result<()> {
        self.0.write_all(&[SERVING])
    }
}

/// Takes the sockets of the router answering on `path`. `tls` says whether
/// this router is configured for HTTPS: it must match the running one.
pub fn take_over(path: &Path, tls: bool) -> Result<(Taken, Predecessor), UpgradeError> {
    let stream = UnixStream::connect(path).map_err(|error| UpgradeError::NoPredecessor { path: path.into(), error })?;
    let failed = |reason: String| UpgradeError::Handoff { path: path.into(), reason };
    stream.set_read_timeout(Some(SERVING_TIMEOUT)).map_err(|e| failed(e.to_string()))?;
    let mut header = [0u8; HEADER_LEN];
    let (n, fds) = nx_runtime::sys::receive_fds::<MAX_FDS>(stream.as_fd(), &mut header)
        .map_err(|e| failed(format!("no sockets received: {e}")))?;
    if n != HEADER_LEN || &header[..MAGIC.len()] != MAGIC {
        return Err(failed(format!("unexpected handoff message of {n} bytes (another version of nx-router?)")));
    }
    let has_tls = header[MAGIC.len()] & HAS_TLS != 0;
    let generation = u64::from_le_bytes(header[MAGIC.len() + 1..].try_into().unwrap_or_default());
    match (has_tls, tls) {
        (true, false) => return Err(UpgradeError::MissingTls),
        (false, true) => return Err(UpgradeError::NoTls),
        _ => {}
    }
    let expected = if has_tls { 4 } else { 3 };
    if fds.len() != expected {
        return Err(failed(format!("{} descriptors received, {expected} expected", fds.len())));
    }
    let mut fds = fds.into_iter();
    let mut next = |unix: bool| {
        let fd = fds.next().ok_or_else(|| failed("a descriptor is missing".into()))?;
        listening(&fd, unix).map_err(failed)?;
        Ok::<_, UpgradeError>(fd)
    };
    let http = TcpListener::from(next(false)?);
    let tls = if has_tls { Some(TcpListener::from(next(false)?)) } else { None };
    let control = UnixListener::from(next(true)?);
    let upgrade = UnixListener::from(next(true)?);
    Ok((Taken { http, tls, control, upgrade, generation }, Predecessor(stream)))
}

/// Checks that `fd` is a listening socket of the expected kind.
fn listening(fd: &OwnedFd, unix: bool) -> Result<(), String> {
    let accepting = getsockopt(fd, sockopt::AcceptConn).map_err(|e| format!("descriptor check: {e}"))?;
    let family = getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(fd))
        .map_err(|e| format!("descriptor check: {e}"))?
        .family();
    let right_kind = if unix {
        family == Some(AddressFamily::Unix)
    } else {
        matches!(family, Some(AddressFamily::Inet | AddressFamily::Inet6))
    };
    if !accepting || !right_kind {
        return Err(format!("a descriptor is not a listening {} socket", if unix { "unix" } else { "TCP" }));
    }
    Ok(())
}

/// Hands `sockets` to the successor connected on `stream`, holding table
/// changes until it serves (`Ok`) or fails (`Err`, and the changes resume).
pub async fn hand_over(
    mut stream: tokio::net::UnixStream,
    sockets: Handing<'_>,
    store: &RouteStore,
    gate: &Gate,
) -> Result<(), String> {
    // A table being written is on disk before the successor reads it, and
    // none is taken until the handoff has an outcome.
    let held = gate.hold().await;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.push(if sockets.tls.is_some() { HAS_TLS } else { 0 });
    header.extend_from_slice(&store.snapshot().generation.to_le_bytes());
    let fds: Vec<BorrowedFd<'_>> =
        [Some(sockets.http), sockets.tls, Some(sockets.control), Some(sockets.upgrade)].into_iter().flatten().collect();
    // A new connection's send buffer is empty: the few bytes never block.
    nx_runtime::sys::send_fds(stream.as_fd(), &header, &fds).map_err(|e| format!("cannot send the sockets: {e}"))?;
    let mut answer = [0u8; 1];
    match tokio::time::timeout(SERVING_TIMEOUT, stream.read(&mut answer)).await {
        Ok(Ok(1)) if answer[0] == SERVING => {
            held.handed_over();
            Ok(())
        }
        Ok(Ok(0)) => Err("the successor closed the connection before serving (see its log)".into()),
        Ok(Ok(_)) => Err(format!("unexpected answer {:?} from the successor", answer[0])),
        Ok(Err(e)) => Err(format!("the successor's connection failed: {e}")),
        Err(_) => Err(format!("the successor did not serve within {SERVING_TIMEOUT:?}")),
    }
}

/// The upgrade socket of a router whose control socket is `control`.
pub fn default_path(control: &Path) -> PathBuf {
    control.with_file_name(DEFAULT_NAME)
}

/// systemd's notification socket (`$NOTIFY_SOCKET`, under `Type=notify`),
/// connected before the router confines itself.
#[derive(Debug)]
pub struct Notifier(Option<UnixDatagram>);

impl Notifier {
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Notifier(None) };
        let connect = || -> std::io::Result<UnixDatagram> {
            let socket = UnixDatagram::unbound()?;
            match path.as_encoded_bytes().strip_prefix(b"@") {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    socket.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?;
                }
                None => socket.connect(&path)?,
            }
            Ok(socket)
        };
        match connect() {
            Ok(s) => Notifier(Some(s)),
            Err(e) => {
                tracing::warn!(error = %e, socket = ?path, "cannot reach systemd's notification socket");
                Notifier(None)
            }
        }
    }

    /// Sends `state` (for example `READY=1`); nothing when not under systemd.
    pub fn send(&self, state: &str) {
        if let Some(socket) = &self.0 {
            if let Err(e) = socket.send(state.as_bytes()) {
                tracing::warn!(error = %e, state, "cannot notify systemd");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listening TCP socket and the three the handoff needs besides.
    fn sockets(dir: &Path) -> (TcpListener, UnixListener, UnixListener) {
        let http = TcpListener::bind("127.0.0.1:0").unwrap();
        let control = UnixListener::bind(dir.join("control.sock")).unwrap();
        let upgrade = UnixListener::bind(dir.join("upgrade.sock")).unwrap();
        (http, control, upgrade)
    }

    #[tokio::test]
    async fn a_successor_gets_the_same_sockets_and_a_failed_one_releases_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = RouteStore::open(&dir.path().join("routes.json")).unwrap();
        let gate = Gate::default();
        let (http, control, upgrade) = sockets(dir.path());
        let handing = Handing { http: http.as_fd(), tls: None, control: control.as_fd(), upgrade: upgrade.as_fd() };
        let path = dir.path().join("upgrade.sock");

        // A successor configured for HTTPS is refused, and the old router's
        // table changes resume.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || tx.send(take_over(&p, true).map(|_| ())).unwrap());
        let (stream, _) = tokio::net::UnixListener::from_std({
            upgrade.set_nonblocking(true).unwrap();
            upgrade.try_clone().unwrap()
        })
        .unwrap()
        .accept()
        .await
        .unwrap();
        let outcome = hand_over(stream, handing, &store, &gate).await;
        assert_eq!(outcome, Err("the successor closed the connection before serving (see its log)".into()));
        assert!(matches!(rx.recv().unwrap(), Err(UpgradeError::NoTls)));
        assert!(!gate.is_handed_over());

        // A matching successor gets listening sockets that are the same ones:
        // a connection to the old router's address is accepted on its copy.
        let p = path.clone();
        let successor = std::thread::spawn(move || {
            let (taken, predecessor) = take_over(&p, false).unwrap();
            predecessor.serving().unwrap();
            taken
        });
        let listener = tokio::net::UnixListener::from_std(upgrade.try_clone().unwrap()).unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        hand_over(stream, handing, &store, &gate).await.unwrap();
        assert!(gate.is_handed_over());
        let taken = successor.join().unwrap();
        assert_eq!(taken.http.local_addr().unwrap(), http.local_addr().unwrap());
        assert_eq!(taken.generation, 0);
        let client = std::net::TcpStream::connect(http.local_addr().unwrap()).unwrap();
        taken.http.set_nonblocking(false).unwrap();
        let (_, peer) = taken.http.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let _c = UnixStream::connect(dir.path().join("control.sock")).unwrap();
        taken.control.set_nonblocking(false).unwrap();
        taken.control.accept().unwrap();
    }

    #[test]
    fn without_a_running_router_the_successor_says_how_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let e = take_over(&dir.path().join("upgrade.sock"), false).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "no running nx-router answers on {}/upgrade.sock: No such file or directory",
                dir.path().display()
            )),
            "{e}"
        );
        assert!(e.to_string().ends_with("start nx-router without --upgrade"), "{e}");
    }
}
