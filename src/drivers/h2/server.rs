//! One HTTP/2 client connection on busbar's own engine: the `h2` crate's server on the
//! stream the front door holds (plaintext after the preface, or TLS with ALPN `h2`), its
//! limits, and a task per stream.
//!
//! Owns: the connection's settings and abuse limits (concurrent streams, header list
//! size, windows, rapid reset: the `h2` crate's pending-accept and local-error reset
//! limits, past which it sends GOAWAY ENHANCE_YOUR_CALM), the idle timeout (a
//! connection without streams for `idle_timeout` gets a graceful GOAWAY), the drain
//! (SIGTERM: GOAWAY with the last stream id; streams in flight complete), and going
//! away gracefully when a reload brings routes this engine does not serve.
//! Must not: serve a stream itself (`stream`), or hold policy.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

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
    let mut generation = snapshot.generation;
    drop(snapshot);
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .initial_window_size(limits.h2_stream_window)
        .initial_connection_window_size(limits.h2_connection_window)
        // HPACK-decoded, CONTINUATION frames included: a flood of them ends at this.
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_send_buffer_size(SEND_BUFFER)
        .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(LOCAL_ERROR_RESETS));
    // The preface and SETTINGS exchange within the head deadline, as an HTTP/1 head.
    let mut h2 = match within(limits.header_timeout, builder.handshake(io)).await {
        Ok(Ok(h2)) => h2,
        Ok(Err(e)) => {
            tracing::debug!(client = ?conn.peer, "HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let idle = limits.idle_timeout;
    let mut last = Instant::now();
    let mut quiet = Box::pin(tokio::time::sleep(idle));
    let mut watch = shutdown.clone();
    let abandoned = Arc::new(AtomicU64::new(0));
    let mut accepted: u64 = 0;
    let mut going = *watch.borrow();
    if going {
        h2.graceful_shutdown();
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
                        continue;
                    }
                    // The one snapshot load for this stream.
                    let snapshot = phases.state.load();
                    if snapshot.generation != generation {
                        generation = snapshot.generation;
                        // A reload brought routes this engine does not serve: new
                        // streams go to a new connection, which pingora then takes.
                        if !going && !super::serves_all(&snapshot) {
                            going = true;
                            h2.graceful_shutdown();
                        }
                    }
                    let phases = phases.clone();
                    let abandoned = abandoned.clone();
                    tokio::spawn(async move {
                        if stream::serve(&phases, snapshot, conn, request, respond).await {
                            abandoned.fetch_add(1, Relaxed);
                        }
                    });
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
            }
            _ = &mut quiet, if !going => {
                let due = last + idle;
                if h2.has_streams() || due > Instant::now() {
                    quiet.as_mut().reset(tokio::time::Instant::from_std(due.max(Instant::now()) + idle));
                } else {
                    going = true;
                    h2.graceful_shutdown();
                }
            }
        }
    }
}
