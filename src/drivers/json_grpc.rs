//! The JSON → gRPC driver: a JSON/HTTP request answered by a unary, server-streaming or
//! client-streaming gRPC call over HTTP/2, made by whichever driver serves the JSON caller:
//! busbar's HTTP/1 engine (`drivers::h1::json`), its HTTP/2 engine (`drivers::h2::json`),
//! or the pingora driver's `request_filter` (an HTTP/1 request the engine declines). Each
//! gives the call its caller's side as a [`JsonIo`]: the request head, the body's data,
//! the response head and body, and "the client went away"; everything else is here, once.
//!
//! Owns: reading the JSON request (bounded by the route's `max_body`; a client stream's
//! messages sent as they arrive), the gRPC call on a stream from `drivers::h2::pool` (h2c,
//! or h2 over TLS), request metadata (`Grpc-Metadata-X` → `x`), mapping `grpc-status`
//! from headers or trailers, response metadata (`Grpc-Metadata-<name>` /
//! `Grpc-Trailer-<name>` headers), writing the JSON response (NDJSON, result lines or a
//! JSON array for server streaming), and rendering every error this route answers —
//! the phases' causes included — in the translation's shape `{"code","message","details"}`
//! with the HTTP status of its gRPC code. The tries are the phases' like any route's
//! (`Phases::begin_try`: balancer, health, gray release, the sidecar or the app port
//! through `fallback::target`; connect failures, and unary calls the instance refused
//! unprocessed (`pool::refused`), retried within the retry policy, a dead sidecar
//! switched to the app port; outlier accounting and upstream metrics), the metadata is
//! the one upstream-head builder's, and the answer's head gets the one response-head
//! editor's edits.
//! Why a driver and not the proxy pipeline: pingora sends response headers before the
//! upstream trailers arrive, so a status carried in trailers could not become the HTTP
//! status there. A caller that goes away (closes, resets its stream) while the call
//! waits for the service ends it: the upstream stream is reset with CANCEL.
//! Must not: hold policy beyond the translation, or frame the caller's protocol (the
//! drivers' [`JsonIo`]).

use std::future::Future;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::base::http::is_hop_by_hop;
use crate::phases::ctx::RequestCtx;
use crate::phases::fail::{self, Failure};
use crate::phases::upstream_head::{self, Output};
use crate::phases::{response_head, Phases};
use crate::proxy::reply::{self, Cause};
use crate::translate::descriptors;
use crate::translate::json_grpc::{
    Binding, MessageSplitter, MetadataHeaders, StreamFormat, TranscodeError, Transcoder,
};
use crate::translate::status;
use crate::translate::template::Binding as PathBinding;
use crate::translate::Translation;

use super::h2::grpc_timeout;
use super::h2::pool::{self, OpenError};

/// Largest reply message busbar decodes (gRPC's default receive limit is 4 MiB).
pub const MAX_REPLY_MESSAGE: usize = 16 * 1024 * 1024;

/// Request headers that are not gRPC metadata, besides the hop-by-hop ones
/// (`base::http::HOP_BY_HOP`).
const NOT_METADATA: [&str; 9] = [
    "host",
    "transfer-encoding",
    "content-type",
    "content-length",
    "accept",
    "accept-encoding",
    "expect",
    "http2-settings",
    "trailer",
];

/// Response headers of the gRPC reply that are not metadata to show the caller.
const NOT_RESPONSE_METADATA: [&str; 9] = [
    "content-type",
    "content-length",
    "date",
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "grpc-encoding",
    "grpc-accept-encoding",
    "trailer",
];

/// `grpc_timeout::NAME`, parsed once.
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static(grpc_timeout::NAME);

/// The reply's status fields, parsed once (a `&str` name is parsed at every lookup).
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// grpc-gateway's prefix for request headers that are metadata, and for the reply's
/// initial metadata.
const METADATA_PREFIX: &str = "grpc-metadata-";

/// What went wrong with the upstream reply: `INTERNAL` (500) with the reason, as a gRPC
/// client reports a reply it cannot read.
#[derive(Debug, thiserror::Error)]
enum ReplyError {
    #[error("{0}")]
    Broken(String),
    #[error("the upstream did not answer in time")]
    Timeout,
}

/// The JSON caller's side of a call, as the driver that serves it reads and writes it.
/// Every method's error is the client's side failing (it left, it was too slow, its
/// body is malformed): nothing more can be answered on it, and the driver says what
/// the access log records.
pub(crate) trait JsonIo: Send {
    /// The request's head, as the driver read it.
    fn head(&self) -> &RequestHeader;

    /// The client's connection, for the metadata the upstream-head builder adds.
    fn connection(&self) -> upstream_head::Downstream<'_>;

