//! The gRPC shape of busbar's own answers: who is calling ([`Caller`], from the
//! request's `content-type`), and the Trailers-Only head a gRPC or gRPC-Web caller gets
//! instead of a JSON body.
//!
//! A Trailers-Only response (gRPC over HTTP/2, "Responses") is HTTP 200 with
//! `content-type`, `grpc-status` and `grpc-message` in the one header block and no body;
//! on HTTP/2 that block is one HEADERS frame with END_STREAM (a client that gets the
//! status in headers without END_STREAM takes them for initial metadata, then reports
//! missing trailers). gRPC-Web says the same over HTTP/1.1 and HTTP/2: Envoy's
//! `grpc_web` filter passes a Trailers-Only answer on with `grpc-status` as a header
//! and its own content type (`application/grpc-web+proto`,
//! `application/grpc-web-text+proto`), and so does busbar.
//!
//! Owns: [`Caller`], `grpc-message` percent-encoding, [`trailers_only`].
//! Must not: choose the status (`reply` maps each cause), or write to a client.

use std::borrow::Cow;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use pingora_http::ResponseHeader;

/// Who sent the request, as its `content-type` says: the shape busbar's own answers take.
/// Read once per request, in setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Caller {
    /// Anything else (JSON callers of a translating route included): the JSON answer.
    #[default]
    Http,
    /// `application/grpc`, `application/grpc+proto`, `application/grpc+json`, …
    Grpc,
    /// `application/grpc-web`, `application/grpc-web+proto`, …
    GrpcWeb,
    /// `application/grpc-web-text`, `application/grpc-web-text+proto`, … (base64).
    GrpcWebText,
}

impl Caller {
    /// The caller by the request's `content-type`: a media type busbar's answers have a
    /// gRPC shape for, compared without regard to case (RFC 9110 §8.3.1), followed by a
    /// `+suffix`, parameters or nothing.
    pub fn of(headers: &HeaderMap) -> Caller {
        match headers.get(CONTENT_TYPE) {
            Some(ct) => Caller::of_content_type(ct.as_bytes()),
            None => Caller::Http,
        }
    }

    fn of_content_type(ct: &[u8]) -> Caller {
        // Longest first: `application/grpc` is a prefix of the other two.
        const KINDS: [(&[u8], Caller); 3] = [
            (b"application/grpc-web-text", Caller::GrpcWebText),
            (b"application/grpc-web", Caller::GrpcWeb),
            (b"application/grpc", Caller::Grpc),
        ];
        for (prefix, caller) in KINDS {
            let (Some(head), Some(rest)) = (ct.get(..prefix.len()), ct.get(prefix.len()..)) else {
                continue;
            };
            if head.eq_ignore_ascii_case(prefix)
                && matches!(rest.first(), None | Some(b'+' | b';' | b' ' | b'\t'))
            {
                return caller;
            }
        }
        Caller::Http
    }

    /// Does the caller speak gRPC (plain or Web)?
    pub fn is_grpc(self) -> bool {
        self != Caller::Http
    }

    /// The `content-type` of busbar's answer to this caller (Envoy's for gRPC-Web).
    fn content_type(self) -> &'static str {
        match self {
            Caller::Http | Caller::Grpc => "application/grpc",
            Caller::GrpcWeb => "application/grpc-web+proto",
            Caller::GrpcWebText => "application/grpc-web-text+proto",
        }
    }
}

