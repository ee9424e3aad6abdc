//! The rules for the request fields whose reading decides more than one header: the
//! `Connection` tokens (RFC 9110 §7.6.1), the `Transfer-Encoding` list (RFC 9112 §6.1)
//! and the request target's form (RFC 9112 §3.2). The front door's check (`head`) and the
//! engine's parse (`request`) both judge a head by these functions, so the two cannot
//! read one head two ways.
//!
//! Owns: the verdict on one token, one value, one target. Pure: no I/O, no allocation.
//! Must not: hold the head's other rules (those are `head`'s) or build a request.

use pingora_http::authority::{is_http_family_scheme, raw_target_authority, RawTargetAuthority};

use super::head::Refusal;

/// The most tokens the `Connection` lines of one request may carry together. RFC 9110
/// puts no bound on them; each names a header removed before forwarding, so a bound keeps
/// that work small. pingora's proxy (after Envoy) refused a tenth token: so does busbar.
pub const MAX_CONNECTION_TOKENS: usize = 9;

const fn bad(reason: &'static str) -> Refusal {
    Refusal {
        status: 400,
        reason,
    }
}

/// What one `Connection` token asks of the request's hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    Close,
    KeepAlive,
    /// `upgrade`: goes with an `Upgrade` header (RFC 9110 §7.8).
    Upgrade,
    /// `HTTP2-Settings`, which only an h2c upgrade sends.
    Http2Settings,
    /// `Content-Length` or `Transfer-Encoding`: the body's framing on this hop. busbar
    /// forwards the body as it came, so its framing header is busbar's own on the next
    /// hop as well (what removing it and framing the body anew would give): kept.
    Framing,
    /// Any other header: hop-by-hop for this hop, removed before the request goes on.
    Names(&'a [u8]),
}

/// Is `b` a `tchar`, a byte of an HTTP token (RFC 9110 §5.6.2)?
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Judges one `Connection` token (as split on `,`, whitespace around it allowed). `None`:
/// an empty list element, which counts for nothing (RFC 9110 §5.6.1).
pub fn connection_token(token: &[u8]) -> Result<Option<Token<'_>>, Refusal> {
    let t = token.trim_ascii();
    let is = |s: &str| t.eq_ignore_ascii_case(s.as_bytes());
    Ok(Some(match t.len() {
        0 => return Ok(None),
        5 if is("close") => Token::Close,
        7 if is("upgrade") => Token::Upgrade,
        10 if is("keep-alive") => Token::KeepAlive,
        14 if is("http2-settings") => Token::Http2Settings,
        14 if is("content-length") => Token::Framing,
        17 if is("transfer-encoding") => Token::Framing,
        _ if !t.iter().all(|&b| tchar(b)) => {
            return Err(bad("Connection names something that is not a header name"))
        }
        // Who the client is and what it asked for: busbar routes by them and sets the
        // forwarding ones itself; a request that asks to drop them is refused (as
        // pingora's proxy did, after Envoy), not half-forwarded.
        _ if is("host")
            || is("x-forwarded-for")
            || is("x-forwarded-host")
            || is("x-forwarded-proto") =>
        {
            return Err(bad("Connection names Host or an X-Forwarded header"))
        }
        _ => Token::Names(t),
    }))
}

/// The refusal for more than [`MAX_CONNECTION_TOKENS`] tokens.
pub const TOO_MANY_TOKENS: Refusal = bad("more than 9 Connection tokens");

/// Judges a `Transfer-Encoding` value other than exactly `chunked` (RFC 9112 §6.1, §6.3):
/// a list whose last coding is `chunked`, once, names codings busbar does not implement
/// (`gzip, chunked`: 501, as nginx answers); any other list leaves the body's length
/// unknown (`chunked, gzip`, `gzip`, `chunked, chunked`: 400). Members are trimmed of
/// spaces only: a tab beside a framing value is refused, as everywhere in a head.
pub fn transfer_codings(value: &[u8]) -> Refusal {
    let trim = |m: &[u8]| {
        let start = m.iter().position(|&b| b != b' ').unwrap_or(m.len());
        let end = m.iter().rposition(|&b| b != b' ').map_or(start, |e| e + 1);
        m[start..end.max(start)].eq_ignore_ascii_case(b"chunked")
    };
    let mut members = value.rsplit(|&b| b == b',');
    let last_chunked = members.next().is_some_and(trim);
    if last_chunked && !members.any(trim) {
        Refusal {
            status: 501,
            reason: "a transfer coding other than chunked",
        }
    } else {
        bad("chunked is not the final transfer coding, or not there once")
    }
}

/// Judges a request target that is not origin form (`/…`), of a request that is not a
/// `CONNECT`: `*` is `OPTIONS`'s alone (RFC 9112 §3.2.4); any other must be an
/// absolute-form target ([`absolute_target`]).
pub fn other_target(method: &[u8], target: &[u8], host: Option<&[u8]>) -> Result<(), Refusal> {
    if target == b"*" {
        return match method {
            b"OPTIONS" => Ok(()),
            _ => Err(bad("the target * is for OPTIONS only")),
        };
    }
    absolute_target(target, host).map(|_| ())
}