    /// The body's next data (any framing removed), `Ok(None)` at its end. A client that
    /// waits for `100 Continue` is told to send it on the first read; a body read while
    /// the request was queued comes first.
    fn read_body(&mut self) -> impl Future<Output = Result<Option<Bytes>>> + Send;

    /// The body will not be read to its end: the connection carries no other request.
    fn close(&mut self);

    /// Writes the response head; a body (perhaps empty) always follows.
    fn write_head(&mut self, head: ResponseHeader) -> impl Future<Output = Result<()>> + Send;

    /// Writes body data; `end` ends the response.
    fn write_body(&mut self, data: Bytes, end: bool) -> impl Future<Output = Result<()>> + Send;

    /// Writes a whole `200` JSON answer without metadata fields (the same head
    /// [`write_json`] sends) from a head the driver renders itself, when it can for this
    /// request; `Ok(false)`: it cannot, and nothing was written.
    fn write_ok(
        &mut self,
        _ctx: &RequestCtx,
        _body: &[u8],
    ) -> impl Future<Output = Result<bool>> + Send {
        std::future::ready(Ok(false))
    }

    /// Finishes when the client has gone away (closed its connection, reset its
    /// stream) while the call waits on the service; pending for good where the driver
    /// cannot tell without reading what is not its to read.
    fn gone(&mut self) -> impl Future<Output = ()> + Send;
}

/// The transcoder of `route`, when it is a JSON→gRPC route and `req` a JSON caller's
/// (a plain gRPC caller of the route passes through untouched): the engines' check.
pub(crate) fn transcoder(
    ctx: &RequestCtx,
    route: &crate::routing::Route,
    req: &RequestHeader,
) -> Option<std::sync::Arc<Transcoder>> {
    match crate::translate::of(ctx.snapshot.as_deref()?, route)? {
        Translation::Json(t) if !crate::translate::is_plain_grpc(req) => Some(t.clone()),
        _ => None,
    }
}

/// The client left while its call waited: nothing can be answered.
fn client_left() -> Box<Error> {
    Error::explain(
        ErrorType::ConnectionClosed,
        "client went away before its JSON call was answered",
    )
    .into_down()
}

/// Serves one JSON request through gRPC; always writes the response, unless the client
/// side fails (`Err`).
pub(crate) async fn serve(
    phases: &Phases,
    io: &mut impl JsonIo,
    ctx: &mut RequestCtx,
    t: &Transcoder,
) -> Result<()> {
    let req = io.head();
    let path = req.uri.path().to_string();
    let query = req.uri.query().map(str::to_string);
    let method = req.method.clone();
    let (binding, vars) = match t.find(&method, &path) {
        Ok(found) => found,
        Err(e) => return transcode_error(io, ctx, &e).await,
    };
    let Some(max_body) = ctx.route.as_ref().map(|r| r.config.max_body) else {
        return answer(io, ctx, Cause::NoRoute).await;
    };
    if binding.method.is_client_streaming() {
        // The body's messages go to the service as they arrive, once the call is open.
        let metadata = metadata(io, ctx)?;
        let out = Outgoing::Stream {
            vars,
            query: query.as_deref(),
            max_body,
        };
        return call(phases, io, ctx, t, binding, out, metadata).await;
    }
    // A body that comes in one piece (most do) is read where it lies.
    let mut body = Bytes::new();
    let mut gathered = BytesMut::new();
    while let Some(chunk) = io.read_body().await? {
        if (body.len() + gathered.len() + chunk.len()) as u64 > max_body {
            io.close();
            return answer(io, ctx, Cause::BodyTooLarge).await;
        }
        if body.is_empty() && gathered.is_empty() {
            body = chunk;
        } else {
            if !body.is_empty() {
                gathered.extend_from_slice(&std::mem::take(&mut body));
            }
            gathered.extend_from_slice(&chunk);
        }
    }
    if !gathered.is_empty() {
        body = gathered.freeze();
    }
    let frame = match t.request_frame(binding, vars, query.as_deref(), &body) {
        Ok(f) => f,
        Err(e) => return transcode_error(io, ctx, &e).await,
    };
    let metadata = metadata(io, ctx)?;
    let out = Outgoing::One(frame);
    call(phases, io, ctx, t, binding, out, metadata).await
}

/// What the gRPC request carries.
enum Outgoing<'a> {
    /// One message, built from the whole body before the call.
    One(Bytes),
    /// A client stream: the body's messages (a JSON array or NDJSON), each sent as soon
    /// as it has arrived, the path and query applied to each.
    Stream {
        vars: Vec<PathBinding>,
        query: Option<&'a str>,
        max_body: u64,
    },
}

