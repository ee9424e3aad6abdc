//! The HTTP/2 request codec: a stream's head, as the `h2` crate decoded and checked it,
//! turned into the request busbar sends an HTTP/1.1 upstream (RFC 9113 §8.2.3).
//!
//! The `h2` crate already refuses, as a stream error (RST_STREAM PROTOCOL_ERROR) that
//! leaves the connection's other streams alone: connection-specific header fields
//! (`connection`, `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`), `te`
//! other than `trailers`, missing, repeated, unknown or misplaced pseudo-header fields,
//! names that are not lowercase tokens, and a `content-length` that does not parse or
//! that the DATA frames disagree with. This codec refuses the rest of RFC 9113 §8.1.1
//! and §8.3.1 the same way: `:authority` and `Host` naming different hosts, several
//! `content-length` fields.
//! Owns: `:authority` → `Host`, several `cookie` fields joined with `"; "`, `te` dropped
//! (hop-by-hop in HTTP/1.1), and the body's framing upstream: none, `Content-Length`, or
//! chunked when the client declared no length.
//! Must not: route, or write anything.

use http::header::{CONTENT_LENGTH, COOKIE, HOST, TE, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Uri, Version};
use pingora_http::RequestHeader;

use crate::drivers::h1::framing;
use crate::drivers::h1::request::BodyFraming;

/// Why a stream's head is not turned into a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Malformed (RFC 9113 §8.1.1): the stream is reset with PROTOCOL_ERROR.
    Malformed,
    /// `CONNECT`: busbar's tunnel is HTTP/1's; answered 400.
    Connect,
}

/// The upstream request for a stream's head, and how its body is framed. `end_stream`:
/// the HEADERS frame ended the stream (no body).
pub(crate) fn convert(
    mut parts: http::request::Parts,
    end_stream: bool,
) -> Result<(RequestHeader, BodyFraming), Refused> {
    if parts.method == Method::CONNECT {
        return Err(Refused::Connect);
    }
    let headers = &mut parts.headers;
    // `:authority` is the target's host; a `Host` that names another is malformed
    // (RFC 9113 §8.3.1). Without `:authority`, a `Host` the client sent stands.
    if let Some(authority) = parts.uri.authority() {
        let value = HeaderValue::from_str(authority.as_str()).map_err(|_| Refused::Malformed)?;
        let mut hosts = headers.get_all(HOST).iter();
        let agrees = match (hosts.next(), hosts.next()) {
            (None, _) => true,
            (Some(h), None) => h.as_bytes().eq_ignore_ascii_case(value.as_bytes()),
            _ => false,
        };
        if !agrees {
            return Err(Refused::Malformed);
        }
        headers.insert(HOST, value);
    }
    let framing = body_framing(headers, end_stream)?;
    if framing == BodyFraming::Chunked {
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    join_cookies(headers);
    // `te: trailers` (the only value HTTP/2 allows) is hop-by-hop in HTTP/1.1.
    headers.remove(TE);
    // Origin form for the HTTP/1.1 upstream; the h2 crate required a `:path`.
    let target = parts
        .uri
        .path_and_query()
        .cloned()
        .ok_or(Refused::Malformed)?;
    parts.uri = Uri::from(target);
    parts.version = Version::HTTP_2;
    Ok((RequestHeader::from(parts), framing))
}

/// How the body goes upstream: none when the stream ended with its head (or declared
/// 0 bytes), the declared length, or chunked.
fn body_framing(headers: &http::HeaderMap, end_stream: bool) -> Result<BodyFraming, Refused> {
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let length = match (lengths.next(), lengths.next()) {
        (None, _) => None,
        (Some(v), None) => Some(framing::content_length(v.as_bytes()).ok_or(Refused::Malformed)?),
        // One field only, as the HTTP/1 path has it: no next hop can pick another.
        _ => return Err(Refused::Malformed),
    };
    Ok(match length {
        Some(0) => BodyFraming::None,
        // The h2 crate holds the DATA frames to it (a mismatch resets the stream).
        Some(n) => BodyFraming::Length(n),
        None if end_stream => BodyFraming::None,
        None => BodyFraming::Chunked,
    })
}

/// Several `cookie` fields become one, joined with `"; "` (RFC 9113 §8.2.3): an HTTP/1.1
/// server reads one `Cookie` line.
fn join_cookies(headers: &mut http::HeaderMap) {
    let mut cookies = headers.get_all(COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    // Joined from valid values with `; `: valid too; kept as they were otherwise.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri).version(Version::HTTP_2);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn authority_becomes_host_and_the_target_origin_form() {
        let (req, framing) = convert(parts("https://orders.local/a/b?q=1", &[]), true).unwrap();
        assert_eq!(req.headers[HOST], "orders.local");
        assert_eq!(req.raw_path(), b"/a/b?q=1");
        assert_eq!(framing, BodyFraming::None);
    }

    #[test]
    fn cookies_are_joined_and_te_dropped() {
        let p = parts(
            "http://a/",
            &[
                ("cookie", "a=1"),
                ("cookie", "b=2"),
                ("cookie", "c=3"),
                ("te", "trailers"),
            ],
        );
        let (req, _) = convert(p, true).unwrap();
        let all: Vec<_> = req.headers.get_all(COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        assert!(req.headers.get(TE).is_none());
    }

    #[test]
    fn a_body_without_a_length_goes_chunked() {
        let (req, framing) = convert(parts("http://a/", &[]), false).unwrap();
        assert_eq!(framing, BodyFraming::Chunked);
        assert_eq!(req.headers[TRANSFER_ENCODING], "chunked");
        let (_, framing) = convert(parts("http://a/", &[("content-length", "5")]), false).unwrap();
        assert_eq!(framing, BodyFraming::Length(5));
    }

    #[test]
    fn disagreeing_hosts_and_lengths_are_malformed() {
        let p = parts("http://a/", &[("host", "b")]);
        assert_eq!(convert(p, true).err(), Some(Refused::Malformed));
        let p = parts("http://a/", &[("host", "A")]);
        assert!(convert(p, true).is_ok());
        let p = parts(
            "http://a/",
            &[("content-length", "1"), ("content-length", "1")],
        );
        assert_eq!(convert(p, false).err(), Some(Refused::Malformed));
        let p = parts("http://a/", &[("content-length", "+1")]);
        assert_eq!(convert(p, false).err(), Some(Refused::Malformed));
    }
}
