//! Multiplexed HTTP/2 connections to instances, per thread: the one way busbar opens an
//! HTTP/2 stream to an instance (h2c with prior knowledge, or h2 over TLS with ALPN `h2`).
//!
//! Owns: dialling (TCP, the TLS handshake through `drivers::h1::upstream::connect` with the
//! service's client configuration, the HTTP/2 handshake, all under the try's connect
//! timeout), each connection's stream count and cap (the instance's
//! SETTINGS_MAX_CONCURRENT_STREAMS, capped by the service's `h2_max_streams`), choosing a
//! connection with room or dialling another (at most [`MAX_CONNECTIONS`] per instance),
//! retiring a connection that got GOAWAY or broke, or that leaves a PING unanswered
//! once a stream on it went past its deadline ([`Slot::suspect`]), dropping idle ones,
//! and telling a
//! stream the instance refused before processing it ([`refused`]) from one that failed.
//! Must not: decide retries (`phases::attempt`; the caller retries a refused stream
//! through `Phases::on_try_failure`), pick instances, or lock across an await: the pool
//! is a thread-local map, touched only between awaits.
//!
//! A new connection joins the pool once the instance's SETTINGS are in (a PING round
//! trip after the preface), so no stream is opened past its limit (which a server
//! answers with REFUSED_STREAM). A burst of streams to an instance with no free
//! connection waits for a dial in progress while that connection will have room, rather
//! than each dialling its own. When every connection is full and [`MAX_CONNECTIONS`]
//! are open, a new stream goes on the least loaded one anyway: the h2 crate holds it
//! until the instance frees a stream (it is opened then, never dropped), so callers
//! queue rather than fail; the route's deadline bounds the wait.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, SendStream};

use crate::drivers::h1::pool::{Conn, Key};
use crate::drivers::h1::upstream::{self, ConnectError};
use crate::phases::Try;

/// Connections to one instance at most, per thread. With the default 100 streams each
/// that is 800 streams in flight per instance and thread before streams queue; an
/// instance that allows one stream per connection gets 8 at once.
pub const MAX_CONNECTIONS: usize = 8;

/// How long a connection with no stream in flight stays pooled.
pub const IDLE: Duration = crate::phases::UPSTREAM_IDLE;

/// Streams opened between two sweeps of a thread's pool for idle and closed connections.
const SWEEP_EVERY: u32 = 1024;

/// Flow-control windows busbar offers instances: 1 MiB per stream and 4 MiB per
/// connection, so a reply of a few MiB is not paced by window updates on a LAN (h2's
/// default is the RFC's 64 KiB).
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;

/// Why no stream could be opened on the try's instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// TCP or the TLS handshake failed, or the HTTP/2 handshake did; `timed_out` when
    /// the connect timeout passed first.
    Connect { timed_out: bool },
    /// The instance's certificate did not verify (`Phases::on_certificate_failure`).
    Certificate,
}

/// One connection's state, shared by the pool and the streams on it (which may end on
/// any thread).
#[derive(Default)]
struct Shared {
    /// Streams open or queued on the connection.
    in_flight: AtomicU32,
    /// Got GOAWAY, failed, or closed: takes no new stream.
    retired: AtomicBool,
    /// A stream on it went unanswered past its deadline ([`Slot::suspect`]): its task
    /// PINGs the instance, and closes the connection if no answer comes.
    check: tokio::sync::Notify,
}

/// A pooled connection.
struct Pooled {
    send: SendRequest<Bytes>,
    shared: Arc<Shared>,
    /// When its last stream was opened (or it was dialled).
    used: Instant,
}

impl Pooled {
    /// Streams it may carry at once: the instance's limit (known before the connection
    /// joins the pool: `handshake`), capped by the service's.
    fn cap(&self, max_streams: u32) -> u32 {
        let theirs = u32::try_from(self.send.current_max_send_streams()).unwrap_or(u32::MAX);
        theirs.min(max_streams).max(1)
    }

