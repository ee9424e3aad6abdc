//! busbar's own HTTP/1.1 path for the everyday request: a plaintext HTTP/1.1 request
//! without a body, on a route that proxies to an HTTP/1 service with no translation
//! (admission included). Everything else goes to the pingora proxy, unchanged.
//!
//! pingora 0.9's proxy loop costs 3–4× what a plain tokio proxy costs per request here
//! (`load-tests/RESULTS.md`, 19:13): a boxed future per phase, two channels, and a task
//! per pooled connection. This path does the same work in one task: the head the front
//! door has already read is parsed once (httparse), the upstream connection comes from a
//! per-thread pool (`edge::pool`), and the response goes back as it is read.
//!
//! Owns: HTTP/1.1 framing on both sides for these requests: the upstream request head,
//! the response head and the body's end (length, chunked, or close), hop-by-hop headers,
//! `Date` and `Connection` downstream. An answer that breaks `edge::framing`'s rules is a
//! 502, or, once its head went out, a client connection closed; never bytes passed on
//! that busbar could not frame.
//! Must not: hold policy. Route, tries, retries, outlier detection, headers, metrics and
//! the access log are the proxy's phases (`proxy::BusbarProxy`), the same calls the
//! pingora path makes.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, DATE, EXPECT, HOST, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderName, HeaderValue, Method, StatusCode};
use pingora_core::protocols::http::date::get_cached_date;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::GetSocketDigest;
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::deadline::within;
use super::framing::{self, ChunkScan};
use super::head::HeadLimits;
use super::pool;
use crate::admission::reject::{rate_lines, RATE_HEADERS};
use crate::admission::{enter_watched, RateInfo, Refused};
use crate::config::Protocol;
use crate::metrics::METRICS;
use crate::proxy::ctx::RequestCtx;
use crate::proxy::reply::Cause;
use crate::proxy::trace::TraceContext;
use crate::proxy::{self, headers, BusbarProxy, Done};
use crate::routing::Route;
use crate::snapshot::{Snapshot, State};

/// Most header lines in a request or response head this path parses; a head with more
/// goes to pingora (request) or is refused as a bad upstream response.
const MAX_HEADERS: usize = 128;
/// Largest upstream response head (pingora's `MAX_HEADER_SIZE` is 1 MiB; nginx's
/// `proxy_buffer_size` default is 4–8 KiB).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read buffer for the response.
const BUF: usize = 4096;

/// A request this path serves, parsed and routed by [`take`].
pub struct FastRequest {
    req: RequestHeader,
    snapshot: Arc<Snapshot>,
    route: Option<Arc<Route>>,
    /// The path routing and ACLs saw, when normalising changed it.
    normalized: Option<String>,
    /// The client said `Connection: close`.
    close: bool,
}

/// What a header name (as received, any case) is to this path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    /// Describes one hop, never forwarded (RFC 9110 §7.6.1): `Keep-Alive`, `TE`,
    /// `Upgrade`, `Proxy-Connection`.
    Hop,
    /// `Connection`: a hop-by-hop header that may name more of them.
    Connection,
    Date,
    ContentLength,
    TransferEncoding,
    /// One of the `RateLimit-*` headers admission sets.
    Rate,
    Other,
}

impl Name {
    /// Compares only names of the right length: a few instructions for most names.
    fn of(name: &[u8]) -> Name {
        let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        match name.len() {
            2 if is("te") => Name::Hop,
            4 if is("date") => Name::Date,
            7 if is("upgrade") => Name::Hop,
            10 if is("connection") => Name::Connection,
            10 if is("keep-alive") => Name::Hop,
            14 if is("content-length") => Name::ContentLength,
            16 if is("proxy-connection") => Name::Hop,
            17 if is("transfer-encoding") => Name::TransferEncoding,
            15 | 19 if RATE_HEADERS.iter().any(|h| is(h)) => Name::Rate,
            _ => Name::Other,
        }
    }

    fn hop_by_hop(self) -> bool {
        matches!(self, Name::Hop | Name::Connection)
    }
}

/// Does a `Connection` value ask for anything besides `close` / `keep-alive`? Other
/// tokens name more hop-by-hop headers (or an upgrade): pingora's path handles those.
/// Sets `close` when it says close.
fn connection_tokens(value: &[u8], close: &mut bool) -> bool {
    value.split(|&b| b == b',').all(|t| {
        let t = t.trim_ascii();
        if t.eq_ignore_ascii_case(b"close") {
            *close = true;
            true
        } else {
            t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive")
        }
    })
}

/// The header name `raw` is. The names clients send most are matched here (by length,
/// then case-insensitively); `HeaderName::from_bytes`, a lower-casing copy and a table
/// walk at ~170 instructions a name, parses the rest.
fn request_name(raw: &[u8]) -> Option<HeaderName> {
    use http::header::{
        ACCEPT, ACCEPT_ENCODING, ACCEPT_LANGUAGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE,
        COOKIE, HOST, ORIGIN, REFERER, USER_AGENT,
    };
    let is = |s: &str| raw.eq_ignore_ascii_case(s.as_bytes());
    let known = match raw.len() {
        4 if is("host") => HOST,
        6 if is("accept") => ACCEPT,
        6 if is("cookie") => COOKIE,
        6 if is("origin") => ORIGIN,
        7 if is("referer") => REFERER,
        10 if is("user-agent") => USER_AGENT,
        10 if is("connection") => CONNECTION,
        12 if is("content-type") => CONTENT_TYPE,
        13 if is("authorization") => AUTHORIZATION,
        13 if is("cache-control") => CACHE_CONTROL,
        14 if is("content-length") => CONTENT_LENGTH,
        15 if is("accept-encoding") => ACCEPT_ENCODING,
        15 if is("accept-language") => ACCEPT_LANGUAGE,
        _ => return HeaderName::from_bytes(raw).ok(),
    };
    Some(known)
}

