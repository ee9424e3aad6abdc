//! The bearer-token check of busbar's own APIs (admin and registration).
//!
//! Owns: reading the credential of `Authorization: Bearer <token>` and comparing secrets
//! in constant time (`subtle`), so both APIs parse and compare the same way.
//! Must not: decide what a refusal says (each API keeps its own statuses and messages),
//! or serve the data plane's JWTs (that is `admission::identity`, with RFC 6750 parsing).

use http::HeaderMap;
use subtle::ConstantTimeEq;

/// The token of `Authorization: Bearer <token>`: the bytes after the exact prefix
/// `Bearer ` (what busbar's own clients and `busbar ctl` send), or `None` when the header
/// is absent or names another scheme.
pub fn token(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get(http::header::AUTHORIZATION)?
        .as_bytes()
        .strip_prefix(b"Bearer ")
}

/// Whether two secrets are equal, in time independent of where they first differ (so a
/// caller cannot find a token byte by byte). Secrets of different lengths are unequal;
/// the length itself is not hidden (compare hashes to hide it).
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn the_token_is_what_follows_the_exact_bearer_prefix() {
        assert_eq!(token(&with("Bearer s3cret")), Some(&b"s3cret"[..]));
        assert_eq!(token(&with("Bearer ")), Some(&b""[..]));
        assert_eq!(token(&with("Basic czNjcmV0")), None);
        assert_eq!(token(&with("bearer s3cret")), None);
        assert_eq!(token(&with("Bearers3cret")), None);
        assert_eq!(token(&HeaderMap::new()), None);
    }

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3creT"));
        assert!(!same_secret(b"s3cret", b"s3cre"));
        assert!(!same_secret(b"", b"x"));
        assert!(same_secret(b"", b""));
    }
}