/// Why a client stream stopped before its end was sent.
enum Sending {
    /// The service's side: the call failed.
    Upstream(h2::Error),
    /// A message does not fit, or the body is not an array or NDJSON: 400.
    Bad(TranscodeError),
    /// Past the route's `max_body`.
    TooLarge,
    /// The client's side failed (gone, too slow).
    Client(Box<pingora_error::Error>),
}

/// Sends the request's messages and ends the stream.
async fn send_body(
    io: &mut impl JsonIo,
    t: &Transcoder,
    binding: &Binding,
    out: Outgoing<'_>,
    stream: &mut h2::SendStream<Bytes>,
) -> std::result::Result<(), Sending> {
    let (vars, query, max_body) = match out {
        Outgoing::One(frame) => return stream.send_data(frame, true).map_err(Sending::Upstream),
        Outgoing::Stream {
            vars,
            query,
            max_body,
        } => (vars, query, max_body),
    };
    let mut splitter = MessageSplitter::default();
    let mut messages = Vec::new();
    let mut read: u64 = 0;
    while let Some(c) = io.read_body().await.map_err(Sending::Client)? {
        read += c.len() as u64;
        if read > max_body {
            return Err(Sending::TooLarge);
        }
        splitter.push(&c, &mut messages).map_err(Sending::Bad)?;
        for m in messages.drain(..) {
            let frame = t
                .request_frame(binding, vars.clone(), query, &m)
                .map_err(Sending::Bad)?;
            // h2 queues what the window does not take yet; `max_body` bounds it.
            stream.send_data(frame, false).map_err(Sending::Upstream)?;
        }
    }
    splitter.finish().map_err(Sending::Bad)?;
    stream
        .send_data(Bytes::new(), true)
        .map_err(Sending::Upstream)
}

/// The gRPC request's headers before a try: `content-type`, `te` and a `grpc-timeout`
/// slot (each try fills it), then the request's headers as gRPC metadata — the one
/// upstream-head builder's head (after admission and the route's edits), less what is
/// not metadata. Built straight into the map the request is sent with: no second map.
struct CallHeaders {
    headers: HeaderMap,
    /// The client sent a `grpc-timeout` of its own: it goes on, as it always did.
    timeout_given: bool,
}

fn metadata(io: &impl JsonIo, ctx: &RequestCtx) -> Result<CallHeaders> {
    let head = io.head();
    // The builder's copy without the client's header-name case (metadata is lowercase
    // on the wire): every insert it makes is then one map's, not two. Only an
    // origin-form target may lose its raw form: the builder reads it for nothing else.
    let mut up = if head.raw_path().first() == Some(&b'/') {
        RequestHeader::from(http::request::Parts::clone(head))
    } else {
        head.clone()
    };
    upstream_head::build(ctx, &mut up, io.connection(), Output::Map)?;
    let parts: http::request::Parts = up.into();
    let mut out = HeaderMap::with_capacity(parts.headers.len() + 3);
    out.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    out.insert(http::header::TE, HeaderValue::from_static("trailers"));
    out.insert(GRPC_TIMEOUT, HeaderValue::from_static("1n"));
    let mut timeout_given = false;
    // Names and values are moved, not copied; a name's later values come as `None`.
    let mut name: Option<HeaderName> = None;
    for (k, v) in parts.headers {
        if let Some(k) = k {
            name = Some(k);
        }
        let Some(k) = &name else { continue };
        let n = k.as_str();
        if is_hop_by_hop(n.as_bytes()) || NOT_METADATA.contains(&n) {
            continue;
        }
        match n.strip_prefix(METADATA_PREFIX) {
            // grpc-gateway: `Grpc-Metadata-X: v` is metadata `x: v`; gRPC's own
            // reserved names (`grpc-*`, `te`, `content-type`) are never taken from it.
            Some(md) => {
                let reserved = md.starts_with("grpc-") || NOT_METADATA.contains(&md) || md == "te";
                if let (false, Ok(n)) = (reserved, HeaderName::from_bytes(md.as_bytes())) {
                    out.append(n, v);
                }
            }
            // A client's own `grpc-timeout` takes the slot's place (its first value).
            None if !timeout_given && *k == GRPC_TIMEOUT => {
                timeout_given = true;
                out.insert(k.clone(), v);
            }
            None => {
                out.append(k.clone(), v);
            }
        }
    }
    Ok(CallHeaders {
        headers: out,
        timeout_given,
    })
}

