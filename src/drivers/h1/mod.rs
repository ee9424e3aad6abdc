//! busbar's own HTTP/1.1 engine for the everyday request: a plaintext HTTP/1.1 request
//! without a body, on a route that proxies to an HTTP/1 service (cleartext or `https`: the
//! upstream connection is then TLS, `upstream::connect`) with no translation
//! (admission included). Everything else goes to the pingora driver, unchanged.
//!
//! pingora 0.9's proxy loop costs several times what a plain tokio proxy costs per
//! request here (measured in `load-tests/RESULTS.md`): a boxed future per phase, two
//! channels, and a task per pooled connection. This engine does the same work in one
//! task: the head the front door has already read is parsed once (httparse), the
//! upstream connection comes from a per-thread pool (`pool`), and the response goes back
//! as it is read.
//!
//! Files: `request` (request codec), `response` + `framing` (response codec, chunk
//! scanner), `client` (client I/O), `upstream` (one try's upstream I/O), `pool`, `head`
//! (the front door's head check), and this one: the orchestration, a thin loop over the
//! phases.
//! Owns: HTTP/1.1 framing on both sides for these requests. An answer that breaks
//! `framing`'s rules is a 502, or, once its head went out, a client connection closed;
//! never bytes passed on that busbar could not frame.
//! Must not: hold policy. Route, admission, tries, retries, outlier detection, header
//! edits, metrics and the access log are the phases' (`phases::Phases`), the same calls
//! the pingora driver makes.

pub mod framing;
pub mod head;
pub mod pool;

mod client;
mod request;
mod response;
mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use pingora_http::RequestHeader;
use tokio::io::AsyncReadExt;

use crate::admission::Refused;
use crate::base::deadline::within;
use crate::config::Protocol;
use crate::phases::ctx::RequestCtx;
use crate::phases::fail::{self, Failure};
use crate::phases::request::{self as phase, RequestPath};
use crate::phases::response_head::{self, Form};
use crate::phases::setup::{admission_parts, admission_policy};
use crate::phases::upstream_head::{self, Output};
use crate::phases::{Done, Phases, Routing};
use crate::proxy::reply::Cause;
use crate::routing::Route;
use crate::snapshot::{Snapshot, State};
pub use client::ClientStream;
use client::{Downstream, Served};
use framing::ChunkScan;
use head::HeadLimits;
use response::{finish_head, upstream_header, write_head, Framing};
use upstream::{one_try, Ask, TryFail, BUF};

/// Most header lines in a request or response head this path parses; a head with more
/// goes to pingora (request) or is refused as a bad upstream response.
const MAX_HEADERS: usize = 128;
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

