//! The HTTP/1.1 request codec of busbar's own engine: a complete request head, as the
//! front door read it, parsed once (httparse) into the request for upstream.
//!
//! Owns: which heads the engine takes (clean HTTP/1.1 or HTTP/1.0 within the limits, in
//! origin or absolute form, a body framed by one plain `Content-Length` or by
//! `Transfer-Encoding: chunked` alone), how its body is framed, whether it is an upgrade
//! busbar passes on (and which it ignores: `h2c`, HTTP/1.0, with a body), which headers
//! `Connection` names, and turning one into a `RequestHeader` without a second scan.
//! Must not: route, or write anything.

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderName, HeaderValue, Method};
use pingora_http::RequestHeader;

use super::fields::{self, Token, MAX_CONNECTION_TOKENS};
use super::head::HeadLimits;
use super::MAX_HEADERS;
use crate::base::http::{eq_token_lower, is_hop_by_hop, Names};

/// How a request's body is framed (RFC 9112 §6.3), as [`parse`] read its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body (no framing header, or `Content-Length: 0`).
    None,
    Length(u64),
    Chunked,
}

/// A head [`parse`] took.
pub(super) struct Parsed {
    pub(super) req: RequestHeader,
    /// The connection ends after this request: `Connection: close`, or an HTTP/1.0
    /// request without `Connection: keep-alive`.
    pub(super) close: bool,
    pub(super) body: BodyFraming,
    /// The client speaks HTTP/1.0: no 1xx, no chunked response for it.
    pub(super) http10: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request with a body: the client may wait
    /// for a `100 Continue` before it sends the body (RFC 9110 §10.1.1).
    pub(super) expect: bool,
    /// An upgrade (`Connection: upgrade` and `Upgrade`, see [`upgrade_of`]): the request
    /// keeps its `Upgrade` header, and a `101` answer turns the connection into a tunnel.
    pub(super) upgrade: bool,
    /// The headers `Connection` names (RFC 9110 §7.6.1): busbar's phases see them, the
    /// upstream does not. Empty (no allocation) for nearly every request.
    pub(super) nominated: Vec<HeaderName>,
    /// The names of the head's header lines (`base::http::Names`), for the phases.
    pub(super) names: Names,
}

/// Is this an upgrade busbar passes on? The client asked for one (`Connection` names
/// `upgrade`, RFC 9110 §7.8) in an HTTP/1.1 request without a body, and does not offer
/// `h2c`. Any other upgrade is ignored (as §7.8 lets a server do) and the request is
/// served as HTTP/1.1: an HTTP/1.0 one must be ignored (§7.8); `h2c` was removed from
/// HTTP/2 (RFC 9113 §3.1) and nginx ignores it too; and with a body, the switch would
/// race the body's end (WebSocket's handshake is a bodiless GET).
fn upgrade_of(value: Option<&[u8]>, named: bool, http10: bool, body: BodyFraming) -> bool {
    let Some(value) = value else {
        return false;
    };
    named
        && !http10
        && body == BodyFraming::None
        && !value
            .split(|&b| b == b',')
            .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"h2c"))
}

