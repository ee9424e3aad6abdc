//! Responses busbar writes itself: short JSON bodies that name the cause, or, to a gRPC
//! or gRPC-Web caller, a Trailers-Only answer (`proxy::grpc`) with the status Envoy uses
//! for the same cause.
//!
//! Owns: the mapping from a failure cause (and an admission refusal) to status and body
//! in the caller's shape.
//! Must not: decide policy (which cause applies is the caller's business), or write to
//! a client (the driver writes what `phases::fail` returns).
//!
//! ## gRPC status for each cause
//!
//! Envoy answers a gRPC request it cannot proxy with a local reply whose `grpc-status`
//! is the one the reply names, else `Grpc::Utility::httpToGrpcStatus` of its HTTP status
//! (`source/common/grpc/status.cc`, gRPC's `doc/http-grpc-status-mapping.md`: 400 →
//! INTERNAL, 401 → UNAUTHENTICATED, 403 → PERMISSION_DENIED, 404 → UNIMPLEMENTED,
//! 429/502/503/504 → UNAVAILABLE, anything else → UNKNOWN). busbar follows it:
//!
//! | cause (`code`) | HTTP | gRPC | Envoy's answer for the same cause |
//! |---|---|---|---|
//! | `no_route` | 404 | UNIMPLEMENTED 12 | router: no route, 404 |
//! | `no_healthy_instance` | 503 | UNAVAILABLE 14 | router: no healthy upstream, 503 |
//! | `connect_failed`, `upstream_certificate_rejected`, `upstream_error` | 502 | UNAVAILABLE 14 | router: upstream connect error / reset before headers, 503 |
//! | `upstream_timeout` | 504 | UNAVAILABLE 14 | router `onUpstreamTimeoutAbort`: 504, no gRPC status given, so 504's |
//! | `rate_limited`, `queue_full` | 429 | RESOURCE_EXHAUSTED 8 | `ratelimit` / `local_ratelimit` with `rate_limited_as_resource_exhausted` (Google's mapping; Envoy's default is 429's UNAVAILABLE, issue 21 asks for this one) |
//! | `queue_timeout` | 503 | UNAVAILABLE 14 | 503 |
//! | `unauthorized` | 401 | UNAUTHENTICATED 16 | `jwt_authn` / `ext_authz`: 401 |
//! | `forbidden` | 403 | PERMISSION_DENIED 7 | `rbac`: 403 |
//! | `body_too_large` | 413 | RESOURCE_EXHAUSTED 8 | Envoy's 413 maps to UNKNOWN; gRPC's own servers answer an oversize message RESOURCE_EXHAUSTED, and so does busbar |
//! | `bad_request`, `duplicate_authorization`, `ambiguous_path` | 400 | INTERNAL 13 | a codec or filter's 400 |
//! | `body_timeout` | 408 | UNKNOWN 2 | HCM stream idle timeout: 408, no gRPC status given |
//! | `loop_detected` | 508 | UNKNOWN 2 | 508 is not in the mapping |
//!
//! `grpc-message` is `code: message` (`no_route: no route matches this request`), so
//! the client sees busbar's cause; a 429's `Retry-After` and `RateLimit-*` and a 401's
//! `WWW-Authenticate` ride on the Trailers-Only head as on the JSON answer.

use bytes::Bytes;
use pingora_http::ResponseHeader;

use super::grpc::{trailers_only, Caller};
use crate::admission::{RejectKind, Rejection};
use crate::base::reply::Refusal;

/// Why busbar answered instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    NoRoute,
    BodyTooLarge,
    NoHealthyInstance,
    ConnectFailed,
    /// The instance's TLS certificate failed verification (a connect failure).
    UpstreamCertificate,
    UpstreamTimeout,
    UpstreamError,
    BadRequest,
    /// More than one `Authorization` field.
    DuplicateAuthorization,
    /// The path's readings (with and without `;params`) pick different routes.
    AmbiguousPath,
    /// The request body stalled or fell behind `body_min_rate`.
    BodyTimeout,
    /// Refused by admission (ACL, identity, rate limit, queue).
    Admission(RejectKind),
    /// The request already passed this node, or too many busbar nodes (`via`).
    LoopDetected,
}