async fn call(
    phases: &Phases,
    io: &mut impl JsonIo,
    ctx: &mut RequestCtx,
    t: &Transcoder,
    binding: &Binding,
    out: Outgoing<'_>,
    metadata: CallHeaders,
) -> Result<()> {
    let Some(route) = ctx.route.clone() else {
        return answer(io, ctx, Cause::NoRoute).await;
    };
    let svc = &route.service;
    let deadline = ctx
        .deadline
        .unwrap_or_else(|| Instant::now() + svc.config.timeout);
    // A unary request's one message is held: a stream the instance refused unprocessed
    // goes to another. A client stream's messages are read as they are sent: not again.
    let held = match &out {
        Outgoing::One(frame) => Some(frame.clone()),
        Outgoing::Stream { .. } => None,
    };
    let mut out = Some(out);
    let mut metadata = Some(metadata);
    // The phases' tries: a connect failure goes to another instance (or, for a dead
    // sidecar, to the same instance's app port) within the service's retry policy, and
    // so does a stream the instance refused before processing it (`pool::refused`).
    let (response, _slot) = loop {
        let attempt = match phases.begin_try(ctx) {
            Ok(a) => a,
            Err(cause) => return answer(io, ctx, cause).await,
        };
        let lease = match pool::open(&attempt, svc.config.h2_max_streams, &svc.metrics).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(upstream = %attempt.addr, "gRPC connect failed: {e:?}");
                let retry = match e {
                    OpenError::Certificate => phases.on_certificate_failure(ctx),
                    OpenError::Connect { timed_out } => phases.on_connect_failure(ctx, timed_out),
                };
                if !retry {
                    return upstream_failed(io, ctx).await;
                }
                continue;
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        // The first try takes the metadata built for it; a retry builds it again.
        let md = match metadata.take() {
            Some(m) => m,
            None => self::metadata(io, ctx)?,
        };
        let request = grpc_request(&attempt, binding, remaining, md, ctx)?;
        let this = match (&held, out.take()) {
            (Some(frame), _) => Outgoing::One(frame.clone()),
            (None, Some(o)) => o,
            // A client stream is sent once: it is never retried (below).
            (None, None) => return upstream_failed(io, ctx).await,
        };
        let sent = match lease.send(request, false) {
            Err(e) => Err(e),
            Ok(mut ex) => match send_body(io, t, binding, this, &mut ex.body).await {
                Ok(()) => Ok(ex),
                Err(Sending::Upstream(e)) => {
                    ex.slot.failed(&e);
                    Err(e)
                }
                Err(refused) => {
                    // The caller's body was wrong: the service sees a cancelled call.
                    ex.body.send_reset(h2::Reason::CANCEL);
                    ctx.release_instance();
                    return match refused {
                        Sending::Bad(e) => transcode_error(io, ctx, &e).await,
                        Sending::Client(e) => Err(e),
                        _ => {
                            io.close();
                            answer(io, ctx, Cause::BodyTooLarge).await
                        }
                    };
                }
            },
        };
        let answered = match sent {
            Ok(ex) => {
                // A client that leaves while the service works ends the call: the
                // stream's handles are dropped, and the `h2` crate resets it with CANCEL.
                let waited = tokio::select! {
                    biased;
                    r = tokio::time::timeout(remaining, ex.response) => r,
                    () = io.gone() => {
                        ctx.release_instance();
                        return Err(client_left());
                    }
                };
                match waited {
                    Err(_) => Err(None),
                    Ok(Err(e)) => {
                        ex.slot.failed(&e);
                        Err(Some(e))
                    }
                    Ok(Ok(r)) => Ok((r, ex.slot)),
                }
            }
            Err(e) => Err(Some(e)),
        };
        match answered {
            Ok(r) => break r,
            Err(None) => {
                // Sent, and unanswered: it may have been acted on, so it is not sent again.
                phases.on_try_failure(ctx, true, true, false, false);
                return upstream_failed(io, ctx).await;
            }
            Err(Some(e)) if pool::refused(&e) => {
                // Not processed (RFC 9113 §8.7): not the instance's fault, and safe to
                // send elsewhere when the message is still held.
                tracing::debug!(upstream = %attempt.addr, "gRPC stream refused: {e}");
                if phases.on_try_failure(ctx, false, false, held.is_some(), true) {
                    continue;
                }
                ctx.cause = Some(Cause::UpstreamError);
                let why = format!("the upstream refused the call before processing it: {e}");
                return bad_gateway(io, ctx, 14, &why).await;
            }
            Err(Some(e)) => {
                phases.on_try_failure(ctx, true, false, false, false);
                // A transport failure: gRPC clients report it as UNAVAILABLE.
                let why = format!("the gRPC call failed: {e}");
                return bad_gateway(io, ctx, 14, &why).await;
            }
        }
    };
    phases.on_response_head(ctx);
    let (parts, body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        if parts.status.is_server_error() {
            phases.on_response_health(ctx, parts.status);
        }
        ctx.release_instance();
        let why = format!(
            "the upstream answered HTTP {} instead of gRPC",
            parts.status.as_u16()
        );
        let code = status::code_of_http(parts.status.as_u16());
        return bad_gateway(io, ctx, code, &why).await;
    }
    let is_grpc = parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !is_grpc {
        ctx.release_instance();
        let ct = parts
            .headers
            .get(CONTENT_TYPE)
            .map_or("none".to_string(), |v| {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            });
        let why = format!("the upstream is not a gRPC server (content-type: {ct})");
        return bad_gateway(io, ctx, 13, &why).await;
    }
    phases.on_response_health(ctx, parts.status);
    let result = relay(
        io,
        ctx,
        t,
        binding,
        &parts.headers,
        body,
        svc.config.read_timeout,
    )
    .await;
    ctx.release_instance();
    match result {
        Ok(()) => Ok(()),
        Err(ReplyError::Timeout) => {
            svc.metrics.timeouts.inc();
            answer(io, ctx, Cause::UpstreamTimeout).await
        }
        Err(ReplyError::Broken(why)) => bad_gateway(io, ctx, 13, &why).await,
    }
}