/// Parses a complete head for this path: the request for upstream and whether the client
/// said `Connection: close`. `None`: not for this path, or not clean enough to be sure;
/// [`head::check`](super::head::check) then judges the head and pingora serves it.
///
/// This is also the front door's check for the heads it accepts, so a head is not scanned
/// a second time: everything accepted here is a head `head::check` accepts as a request
/// without a body (a unit test and, in debug builds, an assertion hold it to that).
/// httparse (strict by default) refuses NUL and other controls, whitespace in or before
/// a name, obsolete line folding and bad request lines; what it lets through is
/// checked here: bare LF line endings, empty lines before the request line, the size
/// limits, and `Content-Length` other than one `0`. A second `Host` (which the front
/// door refuses) or a second `Authorization` (which the proxy's phases refuse) is not
/// for this path either.
fn parse(head: &Bytes, limits: &HeadLimits) -> Option<(RequestHeader, bool)> {
    if head.len() > limits.max_head_bytes || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut lines);
    if parsed.parse(head) != Ok(httparse::Status::Complete(head.len())) {
        return None;
    }
    let (method, path) = (parsed.method?, parsed.path?);
    // Strict httparse: `METHOD SP path SP HTTP/1.1`, so its line feed is at this index.
    // The method starts the head: httparse skips empty lines before it.
    let request_line = method.len() + path.len() + 11;
    if method.as_ptr() != head.as_ptr()
        || request_line > limits.max_request_line
        || parsed.version != Some(1)
        || parsed.headers.len() > limits.max_headers
        || !path.starts_with('/')
    {
        return None;
    }
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let uri = http::Uri::from_maybe_shared(head.slice_ref(path.as_bytes())).ok()?;
    // Set field by field: the builder moves the whole head through a closure per step.
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.headers.reserve(parsed.headers.len());
    let mut close = false;
    let mut length = false;
    let (mut host, mut authorization) = (false, false);
    for h in parsed.headers.iter() {
        // Each line before this one ended in CRLF (the last one: `ends_with` above).
        let at = h.name.as_ptr() as usize - head.as_ptr() as usize;
        if head[at - 2] != b'\r' {
            return None;
        }
        let name = request_name(h.name.as_bytes())?;
        if name == TRANSFER_ENCODING || name == UPGRADE || name == EXPECT {
            return None;
        }
        if name == CONTENT_LENGTH {
            if length || h.value != b"0" {
                return None;
            }
            length = true;
        }
        if name == CONNECTION && !connection_tokens(h.value, &mut close) {
            return None;
        }
        if name == HOST && std::mem::replace(&mut host, true)
            || name == AUTHORIZATION && std::mem::replace(&mut authorization, true)
        {
            return None;
        }
        if Name::of(name.as_str().as_bytes()).hop_by_hop() {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value)).ok()?;
        // Straight into the map: pingora's `append_header` would turn each name into a
        // title-case copy and parse it back.
        parts.headers.try_append(name, value).ok()?;
    }
    // No case map: names go upstream in canonical form.
    Some((RequestHeader::from(parts), close))
}

/// Parses ([`parse`]) and routes a complete head. `None`: not a request for this path
/// (a body, an upgrade, `Expect`, HTTP/1.0, absolute form, more than [`MAX_HEADERS`]
/// lines, a `;` in the path, a translating route, an h2c service…), or a head the front
/// door must judge; the caller checks it and hands it to pingora, which sees the same
/// bytes.
pub fn take(state: &State, head: &[u8], limits: &HeadLimits) -> Option<Box<FastRequest>> {
    // One copy of the head; the path and the header values are slices of it.
    let head = Bytes::copy_from_slice(head);
    let (req, close) = parse(&head, limits)?;
    debug_assert_eq!(
        super::head::check(&head, limits),
        Ok(super::head::Body::Length(0)),
        "the own path took a head the front door refuses: {head:?}"
    );
    let snapshot = state.load();
    let path = proxy::request_path(&req);
    if path.literal.is_some() {
        // `;` in the path: two readings for the ACL, perhaps two routes. The proxy's
        // phases judge those (rare) paths.
        return None;
    }
    let normalized = path.normalized;
    let found = proxy::lookup_route(&snapshot, &req, normalized.as_deref());
    let route = match found {
        None => None,
        Some((route, fallback)) => {
            let plain = route.service.config.protocol == Protocol::Http1
                && !crate::translate::translates(&snapshot, &route);
            if !plain {
                return None;
            }
            if fallback {
                proxy::count_fallback(&route, &req);
            }
            Some(route)
        }
    };
    Some(Box::new(FastRequest {
        req,
        snapshot,
        route,
        normalized,
        close,
    }))
}

/// How a response's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes: the client connection closes after it.
    Close,
}