impl Cause {
    pub fn status(self) -> u16 {
        match self {
            Cause::NoRoute => 404,
            Cause::BodyTooLarge => 413,
            Cause::NoHealthyInstance => 503,
            Cause::ConnectFailed | Cause::UpstreamCertificate | Cause::UpstreamError => 502,
            Cause::UpstreamTimeout => 504,
            Cause::BadRequest | Cause::DuplicateAuthorization | Cause::AmbiguousPath => 400,
            Cause::BodyTimeout => 408,
            Cause::Admission(k) => k.status(),
            Cause::LoopDetected => 508,
        }
    }

    /// The `grpc-status` a gRPC or gRPC-Web caller gets (the table in the module doc).
    pub fn grpc_status(self) -> u8 {
        match self {
            Cause::NoRoute => 12,
            Cause::NoHealthyInstance
            | Cause::ConnectFailed
            | Cause::UpstreamCertificate
            | Cause::UpstreamError
            | Cause::UpstreamTimeout => 14,
            Cause::BodyTooLarge => 8,
            Cause::BadRequest | Cause::DuplicateAuthorization | Cause::AmbiguousPath => 13,
            Cause::BodyTimeout | Cause::LoopDetected => 2,
            Cause::Admission(k) => match k {
                RejectKind::Unauthorized => 16,
                RejectKind::Forbidden => 7,
                RejectKind::RateLimited | RejectKind::QueueFull => 8,
                RejectKind::QueueTimeout => 14,
            },
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Cause::NoRoute => "no_route",
            Cause::BodyTooLarge => "body_too_large",
            Cause::NoHealthyInstance => "no_healthy_instance",
            Cause::ConnectFailed => "connect_failed",
            Cause::UpstreamCertificate => "upstream_certificate_rejected",
            Cause::UpstreamTimeout => "upstream_timeout",
            Cause::UpstreamError => "upstream_error",
            Cause::BadRequest => "bad_request",
            Cause::DuplicateAuthorization => "duplicate_authorization",
            Cause::AmbiguousPath => "ambiguous_path",
            Cause::BodyTimeout => "body_timeout",
            Cause::Admission(k) => k.code(),
            Cause::LoopDetected => "loop_detected",
        }
    }

    /// The sentence the body gives for the cause (also written in other shapes, as a
    /// translated route's error).
    pub fn message(self) -> &'static str {
        match self {
            Cause::NoRoute => "no route matches this request",
            Cause::BodyTooLarge => "the request body is larger than this route allows",
            Cause::NoHealthyInstance => "the service has no healthy instance",
            Cause::ConnectFailed => "could not connect to any instance of the service",
            Cause::UpstreamCertificate => {
                "certificate verification failed: the instance's TLS certificate is not trusted for its name (see the service's tls.ca_file and tls.server_name)"
            }
            Cause::UpstreamTimeout => "the upstream did not answer in time",
            Cause::UpstreamError => "the upstream connection failed before a complete response",
            Cause::BadRequest => "the request is malformed",
            Cause::DuplicateAuthorization => "the request has more than one Authorization header",
            Cause::AmbiguousPath => {
                "the path names different routes with and without its ;parameters"
            }
            Cause::BodyTimeout => "the request body did not arrive in time",
            Cause::Admission(_) => "the request was not admitted",
            Cause::LoopDetected => {
                "the request already passed this busbar node, or more busbar nodes than limits.max_hops: a forwarding loop"
            }
        }
    }

    /// `{"error":"…","message":"…"}` ([`Refusal`], busbar's one shape).
    pub fn body(self) -> Bytes {
        Bytes::from(Refusal::new(self.code(), self.message()).to_json())
    }

    pub fn header(self) -> ResponseHeader {
        let body_len = self.body().len();
        json_header(self.status(), body_len)
    }

    /// busbar's answer for the cause in `caller`'s shape: the JSON head and body, or a
    /// Trailers-Only head and no body (the driver ends the response on the head).
    pub fn answer(self, caller: Caller) -> (ResponseHeader, Bytes) {
        if caller.is_grpc() {
            let head = trailers_only(caller, self.grpc_status(), self.code(), self.message());
            return (head, Bytes::new());
        }
        let body = self.body();
        (json_header(self.status(), body.len()), body)
    }
}