/// Does a `Connection` value (an upstream response's) ask for anything besides `close` /
/// `keep-alive`? Other tokens name more hop-by-hop headers (or an upgrade), which the
/// response codec then finds and drops. Sets `close` when it says close.
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
/// then case-insensitively, a word at a time: `raw` is a token, as httparse parses
/// names, see `eq_token_lower`); `HeaderName::from_bytes` (a lower-casing copy and a
/// table walk, several times the cost of these compares) parses the rest.
fn request_name(raw: &[u8]) -> Option<HeaderName> {
    use http::header::{
        ACCEPT, ACCEPT_ENCODING, ACCEPT_LANGUAGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE,
        COOKIE, HOST, ORIGIN, REFERER, USER_AGENT,
    };
    let is = |s: &str| eq_token_lower(raw, s.as_bytes());
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

/// Parses a complete head for this path: the request for upstream, its body's framing
/// and how the connection goes on. `None`: not for this path, or not clean enough to be
/// sure; [`head::check`](super::head::check) then judges the head (and refuses every head
/// this declines but bytes httparse or the URI parser refuse that the check lets through,
/// which pingora serves or refuses).
///
/// This is also the front door's check for the heads it accepts, so a head is not scanned
/// a second time: everything accepted here is a head `head::check` accepts, with the same
/// body framing (a unit test and, in debug builds, an assertion hold it to that).
/// httparse (strict by default) refuses NUL and other controls, whitespace in or before
/// a name, obsolete line folding and bad request lines; what it lets through is
/// checked here: bare LF line endings, empty lines before the request line, the size
/// limits, a `Content-Length` that is not one line of 1 to 19 digits, a
/// `Transfer-Encoding` other than one line of exactly `chunked` (or beside a length, or
/// in HTTP/1.0), a `Connection` token `fields` refuses, an absolute-form target `fields`
/// refuses. A second `Host` (which the front door refuses) or a second `Authorization`
/// (which the phases refuse) is not for this path either.
pub(super) fn parse(head: &Bytes, limits: &HeadLimits) -> Option<Parsed> {
    if head.len() > limits.max_head_bytes || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    // Left uninitialized: httparse writes the lines it finds (an initialized array was
    // 4 KiB of stores a request, ~300 instructions).
    let mut lines = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    // Room for more lines than the usual head has, should this one need it.
    let mut more;
    let mut parsed = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    match config.parse_request_with_uninit_headers(&mut parsed, head, &mut lines) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        // More lines than the usual head has room for: allowed by the limits, so this
        // rare head gets room for all of them, on the heap.
        Err(httparse::Error::TooManyHeaders) if limits.max_headers > MAX_HEADERS => {
            more = vec![httparse::EMPTY_HEADER; limits.max_headers];
            parsed = httparse::Request::new(&mut more);
            if parsed.parse(head) != Ok(httparse::Status::Complete(head.len())) {
                return None;
            }
        }
        _ => return None,
    }
    // One call, no `Result` around the request: each layer a `Parsed` passes through
    // is a copy of it (measured with callgrind, issue 20).
    parse_lines(head, limits, &parsed)
}

