//! Strict checks on a raw HTTP/1.x request head, before pingora parses it.
//!
//! pingora tolerates things a front proxy must refuse: with both `Content-Length` and
//! `Transfer-Encoding` it drops the length instead of rejecting, and its size limits
//! answer 400. Request smuggling lives in exactly these gaps, so busbar refuses
//! ambiguous framing outright (as HAProxy and Envoy do) and answers 414/431 for size,
//! 501 for a transfer coding it does not implement (RFC 9112 §6.1).
//! A second `Host` is refused here too (RFC 9112 §3.2), so busbar never routes by one
//! `Host` while the upstream reads another, and so is an absolute-form target whose
//! authority `Host` contradicts. `Connection` tokens, `Transfer-Encoding` lists and the
//! target's form are judged by `fields`, as the engine's parse judges them.
//! Owns: the verdict on one head. Pure: no I/O, no allocation.

use super::fields::{self, MAX_CONNECTION_TOKENS, TOO_MANY_TOKENS};

/// Why a head is refused; `status` and `reason` go to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> Refusal {
    Refusal {
        status: 400,
        reason,
    }
}

/// Size limits for a head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_request_line: usize,
    pub max_head_bytes: usize,
    pub max_headers: usize,
}

/// Where a head ends: the index just past `\r\n\r\n`, or `None` if it is not complete.
/// A bare `\n\n` also ends a head (so it can be refused rather than waited for).
pub fn head_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf).find_map(|nl| match buf.get(nl + 1) {
        Some(b'\n') => Some(nl + 2),
        Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => Some(nl + 3),
        _ => None,
    })
}

/// True when an incomplete head is already over a limit (so waiting for more is pointless).
pub fn too_long(buf: &[u8], limits: &HeadLimits) -> Option<Refusal> {
    let first_line = memchr::memchr(b'\n', buf).unwrap_or(buf.len());
    if first_line > limits.max_request_line {
        return Some(Refusal {
            status: 414,
            reason: "the request line is too long",
        });
    }
    if buf.len() > limits.max_head_bytes {
        return Some(Refusal {
            status: 431,
            reason: "the request headers are too large",
        });
    }
    None
}

