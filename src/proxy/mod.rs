//! The request path's phases, and the pingora `ProxyHttp` implementation that calls them
//! in request-path order.
//!
//! Owns: the phase wiring and the per-request context. Each phase is a short list of
//! calls into the module that owns the policy (routing, balance, health, metrics, log),
//! written as a function of the request and its context (`plan_tries`, `begin_try`,
//! `on_connect_failure`, `on_try_failure`, `on_response`, `response_headers`,
//! `upstream_request`, `finish`), so busbar's own HTTP/1.1 path (`edge::h1`) and
//! pingora's path run the same ones.
//! Must not: hold policy of its own beyond ordering those calls.

pub mod ctx;
pub mod headers;
pub mod reply;
pub mod trace;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, COOKIE, HOST};
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::authority::{is_http_family_scheme, raw_target_authority, RawTargetAuthority};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::accesslog::{AccessLog, Entry};
use crate::admission;
use crate::balance::hash_key;
use crate::config::{HashKey, Protocol};
use crate::edge::pace::BodyPace;
use crate::fallback;
use crate::health::state::now_ms;
use crate::metrics::{class_index, method_index, METRICS};
use crate::routing::{self, RequestView};
use crate::snapshot::{Snapshot, State};
use ctx::RequestCtx;
use reply::Cause;

/// Most concurrent streams busbar opens on one upstream h2c connection.
const UPSTREAM_H2_STREAMS: usize = 128;

#[derive(Clone)]
pub struct BusbarProxy {
    pub state: Arc<State>,
    pub access_log: Arc<AccessLog>,
}

/// Host of the request without its port: `:authority` / absolute-form first, then `Host`.
fn request_host(req: &RequestHeader) -> &str {
    match target_authority(req.raw_path()) {
        Some(authority) => strip_port(authority),
        None => host_of(&req.uri, req.headers.get(HOST)),
    }
}

/// The authority of an absolute-form HTTP request target (`GET http://orders/x`, a
/// client using busbar as its `HTTP_PROXY`), which names the host in place of `Host`
/// (RFC 9112 §3.2.2). pingora keeps such a target as it came and leaves it out of the
/// URI. One byte is looked at for the origin-form target nearly every request has.
fn target_authority(target: &[u8]) -> Option<&str> {
    if target.first() == Some(&b'/') {
        return None;
    }
    match raw_target_authority(target) {
        RawTargetAuthority::Absolute {
            scheme, authority, ..
        } if is_http_family_scheme(scheme) => std::str::from_utf8(authority).ok(),
        _ => None,
    }
}

/// [`request_host`] from a request's target and `Host` header.
pub(crate) fn host_of<'a>(uri: &'a http::Uri, host: Option<&'a http::HeaderValue>) -> &'a str {
    let raw = match uri.authority() {
        Some(a) => a.as_str(),
        None => host.and_then(|v| v.to_str().ok()).unwrap_or(""),
    };
    strip_port(raw)
}

fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return match h.find(']') {
            Some(end) => &h[..=end],
            None => h,
        };
    }
    // A plain loop from the back: `rfind(':')` (a char searcher) and `memrchr` cost
    // several times more on a host this short.
    match h.bytes().rposition(|b| b == b':') {
        Some(i) if h[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &h[..i],
        _ => h,
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .as_downstream()
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

fn is_tls(session: &Session) -> bool {
    session
        .as_downstream()
        .digest()
        .is_some_and(|d| d.ssl_digest.is_some())
}

fn cookie<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a [u8]> {
    req.headers.get_all(COOKIE).iter().find_map(|v| {
        v.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii_start();
            let (k, val) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
            (k == name.as_bytes()).then(|| &val[1..])
        })
    })
}

fn sticky_key(key: &HashKey, req: &RequestHeader, client_ip: Option<IpAddr>) -> u64 {
    match key {
        HashKey::Header(name) => req.headers.get(name).map_or(0, |v| hash_key(v.as_bytes())),
        HashKey::Cookie(name) => cookie(req, name).map_or(0, hash_key),
        HashKey::Path => hash_key(req.uri.path().as_bytes()),
        HashKey::ClientIp => match client_ip {
            Some(IpAddr::V4(ip)) => hash_key(&ip.octets()),
            Some(IpAddr::V6(ip)) => hash_key(&ip.octets()),
            None => 0,
        },
    }
}

/// TOML routes first; then, for a caller whose sidecar is down, the service its host names.
fn find_route(
    snapshot: &Snapshot,
    req: &RequestHeader,
    normalized: Option<&str>,
) -> Option<Arc<routing::Route>> {
    let (route, fallback) = lookup_route(snapshot, req, normalized)?;
    if fallback {
        count_fallback(&route, req);
    }
    Some(route)
}

