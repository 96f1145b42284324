//! The router's own accept loops: HTTP/1 to [`crate::h1`], HTTP/2 (TLS with
//! ALPN h2) to pingora's `HttpProxy`.
//!
//! The listening sockets usually come from the receiver (inherited
//! descriptors), which keeps them open across router restarts and reloads:
//! connections wait in the kernel's backlog while no router runs, and during a
//! reload old and new router share the socket. Draining (SIGTERM, or a
//! successor taking over: [`crate::upgrade`]) is ordered so that no request is
//! lost: the old router stops accepting at once, answers every further HTTP/1
//! request on its open connections with `Connection: close`, sends GOAWAY on
//! its HTTP/2 ones (their streams under way finish; clients open a new
//! connection for the next), and exits when its last connection is gone (or
//! after the drain timeout, when only idle connections are left).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pingora::listeners::tls::{Acceptor, TlsSettings};

use crate::certs::CertStore;
use pingora::protocols::{GetSocketDigest, SocketDigest, Ssl, ALPN};
use pingora::proxy::HttpProxy;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Limits;
use crate::exchange::Client;
use crate::h1::H1;
use crate::proxy::Router;

/// Where a listening socket comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Bind this address.
    Bind(SocketAddr),
    /// A listening socket inherited at this descriptor.
    Inherited(RawFd),
}

impl Source {
    /// The listening socket, non-blocking, ready to be registered with a runtime.
    pub fn open(&self) -> std::io::Result<std::net::TcpListener> {
        let std_listener = match self {
            Source::Bind(addr) => std::net::TcpListener::bind(addr)?,
            // The receiver passes a listening TCP socket at this number and
            // nothing else in this process owns it.
            Source::Inherited(fd) => nx_runtime::sys::inherited_listener(*fd)?,
        };
        std_listener.set_nonblocking(true)?;
        Ok(std_listener)
    }
}

pub use nx_runtime::net::client_key;

/// Live connections, their caps, and the signals that end them.
#[derive(Debug)]
pub struct Connections {
    open: AtomicUsize,
    /// Connections served at once; beyond it new ones are closed at once.
    max: usize,
    /// Connections open per client (see [`client_key`]); absent at zero.
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// Connections one client may hold at once.
    max_per_client: usize,
    /// The second a refusal was last logged: one line per second at most,
    /// whatever the flood.
    refusal_logged: AtomicU64,
    /// Set when draining starts: responses close their connections.
    pub draining: Arc<AtomicBool>,
    /// Turned true when draining starts: HTTP/2 connections send GOAWAY.
    goaway: watch::Sender<bool>,
    /// Turned true at the very end, to drop the idle connections left.
    shutdown: watch::Sender<bool>,
    changed: tokio::sync::Notify,
    /// Turned true once every connection is gone: the workers may stop.
    done: watch::Sender<bool>,
}

impl Connections {
    pub fn new(draining: Arc<AtomicBool>, max: usize, max_per_client: usize) -> Arc<Connections> {
        let (shutdown, _) = watch::channel(false);
        let (goaway, _) = watch::channel(false);
        let (done, _) = watch::channel(false);
        Arc::new(Connections {
            open: AtomicUsize::new(0),
            max,
            per_client: Mutex::new(HashMap::new()),
            max_per_client,
            refusal_logged: AtomicU64::new(0),
            draining,
            goaway,
            shutdown,
            changed: tokio::sync::Notify::new(),
            done,
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a new connection in, unless the cap or its client's share is
    /// reached: then None, and the caller closes it. Counted first and checked
    /// after, so connections accepted at once on several workers cannot pass
    /// the cap together.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Guard> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.refused(peer, "connection cap reached: new connections are closed");
            return None;
        }
        let client = client_key(peer.ip());
        let mut per_client = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let held = per_client.entry(client).or_insert(0);
        if *held >= self.max_per_client {
            drop(per_client);
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.refused(peer, "a client address holds its share of the connections: its new ones are closed");
            return None;
        }
        *held += 1;
        Some(Guard { connections: self.clone(), client })
    }

    /// Logs a refusal: one line per second at most, whatever the flood.
    fn refused(&self, peer: SocketAddr, what: &str) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.refusal_logged.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(max = self.max, max_per_client = self.max_per_client, %peer, "{what}");
        }
    }

    /// A receiver that turns true when the drain is over.
    pub fn done(&self) -> watch::Receiver<bool> {
        self.done.subscribe()
    }

    /// Waits until every connection is closed, or `timeout`; then drops
    /// whatever idle connections are left.
    pub async fn drain(&self, timeout: Duration) {
        self.draining.store(true, Ordering::Relaxed);
        self.goaway.send_replace(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a close in between wakes us.
            notified.as_mut().enable();
            if self.open() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::info!(open = self.open(), "drain timeout: closing the idle connections left");
                break;
            }
        }
        let _ = self.shutdown.send(true);
        // Dropped sessions end within a moment; then the workers may go.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.done.send_replace(true);
    }
}