/// An upstream response head, parsed: what framing and reuse need. Its lines for the
/// client were written by [`parse_head`] (see there).
struct Head {
    status: StatusCode,
    framing: Framing,
    /// Bytes of the head in the read buffer (the body starts after them).
    len: usize,
    /// The upstream connection may carry another request.
    reusable: bool,
    /// The upstream's `Connection` names more hop-by-hop headers (rare): they are found
    /// by building the whole header map (see [`upstream_header`]).
    nominates: bool,
}

/// Why a try failed after it was connected.
#[derive(Clone, Copy)]
enum TripError {
    /// Nothing came back on a pooled connection: the upstream had closed it. Not the
    /// instance's fault; the same try goes again on a fresh connection.
    Stale,
    /// The upstream failed (error, close, timeout).
    Upstream { timed_out: bool },
    /// The upstream answered with a head busbar cannot frame (see [`parse_head`]), a
    /// head over [`MAX_RESPONSE_HEAD`], or an upgrade nobody asked for.
    Malformed,
}

/// Parses the response head at the start of `buf`: `Ok(None)` while incomplete.
///
/// A complete head is also written into `lines` (replacing what was there) as the
/// client gets it, up to busbar's own headers: the status line, then the upstream's
/// header lines as they came, less hop-by-hop ones, `Date`, a `Content-Length` that
/// `Transfer-Encoding` overrides, and `RateLimit-*` when `own_rate` (busbar sets its
/// own). [`finish_head`] finishes it. One parse serves framing and forwarding.
///
/// `Err`: a head busbar cannot frame or be sure of (see `edge::framing`): not HTTP, a
/// `Content-Length` that is not one line of digits, transfer codings with `chunked` not
/// once and last, `Transfer-Encoding` in HTTP/1.0, or a `Connection` that nominates a
/// framing header.
fn parse_head(
    buf: &[u8],
    head_request: bool,
    lines: &mut Vec<u8>,
    own_rate: bool,
) -> Result<Option<Head>, ()> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        _ => return Err(()),
    };
    let code = parsed.code.ok_or(())?;
    let status = StatusCode::from_u16(code).map_err(|_| ())?;
    let http11 = parsed.version == Some(1);
    let mut reusable = http11;
    let mut length: Option<u64> = None;
    let mut codings = framing::Codings::default();
    let mut encoded = false;
    let mut nominates = false;
    let mut names = [Name::Other; MAX_HEADERS];
    for (h, name) in parsed.headers.iter().zip(names.iter_mut()) {
        *name = Name::of(h.name.as_bytes());
        match *name {
            Name::Connection => {
                let mut close = false;
                if !connection_tokens(h.value, &mut close) {
                    // Framing headers are not hop-by-hop: stripping them would leave the
                    // body without an end for the client.
                    if framing::nominates_framing(h.value) {
                        return Err(());
                    }
                    nominates = true;
                }
                reusable &= !close;
            }
            Name::ContentLength => {
                // One line of `1*DIGIT`: a second line, even an equal one, or a list is
                // refused as nginx does, so no next hop can pick another value.
                if length.is_some() {
                    return Err(());
                }
                length = Some(framing::content_length(h.value).ok_or(())?);
            }
            Name::TransferEncoding => {
                encoded = true;
                codings.add(h.value).map_err(|_| ())?;
            }
            _ => {}
        }
    }
    // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
    if encoded && !http11 {
        return Err(());
    }
    let chunked = codings.chunked;
    lines.clear();
    status_line(lines, status);
    for (h, name) in parsed.headers.iter().zip(names) {
        let pass = match name {
            Name::Hop | Name::Connection | Name::Date => false,
            Name::ContentLength => !encoded,
            Name::Rate => !own_rate,
            Name::TransferEncoding | Name::Other => true,
        };
        if pass {
            headers::line(lines, h.name.as_bytes(), h.value);
        }
    }
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    if framing == Framing::Close {
        reusable = false;
    }
    Ok(Some(Head {
        status,
        framing,
        len,
        reusable,
        nominates,
    }))
}

/// The upstream's response head as a header map, less hop-by-hop headers (those its
/// `Connection` names too): for routes that edit response headers, which need to see
/// and change the upstream's own.
fn upstream_header(raw: &[u8]) -> Result<ResponseHeader, ()> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut lines);
    parsed.parse(raw).map_err(|_| ())?;
    let status = StatusCode::from_u16(parsed.code.ok_or(())?).map_err(|_| ())?;
    let mut resp =
        ResponseHeader::build_no_case(status, Some(parsed.headers.len())).map_err(|_| ())?;
    let mut nominated = Vec::new();
    let mut encoded = false;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| ())?;
        if name == CONNECTION {
            nominated.extend(
                h.value
                    .split(|&b| b == b',')
                    .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok()),
            );
        }
        encoded |= name == TRANSFER_ENCODING;
        if Name::of(name.as_str().as_bytes()).hop_by_hop() {
            continue;
        }
        let value = HeaderValue::from_bytes(h.value).map_err(|_| ())?;
        resp.append_header(name, value).map_err(|_| ())?;
    }
    // Framing headers are never hop-by-hop ([`parse_head`] refuses a head that says so).
    for name in nominated
        .iter()
        .filter(|n| **n != CONTENT_LENGTH && **n != TRANSFER_ENCODING)
    {
        resp.remove_header(name);
    }
    if encoded {
        // Transfer-Encoding wins over Content-Length, which must then go (RFC 9112 §6.3).
        resp.remove_header(&CONTENT_LENGTH);
    }
    Ok(resp)
}

