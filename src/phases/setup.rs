//! Request setup: everything between a parsed request head and the plan for its tries.
//!
//! Owns: the in-flight count, the real client, who is calling (the shape of busbar's own
//! answers, by `content-type`), the trace context, the route (on the
//! normalised path), the refusals that come before a route's policy (duplicate
//! `Authorization`, an ambiguous path, a loop, a declared body over the route's limit),
//! a gRPC-Web route's CORS preflight and call state (`grpc_web`), and admission, whose
//! waits end early when the driver's "client went away" future finishes first.
//! Must not: write to the client (the driver writes what the phase returns) or know
//! which driver it serves.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use pingora_http::RequestHeader;

use super::ctx::RequestCtx;
use super::request::{self, RequestPath};
use super::Phases;
use crate::admission::{self, Admitted, Refused, Rejection, RoutePolicy};
use crate::base::http::Name;
use crate::metrics::METRICS;
use crate::proxy::grpc::Caller;
use crate::proxy::reply::Cause;
use crate::proxy::trace::TraceContext;
use crate::routing::Route;
use crate::snapshot::Snapshot;
use crate::translate::{grpc_web, Translation};

// The bits (`base::http::Names`) of the headers setup reads, which most requests lack.
const CONTENT_TYPE_NAME: Name = Name::of("content-type");
/// `accesslog::REQUEST_ID` (a unit test holds them together).
pub(crate) const REQUEST_ID_NAME: Name = Name::of("x-request-id");
const TRACEPARENT_NAME: Name = Name::of(super::forwarding::TRACEPARENT_NAME);
const VIA_NAME: Name = Name::of(crate::via::VIA_NAME);

/// How the driver hands the request's route to [`Phases::setup`].
pub(crate) enum Routing {
    /// Find it here: the path normalised, both its readings judged, a mesh fallback
    /// counted, a second `Authorization` and a declared body over the limit refused.
    Find,
    /// The driver's codec already looked it up (on the normalised path), to decide that
    /// the request is its own (busbar's HTTP/1 engine). It takes only requests with at
    /// most one `Authorization` and judges a declared body against the route's limit
    /// itself, so those checks are not repeated; a path's two readings are judged here.
    Found {
        route: Option<Arc<Route>>,
        path: RequestPath,
    },
}

impl Phases {
    /// Sets the request up: counts it in flight, loads nothing (the driver loaded
    /// `snapshot`, the one this request sees), finds its client, trace and route, and
    /// refuses what must be refused before admission. `Err` is the cause busbar answers.
    pub(crate) fn setup(
        &self,
        ctx: &mut RequestCtx,
        snapshot: Arc<Snapshot>,
        req: &RequestHeader,
        peer: Option<IpAddr>,
        routing: Routing,
    ) -> Result<(Arc<Route>, RequestPath), Cause> {
        METRICS.in_flight.inc();
        ctx.counted = true;
        // Before any refusal: each is answered in the caller's shape (and the access log
        // names the protocol from it).
        // Headers the request surely lacks are not looked up (`RequestCtx::names`).
        let names = ctx.names;
        if !names.lacks_name(CONTENT_TYPE_NAME) {
            ctx.caller = Caller::of(&req.headers);
        }
        let logged = self.access_log.enabled();
        ctx.seen = Some(match names.lacks_name(REQUEST_ID_NAME) && !logged {
            // What `from_headers` makes of a request without one, for a log that is off.
            true => crate::accesslog::Seen {
                kept_id: None,
                protocol: "",
                user_agent: None,
            },
            false => crate::accesslog::Seen::from_headers(
                &req.headers,
                req.version,
                ctx.tls,
                ctx.caller,
                logged,
            ),
        });
        let set_up = setup_on(ctx, &snapshot, req, peer, routing);
        ctx.snapshot = Some(snapshot);
        set_up
    }

    /// Admission: `checked` is the route's policy's immediate verdict
    /// ([`admission_parts`] for its input), then its waits (cluster limit, service
    /// queue) race `gone`, the driver's future that finishes when the client leaves.
    /// Records the verdict in the context (the admitted slot, or the refusal's cause).
    pub(crate) async fn admit(
        &self,
        ctx: &mut RequestCtx,
        policy: &RoutePolicy,
        checked: Result<Admitted, Rejection>,
        gone: impl Future<Output = Box<pingora_error::Error>>,
    ) -> Result<(), Refused> {
        let verdict = match checked {
            Ok(admitted) => admission::enter_watched(policy, admitted, gone).await,
            Err(rejection) => Err(Refused::Rejected(rejection)),
        };
        match verdict {
            Ok(admitted) => {
                ctx.admitted = Some(admitted);
                Ok(())
            }
            Err(Refused::Rejected(rejection)) => {
                ctx.cause = Some(Cause::Admission(rejection.kind));
                Err(Refused::Rejected(rejection))
            }
            Err(gone) => Err(gone),
        }
    }
}

