//! HTTP facts shared by the request path's layers, so that admission, the phases and the
//! drivers read them from one place (and none of them imports another for them).
//!
//! Owns: the one list of hop-by-hop header names, how an HTTP/1 header line is written,
//! what a request's `Content-Length` declares, and the filter of a request's header
//! names ([`Names`]) that spares the phases looking up headers a request does not have.
//! Must not: import anything of busbar's, or hold policy (which headers busbar edits is
//! the phases' business).

use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderName};

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

/// Does the header name `name` equal `lower` (lowercase letters, digits and `-`) in any
/// case? Compared eight bytes at a time: `eq_ignore_ascii_case` takes ~10 instructions a
/// byte, ~270 a response for its four framing names. Exact when `name` is a token (RFC
/// 9110 §5.6.2), as every name httparse or `http::HeaderName` hands out is: setting bit
/// 0x20 of a token byte gives a lowercase letter, digit or `-` only from that very byte
/// or, for a letter, its capital (the other bytes that would map there are controls).
#[inline]
pub fn eq_token_lower(name: &[u8], lower: &[u8]) -> bool {
    const CASE: u64 = 0x2020_2020_2020_2020;
    fn word(s: &[u8], at: usize) -> Option<u64> {
        Some(u64::from_le_bytes(s.get(at..at + 8)?.try_into().ok()?))
    }
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    if n < 8 {
        return name.iter().zip(lower).all(|(&a, &b)| a | 0x20 == b);
    }
    // Whole words, then the last eight bytes (overlapping what was compared).
    let mut at = 0;
    while at + 8 < n {
        if word(name, at).map(|w| w | CASE) != word(lower, at) {
            return false;
        }
        at += 8;
    }
    word(name, n - 8).map(|w| w | CASE) == word(lower, n - 8)
}

/// One HTTP/1 header line: `name: value` and CRLF.
pub fn line(wire: &mut impl crate::text::Sink, name: &[u8], value: &[u8]) {
    wire.put(name);
    wire.put(b": ");
    wire.put(value);
    wire.put(b"\r\n");
}

/// Which header names a request may have: a 64-bit filter (one bit per name, chosen by
/// its length and last byte) of the names in its head, built by the codec that parsed
/// it. [`Names::lacks`] is sure: a name whose bit is clear is not in the head, and its
/// map lookup (a hash of the name and a probe, ~60–170 instructions each, and the phases
/// make about ten for names nearly no request carries) can be skipped. A set bit only
/// says "maybe": the lookup is made. A driver that built no filter uses [`Names::ANY`].
///
/// The filter describes the head as the client sent it: a name busbar itself inserts
/// later is not in it, so it must not be asked about once busbar may have inserted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Names(u64);

impl Names {
    /// Nothing known: every name may be there.
    pub const ANY: Names = Names(u64::MAX);
    /// A head with no header lines yet.
    pub const NONE: Names = Names(0);

    /// Records a header line's name, as it came (any case).
    #[inline]
    pub fn add(&mut self, name: &[u8]) {
        self.0 |= Name::bit(name);
    }

    /// Is `name` surely not in the head?
    #[inline]
    pub fn lacks(&self, name: &HeaderName) -> bool {
        self.0 & Name::bit(name.as_str().as_bytes()) == 0
    }

    /// [`Names::lacks`] for a name's bit worked out at compile time ([`Name::of`]): one
    /// `and`, where a `HeaderName` costs its spelling's lookup.
    #[inline]
    pub fn lacks_name(&self, name: Name) -> bool {
        self.0 & name.0 == 0
    }
}

/// A header name's bit in [`Names`], for a name known when busbar is compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Name(u64);

impl Name {
    /// The bit of `name`, in any case.
    pub const fn of(name: &str) -> Name {
        Name(Name::bit(name.as_bytes()))
    }

    /// The bit of a name, in any case (a name is never empty; an empty one gets bit 0):
    /// chosen by its length and its last byte.
    #[inline]
    const fn bit(name: &[u8]) -> u64 {
        let last = match name.last() {
            Some(b) => b.to_ascii_lowercase(),
            None => 0,
        };
        1 << ((name.len().wrapping_mul(7) ^ last as usize) & 63)
    }
}

impl Default for Names {
    fn default() -> Names {
        Names::ANY
    }
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

    /// Against `eq_ignore_ascii_case`, for every token byte in every place of each name
    /// the response codec classifies, and for names one byte longer or shorter.
    #[test]
    fn token_names_compare_as_eq_ignore_ascii_case_does() {
        let token: Vec<u8> = (0u8..128)
            .filter(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
            .collect();
        let names = [
            "date",
            "te",
            "connection",
            "content-length",
            "transfer-encoding",
            "proxy-connection",
            "ratelimit-remaining",
            "ratelimit-policy",
            "x-1234567",
        ];
        for lower in names {
            let lower = lower.as_bytes();
            let upper = lower.to_ascii_uppercase();
            assert!(eq_token_lower(lower, lower));
            assert!(eq_token_lower(&upper, lower));
            for at in 0..lower.len() {
                for &b in &token {
                    let mut name = upper.clone();
                    name[at] = b;
                    assert_eq!(
                        eq_token_lower(&name, lower),
                        name.eq_ignore_ascii_case(lower),
                        "{:?} vs {:?}",
                        String::from_utf8_lossy(&name),
                        String::from_utf8_lossy(lower)
                    );
                }
            }
            assert!(!eq_token_lower(&lower[1..], lower));
            assert!(!eq_token_lower(&[lower, b"a"].concat(), lower));
        }
    }

    /// A name in the head is never reported missing, whatever its case; names that are
    /// not there mostly are.
    #[test]
    fn the_name_filter_never_misses_a_name_it_saw() {
        let seen = [
            "Host",
            "USER-AGENT",
            "accept",
            "X-Request-Id",
            "traceparent",
        ];
        let mut names = Names::NONE;
        for n in seen {
            names.add(n.as_bytes());
        }
        for n in seen {
            let name = HeaderName::from_bytes(n.as_bytes()).unwrap();
            assert!(!names.lacks(&name), "{n}");
        }
        let absent = [
            "content-type",
            "via",
            "x-forwarded-for",
            "forwarded",
            "upgrade",
            "x-user-id",
        ];
        let lacked = absent
            .iter()
            .filter(|n| names.lacks(&HeaderName::from_static(n)))
            .count();
        assert!(lacked >= absent.len() - 1, "{lacked}");
        assert!(!Names::ANY.lacks(&HeaderName::from_static("via")));
        // A name's bit made at compile time is the one made at run time, in any case.
        for n in absent.iter().chain(["X-Request-Id", "Via"].iter()) {
            let name = HeaderName::from_bytes(n.as_bytes()).unwrap();
            assert_eq!(names.lacks(&name), names.lacks_name(Name::of(n)), "{n}");
        }
        assert!(!names.lacks_name(Name::of("TRACEPARENT")));
        assert!(Names::NONE.lacks(&HeaderName::from_static("via")));
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