/// The readings of a request's path that routing and ACLs see (`//admin`, `/a/../admin`
/// and `/a;x/admin` are `/admin`; see [`admission::normalize`]), each `None` when it
/// is the path as it came.
#[derive(Debug)]
pub(crate) struct RequestPath {
    /// The parameter-free reading: what routing and ACLs see.
    pub normalized: Option<String>,
    /// The literal reading, when it differs: ACLs judge it too.
    pub literal: Option<String>,
    /// The readings may pick different routes (see [`admission::Normalized::split`]).
    pub split: bool,
}

/// The [`RequestPath`] of `req`.
pub(crate) fn request_path(req: &RequestHeader) -> RequestPath {
    let n = admission::normalize(req.uri.path());
    RequestPath {
        normalized: match n.path {
            std::borrow::Cow::Borrowed(_) => None,
            std::borrow::Cow::Owned(p) => Some(p),
        },
        literal: n.literal,
        split: n.split,
    }
}

/// Do both readings of a path whose readings may part ([`RequestPath::split`]) pick
/// `route`? When they do not, which route's policy applies depends on how the
/// application reads the path: busbar refuses to guess.
fn readings_agree(
    snapshot: &Snapshot,
    req: &RequestHeader,
    path: &RequestPath,
    route: &Arc<routing::Route>,
) -> bool {
    !path.split
        || lookup_route(snapshot, req, path.literal.as_deref())
            .is_some_and(|(other, _)| Arc::ptr_eq(&other, route))
}

/// More than one `Authorization` field: busbar would verify one and the upstream might
/// read another, so such a request is refused (the field is not a list, RFC 9110 §5.3).
fn ambiguous_credentials(req: &RequestHeader) -> bool {
    let mut all = req.headers.get_all(http::header::AUTHORIZATION).iter();
    all.next().is_some() && all.next().is_some()
}

/// [`find_route`] without counting: the route, and whether it is a mesh-fallback one.
pub(crate) fn lookup_route(
    snapshot: &Snapshot,
    req: &RequestHeader,
    normalized: Option<&str>,
) -> Option<(Arc<routing::Route>, bool)> {
    let view = RequestView {
        host: request_host(req),
        path: normalized.unwrap_or(req.uri.path()),
        method: &req.method,
        headers: &req.headers,
    };
    if let Some(r) = snapshot.routes.find(&view) {
        return Some((r.clone(), false));
    }
    let r = fallback::route_for_host(
        &snapshot.mesh_routes,
        view.host,
        &snapshot.config.mesh.domains,
    )?;
    Some((r.clone(), true))
}

/// Counts a request the mesh fallback routed, by how the caller addressed it.
pub(crate) fn count_fallback(route: &routing::Route, req: &RequestHeader) {
    let m = &route.service.metrics;
    // Absolute-form (HTTP_PROXY) is an HTTP/1 request target; h2 always has a scheme.
    let target = req.raw_path();
    if req.version < http::Version::HTTP_2
        && (target.starts_with(b"http://") || target.starts_with(b"https://"))
    {
        &m.fallback_forward_proxy
    } else {
        &m.fallback_host
    }
    .inc();
}

/// The request's `Content-Length`, when it declares a valid one.
pub(crate) fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Answers the request with busbar's own reply for `cause`.
async fn answer(session: &mut Session, ctx: &mut RequestCtx, cause: Cause) -> Result<bool> {
    ctx.cause = Some(cause);
    reply::respond(session, cause).await?;
    Ok(true)
}

/// What busbar writes into every upstream request head, for the proxy and for the
/// JSON→gRPC call alike: the verified identity (or the removal of a client-sent one),
/// forwarding headers, the trace context and the route's header edits.
pub fn upstream_headers(
    session: &Session,
    ctx: &RequestCtx,
    upstream: &mut RequestHeader,
) -> Result<()> {
    upstream_headers_for(ctx, upstream, client_ip(session), is_tls(session))
}

/// The verified identity in the upstream request, or the removal of a client-sent one.
fn identity(ctx: &RequestCtx, upstream: &mut RequestHeader) -> Result<()> {
    if let Some((name, user)) = clear_identity(ctx, upstream) {
        upstream.insert_header(name.clone(), user)?;
    }
    Ok(())
}

/// Removes a client-sent identity header (and applies admission's normalised path);
/// returns the verified identity busbar sends instead, if there is one.
fn clear_identity<'c>(
    ctx: &'c RequestCtx,
    upstream: &mut RequestHeader,
) -> Option<(&'c HeaderName, &'c str)> {
    match &ctx.admitted {
        Some(a) => {
            a.clear_upstream(upstream);
            a.identity()
        }
        None => {
            admission::strip_identity(upstream);
            None
        }
    }
}

/// The peer is one of `listen.trusted_proxies`: its forwarding chains go on upstream.
fn peer_trusted(ctx: &RequestCtx, peer: Option<IpAddr>) -> bool {
    match (ctx.snapshot.as_deref(), peer) {
        (Some(s), Some(p)) => {
            let list = &s.config.listen.trusted_proxies;
            !list.is_empty() && crate::client_addr::trusted(p, list)
        }
        _ => false,
    }
}