/// The request in a head httparse parsed whole.
#[inline(always)]
fn parse_lines(head: &Bytes, limits: &HeadLimits, parsed: &httparse::Request) -> Option<Parsed> {
    let (method, path) = (parsed.method?, parsed.path?);
    // Strict httparse: `METHOD SP path SP HTTP/1.1`, so its line feed is at this index.
    // The method starts the head: httparse skips empty lines before it.
    let request_line = method.len() + path.len() + 11;
    if method.as_ptr() != head.as_ptr()
        || request_line > limits.max_request_line
        || !matches!(parsed.version, Some(0 | 1))
        || parsed.headers.len() > limits.max_headers
    {
        return None;
    }
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    // An absolute-form target (a client whose `HTTP_PROXY` is busbar) is checked once
    // its `Host` is known (below). `*` is `OPTIONS`'s alone (RFC 9112 §3.2.4).
    let asterisk = path == "*";
    if asterisk && method != Method::OPTIONS {
        return None;
    }
    let absolute = !path.starts_with('/') && !asterisk;
    // Set field by field: the builder moves the whole head through a closure per step.
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    if !absolute {
        parts.uri = http::Uri::from_maybe_shared(head.slice_ref(path.as_bytes())).ok()?;
    }
    // `Via` and the access log name the client's protocol.
    if parsed.version == Some(0) {
        parts.version = http::Version::HTTP_10;
    }
    parts.headers.reserve(parsed.headers.len());
    let http10 = parsed.version == Some(0);
    let mut close = false;
    let mut keep_alive = false;
    let mut length: Option<u64> = None;
    let (mut chunked, mut expect) = (false, false);
    let (mut host, mut authorization) = (None, false);
    // `Upgrade`'s value, and whether `Connection` names it.
    let (mut upgrade, mut upgrade_named) = (None, false);
    // The headers `Connection` names: removed before the request goes upstream.
    let mut tokens = 0;
    let mut nominated = Vec::new();
    let mut names = Names::NONE;
    for h in parsed.headers.iter() {
        // Every line's name, also those that do not go into the map.
        names.add(h.name.as_bytes());
        // Each line before this one ended in CRLF (the last one: `ends_with` above).
        let at = h.name.as_ptr() as usize - head.as_ptr() as usize;
        if head[at - 2] != b'\r' {
            return None;
        }
        let name = request_name(h.name.as_bytes())?;
        if name == UPGRADE {
            // One line; it goes upstream only for an upgrade (added below).
            if upgrade.replace(h.value).is_some() {
                return None;
            }
            continue;
        }
        if name.as_str() == HTTP2_SETTINGS {
            // Connection-specific (RFC 9113 §3.1): only ever part of an h2c upgrade,
            // which busbar ignores.
            continue;
        }
        // A framing value is the line's rest after `:` and spaces, up to spaces: no tab
        // httparse trimmed, which the front door reads otherwise.
        if name == TRANSFER_ENCODING || name == CONTENT_LENGTH {
            let value_at = h.value.as_ptr() as usize - head.as_ptr() as usize;
            let between = head.get(at + h.name.len()..value_at)?;
            let clean = matches!(between.split_first(), Some((b':', rest)) if rest.iter().all(|&b| b == b' '));
            let after = head.get(value_at + h.value.len()..)?;
            let end = after.iter().position(|&b| b != b' ')?;
            if !clean || after[end] != b'\r' {
                return None;
            }
        }
        if name == TRANSFER_ENCODING {
            // Exactly `chunked`, once: the front door refuses the rest (400 or 501).
            if chunked || http10 || !h.value.eq_ignore_ascii_case(b"chunked") {
                return None;
            }
            chunked = true;
        }
        if name == CONTENT_LENGTH {
            // The value has no tab around it (checked above): the response side's
            // reading of a length is this one's.
            if length.is_some() {
                return None;
            }
            length = Some(super::framing::content_length(h.value)?);
        }
        if name == EXPECT {
            // A list (RFC 9110 §10.1.1): a `100-continue` member is the client's promise
            // to wait; any other goes upstream as it came (as pingora's proxy, HAProxy
            // and Envoy pass it; RFC 9110 lets a server refuse it with 417, busbar's
            // upstream can).
            let continues = h
                .value
                .split(|&b| b == b',')
                .any(|m| m.trim_ascii().eq_ignore_ascii_case(b"100-continue"));
            expect |= continues;
            if http10 && continues {
                // RFC 9110 §10.1.1: an HTTP/1.0 request's expectation is ignored; not
                // forwarded either, or the upstream would answer it with a 100.
                continue;
            }
        }
        if name == CONNECTION {
            for t in h.value.split(|&b| b == b',') {
                let Some(token) = fields::connection_token(t).ok()? else {
                    continue;
                };
                tokens += 1;
                match token {
                    Token::Close => close = true,
                    Token::KeepAlive => keep_alive = true,
                    Token::Upgrade => upgrade_named = true,
                    Token::Http2Settings | Token::Framing => {}
                    // Rare: the one allocation is for requests that name one.
                    Token::Names(n) => nominated.push(HeaderName::from_bytes(n).ok()?),
                }
            }
            if tokens > MAX_CONNECTION_TOKENS {
                return None;
            }
        }
        if name == HOST && host.replace(h.value).is_some()
            || name == AUTHORIZATION && std::mem::replace(&mut authorization, true)
        {
            return None;
        }
        if is_hop_by_hop(name.as_str().as_bytes()) {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value)).ok()?;
        // Straight into the map: pingora's `append_header` would turn each name into a
        // title-case copy and parse it back.
        parts.headers.try_append(name, value).ok()?;
    }
    let body = match (length, chunked) {
        (Some(_), true) => return None,
        (Some(0), false) | (None, false) => BodyFraming::None,
        (Some(n), false) => BodyFraming::Length(n),
        (None, true) => BodyFraming::Chunked,
    };
    let upgrading = upgrade_of(upgrade, upgrade_named, http10, body);
    if let Some(value) = upgrade.filter(|_| upgrading) {
        let value = HeaderValue::from_maybe_shared(head.slice_ref(value)).ok()?;
        parts.headers.insert(UPGRADE, value);
    }
    if host.is_none() && !http10 && !absolute {
        // RFC 9112 §3.2: an HTTP/1.1 request without `Host` (the front door's 400).
        return None;
    }
    if absolute {
        // RFC 9112 §3.2.2: the target's authority replaces `Host` (which, when sent, must
        // say the same: `fields::absolute_target`).
        let authority = fields::absolute_target(path.as_bytes(), host).ok()?;
        if host.is_none() {
            let value = HeaderValue::from_maybe_shared(head.slice_ref(authority)).ok()?;
            parts.headers.insert(HOST, value);
            names.add(HOST.as_str().as_bytes());
        }
    }
    // No case map: names go upstream in canonical form.
    let mut req = RequestHeader::from(parts);
    if absolute {
        // Kept as it came, as pingora keeps it: the path in the URI, the whole target
        // for the phases (routing's host, the mesh fallback's count, origin form
        // upstream: `phases::upstream_head`).
        req.set_raw_path(path.as_bytes()).ok()?;
    }
    Some(Parsed {
        req,
        close: close || http10 && !keep_alive,
        expect: expect && !http10 && body != BodyFraming::None,
        body,
        http10,
        upgrade: upgrading,
        nominated,
        names,
    })
}

