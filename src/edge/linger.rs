//! Lingering close for the plaintext HTTP/1 connections pingora drops.
//!
//! When busbar answers before reading the whole request body (413, an early error), the
//! client is usually still sending. Closing the socket with unread bytes makes the kernel
//! send a reset, and the client's stack then throws away the answer it had already
//! received. Like nginx's `lingering_close`, a connection that is closed is first shut
//! down for writing (the answer and a FIN go out), then read and discarded until the
//! client closes, goes quiet, or the time or the byte allowance runs out.
//!
//! Owns: the wrapper pingora's HTTP/1 session reads and writes through, and the close.
//! Must not: change a byte of what is read or written while the connection is in use.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Longest a closed connection is kept reading (nginx: `lingering_time`, 30 s).
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// Longest wait for the client's next bytes (nginx: `lingering_timeout`, 5 s).
pub const LINGER_QUIET: Duration = Duration::from_secs(1);
/// Most bytes discarded: more than the socket buffers hold in flight when the client
/// sees the answer, and a bound on the CPU a client that ignores the answer can cost.
pub const LINGER_MAX_BYTES: usize = 8 << 20;

/// A plaintext client connection that closes lingering when dropped.
#[derive(Debug)]
pub struct Lingering(Option<Box<L4Stream>>);

impl Lingering {
    pub fn new(s: Box<L4Stream>) -> Lingering {
        Lingering(Some(s))
    }

    /// The connection back, for another request: no close, no linger.
    pub fn into_inner(mut self) -> Box<L4Stream> {
        self.0.take().expect("stream present until dropped")
    }

    pub fn inner(&self) -> &L4Stream {
        self.0.as_deref().expect("stream present until dropped")
    }

    pub fn inner_mut(&mut self) -> &mut L4Stream {
        self.0.as_deref_mut().expect("stream present until dropped")
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut s) = self.0.take() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Everything under one deadline: the flush in `shutdown` can stall on a client
        // that stopped reading, and the task must not outlive `LINGER_TIME`.
        rt.spawn(tokio::time::timeout(LINGER_TIME, async move {
            // Flush the answer and send FIN; then drain what the client still sends.
            if s.shutdown().await.is_err() {
                return;
            }
            let mut sink = [0u8; 8192];
            let mut discarded = 0;
            while let Ok(Ok(n)) = tokio::time::timeout(LINGER_QUIET, s.read(&mut sink)).await {
                discarded += n;
                if n == 0 || discarded > LINGER_MAX_BYTES {
                    break;
                }
            }
        }));
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(self.inner_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.inner_mut()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.inner_mut()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.inner_mut()).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.inner_mut()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner().is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Lingering {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(self.inner_mut()).await
    }
}

impl UniqueID for Lingering {
    fn id(&self) -> UniqueIDType {
        self.inner().id()
    }
}

impl Ssl for Lingering {}

#[async_trait]
impl Peek for Lingering {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner_mut().try_peek(buf).await
    }
}

impl GetTimingDigest for Lingering {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner().get_write_pending_time()
    }
}

impl GetProxyDigest for Lingering {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner_mut().set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Lingering {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner_mut().set_socket_digest(digest)
    }
}
