//! HTTP facts shared by the request path's layers, so that admission, the phases and the
//! drivers read them from one place (and none of them imports another for them).
//!
//! Owns: the one list of hop-by-hop header names, how an HTTP/1 header line is written,
//! and what a request's `Content-Length` declares.
//! Must not: import anything of busbar's, or hold policy (which headers busbar edits is
//! the phases' business).

use http::header::CONTENT_LENGTH;
use http::HeaderMap;

/// Headers that describe one connection and are never forwarded (RFC 9110 §7.6.1), as
/// every proxy strips them (pingora's `proxy_common.rs`, nginx, HAProxy). `Connection`
/// may name more of them. `Transfer-Encoding` is hop-by-hop too, but it frames the
/// message: each driver's codec handles it with the framing.
pub const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
];

/// Is `name` (any case) one of [`HOP_BY_HOP`]? Only names of a listed length are
/// compared: most names cost one length check.
#[inline]
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    matches!(name.len(), 2 | 7 | 10 | 16)
        && HOP_BY_HOP
            .iter()
            .any(|h| h.len() == name.len() && name.eq_ignore_ascii_case(h.as_bytes()))
}

/// One HTTP/1 header line: `name: value` and CRLF.
pub fn line(wire: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    wire.extend_from_slice(name);
    wire.extend_from_slice(b": ");
    wire.extend_from_slice(value);
    wire.extend_from_slice(b"\r\n");
}

/// The `Content-Length` a request declares, when it declares a valid one.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Can `value` go into a header line as it is: no byte that would end the line early or
/// that a peer could read as one (the check `http::HeaderValue` makes: visible ASCII,
/// space, tab and obs-text only).
pub fn value_fits_line(value: &[u8]) -> bool {
    !value.iter().any(|&b| b < b' ' && b != b'\t' || b == 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_is_the_list_in_any_case() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(name.as_bytes()));
            assert!(is_hop_by_hop(name.to_uppercase().as_bytes()));
        }
        for name in [
            "host",
            "tex",
            "t",
            "upgrades",
            "content-length",
            "transfer-encoding",
        ] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn line_values_are_what_header_values_accept() {
        for b in 0..=255u8 {
            let v = [b'a', b, b'z'];
            assert_eq!(
                value_fits_line(&v),
                http::HeaderValue::from_bytes(&v).is_ok(),
                "{b}"
            );
        }
    }
}
