//! The service endpoint's front door, before pingora's HTTP parser.
//!
//! For each request on an HTTP/1 connection, plaintext or TLS alike (it runs the
//! keep-alive loop pingora would otherwise run), it reads the request head under a total
//! deadline (a client trickling header bytes is cut off: slowloris), refuses ambiguous
//! framing and oversize heads itself (see `head`), sends `CONNECT` to the mesh tunnel,
//! serves the everyday request (with or without a body, HTTP/1.1 or 1.0, upgrades) on
//! busbar's own HTTP/1 engine (`drivers::h1`, which takes the body's first bytes from
//! this buffer and leaves the next request's in it), and hands everything else —
//! unchanged, bytes put back — to the pingora HTTP proxy.
//! h2c connections (the HTTP/2 preface) and TLS connections whose client chose `h2` by
//! ALPN go whole to busbar's HTTP/2 engine (`drivers::h2`). A TLS connection arrives
//! after its handshake (`tls`); the
//! bytes the front door read are put back above the decryption (`tls::TlsClient`).
//! Must not: interpret more than the head (proxying is `h1`'s), or keep any state between
//! connections.

pub mod linger;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{Stream, ALPN, IO};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::base::clock;
use crate::base::deadline::{within, within_by, Elapsed};
use crate::config::Limits;
use crate::drivers::h1::{self, head};
use crate::drivers::h2;
use crate::drivers::pingora::BusbarProxy;
use crate::metrics::METRICS;
use crate::phases::Phases;
use crate::snapshot::State;
use crate::tls::TlsClient;
use head::{HeadLimits, Refusal};
use linger::Lingering;

/// A client connection the front door serves: plaintext TCP, or TLS over it.
pub trait Client: h1::ClientStream + IO + 'static {}
impl<T: h1::ClientStream + IO + 'static> Client for T {}