/// What every try of one request sends, and how its response is read.
struct Ask<'a> {
    /// The upstream request head.
    wire: &'a [u8],
    head_request: bool,
    idempotent: bool,
    /// busbar sets `RateLimit-*` on the response (see [`parse_head`]).
    own_rate: bool,
    /// When the response head must have come, over all tries: the route's `timeout`.
    head_by: Instant,
}

/// Sends the request head and reads the response head (skipping 1xx ones) into `buf`;
/// the head's lines for the client go into `lines` ([`parse_head`]).
async fn round_trip(
    up: &mut TcpStream,
    ask: &Ask<'_>,
    read_timeout: Duration,
    reused: bool,
    buf: &mut Vec<u8>,
    lines: &mut Vec<u8>,
) -> Result<Head, TripError> {
    let failed = TripError::Upstream { timed_out: false };
    let timed_out = TripError::Upstream { timed_out: true };
    // Each wait ends at `read_timeout` or at the head's deadline, whichever is first: the
    // deadline bounds the whole head, so an upstream trickling header lines (each read
    // well within `read_timeout`) does not get through it.
    let limit = || read_timeout.min(ask.head_by.saturating_duration_since(Instant::now()));
    match within(limit(), up.write_all(ask.wire)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) if reused => return Err(TripError::Stale),
        Ok(Err(_)) => return Err(failed),
        Err(_) => return Err(timed_out),
    }
    buf.clear();
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(BUF);
        }
        let n = match within(limit(), up.read_buf(buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) if reused && buf.is_empty() => return Err(TripError::Stale),
            Ok(Err(_)) => return Err(failed),
            Err(_) => return Err(timed_out),
        };
        if n == 0 {
            return Err(if reused && buf.is_empty() {
                TripError::Stale
            } else {
                TripError::Upstream { timed_out: false }
            });
        }
        loop {
            match parse_head(buf, ask.head_request, lines, ask.own_rate) {
                Ok(None) => break,
                Ok(Some(head)) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                    // Nothing asked for an upgrade.
                    return Err(TripError::Malformed);
                }
                Ok(Some(head)) if head.status.is_informational() => {
                    // 103 Early Hints and the like: dropped, the final response follows.
                    buf.drain(..head.len);
                    if buf.is_empty() {
                        break;
                    }
                }
                Ok(Some(head)) => return Ok(head),
                Err(()) => return Err(TripError::Malformed),
            }
        }
    }
}

/// `HTTP/1.1 <status> <canonical reason>` and CRLF.
fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.put_slice(b"\r\n");
}

/// Finishes a head [`parse_head`] began: busbar's `RateLimit-*` lines (`rate`), then
/// `Date` and `Connection`.
fn finish_head(out: &mut Vec<u8>, rate: Option<&RateInfo>, keep_alive: bool) {
    if let Some(r) = rate {
        rate_lines(out, r);
    }
    end_head(out, keep_alive);
}

/// busbar's `Date` and `Connection` lines (as lines: two map inserts cost more than the
/// rest of a small head), and the head's end.
fn end_head(out: &mut Vec<u8>, keep_alive: bool) {
    out.put_slice(b"Date: ");
    out.put_slice(get_cached_date().as_bytes());
    out.put_slice(if keep_alive {
        b"\r\nConnection: keep-alive\r\n\r\n".as_slice()
    } else {
        b"\r\nConnection: close\r\n\r\n".as_slice()
    });
}

/// A response head from a header map into `out`: busbar's own answers, and upstream
/// responses of routes that edit response headers. `Date` and `Connection` are busbar's.
fn write_head(out: &mut Vec<u8>, resp: &mut ResponseHeader, keep_alive: bool) {
    if resp.headers.contains_key(DATE) {
        resp.remove_header(&DATE);
    }
    if resp.headers.contains_key(CONNECTION) {
        resp.remove_header(&CONNECTION);
    }
    status_line(out, resp.status);
    resp.header_to_h1_wire(out);
    end_head(out, keep_alive);
}

/// The request's outcome for the access log and the keep-alive loop.
struct Served {
    status: u16,
    body_bytes: usize,
    keep_alive: bool,
}

impl Served {
    /// Nothing was written (the client left); the connection ends.
    fn nothing() -> Served {
        Served::cut(0, 0)
    }

    /// The response stopped after its head (`status`) and `body_bytes`: the connection
    /// ends, as the client cannot tell where the response would have ended.
    fn cut(status: u16, body_bytes: usize) -> Served {
        Served {
            status,
            body_bytes,
            keep_alive: false,
        }
    }
}

/// The client side of one request.
struct Downstream<'a> {
    client: &'a mut L4Stream,
    peer: Option<SocketAddr>,
    /// The real client address (the peer, unless the peer is a trusted proxy).
    real: Option<IpAddr>,
    /// The connection may carry another request after this one.
    keep_alive: bool,
    /// Watch the client for leaving while the request waits (see [`Downstream::left`]).
    watch: bool,
    /// Longest a write to the client may take.
    limit: Duration,
}

