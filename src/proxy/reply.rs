//! Responses busbar writes itself: short JSON bodies that name the cause.
//!
//! Owns: the mapping from a failure cause to status and body, and writing it.
//! Must not: decide policy (which cause applies is the caller's business).

use bytes::Bytes;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

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
    Admission(crate::admission::RejectKind),
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

/// Writes the JSON answer for `cause`, keeping the downstream connection reusable.
pub async fn respond(session: &mut Session, cause: Cause) -> pingora_error::Result<()> {
    session
        .write_response_header(Box::new(cause.header()), false)
        .await?;
    session.write_response_body(Some(cause.body()), true).await
}

/// Writes an admission refusal (JSON body, `Retry-After`, `RateLimit-*` as it says).
pub async fn reject(
    session: &mut Session,
    rejection: &crate::admission::Rejection,
) -> pingora_error::Result<()> {
    let body = rejection.body();
    session
        .write_response_header(Box::new(rejection.header(body.len())), false)
        .await?;
    session.write_response_body(Some(body), true).await
}