    fn load(&self) -> u32 {
        self.shared.in_flight.load(Relaxed)
    }

    fn retired(&self) -> bool {
        self.shared.retired.load(Relaxed)
    }
}

/// One instance's connections in one thread's pool.
#[derive(Default)]
struct Instance {
    conns: Vec<Pooled>,
    /// Dials in progress from this thread.
    dialing: usize,
    /// Streams waiting for them (all woken when one ends).
    waiting: usize,
    /// Wakes the streams waiting for a dial ([`Choice::Wait`]) when one ends.
    dialled: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Pool {
    /// Keyed by instance addresses (config and registrations, not clients): foldhash,
    /// as the HTTP/1 pool.
    instances: HashMap<Key, Instance, foldhash::fast::RandomState>,
    opened: u32,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// What to do for a new stream, given an instance's connections (pure, so the choice is
/// tested without sockets).
#[derive(Debug, PartialEq, Eq)]
enum Choice {
    /// The connection at this index has room.
    Use(usize),
    /// All are full (or none is live): dial another.
    Dial,
    /// All are full and as many as allowed are open or being dialled: queue on the
    /// least loaded (index).
    Queue(usize),
    /// A dial in progress will have room (or none is live and as many as allowed are
    /// being dialled): wait for a dial to end.
    Wait,
}

/// What is known of one instance's connections in this thread.
#[derive(Debug, Default)]
struct Counts {
    /// Dials in progress.
    dialing: usize,
    /// Streams waiting for those dials.
    waiting: usize,
    /// Streams a new connection is expected to take: the cap of a live one (the
    /// instance's limit is the same on each), else the service's `h2_max_streams`.
    expected: u32,
}

/// `loads`: (streams in flight, cap) of each live connection. The fullest connection
/// with room is used, so streams pack onto few connections and the rest go idle and
/// are dropped; a dial in progress with room to spare is waited for rather than
/// another dialled (a burst of first calls opens one connection, not one each).
fn choose(loads: &[(u32, u32)], c: &Counts) -> Choice {
    let mut best: Option<(usize, u32)> = None;
    let mut least: Option<(usize, u32)> = None;
    for (i, &(load, cap)) in loads.iter().enumerate() {
        if load < cap && best.is_none_or(|(_, b)| load > b) {
            best = Some((i, load));
        }
        if least.is_none_or(|(_, l)| load < l) {
            least = Some((i, load));
        }
    }
    if let Some((i, _)) = best {
        return Choice::Use(i);
    }
    // Each dial carries its dialler's stream, and room for `expected - 1` more.
    let room_in_dials = c
        .dialing
        .saturating_mul(c.expected.saturating_sub(1) as usize);
    if c.waiting < room_in_dials {
        return Choice::Wait;
    }
    match least {
        _ if loads.len() + c.dialing < MAX_CONNECTIONS => Choice::Dial,
        Some((i, _)) => Choice::Queue(i),
        None => Choice::Wait,
    }
}

/// A stream slot on a connection: held for as long as the stream is in use (its
/// response read to the end, or given up); dropping it frees the slot.
pub(crate) struct Slot(Arc<Shared>);

impl Slot {
    /// The stream failed in a way that says the connection is done for new streams
    /// (GOAWAY, a connection error): the pool dials another for the next one.
    pub(crate) fn failed(&self, e: &h2::Error) {
        if e.is_go_away() || e.is_io() {
            self.0.retired.store(true, Relaxed);
        }
    }
}

impl Slot {
    /// The stream got no answer by its deadline: is the connection still alive? One PING
    /// (not a periodic one: grpc-go servers take pings more often than every 5 minutes
    /// as abuse and answer GOAWAY); unanswered within the connect timeout, the
    /// connection is closed, its streams fail and the next go on a new one. A dead
    /// instance (gone without a FIN, a dropped NAT entry) otherwise keeps its pooled
    /// connection, and every stream sent on it waits out its deadline.
    pub(crate) fn suspect(&self) {
        self.0.check.notify_one();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A stream slot on a connection ready for a new stream: [`Lease::send`] opens it.
pub(crate) struct Lease {
    send: SendRequest<Bytes>,
    slot: Slot,
}

impl Lease {
    /// Sends the request head (with `end_of_stream` when it has no body). An `Err` here
    /// means the connection went away after it was found ready (a GOAWAY that arrived
    /// in between): nothing of the request was sent, as with a refused stream.
    pub(crate) fn send(
        mut self,
        mut request: http::Request<()>,
        end_of_stream: bool,
    ) -> Result<Exchange, h2::Error> {
        never_indexed(request.headers_mut());
        match self.send.send_request(request, end_of_stream) {
            Ok((response, body)) => Ok(Exchange {
                response,
                body,
                slot: self.slot,
            }),
            Err(e) => {
                self.slot.0.retired.store(true, Relaxed);
                Err(e)
            }
        }
    }
}

/// Request fields busbar sets to a value of their own for every request: the trace
/// context, the request id, and a call's `grpc-timeout` (what is left of its deadline).
const UNIQUE: [http::HeaderName; 3] = [
    http::HeaderName::from_static(crate::phases::forwarding::TRACEPARENT_NAME),
    crate::accesslog::REQUEST_ID,
    http::HeaderName::from_static(super::grpc_timeout::NAME),
];

/// Marks credentials as never-indexed fields (RFC 7541 §7.1.3): `authorization` and
/// `proxy-authorization`, and a `cookie` shorter than 20 bytes (nghttp2's rule: a short
/// value can be guessed). Streams of many clients share one upstream connection and so
/// one compression context. The `h2` crate already leaves `authorization` and `cookie`
/// out of the dynamic table, but would index `proxy-authorization`, and sends the others
/// as plain "without indexing" literals, which a proxy behind the instance may index
/// again; the never-indexed form binds every later hop. (The crate does not keep a
/// downstream client's own never-indexed flag, so busbar sets it here, for every stream
/// it opens: pass-through, JSON→gRPC, HTTP/1 to an h2 instance.)
///
/// Fields whose value is new on every request ([`UNIQUE`]) are sent never-indexed too:
/// an entry for them would never be used again, yet each would push out of the dynamic
/// table the fields that repeat (`user-agent`, `via`, the forwarding fields), which
/// then go out again as literals, and the encoder walks every kept value of a name
/// before it adds one: with a trace id per request, tens of compares a stream.
///
/// One pass over the fields, not a lookup per name: a lookup hashes its name, and a
/// request has only a dozen fields.
fn never_indexed(headers: &mut http::HeaderMap) {
    use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION};
    for (name, v) in headers.iter_mut() {
        let hidden = if *name == COOKIE {
            v.len() < 20
        } else {
            *name == AUTHORIZATION || *name == PROXY_AUTHORIZATION || UNIQUE.contains(name)
        };
        if hidden {
            v.set_sensitive(true);
        }
    }
}

/// An opened stream: the response to come, the request body's sending half, and the
/// slot to hold while the stream is in use.
pub(crate) struct Exchange {
    pub response: ResponseFuture,
    pub body: SendStream<Bytes>,
    pub slot: Slot,
}

/// Did the instance refuse the stream before processing it (RFC 9113 §8.7): reset with
/// REFUSED_STREAM, or above the last stream id of a GOAWAY (which the h2 crate fails with
/// the peer's GOAWAY error; a stream at or below it that the connection's end cuts fails
/// with an I/O error instead)? Such a stream may go to another instance whatever its
/// method.
pub(crate) fn refused(e: &h2::Error) -> bool {
    e.is_remote() && (e.is_go_away() || e.reason() == Some(Reason::REFUSED_STREAM))
}

/// A slot for a new stream on a connection to the try's instance: a pooled one with
/// room, or a new one. A pooled connection found retired (GOAWAY received, closed) is
/// dropped and another taken: nothing was sent on it. `Err` when no connection could
/// be made.
pub(crate) async fn open(
    t: &Try,
    max_streams: u32,
    metrics: &crate::metrics::ServiceMetrics,
) -> Result<Lease, OpenError> {
    let key = Key::of(t);
    let waited_until = Instant::now() + t.connect_timeout;
    // Each turn takes a pooled connection (retiring it if dead), dials, or waits for a
    // dial: bounded by the connections there can be, each dialled and waited for once.
    for _ in 0..=3 * MAX_CONNECTIONS {
        let (mut send, shared, fresh) = match take(key, max_streams) {
            Taken::Conn(send, shared) => (send, shared, false),
            Taken::Dial(dialing) => {
                let (send, shared) = dial(t, dialing).await?;
                metrics.connection_new.inc();
                (send, shared, true)
            }
            Taken::Wait(dialled) => {
                // Waiting for others' dials counts against this try's connect timeout.
                let left = waited_until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(OpenError::Connect { timed_out: true });
                }
                // Registered before this task yields, so the dial's end is not missed.
                let _ = tokio::time::timeout(left, dialled.notified()).await;
                continue;
            }
        };
        // Counted before the send, so the next `take` on this thread sees it.
        shared.in_flight.fetch_add(1, Relaxed);
        let slot = Slot(shared);
        // A fresh handle has no stream pending: readiness only reports a connection
        // error (GOAWAY received, closed), without waiting.
        match std::future::poll_fn(|cx| send.poll_ready(cx)).await {
            Ok(()) => {
                if !fresh {
                    metrics.connection_pooled.inc();
                }
                return Ok(Lease { send, slot });
            }
            Err(e) => {
                tracing::debug!(upstream = %t.addr, "h2 connection takes no new stream: {e}");
                slot.0.retired.store(true, Relaxed);
                if fresh {
                    return Err(OpenError::Connect { timed_out: false });
                }
            }
        }
    }
    Err(OpenError::Connect { timed_out: false })
}

/// What [`take`] found.
enum Taken {
    Conn(SendRequest<Bytes>, Arc<Shared>),
    /// Dial one: counted as dialling until the guard drops.
    Dial(Dialing),
    Wait(Arc<tokio::sync::Notify>),
}

/// A live connection with room under `key` (or the least loaded one when as many as
/// allowed are open and full), or what to do instead.
fn take(key: Key, max_streams: u32) -> Taken {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.opened = p.opened.wrapping_add(1);
        let now = Instant::now();
        if p.opened.is_multiple_of(SWEEP_EVERY) {
            p.instances.retain(|_, inst| {
                inst.conns.retain(|c| live(c, now));
                !inst.conns.is_empty() || inst.dialing > 0
            });
        }
        let inst = p.instances.entry(key).or_default();
        inst.conns.retain(|c| live(c, now));
        let mut loads: [(u32, u32); MAX_CONNECTIONS] = [(0, 0); MAX_CONNECTIONS];
        let n = inst.conns.len().min(MAX_CONNECTIONS);
        for (slot, c) in loads.iter_mut().zip(&inst.conns) {
            *slot = (c.load(), c.cap(max_streams));
        }
        let counts = Counts {
            dialing: inst.dialing,
            waiting: inst.waiting,
            expected: loads[..n].first().map_or(max_streams, |&(_, cap)| cap),
        };
        match choose(&loads[..n], &counts) {
            Choice::Use(i) | Choice::Queue(i) => match inst.conns.get_mut(i) {
                Some(c) => {
                    c.used = now;
                    Taken::Conn(c.send.clone(), c.shared.clone())
                }
                None => {
                    inst.waiting += 1;
                    Taken::Wait(inst.dialled.clone())
                }
            },
            Choice::Dial => {
                inst.dialing += 1;
                Taken::Dial(Dialing(key))
            }
            Choice::Wait => {
                inst.waiting += 1;
                Taken::Wait(inst.dialled.clone())
            }
        }
    })
}