/// The gRPC request head for a try: the method's path on the instance, a `grpc-timeout`
/// of what is left of the deadline (unless the client sent its own), the metadata, and
/// the try's trace context.
fn grpc_request(
    attempt: &crate::phases::Try,
    binding: &Binding,
    remaining: std::time::Duration,
    mut metadata: CallHeaders,
    ctx: &RequestCtx,
) -> Result<http::Request<()>> {
    // The instance's scheme and authority, the method's path parsed once at load.
    let mut uri = origin(attempt)?;
    uri.path_and_query = Some(binding.grpc_target.clone());
    let uri = http::Uri::from_parts(uri).map_err(request_error)?;
    if !metadata.timeout_given {
        metadata
            .headers
            .insert(GRPC_TIMEOUT, grpc_timeout::encode(remaining));
    }
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    *request.headers_mut() = metadata.headers;
    crate::otel::retrace_headers(request.headers_mut(), ctx);
    Ok(request)
}

/// `pool::origin` of a try as URI parts. The last plain (h2c) instance's is kept per
/// thread: most calls go where the last one went, and formatting an address is most of
/// the cost of a request head.
fn origin(attempt: &crate::phases::Try) -> Result<http::uri::Parts> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(std::net::SocketAddr, http::uri::Authority)>> =
            const { std::cell::RefCell::new(None) };
    }
    let plain = attempt.tls.is_none();
    if plain {
        let kept = LAST.with(|l| match &*l.borrow() {
            Some((addr, a)) if *addr == attempt.addr => Some(a.clone()),
            _ => None,
        });
        if let Some(authority) = kept {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = Some(authority);
            return Ok(parts);
        }
    }
    let parts = http::Uri::from_maybe_shared(Bytes::from(pool::origin(attempt)))
        .map_err(request_error)?
        .into_parts();
    if let (true, Some(a)) = (
        plain && parts.scheme == Some(http::uri::Scheme::HTTP),
        &parts.authority,
    ) {
        let kept = (attempt.addr, a.clone());
        LAST.with(|l| *l.borrow_mut() = Some(kept));
    }
    Ok(parts)
}

fn request_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Box<Error> {
    Error::because(ErrorType::InternalError, "gRPC request", e)
}