fn setup_on(
    ctx: &mut RequestCtx,
    snapshot: &Snapshot,
    req: &RequestHeader,
    peer: Option<IpAddr>,
    routing: Routing,
) -> Result<(Arc<Route>, RequestPath), Cause> {
    ctx.client_version = req.version;
    ctx.client = request::real_client(snapshot, peer, req);
    let traceparent = &super::forwarding::TRACEPARENT;
    ctx.trace = TraceContext::from_header(
        match ctx.names.lacks_name(TRACEPARENT_NAME) {
            true => None,
            false => req.headers.get(traceparent).map(|v| v.as_bytes()),
        },
        &snapshot.config.tracing,
    );
    let checked = matches!(routing, Routing::Find);
    let (route, path) = match routing {
        Routing::Find => {
            if request::ambiguous_credentials(req) {
                return Err(Cause::DuplicateAuthorization);
            }
            // Routing and ACLs see the normalised path: `//admin`, `/a/../admin` are `/admin`.
            let path = request::request_path(req);
            let route = request::find_route(snapshot, req, path.normalized.as_deref())
                .ok_or(Cause::NoRoute)?;
            if !request::readings_agree(snapshot, req, &path, &route) {
                return Err(Cause::AmbiguousPath);
            }
            (route, path)
        }
        Routing::Found { route, path } => {
            let route = route.ok_or(Cause::NoRoute)?;
            // One flag read for a path without `;`.
            if !request::readings_agree(snapshot, req, &path, &route) {
                return Err(Cause::AmbiguousPath);
            }
            (route, path)
        }
    };
    ctx.route = Some(route.clone());
    // Before admission: a looping request spends no rate-limit token or queue slot.
    if !ctx.names.lacks_name(VIA_NAME)
        && crate::via::node().looped(&req.headers, snapshot.config.limits.max_hops)
    {
        return Err(Cause::LoopDetected);
    }
    if checked
        && crate::base::http::declared_length(&req.headers)
            .is_some_and(|n| n > route.config.max_body)
    {
        return Err(Cause::BodyTooLarge);
    }
    Ok((route, path))
}

/// What admission judges of a request: its real client, its peer, and the readings of
/// its path (see [`RequestPath`]).
pub(crate) fn admission_parts<'a>(
    ctx: &RequestCtx,
    peer: Option<IpAddr>,
    req: &'a RequestHeader,
    path: &'a RequestPath,
) -> admission::RequestParts<'a> {
    admission::RequestParts {
        client_ip: ctx.client,
        peer,
        path: path.normalized.as_deref().unwrap_or(req.uri.path()),
        literal: path.literal.as_deref(),
        headers: &req.headers,
    }
}

/// The route's admission policy, if it has one (from the request's snapshot).
pub(crate) fn admission_policy(ctx: &RequestCtx, route: &Route) -> Option<Arc<RoutePolicy>> {
    ctx.snapshot
        .as_deref()
        .and_then(|s| s.admission.policy(route.name()).cloned())
}

/// A gRPC-Web route's own steps before admission, for every driver: the answer to a
/// CORS preflight (it carries no credentials, so it is answered before admission), or
/// `None`, with the call's codec state in `ctx.grpc_web` when the caller speaks
/// gRPC-Web (set before admission: its refusals carry the call's CORS headers too).
pub(crate) fn grpc_web(
    ctx: &mut RequestCtx,
    req: &RequestHeader,
    route: &Route,
) -> Option<pingora_http::ResponseHeader> {
    let snapshot = ctx.snapshot.as_deref()?;
    let Some(Translation::GrpcWeb(s)) = crate::translate::of(snapshot, route) else {
        return None;
    };
    if let Some(h) = grpc_web::preflight(req, s) {
        return Some(h);
    }
    ctx.grpc_web = grpc_web::WebCall::detect(req, s);
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::http::Names;

    /// The bits made from spellings are those of the names the phases look up.
    #[test]
    fn the_names_setup_skips_are_the_ones_it_looks_up() {
        let mut names = Names::NONE;
        for n in [
            http::header::CONTENT_TYPE.as_str(),
            crate::accesslog::REQUEST_ID.as_str(),
            super::super::forwarding::TRACEPARENT.as_str(),
            http::header::VIA.as_str(),
        ] {
            names.add(n.as_bytes());
        }
        for bit in [
            CONTENT_TYPE_NAME,
            REQUEST_ID_NAME,
            TRACEPARENT_NAME,
            VIA_NAME,
        ] {
            assert!(!names.lacks_name(bit), "{bit:?}");
            assert!(Names::NONE.lacks_name(bit));
        }
    }
}