/// The real client of a request from `peer` (see `client_addr`).
pub(crate) fn real_client(
    snapshot: &Snapshot,
    peer: Option<IpAddr>,
    req: &RequestHeader,
) -> Option<IpAddr> {
    let list = &snapshot.config.listen.trusted_proxies;
    peer.map(|p| crate::client_addr::real_client(p, &req.headers, list))
}

/// What the access log calls the client: the peer's address and port, or the real
/// client's address (port 0: unknown) when a trusted proxy named it.
pub(crate) fn logged_client(
    peer: Option<std::net::SocketAddr>,
    client: Option<IpAddr>,
) -> Option<std::net::SocketAddr> {
    match (peer, client) {
        (Some(p), Some(c)) if p.ip() != c => Some(std::net::SocketAddr::new(c, 0)),
        _ => peer,
    }
}

/// [`upstream_headers`] for a request on a connection with this client and TLS state.
pub(crate) fn upstream_headers_for(
    ctx: &RequestCtx,
    upstream: &mut RequestHeader,
    client_ip: Option<IpAddr>,
    tls: bool,
) -> Result<()> {
    identity(ctx, upstream)?;
    headers::set_forwarded(upstream, client_ip, tls, peer_trusted(ctx, client_ip))?;
    upstream.append_header(
        crate::via::VIA_NAME,
        crate::via::node().value(ctx.client_version).clone(),
    )?;
    upstream.insert_header(headers::TRACEPARENT_NAME, &ctx.trace.header_value()[..])?;
    if let Some(seen) = &ctx.seen {
        upstream.insert_header(crate::accesslog::REQUEST_ID, seen.request_id.clone())?;
    }
    if let Some(route) = &ctx.route {
        if !route.config.request_headers.is_empty() {
            headers::edit_request(upstream, &route.config.request_headers)?;
        }
    }
    Ok(())
}

fn upstream_error(cause: Cause, why: &'static str) -> Box<Error> {
    let mut e = Error::explain(ErrorType::HTTPStatus(cause.status()), why);
    e.esource = ErrorSource::Upstream;
    e
}

/// Is this upstream error pingora's verdict on an answer it cannot frame: a bad head or
/// `Content-Length`, a bad chunk or trailer section?
fn malformed(e: &Error) -> bool {
    match e.etype() {
        ErrorType::InvalidHTTPHeader => true,
        ErrorType::Custom(name) => matches!(*name, "InvalidChunk" | "InvalidTrailerEnd"),
        _ => false,
    }
}

/// Does the response carry at most one `Content-Length`, one value? pingora frames a
/// response whose values agree (`5, 5`, or two lines of `5`) by that value but would pass
/// the lines on as they came, for a lenient next hop to read otherwise; busbar's own path
/// refuses them, as nginx does, and so does this one.
fn one_content_length(resp: &ResponseHeader) -> bool {
    let mut values = resp.headers.get_all(CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(v), None) => !v.as_bytes().contains(&b','),
        _ => false,
    }
}

/// What a try needs to reach its instance (from [`BusbarProxy::begin_try`]).
pub(crate) struct Try {
    pub addr: std::net::SocketAddr,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

/// How a request ended, for [`BusbarProxy::finish`].
pub(crate) struct Done<'a> {
    /// The request as the client sent it: method, host (see [`host_of`]) and path.
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The query string as sent, for the access log.
    pub query: Option<&'a str>,
    pub client: Option<std::net::SocketAddr>,
    /// The status written to the client; 0 when none was.
    pub status: u16,
    pub body_bytes: usize,
    /// The request ended in an error busbar did not name with a cause.
    pub error: bool,
}

/// How long an idle upstream connection stays pooled.
pub(crate) const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

/// The headers busbar adds to and edits in every response: admission's (`RateLimit-*`),
/// the route's edits, and the translation's.
pub(crate) fn response_headers(ctx: &RequestCtx, resp: &mut ResponseHeader) -> Result<()> {
    if let Some(a) = &ctx.admitted {
        a.apply_response(resp);
    }
    if let Some(route) = &ctx.route {
        if !route.config.response_headers.is_empty() {
            headers::edit_response(resp, &route.config.response_headers)?;
        }
    }
    crate::translate::response(ctx, resp)
}

/// What [`response_headers`] adds to the response of a route that edits no response
/// headers and does not translate: admission's `RateLimit-*` values, if any. busbar's
/// own HTTP/1 path writes them as lines after the upstream's own.
pub(crate) fn response_rate(ctx: &RequestCtx) -> Option<admission::RateInfo> {
    ctx.admitted.as_ref().and_then(|a| a.rate)
}