/// Is a pooled connection worth keeping: not retired, and in use or idle for less than
/// [`IDLE`]?
fn live(c: &Pooled, now: Instant) -> bool {
    !c.retired() && (c.load() > 0 || now.duration_since(c.used) < IDLE)
}

/// A dial in progress, counted in its instance's `dialing` until it ends (or its
/// future is dropped: a caller that went away).
struct Dialing(Key);

impl Drop for Dialing {
    fn drop(&mut self) {
        dialled(self.0, None);
    }
}

/// Ends a dial started by [`take`]: the new connection joins the pool, and the streams
/// waiting for a dial choose again.
fn dialled(key: Key, conn: Option<(&SendRequest<Bytes>, &Arc<Shared>)>) {
    let _ = POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        let inst = p.instances.entry(key).or_default();
        if let Some((send, shared)) = conn {
            inst.conns.push(Pooled {
                send: send.clone(),
                shared: shared.clone(),
                used: Instant::now(),
            });
            return;
        }
        inst.dialing = inst.dialing.saturating_sub(1);
        inst.waiting = 0;
        inst.dialled.notify_waiters();
    });
}

/// A new connection to the try's instance, under its connect timeout.
async fn dial(t: &Try, dialing: Dialing) -> Result<(SendRequest<Bytes>, Arc<Shared>), OpenError> {
    let made = tokio::time::timeout(t.connect_timeout, handshake(t)).await;
    let made = match made {
        Ok(r) => r,
        Err(_) => Err(OpenError::Connect { timed_out: true }),
    };
    if let Ok((send, shared)) = &made {
        dialled(dialing.0, Some((send, shared)));
    }
    // Dropping the guard ends the dial's count and wakes the waiters.
    drop(dialing);
    made
}