impl h1::ClientStream for TlsClient {
    fn unread(&mut self, bytes: &[u8]) {
        TlsClient::unread(self, bytes);
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// How long a draining node keeps an idle keep-alive connection open for a request
/// already on its way (HAProxy's `idle-close-on-response` does the same).
pub const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// How long a keep-alive connection waits for its next request before it also watches
/// for a drain: a drain is seen at most this much later on a connection that is idle.
const QUIET: Duration = Duration::from_millis(100);

/// Initial size of a connection's head buffer; a larger head grows it.
const HEAD_BUF: usize = 2048;

/// Once a head is handed on (its bytes were copied by `rewind`), a buffer grown for a
/// large head goes back to its usual size: it must not stay pinned while the request is
/// proxied, nor for the connection's life.
fn release_large(buf: &mut Vec<u8>) {
    buf.clear();
    if buf.capacity() > 4 * HEAD_BUF {
        buf.shrink_to(HEAD_BUF);
    }
}

/// Appends what the socket has to `buf`, growing it by at least `HEAD_BUF` free bytes
/// when full (reads into spare capacity: no zeroing, no bounce buffer).
async fn read_more<S: Client>(s: &mut S, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(HEAD_BUF);
    }
    s.read_buf(buf).await
}

/// How long an idle keep-alive connection keeps its head buffer. Past it the buffer is
/// freed, and the next request's first byte is read on its own before one is allocated:
/// idle connections cost no buffer (10,000 of them, ~20 MiB), and a busy connection never
/// pays the extra read.
const IDLE_KEEPS_BUFFER: Duration = Duration::from_secs(1);

/// Waits up to `idle` for the first byte of a connection's next request; the buffer goes
/// back after `IDLE_KEEPS_BUFFER`. `Ok(0)` is a close, `Err` the timeout.
///
/// The waits are [`deadline`]s, not tokio's timers: a tokio timer set while the runtime's
/// wheel is empty (every connection busy with its upstream, as under load) wakes the
/// runtime through its eventfd, one `write` and one more `epoll_wait` per request.
async fn read_first<S: Client>(
    s: &mut S,
    buf: &mut Vec<u8>,
    idle: Duration,
) -> Result<std::io::Result<usize>, Elapsed> {
    let mut left = idle;
    if IDLE_KEEPS_BUFFER < idle {
        match within(IDLE_KEEPS_BUFFER, read_more(s, buf)).await {
            Err(_) => *buf = Vec::new(),
            read => return read,
        }
        left = idle - IDLE_KEEPS_BUFFER;
    }
    if buf.capacity() > 0 {
        return within(left, read_more(s, buf)).await;
    }
    let mut first = [0u8; 1];
    let read = within(left, s.read(&mut first)).await;
    if let Ok(Ok(1)) = read {
        buf.reserve(HEAD_BUF);
        buf.push(first[0]);
    }
    read
}

pub struct Edge {
    pub proxy: Arc<HttpProxy<BusbarProxy>>,
    /// The same phases, for busbar's own HTTP/1 engine (`drivers::h1`).
    pub phases: Arc<Phases>,
    pub state: Arc<State>,
    /// After `--upgrade`: the listeners with `proxy_protocol` pingora accepts on.
    pub handed_over: Option<Arc<crate::listeners::HandedOver>>,
}

/// How a busy spell of a connection ended ([`Edge::busy`]).
enum Spell<S: Client> {
    /// No request came for `QUIET`: the connection, for the idle wait.
    Quiet(Box<Lingering<S>>),
    /// HTTP/2 with prior knowledge: the stream, its preface put back.
    H2(Stream),
    /// Closed, refused, or tunnelled: nothing left to do.
    Done,
}

/// What the front door decided for the next request on a connection.
enum Next<S: Client> {
    /// An HTTP/1 request whose head passed: the proxy handles it.
    Request(Box<Lingering<S>>),
    /// A request busbar's own HTTP/1 path serves (`h1`); its head is consumed.
    Direct(Box<Lingering<S>>, Box<h1::FastRequest>),
    /// HTTP/2 with prior knowledge: the proxy owns the connection from here.
    H2(Stream),
    /// Closed, refused, or tunnelled: nothing left to do.
    Done,
}

/// Answers a refused head and closes; the answer gets its access log line (with the
/// first token of the head as the method, when it looks like one).
async fn refuse<S: Client>(
    log: &crate::accesslog::AccessLog,
    stream: &mut S,
    head: &[u8],
    status: u16,
    reason: &str,
) {
    let (line, code) = match status {
        408 => (http::StatusCode::REQUEST_TIMEOUT, "header_timeout"),
        414 => (http::StatusCode::URI_TOO_LONG, "request_line_too_long"),
        431 => (
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
        ),
        501 => (
            http::StatusCode::NOT_IMPLEMENTED,
            "unsupported_transfer_coding",
        ),
        _ => (http::StatusCode::BAD_REQUEST, "malformed_request"),
    };
    let (reply, _) = crate::base::reply::Refusal::new(code, reason).to_closing_answer(line);
    METRICS.edge_refusals.with_label_values(&[code]).inc();
    let started = Instant::now();
    let _ = stream.write_all(&reply).await;
    let _ = stream.flush().await;
    let client = crate::base::peer_of(stream);
    log.refusal(client, method_of(head), status, code, started);
}

/// The method of a head, if its first token is one (a token of at most 16 letters
/// before a space); `""` otherwise.
fn method_of(head: &[u8]) -> &str {
    let token = head.split(|&b| b == b' ').next().unwrap_or(&[]);
    let plain = head.len() > token.len()
        && !token.is_empty()
        && token.len() <= 16
        && token.iter().all(u8::is_ascii_alphabetic);
    match plain {
        true => std::str::from_utf8(token).unwrap_or(""),
        false => "",
    }
}

impl Edge {
    /// The HTTP/1 keep-alive loop pingora would run on a connection, with the front door
    /// before each request. `tls`: the connection is TLS (for `X-Forwarded-Proto`).
    /// `Some`: the client spoke HTTP/2 with prior knowledge; the stream, its preface put
    /// back, for [`Edge::h2`] (run by the caller, once this loop's state is freed).
    ///
    /// The requests themselves are served by [`Edge::busy`], in a box of its own for as
    /// long as they keep coming: an idle connection holds none of a request's state (a
    /// few KiB), and a busy one allocates and fills that box once per busy spell, not
    /// once per request (which cost ~830 instructions a request: mimalloc's slow path for
    /// a block that size, and the copy of the whole future into it).
    async fn serve<S: Client>(
        self: &Arc<Self>,
        stream: Box<S>,
        tls: bool,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.state.load().config.limits;
        let mut persistent: Option<HttpPersistentSettings> = None;
        let mut head = Vec::with_capacity(HEAD_BUF);
        let mut conn = Box::new(Lingering::new(stream));
        loop {
            let busy = self.busy(conn, &mut head, limits, tls, shutdown, &mut persistent);
            conn = match Box::pin(busy).await {
                Spell::Quiet(c) => c,
                Spell::H2(s) => return Some(s),
                Spell::Done => return None,
            };
            // No request for `QUIET` (less than `idle_timeout`): wait for the next one until
            // `idle_timeout`, and watch for a drain.
            let left = limits.idle_timeout - QUIET.min(limits.idle_timeout);
            let mut watch = shutdown.clone();
            let s = conn.inner_mut();
            let first = tokio::select! {
                r = read_first(s, &mut head, left) => r,
                // Draining: closing an idle keep-alive connection now races a request the
                // client may be sending on it. Give such a request a moment to arrive; it
                // is answered with `Connection: close`. A quiet connection is closed after.
                _ = watch.changed() => within(DRAIN_LINGER, read_more(s, &mut head)).await,
            };
            if !matches!(first, Ok(Ok(n)) if n > 0) {
                return None;
            }
        }
    }

