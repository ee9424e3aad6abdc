//! Lingering close for the HTTP/1 connections (plaintext, or TLS) pingora drops.
//!
//! When busbar answers before reading the whole request body (413, an early error), the
//! client is usually still sending. Closing the socket with unread bytes makes the kernel
//! send a reset, and the client's stack then throws away the answer it had already
//! received. Like nginx's `lingering_close`, a connection that is closed is first shut
//! down for writing (the answer and a FIN go out; on TLS a close_notify first), then read
//! and discarded until the client closes, goes quiet, or the time or the byte allowance
//! runs out.
//!
//! The wrapper also buffers writes, as pingora's own accepted streams do (their 1,460-byte
//! L4 write buffer): pingora writes a response head and a small body separately and
//! flushes once, and this makes them one `send`. busbar's listener hands over bare
//! streams, which have none. The buffer is given back at each flush, so an idle
//! connection holds none.
//!
//! Owns: the wrapper pingora's HTTP/1 session reads and writes through, its write buffer,
//! and the close.
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

/// Writes shorter than this are gathered until a flush (pingora's
/// `DEFAULT_L4_WRITE_BUFFER_SIZE`, one TCP segment).
const WRITE_BUFFER: usize = 1460;

/// What a lingering close needs of a stream: to write, shut down and read on its own task.
pub trait Linger: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Linger for T {}

/// A client connection that buffers writes and closes lingering when dropped.
#[derive(Debug)]
pub struct Lingering<S: Linger = L4Stream> {
    s: Option<Box<S>>,
    /// Written, not yet sent; empty (and unallocated) after each flush.
    out: Vec<u8>,
}

impl<S: Linger> Lingering<S> {
    pub fn new(s: Box<S>) -> Lingering<S> {
        Lingering {
            s: Some(s),
            out: Vec::new(),
        }
    }

    /// The connection back, for another request: no close, no linger. Only between
    /// requests, when pingora has flushed what it wrote.
    pub fn into_inner(mut self) -> Box<S> {
        debug_assert!(
            self.out.is_empty(),
            "unflushed bytes on a handed-back stream"
        );
        self.s.take().expect("stream present until dropped")
    }

    pub fn inner(&self) -> &S {
        self.s.as_deref().expect("stream present until dropped")
    }

    pub fn inner_mut(&mut self) -> &mut S {
        self.s.as_deref_mut().expect("stream present until dropped")
    }

    /// Sends the buffer; its memory is given back once it is empty.
    fn poll_send_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.out.is_empty() {
            let Lingering { s, out } = self;
            let s = s.as_deref_mut().expect("stream present until dropped");
            match Pin::new(s).poll_write(cx, out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    out.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out = Vec::new();
        Poll::Ready(Ok(()))
    }
}

impl<S: Linger> Drop for Lingering<S> {
    fn drop(&mut self) {
        let Some(mut s) = self.s.take() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let unsent = std::mem::take(&mut self.out);
        // Everything under one deadline: the flush in `shutdown` can stall on a client
        // that stopped reading, and the task must not outlive `LINGER_TIME`.
        rt.spawn(tokio::time::timeout(LINGER_TIME, async move {
            // Send what was written and not flushed, then FIN; then drain what the client
            // still sends.
            if s.write_all(&unsent).await.is_err() || s.shutdown().await.is_err() {
                return;
            }
            // On the heap, and only now: an 8 KiB array in this task's state made every
            // close copy it through `spawn` (~20,000 instructions a closed connection).
            let mut sink = vec![0u8; 8192];
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

impl<S: Linger> AsyncRead for Lingering<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(self.inner_mut()).poll_read(cx, buf)
    }
}

impl<S: Linger> AsyncWrite for Lingering<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = &mut *self;
        if me.out.len() + buf.len() > WRITE_BUFFER {
            if let Err(e) = std::task::ready!(me.poll_send_out(cx)) {
                return Poll::Ready(Err(e));
            }
        }
        if buf.len() >= WRITE_BUFFER {
            return Pin::new(me.inner_mut()).poll_write(cx, buf);
        }
        if me.out.capacity() == 0 {
            me.out.reserve_exact(WRITE_BUFFER);
        }
        me.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_send_out(cx))?;
        Pin::new(self.inner_mut()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_send_out(cx))?;
        Pin::new(self.inner_mut()).poll_shutdown(cx)
    }
}

#[async_trait]
impl<S: Linger + Shutdown> Shutdown for Lingering<S> {
    async fn shutdown(&mut self) {
        // What is buffered goes first (pingora flushes before this; an error path may not).
        if self.flush().await.is_ok() {
            Shutdown::shutdown(self.inner_mut()).await
        }
    }
}

impl<S: Linger + UniqueID> UniqueID for Lingering<S> {
    fn id(&self) -> UniqueIDType {
        self.inner().id()
    }
}

/// On TLS, the digest pingora's drivers read the TLS flag from, and the ALPN choice.
impl<S: Linger + Ssl> Ssl for Lingering<S> {
    fn get_ssl_digest(&self) -> Option<Arc<pingora_core::protocols::tls::SslDigest>> {
        self.inner().get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora_core::protocols::ALPN> {
        self.inner().selected_alpn_proto()
    }
}

#[async_trait]
impl<S: Linger + Peek> Peek for Lingering<S> {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner_mut().try_peek(buf).await
    }
}

impl<S: Linger + GetTimingDigest> GetTimingDigest for Lingering<S> {
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

impl<S: Linger + GetProxyDigest> GetProxyDigest for Lingering<S> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner_mut().set_proxy_digest(digest)
    }
}

impl<S: Linger + GetSocketDigest> GetSocketDigest for Lingering<S> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner_mut().set_socket_digest(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (Lingering, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        (Lingering::new(Box::new(L4Stream::from(server))), client)
    }

    async fn read_n(c: &mut tokio::net::TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
            .await
            .expect("the bytes arrived")
            .unwrap();
        got
    }

    /// Small writes wait for the flush and then leave in order, around a write too large
    /// to buffer; after the flush the buffer's memory is given back.
    #[tokio::test]
    async fn writes_are_gathered_until_the_flush_and_keep_their_order() {
        let (mut s, mut c) = pair().await;
        let big = vec![b'b'; 3 * WRITE_BUFFER];
        s.write_all(b"head;").await.unwrap();
        s.write_all(b"small;").await.unwrap();
        assert_eq!(s.out, b"head;small;", "not sent before a flush");
        s.write_all(&big).await.unwrap();
        s.write_all(b";tail").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(s.out.capacity(), 0, "the buffer went back at the flush");
        let mut want = b"head;small;".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b";tail");
        assert_eq!(read_n(&mut c, want.len()).await, want);
    }

    /// A connection dropped with bytes written and not flushed still sends them, then FIN.
    #[tokio::test]
    async fn unflushed_bytes_leave_before_the_close() {
        let (mut s, mut c) = pair().await;
        s.write_all(b"last answer").await.unwrap();
        drop(s);
        assert_eq!(read_n(&mut c, 11).await, b"last answer");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
