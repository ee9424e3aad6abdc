//! A tunnel: once HTTP is done with a client connection and its upstream one (an
//! upgrade's `101 Switching Protocols`, a `CONNECT`'s `200`), bytes are copied both ways,
//! as they come, until both sides have closed.
//!
//! Owns: the copy (both directions at once, so neither side's backpressure stalls the
//! other: tokio's `copy_bidirectional`, a side's close passed on as a half-close), the
//! idle timeout (no byte read from either side for that long closes both), the drain
//! (once the node drains, a tunnel gets the grace period, then is closed: it must not
//! hold a shutdown for an hour), and the byte counts each way.
//! Must not: parse anything that goes through, decide where a tunnel goes, or write
//! HTTP (the drivers that open tunnels do: `drivers::h1` for upgrades,
//! `fallback::connect` for `CONNECT`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
// tokio's clock (not std's): the unit tests run on a paused one.
use tokio::time::Instant;

/// How long closing a tunnel's two sides may take (a TLS `close_notify` that cannot be
/// written to a peer that stopped reading must not hold the task).
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// What bounds a tunnel's life besides its peers.
pub struct Bounds {
    /// No byte from either side for this long closes the tunnel (the service's
    /// `tunnel_idle_timeout`).
    pub idle: Duration,
    /// The server's shutdown watch: `true` once the node drains.
    pub drain: watch::Receiver<bool>,
    /// How long a tunnel may go on once the drain has begun (`server.grace_period`).
    pub grace: Duration,
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed (or one failed): the peers ended it.
    Closed,
    /// Nothing went either way for the idle timeout: busbar closed it.
    Idle,
    /// The node drained and the grace period passed: busbar closed it.
    Drained,
}

impl End {
    /// The access log's `error` for a tunnel busbar ended; `None` when the peers did.
    pub fn code(self) -> Option<&'static str> {
        match self {
            End::Closed => None,
            End::Idle => Some("tunnel_idle"),
            End::Drained => Some("tunnel_drained"),
        }
    }
}

/// What went through a tunnel, and how it ended.
#[derive(Debug, Clone, Copy)]
pub struct Copied {
    /// Bytes read from the client and sent upstream.
    pub to_upstream: u64,
    /// Bytes read from the upstream and sent to the client.
    pub to_client: u64,
    pub end: End,
}

/// Copies between `client` and `upstream` until both have closed, or `bounds` end it;
/// then both are shut down (a FIN, or TLS's `close_notify`), so each peer sees the close.
pub async fn copy<C, U>(client: &mut C, upstream: &mut U, mut bounds: Bounds) -> Copied
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = Instant::now();
    // When a byte was last read, either way (ns since `start`): written by the copy,
    // read by the idle watch, without a timer reset per read.
    let last = AtomicU64::new(0);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = {
        let mut c = Watched {
            io: &mut *client,
            read: &up,
            last: &last,
            start,
        };
        let mut u = Watched {
            io: &mut *upstream,
            read: &down,
            last: &last,
            start,
        };
        let watch = async {
            let mut drain_by: Option<Instant> = None;
            loop {
                if drain_by.is_none() && *bounds.drain.borrow() {
                    drain_by = Some(Instant::now() + bounds.grace);
                }
                let quiet_since = start + Duration::from_nanos(last.load(Relaxed));
                let idle_at = quiet_since + bounds.idle;
                let now = Instant::now();
                if now >= idle_at {
                    return End::Idle;
                }
                if drain_by.is_some_and(|d| now >= d) {
                    return End::Drained;
                }
                let wake = drain_by.map_or(idle_at, |d| d.min(idle_at));
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    // The watch only wakes the loop; its value is read above. A watch
                    // whose sender is gone never changes again.
                    changed = bounds.drain.changed(), if drain_by.is_none() => {
                        if changed.is_err() {
                            drain_by = Some(Instant::now() + bounds.grace);
                        }
                    }
                }
            }
        };
        tokio::select! {
            // An error (a reset) ends the copy as a close does: the peers ended it.
            _ = tokio::io::copy_bidirectional(&mut c, &mut u) => End::Closed,
            end = watch => end,
        }
    };
    if end != End::Closed {
        let _ = tokio::time::timeout(CLOSE_WITHIN, client.shutdown()).await;
        let _ = tokio::time::timeout(CLOSE_WITHIN, upstream.shutdown()).await;
    }
    Copied {
        to_upstream: up.load(Relaxed),
        to_client: down.load(Relaxed),
        end,
    }
}

/// One side of a tunnel: counts what is read from it and notes when.
struct Watched<'a, S: ?Sized> {
    io: &'a mut S,
    read: &'a AtomicU64,
    last: &'a AtomicU64,
    start: Instant,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Watched<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *me.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            me.read.fetch_add(n as u64, Relaxed);
            let at = me.start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            me.last.store(at, Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt};

    fn bounds(idle: Duration) -> (watch::Sender<bool>, Bounds) {
        let (tx, drain) = watch::channel(false);
        let b = Bounds {
            idle,
            drain,
            grace: Duration::from_secs(30),
        };
        (tx, b)
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_go_both_ways_and_a_close_ends_the_tunnel() {
        let (mut client, mut c_end) = duplex(64);
        let (mut upstream, mut u_end) = duplex(64);
        let (_tx, b) = bounds(Duration::from_secs(60));
        let tunnel = tokio::spawn(async move { copy(&mut c_end, &mut u_end, b).await });
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        upstream.write_all(b"back!!").await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"back!!");
        drop(client);
        drop(upstream);
        let copied = tunnel.await.unwrap();
        assert_eq!(
            (copied.to_upstream, copied.to_client, copied.end),
            (5, 6, End::Closed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_tunnel_closes_after_the_idle_timeout_and_traffic_keeps_it() {
        let (mut client, mut c_end) = duplex(64);
        let (mut upstream, mut u_end) = duplex(64);
        let (_tx, b) = bounds(Duration::from_secs(10));
        let started = tokio::time::Instant::now();
        let tunnel = tokio::spawn(async move { copy(&mut c_end, &mut u_end, b).await });
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(8)).await;
            client.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            upstream.read_exact(&mut one).await.unwrap();
        }
        let copied = tunnel.await.unwrap();
        assert_eq!(copied.end, End::Idle);
        let lived = started.elapsed();
        assert!(lived >= Duration::from_secs(34), "{lived:?}");
        assert!(lived < Duration::from_secs(35), "{lived:?}");
        // Both peers see the close.
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(upstream.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_leaves_the_grace_period_then_closes() {
        let (_client, mut c_end) = duplex(64);
        let (_upstream, mut u_end) = duplex(64);
        let (tx, b) = bounds(Duration::from_secs(3600));
        let tunnel = tokio::spawn(async move { copy(&mut c_end, &mut u_end, b).await });
        tokio::time::sleep(Duration::from_secs(100)).await;
        let drained = tokio::time::Instant::now();
        tx.send(true).unwrap();
        let copied = tunnel.await.unwrap();
        assert_eq!(copied.end, End::Drained);
        assert_eq!(drained.elapsed().as_secs(), 30);
    }
}