/// What `grpc-message` percent-encodes (gRPC over HTTP/2: every byte outside
/// 0x20–0x7E, and `%`); bytes past ASCII are always encoded.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// `grpc-status` values, by code.
const STATUS: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// A Trailers-Only head for `caller`: 200, its content type, `grpc-status: status` and
/// `grpc-message` saying `code: message` (busbar's cause code first, so a client sees
/// which refusal it was), percent-encoded, and `content-length: 0` (an HTTP/1.1
/// gRPC-Web caller needs the framing; on HTTP/2 it agrees with the empty body).
pub fn trailers_only(caller: Caller, status: u8, code: &str, message: &str) -> ResponseHeader {
    let mut h = ResponseHeader::build(200, Some(4)).expect("200 is a valid status");
    let status = STATUS.get(status as usize).copied().unwrap_or("2");
    let _ = h.insert_header(
        CONTENT_TYPE,
        HeaderValue::from_static(caller.content_type()),
    );
    let _ = h.insert_header("grpc-status", HeaderValue::from_static(status));
    let _ = h.insert_header("grpc-message", grpc_message(code, message));
    let _ = h.insert_header(CONTENT_LENGTH, HeaderValue::from_static("0"));
    h
}

/// `code: message`, percent-encoded as `grpc-message` requires (only ASCII outside the
/// visible range and `%` change; busbar's own messages have none, so one allocation).
fn grpc_message(code: &str, message: &str) -> HeaderValue {
    let mut text = String::with_capacity(code.len() + 2 + message.len());
    text.push_str(code);
    text.push_str(": ");
    text.push_str(message);
    let text = match Cow::from(utf8_percent_encode(&text, GRPC_MESSAGE)) {
        Cow::Borrowed(_) => text,
        Cow::Owned(encoded) => encoded,
    };
    // Percent-encoded text is visible ASCII: always a valid header value.
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_by_content_type() {
        let of = |ct: &[u8]| Caller::of_content_type(ct);
        assert_eq!(of(b"application/grpc"), Caller::Grpc);
        assert_eq!(of(b"application/grpc+proto"), Caller::Grpc);
        assert_eq!(of(b"Application/GRPC+json"), Caller::Grpc);
        assert_eq!(of(b"application/grpc; charset=utf-8"), Caller::Grpc);
        assert_eq!(of(b"application/grpc-web"), Caller::GrpcWeb);
        assert_eq!(of(b"application/grpc-web+proto"), Caller::GrpcWeb);
        assert_eq!(of(b"application/grpc-web-text"), Caller::GrpcWebText);
        assert_eq!(of(b"application/grpc-web-text+proto"), Caller::GrpcWebText);
        for http in [
            &b""[..],
            b"application/json",
            b"application/grpcx",
            b"application/grpc-webby",
            b"application/gr",
            b"text/plain",
        ] {
            assert_eq!(
                of(http),
                Caller::Http,
                "{:?}",
                String::from_utf8_lossy(http)
            );
        }
        let mut h = HeaderMap::new();
        assert_eq!(Caller::of(&h), Caller::Http);
        h.insert(CONTENT_TYPE, "application/grpc".parse().unwrap());
        assert_eq!(Caller::of(&h), Caller::Grpc);
        assert!(Caller::GrpcWebText.is_grpc() && !Caller::Http.is_grpc());
    }

    #[test]
    fn a_trailers_only_head_with_the_message_percent_encoded() {
        let h = trailers_only(
            Caller::Grpc,
            12,
            "no_route",
            "no route matches this request",
        );
        assert_eq!(h.status, 200);
        assert_eq!(h.headers["content-type"], "application/grpc");
        assert_eq!(h.headers["grpc-status"], "12");
        assert_eq!(
            h.headers["grpc-message"],
            "no_route: no route matches this request"
        );
        assert_eq!(h.headers["content-length"], "0");
        let h = trailers_only(Caller::GrpcWebText, 8, "rate_limited", "100% used\nnaïve");
        assert_eq!(h.headers["content-type"], "application/grpc-web-text+proto");
        assert_eq!(h.headers["grpc-status"], "8");
        assert_eq!(
            h.headers["grpc-message"],
            "rate_limited: 100%25 used%0Ana%C3%AFve"
        );
        let h = trailers_only(Caller::GrpcWeb, 99, "x", "y");
        assert_eq!(h.headers["content-type"], "application/grpc-web+proto");
        assert_eq!(h.headers["grpc-status"], "2", "an unknown code is UNKNOWN");
    }
}