/// Reads the reply's messages and status and writes the JSON answer. Errors are only
/// returned while nothing has been written downstream.
async fn relay(
    io: &mut impl JsonIo,
    ctx: &mut RequestCtx,
    t: &Transcoder,
    binding: &Binding,
    headers: &HeaderMap,
    mut body: h2::RecvStream,
    read_timeout: std::time::Duration,
) -> std::result::Result<(), ReplyError> {
    let streaming = binding.method.is_server_streaming();
    let format = t.options.stream;
    let mut buf = BytesMut::new();
    // A unary reply's message (a second one is read, and dropped, as before).
    let mut first: Option<Vec<u8>> = None;
    let mut started = false;
    let mut trailers_only = headers.contains_key(&GRPC_STATUS);
    // The reply's metadata as response headers; a Trailers-Only reply's headers are its
    // trailers.
    let mut shown = Vec::new();
    if !trailers_only || !body.is_end_stream() {
        trailers_only = false;
        response_metadata(
            headers,
            Shown::Initial(t.options.initial_metadata),
            &mut shown,
        );
        loop {
            let next = tokio::select! {
                biased;
                next = tokio::time::timeout(read_timeout, body.data()) => next,
                // The client left: the stream is dropped (CANCEL upstream).
                () = io.gone() => return Ok(()),
            };
            let chunk = match next {
                Err(_) if started => {
                    let why = "the upstream did not answer in time";
                    return finish_stream_error(io, format, 4, why).await;
                }
                Err(_) => return Err(ReplyError::Timeout),
                Ok(None) => break,
                Ok(Some(Err(e))) if started => {
                    let why = format!("the stream broke: {e}");
                    return finish_stream_error(io, format, 14, &why).await;
                }
                Ok(Some(Err(e))) => {
                    return Err(ReplyError::Broken(format!("the gRPC reply broke off: {e}")))
                }
                Ok(Some(Ok(c))) => c,
            };
            let _ = body.flow_control().release_capacity(chunk.len());
            // Messages are read where they lie in the chunk; only a message split across
            // chunks is gathered in `buf`.
            let mut data = if buf.is_empty() {
                chunk
            } else {
                buf.extend_from_slice(&chunk);
                buf.split().freeze()
            };
            while let Some(msg) = next_frame(&mut data)? {
                let json = t.response(binding, &msg).map_err(ReplyError::Broken)?;
                if streaming {
                    let item = stream_item(format, !started, json);
                    if !started {
                        started = true;
                        let ct = stream_content_type(format);
                        let _ = write_head(io, ctx, 200, ct, None, &shown).await;
                    }
                    if io.write_body(Bytes::from(item), false).await.is_err() {
                        return Ok(());
                    }
                } else if first.is_none() {
                    first = Some(json);
                }
            }
            if !data.is_empty() {
                buf.extend_from_slice(&data);
            }
        }
        if !buf.is_empty() {
            return Err(ReplyError::Broken(
                "the gRPC reply ends inside a message".into(),
            ));
        }
    }
    let trailers = if trailers_only {
        None
    } else {
        match tokio::time::timeout(read_timeout, body.trailers()).await {
            Err(_) => return Err(ReplyError::Timeout),
            Ok(Err(e)) => {
                return Err(ReplyError::Broken(format!(
                    "reading gRPC trailers failed: {e}"
                )))
            }
            Ok(Ok(t)) => t,
        }
    };
    // Trailers-Only replies carry the status in the headers.
    let st = trailers
        .as_ref()
        .filter(|t| t.contains_key(&GRPC_STATUS))
        .unwrap_or(headers);
    let Some(code) = st
        .get(&GRPC_STATUS)
        .and_then(|v| status::parse_code(v.as_bytes()))
    else {
        if started {
            let why = "the upstream sent no grpc-status";
            return finish_stream_error(io, format, 13, why).await;
        }
        return Err(ReplyError::Broken(
            "the upstream sent no grpc-status".into(),
        ));
    };
    let message = st
        .get(&GRPC_MESSAGE)
        .map_or_else(String::new, |v| status::decode_message(v.as_bytes()));
    if started {
        // The head is gone: trailers cannot become headers any more.
        if code == 0 {
            let end = stream_end(format, false).unwrap_or_default();
            let _ = io.write_body(Bytes::from_static(end), true).await;
            return Ok(());
        }
        return finish_stream_error(io, format, code, &message).await;
    }
    response_metadata(
        trailers.as_ref().unwrap_or(headers),
        Shown::Trailers,
        &mut shown,
    );
    if code != 0 {
        let details = status::details(
            st.get(&GRPC_DETAILS).map(|v| v.as_bytes()),
            &[&t.pool, &descriptors::RPC],
        );
        let body = status::error_body(code, &message, details);
        let _ = write_json(io, ctx, status::http_status(code), body, &shown).await;
        return Ok(());
    }
    if streaming {
        let end = stream_end(format, true).unwrap_or_default();
        let ct = stream_content_type(format);
        let _ = write_head(io, ctx, 200, ct, Some(end.len()), &shown).await;
        let _ = io.write_body(Bytes::from_static(end), true).await;
        return Ok(());
    }
    let Some(json) = first else {
        return Err(ReplyError::Broken(
            "the upstream replied OK without a message".into(),
        ));
    };
    let _ = write_json(io, ctx, 200, json, &shown).await;
    Ok(())
}

/// Which of the reply's metadata a header comes from.
#[derive(Clone, Copy)]
enum Shown {
    Initial(MetadataHeaders),
    Trailers,
}

