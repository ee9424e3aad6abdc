//! busbar's own HTTP/1 engine for the everyday request: an HTTP/1.1 or HTTP/1.0 request
//! (plaintext or TLS), with or without a body (`Content-Length` or chunked, `Expect:
//! 100-continue` or any other expectation), or an upgrade (WebSocket: a `101` answer
//! opens a tunnel, `drivers::tunnel`), in origin or absolute form (`HTTP_PROXY`
//! clients), with `Connection` naming headers to drop, a `;` in its path, as many header
//! lines as `limits.max_headers` allows, `OPTIONS *` included, on a route that proxies
//! to an HTTP/1 service (cleartext or `https`: the upstream connection is then TLS,
//! `upstream::connect`), or to an `h2c` / `h2` service (`to_h2`: a stream of
//! `drivers::h2::pool`; gRPC-Web routes there, with their codec), admission included;
//! and a JSON caller of a JSON→gRPC route (answered by the route's gRPC call,
//! `drivers::json_grpc`, through `json`; its plain gRPC callers go to its service as any
//! request does). An upgrade to an HTTP/2 service or on a JSON→gRPC route goes to the
//! pingora driver, unchanged.
//!
//! pingora 0.9's proxy loop costs several times what a plain tokio proxy costs per
//! request here (measured in `load-tests/RESULTS.md`): a boxed future per phase, two
//! channels, and a task per pooled connection. This engine does the same work in one
//! task: the head the front door has already read is parsed once (httparse), the
//! upstream connection comes from a per-thread pool (`pool`), and the response goes back
//! as it is read.
//!
//! Files: `request` (request codec), `body` (the request body: held, streamed, paced),
//! `response` + `framing` (response codec, the chunk scanner both directions share),
//! `client` (client I/O), `upstream` (one try's upstream I/O), `pool`, `head` (the
//! front door's head check), `switch` (an upgrade's `101` and the tunnel after it),
//! `to_h2` (a request to an HTTP/2 service), `json` (a JSON→gRPC call's caller on this
//! engine), and this one: the orchestration, a thin loop over the phases.
//! Owns: HTTP/1 framing on both sides for these requests. An answer that breaks
//! `framing`'s rules is a 502, or, once its head went out, a client connection closed;
//! never bytes passed on that busbar could not frame. A request body that breaks them is
//! a 400 that reaches no upstream when busbar holds it whole, and cuts the upstream
//! connection when it is found while streaming. An HTTP/1.0 client gets no 1xx and no
//! chunked framing (a chunked answer goes to it as plain data, ended by the close).
//! Must not: hold policy. Route, admission, tries, retries, outlier detection, header
//! edits, metrics and the access log are the phases' (`phases::Phases`), the same calls
//! the pingora driver makes.

pub mod fields;
pub mod framing;
pub mod head;
pub mod pool;

// `body`, `request`, `response` and `upstream` are shared with the HTTP/2 engine
// (`drivers::h2`), which reaches HTTP/1 services through them.
pub(crate) mod body;
mod client;
mod json;
pub(crate) mod request;
pub(crate) mod response;
mod switch;
mod to_h2;
pub(crate) mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use pingora_core::server::ShutdownWatch;
use pingora_http::RequestHeader;
use tokio::io::AsyncReadExt;

use crate::admission::Refused;
use crate::base::deadline::within;
use crate::config::Protocol;
use crate::phases::ctx::RequestCtx;
use crate::phases::fail::{self, Failure};
use crate::phases::forwarding::Peer;
use crate::phases::request::{self as phase, RequestPath};
use crate::phases::response_head::{self, Form};
use crate::phases::setup::{self, admission_parts, admission_policy};
use crate::phases::upstream_head::{self, Output};
use crate::phases::{Done, Phases, Routing};
use crate::proxy::reply::Cause;
use crate::routing::Route;
use crate::snapshot::{Snapshot, State};
use crate::translate::Translation;
use body::{BodyFail, RequestBody, Streamer};
pub use client::ClientStream;
use client::{Downstream, Served};
use framing::ChunkScan;
use head::HeadLimits;
use request::BodyFraming;
use response::{finish_head, upstream_header, write_head, Framing};
use upstream::{one_try, Ask, TryFail, BUF};

