//! HTTP/2 client connections (TLS with ALPN h2): pingora's `HttpProxy` over
//! [`crate::proxy`], with the router's bounds.
//!
//! pingora bounds none of an HTTP/2 connection's waits by default: its h2
//! handshake (the client's preface) waits for ever, an idle connection is
//! kept for ever, and each connection may open 100 streams, each of which may
//! hold an upstream connection. Here the preface must come within the request
//! head deadline (counted from the connection's start, as an HTTP/1 first
//! head), a connection with no stream open is closed after the client idle
//! timeout, and streams per connection are capped (`--h2-max-streams`): a
//! stream beyond the cap is refused by the h2 library with `RST_STREAM`
//! `REFUSED_STREAM`, which clients retry once a stream ends. A request body
//! still arriving after the request body timeout is cut by
//! [`crate::proxy`]'s body filter.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::protocols::http::v2::server::default_h2_options;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest,
    UniqueID, UniqueIDType, ALPN,
};
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::config::Limits;
use crate::proxy::Router;

/// The client connection preface every HTTP/2 connection starts with.
const PREFACE_LEN: usize = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".len();

/// pingora's proxy for HTTP/2 connections, with the idle timeout and the
/// stream cap of `limits`.
pub fn proxy(conf: &Arc<ServerConf>, router: Router, limits: &Limits) -> HttpProxy<Router> {
    let mut proxy = pingora::proxy::http_proxy(conf, router);
    let mut options = HttpServerOptions::default();
    options.h2_idle_timeout = Some(limits.client_idle);
    proxy.server_options = Some(options);
    // pingora's defaults (its header list bound among them), the stream cap lowered.
    let mut h2 = default_h2_options();
    h2.max_concurrent_streams(limits.h2_max_streams);
    proxy.h2_options = Some(h2);
    proxy
}

/// Serves one HTTP/2 connection; closes it unless its preface has arrived
/// by `head_due`.
pub async fn serve(proxy: &Arc<HttpProxy<Router>>, stream: Stream, head_due: Instant, shutdown: &ShutdownWatch) {
    let arrived = Arc::new(AtomicBool::new(false));
    let stream = Box::new(PrefaceWatch { inner: stream, read: 0, arrived: arrived.clone() });
    let serving = proxy.process_new(stream, shutdown);
    tokio::pin!(serving);
    tokio::select! {
        _ = &mut serving => return,
        () = tokio::time::sleep_until(head_due) => {}
    }
    if arrived.load(Ordering::Relaxed) {
        serving.await;
    } else {
        tracing::debug!("no HTTP/2 preface in time: connection closed");
    }
}

/// A stream that notes when the client's first [`PREFACE_LEN`] bytes were
/// read (pingora tells nothing of its h2 handshake's progress).
#[derive(Debug)]
struct PrefaceWatch {
    inner: Stream,
    read: usize,
    arrived: Arc<AtomicBool>,
}