/// The reply's metadata as response headers: `Grpc-Metadata-<name>` (or `<name>` when the
/// route passes it plain) for initial metadata, `Grpc-Trailer-<name>` for trailers, as
/// grpc-gateway and Envoy send them. gRPC's own fields stay out.
fn response_metadata(from: &HeaderMap, which: Shown, out: &mut Vec<(String, HeaderValue)>) {
    for (k, v) in from.iter() {
        let name = k.as_str();
        if NOT_RESPONSE_METADATA.contains(&name) || is_hop_by_hop(name.as_bytes()) {
            continue;
        }
        let shown = match which {
            Shown::Initial(MetadataHeaders::Prefixed) => format!("Grpc-Metadata-{name}"),
            Shown::Initial(MetadataHeaders::Plain) => name.to_string(),
            Shown::Trailers => format!("Grpc-Trailer-{name}"),
        };
        out.push((shown, v.clone()));
    }
}

fn stream_content_type(format: StreamFormat) -> &'static str {
    match format {
        StreamFormat::Ndjson | StreamFormat::ResultLines => "application/x-ndjson",
        StreamFormat::JsonArray => "application/json",
    }
}

/// One streamed message as the format writes it; `first` when none came before.
fn stream_item(format: StreamFormat, first: bool, json: Vec<u8>) -> Vec<u8> {
    match format {
        StreamFormat::Ndjson => {
            let mut line = json;
            line.push(b'\n');
            line
        }
        StreamFormat::ResultLines => {
            let mut line = Vec::with_capacity(json.len() + 12);
            line.extend_from_slice(b"{\"result\":");
            line.extend_from_slice(&json);
            line.extend_from_slice(b"}\n");
            line
        }
        StreamFormat::JsonArray => {
            let mut item = Vec::with_capacity(json.len() + 1);
            item.push(if first { b'[' } else { b',' });
            item.extend_from_slice(&json);
            item
        }
    }
}

/// What closes a stream that ended OK (the array's `]`, `[]` when it had no message).
fn stream_end(format: StreamFormat, first: bool) -> Option<&'static [u8]> {
    match format {
        StreamFormat::JsonArray if first => Some(b"[]"),
        StreamFormat::JsonArray => Some(b"]"),
        _ => None,
    }
}

/// Takes one length-prefixed message off the front of `buf`, if complete (no copy).
fn next_frame(buf: &mut Bytes) -> std::result::Result<Option<Bytes>, ReplyError> {
    let Some(&[compressed, a, b, c, d]) = buf.get(..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if compressed != 0 {
        return Err(ReplyError::Broken(
            "the upstream sent a compressed message busbar did not ask for".into(),
        ));
    }
    if len > MAX_REPLY_MESSAGE {
        return Err(ReplyError::Broken(format!(
            "a reply message of {len} bytes is over the {MAX_REPLY_MESSAGE}-byte limit"
        )));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len)))
}

/// Ends a stream whose head is already sent with the status as `{"error": {…}}`: a line
/// for NDJSON and result lines (grpc-gateway's), the array's last element for a JSON
/// array.
async fn finish_stream_error(
    io: &mut impl JsonIo,
    format: StreamFormat,
    code: u32,
    message: &str,
) -> std::result::Result<(), ReplyError> {
    let error = serde_json::to_vec(
        &serde_json::json!({"error": {"code": code, "message": message, "details": []}}),
    )
    .unwrap_or_default();
    let mut out = match format {
        StreamFormat::JsonArray => stream_item(format, false, error),
        _ => error,
    };
    out.push(match format {
        StreamFormat::JsonArray => b']',
        _ => b'\n',
    });
    let _ = io.write_body(Bytes::from(out), true).await;
    Ok(())
}

async fn write_head(
    io: &mut impl JsonIo,
    ctx: &RequestCtx,
    status: u16,
    content_type: &str,
    len: Option<usize>,
    shown: &[(String, HeaderValue)],
) -> Result<()> {
    let mut h = match len {
        Some(n) => reply::json_header(status, n),
        None => {
            let mut h = reply::json_header(status, 0);
            h.remove_header(&CONTENT_LENGTH);
            h
        }
    };
    h.insert_header(CONTENT_TYPE, content_type)?;
    for (k, v) in shown {
        h.append_header(k.clone(), v.clone())?;
    }
    response_head::edit(ctx, &mut h)?;
    io.write_head(h).await
}

/// `reply::json_header(200, len)`, copied from one built once per thread: building a
/// head (its fields and their case) costs several times the copy.
fn ok_json_header(len: usize) -> ResponseHeader {
    thread_local! {
        static OK: ResponseHeader = reply::json_header(200, 0);
    }
    let mut h = OK.with(ResponseHeader::clone);
    // The field is there: its value changes in place, where `json_header` put it.
    let _ = h.insert_header(CONTENT_LENGTH, len);
    h
}