/// An admission refusal in `caller`'s shape: the JSON answer, or a Trailers-Only head
/// whose message names the rule (`rate_limited (user): …`) and that keeps the refusal's
/// `Retry-After`, `RateLimit-*` and `WWW-Authenticate`.
pub fn refusal(caller: Caller, rejection: &Rejection) -> (ResponseHeader, Bytes) {
    if !caller.is_grpc() {
        let body = rejection.body();
        return (rejection.header(body.len()), body);
    }
    let kind = rejection.kind;
    let status = Cause::Admission(kind).grpc_status();
    let mut head = if rejection.reason == kind.code() {
        trailers_only(caller, status, kind.code(), rejection.message)
    } else {
        let code = format!("{} ({})", kind.code(), rejection.reason);
        trailers_only(caller, status, &code, rejection.message)
    };
    rejection.advice(&mut head);
    (head, Bytes::new())
}

pub fn json_header(status: u16, len: usize) -> ResponseHeader {
    // 200..=599 are always valid; fall back to 500 rather than panic.
    // Statuses come from `Cause` (all valid); 500 is the fallback that cannot fail.
    let mut h = ResponseHeader::build(status, Some(4))
        .unwrap_or_else(|_| ResponseHeader::build(500, Some(4)).expect("500 is a valid status"));
    let _ = h.insert_header(http::header::CONTENT_TYPE, "application/json");
    let _ = h.insert_header(http::header::CONTENT_LENGTH, len);
    let _ = h.insert_header(http::header::CACHE_CONTROL, "no-store");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::RateInfo;

    #[test]
    fn grpc_callers_get_envoys_status_and_http_callers_json() {
        let grpc = |c: Cause| c.grpc_status();
        assert_eq!(grpc(Cause::NoRoute), 12);
        for c in [
            Cause::NoHealthyInstance,
            Cause::ConnectFailed,
            Cause::UpstreamCertificate,
            Cause::UpstreamError,
            Cause::UpstreamTimeout,
            Cause::Admission(RejectKind::QueueTimeout),
        ] {
            assert_eq!(grpc(c), 14, "{c:?}");
        }
        assert_eq!(grpc(Cause::Admission(RejectKind::RateLimited)), 8);
        assert_eq!(grpc(Cause::Admission(RejectKind::QueueFull)), 8);
        assert_eq!(grpc(Cause::Admission(RejectKind::Unauthorized)), 16);
        assert_eq!(grpc(Cause::Admission(RejectKind::Forbidden)), 7);
        assert_eq!(grpc(Cause::BadRequest), 13);

        let (head, body) = Cause::NoHealthyInstance.answer(Caller::Grpc);
        assert_eq!((head.status.as_u16(), body.len()), (200, 0));
        assert_eq!(head.headers["grpc-status"], "14");
        assert_eq!(
            head.headers["grpc-message"],
            "no_healthy_instance: the service has no healthy instance"
        );
        let (head, body) = Cause::NoHealthyInstance.answer(Caller::Http);
        assert_eq!(head.status.as_u16(), 503);
        assert_eq!(
            head.headers["content-length"],
            body.len().to_string().as_str()
        );
        assert_eq!(body, Cause::NoHealthyInstance.body());
    }

    #[test]
    fn a_refusal_keeps_its_advice_in_every_shape() {
        let mut r = Rejection::new(RejectKind::RateLimited, "user", "too many requests");
        r.retry_after_secs = Some(7);
        r.rate = Some(RateInfo {
            limit: 5,
            remaining: 0,
            reset_secs: 7,
        });
        let (head, body) = refusal(Caller::GrpcWeb, &r);
        assert_eq!((head.status.as_u16(), body.len()), (200, 0));
        assert_eq!(head.headers["content-type"], "application/grpc-web+proto");
        assert_eq!(head.headers["grpc-status"], "8");
        assert_eq!(
            head.headers["grpc-message"],
            "rate_limited (user): too many requests"
        );
        assert_eq!(head.headers["retry-after"], "7");
        assert_eq!(head.headers["ratelimit-remaining"], "0");
        let (json, body) = refusal(Caller::Http, &r);
        assert_eq!(json.status.as_u16(), 429);
        assert_eq!(json.headers["retry-after"], "7");
        assert_eq!(body, r.body());
        // A reason that only repeats the code is not said twice.
        let r = Rejection::new(RejectKind::QueueFull, "queue_full", "the queue is full");
        let (head, _) = refusal(Caller::Grpc, &r);
        assert_eq!(
            head.headers["grpc-message"],
            "queue_full: the queue is full"
        );
    }
}
