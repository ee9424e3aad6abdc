//! One HTTP/2 client connection on busbar's own engine: the `h2` crate's server on the
//! stream the front door holds (plaintext after the preface, or TLS with ALPN `h2`), its
//! limits, and a task per stream.
//!
//! Owns: the connection's settings and abuse limits (concurrent streams, header list
//! size, windows, rapid reset: the `h2` crate's pending-accept and local-error reset
//! limits, past which it sends GOAWAY ENHANCE_YOUR_CALM), the idle timeout (a
//! connection without streams for `idle_timeout` gets a graceful GOAWAY), the drain
//! (SIGTERM: GOAWAY with the last stream id; streams in flight complete), and liveness:
//! a PING every `h2_keepalive_interval` (when set) and with every GOAWAY, and a client
//! that leaves one unanswered for `h2_keepalive_timeout` has its connection closed (its
//! streams end, their upstream streams are reset).
//! Must not: serve a stream itself (`stream`), or hold policy.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite};

use super::stream::{self, Conn};
use crate::base::deadline::within;
use crate::phases::Phases;

/// Streams reset by the client before busbar accepted them, at once, past which the
/// connection is a rapid-reset attack (CVE-2023-44487) and gets GOAWAY
/// ENHANCE_YOUR_CALM: the `h2` crate's default (20), as hyper's.
const PENDING_ACCEPT_RESETS: usize = 20;

/// Streams busbar itself reset for a client's error (malformed heads, flow-control
/// errors) over a connection's life, past which it is an attack (the "MadeYouReset"
/// variant) and gets GOAWAY ENHANCE_YOUR_CALM: the `h2` crate's default.
const LOCAL_ERROR_RESETS: usize = 1024;

/// Streams a client abandoned (reset, or left) before any answer, over a connection's
/// life, from which the connection is taken for a rapid-reset flood when they are also
/// more than half its streams: GOAWAY ENHANCE_YOUR_CALM. The `h2` crate's own limit
/// counts only streams reset before busbar accepted them; a flood busbar keeps pace
/// with is counted here (each such stream may have cost an upstream try).
const ABANDONED_FLOOD: u64 = 100;

/// Bytes of response data the `h2` crate buffers per stream before a send waits for
/// the socket: with the client's window, what a slow reader's stream can make busbar
/// hold (hyper's default is 400 KiB).
const SEND_BUFFER: usize = 256 * 1024;