    /// Serves a connection's requests while they keep coming: each within `QUIET` of the
    /// last one's end (or pipelined). [`Spell::Quiet`]: none came, the connection goes
    /// back to [`Edge::serve`]'s idle wait with `head` empty.
    async fn busy<S: Client>(
        self: &Arc<Self>,
        mut conn: Box<Lingering<S>>,
        head: &mut Vec<u8>,
        limits: Limits,
        tls: bool,
        shutdown: &ShutdownWatch,
        persistent: &mut Option<HttpPersistentSettings>,
    ) -> Spell<S> {
        // The own engine's buffers for its upstream exchanges, kept while requests keep
        // coming (and freed with this spell's box).
        let mut scratch = h1::Scratch::default();
        loop {
            // `head` may already hold the start of a pipelined request (see `front`), or
            // the first bytes the idle wait read.
            if head.is_empty() {
                // A busy connection's next request comes within `QUIET`: this wait does
                // not watch for a drain (the watch's clone and select showed in the
                // profiles: `load-tests/RESULTS.md`).
                let quiet = QUIET.min(limits.idle_timeout);
                match within(quiet, read_more(conn.inner_mut(), head)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Err(Elapsed) if limits.idle_timeout > quiet => return Spell::Quiet(conn),
                    _ => return Spell::Done,
                }
            }
            let s = match self.front(conn, head, limits, shutdown).await {
                Next::Direct(mut c, request) => {
                    let s = c.inner_mut();
                    let peer = crate::base::peer_of(s);
                    // Inline: this spell's box holds its state (see `serve`).
                    let serve = h1::serve(
                        &self.phases,
                        s,
                        peer,
                        tls,
                        request,
                        shutdown,
                        head,
                        &mut scratch,
                    );
                    if !serve.await {
                        return Spell::Done;
                    }
                    conn = c;
                    continue;
                }
                Next::Request(s) => s,
                // The preface was put back: whoever speaks h2c reads it again.
                Next::H2(s) => return Spell::H2(s),
                Next::Done => return Spell::Done,
            };
            // If the proxy drops the connection (an answer before the whole body was
            // read, `Connection: close`), it is closed lingering, not reset.
            let mut session = ServerSession::new_http1(s);
            match persistent.take() {
                Some(p) => p.apply_to_session(&mut session),
                None => {
                    let keepalive =
                        (!*shutdown.borrow()).then_some(limits.idle_timeout.as_secs().max(1));
                    session.set_keepalive(keepalive);
                    session.set_keepalive_reuses_remaining(
                        self.proxy
                            .server_options
                            .as_ref()
                            .and_then(|o| o.keepalive_request_limit),
                    );
                }
            }
            let Some(served) = self.proxy.process_new_http(session, shutdown).await else {
                return Spell::Done;
            };
            let (next, settings) = served.consume();
            // The proxy gives the stream back still wrapped for a lingering close.
            let Ok(next) = next.into_any().downcast::<Lingering<S>>() else {
                return Spell::Done;
            };
            conn = next;
            *persistent = settings;
        }
    }

    /// An HTTP/2 connection, for its whole life: busbar's own engine (`drivers::h2`).
    async fn h2(
        self: &Arc<Self>,
        stream: Stream,
        tls: bool,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let conn = h2::Conn {
            peer: crate::base::peer_of(&*stream),
            tls,
        };
        // Boxed: see `process_new`.
        Box::pin(h2::serve(&self.phases, stream, conn, shutdown)).await;
        None
    }

