//! busbar's own spans: one server span per sampled request and one client span per
//! upstream try, handed to a bounded queue that a background task exports over OTLP/HTTP
//! (`export`).
//!
//! Owns: when a span opens and ends, the fixed-size record of it, and the queue.
//! Must not: block, allocate, format or await on the request path: a request only
//! copies a small record into a lock-free queue of fixed size, and a full queue drops
//! the span (counted in `busbar_trace_spans_dropped_total`). Only requests whose trace is
//! sampled, with an endpoint configured, record anything (`TraceContext::export`).

pub mod export;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;

use crate::metrics::{method_index, METRICS};
use crate::model::InstanceSet;
use crate::phases::ctx::RequestCtx;
use crate::proxy::reply::Cause;
use crate::routing::Route;

/// Spans per export request; the exporter is woken as soon as this many wait.
pub const BATCH: usize = 512;
/// The longest a user name is kept in a span (bytes; cut at a character boundary):
/// the record stays fixed-size.
pub const MAX_USER: usize = 64;

/// Made by the first sampled span: a node that samples nothing holds no queue.
static QUEUE: OnceLock<ArrayQueue<SpanRecord>> = OnceLock::new();
/// `[tracing] queue_size` as the process started with it ([`set_queue_size`]).
static QUEUE_SIZE: AtomicUsize = AtomicUsize::new(crate::config::DEFAULT_QUEUE_SIZE);
/// Wakes the exporter when a batch is ready (`export`).
static READY: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// The exporter is between batches and waits for `READY`: only then is it worth waking.
static IDLE: AtomicBool = AtomicBool::new(false);

/// The size of the span queue, set once when the process starts (before any request):
/// the queue is made with it and never resized, so a reload lists a change as needing
/// a restart (`live`).
pub fn set_queue_size(n: usize) {
    QUEUE_SIZE.store(n.max(1), Ordering::Relaxed);
}

pub use crate::proxy::trace::OpenTry;

/// What kind of span a record is (OTLP `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

/// A finished span as the request path leaves it: ids, times, numbers and shared
/// handles (route, instance set) whose names the exporter reads; no string is built here.
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: [u8; 8],
    pub flags: u8,
    pub kind: Kind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// The HTTP status; 0 when there was none (a try that failed before an answer).
    pub status: u16,
    /// Index into the metrics' method names.
    pub method: u8,
    /// Server span: the tries made; client span: this try's number (1 for the first).
    pub tries: u32,
    /// busbar's name for what went wrong (`proxy::reply::Cause::code`), if anything did.
    pub error: Option<&'static str>,
    pub route: Option<Arc<Route>>,
    /// The instance set and the index in it of the instance (its release version).
    pub set: Option<Arc<InstanceSet>>,
    pub instance: Option<(u32, SocketAddr)>,
    pub user: User,
}

/// The admission user, copied into a fixed buffer (at most [`MAX_USER`] bytes).
#[derive(Clone, Copy)]
pub struct User {
    len: u8,
    bytes: [u8; MAX_USER],
}

impl User {
    pub fn new(user: Option<&str>) -> User {
        let mut u = User {
            len: 0,
            bytes: [0; MAX_USER],
        };
        if let Some(s) = user {
            let mut end = s.len().min(MAX_USER);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            u.bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
            u.len = end as u8;
        }
        u
    }