/// The upstream request head from the client's: origin form, busbar's headers
/// ([`upstream_headers_for`]), the route's path rewrite and the translation's edits.
pub(crate) fn upstream_request(
    ctx: &RequestCtx,
    upstream: &mut RequestHeader,
    client_ip: Option<IpAddr>,
    tls: bool,
    downstream_h2: bool,
) -> Result<()> {
    let Some(route) = ctx.route.as_ref() else {
        return Ok(());
    };
    // HTTP/2 requests always carry :authority in the URI and have no Host to fall back on.
    if !downstream_h2 {
        origin_form(upstream)?;
    }
    upstream_headers_for(ctx, upstream, client_ip, tls)?;
    upstream_target(ctx, route, upstream)
}

/// A forward-proxy request (absolute-form: `GET http://orders/x?q`, from a client whose
/// `HTTP_PROXY` is busbar) goes to the instance in origin form, `GET /x?q`, with `Host`
/// from the target's authority (RFC 9112 §3.2.1, §3.2.2): the instance is an origin
/// server, and routes on the path it is given. Both request paths call it; an
/// origin-form request costs one byte compare.
fn origin_form(upstream: &mut RequestHeader) -> Result<()> {
    let target = upstream.raw_path();
    let (authority, path) = if target.first() == Some(&b'/') {
        match (upstream.uri.scheme(), upstream.uri.authority()) {
            // A URI that carries its authority (not how pingora 0.9 keeps an HTTP/1
            // target, but a request built another way may).
            (Some(_), Some(a)) => (a.as_str().as_bytes().to_vec(), target.to_vec()),
            _ => return Ok(()),
        }
    } else {
        match raw_target_authority(target) {
            RawTargetAuthority::Absolute {
                scheme,
                authority,
                path_and_query,
            } if is_http_family_scheme(scheme) => {
                // `http://orders` and `http://orders?q` ask for `/` and `/?q`.
                let mut path = Vec::with_capacity(path_and_query.len() + 1);
                if path_and_query.first() != Some(&b'/') {
                    path.push(b'/');
                }
                path.extend_from_slice(path_and_query);
                (authority.to_vec(), path)
            }
            _ => return Ok(()),
        }
    };
    let bad = |why: &'static str| {
        let mut e = Error::explain(ErrorType::InvalidHTTPHeader, why);
        e.esource = ErrorSource::Downstream;
        e
    };
    let host = HeaderValue::from_bytes(&authority).map_err(|_| bad("request-target authority"))?;
    // The raw bytes, not a `Uri`: a path that is not UTF-8 goes on as it came.
    upstream
        .set_raw_path(&path)
        .map_err(|_| bad("request-target path"))?;
    upstream.insert_header(HOST, host)
}

/// The route's path rewrite and the translation's edits of the upstream request.
fn upstream_target(
    ctx: &RequestCtx,
    route: &routing::Route,
    upstream: &mut RequestHeader,
) -> Result<()> {
    if let Some(pq) = upstream.uri.path_and_query() {
        if let Some(new) = routing::rewrite(&route.config, pq.as_str()) {
            let uri = http::Uri::try_from(new)
                .map_err(|e| Error::because(ErrorType::InternalError, "path rewrite", e))?;
            upstream.set_uri(uri);
        }
    }
    crate::translate::upstream_request(ctx, upstream)
}

/// [`upstream_request`] for busbar's own HTTP/1 path (plaintext, a route),
/// written into `wire` as an HTTP/1.1 head. When the route edits no request headers,
/// busbar's forwarding, `Via` and trace headers are written after the request's own
/// lines instead of being inserted into its map first: the same head, without six inserts.
pub(crate) fn upstream_request_h1(
    ctx: &RequestCtx,
    route: &routing::Route,
    upstream: &mut RequestHeader,
    client_ip: Option<IpAddr>,
    wire: &mut Vec<u8>,
) -> Result<()> {
    origin_form(upstream)?;
    let added = if route.config.request_headers.is_empty() {
        let identity = clear_identity(ctx, upstream);
        let chain = peer_trusted(ctx, client_ip);
        let forwarding = headers::Forwarding::of(upstream, client_ip, false, chain);
        headers::clear_forwarded(upstream);
        // Written below as one line, the value the access log has.
        if ctx.seen.is_some() {
            upstream.remove_header(&crate::accesslog::REQUEST_ID);
        }
        Some((forwarding, identity))
    } else {
        upstream_headers_for(ctx, upstream, client_ip, false)?;
        None
    };
    upstream_target(ctx, route, upstream)?;
    wire.extend_from_slice(upstream.method.as_str().as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(upstream.raw_path());
    wire.extend_from_slice(b" HTTP/1.1\r\n");
    upstream.header_to_h1_wire(wire);
    if let Some((forwarding, identity)) = added {
        if let Some((name, user)) = identity {
            // Checked as `insert_header` would: nothing may end the line early.
            if user.bytes().any(|b| b < b' ' && b != b'\t' || b == 0x7f) {
                return Err(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "identity value",
                ));
            }
            headers::line(wire, name.as_str().as_bytes(), user.as_bytes());
        }
        forwarding.write(wire);
        wire.extend_from_slice(crate::via::node().line(ctx.client_version));
        headers::line(
            wire,
            headers::TRACEPARENT_NAME.as_bytes(),
            &ctx.trace.header_value(),
        );
        if let Some(seen) = &ctx.seen {
            headers::line(
                wire,
                crate::accesslog::REQUEST_ID.as_str().as_bytes(),
                seen.request_id.as_bytes(),
            );
        }
    }
    wire.extend_from_slice(b"\r\n");
    Ok(())
}

