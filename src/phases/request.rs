//! What the phases read of a request, whatever driver brought it: its host, its path's
//! readings, its route, its real client.
//!
//! Owns: host and path extraction (absolute-form targets included), the route lookup
//! (TOML routes, then the mesh fallback by host), the checks that make a route
//! ambiguous, and the real client behind trusted proxies.
//! Must not: write to the client or hold a driver's type (a pingora `Session`): drivers
//! hand in the request head and the peer's address.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::HOST;
use pingora_http::authority::{is_http_family_scheme, raw_target_authority, RawTargetAuthority};
use pingora_http::RequestHeader;

use crate::admission;
use crate::fallback;
use crate::routing::{self, RequestView};
use crate::snapshot::Snapshot;

/// Host of the request without its port: `:authority` / absolute-form first, then `Host`.
pub(crate) fn request_host(req: &RequestHeader) -> &str {
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

/// TOML routes first; then, for a caller whose sidecar is down, the service its host names.
pub(crate) fn find_route(
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
#[derive(Debug, Default)]
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
pub(crate) fn readings_agree(
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
pub(crate) fn ambiguous_credentials(req: &RequestHeader) -> bool {
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
