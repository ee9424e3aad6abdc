//! A refused request: its status, JSON body and headers.
//!
//! Owns: [`Rejection`] and how it is rendered as JSON (`{"error": …, "reason": …,
//! "message": …}`), and the headers every shape of it carries (`Retry-After`,
//! `RateLimit-*`, `WWW-Authenticate`; a gRPC caller's shape is `proxy::reply`'s).
//! Must not: decide whether to refuse; that is the other admission files.

use std::sync::LazyLock;

use bytes::Bytes;
use http::HeaderValue;
use pingora_http::ResponseHeader;

use crate::base::reply::Refusal;

use super::rate::RateInfo;

/// What kind of refusal; the proxy maps it to its log/metrics cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// 401: credentials missing or wrong.
    Unauthorized,
    /// 403: client address or path refused by the ACL.
    Forbidden,
    /// 429: over the user's (or the route's) rate.
    RateLimited,
    /// 429: the user's queue is full.
    QueueFull,
    /// 503: no slot freed within the wait limit.
    QueueTimeout,
}

impl RejectKind {
    pub fn status(self) -> u16 {
        match self {
            RejectKind::Unauthorized => 401,
            RejectKind::Forbidden => 403,
            RejectKind::RateLimited | RejectKind::QueueFull => 429,
            RejectKind::QueueTimeout => 503,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            RejectKind::Unauthorized => "unauthorized",
            RejectKind::Forbidden => "forbidden",
            RejectKind::RateLimited => "rate_limited",
            RejectKind::QueueFull => "queue_full",
            RejectKind::QueueTimeout => "queue_timeout",
        }
    }
}

/// A refusal, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectKind,
    /// Finer cause, e.g. `token_expired`, `path`, `user`.
    pub reason: &'static str,
    pub message: &'static str,
    pub retry_after_secs: Option<u64>,
    pub rate: Option<RateInfo>,
}

impl Rejection {
    pub fn new(kind: RejectKind, reason: &'static str, message: &'static str) -> Self {
        Rejection {
            kind,
            reason,
            message,
            retry_after_secs: None,
            rate: None,
        }
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    pub fn body(&self) -> Bytes {
        let r = Refusal::new(self.kind.code(), self.message)
            .reason(self.reason)
            .retry_after(self.retry_after_secs);
        Bytes::from(r.to_json())
    }

    /// Status line and headers for a body of `body_len` bytes.
    pub fn header(&self, body_len: usize) -> ResponseHeader {
        let mut h = ResponseHeader::build(self.status(), Some(8)).unwrap_or_else(|_| {
            ResponseHeader::build(500, Some(4)).expect("500 is a valid status")
        });
        let _ = h.insert_header(http::header::CONTENT_TYPE, "application/json");
        let _ = h.insert_header(http::header::CONTENT_LENGTH, body_len);
        let _ = h.insert_header(http::header::CACHE_CONTROL, "no-store");
        self.advice(&mut h);
        h
    }

    /// What the refusal tells the client beside its status, on any shape of answer (the
    /// JSON one, a gRPC caller's Trailers-Only one): `Retry-After`, `RateLimit-*`, and
    /// `WWW-Authenticate` on a 401.
    pub fn advice(&self, h: &mut ResponseHeader) {
        if let Some(s) = self.retry_after_secs {
            let _ = h.insert_header(http::header::RETRY_AFTER, s);
        }
        if let Some(r) = &self.rate {
            rate_headers(h, r);
        }
        if self.kind == RejectKind::Unauthorized {
            let _ = h.insert_header(http::header::WWW_AUTHENTICATE, "Bearer");
        }
    }
}

/// The names of the `RateLimit-*` headers busbar sets (a response's own are replaced).
pub const RATE_HEADERS: [&str; 3] = ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"];

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds).
pub fn rate_headers(h: &mut ResponseHeader, r: &RateInfo) {
    for (name, n) in RATE_HEADERS.into_iter().zip(r.values()) {
        let _ = h.insert_header(name, number(n));
    }
}

/// [`rate_headers`] as HTTP/1 header lines, for a head written straight onto the wire.
pub fn rate_lines(out: &mut Vec<u8>, r: &RateInfo) {
    for (name, n) in RATE_HEADERS.into_iter().zip(r.values()) {
        let mut digits = itoa::Buffer::new();
        crate::base::http::line(out, name.as_bytes(), digits.format(n).as_bytes());
    }
}

/// Numbers below this are formatted once and shared; limits, remainders and reset times
/// are nearly always small, and these headers go on every rate-limited response.
const SHARED_NUMBERS: u64 = 1024;

/// `n` as a header value: a shared one (a reference count, no allocation) when small.
fn number(n: u64) -> HeaderValue {
    static SMALL: LazyLock<Box<[HeaderValue]>> =
        LazyLock::new(|| (0..SHARED_NUMBERS).map(HeaderValue::from).collect());
    match SMALL.get(n as usize) {
        Some(v) => v.clone(),
        None => HeaderValue::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_lines_say_what_rate_headers_set() {
        let r = RateInfo {
            limit: 10,
            remaining: 2000,
            reset_secs: 3,
        };
        let mut h = ResponseHeader::build_no_case(200, None).unwrap();
        rate_headers(&mut h, &r);
        let mut map = Vec::new();
        h.header_to_h1_wire(&mut map);
        let mut lines = Vec::new();
        rate_lines(&mut lines, &r);
        let sorted = |b: Vec<u8>| {
            let mut l: Vec<String> = String::from_utf8(b)
                .unwrap()
                .lines()
                .map(String::from)
                .collect();
            l.sort();
            l
        };
        let lines = sorted(lines);
        assert_eq!(
            lines,
            [
                "ratelimit-limit: 10",
                "ratelimit-remaining: 2000",
                "ratelimit-reset: 3"
            ]
        );
        assert_eq!(lines, sorted(map));
    }

    #[test]
    fn numbers_shared_or_not_read_the_same() {
        for n in [0, 7, SHARED_NUMBERS - 1, SHARED_NUMBERS, u64::MAX] {
            assert_eq!(number(n).to_str().unwrap(), n.to_string());
        }
    }
}