/// `HTTP2-Settings`, which only an h2c upgrade sends.
const HTTP2_SETTINGS: &str = "http2-settings";

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
        use super::super::head::Body;
        let parsed = parse(&Bytes::copy_from_slice(head), &LIMITS);
        if let Some(p) = &parsed {
            let framing = match p.body {
                BodyFraming::None => Body::Length(0),
                BodyFraming::Length(n) => Body::Length(n),
                BodyFraming::Chunked => Body::Chunked,
            };
            assert_eq!(
                super::super::head::check(head, &LIMITS),
                Ok(framing),
                "parse took {:?}",
                String::from_utf8_lossy(head)
            );
        }
        parsed.is_some()
    }

    #[test]
    fn bodies_and_http10_are_framed_as_the_front_door_frames_them() {
        let p = |h: &[u8]| parse(&Bytes::copy_from_slice(h), &LIMITS);
        let got = p(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(
            (got.body, got.close, got.expect),
            (BodyFraming::Length(12), false, false)
        );
        let got =
            p(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\nExpect: 100-continue\r\n\r\n")
                .unwrap();
        assert_eq!((got.body, got.expect), (BodyFraming::Chunked, true));
        let got = p(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(got.http10 && got.close);
        let got = p(b"POST / HTTP/1.0\r\nConnection: Keep-Alive\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n").unwrap();
        assert!(got.http10 && !got.close && !got.expect);
        assert!(got.req.headers.get("expect").is_none());
        for h in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\t\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\t5\r\n\r\n",
        ] {
            assert!(p(h).is_none(), "{}", String::from_utf8_lossy(h));
        }
        for ok in [
            &b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"[..],
            b"PUT /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        ] {
            assert!(agrees(ok), "{}", String::from_utf8_lossy(ok));
        }
    }

    #[test]
    fn upgrades_are_kept_only_where_busbar_passes_them_on() {
        let p = |h: &[u8]| parse(&Bytes::copy_from_slice(h), &LIMITS);
        let upgrade = |h: &[u8]| {
            let got = p(h).unwrap();
            let kept = got
                .req
                .headers
                .get("upgrade")
                .map(|v| v.as_bytes().to_vec());
            assert!(got.req.headers.get("connection").is_none());
            assert!(got.req.headers.get("http2-settings").is_none());
            assert_eq!(
                got.upgrade,
                kept.is_some(),
                "{}",
                String::from_utf8_lossy(h)
            );
            kept
        };
        let ws = Some(b"websocket".to_vec());
        assert_eq!(
            upgrade(
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            ),
            ws
        );
        // Firefox's.
        assert_eq!(
            upgrade(
                b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n"
            ),
            ws
        );
        for ignored in [
            // Not named by `Connection`.
            &b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n",
            // HTTP/1.0, h2c, a body.
            b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 1\r\n\r\n",
        ] {
            assert_eq!(upgrade(ignored), None, "{}", String::from_utf8_lossy(ignored));
            assert!(agrees(ignored), "{}", String::from_utf8_lossy(ignored));
        }
        // `Connection` naming another header too: that one is dropped, the upgrade kept.
        let named = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade, x-hop\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(upgrade(named), ws);
        assert_eq!(p(named).unwrap().nominated, ["x-hop"]);
        // Two `Upgrade` lines: not for this path.
        let two =
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: a\r\nUpgrade: b\r\n\r\n";
        assert!(p(two).is_none());
    }

    #[test]
    fn parse_takes_only_what_the_front_door_accepts() {
        for ok in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET /a?b=c HTTP/1.1\r\nHost: a\r\nX:\tv \r\nContent-Length: 0\r\n\r\n",
            b"DELETE /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Empty:\r\n\r\n",
        ] {
            assert!(agrees(ok), "{}", String::from_utf8_lossy(ok));
        }
        // RFC 9112 §3.2: no Host in HTTP/1.1 is the front door's 400; not in HTTP/1.0.
        assert!(!agrees(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(agrees(b"GET / HTTP/1.0\r\n\r\n"));
        let line = |n: usize| format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(n));
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
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n",
            b"GET http://u@a/ HTTP/1.1\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET ftp://a/ HTTP/1.1\r\n\r\n",
            b"GET http:/\\a/ HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-forwarded-for\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: \"x\"\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: a,b,c,d,e,f,g,h,i,j\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: a\r\nAUTHORIZATION: b\r\n\r\n",
        ] {
            assert!(!agrees(refused), "{}", String::from_utf8_lossy(refused));
        }
    }

    #[test]
    fn named_headers_expectations_and_absolute_targets_are_taken() {
        let p = |h: &[u8]| parse(&Bytes::copy_from_slice(h), &LIMITS);
        for ok in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-a, close\r\nX-A: 1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: a,b,c,d,e,f,g,h,i\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  chunked  \r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 \r\n\r\n",
            b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://a:8080?q HTTP/1.0\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a;b/c HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(agrees(ok), "{}", String::from_utf8_lossy(ok));
        }
        // Named headers stay in the request (routing and admission read them) and are
        // listed for removal; framing ones are not.
        let got = p(
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nConnection: X-A, content-length, close\r\nX-B: 2\r\n\r\n",
        )
        .unwrap();
        assert_eq!(got.nominated, ["x-a"]);
        assert!(got.close && got.req.headers.contains_key("x-a"));
        // Any expectation goes on; only `100-continue` makes the client wait.
        let got = p(
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: a=b, 100-Continue\r\nContent-Length: 1\r\n\r\n",
        )
        .unwrap();
        assert!(got.expect);
        assert_eq!(got.req.headers["expect"], "a=b, 100-Continue");
        let got =
            p(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: a=b\r\nContent-Length: 1\r\n\r\n").unwrap();
        assert!(!got.expect);
        assert_eq!(got.req.headers["expect"], "a=b");
        // Absolute form: the target's authority is the Host; the target stays whole for
        // the phases (they route on its host and send it in origin form).
        let got = p(b"GET http://a:8080/x?q HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(got.req.headers["host"], "a:8080");
        assert_eq!(got.req.raw_path(), b"http://a:8080/x?q");
        assert_eq!(got.req.uri.path(), "/x");
    }

    #[test]
    fn a_head_with_more_lines_than_the_usual_room_is_taken_within_the_limit() {
        let limits = HeadLimits {
            max_request_line: 64,
            max_head_bytes: 65536,
            max_headers: 200,
        };
        // `n` header lines, `Host` among them.
        let head = |n: usize| {
            let lines: String = (1..n).map(|i| format!("X-{i}: v\r\n")).collect();
            Bytes::from(format!("GET / HTTP/1.1\r\nHost: a\r\n{lines}\r\n"))
        };
        let got = parse(&head(MAX_HEADERS + 50), &limits).unwrap();
        assert_eq!(got.req.headers.len(), MAX_HEADERS + 50);
        assert!(parse(&head(201), &limits).is_none());
        assert_eq!(
            super::super::head::check(&head(200), &limits),
            Ok(super::super::head::Body::Length(0))
        );
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
