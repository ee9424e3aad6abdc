//! The one builder of the upstream request head, for every driver.
//!
//! Owns: what busbar changes in a request on its way upstream, in order: origin form for
//! an absolute-form target, the client-sent identity and forwarding headers replaced by
//! what busbar verified and saw, its `Via` hop and trace context, the route's header
//! edits and path rewrite, the translation's edits, and for an upgrade the `Connection:
//! upgrade` that goes with its `Upgrade`. The head comes out either as a
//! header map (pingora's proxy and h2 send it; JSON→gRPC reads its metadata from it)
//! or as HTTP/1.1 wire lines (busbar's own HTTP/1 engine): [`Output`].
//! Must not: choose the instance or send anything.

use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, HOST, UPGRADE};
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::authority::{is_http_family_scheme, raw_target_authority, RawTargetAuthority};
use pingora_http::RequestHeader;

use super::ctx::RequestCtx;
use super::forwarding::{self, Field, Forwarding, Peer, Put};
use crate::admission;
use crate::base::http::{line, value_fits_line, Name};
use crate::routing;

/// The connection a request came on, as the upstream head needs it.
#[derive(Clone, Copy)]
pub(crate) struct Downstream<'c> {
    /// The peer's address (a trusted proxy's chains are kept: see `forwarding`).
    pub peer: Option<IpAddr>,
    pub tls: bool,
    /// HTTP/2: the target always carries `:authority`, and there is no `Host` to set.
    pub h2: bool,
    /// busbar's forwarding entries for this peer, if the connection keeps them rendered
    /// (made here otherwise).
    pub rendered: Option<&'c Peer>,
}

/// Where the upstream head goes.
pub(crate) enum Output<'a> {
    /// Into the request's own header map.
    Map,
    /// As an HTTP/1.1 head (request line, header lines, blank line) appended to the
    /// buffer. When the route edits no request headers, busbar's own headers are written
    /// as lines after the request's, not inserted into its map first: the same head,
    /// without six inserts.
    Wire(&'a mut Vec<u8>),
}

/// The upstream head of `upstream` (the client's request, edited in place), for the
/// route in the context. Nothing is done for a request without a route.
pub(crate) fn build(
    ctx: &RequestCtx,
    upstream: &mut RequestHeader,
    down: Downstream<'_>,
    out: Output<'_>,
) -> Result<()> {
    let Some(route) = ctx.route.as_deref() else {
        return Ok(());
    };
    if !down.h2 {
        origin_form(upstream)?;
        if !upstream.headers.contains_key(HOST) {
            // RFC 9112 §3.2: every HTTP/1.1 request carries `Host`, and an HTTP/1.0
            // client may have sent none (the front door refuses HTTP/1.1 without one).
            // The service's name stands in, as nginx sends its upstream's name.
            upstream.insert_header(HOST, route.service.config.name.as_str())?;
        }
    }
    let as_lines = matches!(out, Output::Wire(_)) && route.config.request_headers.is_empty();
    // Built where it stays (this frame) and used by reference: moved into an `Option`
    // and into each call, its ~350 bytes were copied three times a request.
    let made;
    let peer = match down.rendered {
        Some(p) if p.is(down.peer, down.tls) => p,
        _ => {
            made = Peer::new(down.peer, down.tls);
            &made
        }
    };
    let mut own = Own::take(ctx, upstream, down.peer, peer)?;
    if !as_lines {
        // Inserted before the route's edits, which may change or remove them.
        own.insert(ctx, upstream)?;
        if !route.config.request_headers.is_empty() {
            forwarding::edit_request(upstream, &route.config.request_headers)?;
        }
    }
    upstream_target(ctx, route, upstream)?;
    if let Output::Wire(wire) = out {
        wire.extend_from_slice(upstream.method.as_str().as_bytes());
        wire.push(b' ');
        wire.extend_from_slice(upstream.raw_path());
        wire.extend_from_slice(b" HTTP/1.1\r\n");
        upstream.header_to_h1_wire(wire);
        if as_lines {
            own.write(ctx, wire);
        }
        // An upgrade: busbar's HTTP/1 codec leaves `Upgrade` in the head only for one it
        // passes on (every other hop-by-hop header is gone), and its `Connection` token
        // goes with it (RFC 9110 §7.8). Only the route's edits could have added one the
        // client did not send.
        let unedited = route.config.request_headers.is_empty();
        const UPGRADE_NAME: Name = Name::of("upgrade");
        if !(unedited && ctx.names.lacks_name(UPGRADE_NAME))
            && upstream.headers.contains_key(UPGRADE)
        {
            wire.extend_from_slice(b"Connection: upgrade\r\n");
        }
        wire.extend_from_slice(b"\r\n");
    }
    Ok(())
}

static VIA_NAME: HeaderName = http::header::VIA;
const VIA: Field = Field::new(&VIA_NAME, crate::via::VIA_NAME);
static REQUEST_ID_NAME: HeaderName = crate::accesslog::REQUEST_ID;
const REQUEST_ID: Field = Field::new(&REQUEST_ID_NAME, "X-Request-Id");

/// The head's target is its URI's path and query as they are (an origin-form target, or
/// an HTTP/2 `:path`): a head rebuilt from its `Parts` writes the same target.
fn target_in_uri(h: &RequestHeader) -> bool {
    h.uri.path_and_query().map(|p| p.as_str().as_bytes()) == Some(h.raw_path())
}