/// Parses ([`parse`]) and routes a complete head. `None`: not a request for this path
/// (a body, an upgrade, `Expect`, HTTP/1.0, absolute form, more than [`MAX_HEADERS`]
/// lines, a `;` in the path, a translating route, an h2c service…), or a head the front
/// door must judge; the caller checks it and hands it to pingora, which sees the same
/// bytes.
pub fn take(state: &State, head: &[u8], limits: &HeadLimits) -> Option<Box<FastRequest>> {
    // One copy of the head; the path and the header values are slices of it.
    let head = Bytes::copy_from_slice(head);
    let (req, close) = request::parse(&head, limits)?;
    debug_assert_eq!(
        head::check(&head, limits),
        Ok(head::Body::Length(0)),
        "the own path took a head the front door refuses: {head:?}"
    );
    let snapshot = state.load();
    let path = phase::request_path(&req);
    if path.literal.is_some() {
        // `;` in the path: two readings for the ACL, perhaps two routes. The proxy's
        // phases judge those (rare) paths.
        return None;
    }
    let normalized = path.normalized;
    let found = phase::lookup_route(&snapshot, &req, normalized.as_deref());
    let route = match found {
        None => None,
        Some((route, fallback)) => {
            // https services too: the upstream connection is TLS (`upstream::connect`).
            let plain = matches!(
                route.service.config.protocol,
                Protocol::Http1 | Protocol::Https
            ) && !crate::translate::translates(&snapshot, &route);
            if !plain {
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
        normalized,
        close,
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
            let body = rejection.body();
            let keep_alive = down.keep_alive;
            Err(down
                .reply(rejection.header(body.len()), body, keep_alive)
                .await)
        }
    }
}

/// Serves one request [`take`] accepted, on `client`: a connection from `peer` (the
/// PROXY header's client, when one was read), over TLS if `tls`. `draining`: the node is
/// shutting down, so the connection closes after this response. `pipelined`: the client
/// has already sent bytes past this request. Returns whether the client connection may
/// carry another request.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S: ClientStream>(
    phases: &Phases,
    client: &mut S,
    peer: Option<SocketAddr>,
    tls: bool,
    request: Box<FastRequest>,
    draining: bool,
    pipelined: bool,
) -> bool {
    // The request stays in its box (the snapshot and the route are moved out): inline,
    // it would be part of this future, copied whole when the connection boxes it.
    let mut request = request;
    let (snapshot, route, close) = (request.snapshot, request.route, request.close);
    let normalized = request.normalized.take();
    let req = &mut request.req;
    // What the access log records of the request as it came (the request itself goes
    // upstream, edited): cheap clones of shared bytes.
    let (method, uri, host) = (
        req.method.clone(),
        req.uri.clone(),
        req.headers.get(http::header::HOST).cloned(),
    );
    let mut ctx = RequestCtx::new();
    let limit = snapshot.config.limits.client_timeout;
    // `take` routed the request (and took it only with one reading of its path).
    let routing = Routing::Found {
        route,
        path: RequestPath {
            normalized,
            ..RequestPath::default()
        },
    };
    let set_up = phases.setup(&mut ctx, snapshot, req, peer.map(|a| a.ip()), routing);
    let real = ctx.client;
    let mut down = Downstream {
        client,
        peer,
        tls,
        keep_alive: !close && !draining,
        watch: !pipelined,
        limit,
    };
    let served = match set_up {
        Err(cause) => {
            let keep_alive = down.keep_alive;
            down.answer(&mut ctx, cause, keep_alive).await
        }
        Ok((route, path)) => {
            let admitted = match admission_policy(&ctx, &route) {
                None => Ok(()),
                Some(p) => admit(phases, &p, &mut down, req, &path, &mut ctx).await,
            };
            match admitted {
                Ok(()) => {
                    phases.plan(&mut ctx, req, &route);
                    exchange(phases, &mut down, &route, req, &mut ctx).await
                }
                Err(served) => served,
            }
        }
    };
    phases.finish(
        &mut ctx,
        &Done {
            method: method.as_str(),
            host: phase::host_of(&uri, host.as_ref()),
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

/// The tries, the response head and the body.
async fn exchange<S: ClientStream>(
    phases: &Phases,
    down: &mut Downstream<'_, S>,
    route: &Route,
    req: &mut RequestHeader,
    ctx: &mut RequestCtx,
) -> Served {
    let client_ip: Option<IpAddr> = down.peer.map(|a| a.ip());
    let mut wire = Vec::with_capacity(512);
    let conn = upstream_head::Downstream {
        peer: client_ip,
        tls: down.tls,
        h2: false,
    };
    if upstream_head::build(ctx, req, conn, Output::Wire(&mut wire)).is_err() {
        return down.answer(ctx, Cause::BadRequest, false).await;
    }
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
        head_by: ctx
            .deadline
            .unwrap_or_else(|| Instant::now() + route.service.config.timeout),
    };
    let mut buf = Vec::with_capacity(BUF);
    // The response head for the client, and the first of its body: one write.
    let mut out = Vec::with_capacity(512);
    let (mut up, key, mut head) = loop {
        let t = match phases.begin_try(ctx) {
            Ok(t) => t,
            Err(cause) => return down.answer(ctx, cause, false).await,
        };
        crate::otel::retrace(&mut wire, ctx);
        let ask = Ask { wire: &wire, ..ask };
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
            Ok((up, head)) => break (up, pool::Key::of(&t), head),
            Err(TryFail::Connect { timed_out }) => phases.on_connect_failure(ctx, timed_out),
            Err(TryFail::Certificate) => phases.on_certificate_failure(ctx),
            Err(TryFail::Trip { timed_out }) => {
                phases.on_try_failure(ctx, true, timed_out, ask.idempotent, false)
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
            Err(_) => return upstream_broke(phases, ctx, down).await,
        },
        _ => (body.len(), None),
    };
    let keep_alive = down.keep_alive && head.framing != Framing::Close;
    if edits || head.nominates {
        let Ok(mut resp) = upstream_header(&buf[..head.len]) else {
            return upstream_broke(phases, ctx, down).await;
        };
        if response_head::edit(ctx, &mut resp).is_err() {
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
                    phases.on_try_failure(ctx, true, timed_out, false, false);
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
