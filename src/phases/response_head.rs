//! The one response-head editor: what busbar changes in an upstream's response head
//! before the client gets it, for a head held as a map or written as lines.
//!
//! Owns: which of the upstream's header lines go on (hop-by-hop ones never, from
//! `base::http`'s one list; `Date` and `Connection` are busbar's; `RateLimit-*` are
//! busbar's when admission set them), and what busbar adds: admission's `RateLimit-*`,
//! the route's header edits, the translation's headers.
//! Must not: frame or parse the head (the drivers' codecs do), or write to the client.

use pingora_error::Result;
use pingora_http::ResponseHeader;

use super::ctx::RequestCtx;
use super::forwarding;
use crate::admission::reject::{rate_lines, RATE_HEADERS};
use crate::admission::RateInfo;
use crate::base::http::{eq_token_lower, is_hop_by_hop};

/// Edits a response head held as a map: admission's `RateLimit-*`, the route's edits,
/// the translation's headers. (Hop-by-hop headers are removed by whoever built the map:
/// pingora's proxy, or [`Kind`] for busbar's own codec.)
pub(crate) fn edit(ctx: &RequestCtx, resp: &mut ResponseHeader) -> Result<()> {
    if let Some(a) = &ctx.admitted {
        a.apply_response(resp);
    }
    if let Some(route) = &ctx.route {
        if !route.config.response_headers.is_empty() {
            forwarding::edit_response(resp, &route.config.response_headers)?;
        }
    }
    crate::translate::response(ctx.grpc_web.as_ref(), resp)
}

/// How a driver that writes heads as lines applies busbar's edits.
pub(crate) enum Form {
    /// The upstream's lines go on as they came, less those [`Kind::keep`] drops, and
    /// busbar's lines ([`own_lines`]) follow: nothing is built.
    Lines {
        /// Admission's `RateLimit-*` values, which replace the upstream's.
        rate: Option<RateInfo>,
    },
    /// The route edits response headers (or translates): it needs the upstream's
    /// headers as a map to see and change them, then [`edit`].
    Map,
}

/// The [`Form`] for the request's route.
pub(crate) fn form(ctx: &RequestCtx) -> Form {
    let edits = ctx
        .route
        .as_ref()
        .is_some_and(|r| !r.config.response_headers.is_empty() || ctx.grpc_web.is_some());
    if edits {
        Form::Map
    } else {
        Form::Lines {
            rate: ctx.admitted.as_ref().and_then(|a| a.rate),
        }
    }
}

/// busbar's own lines after the upstream's kept ones: admission's `RateLimit-*`.
pub(crate) fn own_lines(out: &mut Vec<u8>, rate: Option<&RateInfo>) {
    if let Some(r) = rate {
        rate_lines(out, r);
    }
}

/// What a response header name (as received, any case) is to the editor and to the
/// codec that frames the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// One of [`HOP_BY_HOP`](crate::base::http::HOP_BY_HOP) other than `Connection`.
    Hop,
    /// `Connection`: a hop-by-hop header that may name more of them.
    Connection,
    Date,
    ContentLength,
    TransferEncoding,
    /// One of the `RateLimit-*` headers admission sets.
    Rate,
    Other,
}

impl Kind {
    /// Compares only names of the right length: a few instructions for most names.
    /// `name` is a token, as httparse and `HeaderName` give it (`eq_token_lower`).
    pub(crate) fn of(name: &[u8]) -> Kind {
        let is = |s: &str| eq_token_lower(name, s.as_bytes());
        match name.len() {
            4 if is("date") => Kind::Date,
            10 if is("connection") => Kind::Connection,
            14 if is("content-length") => Kind::ContentLength,
            17 if is("transfer-encoding") => Kind::TransferEncoding,
            15 | 19 if RATE_HEADERS.iter().any(|h| is(h)) => Kind::Rate,
            _ if is_hop_by_hop(name) => Kind::Hop,
            _ => Kind::Other,
        }
    }

    /// Never forwarded.
    pub(crate) fn hop_by_hop(self) -> bool {
        matches!(self, Kind::Hop | Kind::Connection)
    }

    /// Does an upstream line of this kind go on to the client, as a line? `encoded`: the
    /// response has `Transfer-Encoding`, which overrides a `Content-Length` (that must
    /// then go, RFC 9112 §6.3); `own_rate`: busbar writes its own `RateLimit-*`.
    pub(crate) fn keep(self, encoded: bool, own_rate: bool) -> bool {
        match self {
            Kind::Hop | Kind::Connection | Kind::Date => false,
            Kind::ContentLength => !encoded,
            Kind::Rate => !own_rate,
            Kind::TransferEncoding | Kind::Other => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_one_hop_by_hop_list() {
        for name in crate::base::http::HOP_BY_HOP {
            assert!(Kind::of(name.as_bytes()).hop_by_hop(), "{name}");
            assert!(!Kind::of(name.as_bytes()).keep(false, false), "{name}");
        }
        for name in ["x-a", "Content-Type", "tex", "upgrades"] {
            assert_eq!(Kind::of(name.as_bytes()), Kind::Other, "{name}");
        }
        assert_eq!(Kind::of(b"Date"), Kind::Date);
        assert_eq!(Kind::of(b"RateLimit-Reset"), Kind::Rate);
        assert_eq!(Kind::of(b"ratelimit-remaining"), Kind::Rate);
    }
}