async fn handshake(t: &Try) -> Result<(SendRequest<Bytes>, Arc<Shared>), OpenError> {
    let io: Conn = upstream::connect(t).await.map_err(|e| match e {
        ConnectError::Certificate => OpenError::Certificate,
        ConnectError::Failed => OpenError::Connect { timed_out: false },
    })?;
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| {
            tracing::debug!(upstream = %t.addr, "HTTP/2 handshake failed: {e}");
            OpenError::Connect { timed_out: false }
        })?;
    let ping = conn.ping_pong();
    let shared = Arc::new(Shared::default());
    let watch = shared.clone();
    let addr = t.addr;
    let patience = t.connect_timeout;
    let (ready, settled) = tokio::sync::oneshot::channel();
    // The connection's own task: it ends when the instance closes the connection, when
    // the pool and every stream have let go of it, or when the instance stopped
    // answering; the pool stops using it then.
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        let Some(mut ping) = ping else {
            let _ = ready.send(true);
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, "upstream HTTP/2 connection closed: {e}");
            }
            watch.retired.store(true, Relaxed);
            return;
        };
        // The instance's SETTINGS come before its answer to a PING: once the PING is
        // answered, its stream limit is known, and the first streams are counted against
        // it rather than opened past it (which a server answers with REFUSED_STREAM).
        // One round trip per new connection.
        let up = answers(&mut conn, &mut ping, patience, addr).await;
        let _ = ready.send(up);
        if !up {
            watch.retired.store(true, Relaxed);
            return;
        }
        loop {
            tokio::select! {
                closed = &mut conn => {
                    if let Err(e) = closed {
                        tracing::debug!(upstream = %addr, "upstream HTTP/2 connection closed: {e}");
                    }
                    break;
                }
                _ = watch.check.notified() => {
                    if !answers(&mut conn, &mut ping, patience, addr).await {
                        // Dropped below: the socket closes, its streams fail.
                        tracing::info!(upstream = %addr, "upstream HTTP/2 connection did not answer PING: closed");
                        break;
                    }
                }
            }
        }
        watch.retired.store(true, Relaxed);
    });
    match settled.await {
        Ok(true) => Ok((send, shared)),
        _ => Err(OpenError::Connect { timed_out: false }),
    }
}