impl Downstream<'_> {
    /// Writes `bytes` within `limit`: a client that stops reading is cut off (slow
    /// read), and counted as the pingora path counts it.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        match within(self.limit, self.client.write_all(bytes)).await {
            Ok(r) => r.is_ok(),
            Err(_) => {
                METRICS
                    .edge_refusals
                    .with_label_values(&["send_timeout"])
                    .inc();
                false
            }
        }
    }

    /// Writes a whole response of busbar's own; what was written, for the access log.
    ///
    /// Boxed: busbar's own answers are the rare path, and inline their state (~700
    /// bytes, with the header) would be part of every request's future, which is
    /// copied whole when the connection boxes it.
    fn reply(
        &mut self,
        mut resp: ResponseHeader,
        body: Bytes,
        keep_alive: bool,
    ) -> Pin<Box<dyn Future<Output = Served> + Send + '_>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(256 + body.len());
            write_head(&mut out, &mut resp, keep_alive);
            out.put_slice(&body);
            let sent = self.send(&out).await;
            Served {
                status: if sent { resp.status.as_u16() } else { 0 },
                body_bytes: if sent { body.len() } else { 0 },
                keep_alive: keep_alive && sent,
            }
        })
    }

    /// busbar's answer for `cause`, named in the context for the access log.
    fn answer(
        &mut self,
        ctx: &mut RequestCtx,
        cause: Cause,
        keep_alive: bool,
    ) -> Pin<Box<dyn Future<Output = Served> + Send + '_>> {
        ctx.cause = Some(cause);
        self.reply(cause.header(), cause.body(), keep_alive)
    }

    /// Finishes when the client has gone away (a close or a reset) while its request
    /// waits, for admission or for the upstream. Bytes that arrive instead are the
    /// client's next request, pipelined: they are put back for the front door, and the
    /// watch ends there (pending for good). Pending from the start when not `watch`ing:
    /// the front door already holds pipelined bytes, and reading on would put these
    /// before them.
    async fn left(&mut self) -> Box<pingora_error::Error> {
        if self.watch {
            let mut byte = [0u8; 1];
            match self.client.read(&mut byte).await {
                Ok(0) | Err(_) => {
                    return pingora_error::Error::explain(
                        pingora_error::ErrorType::ConnectionClosed,
                        "client went away before its response",
                    )
                }
                Ok(_) => self.client.rewind(&byte),
            }
        }
        std::future::pending().await
    }
}

/// Admission on this connection: the route's policy, its waits raced against the
/// client leaving. `Err` is the request's outcome when it is not let through.
async fn admit(
    policy: &crate::admission::RoutePolicy,
    down: &mut Downstream<'_>,
    req: &RequestHeader,
    path: &str,
    ctx: &mut RequestCtx,
) -> Result<(), Served> {
    let parts = crate::admission::RequestParts {
        client_ip: down.real,
        peer: down.peer.map(|a| a.ip()),
        path,
        // `take` leaves paths with two readings to the proxy.
        literal: None,
        headers: &req.headers,
    };
    let verdict = match policy.check(&parts) {
        Ok(admitted) => enter_watched(policy, admitted, down.left()).await,
        Err(rejection) => Err(Refused::Rejected(rejection)),
    };
    match verdict {
        Ok(admitted) => {
            ctx.admitted = Some(admitted);
            Ok(())
        }
        Err(Refused::ClientGone(_)) => Err(Served::nothing()),
        Err(Refused::Rejected(rejection)) => {
            ctx.cause = Some(Cause::Admission(rejection.kind));
            let body = rejection.body();
            let keep_alive = down.keep_alive;
            Err(down
                .reply(rejection.header(body.len()), body, keep_alive)
                .await)
        }
    }
}

/// Serves one request [`take`] accepted, on `client`. `draining`: the node is shutting
/// down, so the connection closes after this response. `pipelined`: the client has
/// already sent bytes past this request. Returns whether the client connection may carry
/// another request.
pub async fn serve(
    proxy: &BusbarProxy,
    client: &mut L4Stream,
    request: Box<FastRequest>,
    draining: bool,
    pipelined: bool,
) -> bool {
    // The request stays in its box (the snapshot and the route are moved out): inline,
    // it would be part of this future, copied whole when the connection boxes it.
    let mut request = request;
    let (snapshot, route, close) = (request.snapshot, request.route, request.close);
    let (req, normalized) = (&mut request.req, &request.normalized);
    // What the access log records of the request as it came (the request itself goes
    // upstream, edited): cheap clones of shared bytes.
    let (method, uri, host) = (
        req.method.clone(),
        req.uri.clone(),
        req.headers.get(http::header::HOST).cloned(),
    );
    let mut ctx = RequestCtx::new();
    METRICS.in_flight.inc();
    ctx.counted = true;
    ctx.trace =
        TraceContext::from_header(req.headers.get(&headers::TRACEPARENT).map(|v| v.as_bytes()));
    ctx.seen = Some(crate::accesslog::Seen::from_headers(
        &req.headers,
        req.version,
        false,
        &ctx.trace.trace_id_hex(),
    ));
    let peer = client
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
    let real = proxy::real_client(&snapshot, peer.map(|a| a.ip()), req);
    ctx.client = real;
    let mut down = Downstream {
        client,
        peer,
        real,
        keep_alive: !close && !draining,
        watch: !pipelined,
        limit: snapshot.config.limits.client_timeout,
    };
    let policy = route
        .as_ref()
        .and_then(|r| snapshot.admission.policy(r.name()).cloned());
    let max_hops = snapshot.config.limits.max_hops;
    ctx.snapshot = Some(snapshot);
    let served = match route {
        None => {
            let keep_alive = down.keep_alive;
            down.answer(&mut ctx, Cause::NoRoute, keep_alive).await
        }
        // Before admission, as on the proxy's path: a loop spends no token or queue slot.
        Some(route) if crate::via::node().looped(&req.headers, max_hops) => {
            ctx.route = Some(route);
            let keep_alive = down.keep_alive;
            down.answer(&mut ctx, Cause::LoopDetected, keep_alive).await
        }
        Some(route) => {
            ctx.route = Some(route.clone());
            let path = normalized.as_deref().unwrap_or(req.uri.path());
            let admitted = match &policy {
                None => Ok(()),
                Some(p) => admit(p, &mut down, req, path, &mut ctx).await,
            };
            match admitted {
                Ok(()) => {
                    proxy.plan_tries(req, real, &mut ctx, &route);
                    exchange(proxy, &mut down, &route, req, &mut ctx).await
                }
                Err(served) => served,
            }
        }
    };
    proxy.finish(
        &mut ctx,
        &Done {
            method: method.as_str(),
            host: proxy::host_of(&uri, host.as_ref()),
            path: uri.path(),
            query: uri.query(),
            client: proxy::logged_client(peer, real),
            status: served.status,
            body_bytes: served.body_bytes,
            error: false,
        },
    );
    served.keep_alive
}