/// One admitted connection: counted out of the total and its client's share
/// when dropped.
struct Guard {
    connections: Arc<Connections>,
    client: IpAddr,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let c = &self.connections;
        {
            let mut per_client = c.per_client.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(held) = per_client.get_mut(&self.client) {
                *held -= 1;
                if *held == 0 {
                    per_client.remove(&self.client);
                }
            }
        }
        c.open.fetch_sub(1, Ordering::Relaxed);
        c.changed.notify_waiters();
    }
}

/// The two proxies of a worker: HTTP/1 and HTTP/2.
#[derive(Clone)]
pub struct Proxies {
    pub h1: Arc<H1>,
    pub h2: Arc<HttpProxy<Router>>,
}

impl std::fmt::Debug for Proxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // pingora's HttpProxy has no Debug of its own.
        f.debug_struct("Proxies").field("h1", &self.h1).finish_non_exhaustive()
    }
}

/// Accepts connections until `stop` turns true, handing each to its proxy;
/// a TLS handshake must end within the TLS handshake timeout, an HTTP/2
/// preface within the request head deadline of the connection's start.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<Acceptor>>,
    limits: Limits,
    proxies: Proxies,
    connections: Arc<Connections>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            // The only change ever sent is to true.
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(guard) = connections.admit(peer) else { continue };
        let proxies = proxies.clone();
        let tls = tls.clone();
        let shutdown = connections.shutdown.subscribe();
        let mut goaway = connections.goaway.subscribe();
        // Accepted as draining began: GOAWAY at once all the same.
        if *goaway.borrow() {
            goaway.mark_changed();
        }
        let head_due = tokio::time::Instant::now() + limits.request_head;
        tokio::spawn(async move {
            let _guard = guard;
            let _ = tcp.set_nodelay(true);
            let digest = SocketDigest::from_raw_fd(std::os::fd::AsRawFd::as_raw_fd(&tcp));
            let _ = digest.peer_addr.set(Some(peer.into()));
            let mut stream = crate::buffered::Buffered::new(tcp);
            stream.set_socket_digest(digest);
            let Some(acceptor) = tls else {
                proxies.h1.serve(Box::new(stream), Client::new(Some(peer.ip()), false), shutdown).await;
                return;
            };
            let tls_handshake = limits.tls_handshake;
            match tokio::time::timeout(tls_handshake, acceptor.tls_handshake(stream)).await {
                Ok(Ok(s)) if s.selected_alpn_proto() == Some(ALPN::H2) => {
                    crate::h2::serve(&proxies.h2, Box::new(s), head_due, &goaway).await;
                }
                Ok(Ok(s)) => proxies.h1.serve(Box::new(s), Client::new(Some(peer.ip()), true), shutdown).await,
                Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, timeout = ?tls_handshake, "TLS handshake not done in time"),
            }
        });
    }
}

/// The TLS acceptor choosing each connection's certificate by SNI from
/// `certs`, HTTP/2 offered by ALPN.
pub fn tls_acceptor(certs: Arc<CertStore>) -> Arc<Acceptor> {
    // No paths: with a resolver, pingora loads no files.
    let mut settings = match TlsSettings::intermediate("", "") {
        Ok(settings) => settings,
        Err(e) => unreachable!("pingora's TLS settings without files cannot fail: {e}"),
    };
    settings.set_cert_resolver(certs);
    settings.enable_h2();
    Arc::new(settings.build())
}