/// Most header lines in a response head this path parses (a head with more is refused as
/// a bad upstream response), and the room a request head gets on the stack (one with
/// more lines, within `limits.max_headers`, gets it on the heap: `request::parse`).
const MAX_HEADERS: usize = 128;
/// A request this path serves, parsed and routed by [`take`].
pub struct FastRequest {
    req: RequestHeader,
    snapshot: Arc<Snapshot>,
    route: Option<Arc<Route>>,
    /// The readings of the path routing and ACLs judge (a `;` gives two).
    path: RequestPath,
    /// The client said `Connection: close` (or spoke HTTP/1.0 without keep-alive).
    close: bool,
    body: BodyFraming,
    /// The client speaks HTTP/1.0.
    http10: bool,
    /// The client may wait for `100 Continue` before it sends the body.
    expect: bool,
    /// An upgrade busbar passes on (`request::Parsed::upgrade`).
    upgrade: bool,
    /// The headers `Connection` names: removed before the request goes upstream.
    nominated: Vec<http::HeaderName>,
    /// The names of its header lines, for the phases (`RequestCtx::names`).
    names: crate::base::http::Names,
}

/// The buffers of an exchange with an HTTP/1 upstream, kept by a busy connection from one
/// request to the next (`edge::Edge::busy`): each request took them from the allocator
/// (the 4 KiB read buffer through mimalloc's slow path), ~300 instructions a request.
/// A buffer a large head or body grew is freed after its request ([`Scratch::settle`]).
#[derive(Default)]
pub struct Scratch {
    /// The upstream request head, and the body's first bytes after it.
    wire: Vec<u8>,
    /// The upstream's response as it is read.
    buf: Vec<u8>,
    /// The response head for the client, and the first of its body.
    out: Vec<u8>,
    /// busbar's forwarding lines for this connection's peer, rendered for its first
    /// request (its address and scheme do not change): ~650 instructions a request.
    peer: Option<Peer>,
}

impl Scratch {
    /// Largest buffer kept for the next request.
    const KEEP: usize = 16 * 1024;

    /// After a request: what grew past [`Scratch::KEEP`] goes back to the allocator.
    fn settle(&mut self) {
        for b in [&mut self.wire, &mut self.buf, &mut self.out] {
            b.clear();
            if b.capacity() > Scratch::KEEP {
                *b = Vec::new();
            }
        }
    }
}

/// Parses ([`parse`]) and routes a complete head. `None`: not a request for this path
/// (an upgrade to an HTTP/2 service or on a JSON→gRPC route), or a head the front door
/// must judge (and nearly always refuse: `request::parse`); the caller checks it and
/// hands it to pingora, which sees the same bytes.
pub fn take(state: &State, head: &[u8], limits: &HeadLimits) -> Option<Box<FastRequest>> {
    // One copy of the head; the path and the header values are slices of it.
    let head = Bytes::copy_from_slice(head);
    let parsed = request::parse(&head, limits)?;
    debug_assert_eq!(
        head::check(&head, limits),
        Ok(match parsed.body {
            BodyFraming::None => head::Body::Length(0),
            BodyFraming::Length(n) => head::Body::Length(n),
            BodyFraming::Chunked => head::Body::Chunked,
        }),
        "the own path took a head the front door refuses or frames otherwise: {head:?}"
    );
    let req = parsed.req;
    let snapshot = state.load();
    // A `;` in the path gives it two readings: setup refuses one whose readings pick two
    // routes, and admission judges both (`Routing::Found`).
    let path = phase::request_path(&req);
    let found = phase::lookup_route(&snapshot, &req, path.normalized.as_deref());
    let route = match found {
        None => None,
        Some((route, fallback)) => {
            // Every protocol: https (the upstream connection is TLS, `upstream::connect`),
            // h2c and h2 (`to_h2`), but no upgrade to an HTTP/2 service (RFC 9113 §8.6).
            // A JSON→gRPC route's JSON callers are answered by its gRPC call (`json`);
            // its plain gRPC callers go through as any request to its service (`to_h2`).
            let h2 = matches!(route.service.config.protocol, Protocol::H2c | Protocol::H2);
            let json = matches!(
                crate::translate::of(&snapshot, &route),
                Some(Translation::Json(_))
            );
            if parsed.upgrade && (h2 || json) {
                return None;
            }
            if fallback {
                phase::count_fallback(&route, &req);
            }
            Some(route)
        }
    };
    Some(Box::new(FastRequest {
        req,
        snapshot,
        route,
        path,
        close: parsed.close,
        body: parsed.body,
        http10: parsed.http10,
        expect: parsed.expect,
        upgrade: parsed.upgrade,
        nominated: parsed.nominated,
        names: parsed.names,
    }))
}