/// The tries, the response head and the body.
async fn exchange(
    proxy: &BusbarProxy,
    down: &mut Downstream<'_>,
    route: &Route,
    req: &mut RequestHeader,
    ctx: &mut RequestCtx,
) -> Served {
    let client_ip: Option<IpAddr> = down.peer.map(|a| a.ip());
    let mut wire = Vec::with_capacity(512);
    if proxy::upstream_request_h1(ctx, route, req, client_ip, &mut wire).is_err() {
        return down.answer(ctx, Cause::BadRequest, false).await;
    }
    // busbar's response headers: a route that edits them gets the upstream's as a map to
    // edit ([`proxy::response_headers`]); otherwise the upstream's lines go out as they
    // came, and busbar's own (admission's) are written after them.
    let edits = !route.config.response_headers.is_empty();
    let rate = proxy::response_rate(ctx);
    let ask = Ask {
        wire: &wire,
        head_request: req.method == Method::HEAD,
        idempotent: req.method.is_idempotent(),
        own_rate: !edits && rate.is_some(),
        head_by: ctx
            .deadline
            .unwrap_or_else(|| Instant::now() + route.service.config.timeout),
    };
    let mut buf = Vec::with_capacity(BUF);
    // The response head for the client, and the first of its body: one write.
    let mut out = Vec::with_capacity(512);
    let (mut up, addr, mut head) = loop {
        let t = match proxy.begin_try(ctx) {
            Ok(t) => t,
            Err(_) => {
                let cause = ctx.cause.unwrap_or(Cause::UpstreamError);
                return down.answer(ctx, cause, false).await;
            }
        };
        // A client that leaves while the upstream works ends the try (as in pingora's
        // path): its instance, and its admission slot, are free at once.
        let tried = tokio::select! {
            biased;
            r = one_try(&t, &ask, &route.service.metrics, &mut buf, &mut out) => r,
            _ = down.left() => {
                ctx.release_instance();
                return Served::nothing();
            }
        };
        let retry = match tried {
            Ok((up, head)) => break (up, t.addr, head),
            Err(TryFail::Connect { timed_out }) => proxy.on_connect_failure(ctx, timed_out),
            Err(TryFail::Trip { timed_out }) => {
                proxy.on_try_failure(ctx, true, timed_out, ask.idempotent, false)
            }
            Err(TryFail::Malformed) => {
                proxy.on_malformed_response(ctx);
                false
            }
        };
        if !retry {
            let cause = ctx.cause.unwrap_or(Cause::UpstreamError);
            return down.answer(ctx, cause, false).await;
        }
    };
    proxy.on_response_head(ctx);
    let status = head.status.as_u16();
    // Where the body ends in what came with the head, and for a chunked body, that what
    // came is chunked framing at all: a 502 can still be answered for it.
    let body = &buf[head.len..];
    let mut scan = (head.framing == Framing::Chunked).then(ChunkScan::default);
    let (first, end) = match (head.framing, scan.as_mut()) {
        (Framing::None, _) => (0, Some(0)),
        (Framing::Length(n), _) if body.len() as u64 >= n => (n as usize, Some(n as usize)),
        (Framing::Chunked, Some(s)) => match s.feed(body) {
            Ok(fed) => (fed.pass, fed.end),
            Err(_) => return upstream_broke(proxy, ctx, down).await,
        },
        _ => (body.len(), None),
    };
    let keep_alive = down.keep_alive && head.framing != Framing::Close;
    if edits || head.nominates {
        let Ok(mut resp) = upstream_header(&buf[..head.len]) else {
            return upstream_broke(proxy, ctx, down).await;
        };
        if proxy::response_headers(ctx, &mut resp).is_err() {
            return down.answer(ctx, Cause::UpstreamError, false).await;
        }
        out.clear();
        write_head(&mut out, &mut resp, keep_alive);
    } else {
        finish_head(&mut out, rate.as_ref(), keep_alive);
    }
    out.extend_from_slice(&body[..first]);
    let mut sent = first;
    if !down.send(&out).await {
        return Served::cut(status, 0);
    }
    let extra = end.is_some_and(|e| e < body.len());
    if end.is_none() {
        let t_read = route.service.config.read_timeout;
        let mut remaining = match head.framing {
            Framing::Length(n) => n - first as u64,
            _ => u64::MAX,
        };
        loop {
            buf.clear();
            buf.reserve(BUF);
            let n = match within(t_read, up.read_buf(&mut buf)).await {
                Ok(Ok(0)) if head.framing == Framing::Close => break,
                Ok(Ok(n)) if n > 0 => n,
                read => {
                    let timed_out = read.is_err();
                    proxy.on_try_failure(ctx, true, timed_out, false, false);
                    return Served::cut(status, sent);
                }
            };
            // What of this read goes to the client, and how much of it is this body's.
            let (pass, take) = match (head.framing, scan.as_mut()) {
                (Framing::Chunked, Some(s)) => match s.feed(&buf[..n]) {
                    Ok(fed) => {
                        if fed.end.is_some() {
                            remaining = 0;
                        }
                        (fed.pass, fed.end.unwrap_or(n))
                    }
                    // The head went out already: nothing can be answered, only cut, and
                    // the client connection closes with the response incomplete. Held
                    // trailer bytes are dropped: no part of a bad line goes out.
                    Err(_) => {
                        proxy.on_malformed_response(ctx);
                        return Served::cut(status, sent);
                    }
                },
                (Framing::Length(_), _) => {
                    let t = (n as u64).min(remaining) as usize;
                    remaining -= t as u64;
                    (t, t)
                }
                _ => (n, n),
            };
            if pass > 0 && !down.send(&buf[..pass]).await {
                return Served::cut(status, sent);
            }
            sent += pass;
            if remaining == 0 {
                // Trailers held back across reads go out with the body's end.
                if let Some(held) = scan.as_ref().map(ChunkScan::held) {
                    if !held.is_empty() && !down.send(held).await {
                        return Served::cut(status, sent);
                    }
                    sent += held.len();
                }
                if take < n {
                    head.reusable = false;
                }
                break;
            }
        }
    }
    proxy.on_response_health(ctx, head.status);
    if head.reusable && !extra {
        pool::give_back(addr, up);
    }
    Served {
        status,
        body_bytes: sent,
        keep_alive,
    }
}