    pub fn as_str(&self) -> &str {
        // Cut at a character boundary from a `&str`: always UTF-8.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

/// A try starts (after its instance is picked). The first try's span id was chosen with
/// the trace; later tries get their own.
pub fn try_begin(ctx: &mut RequestCtx, idx: usize, addr: SocketAddr) {
    if !ctx.trace.export {
        return;
    }
    if ctx.trace.open.is_some_and(|o| !o.ended) {
        // The previous try ended without a word (a driver that moved on): close it.
        try_end(ctx, 0, Some("abandoned"));
    }
    if ctx.tries > 1 {
        ctx.trace.next_try();
    }
    ctx.trace.open = Some(OpenTry {
        start: Instant::now(),
        addr,
        idx: idx as u32,
        ended: false,
    });
}

/// The try in progress ended: with the upstream's `status` (0: none came) and busbar's
/// name for what went wrong, if anything did.
pub fn try_end(ctx: &mut RequestCtx, status: u16, error: Option<&'static str>) {
    let Some(open) = ctx.trace.open.as_mut().filter(|o| !o.ended) else {
        return;
    };
    open.ended = true;
    let open = *open;
    let t = &ctx.trace;
    let (start, end) = times(open.start);
    push(SpanRecord {
        trace_id: t.trace_id,
        span_id: t.try_id,
        parent_id: t.span_id,
        flags: t.flags,
        kind: Kind::Client,
        start_unix_nano: start,
        end_unix_nano: end,
        status,
        method: 0,
        tries: ctx.tries,
        error,
        route: ctx.route.clone(),
        set: ctx.set.clone(),
        instance: Some((open.idx, open.addr)),
        user: User::new(None),
    });
}

/// A try failed: `upstream` says the upstream was at fault (else the client was).
pub fn try_failed(ctx: &mut RequestCtx, upstream: bool, timed_out: bool) {
    let why = match (upstream, timed_out) {
        (true, true) => Cause::UpstreamTimeout.code(),
        (true, false) => Cause::UpstreamError.code(),
        (false, _) => "client_error",
    };
    try_end(ctx, 0, Some(why));
}

/// A try could not connect (or its connect timed out).
pub fn connect_failed(ctx: &mut RequestCtx, timed_out: bool) {
    let why = if timed_out {
        Cause::UpstreamTimeout
    } else {
        Cause::ConnectFailed
    };
    try_end(ctx, 0, Some(why.code()));
}

/// busbar's HTTP/1 path writes the upstream head once, before its tries: a later try's
/// head gets that try's client span id, written over the previous one in place.
pub fn retrace(wire: &mut [u8], ctx: &RequestCtx) {
    if !ctx.trace.export || ctx.tries < 2 {
        return;
    }
    let value = ctx.trace.header_value();
    // `00-<trace id>-` is the same in every try's value, and found once in the head.
    if let Some(at) = memchr::memmem::find(wire, &value[..36]) {
        if let Some(slot) = wire.get_mut(at..at + value.len()) {
            slot.copy_from_slice(&value);
        }
    }
}

/// The JSON→gRPC call builds its metadata once, before its tries: the try that sends
/// gets its own client span id.
pub fn retrace_headers(headers: &mut http::HeaderMap, ctx: &RequestCtx) {
    if !ctx.trace.export {
        return;
    }
    if let Ok(v) = http::HeaderValue::from_bytes(&ctx.trace.header_value()) {
        headers.insert(&crate::phases::forwarding::TRACEPARENT, v);
    }
}

/// The request is over: closes the try still open (the one that answered) and records
/// busbar's server span.
pub fn finish(ctx: &mut RequestCtx, method: &str, status: u16, error: Option<&'static str>) {
    if !ctx.trace.export {
        return;
    }
    try_end(ctx, status, error);
    let t = &ctx.trace;
    let (start, end) = times(ctx.start);
    let user = ctx.admitted.as_ref().and_then(|a| a.user());
    push(SpanRecord {
        trace_id: t.trace_id,
        span_id: t.span_id,
        parent_id: t.parent_id,
        flags: t.flags,
        kind: Kind::Server,
        start_unix_nano: start,
        end_unix_nano: end,
        status,
        method: method_index(method) as u8,
        tries: ctx.tries,
        error,
        route: ctx.route.clone(),
        set: ctx.set.clone(),
        instance: t.open.map(|o| (o.idx, o.addr)),
        user: User::new(user),
    });
}

/// Start and end in Unix nanoseconds, for a span that started at `start` and ends now.
fn times(start: Instant) -> (u64, u64) {
    let end = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (end.saturating_sub(start.elapsed().as_nanos() as u64), end)
}

/// Hands a span to the exporter, or drops and counts it when the queue is full.
fn push(span: SpanRecord) {
    let queue = QUEUE.get_or_init(|| ArrayQueue::new(QUEUE_SIZE.load(Ordering::Relaxed)));
    if queue.push(span).is_err() {
        METRICS.trace_spans_dropped.inc();
        return;
    }
    if queue.len() >= BATCH && IDLE.swap(false, Ordering::AcqRel) {
        READY.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_cut_at_a_character_boundary() {
        assert_eq!(User::new(None).as_str(), "");
        assert_eq!(User::new(Some("alice")).as_str(), "alice");
        let long = "é".repeat(40); // 80 bytes
        let u = User::new(Some(&long));
        assert_eq!(u.as_str(), "é".repeat(32));
    }
}