impl AsyncRead for PrefaceWatch {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.read < PREFACE_LEN {
            self.read += buf.filled().len() - before;
            if self.read >= PREFACE_LEN {
                self.arrived.store(true, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl AsyncWrite for PrefaceWatch {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for PrefaceWatch {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for PrefaceWatch {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for PrefaceWatch {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for PrefaceWatch {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for PrefaceWatch {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for PrefaceWatch {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.inner.set_socket_digest(socket_digest);
    }
}

#[async_trait]
impl Peek for PrefaceWatch {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use pingora::tls::{ClientConfig, RootCertStore, ServerName, TlsConnector};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use crate::h1::tests::{listening, serving, LIMITS};

    type Client = pingora::tls::ClientTlsStream<TcpStream>;

    /// A self-signed certificate for localhost and its key, in `dir`.
    fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost", "-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (cert, key)
    }

    /// What a test router keeps alive: its certificate's and state's
    /// directories, and its accept loop (ended when dropped).
    type Kept = (tempfile::TempDir, tempfile::TempDir, tokio::sync::watch::Sender<bool>);

    /// A router serving HTTPS with these bounds, app.localhost going to `app`.
    async fn router(limits: Limits, app: SocketAddr) -> (SocketAddr, std::path::PathBuf, Kept) {
        pingora::tls::install_default_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path());
        let fallback =
            crate::certs::certified_key("test", &std::fs::read(&cert).unwrap(), &std::fs::read(&key).unwrap());
        let acceptor =
            crate::listener::tls_acceptor(std::sync::Arc::new(crate::certs::CertStore::new(Some(fallback.unwrap()))));
        let (addr, _, state, stop) = listening(limits, app, Some(acceptor)).await;
        (addr, cert, (dir, state, stop))
    }

    /// A TLS connection to `addr` that negotiated h2, nothing sent on it yet.
    async fn connect(addr: SocketAddr, cert: &std::path::Path) -> Client {
        let mut roots = RootCertStore::empty();
        pingora::tls::load_ca_file_into_store(cert, &mut roots).unwrap();
        let mut config = ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls
    }

    const SETTINGS: u8 = 0x4;
    const RST_STREAM: u8 = 0x3;
    const HEADERS: u8 = 0x1;
    const DATA: u8 = 0x0;
    const REFUSED_STREAM: u32 = 0x7;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// The preface, empty settings and an acknowledgement of the router's.
    async fn start(client: &mut Client) {
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        hello.extend(frame(SETTINGS, 1, 0, &[]));
        client.write_all(&hello).await.unwrap();
    }

    /// Reads one frame: kind, flags, stream, payload.
    async fn read_frame(client: &mut Client) -> io::Result<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        client.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        client.read_exact(&mut payload).await?;
        Ok((head[3], head[4], u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff, payload))
    }

    /// `GET /hang` for app.localhost on `stream`, its end included (HPACK
    /// literals by hand: a client that ignores the router's stream limit).
    fn get(stream: u32) -> Vec<u8> {
        let mut block = vec![0x82, 0x87]; // :method GET, :scheme https
        for (index, value) in [(4u8, "/hang"), (1, "app.localhost")] {
            block.extend([index, value.len() as u8]);
            block.extend(value.as_bytes());
        }
        frame(HEADERS, 0x4 | 0x1, stream, &block)
    }

    /// The frames read until the router closes the connection (whichever way
    /// the TLS stream ends) and how long that took.
    async fn until_closed(client: &mut Client) -> (Vec<u8>, Duration) {
        let started = Instant::now();
        let mut kinds = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(5), read_frame(client)).await {
                Ok(Ok((kind, ..))) => kinds.push(kind),
                Ok(Err(e)) => {
                    // pingora drops the connection without a TLS close_notify.
                    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
                    return (kinds, started.elapsed());
                }
                Err(_) => panic!("the connection is still open after 5 s; frames: {kinds:?}"),
            }
        }
    }

    #[tokio::test]
    async fn streams_beyond_the_cap_are_refused_and_open_no_app_connection() {
        let opened = Arc::new(AtomicUsize::new(0));
        let counter = opened.clone();
        let app = serving(move |mut s| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                // Reads the request and never answers.
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            }
        })
        .await;
        let cap = 2;
        let (addr, cert, _keep) = router(Limits { h2_max_streams: cap, ..LIMITS }, app).await;
        let mut client = connect(addr, &cert).await;
        start(&mut client).await;
        // The router says its limit.
        let (kind, flags, _, settings) = read_frame(&mut client).await.unwrap();
        assert_eq!((kind, flags), (SETTINGS, 0));
        let limit = settings
            .chunks(6)
            .find(|s| s[..2] == [0, 3])
            .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
            .expect("SETTINGS_MAX_CONCURRENT_STREAMS");
        assert_eq!(limit, cap);
        // A client that ignores it: streams 1, 3 and 5 at once.
        let mut requests = Vec::new();
        for stream in [1, 3, 5] {
            requests.extend(get(stream));
        }
        client.write_all(&requests).await.unwrap();
        let refused = loop {
            let (kind, _, stream, payload) =
                tokio::time::timeout(Duration::from_secs(5), read_frame(&mut client)).await.unwrap().unwrap();
            if kind == RST_STREAM {
                break (stream, u32::from_be_bytes(payload[..4].try_into().unwrap()));
            }
        };
        assert_eq!(refused, (5, REFUSED_STREAM), "the third stream is refused");
        // Streams 1 and 3 each hold an app connection; 5 none.
        let deadline = Instant::now() + Duration::from_secs(5);
        while opened.load(Ordering::SeqCst) < cap as usize {
            assert!(Instant::now() < deadline, "the two streams within the cap reached the app");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(opened.load(Ordering::SeqCst), cap as usize);
    }

    #[tokio::test]
    async fn a_body_trickled_over_http2_gets_408_at_the_body_deadline() {
        // Reads whatever comes and never answers: only the body deadline ends the stream.
        let app = serving(|mut s| async move {
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        })
        .await;
        let deadline = Duration::from_millis(800);
        let (addr, cert, _keep) = router(Limits { request_body: deadline, ..LIMITS }, app).await;
        let mut client = connect(addr, &cert).await;
        start(&mut client).await;
        // POST /up for app.localhost, content-length 100; the body follows in DATA frames.
        let mut block = vec![0x83, 0x87]; // :method POST, :scheme https
        for (name, value) in [(&[0x04][..], "/up"), (&[0x01], "app.localhost"), (&[0x0f, 0x0d], "100")] {
            block.extend(name);
            block.push(value.len() as u8);
            block.extend(value.as_bytes());
        }
        client.write_all(&frame(HEADERS, 0x4, 1, &block)).await.unwrap();
        let started = Instant::now();
        let (reader, mut writer) = tokio::io::split(client);
        let drip = async {
            for _ in 0..100 {
                writer.write_all(&frame(DATA, 0, 1, b"x")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("the whole body was sent: the router never cut it");
        };
        let answer = async {
            let mut reader = reader;
            loop {
                let mut head = [0u8; 9];
                reader.read_exact(&mut head).await.unwrap();
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                reader.read_exact(&mut payload).await.unwrap();
                if head[3] == HEADERS {
                    return (payload, started.elapsed());
                }
            }
        };
        let (block, elapsed) = tokio::select! {
            () = drip => unreachable!(),
            answered = answer => answered,
        };
        // `:status: 408`, a literal with the static table's :status name (8),
        // its value plain or Huffman-coded (RFC 7541 appendix B).
        assert!(
            block.starts_with(&[0x48, 0x03, b'4', b'0', b'8']) || block.starts_with(&[0x48, 0x83, 0x68, 0x0f, 0x7f]),
            "{block:02x?}"
        );
        assert!(elapsed >= deadline && elapsed < deadline + Duration::from_millis(300), "{elapsed:?}");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_at_the_idle_timeout() {
        let app = serving(|_| async {}).await;
        let idle = Duration::from_millis(700);
        let (addr, cert, _keep) = router(Limits { client_idle: idle, ..LIMITS }, app).await;
        let mut client = connect(addr, &cert).await;
        start(&mut client).await;
        let (frames, elapsed) = until_closed(&mut client).await;
        // The router's settings and its acknowledgement of the client's; no GOAWAY.
        assert_eq!(frames, [SETTINGS, SETTINGS]);
        assert!(
            elapsed >= idle - Duration::from_millis(50) && elapsed < idle + Duration::from_millis(300),
            "{elapsed:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_sending_no_preface_is_closed_at_the_head_deadline() {
        let app = serving(|_| async {}).await;
        let head = Duration::from_millis(800);
        // An idle timeout far longer: only the head deadline can close it.
        let limits = Limits { request_head: head, client_idle: Duration::from_secs(60), ..LIMITS };
        let (addr, cert, _keep) = router(limits, app).await;
        for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
            let started = Instant::now();
            let mut client = connect(addr, &cert).await;
            client.write_all(sent).await.unwrap();
            let (frames, _) = until_closed(&mut client).await;
            let elapsed = started.elapsed();
            // pingora's h2 handshake sends the router's settings before it reads the preface.
            assert_eq!(frames, [SETTINGS], "{sent:?}");
            assert!(elapsed >= head && elapsed < head + Duration::from_millis(300), "{sent:?}: {elapsed:?}");
        }
    }
}