/// Why a try failed.
enum TryFail {
    Connect {
        timed_out: bool,
    },
    Trip {
        timed_out: bool,
    },
    /// An answer busbar cannot frame: never retried (`BusbarProxy::on_malformed_response`).
    Malformed,
}

/// One try on instance `t`: a pooled connection if there is a live one, the request, the
/// response head. If the upstream had closed the pooled connection (nothing came back),
/// an idempotent request goes again on a fresh one; another request fails the try, as
/// it may have been acted on.
async fn one_try(
    t: &proxy::Try,
    ask: &Ask<'_>,
    metrics: &crate::metrics::ServiceMetrics,
    buf: &mut Vec<u8>,
    lines: &mut Vec<u8>,
) -> Result<(TcpStream, Head), TryFail> {
    let mut pooled = pool::take(t.addr);
    loop {
        let reused = pooled.is_some();
        let mut up = match pooled.take() {
            Some(up) => {
                metrics.connection_pooled.inc();
                up
            }
            None => match within(t.connect_timeout, TcpStream::connect(t.addr)).await {
                Ok(Ok(up)) => {
                    metrics.connection_new.inc();
                    let _ = up.set_nodelay(true);
                    up
                }
                Ok(Err(_)) => return Err(TryFail::Connect { timed_out: false }),
                Err(_) => return Err(TryFail::Connect { timed_out: true }),
            },
        };
        match round_trip(&mut up, ask, t.read_timeout, reused, buf, lines).await {
            Ok(head) => return Ok((up, head)),
            Err(TripError::Stale) if ask.idempotent => {}
            Err(TripError::Stale) => return Err(TryFail::Trip { timed_out: false }),
            Err(TripError::Upstream { timed_out }) => return Err(TryFail::Trip { timed_out }),
            Err(TripError::Malformed) => return Err(TryFail::Malformed),
        }
    }
}