/// Serves the HTTP/2 connection `io` from `conn` until it closes, goes idle, or the
/// node drains. The client's preface must be the first thing `io` reads.
pub(crate) async fn serve<T>(phases: &Arc<Phases>, io: T, conn: Conn, shutdown: &ShutdownWatch)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let snapshot = phases.state.load();
    let limits = snapshot.config.limits;
    drop(snapshot);
    // The builder is dropped before the first await: kept, it would sit in this future's
    // state (152 bytes) for the connection's whole life.
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .initial_window_size(limits.h2_stream_window)
        .initial_connection_window_size(limits.h2_connection_window)
        // HPACK-decoded, CONTINUATION frames included: a flood of them ends at this.
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_send_buffer_size(SEND_BUFFER)
        .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(LOCAL_ERROR_RESETS))
        .handshake(io);
    // The preface and SETTINGS exchange within the head deadline, as an HTTP/1 head.
    let mut h2 = match within(limits.header_timeout, handshake).await {
        Ok(Ok(h2)) => h2,
        Ok(Err(e)) => {
            tracing::debug!(client = ?conn.peer, "HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let idle = limits.idle_timeout;
    let mut last = Instant::now();
    // Inline: this future is boxed already (`edge::Edge::h2`); a box of its own would be
    // one more allocation an idle connection keeps.
    let quiet = tokio::time::sleep(idle);
    tokio::pin!(quiet);
    let mut watch = shutdown.clone();
    let abandoned = Arc::new(AtomicU64::new(0));
    let mut accepted: u64 = 0;
    let mut going = *watch.borrow();
    let mut alive = Liveness::new(limits.h2_keepalive_interval, limits.h2_keepalive_timeout);
    if going {
        h2.graceful_shutdown();
        alive.going_away(&mut h2);
    }
    loop {
        tokio::select! {
            next = h2.accept() => match next {
                Some(Ok((request, respond))) => {
                    last = Instant::now();
                    accepted += 1;
                    let gone = abandoned.load(Relaxed);
                    if gone >= ABANDONED_FLOOD && gone * 2 > accepted {
                        tracing::info!(client = ?conn.peer, "HTTP/2 rapid reset: GOAWAY");
                        h2.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                        going = true;
                        alive.going_away(&mut h2);
                        continue;
                    }
                    // The one snapshot load for this stream.
                    let snapshot = phases.state.load();
                    let phases = phases.clone();
                    let abandoned = abandoned.clone();
                    // The stream's future (a few KiB with the exchange's state) goes in a
                    // box: tokio moves a spawned future several times (into the task cell,
                    // and its stage when it completes), and those copies of the unboxed
                    // future cost ~8,000 instructions a stream (callgrind, gRPC unary).
                    tokio::spawn(Box::pin(async move {
                        if stream::serve(&phases, snapshot, conn, request, respond).await {
                            abandoned.fetch_add(1, Relaxed);
                        }
                    }));
                }
                // A connection error: the `h2` crate has sent GOAWAY with its reason.
                Some(Err(e)) => {
                    tracing::debug!(client = ?conn.peer, "HTTP/2 connection error: {e}");
                    return;
                }
                None => return,
            },
            // Draining: GOAWAY with the last stream id; the connection closes once the
            // streams in flight complete.
            _ = watch.changed(), if !going => {
                going = true;
                h2.graceful_shutdown();
                alive.going_away(&mut h2);
            }
            beat = alive.next(), if alive.active() => {
                if !alive.on(beat, &mut h2) {
                    // Not answered: the client is gone or stuck. No GOAWAY (it would wait
                    // for a socket nobody reads): the connection is dropped, its streams
                    // end, and their upstream streams are reset.
                    tracing::info!(client = ?conn.peer, "HTTP/2 client did not answer PING: connection closed");
                    return;
                }
            }
            _ = &mut quiet, if !going => {
                let due = last + idle;
                if h2.has_streams() || due > Instant::now() {
                    quiet.as_mut().reset(tokio::time::Instant::from_std(due.max(Instant::now()) + idle));
                } else {
                    going = true;
                    h2.graceful_shutdown();
                    alive.going_away(&mut h2);
                }
            }
        }
    }
}

/// What [`Liveness::next`] saw.
enum Beat {
    /// The PING was answered (`true`), or the connection closed (`false`).
    Answered(bool),
    /// The timer fired: the next PING is due, or the one out went unanswered.
    Due,
}

/// A connection's liveness check: one PING at a time, sent on a schedule (the keepalive
/// interval) or when the connection goes away, and a deadline for its answer.
///
/// Its PING handle and timer are taken when first needed: a connection without a
/// keepalive interval that never goes away (most idle ones) holds neither (the handle is
/// an allocation of the `h2` crate's, the timer a box of its own).
struct Liveness {
    /// Taken from the connection at the first PING; `None` before, or when the `h2`
    /// crate gave none (it gives one per connection).
    pings: Option<h2::PingPong>,
    interval: Option<Duration>,
    timeout: Duration,
    /// A PING is out, unanswered; the timer is its deadline.
    out: bool,
    /// The timer is set: the next PING, or the deadline of the one out.
    armed: bool,
    /// Made when first armed.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The connection a [`Liveness`] watches.
type Connection<T> = h2::server::Connection<T, bytes::Bytes>;

impl Liveness {
    fn new(interval: Option<Duration>, timeout: Duration) -> Self {
        let mut alive = Liveness {
            pings: None,
            interval,
            timeout,
            out: false,
            armed: false,
            timer: None,
        };
        // The first PING takes the handle (`send`): a connection without one disarms then.
        if let Some(every) = interval {
            alive.arm(every);
        }
        alive
    }

    /// Is there anything to wait for: a PING's answer, or the timer?
    fn active(&self) -> bool {
        self.out || self.armed
    }

    /// The next thing that happens: the answer to the PING that is out (`Ok`; `Err`
    /// when the connection closed), or the timer.
    async fn next(&mut self) -> Beat {
        let Liveness {
            pings,
            out,
            armed,
            timer,
            ..
        } = self;
        tokio::select! {
            pong = async {
                match pings {
                    Some(p) => poll_fn(|cx| p.poll_pong(cx)).await.is_ok(),
                    None => std::future::pending().await,
                }
            }, if *out => Beat::Answered(pong),
            _ = async {
                match timer {
                    Some(t) => t.as_mut().await,
                    None => std::future::pending().await,
                }
            }, if *armed => Beat::Due,
        }
    }

    /// Acts on `beat`; `false` when the PING out went unanswered: the client is gone.
    fn on<T>(&mut self, beat: Beat, h2: &mut Connection<T>) -> bool
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        match beat {
            Beat::Answered(ok) => {
                self.out = false;
                match self.interval {
                    Some(every) if ok => self.arm(every),
                    _ => self.armed = false,
                }
                true
            }
            Beat::Due if self.out => false,
            Beat::Due => {
                self.send(h2);
                true
            }
        }
    }

    /// The connection is going away (GOAWAY sent): its client must still answer, or the
    /// `h2` crate (which waits for its own PING's answer before closing) would hold the
    /// connection for as long as the socket lives.
    fn going_away<T>(&mut self, h2: &mut Connection<T>)
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        if !self.out {
            self.send(h2);
        }
    }

    fn send<T>(&mut self, h2: &mut Connection<T>)
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        if self.pings.is_none() {
            self.pings = h2.ping_pong();
        }
        let Some(p) = &mut self.pings else {
            self.armed = false;
            return;
        };
        if p.send_ping(h2::Ping::opaque()).is_ok() {
            self.out = true;
            let timeout = self.timeout;
            self.arm(timeout);
        } else {
            // The connection is closing: nothing to watch.
            self.armed = false;
        }
    }

    fn arm(&mut self, after: Duration) {
        self.armed = true;
        let at = tokio::time::Instant::now() + after;
        match &mut self.timer {
            Some(t) => t.as_mut().reset(at),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }
}
