//! The router's TCP connections, to clients and to apps, as pingora's HTTP
//! sessions take them: a tokio socket with a write buffer.
//!
//! pingora writes a response's header and body (and each chunk's size line,
//! data and end) as separate writes and flushes when it wants them on the
//! wire; on an unbuffered socket each write is a `send` of its own (measured:
//! three per proxied request), each waking the peer. Here they gather until
//! the flush. This type stands in for pingora's own L4 stream, which adds a
//! second buffer layer and reads the clock on every read and write for its
//! timing digests, none of which the router uses.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, TimingDigest, UniqueID,
    UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Bytes gathered before they are sent without waiting for a flush: one
/// loopback segment's worth, as pingora's own listener uses.
const CAPACITY: usize = 16 * 1024;

/// A TCP connection with a write buffer.
#[derive(Debug)]
pub struct Buffered {
    inner: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    sent: usize,
    /// The addresses, for pingora's proxy (client address of HTTP/2 requests).
    digest: Option<Arc<SocketDigest>>,
}

impl Buffered {
    pub fn new(inner: TcpStream) -> Buffered {
        Buffered { inner, buf: Vec::with_capacity(CAPACITY), sent: 0, digest: None }
    }

    /// Writes out what is buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Buffered {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Buffered {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() + data.len() > CAPACITY {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() >= CAPACITY {
            // Large writes go straight through.
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Buffered {
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(self).await;
    }
}

impl UniqueID for Buffered {
    fn id(&self) -> UniqueIDType {
        self.inner.as_raw_fd()
    }
}

impl Ssl for Buffered {}

impl GetTimingDigest for Buffered {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for Buffered {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for Buffered {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.digest.clone()
    }

    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.digest = Some(Arc::new(socket_digest));
    }
}

#[async_trait]
impl Peek for Buffered {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (Buffered, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Buffered::new(server), client)
    }

    /// Reads whatever arrives within 100 ms.
    async fn arrived(peer: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), peer.read(&mut chunk)).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        got
    }

    #[tokio::test]
    async fn small_writes_wait_for_a_flush_and_then_leave_together() {
        let (mut stream, mut peer) = pair().await;
        stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        assert!(arrived(&mut peer).await.is_empty(), "nothing is sent before a flush");
        stream.flush().await.unwrap();
        assert_eq!(arrived(&mut peer).await, b"HTTP/1.1 200 OK\r\n\r\nhello");
    }

    #[tokio::test]
    async fn large_writes_go_out_in_order_without_a_flush() {
        let (mut stream, mut peer) = pair().await;
        let big = vec![b'x'; CAPACITY * 2];
        stream.write_all(b"head").await.unwrap();
        stream.write_all(&big).await.unwrap();
        let got = arrived(&mut peer).await;
        assert_eq!(got.len(), 4 + big.len());
        assert_eq!(&got[..4], b"head");
        stream.write_all(b"tail").await.unwrap();
        AsyncWriteExt::shutdown(&mut stream).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), peer.read_to_end(&mut rest))
            .await
            .expect("shutdown closes the connection")
            .unwrap();
        assert_eq!(rest, b"tail", "shutdown sends what is left first");
    }
}