impl BusbarProxy {
    /// Counts a failure against the instance and ejects it when its streak says so,
    /// unless that would eject more than the service allows.
    fn record_failure(&self, ctx: &RequestCtx, instance: &crate::registry::Instance) {
        let Some(route) = &ctx.route else { return };
        let svc = &route.service;
        let policy = &svc.config.outlier;
        if !instance.health.record_failure(policy) {
            return;
        }
        let set = svc.instances();
        let total = set.instances.len();
        let ejected = set
            .instances
            .iter()
            .filter(|i| i.health.state() == crate::health::state::HealthState::Ejected)
            .count();
        if (ejected + 1) * 100 > total * policy.max_ejected_percent as usize {
            return;
        }
        if instance.health.eject(policy, now_ms()) == crate::health::state::Transition::Ejected {
            svc.metrics.ejections.inc();
            svc.refresh_panic();
            tracing::warn!(service = svc.name(), instance = %instance.addr, "instance ejected by outlier detection");
        }
    }

    /// Everything before proxying, in request-path order: client timeouts, trace,
    /// route, body limit, CORS preflight, admission, then the plan for the tries.
    /// `Ok(true)` when busbar has answered the request itself.
    async fn prepare(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        snapshot: &Snapshot,
    ) -> Result<bool> {
        // Slow body, slow read: each read and write to the client must make progress,
        // and the body must keep its pace (`edge::pace`).
        let limits = &snapshot.config.limits;
        let client_timeout = Some(limits.client_timeout);
        session.as_downstream_mut().set_read_timeout(client_timeout);
        session
            .as_downstream_mut()
            .set_write_timeout(client_timeout);
        ctx.body_pace = BodyPace::new(limits.client_timeout, limits.body_min_rate);
        let req = session.req_header();
        ctx.client_version = req.version;
        let peer = client_ip(session);
        ctx.client = real_client(snapshot, peer, req);
        ctx.trace = trace::TraceContext::from_header(
            req.headers.get(&headers::TRACEPARENT).map(|v| v.as_bytes()),
        );
        ctx.seen = Some(crate::accesslog::Seen::from_headers(
            &req.headers,
            req.version,
            is_tls(session),
            &ctx.trace.trace_id_hex(),
        ));
        if ambiguous_credentials(req) {
            return answer(session, ctx, Cause::DuplicateAuthorization).await;
        }
        // Routing and ACLs see the normalised path: `//admin`, `/a/../admin` are `/admin`.
        let path = request_path(req);
        let Some(route) = find_route(snapshot, req, path.normalized.as_deref()) else {
            return answer(session, ctx, Cause::NoRoute).await;
        };
        if !readings_agree(snapshot, req, &path, &route) {
            return answer(session, ctx, Cause::AmbiguousPath).await;
        }
        ctx.route = Some(route.clone());
        // Before admission: a looping request spends no rate-limit token or queue slot.
        if crate::via::node().looped(&req.headers, limits.max_hops) {
            return answer(session, ctx, Cause::LoopDetected).await;
        }
        if declared_length(req).is_some_and(|n| n > route.config.max_body) {
            // The body was not read: the connection can't be reused for another request.
            session.as_downstream_mut().set_keepalive(None);
            return answer(session, ctx, Cause::BodyTooLarge).await;
        }
        if crate::translate::preflight(session, snapshot, &route).await? {
            return Ok(true);
        }
        if let Some(policy) = snapshot.admission.policy(route.name()).cloned() {
            let downstream = session.as_downstream_mut();
            // Waits (queue, cluster limit) end early if the client goes away.
            let (normalized, literal) = (path.normalized.as_deref(), path.literal.as_deref());
            let who = admission::Addresses {
                client: ctx.client,
                peer,
            };
            match admission::admit(&policy, downstream, who, normalized, literal).await {
                Ok(admitted) => ctx.admitted = Some(admitted),
                Err(refused) => {
                    let rejection = refused.into_rejection()?;
                    ctx.cause = Some(Cause::Admission(rejection.kind));
                    reply::reject(session, &rejection).await?;
                    return Ok(true);
                }
            }
        }
        self.plan_tries(session.req_header(), ctx.client, ctx, &route);
        Ok(false)
    }