/// The head's lines as `split(|&b| b == b'\n')` gives them, found with `memchr` (many
/// bytes a step) rather than a byte at a time.
fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(head);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr(b'\n', r) {
            Some(nl) => {
                rest = Some(&r[nl + 1..]);
                Some(&r[..nl])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ').unwrap_or(v.len());
    let end = v.iter().rposition(|&b| b != b' ').map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// How the body after an accepted head is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `Content-Length` bytes (0 when the head declares no body).
    Length(u64),
    Chunked,
}

/// Checks a complete head (through its final empty line); says how its body is framed.
pub fn check(head: &[u8], limits: &HeadLimits) -> Result<Body, Refusal> {
    if let Some(r) = too_long(head, limits) {
        return Err(r);
    }
    if memchr::memchr(0, head).is_some() {
        return Err(bad("NUL byte in the request head"));
    }
    let mut lines = lines(head);
    let request_line = lines.next().unwrap_or_default();
    let Some(request_line) = request_line.strip_suffix(b"\r") else {
        return Err(bad("bare LF line ending"));
    };
    let http10 = request_line.ends_with(b" HTTP/1.0");
    let mut words = request_line.splitn(3, |&b| b == b' ');
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let mut headers = 0usize;
    let mut connection_tokens = 0usize;
    let mut host_value: Option<&[u8]> = None;
    let mut content_length: Option<&[u8]> = None;
    let mut transfer_encoding = false;
    let mut host = false;
    for line in lines {
        if line.is_empty() {
            // What follows the final `\n` (nothing) — the head ends here.
            break;
        }
        let Some(line) = line.strip_suffix(b"\r") else {
            return Err(bad("bare LF line ending"));
        };
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(bad("obsolete line folding"));
        }
        headers += 1;
        if headers > limits.max_headers {
            return Err(Refusal {
                status: 431,
                reason: "too many request headers",
            });
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return Err(bad("a header line without a colon"));
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        // Folds without an early exit: the compiler checks many bytes at a time, and
        // a head is nearly always clean.
        let spaced = name
            .iter()
            .fold(false, |seen, &b| seen | (b == b' ') | (b == b'\t'));
        if name.is_empty() || spaced {
            return Err(bad("whitespace in or before a header name"));
        }
        // Controls but HTAB (CR among them), and DEL.
        let control = value.iter().fold(false, |seen, &b| {
            seen | ((b < 0x20) & (b != b'\t')) | (b == 0x7f)
        });
        if control {
            return Err(bad("control character in a header value"));
        }
        if name.eq_ignore_ascii_case(b"host") {
            // RFC 9112 §3.2: routing and ACLs must not read a different Host than the
            // upstream does.
            if host {
                return Err(bad("more than one Host"));
            }
            host = true;
            // Without the whitespace around it, as httparse gives it to the engine.
            host_value = Some(value.trim_ascii());
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let v = trim_ows(value);
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 19 {
                return Err(bad("Content-Length is not a plain decimal number"));
            }
            if content_length.is_some() {
                return Err(bad("more than one Content-Length"));
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if transfer_encoding {
                return Err(bad("more than one Transfer-Encoding"));
            }
            let value = trim_ows(value);
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err(fields::transfer_codings(value));
            }
            transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                if fields::connection_token(token)?.is_some() {
                    connection_tokens += 1;
                }
            }
            if connection_tokens > MAX_CONNECTION_TOKENS {
                return Err(TOO_MANY_TOKENS);
            }
        }
    }
    // Origin form says nothing of the host; `CONNECT`'s authority form is the tunnel's
    // (`fallback::connect`), not checked here.
    if !target.starts_with(b"/") && method != b"CONNECT" {
        fields::other_target(method, target, host_value)?;
    }
    // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without `Host` (as
    // nginx and Envoy do); an absolute-form target names its authority, and `CONNECT`'s
    // is the tunnel's.
    if !host && !http10 && (target.starts_with(b"/") || target == b"*") && method != b"CONNECT" {
        return Err(bad("no Host in an HTTP/1.1 request"));
    }
    if transfer_encoding && content_length.is_some() {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    if transfer_encoding && http10 {
        return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if transfer_encoding {
        return Ok(Body::Chunked);
    }
    // At most 19 digits: fits a u64.
    let length = content_length.map_or(0, |v| {
        v.iter().fold(0u64, |n, d| {
            n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        })
    });
    Ok(Body::Length(length))
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: HeadLimits = HeadLimits {
        max_request_line: 8192,
        max_head_bytes: 65536,
        max_headers: 100,
    };

    fn verdict(head: &[u8]) -> Result<Body, u16> {
        check(head, &L).map_err(|r| r.status)
    }

    #[test]
    fn ordinary_heads_pass() {
        assert_eq!(
            verdict(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Body::Length(0))
        );
        assert_eq!(
            verdict(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"),
            Ok(Body::Length(5))
        );
        assert_eq!(
            verdict(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Body::Chunked)
        );
        assert_eq!(
            verdict(b"GET / HTTP/1.1\r\nHost: a\r\nX:\tv\r\n\r\n"),
            Ok(Body::Length(0))
        );
        assert_eq!(
            verdict(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 9999999999999999999\r\n\r\n"),
            Ok(Body::Length(9_999_999_999_999_999_999))
        );
    }

    #[test]
    fn an_http11_request_without_host_is_refused() {
        assert_eq!(verdict(b"GET / HTTP/1.1\r\n\r\n"), Err(400));
        assert_eq!(verdict(b"OPTIONS * HTTP/1.1\r\n\r\n"), Err(400));
        // HTTP/1.0 has no Host requirement; an absolute-form target names its authority.
        assert_eq!(verdict(b"GET / HTTP/1.0\r\n\r\n"), Ok(Body::Length(0)));
        assert_eq!(
            verdict(b"GET http://a/ HTTP/1.1\r\n\r\n"),
            Ok(Body::Length(0))
        );
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for head in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHOST: a\r\n\r\n",
        ] {
            assert_eq!(verdict(head), Err(400), "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn codings_named_headers_and_absolute_targets_are_judged_by_fields() {
        let te = |v: &str| format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {v}\r\n\r\n");
        assert_eq!(verdict(te("gzip, chunked").as_bytes()), Err(501));
        assert_eq!(verdict(te("chunked, gzip").as_bytes()), Err(400));
        assert_eq!(verdict(te("chunked  ").as_bytes()), Ok(Body::Chunked));
        let named = |v: &str| format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: {v}\r\n\r\n");
        assert_eq!(verdict(named("x-a, close").as_bytes()), Ok(Body::Length(0)));
        assert_eq!(
            verdict(named("a,b,c,d,e,f,g,h,i").as_bytes()),
            Ok(Body::Length(0))
        );
        assert_eq!(verdict(named("a,b,c,d,e,f,g,h,i,j").as_bytes()), Err(400));
        assert_eq!(verdict(named("Host").as_bytes()), Err(400));
        assert_eq!(
            verdict(b"GET http://a/ HTTP/1.1\r\nHost:  a\t\r\n\r\n"),
            Ok(Body::Length(0))
        );
        assert_eq!(
            verdict(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Body::Length(0))
        );
        assert_eq!(verdict(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"), Err(400));
        assert_eq!(
            verdict(b"GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n"),
            Err(400)
        );
        assert_eq!(verdict(b"GET a/b HTTP/1.1\r\n\r\n"), Err(400));
    }

    #[test]
    fn sizes_get_414_and_431() {
        let long_line = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
        assert_eq!(verdict(long_line.as_bytes()), Err(414));
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(70_000)
        );
        assert_eq!(verdict(big.as_bytes()), Err(431));
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            verdict(format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes()),
            Err(431)
        );
    }

    #[test]
    fn head_end_finds_crlf_and_bare_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nbody"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
