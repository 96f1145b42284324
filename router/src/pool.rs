//! Kept-alive upstream connections, one pool per worker thread.
//!
//! pingora's own pool hands each released connection to a task that watches
//! it for closing, which costs a task spawn and a wake-up per request. Here an
//! idle connection just waits in a list. When one that idled for a second or
//! more is taken, a non-blocking peek tells whether the app closed it
//! meanwhile (its idle timeout) or sent stray bytes, and such a connection is
//! dropped instead of used. One used within the last second is handed out
//! without the peek (a syscall per request, ~7% of the router's throughput):
//! apps close idle connections after seconds, not sooner, and for the rare
//! connection closed anyway (the app crashed) the HTTP/1 proxy sends an
//! idempotent request without a body again on a new connection. A sweep every
//! few seconds closes the connections that idled past the timeout or were
//! closed by the app, so none lingers half-closed. Connections are kept per
//! [`Backend`], the address and the deployment that owns it, so a freed port
//! given to another deployment never gets a connection the old one accepted.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use pingora::protocols::Stream;
use pingora::{Error, ErrorType, OrErr as _};

use crate::buffered::Buffered;
use crate::exchange::Backend;

/// Idle connections kept per upstream; beyond it the oldest are closed.
const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// Idle time after which a connection is checked before it is used.
const CHECK_AFTER: Duration = Duration::from_secs(1);

/// An upstream connection and its descriptor (for the liveness peek).
#[derive(Debug)]
pub struct Conn {
    pub fd: RawFd,
    pub stream: Stream,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// The idle upstream connections of one worker.
#[derive(Debug)]
pub struct Pool {
    idle: Mutex<HashMap<Backend, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

/// Whether an idle connection can carry a request: the app has not closed
/// it and has sent nothing (an idle HTTP/1 connection must be silent).
fn usable(fd: RawFd) -> bool {
    let mut byte = [0u8; 1];
    matches!(recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT), Err(Errno::EAGAIN))
}

impl Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Pool {
        Pool { idle: Mutex::new(HashMap::new()), connect_timeout, idle_timeout }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Backend, Vec<Idle>>> {
        // A panic while holding the lock leaves a plain list behind: still usable.
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently used idle connection to `upstream` that is still usable.
    pub fn take(&self, upstream: Backend) -> Option<Conn> {
        let mut idle = self.lock();
        let list = idle.get_mut(&upstream)?;
        while let Some(Idle { conn, since }) = list.pop() {
            let idle = since.elapsed();
            if idle < self.idle_timeout && (idle < CHECK_AFTER || usable(conn.fd)) {
                return Some(conn);
            }
        }
        None
    }

    /// A new connection to `addr`, within the connect timeout.
    pub async fn connect(&self, addr: std::net::SocketAddr) -> pingora::Result<Conn> {
        let tcp = match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                let kind = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                    _ => ErrorType::ConnectError,
                };
                return Err(Error::because(kind, format!("connecting to {addr}"), e));
            }
            Err(_) => {
                return Error::e_explain(
                    ErrorType::ConnectTimedout,
                    format!("connecting to {addr}: no answer within {:?}", self.connect_timeout),
                )
            }
        };
        tcp.set_nodelay(true).or_err(ErrorType::ConnectError, "setting TCP_NODELAY")?;
        let fd = tcp.as_raw_fd();
        Ok(Conn { fd, stream: Box::new(Buffered::new(tcp)) })
    }

    /// Keeps a connection for the next request to `upstream`.
    pub fn put(&self, upstream: Backend, conn: Conn) {
        let mut idle = self.lock();
        let list = idle.entry(upstream).or_default();
        if list.len() >= MAX_IDLE_PER_UPSTREAM {
            list.remove(0);
        }
        list.push(Idle { conn, since: Instant::now() });
    }

    /// Closes the connections that idled too long or that the app closed.
    pub fn sweep(&self) {
        let mut idle = self.lock();
        for list in idle.values_mut() {
            list.retain(|i| i.since.elapsed() < self.idle_timeout && usable(i.conn.fd));
        }
        idle.retain(|_, list| !list.is_empty());
    }

    /// How many idle connections are kept.
    pub fn idle(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn upstream() -> (tokio::net::TcpListener, Backend) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, Backend::new(addr, "d1"))
    }

    #[tokio::test]
    async fn a_kept_connection_is_reused_until_the_app_closes_it() {
        let (listener, up) = upstream().await;
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(60));
        let conn = pool.connect(up.addr).await.unwrap();
        let (mut app_side, _) = listener.accept().await.unwrap();
        let fd = conn.fd;
        pool.put(up, conn);
        let again = pool.take(up).expect("the idle connection is handed out");
        assert_eq!(again.fd, fd);
        pool.put(up, again);
        app_side.shutdown().await.unwrap();
        drop(app_side);
        tokio::time::sleep(CHECK_AFTER + Duration::from_millis(50)).await;
        assert!(pool.take(up).is_none(), "a connection the app closed is not handed out");
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn stray_bytes_expiry_and_the_sweep_close_idle_connections() {
        let (listener, up) = upstream().await;
        let pool = Pool::new(Duration::from_secs(1), Duration::from_millis(100));
        let chatty = pool.connect(up.addr).await.unwrap();
        let (mut chatty_app, _) = listener.accept().await.unwrap();
        let quiet = pool.connect(up.addr).await.unwrap();
        let (_quiet_app, _) = listener.accept().await.unwrap();
        pool.put(up, quiet);
        pool.put(up, chatty);
        chatty_app.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        pool.sweep();
        assert_eq!(pool.idle(), 1, "the connection with unread bytes is closed");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(pool.take(up).is_none(), "an expired connection is not handed out");
        pool.put(up, pool.connect(up.addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(120)).await;
        pool.sweep();
        assert_eq!(pool.idle(), 0, "the sweep closes expired connections");
    }

    #[tokio::test]
    async fn a_connection_kept_for_one_deployment_is_never_handed_to_another_on_its_port() {
        let (_listener, old) = upstream().await;
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(60));
        pool.put(old, pool.connect(old.addr).await.unwrap());
        let next_owner = Backend::new(old.addr, "d2");
        assert!(pool.take(next_owner).is_none());
        assert!(pool.take(old).is_some(), "still there for its own deployment");
    }

    #[tokio::test]
    async fn a_refused_connection_says_so() {
        let (listener, up) = upstream().await;
        drop(listener);
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(60));
        let e = pool.connect(up.addr).await.unwrap_err();
        assert_eq!(e.etype(), &ErrorType::ConnectRefused);
        assert!(e.to_string().contains(&up.addr.to_string()), "{e}");
    }

    #[tokio::test]
    async fn at_most_the_cap_of_idle_connections_is_kept() {
        let (listener, up) = upstream().await;
        let pool = Pool::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut apps = Vec::new();
        for _ in 0..MAX_IDLE_PER_UPSTREAM + 3 {
            pool.put(up, pool.connect(up.addr).await.unwrap());
            apps.push(listener.accept().await.unwrap());
        }
        assert_eq!(pool.idle(), MAX_IDLE_PER_UPSTREAM);
    }
}