/// Judges a request target that is not origin form (`/…`) or `*`: an absolute-form
/// target (RFC 9112 §3.2.2), `http`, `https`, `ws` or `wss`, whose authority is a host
/// without userinfo (RFC 9110 §4.2.4) and is what `Host` says, byte for byte, when the
/// client sent one (RFC 9112 §3.2: a client MUST send them identical; pingora's proxy and
/// HAProxy refuse a mismatch, busbar too). Returns the authority, which then replaces
/// `Host`. `host`: the `Host` value, without the whitespace around it.
pub fn absolute_target<'a>(target: &'a [u8], host: Option<&[u8]>) -> Result<&'a [u8], Refusal> {
    match raw_target_authority(target) {
        RawTargetAuthority::Absolute {
            scheme, authority, ..
        } if is_http_family_scheme(scheme) => {
            if authority.contains(&b'@') {
                return Err(bad("userinfo in the request target"));
            }
            if authority.is_empty() || http::uri::Authority::try_from(authority).is_err() {
                return Err(bad("the request target's authority is not a host"));
            }
            if host.is_some_and(|h| h != authority) {
                return Err(bad("Host differs from the request target's authority"));
            }
            Ok(authority)
        }
        RawTargetAuthority::Absolute { .. } => {
            Err(bad("the request target's scheme is not http or https"))
        }
        RawTargetAuthority::AmbiguousAuthority => Err(bad("an ambiguous request target")),
        RawTargetAuthority::None => Err(bad("the request target is not a path or a URI")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens_are_named_kept_or_refused() {
        assert_eq!(connection_token(b" Close "), Ok(Some(Token::Close)));
        assert_eq!(connection_token(b"keep-alive"), Ok(Some(Token::KeepAlive)));
        assert_eq!(connection_token(b"Upgrade"), Ok(Some(Token::Upgrade)));
        assert_eq!(connection_token(b"\t"), Ok(None));
        assert_eq!(
            connection_token(b"HTTP2-Settings"),
            Ok(Some(Token::Http2Settings))
        );
        assert_eq!(
            connection_token(b"Content-Length"),
            Ok(Some(Token::Framing))
        );
        assert_eq!(
            connection_token(b"transfer-encoding"),
            Ok(Some(Token::Framing))
        );
        assert_eq!(
            connection_token(b" X-Hop"),
            Ok(Some(Token::Names(b"X-Hop")))
        );
        for refused in [
            &b"host"[..],
            b"X-Forwarded-For",
            b"x-forwarded-host",
            b"X-FORWARDED-PROTO",
            b"\"x-a\"",
            b":authority",
            b"a b",
            b"a/b",
        ] {
            assert_eq!(
                connection_token(refused).map_err(|r| r.status),
                Err(400),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
    }

    #[test]
    fn transfer_coding_lists_get_501_or_400() {
        let status = |v: &[u8]| transfer_codings(v).status;
        assert_eq!(status(b"gzip, chunked"), 501);
        assert_eq!(status(b"gzip,chunked"), 501);
        assert_eq!(status(b"x-custom , Chunked"), 501);
        assert_eq!(status(b", chunked"), 501);
        assert_eq!(status(b"chunked, gzip"), 400);
        assert_eq!(status(b"gzip"), 400);
        assert_eq!(status(b"identity"), 400);
        assert_eq!(status(b"chunked, chunked"), 400);
        assert_eq!(status(b"chunked,gzip,chunked"), 400);
        assert_eq!(status(b"gzip,\tchunked"), 400);
        assert_eq!(status(b""), 400);
    }

    #[test]
    fn the_asterisk_is_for_options_only() {
        assert_eq!(other_target(b"OPTIONS", b"*", None), Ok(()));
        assert_eq!(
            other_target(b"GET", b"*", None).map_err(|r| r.status),
            Err(400)
        );
        assert_eq!(other_target(b"GET", b"http://a/", Some(b"a")), Ok(()));
    }

    #[test]
    fn absolute_targets_name_a_host_that_agrees_with_host() {
        assert_eq!(absolute_target(b"http://a/x?q", None), Ok(&b"a"[..]));
        assert_eq!(
            absolute_target(b"HTTPS://a:8443", Some(b"a:8443")),
            Ok(&b"a:8443"[..])
        );
        assert_eq!(absolute_target(b"http://a?q", Some(b"a")), Ok(&b"a"[..]));
        assert_eq!(
            absolute_target(b"http://[::1]:80/", None),
            Ok(&b"[::1]:80"[..])
        );
        for (target, host) in [
            (&b"http://a/x"[..], Some(&b"b"[..])),
            (b"http://a:80/x", Some(b"a")),
            (b"http://u@a/x", None),
            (b"http:///x", None),
            (b"http://a b/", None),
            (b"http:a/x", None),
            (b"http:/\\a/x", None),
            (b"ftp://a/x", None),
            (b"a/b", None),
            (b"", None),
            (b"*", None),
        ] {
            assert_eq!(
                absolute_target(target, host).map_err(|r| r.status),
                Err(400),
                "{}",
                String::from_utf8_lossy(target)
            );
        }
    }
}