/// Does the instance answer a PING on `conn` within `patience`? `conn` is driven
/// meanwhile; `false` when it closed.
async fn answers<F>(
    conn: &mut std::pin::Pin<&mut F>,
    ping: &mut h2::PingPong,
    patience: Duration,
    addr: std::net::SocketAddr,
) -> bool
where
    F: std::future::Future<Output = Result<(), h2::Error>>,
{
    if let Err(e) = ping.send_ping(h2::Ping::opaque()) {
        // One already out (its answer pending): this check rides on it.
        tracing::debug!(upstream = %addr, "HTTP/2 PING not sent: {e}");
    }
    let pong = std::future::poll_fn(|cx| ping.poll_pong(cx));
    let pong = tokio::time::timeout(patience, pong);
    tokio::select! {
        closed = conn.as_mut() => {
            if let Err(e) = closed {
                tracing::debug!(upstream = %addr, "HTTP/2 connection failed before its PING's answer: {e}");
            }
            false
        }
        answered = pong => matches!(answered, Ok(Ok(_))),
    }
}

/// The `:scheme` and `:authority` of a request to the try's instance: `https` and the
/// name it is asked for over TLS (with the port), `http` and its address otherwise.
pub(crate) fn origin(t: &Try) -> String {
    match &t.tls {
        Some(p) if matches!(p.name, rustls::pki_types::ServerName::DnsName(_)) => {
            format!("https://{}:{}", p.sni, t.addr.port())
        }
        Some(_) => format!("https://{}", t.addr),
        None => format!("http://{}", t.addr),
    }
}