    /// The deadline, sticky key, instance set and gray-release version for the tries.
    pub(crate) fn plan_tries(
        &self,
        req: &RequestHeader,
        client_ip: Option<IpAddr>,
        ctx: &mut RequestCtx,
        route: &routing::Route,
    ) {
        let svc = &route.service;
        svc.retry_budget.deposit();
        ctx.deadline = Some(ctx.start + route.config.timeout.unwrap_or(svc.config.timeout));
        if svc.config.balance == crate::config::BalancePolicy::Sticky {
            ctx.sticky_key = sticky_key(&svc.config.hash_key, req, client_ip);
        }
        ctx.set = Some(svc.instances());
        ctx.release = self.state.releases.begin(
            route.name(),
            ctx.set.as_deref(),
            &crate::release::Facts {
                headers: &req.headers,
                client_ip,
                user: ctx.admitted.as_ref().and_then(|a| a.user()),
            },
        );
    }

    /// Starts a try: picks its instance and path (sidecar or app port) and its timeouts
    /// within the request's deadline. The error is what answers the request when no try
    /// can start.
    pub(crate) fn begin_try(&self, ctx: &mut RequestCtx) -> Result<Try> {
        ctx.cause = None;
        let (Some(route), Some(_)) = (ctx.route.clone(), ctx.set.as_ref()) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no route in context",
            ));
        };
        let svc = &route.service;
        let now = Instant::now();
        let remaining = ctx
            .deadline
            .map_or(svc.config.timeout, |d| d.saturating_duration_since(now));
        if remaining.is_zero() {
            ctx.cause = Some(Cause::UpstreamTimeout);
            svc.metrics.timeouts.inc();
            return Err(upstream_error(
                Cause::UpstreamTimeout,
                "deadline passed before a try",
            ));
        }
        let Some((idx, instance)) = ctx.pick_instance() else {
            ctx.cause = Some(Cause::NoHealthyInstance);
            svc.metrics.no_instance.inc();
            return Err(upstream_error(
                Cause::NoHealthyInstance,
                "no healthy instance",
            ));
        };
        ctx.tried.push(idx);
        ctx.tries += 1;
        instance.health.begin_request();
        let (addr, path) = fallback::target(svc, &instance, now_ms());
        ctx.path = path;
        ctx.last_addr = Some(addr);
        ctx.instance = Some(instance);
        ctx.upstream_start = Some(now);
        Ok(Try {
            addr,
            connect_timeout: svc.config.connect_timeout.min(remaining),
            read_timeout: svc.config.read_timeout.min(remaining),
        })
    }

    /// A try could not connect. Switches a dead sidecar to its app port, counts the
    /// failure against the instance otherwise; says whether to try again.
    pub(crate) fn on_connect_failure(&self, ctx: &mut RequestCtx, timed_out: bool) -> bool {
        if let Some(instance) = ctx.release_instance() {
            if let Some(route) = &ctx.route {
                route.service.metrics.connect_failures.inc();
            }
            // A dead sidecar is not a dead instance: switch it to its app port and try
            // this same request again there (nothing was sent, so it is safe).
            if ctx.path == Some(fallback::path::Path::Sidecar) && !ctx.sidecar_failover {
                if let Some((_, state)) = &instance.sidecar {
                    if state.connect_failed() {
                        tracing::warn!(instance = %instance.id, "sidecar connect failed: switching to the app port");
                    }
                }
                ctx.sidecar_failover = true;
                ctx.tried.pop();
                ctx.cause = Some(Cause::ConnectFailed);
                return true;
            }
            self.record_failure(ctx, &instance);
        }
        ctx.cause = Some(if timed_out {
            Cause::UpstreamTimeout
        } else {
            Cause::ConnectFailed
        });
        // Nothing reached the upstream: any method may be retried.
        self.may_retry(ctx)
    }

    /// A connected try failed before its response was complete. Counts an upstream fault
    /// against the instance; says whether to try again: only a request that is `safe` to
    /// send again (idempotent, body still held, no response started), after an upstream
    /// fault or a stale reused connection, within the retry budget.
    pub(crate) fn on_try_failure(
        &self,
        ctx: &mut RequestCtx,
        upstream_fault: bool,
        timed_out: bool,
        safe: bool,
        stale_reuse: bool,
    ) -> bool {
        if let Some(instance) = ctx.release_instance() {
            if upstream_fault {
                self.record_failure(ctx, &instance);
            }
        }
        if upstream_fault {
            ctx.cause = Some(if timed_out {
                Cause::UpstreamTimeout
            } else {
                Cause::UpstreamError
            });
            if timed_out {
                if let Some(route) = &ctx.route {
                    route.service.metrics.timeouts.inc();
                }
            }
        }
        safe && (upstream_fault || stale_reuse) && self.may_retry(ctx)
    }

    /// The upstream's response head arrived: upstream time, and the instance's health.
    pub(crate) fn on_response(&self, ctx: &mut RequestCtx, status: http::StatusCode) {
        if status.is_informational() {
            return;
        }
        self.on_response_head(ctx);
        self.on_response_health(ctx, status);
    }

    /// The upstream's final response head arrived: the upstream time. busbar's own
    /// HTTP/1 path judges the instance by [`Self::on_response_health`] once the body has
    /// ended cleanly, so that an answer whose body turns out malformed is not also
    /// counted a success (which would reset the instance's failure streak every time).
    pub(crate) fn on_response_head(&self, ctx: &mut RequestCtx) {
        if let (Some(route), Some(start)) = (&ctx.route, ctx.upstream_start) {
            let t = start.elapsed();
            ctx.upstream_time = Some(t);
            route
                .service
                .metrics
                .upstream_duration
                .observe(t.as_secs_f64());
        }
    }

    /// The instance's health after its answer: a 5xx counts against it, anything else
    /// ends its failure streak.
    pub(crate) fn on_response_health(&self, ctx: &mut RequestCtx, status: http::StatusCode) {
        if let Some(instance) = ctx.instance.clone() {
            if status.is_server_error() {
                self.record_failure(ctx, &instance);
            } else {
                instance.health.record_success();
            }
        }
    }

    /// The upstream answered with a head or a body busbar cannot frame (`edge::framing`).
    /// It counts against the instance like a 5xx and is counted in
    /// `busbar_upstream_errors_total{cause="malformed"}`; it is never retried: the
    /// request reached the upstream, which may have acted on it, and an instance that
    /// answers so would likely answer the next try the same way (nginx and HAProxy send
    /// such a request once too).
    pub(crate) fn on_malformed_response(&self, ctx: &mut RequestCtx) {
        if let Some(route) = &ctx.route {
            route.service.metrics.malformed.inc();
        }
        self.on_try_failure(ctx, true, false, false, false);
    }

    /// The request is over: gray-release outcome, metrics, and the access log line.
    pub(crate) fn finish(&self, ctx: &mut RequestCtx, done: &Done<'_>) {
        ctx.release_instance();
        let status = done.status;
        // Read before `finish` takes it: the access log's release version.
        let served = ctx.release.served_instance();
        ctx.release.finish(ctx.set.as_deref(), status);
        let total = ctx.start.elapsed();
        if let Some(route) = &ctx.route {
            let m = &route.metrics;
            if status > 0 {
                match ctx.cause {
                    // busbar answered itself: counted with its reason.
                    Some(c) => crate::metrics::count_answer(
                        route.name(),
                        route.service.name(),
                        status,
                        c.code(),
                    ),
                    None => m.by_class[class_index(status)].inc(),
                }
                m.by_method[method_index(done.method)].inc();
            }
            m.request_bytes.inc_by(ctx.body_bytes);
            m.response_bytes.inc_by(done.body_bytes as u64);
            route.metrics.duration.observe(total.as_secs_f64());
        } else if status > 0 {
            match ctx.cause {
                Some(c) => crate::metrics::count_refusal(status, c.code()),
                None => METRICS.no_route[class_index(status)].inc(),
            }
        }
        if !self.access_log.enabled() {
            return;
        }
        let trace_id = ctx.trace.trace_id_hex();
        let route = ctx.route.as_ref();
        self.access_log.write(&Entry {
            client: done.client,
            method: done.method,
            host: done.host,
            path: done.path,
            route: route.map_or("", |r| r.name()),
            service: route.map_or("", |r| r.service.name()),
            instance: ctx.last_addr,
            status,
            bytes: done.body_bytes,
            total,
            upstream: ctx.upstream_time,
            tries: ctx.tries,
            trace_id: &trace_id,
            error: ctx.cause.map(Cause::code).or(done.error.then_some("error")),
            seen: ctx.seen.as_ref(),
            query: done.query,
            redact: ctx
                .snapshot
                .as_ref()
                .map_or(&[][..], |s| &s.config.log.redact_query[..]),
            user: ctx.admitted.as_ref().and_then(|a| a.user()),
            version: match (&ctx.set, served) {
                (Some(set), Some(i)) => Some(set.versions.name_of(i)),
                _ => None,
            },
        });
    }

    /// May this failed try be tried again? Spends a retry token if so.
    fn may_retry(&self, ctx: &RequestCtx) -> bool {
        let Some(route) = &ctx.route else {
            return false;
        };
        let svc = &route.service;
        if ctx.tries > svc.config.retry.attempts {
            return false;
        }
        if ctx.deadline.is_some_and(|d| d <= Instant::now()) {
            return false;
        }
        if !svc.retry_budget.try_withdraw() {
            svc.metrics.budget_exhausted.inc();
            return false;
        }
        svc.metrics.retries.inc();
        true
    }
}