async fn write_json(
    io: &mut impl JsonIo,
    ctx: &RequestCtx,
    status: u16,
    body: Vec<u8>,
    shown: &[(String, HeaderValue)],
) -> Result<()> {
    // The everyday answer: a driver that writes its heads as lines renders it without
    // building a header map (~3,600 instructions a call on the HTTP/1 engine).
    if status == 200 && shown.is_empty() && io.write_ok(ctx, &body).await? {
        return Ok(());
    }
    let mut h = if status == 200 {
        ok_json_header(body.len())
    } else {
        reply::json_header(status, body.len())
    };
    for (k, v) in shown {
        h.append_header(k.clone(), v.clone())?;
    }
    response_head::edit(ctx, &mut h)?;
    io.write_head(h).await?;
    io.write_body(Bytes::from(body), true).await
}

async fn transcode_error(
    io: &mut impl JsonIo,
    ctx: &mut RequestCtx,
    e: &TranscodeError,
) -> Result<()> {
    let (http, code) = e.status();
    ctx.cause = Some(match http {
        404 => Cause::NoRoute,
        _ => Cause::BadRequest,
    });
    let body = status::error_body(code, &e.to_string(), Vec::new());
    write_json(io, ctx, http, body, &[]).await
}

/// (HTTP status, gRPC code) of busbar's own answer for `cause` on a JSON route: the
/// gRPC status a gRPC client would have seen (a service that cannot be reached is
/// `UNAVAILABLE`, 503, as grpc-gateway and Envoy answer), the HTTP status its code maps
/// to. Refusals of the caller's own HTTP request, which no gRPC call would have made,
/// keep their HTTP status.
fn translated(cause: Cause) -> (u16, u32) {
    let code = match cause {
        Cause::NoRoute => 5,
        Cause::NoHealthyInstance
        | Cause::ConnectFailed
        | Cause::UpstreamCertificate
        | Cause::UpstreamError => 14,
        Cause::UpstreamTimeout | Cause::BodyTimeout => 4,
        Cause::BodyTooLarge => 8,
        Cause::BadRequest | Cause::DuplicateAuthorization | Cause::AmbiguousPath => 3,
        Cause::Admission(k) => match k.status() {
            401 => 16,
            403 => 7,
            429 => 8,
            _ => 14,
        },
        Cause::LoopDetected => 10,
    };
    match cause {
        Cause::BodyTooLarge | Cause::BodyTimeout | Cause::Admission(_) | Cause::LoopDetected => {
            (cause.status(), code)
        }
        _ => (status::http_status(code), code),
    }
}

/// busbar's own answer for `cause` (named by the phases), in the translation's shape.
async fn answer(io: &mut impl JsonIo, ctx: &mut RequestCtx, cause: Cause) -> Result<()> {
    ctx.cause = Some(cause);
    let (http, code) = translated(cause);
    let body = status::error_body(code, cause.message(), Vec::new());
    write_json(io, ctx, http, body, &[]).await
}

/// The try failed on the upstream's side: the cause the phases named.
async fn upstream_failed(io: &mut impl JsonIo, ctx: &mut RequestCtx) -> Result<()> {
    let cause = fail::cause_of(ctx, Failure::Upstream).unwrap_or(Cause::UpstreamError);
    answer(io, ctx, cause).await
}

/// The reply could not be translated: the gRPC `code` a client would report, and why.
async fn bad_gateway(
    io: &mut impl JsonIo,
    ctx: &mut RequestCtx,
    code: u32,
    why: &str,
) -> Result<()> {
    ctx.cause = Some(Cause::UpstreamError);
    let body = status::error_body(code, why, Vec::new());
    write_json(io, ctx, status::http_status(code), body, &[]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_that_cannot_be_reached_is_unavailable() {
        for c in [
            Cause::ConnectFailed,
            Cause::NoHealthyInstance,
            Cause::UpstreamError,
        ] {
            assert_eq!(translated(c), (503, 14), "{c:?}");
        }
        assert_eq!(translated(Cause::UpstreamTimeout), (504, 4));
        assert_eq!(translated(Cause::BodyTooLarge), (413, 8));
    }

    #[test]
    fn stream_formats() {
        let j = || b"{\"a\":1}".to_vec();
        assert_eq!(stream_item(StreamFormat::Ndjson, true, j()), b"{\"a\":1}\n");
        assert_eq!(
            stream_item(StreamFormat::ResultLines, true, j()),
            b"{\"result\":{\"a\":1}}\n"
        );
        assert_eq!(
            stream_item(StreamFormat::JsonArray, true, j()),
            b"[{\"a\":1}"
        );
        assert_eq!(
            stream_item(StreamFormat::JsonArray, false, j()),
            b",{\"a\":1}"
        );
        assert_eq!(stream_end(StreamFormat::JsonArray, true), Some(&b"[]"[..]));
        assert_eq!(stream_end(StreamFormat::Ndjson, true), None);
    }
}