/// Connections in this thread's pool to `key` (tests).
#[cfg(test)]
fn connections(key: Key) -> usize {
    POOL.with(|p| p.borrow().instances.get(&key).map_or(0, |i| i.conns.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(dialing: usize, waiting: usize, expected: u32) -> Counts {
        Counts {
            dialing,
            waiting,
            expected,
        }
    }

    #[test]
    fn credentials_and_short_cookies_are_never_indexed() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer s3cret".parse().unwrap());
        h.insert("proxy-authorization", "Basic eDp5".parse().unwrap());
        h.append("cookie", "sid=42".parse().unwrap());
        h.append("cookie", "theme=dark-with-a-long-name".parse().unwrap());
        h.insert("x-trace", "abc".parse().unwrap());
        never_indexed(&mut h);
        assert!(h["authorization"].is_sensitive());
        assert!(h["proxy-authorization"].is_sensitive());
        let cookies: Vec<bool> = h
            .get_all("cookie")
            .iter()
            .map(|v| v.is_sensitive())
            .collect();
        assert_eq!(cookies, [true, false]);
        assert!(!h["x-trace"].is_sensitive());
        // A map without any of them is left as it was, and not grown.
        let mut plain = http::HeaderMap::with_capacity(1);
        plain.insert("x-a", "1".parse().unwrap());
        let room = plain.capacity();
        never_indexed(&mut plain);
        assert_eq!(plain.capacity(), room);
    }

    #[test]
    fn the_fullest_connection_with_room_is_used() {
        let none = counts(0, 0, 100);
        assert_eq!(
            choose(&[(3, 100), (7, 100), (100, 100)], &none),
            Choice::Use(1)
        );
        assert_eq!(choose(&[(0, 1), (1, 1)], &none), Choice::Use(0));
    }

    #[test]
    fn a_connection_is_dialled_when_all_are_full() {
        let none = counts(0, 0, 1);
        assert_eq!(choose(&[], &none), Choice::Dial);
        assert_eq!(choose(&[(1, 1), (1, 1)], &none), Choice::Dial);
        // The instance's own limit is the cap: 2 of 2 is full even under 100.
        assert_eq!(choose(&[(2, 2)], &counts(0, 0, 2)), Choice::Dial);
    }

    #[test]
    fn a_burst_waits_for_the_dial_in_progress_while_it_will_have_room() {
        // The first stream dials; the next 99 wait for that connection.
        assert_eq!(choose(&[], &counts(1, 0, 100)), Choice::Wait);
        assert_eq!(choose(&[], &counts(1, 98, 100)), Choice::Wait);
        assert_eq!(choose(&[], &counts(1, 99, 100)), Choice::Dial);
        // An instance that takes one stream per connection: a dial has no room to
        // wait for.
        assert_eq!(choose(&[(1, 1)], &counts(1, 0, 1)), Choice::Dial);
    }

    #[test]
    fn past_the_connection_cap_streams_queue_on_the_least_loaded() {
        let mut full = vec![(1, 1); MAX_CONNECTIONS];
        full[3] = (0, 0);
        assert_eq!(choose(&full, &counts(0, 0, 1)), Choice::Queue(3));
        // Dials in progress count against the cap.
        let some = vec![(2, 1), (1, 1)];
        let dialing = MAX_CONNECTIONS - 2;
        assert_eq!(
            choose(&some, &counts(dialing, dialing, 1)),
            Choice::Queue(1)
        );
        // Nothing live yet, as many dialling as allowed, all spoken for: wait anyway.
        let all = counts(MAX_CONNECTIONS, 800, 100);
        assert_eq!(choose(&[], &all), Choice::Wait);
    }

    fn try_to(addr: std::net::SocketAddr) -> Try {
        Try {
            addr,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            tls: None,
        }
    }

    fn metrics() -> crate::metrics::ServiceMetrics {
        crate::metrics::ServiceMetrics::new("h2_pool_test")
    }

    fn request(addr: std::net::SocketAddr) -> http::Request<()> {
        http::Request::post(format!("http://{addr}/x"))
            .body(())
            .unwrap()
    }

    /// A stream opened through the pool to `addr` (the test fails if it cannot be).
    async fn stream(
        t: &Try,
        m: &crate::metrics::ServiceMetrics,
        addr: std::net::SocketAddr,
    ) -> Exchange {
        open(t, 100, m)
            .await
            .ok()
            .unwrap()
            .send(request(addr), true)
            .unwrap()
    }

    /// A raw h2 server on loopback; `serve` gets each accepted connection.
    async fn server<F, Fut>(serve: F) -> std::net::SocketAddr
    where
        F: Fn(h2::server::Connection<tokio::net::TcpStream, Bytes>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = Arc::new(serve);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let serve = serve.clone();
                tokio::spawn(async move {
                    let conn = h2::server::Builder::new()
                        .max_concurrent_streams(1)
                        .handshake::<_, Bytes>(tcp)
                        .await
                        .unwrap();
                    serve(conn).await;
                });
            }
        });
        addr
    }

    /// Streams past the instance's SETTINGS_MAX_CONCURRENT_STREAMS go on new connections,
    /// and the slots free when the streams end.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_connection_gets_a_sibling_and_slots_come_back() {
        let addr = server(|mut conn| async move {
            // Holds each stream open (never answers) until the client goes.
            let mut held = Vec::new();
            while let Some(Ok(s)) = conn.accept().await {
                held.push(s);
            }
        })
        .await;
        let t = try_to(addr);
        let m = metrics();
        let first = stream(&t, &m, addr).await;
        // The server's SETTINGS (1 stream) were in before the first stream was opened.
        let second = stream(&t, &m, addr).await;
        assert_eq!(connections(Key::of(&t)), 2, "one stream each");
        drop(second);
        let third = stream(&t, &m, addr).await;
        assert_eq!(connections(Key::of(&t)), 2, "the freed slot is taken again");
        drop((first, third));
    }

    /// A connection that got GOAWAY takes no new stream: the next goes on a new one, and
    /// a stream above the GOAWAY's last id is reported refused.
    #[tokio::test(flavor = "current_thread")]
    async fn after_goaway_streams_go_to_a_new_connection() {
        // Each connection answers one stream, then goes away gracefully.
        let addr = server(|mut conn| async move {
            if let Some(Ok((_, mut respond))) = conn.accept().await {
                let _ = respond.send_response(http::Response::new(()), true);
            }
            conn.graceful_shutdown();
            while let Some(Ok(_)) = conn.accept().await {}
        })
        .await;
        let t = try_to(addr);
        let m = metrics();
        let ex = stream(&t, &m, addr).await;
        assert!(ex.response.await.is_ok());
        // The GOAWAY arrives after the answer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = m.connection_new.get();
        let _ex = stream(&t, &m, addr).await;
        assert_eq!(m.connection_new.get(), before + 1, "a new connection");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_stream_is_told_apart_from_a_failed_one() {
        let addr = server(|mut conn| async move {
            let mut n = 0;
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                n += 1;
                if n == 1 {
                    respond.send_reset(Reason::REFUSED_STREAM);
                } else {
                    respond.send_reset(Reason::INTERNAL_ERROR);
                }
            }
        })
        .await;
        let t = try_to(addr);
        let m = metrics();
        let e = stream(&t, &m, addr).await.response.await.unwrap_err();
        assert!(refused(&e), "REFUSED_STREAM: {e}");
        let e = stream(&t, &m, addr).await.response.await.unwrap_err();
        assert!(!refused(&e), "INTERNAL_ERROR may have been processed: {e}");
    }

    /// An instance that takes the connection and never speaks HTTP/2 (no SETTINGS, no
    /// answer to the PING) is a connect timeout.
    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_instance_is_a_connect_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tcp);
        });
        let t = Try {
            connect_timeout: Duration::from_millis(200),
            ..try_to(addr)
        };
        let e = open(&t, 100, &metrics()).await.err().unwrap();
        assert_eq!(e, OpenError::Connect { timed_out: true });
        assert_eq!(connections(Key::of(&t)), 0);
        held.abort();
    }

    /// An instance that goes silent (no FIN, nothing read or answered) after a stream
    /// was sent: once the stream is suspected, the connection's PING goes unanswered,
    /// the connection is closed (the stream fails), and the next stream is dialled anew.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_that_stops_answering_is_closed_once_suspected() {
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        let addr = server(move |mut conn| {
            let f = f.clone();
            async move {
                let mut held = Vec::new();
                // Served until frozen: then the socket is held, never read again.
                while !f.load(Relaxed) {
                    if let Ok(Some(Ok(s))) =
                        tokio::time::timeout(Duration::from_millis(20), conn.accept()).await
                    {
                        held.push(s);
                    }
                }
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop((conn, held));
            }
        })
        .await;
        let t = Try {
            connect_timeout: Duration::from_millis(300),
            ..try_to(addr)
        };
        let m = metrics();
        let ex = stream(&t, &m, addr).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        frozen.store(true, Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
        ex.slot.suspect();
        let failed = tokio::time::timeout(Duration::from_secs(5), ex.response).await;
        assert!(
            matches!(failed, Ok(Err(_))),
            "the stream failed with its connection"
        );
        let before = m.connection_new.get();
        drop(ex.body);
        drop(ex.slot);
        // A new connection (its server side is frozen too, so the dial's PING times out:
        // what matters is that the dead connection was not reused).
        let _ = open(&t, 100, &m).await;
        assert!(
            m.connection_new.get() > before || connections(Key::of(&t)) == 0,
            "the silent connection was not reused"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_connect_is_reported_and_nothing_is_pooled() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let t = try_to(addr);
        let m = metrics();
        let e = open(&t, 100, &m).await.err().unwrap();
        assert_eq!(e, OpenError::Connect { timed_out: false });
        assert_eq!(connections(Key::of(&t)), 0);
        POOL.with(|p| {
            assert_eq!(
                p.borrow().instances.get(&Key::of(&t)).map(|i| i.dialing),
                Some(0)
            )
        });
    }
}