#[async_trait]
impl ProxyHttp for BusbarProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {
        // No response compression module: busbar forwards bodies as they are.
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        METRICS.in_flight.inc();
        ctx.counted = true;
        let snapshot = self.state.load();
        let answered = self.prepare(session, ctx, &snapshot).await;
        ctx.snapshot = Some(snapshot);
        if answered? {
            return Ok(true);
        }
        // JSON routes are answered by their gRPC call here; gRPC-Web goes on through the proxy.
        crate::translate::on_request(session, ctx, &|c, i| self.record_failure(c, i)).await
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(b), Some(route)) = (body.as_ref(), ctx.route.as_ref()) {
            ctx.body_bytes += b.len() as u64;
            if ctx.body_bytes > route.config.max_body {
                ctx.cause = Some(Cause::BodyTooLarge);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body too large",
                ));
            }
            if !end_of_stream {
                ctx.body_pace
                    .after_chunk(session.as_downstream_mut(), ctx.body_bytes)?;
            }
        }
        crate::translate::request_body(ctx, body, end_of_stream)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let t = self.begin_try(ctx)?;
        let mut peer = HttpPeer::new(t.addr, false, String::new());
        let opts = &mut peer.options;
        opts.connection_timeout = Some(t.connect_timeout);
        opts.read_timeout = Some(t.read_timeout);
        opts.write_timeout = Some(t.read_timeout);
        opts.idle_timeout = Some(UPSTREAM_IDLE);
        if ctx
            .route
            .as_ref()
            .is_some_and(|r| r.service.config.protocol == Protocol::H2c)
        {
            opts.set_http_version(2, 2);
            opts.max_h2_streams = UPSTREAM_H2_STREAMS;
        }
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let timed_out = matches!(e.etype(), ErrorType::ConnectTimedout);
        e.set_retry(self.on_connect_failure(ctx, timed_out));
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let upstream_fault = *e.esource() == ErrorSource::Upstream;
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        // Only idempotent requests whose body we still hold and whose response has not
        // started may go again; a stale reused connection is pingora's own retry case.
        let safe = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        // `retry()` panics while the error's retry is still "only if reused": decide it first.
        e.retry.decide_reuse(client_reused);
        if upstream_fault && malformed(&e) {
            self.on_malformed_response(ctx);
            e.set_retry(false);
            return e;
        }
        let stale_reuse = client_reused && e.retry();
        let retry = self.on_try_failure(ctx, upstream_fault, timed_out, safe, stale_reuse);
        e.set_retry(retry);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let h2 = session.req_header().version == http::Version::HTTP_2;
        upstream_request(ctx, upstream, client_ip(session), is_tls(session), h2)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !one_content_length(resp) {
            // An answer that cannot be framed ([`malformed`]): a 502, never retried.
            let mut e =
                Error::explain(ErrorType::InvalidHTTPHeader, "more than one Content-Length");
            e.esource = ErrorSource::Upstream;
            return Err(e);
        }
        self.on_response(ctx, resp.status);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        response_headers(ctx, resp)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        crate::translate::response_body(ctx, body, end_of_stream);
        Ok(None)
    }

    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Bytes>> {
        // gRPC-Web: the trailers go downstream as the body's last frame.
        Ok(crate::translate::trailers(ctx, trailers))
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let cause = match (e.esource(), e.etype()) {
            (
                ErrorSource::Downstream,
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
            ) => None,
            // Slow read: the client stopped reading its response; nothing can be answered.
            (ErrorSource::Downstream, ErrorType::WriteTimedout) => {
                METRICS
                    .edge_refusals
                    .with_label_values(&["send_timeout"])
                    .inc();
                None
            }
            // Slow body: it stalled or fell behind its pace.
            (ErrorSource::Downstream, ErrorType::ReadTimedout) => {
                METRICS
                    .edge_refusals
                    .with_label_values(&["body_timeout"])
                    .inc();
                Some(Cause::BodyTimeout)
            }
            (ErrorSource::Downstream, _) => Some(Cause::BadRequest),
            (_, ErrorType::HTTPStatus(413)) => Some(Cause::BodyTooLarge),
            (ErrorSource::Upstream, _) => Some(ctx.cause.unwrap_or(Cause::UpstreamError)),
            _ => ctx.cause,
        };
        let code = match cause {
            Some(c) => {
                ctx.cause = Some(c);
                if session.response_written().is_none() {
                    let _ = session
                        .as_downstream_mut()
                        .write_error_response(c.header(), c.body())
                        .await;
                }
                c.status()
            }
            None => match e.etype() {
                ErrorType::HTTPStatus(code) => {
                    let _ = session.respond_error(*code).await;
                    *code
                }
                _ => 0,
            },
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(route) = &ctx.route {
            let m = &route.service.metrics;
            match reused {
                true => m.connection_pooled.inc(),
                false => m.connection_new.inc(),
            }
        }
        Ok(())
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        // Clients that go away are normal; upstream failures are counted and logged by us.
        matches!(e.esource(), ErrorSource::Downstream | ErrorSource::Upstream)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        let downstream = session.as_downstream();
        self.finish(
            ctx,
            &Done {
                method: req.method.as_str(),
                host: request_host(req),
                path: req.uri.path(),
                query: req.uri.query(),
                client: logged_client(
                    downstream.client_addr().and_then(|a| a.as_inet()).copied(),
                    ctx.client,
                ),
                status,
                body_bytes: downstream.body_bytes_sent(),
                error: e.is_some(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.example.com:8080"), "a.example.com");
        assert_eq!(strip_port("a.example.com"), "a.example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("h:x"), "h:x");
    }
}