/// The upstream's response could not be framed before anything went to the client:
/// counted against the instance, the client gets a 502 and its connection closes.
async fn upstream_broke(
    proxy: &BusbarProxy,
    ctx: &mut RequestCtx,
    down: &mut Downstream<'_>,
) -> Served {
    proxy.on_malformed_response(ctx);
    down.answer(ctx, Cause::UpstreamError, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_names_are_what_from_bytes_makes_of_them() {
        for raw in [
            "Host",
            "host",
            "HOST",
            "Accept",
            "cookie",
            "Origin",
            "Referer",
            "User-Agent",
            "connection",
            "Content-Type",
            "Authorization",
            "Cache-Control",
            "Content-Length",
            "Accept-Encoding",
            "accept-language",
            "X-User-Id",
            "Hos",
            "Hostx",
            "accept-lang",
        ] {
            assert_eq!(
                request_name(raw.as_bytes()),
                HeaderName::from_bytes(raw.as_bytes()).ok(),
                "{raw}"
            );
        }
        for bad in ["", "Ho st", "Host:", "Acc\x01pt"] {
            assert_eq!(request_name(bad.as_bytes()), None, "{bad:?}");
        }
    }

    const LIMITS: HeadLimits = HeadLimits {
        max_request_line: 64,
        max_head_bytes: 256,
        max_headers: 4,
    };

    /// What [`parse`] takes, the front door's own check accepts as a bodiless request:
    /// `parse` is the only check the heads it takes get.
    fn agrees(head: &[u8]) -> bool {
        let taken = parse(&Bytes::copy_from_slice(head), &LIMITS).is_some();
        if taken {
            assert_eq!(
                super::super::head::check(head, &LIMITS),
                Ok(super::super::head::Body::Length(0)),
                "parse took {:?}",
                String::from_utf8_lossy(head)
            );
        }
        taken
    }

    #[test]
    fn parse_takes_only_what_the_front_door_accepts() {
        for ok in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET /a?b=c HTTP/1.1\r\nHost: a\r\nX:\tv \r\nContent-Length: 0\r\n\r\n",
            b"DELETE /x HTTP/1.1\r\nConnection: close\r\nX-Empty:\r\n\r\n",
        ] {
            assert!(agrees(ok), "{}", String::from_utf8_lossy(ok));
        }
        let line = |n: usize| format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(n));
        // The request line's LF at index 64 is within the limit; at 65 it is not.
        assert!(agrees(line(64 - 15).as_bytes()));
        assert!(!agrees(line(64 - 14).as_bytes()));
        for refused in [
            &b"GET / HTTP/1.1\nHost: a\n\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\x7fb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nAuthorization: a\r\nAUTHORIZATION: b\r\n\r\n",
        ] {
            assert!(!agrees(refused), "{}", String::from_utf8_lossy(refused));
        }
    }

    #[test]
    fn parse_agrees_with_the_front_door_on_every_byte_anywhere() {
        // Each byte value, put in at each position of (or in place of a byte of) a head
        // the own path takes.
        let base = b"GET /p HTTP/1.1\r\nHost: a\r\nX-Y: v w\r\n\r\n";
        let mut taken = 0;
        for at in 0..base.len() {
            for b in 0..=255u8 {
                let mut put = base.to_vec();
                put.insert(at, b);
                let mut swap = base.to_vec();
                swap[at] = b;
                taken += usize::from(agrees(&put)) + usize::from(agrees(&swap));
            }
        }
        // Many variants are still clean heads (a letter in a name, a value, the path).
        assert!(taken > 1000, "{taken}");
    }

    #[test]
    fn response_framing() {
        let parse = |raw: &[u8], head_req| parse_head(raw, head_req, &mut Vec::new(), false);
        let head = |raw: &[u8], head_req| parse(raw, head_req).unwrap().unwrap();
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false);
        assert_eq!((h.framing, h.reusable), (Framing::Length(3), true));
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked);
        let h = head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false);
        assert_eq!((h.framing, h.reusable), (Framing::Close, false));
        let h = head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(!h.reusable);
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true);
        assert_eq!(h.framing, Framing::None);
        let h = head(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::None);
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le", false)
            .unwrap()
            .is_none());
        let h = head(b"HTTP/1.1 200 OK\r\nConnection: x-a\r\n\r\n", false);
        assert!(h.nominates);
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!((h.framing, h.reusable), (Framing::Close, false));
    }

    /// Heads busbar cannot frame or be sure of are refused (the client gets a 502).
    #[test]
    fn heads_that_cannot_be_framed_are_refused() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: +0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: x-a, Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nContent-Length: +5\r\n\r\n",
        ] {
            assert!(
                parse_head(raw, false, &mut Vec::new(), false).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    /// What the client gets of an upstream head: its lines as they came, less hop-by-hop
    /// ones, its `Date`, a `Content-Length` that `Transfer-Encoding` overrides, and the
    /// `RateLimit-*` busbar sets; then busbar's.
    #[test]
    fn upstream_lines_pass_through_less_what_belongs_to_the_hop() {
        let raw: &[u8] = b"HTTP/1.1 200 OK\r\nX-A:  1 \r\nDate: old\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nRateLimit-Limit: 9\r\nConnection: keep-alive\r\nTE: x\r\nUpgrade: y\r\nProxy-Connection: z\r\n\r\n";
        let rate = RateInfo {
            limit: 5,
            remaining: 4,
            reset_secs: 1,
        };
        let head = |own_rate: bool| {
            let mut out = Vec::new();
            parse_head(raw, false, &mut out, own_rate).unwrap().unwrap();
            finish_head(&mut out, own_rate.then_some(&rate), true);
            String::from_utf8(out).unwrap().to_lowercase()
        };
        let text = head(true);
        assert!(
            text.starts_with(
                "http/1.1 200 ok\r\nx-a: 1\r\ntransfer-encoding: chunked\r\nratelimit-limit: 5\r\n"
            ),
            "{text}"
        );
        for gone in [
            "date: old",
            "keep-alive: timeout",
            "content-length",
            "ratelimit-limit: 9",
            "te: x",
            "upgrade",
            "proxy-connection",
        ] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        assert!(text.contains("ratelimit-remaining: 4\r\n"), "{text}");
        assert!(text.contains("connection: keep-alive\r\n"), "{text}");
        assert_eq!(text.matches("date: ").count(), 1, "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        // A route without a rate limit passes the upstream's own on.
        let text = head(false);
        assert!(text.contains("ratelimit-limit: 9\r\n"), "{text}");
        assert!(!text.contains("ratelimit-remaining"), "{text}");

        // As a map (for routes that edit response headers): the same headers go.
        let map = upstream_header(b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n").unwrap();
        assert!(map.headers.get("x-hop").is_none());
        assert!(map.headers.get("content-length").is_none());
        assert!(map.headers.get("connection").is_none());
        assert_eq!(map.headers.get("x-a").unwrap(), "1");
    }
}