/// Admission on this connection: the route's policy, its waits raced against the
/// client leaving ([`Downstream::left`]). `Err` is the request's outcome when it is not
/// let through.
async fn admit<S: ClientStream>(
    phases: &Phases,
    policy: &crate::admission::RoutePolicy,
    down: &mut Downstream<'_, S>,
    req: &RequestHeader,
    path: &RequestPath,
    ctx: &mut RequestCtx,
) -> Result<(), Served> {
    let checked = policy.check(&admission_parts(ctx, down.peer.map(|a| a.ip()), req, path));
    match phases.admit(ctx, policy, checked, down.left()).await {
        Ok(()) => Ok(()),
        Err(Refused::ClientGone(_)) => Err(Served::nothing()),
        Err(Refused::Rejected(rejection)) => {
            let (head, body) = fail::refuse(ctx, &rejection);
            let keep_alive = down.keep_alive;
            Err(down.reply(head, body, keep_alive).await)
        }
    }
}

/// Serves one request [`take`] accepted, on `client`: a connection from `peer` (the
/// PROXY header's client, when one was read), over TLS if `tls`. `shutdown`: the server's
/// watch; once the node drains, the connection closes after this response (and a tunnel
/// an upgrade opened gets the grace period). `conn`: what the front
/// door read past the head (the body's first bytes, or the client's next, pipelined
/// request); the body is taken from it, and what the client sent past the body is left
/// in it. `scratch`: the connection's buffers for the upstream exchange. Returns whether
/// the client connection may carry another request.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S: ClientStream>(
    phases: &Phases,
    client: &mut S,
    peer: Option<SocketAddr>,
    tls: bool,
    request: Box<FastRequest>,
    shutdown: &ShutdownWatch,
    conn: &mut Vec<u8>,
    scratch: &mut Scratch,
) -> bool {
    let draining = *shutdown.borrow();
    // The request stays in its box (the snapshot and the route are moved out): inline,
    // it would be part of this future, copied whole when the connection boxes it.
    let mut request = request;
    let (snapshot, route, close) = (request.snapshot, request.route, request.close);
    let (framing, http10, expect) = (request.body, request.http10, request.expect);
    let upgrade = request.upgrade.then_some(shutdown);
    let path = std::mem::take(&mut request.path);
    let nominated = std::mem::take(&mut request.nominated);
    let req = &mut request.req;
    // What the access log records of the request as it came (the request itself goes
    // upstream, edited): cheap clones of shared bytes. `Host` only for a log that is on:
    // nothing else reads it (a map lookup and a clone a request, ~150 instructions).
    let logged = phases.access_log.enabled();
    let (method, uri) = (req.method.clone(), req.uri.clone());
    let host = match logged {
        true => req.headers.get(http::header::HOST).cloned(),
        false => None,
    };
    let mut ctx = RequestCtx::new();
    // The one record of the connection's TLS: `X-Forwarded-Proto`, `Forwarded` and the
    // access log's protocol read it.
    ctx.tls = tls;
    ctx.names = request.names;
    let limits = snapshot.config.limits;
    let limit = limits.client_timeout;
    let pace = crate::phases::pace::BodyPace::new(limits.client_timeout, limits.body_min_rate);
    // `take` routed the request; setup judges the readings of its path.
    let routing = Routing::Found { route, path };
    let set_up = phases.setup(&mut ctx, snapshot, req, peer.map(|a| a.ip()), routing);
    // Where the body ends in what the front door read, if it is all there.
    let held = RequestBody::new(framing, u64::MAX, pace).whole_in(conn);
    let real = ctx.client;
    let mut down = Downstream {
        client,
        peer,
        keep_alive: !close && !draining,
        // Only when the body (if any) is all read, and nothing after it: the client's
        // socket then holds nothing but its next request, and watching it for a close
        // takes no byte of this request's body, nor puts one before a pipelined one.
        watch: held == Some(conn.len()),
        limit,
    };
    // An answer before the body was read: the connection goes on only if the body is
    // already whole in `conn` (it is dropped from there); otherwise the client may still
    // be sending it, and the connection closes (lingering) after the answer.
    let mut body = RequestBody::new(framing, u64::MAX, pace);
    let served = match set_up {
        Err(cause) => {
            down.keep_alive &= skip_held(&mut body, conn);
            let keep_alive = down.keep_alive;
            down.answer(&mut ctx, cause, keep_alive).await
        }
        // A declared length over the limit is refused before anything is read.
        Ok((route, _)) if matches!(framing, BodyFraming::Length(n) if n > route.config.max_body) => {
            down.answer(&mut ctx, Cause::BodyTooLarge, false).await
        }
        Ok((route, _)) if let Some(h) = setup::grpc_web(&mut ctx, req, &route) => {
            // A gRPC-Web route's CORS preflight.
            down.keep_alive &= skip_held(&mut body, conn);
            let keep_alive = down.keep_alive;
            down.reply(h, Bytes::new(), keep_alive).await
        }
        Ok((route, path)) => {
            let admitted = match admission_policy(&ctx, &route) {
                None => Ok(()),
                Some(p) => {
                    // A refusal keeps the connection only if it can drop the whole body.
                    let keep_alive = down.keep_alive;
                    let whole = held.is_some();
                    down.keep_alive &= whole;
                    let admitted = admit(phases, &p, &mut down, req, &path, &mut ctx).await;
                    if admitted.is_err() && whole {
                        skip_held(&mut body, conn);
                    }
                    down.keep_alive = keep_alive;
                    admitted
                }
            };
            match admitted {
                Ok(()) => {
                    // RFC 9110 §7.6.1: what `Connection` names stays on the client's hop
                    // (routing and admission saw it, as on pingora's path).
                    for name in &nominated {
                        req.remove_header(name);
                    }
                    phases.plan(&mut ctx, req, &route);
                    match crate::drivers::json_grpc::transcoder(&ctx, &route, req) {
                        Some(t) => {
                            // The call holds the body to `max_body`, refusing it in the
                            // translation's shape.
                            body = RequestBody::new(framing, u64::MAX, pace);
                            let (b, c) = (&mut body, &mut *conn);
                            // Boxed: a JSON call's state would otherwise be part of every
                            // request's future, which the connection moves into a box
                            // (`Edge::serve`), and so copied for every plain request.
                            let call = json::serve(
                                phases, &mut down, req, &mut ctx, &t, b, c, http10, expect,
                            );
                            Box::pin(call).await
                        }
                        None => {
                            body = RequestBody::new(framing, route.config.max_body, pace);
                            let mut sides = Sides {
                                body: &mut body,
                                conn,
                                http10,
                                expect,
                                upgrade,
                                scratch: &mut *scratch,
                            };
                            exchange(phases, &mut down, &route, req, &mut ctx, &mut sides).await
                        }
                    }
                }
                Err(served) => served,
            }
        }
    };
    scratch.settle();
    let served = Served {
        keep_alive: served.keep_alive && body.done(),
        ..served
    };
    ctx.body_bytes = match framing {
        // What a tunnel carried upstream, if the request opened one (`switch`).
        BodyFraming::None => ctx.body_bytes,
        BodyFraming::Length(n) => body.data_read(n),
        BodyFraming::Chunked => body.data_read(0),
    };
    phases.finish(
        &mut ctx,
        &Done {
            method: method.as_str(),
            host: match logged {
                true => phase::host_of(&uri, host.as_ref()),
                false => "",
            },
            path: uri.path(),
            query: uri.query(),
            client: phase::logged_client(peer, real),
            status: served.status,
            body_bytes: served.body_bytes,
            error: false,
        },
    );
    served.keep_alive
}