    /// Reads and judges the next request head of a connection.
    ///
    /// `buf` is the connection's head buffer, kept across its requests; it holds the
    /// head's first bytes, and what the client pipelined after it, if anything.
    async fn front<S: Client>(
        &self,
        mut conn: Box<Lingering<S>>,
        buf: &mut Vec<u8>,
        limits: Limits,
        shutdown: &ShutdownWatch,
    ) -> Next<S> {
        let hl = HeadLimits {
            max_request_line: limits.max_request_line,
            max_head_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
        };
        let log = &*self.phases.access_log;
        let s = conn.inner_mut();
        // `buf` holds the head's first bytes (`busy` read them, or they were pipelined).
        // Set when the head does not come whole in the first read.
        let mut deadline: Option<Instant> = None;
        let end = loop {
            if buf.starts_with(H2_PREFACE)
                || H2_PREFACE.starts_with(buf) && buf.len() < H2_PREFACE.len()
            {
                if buf.len() >= H2_PREFACE.len() {
                    s.unread(buf);
                    return Next::H2(conn.into_inner());
                }
            } else if let Some(end) = head::head_end(buf) {
                break end;
            } else if let Some(r) = head::too_long(buf, &hl) {
                refuse(log, s, buf, r.status, r.reason).await;
                return Next::Done;
            }
            let deadline = *deadline.get_or_insert_with(|| clock::now() + limits.header_timeout);
            match within_by(limits.header_timeout, deadline, read_more(s, buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Next::Done,
                Err(_) => {
                    refuse(log, s, buf, 408, "the request head did not arrive in time").await;
                    return Next::Done;
                }
            }
        };
        if buf.starts_with(b"CONNECT ") {
            let log = crate::fallback::connect::Log {
                log,
                client: crate::base::peer_of(&*conn),
                started: Instant::now(),
            };
            // Boxed, as a rare path: inline, its state would size every connection's task.
            Box::pin(crate::fallback::connect::tunnel(
                &self.state,
                conn.into_inner(),
                &buf[..end],
                &buf[end..],
                shutdown,
                log,
            ))
            .await;
            return Next::Done;
        }
        // The own path's parse is also the check for the heads it takes; the rest are
        // judged by `head::check`.
        if let Some(direct) = h1::take(&self.state, &buf[..end], &hl) {
            buf.drain(..end);
            if buf.is_empty() {
                release_large(buf);
            }
            return Next::Direct(conn, direct);
        }
        match head::check(&buf[..end], &hl) {
            Ok(body) => {
                // The proxy gets this request's head and the body bytes already read;
                // bytes past them are the next, pipelined request and stay here for
                // the next turn (pingora would drop them). A chunked body's end is not
                // known here: everything goes, as before.
                let take = match body {
                    head::Body::Length(n) => {
                        let read = (buf.len() - end) as u64;
                        end + n.min(read) as usize
                    }
                    head::Body::Chunked => buf.len(),
                };
                s.unread(&buf[..take]);
                buf.drain(..take);
                if buf.is_empty() {
                    release_large(buf);
                }
                Next::Request(conn)
            }
            Err(Refusal { status, reason }) => {
                refuse(log, s, &buf[..end], status, reason).await;
                Next::Done
            }
        }
    }
}

#[async_trait]
impl ServerApp for Edge {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        METRICS.connections.inc();
        let _open = OpenConnection;
        let stream = match &self.handed_over {
            Some(h) => h.accept(stream).await?,
            None => stream,
        };
        // The HTTP/1 loop and the HTTP/2 engine each run in a box of their own: this
        // task, which lives as long as the connection, then holds neither's state inline,
        // and an idle connection costs only what its protocol keeps (an HTTP/1 one none
        // of HTTP/2's, an h2c one none of the HTTP/1 loop's once it was handed over).
        // The HTTP/1 loop reads the clock once a poll (`clock::turns`).
        if stream.as_any().is::<L4Stream>() {
            let l4 = stream.into_any().downcast::<L4Stream>().ok()?;
            let h2c = clock::turns(Box::pin(self.serve(l4, false, shutdown))).await?;
            return self.h2(h2c, false, shutdown).await;
        }
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            return self.h2(stream, true, shutdown).await;
        }
        // No other stream comes from busbar's listeners.
        let tls = stream.into_any().downcast::<TlsClient>().ok()?;
        // A TLS client that chose `http/1.1` (or nothing) by ALPN and then sent the
        // HTTP/2 preface: still TLS.
        let h2 = clock::turns(Box::pin(self.serve(tls, true, shutdown))).await?;
        self.h2(h2, true, shutdown).await
    }
    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.proxy).await;
    }
}

/// Counts a client connection in `busbar_downstream_connections` while it lives;
/// the drain waits for the count to reach zero.
struct OpenConnection;

impl Drop for OpenConnection {
    fn drop(&mut self) {
        METRICS.connections.dec();
    }
}

/// How long a refused connection's reply may take to leave.
pub const REFUSAL_FLUSH: Duration = Duration::from_millis(100);
