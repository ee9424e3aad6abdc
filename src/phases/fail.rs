//! The one error path: what busbar answers when a request cannot be proxied, whichever
//! driver was serving it.
//!
//! Owns: the mapping from how a request failed ([`Failure`], in words no driver's error
//! type leaks into) to the cause busbar answers with, the edge refusals counted on the
//! way, and the answer itself (the head and body `proxy::reply` renders for a cause or
//! an admission refusal, in the shape the request's caller reads: JSON, or a gRPC
//! caller's Trailers-Only head with no body, which a driver writes as a head that ends
//! the response; on HTTP/2 one HEADERS frame with END_STREAM).
//! Must not: write to the client (the driver writes what [`answer`] returns) or decide
//! retries (`attempt`).

use bytes::Bytes;
use pingora_http::ResponseHeader;

use super::ctx::RequestCtx;
use crate::admission::Rejection;
use crate::metrics::METRICS;
use crate::proxy::reply::{self, Cause};

/// How a request failed, as a driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The client closed or reset its connection: nothing can be answered.
    ClientGone,
    /// The client stopped reading its response (slow read): nothing can be answered.
    ClientSendTimeout,
    /// The request body stalled or fell behind its pace (slow body).
    ClientBodyTimeout,
    /// The client sent something busbar cannot read.
    ClientBad,
    /// The body went past the route's `max_body`.
    BodyTooLarge,
    /// The upstream side failed: the try's cause in the context says how.
    Upstream,
    /// Anything else: the cause already in the context, if any.
    Other,
}

/// The cause busbar answers with for `failure` (left in the context for the access
/// log), or `None` when there is nobody to answer; counts the client-side refusals in
/// `busbar_edge_refusals_total`.
pub(crate) fn cause_of(ctx: &mut RequestCtx, failure: Failure) -> Option<Cause> {
    note(failure);
    let cause = match failure {
        Failure::ClientGone | Failure::ClientSendTimeout => None,
        Failure::ClientBodyTimeout => Some(Cause::BodyTimeout),
        Failure::ClientBad => Some(Cause::BadRequest),
        Failure::BodyTooLarge => Some(Cause::BodyTooLarge),
        Failure::Upstream => Some(ctx.cause.unwrap_or(Cause::UpstreamError)),
        Failure::Other => ctx.cause,
    };
    if cause.is_some() {
        ctx.cause = cause;
    }
    cause
}

/// Counts a client-side failure the edge refuses (`send_timeout`, `body_timeout`), for
/// a driver that sees one outside a request's error path.
pub(crate) fn note(failure: Failure) {
    let label = match failure {
        Failure::ClientSendTimeout => "send_timeout",
        Failure::ClientBodyTimeout => "body_timeout",
        _ => return,
    };
    METRICS.edge_refusals.with_label_values(&[label]).inc();
}

/// busbar's own answer for `cause`, named in the context for the access log: the head
/// and body every driver writes for it, in the caller's shape. An empty body means the
/// head ends the response (a gRPC caller's Trailers-Only answer).
pub(crate) fn answer(ctx: &mut RequestCtx, cause: Cause) -> (ResponseHeader, Bytes) {
    ctx.cause = Some(cause);
    if ctx.caller.is_grpc() {
        ctx.grpc_status = Some(u16::from(cause.grpc_status()));
    }
    let (mut head, body) = cause.answer(ctx.caller);
    cors(ctx, &mut head);
    (head, body)
}

/// Admission's refusal (its cause already in the context, `Phases::admit`), in the
/// caller's shape, as [`answer`] gives it.
pub(crate) fn refuse(ctx: &RequestCtx, rejection: &Rejection) -> (ResponseHeader, Bytes) {
    let (mut head, body) = reply::refusal(ctx.caller, rejection);
    cors(ctx, &mut head);
    (head, body)
}

/// A gRPC-Web call on a route that allows its origin: the answer carries the route's
/// CORS headers, or a browser script could not read its `grpc-status`.
fn cors(ctx: &RequestCtx, head: &mut ResponseHeader) {
    if let Some(call) = &ctx.grpc_web {
        let _ = call.cors(head);
    }
}