/// For an answer before the body was read: is the whole body already in `conn`? If so it
/// is dropped from there (and `body` is done), so the connection can go on.
fn skip_held(body: &mut RequestBody, conn: &mut Vec<u8>) -> bool {
    match body.feed(conn) {
        Ok(take) if body.done() => {
            conn.drain(..take);
            true
        }
        _ => false,
    }
}

/// The request's body and what the client side of the exchange needs to know of it.
struct Sides<'a> {
    body: &'a mut RequestBody,
    /// The connection's buffer: the body's first bytes; the next request after it.
    conn: &'a mut Vec<u8>,
    /// The client speaks HTTP/1.0: no 1xx, no chunked response.
    http10: bool,
    /// The client may wait for `100 Continue` before it sends the body.
    expect: bool,
    /// An upgrade: a `101` answer opens a tunnel, which the drain (this watch) bounds.
    upgrade: Option<&'a ShutdownWatch>,
    /// The connection's buffers for the exchange.
    scratch: &'a mut Scratch,
}

/// What busbar answers for a body that could not be read; nothing for a client that left.
async fn body_failed<S: ClientStream>(
    down: &mut Downstream<'_, S>,
    ctx: &mut RequestCtx,
    f: BodyFail,
) -> Served {
    let failure = match f {
        BodyFail::Malformed => Failure::ClientBad,
        BodyFail::TooLarge => Failure::BodyTooLarge,
        BodyFail::Slow => Failure::ClientBodyTimeout,
        BodyFail::Gone => Failure::ClientGone,
    };
    match fail::cause_of(ctx, failure) {
        Some(cause) => down.answer(ctx, cause, false).await,
        None => Served::nothing(),
    }
}