/// An empty head, to stand in while the request's is taken apart.
fn empty_parts() -> http::request::Parts {
    http::Request::new(()).into_parts().0
}

/// A value busbar formatted itself (hex, `traceparent`): always a valid one.
fn header_value(bytes: &[u8]) -> Result<HeaderValue> {
    HeaderValue::from_bytes(bytes)
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "busbar's own header value"))
}

/// busbar's own headers for a request, taken (and their client-sent versions removed)
/// before they are inserted or written.
struct Own<'c> {
    identity: Option<(&'c HeaderName, &'c str)>,
    forwarding: Forwarding<'c>,
}

impl<'c> Own<'c> {
    #[inline(always)]
    fn take(
        ctx: &'c RequestCtx,
        upstream: &mut RequestHeader,
        client: Option<IpAddr>,
        peer: &'c Peer,
    ) -> Result<Self> {
        let identity = clear_identity(ctx, upstream);
        if let Some((_, user)) = identity {
            // The one check of the identity's value, for both outputs: nothing may end
            // the line early (what `HeaderValue` refuses).
            if !value_fits_line(user.as_bytes()) {
                return Err(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "identity value",
                ));
            }
        }
        let chain = peer_trusted(ctx, client);
        let forwarding = Forwarding::of(upstream, peer, chain);
        forwarding::clear_forwarded(upstream, ctx.names);
        // The request id goes out as the access log has it (kept or made): once.
        if ctx.seen.is_some() && !ctx.names.lacks_name(super::setup::REQUEST_ID_NAME) {
            upstream.remove_header(&crate::accesslog::REQUEST_ID);
        }
        Ok(Own {
            identity,
            forwarding,
        })
    }

    /// Into the request's map (what is moved into it is taken out of these). A head that
    /// keeps no case of its names (an HTTP/2 client's, JSON→gRPC's copy) is taken apart
    /// for it, so the static names go in as they are: pingora's `insert_header` would
    /// parse each into a new `HeaderName`, six allocations a request.
    fn insert(&mut self, ctx: &RequestCtx, upstream: &mut RequestHeader) -> Result<()> {
        if upstream.has_case() || !target_in_uri(upstream) {
            return self.put(ctx, upstream);
        }
        // The conversion back keeps the target its URI holds; `send_end_stream` is
        // carried over by hand.
        let end = upstream.send_end_stream();
        let mut parts: http::request::Parts =
            std::mem::replace(upstream, RequestHeader::from(empty_parts())).into();
        let put = self.put(ctx, &mut parts.headers);
        *upstream = RequestHeader::from(parts);
        if let Some(end) = end {
            upstream.set_send_end_stream(end);
        }
        put
    }

    fn put(&mut self, ctx: &RequestCtx, to: &mut impl Put) -> Result<()> {
        if let Some((name, user)) = self.identity {
            let user = HeaderValue::from_str(user)
                .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "identity value"))?;
            to.set_name(name, user)?;
        }
        self.forwarding.apply(to)?;
        to.add(&VIA, crate::via::node().value(ctx.client_version).clone())?;
        if let Some(seen) = &ctx.seen {
            let id = match &seen.kept_id {
                Some(v) => v.clone(),
                None => header_value(&ctx.trace.trace_id_hex())?,
            };
            to.set(&REQUEST_ID, id)?;
        }
        let traceparent = header_value(&ctx.trace.header_value())?;
        to.set(&forwarding::TRACEPARENT_FIELD, traceparent)
    }

    /// As lines after the request's own.
    fn write(&self, ctx: &RequestCtx, wire: &mut Vec<u8>) {
        if let Some((name, user)) = self.identity {
            line(wire, name.as_str().as_bytes(), user.as_bytes());
        }
        self.forwarding.write(wire);
        wire.extend_from_slice(crate::via::node().line(ctx.client_version));
        let traceparent = ctx.trace.header_value();
        line(wire, forwarding::TRACEPARENT_NAME.as_bytes(), &traceparent);
        if let Some(seen) = &ctx.seen {
            // The trace id in hex is part of `traceparent` (`00-<trace id>-…`): taken
            // from there, not formatted a second time.
            let mut trace_id = [0u8; 32];
            trace_id.copy_from_slice(&traceparent[3..35]);
            line(
                wire,
                crate::accesslog::REQUEST_ID.as_str().as_bytes(),
                seen.request_id(&trace_id),
            );
        }
    }
}

/// Removes a client-sent identity header (and applies admission's normalised path);
/// returns the verified identity busbar sends instead, if there is one.
fn clear_identity<'c>(
    ctx: &'c RequestCtx,
    upstream: &mut RequestHeader,
) -> Option<(&'c HeaderName, &'c str)> {
    match &ctx.admitted {
        Some(a) => {
            a.clear_upstream(upstream, ctx.names);
            a.identity()
        }
        None => {
            admission::strip_identity(upstream, ctx.names);
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

/// A forward-proxy request (absolute-form: `GET http://orders/x?q`, from a client whose
/// `HTTP_PROXY` is busbar) goes to the instance in origin form, `GET /x?q`, with `Host`
/// from the target's authority (RFC 9112 §3.2.1, §3.2.2): the instance is an origin
/// server, and routes on the path it is given. An origin-form request costs one byte
/// compare.
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
    crate::translate::upstream_request(ctx.grpc_web.as_ref(), upstream)
}
