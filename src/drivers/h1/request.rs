//! The HTTP/1.1 request codec of busbar's own engine: a complete request head, as the
//! front door read it, parsed once (httparse) into the request for upstream.
//!
//! Owns: which heads the engine takes (clean, bodiless, origin-form HTTP/1.1 within the
//! limits), and turning one into a `RequestHeader` without a second scan.
//! Must not: route, or write anything.

use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderName, HeaderValue, Method};
use pingora_http::RequestHeader;

use super::head::HeadLimits;
use super::MAX_HEADERS;
use crate::phases::response_head::Kind;

/// Does a `Connection` value ask for anything besides `close` / `keep-alive`? Other
/// tokens name more hop-by-hop headers (or an upgrade): pingora's path handles those.
/// Sets `close` when it says close.
pub(super) fn connection_tokens(value: &[u8], close: &mut bool) -> bool {
    value.split(|&b| b == b',').all(|t| {
        let t = t.trim_ascii();
        if t.eq_ignore_ascii_case(b"close") {
            *close = true;
            true
        } else {
            t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive")
        }
    })
}

/// The header name `raw` is. The names clients send most are matched here (by length,
/// then case-insensitively); `HeaderName::from_bytes` (a lower-casing copy and a table
/// walk, several times the cost of these compares) parses the rest.
fn request_name(raw: &[u8]) -> Option<HeaderName> {
    use http::header::{
        ACCEPT, ACCEPT_ENCODING, ACCEPT_LANGUAGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE,
        COOKIE, HOST, ORIGIN, REFERER, USER_AGENT,
    };
    let is = |s: &str| raw.eq_ignore_ascii_case(s.as_bytes());
    let known = match raw.len() {
        4 if is("host") => HOST,
        6 if is("accept") => ACCEPT,
        6 if is("cookie") => COOKIE,
        6 if is("origin") => ORIGIN,
        7 if is("referer") => REFERER,
        10 if is("user-agent") => USER_AGENT,
        10 if is("connection") => CONNECTION,
        12 if is("content-type") => CONTENT_TYPE,
        13 if is("authorization") => AUTHORIZATION,
        13 if is("cache-control") => CACHE_CONTROL,
        14 if is("content-length") => CONTENT_LENGTH,
        15 if is("accept-encoding") => ACCEPT_ENCODING,
        15 if is("accept-language") => ACCEPT_LANGUAGE,
        _ => return HeaderName::from_bytes(raw).ok(),
    };
    Some(known)
}