/// The tries, the response head and the body.
async fn exchange<S: ClientStream>(
    phases: &Phases,
    down: &mut Downstream<'_, S>,
    route: &Route,
    req: &mut RequestHeader,
    ctx: &mut RequestCtx,
    sides: &mut Sides<'_>,
) -> Served {
    if route.service.config.protocol.is_h2() {
        // Boxed: the HTTP/1 service's exchange is the everyday one, and this one's state
        // would otherwise be part of its future.
        return Box::pin(to_h2::exchange(phases, down, route, req, ctx, sides)).await;
    }
    let client_ip: Option<IpAddr> = down.peer.map(|a| a.ip());
    // The head, and after it the body's first bytes (up to `HOLD`): one upstream write.
    let held = match sides.body.declared() {
        Some(n) => n.min(body::HOLD as u64) as usize,
        None => sides.conn.len(),
    };
    let Scratch {
        wire,
        buf,
        out,
        peer,
    } = &mut *sides.scratch;
    wire.reserve(512 + held);
    let peer = match peer {
        Some(p) if p.is(client_ip, ctx.tls) => p,
        _ => peer.insert(Peer::new(client_ip, ctx.tls)),
    };
    let conn = upstream_head::Downstream {
        peer: client_ip,
        tls: ctx.tls,
        h2: false,
        rendered: Some(peer),
    };
    if upstream_head::build(ctx, req, conn, Output::Wire(wire)).is_err() {
        return down.answer(ctx, Cause::BadRequest, false).await;
    }
    let head_len = wire.len();
    // A client that waits for `100 Continue` has sent nothing of its body: nothing is
    // read before the upstream is asked.
    let mut waiting = sides.expect && sides.conn.is_empty() && !sides.body.done();
    if !sides.body.done() {
        let held = body::hold(sides.body, down.client, sides.conn, wire, !waiting);
        if let Err(f) = held.await {
            return body_failed(down, ctx, f).await;
        }
    }
    // The body did not fit what is held: the rest streams during the try.
    let streams = !sides.body.done();
    down.watch = !streams && sides.conn.is_empty();
    let mut chunk = Vec::new();
    // busbar's response headers: a route that edits them gets the upstream's as a map to
    // edit ([`response_head::edit`]); otherwise the upstream's lines go out as they
    // came, and busbar's own (admission's) are written after them.
    let (edits, rate) = match response_head::form(ctx) {
        Form::Map => (true, None),
        Form::Lines { rate } => (false, rate),
    };
    // The head is built once; a retry's client span id is patched into it (otel::retrace).
    let ask = Ask {
        wire: &[],
        head_request: req.method == Method::HEAD,
        idempotent: req.method.is_idempotent(),
        own_rate: rate.is_some(),
        upgrade: sides.upgrade.is_some(),
        head_by: ctx
            .deadline
            .unwrap_or_else(|| Instant::now() + route.service.config.timeout),
    };
    buf.reserve(BUF);
    // The response head for the client, and the first of its body: one write. Sized
    // when the head has come (`response::parse_head`).
    let (mut up, key, mut head) = loop {
        let t = match phases.begin_try(ctx) {
            Ok(t) => t,
            Err(cause) => return down.answer(ctx, cause, false).await,
        };
        crate::otel::retrace(&mut wire[..head_len], ctx);
        let ask = Ask { wire, ..ask };
        let metrics = &route.service.metrics;
        let mut started = false;
        let tried = if streams {
            // The client's socket carries the body: it is read by the pump, not watched.
            let mut st = Streamer {
                client: &mut *down.client,
                body: &mut *sides.body,
                conn: &mut *sides.conn,
                chunk: &mut chunk,
                waiting,
                continued: false,
                send_limit: down.limit,
                started: false,
                stopped: false,
            };
            let tried = one_try(&t, &ask, metrics, buf, out, Some(&mut st)).await;
            (started, waiting) = (st.started, st.waiting);
            tried
        } else {
            // A client that leaves while the upstream works ends the try (as in
            // pingora's path): its instance, and its admission slot, are free at once.
            tokio::select! {
                biased;
                r = one_try(&t, &ask, metrics, buf, out, None::<&mut Streamer<'_, S>>) => r,
                _ = down.left() => {
                    ctx.release_instance();
                    return Served::nothing();
                }
            }
        };
        let retry = match tried {
            Ok((up, head)) => break (up, pool::Key::of(&t), head),
            Err(TryFail::Connect { timed_out }) => phases.on_connect_failure(ctx, timed_out),
            Err(TryFail::Certificate) => phases.on_certificate_failure(ctx),
            // Sent again only while the whole body is still held.
            Err(TryFail::Trip { timed_out }) => {
                phases.on_try_failure(ctx, true, timed_out, ask.idempotent && !started, false)
            }
            Err(TryFail::Body(f)) => {
                phases.on_try_failure(ctx, false, false, false, false);
                return body_failed(down, ctx, f).await;
            }
            Err(TryFail::Malformed) => {
                phases.on_malformed_response(ctx);
                false
            }
        };
        if !retry {
            let cause = fail::cause_of(ctx, Failure::Upstream).unwrap_or(Cause::UpstreamError);
            return down.answer(ctx, cause, false).await;
        }
    };
    phases.on_response_head(ctx);
    if let Some(drain) = sides
        .upgrade
        .filter(|_| head.status == StatusCode::SWITCHING_PROTOCOLS)
    {
        let rate = rate.as_ref();
        // What the tunnel does not need is freed before it starts: it may last an hour.
        drop(chunk);
        *wire = Vec::new();
        let switched = switch::Switched {
            up,
            lines: std::mem::take(out),
            buf: std::mem::take(buf),
            head: &head,
            edits,
            rate,
        };
        return switch::switch(phases, down, route, ctx, sides.conn, switched, drain).await;
    }
    let status = head.status.as_u16();
    // Where the body ends in what came with the head, and for a chunked body, that what
    // came is chunked framing at all: a 502 can still be answered for it.
    let body = &buf[head.len..];
    let mut scan = (head.framing == Framing::Chunked).then(ChunkScan::default);
    // An HTTP/1.0 client cannot read chunked: it gets the data alone, and the close ends it.
    let dechunk = sides.http10 && head.framing == Framing::Chunked;
    let mut plain = Vec::new();
    let mut keep = |d: &[u8]| {
        if dechunk {
            plain.extend_from_slice(d);
        }
    };
    let (first, end) = match (head.framing, scan.as_mut()) {
        (Framing::None, _) => (0, Some(0)),
        (Framing::Length(n), _) if body.len() as u64 >= n => (n as usize, Some(n as usize)),
        (Framing::Chunked, Some(s)) => match s.feed_with(body, &mut keep) {
            Ok(fed) => (fed.pass, fed.end),
            Err(_) => return upstream_broke(phases, ctx, down).await,
        },
        _ => (body.len(), None),
    };
    // The client's connection goes on only if its whole request was read, and the
    // response has an end it can see.
    let keep_alive =
        down.keep_alive && sides.body.done() && head.framing != Framing::Close && !dechunk;
    if edits || head.nominates || dechunk {
        let Ok(mut resp) = upstream_header(&buf[..head.len]) else {
            return upstream_broke(phases, ctx, down).await;
        };
        if dechunk {
            resp.remove_header(&http::header::TRANSFER_ENCODING);
        }
        if response_head::edit(ctx, &mut resp).is_err() {
            return down.answer(ctx, Cause::UpstreamError, false).await;
        }
        out.clear();
        write_head(out, &mut resp, keep_alive);
    } else {
        finish_head(out, rate.as_ref(), keep_alive);
    }
    let first = if dechunk {
        out.extend_from_slice(&plain);
        plain.len()
    } else {
        out.extend_from_slice(&body[..first]);
        first
    };
    let mut sent = first;
    if !down.send(out).await {
        return Served::cut(status, 0);
    }
    plain.clear();
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
            let n = match within(t_read, up.read_buf(buf)).await {
                Ok(Ok(0)) if head.framing == Framing::Close => break,
                Ok(Ok(n)) if n > 0 => n,
                read => {
                    let timed_out = read.is_err();
                    phases.on_try_failure(ctx, true, timed_out, false, false);
                    return Served::cut(status, sent);
                }
            };
            // What of this read goes to the client, and how much of it is this body's.
            let (pass, take) = match (head.framing, scan.as_mut()) {
                (Framing::Chunked, Some(s)) => match s.feed_with(&buf[..n], |d| {
                    if dechunk {
                        plain.extend_from_slice(d);
                    }
                }) {
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
                        phases.on_malformed_response(ctx);
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
            let pass = if dechunk {
                let k = plain.len();
                if k > 0 && !down.send(&plain).await {
                    return Served::cut(status, sent);
                }
                plain.clear();
                k
            } else {
                if pass > 0 && !down.send(&buf[..pass]).await {
                    return Served::cut(status, sent);
                }
                pass
            };
            sent += pass;
            if remaining == 0 {
                // Trailers held back across reads go out with the body's end (not to an
                // HTTP/1.0 client, which has no place for them).
                if let Some(held) = scan.as_ref().filter(|_| !dechunk).map(ChunkScan::held) {
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
    phases.on_response_health(ctx, head.status);
    if head.reusable && !extra {
        pool::give_back(key, up);
    }
    Served {
        status,
        body_bytes: sent,
        keep_alive,
    }
}

/// The upstream's response could not be framed before anything went to the client:
/// counted against the instance, the client gets a 502 and its connection closes.
async fn upstream_broke<S: ClientStream>(
    phases: &Phases,
    ctx: &mut RequestCtx,
    down: &mut Downstream<'_, S>,
) -> Served {
    phases.on_malformed_response(ctx);
    down.answer(ctx, Cause::UpstreamError, false).await
}