/// Parses a complete head for this path: the request for upstream and whether the client
/// said `Connection: close`. `None`: not for this path, or not clean enough to be sure;
/// [`head::check`](super::head::check) then judges the head and pingora serves it.
///
/// This is also the front door's check for the heads it accepts, so a head is not scanned
/// a second time: everything accepted here is a head `head::check` accepts as a request
/// without a body (a unit test and, in debug builds, an assertion hold it to that).
/// httparse (strict by default) refuses NUL and other controls, whitespace in or before
/// a name, obsolete line folding and bad request lines; what it lets through is
/// checked here: bare LF line endings, empty lines before the request line, the size
/// limits, and `Content-Length` other than one `0`. A second `Host` (which the front
/// door refuses) or a second `Authorization` (which the phases refuse) is not
/// for this path either.
pub(super) fn parse(head: &Bytes, limits: &HeadLimits) -> Option<(RequestHeader, bool)> {
    if head.len() > limits.max_head_bytes || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut lines);
    if parsed.parse(head) != Ok(httparse::Status::Complete(head.len())) {
        return None;
    }
    let (method, path) = (parsed.method?, parsed.path?);
    // Strict httparse: `METHOD SP path SP HTTP/1.1`, so its line feed is at this index.
    // The method starts the head: httparse skips empty lines before it.
    let request_line = method.len() + path.len() + 11;
    if method.as_ptr() != head.as_ptr()
        || request_line > limits.max_request_line
        || parsed.version != Some(1)
        || parsed.headers.len() > limits.max_headers
        || !path.starts_with('/')
    {
        return None;
    }
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let uri = http::Uri::from_maybe_shared(head.slice_ref(path.as_bytes())).ok()?;
    // Set field by field: the builder moves the whole head through a closure per step.
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.headers.reserve(parsed.headers.len());
    let mut close = false;
    let mut length = false;
    let (mut host, mut authorization) = (false, false);
    for h in parsed.headers.iter() {
        // Each line before this one ended in CRLF (the last one: `ends_with` above).
        let at = h.name.as_ptr() as usize - head.as_ptr() as usize;
        if head[at - 2] != b'\r' {
            return None;
        }
        let name = request_name(h.name.as_bytes())?;
        if name == TRANSFER_ENCODING || name == UPGRADE || name == EXPECT {
            return None;
        }
        if name == CONTENT_LENGTH {
            if length || h.value != b"0" {
                return None;
            }
            length = true;
        }
        if name == CONNECTION && !connection_tokens(h.value, &mut close) {
            return None;
        }
        if name == HOST && std::mem::replace(&mut host, true)
            || name == AUTHORIZATION && std::mem::replace(&mut authorization, true)
        {
            return None;
        }
        if Kind::of(name.as_str().as_bytes()).hop_by_hop() {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value)).ok()?;
        // Straight into the map: pingora's `append_header` would turn each name into a
        // title-case copy and parse it back.
        parts.headers.try_append(name, value).ok()?;
    }
    // No case map: names go upstream in canonical form.
    Some((RequestHeader::from(parts), close))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_names_are_what_from_bytes_makes_of_them() {
        for raw in [
            "Host",
            "host",
            "HOST",
            "Accept",
            "cookie",
            "Origin",
            "Referer",
            "User-Agent",
            "connection",
            "Content-Type",
            "Authorization",
            "Cache-Control",
            "Content-Length",
            "Accept-Encoding",
            "accept-language",
            "X-User-Id",
            "Hos",
            "Hostx",
            "accept-lang",
        ] {
            assert_eq!(
                request_name(raw.as_bytes()),
                HeaderName::from_bytes(raw.as_bytes()).ok(),
                "{raw}"
            );
        }
        for bad in ["", "Ho st", "Host:", "Acc\x01pt"] {
            assert_eq!(request_name(bad.as_bytes()), None, "{bad:?}");
        }
    }

    const LIMITS: HeadLimits = HeadLimits {
        max_request_line: 64,
        max_head_bytes: 256,
        max_headers: 4,
    };

    /// What [`parse`] takes, the front door's own check accepts as a bodiless request:
    /// `parse` is the only check the heads it takes get.
    fn agrees(head: &[u8]) -> bool {
        let taken = parse(&Bytes::copy_from_slice(head), &LIMITS).is_some();
        if taken {
            assert_eq!(
                super::super::head::check(head, &LIMITS),
                Ok(super::super::head::Body::Length(0)),
                "parse took {:?}",
                String::from_utf8_lossy(head)
            );
        }
        taken
    }

    #[test]
    fn parse_takes_only_what_the_front_door_accepts() {
        for ok in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET /a?b=c HTTP/1.1\r\nHost: a\r\nX:\tv \r\nContent-Length: 0\r\n\r\n",
            b"DELETE /x HTTP/1.1\r\nConnection: close\r\nX-Empty:\r\n\r\n",
        ] {
            assert!(agrees(ok), "{}", String::from_utf8_lossy(ok));
        }
        let line = |n: usize| format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(n));
        // The request line's LF at index 64 is within the limit; at 65 it is not.
        assert!(agrees(line(64 - 15).as_bytes()));
        assert!(!agrees(line(64 - 14).as_bytes()));
        for refused in [
            &b"GET / HTTP/1.1\nHost: a\n\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\x7fb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nAuthorization: a\r\nAUTHORIZATION: b\r\n\r\n",
        ] {
            assert!(!agrees(refused), "{}", String::from_utf8_lossy(refused));
        }
    }

    #[test]
    fn parse_agrees_with_the_front_door_on_every_byte_anywhere() {
        // Each byte value, put in at each position of (or in place of a byte of) a head
        // the own path takes.
        let base = b"GET /p HTTP/1.1\r\nHost: a\r\nX-Y: v w\r\n\r\n";
        let mut taken = 0;
        for at in 0..base.len() {
            for b in 0..=255u8 {
                let mut put = base.to_vec();
                put.insert(at, b);
                let mut swap = base.to_vec();
                swap[at] = b;
                taken += usize::from(agrees(&put)) + usize::from(agrees(&swap));
            }
        }
        // Many variants are still clean heads (a letter in a name, a value, the path).
        assert!(taken > 1000, "{taken}");
    }
}
