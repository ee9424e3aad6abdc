//! gRPC-Web → gRPC: content types, the base64 text mode, the trailers frame and CORS.
//!
//! Owns: per-request gRPC-Web state ([`WebCall`]) and the pure framing functions the
//! proxy phases call: request headers and body on the way up, response headers, body
//! and trailers on the way down (trailers become the 0x80 frame at the end of the body).
//! Must not: pick instances or touch the connection; the normal proxy path carries the call.

use std::time::Duration;

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use pingora_http::{RequestHeader, ResponseHeader};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// How long a browser may cache a preflight answer: an hour spares most preflights
/// without keeping a changed policy stale for long.
pub const DEFAULT_CORS_MAX_AGE: Duration = Duration::from_secs(3600);

/// Response headers a browser script may read: the status lives in them for Trailers-Only replies.
const EXPOSE: &str = "grpc-status,grpc-message,grpc-status-details-bin";
/// Request headers allowed when the preflight names none.
const ALLOW_HEADERS: &str = "content-type,x-grpc-web,x-user-agent,grpc-timeout,authorization";

/// A route's gRPC-Web settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcWebSettings {
    /// Origins allowed by CORS; `*` allows any. Empty: no CORS answers at all.
    pub cors_origins: Vec<String>,
    pub cors_max_age: Duration,
}

impl GrpcWebSettings {
    fn allowed(&self, origin: &[u8]) -> bool {
        self.cors_origins
            .iter()
            .any(|o| o == "*" || o.as_bytes().eq_ignore_ascii_case(origin))
    }
}

/// Binary or base64 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Binary,
    Text,
}

/// One gRPC-Web request's translation state.
#[derive(Debug)]
pub struct WebCall {
    mode: Mode,
    /// The downstream content type, given back on the response.
    content_type: HeaderValue,
    /// `+proto` and the like, kept on the upstream content type.
    suffix: String,
    /// Origin to allow in the response, when CORS allows it.
    origin: Option<HeaderValue>,
    /// Text mode: the request body's decoding.
    decoder: Decoder,
    /// Text mode: response bytes not yet encoded (fewer than 3).
    encode_carry: Vec<u8>,
}

impl WebCall {
    /// A gRPC-Web request's state, or `None` for any other content type.
    pub fn detect(req: &RequestHeader, settings: &GrpcWebSettings) -> Option<WebCall> {
        let ct = req.headers.get(http::header::CONTENT_TYPE)?;
        let s = ct.to_str().ok()?.trim().to_ascii_lowercase();
        let s = s.split(';').next().unwrap_or("").trim();
        let (mode, suffix) = if let Some(rest) = s.strip_prefix("application/grpc-web-text") {
            (Mode::Text, rest)
        } else if let Some(rest) = s.strip_prefix("application/grpc-web") {
            (Mode::Binary, rest)
        } else {
            return None;
        };
        if !(suffix.is_empty() || suffix.starts_with('+')) {
            return None;
        }
        let origin = req
            .headers
            .get(http::header::ORIGIN)
            .filter(|o| settings.allowed(o.as_bytes()))
            .cloned();
        Some(WebCall {
            mode,
            content_type: ct.clone(),
            suffix: suffix.to_string(),
            origin,
            decoder: Decoder::default(),
            encode_carry: Vec::new(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Turns the request into a gRPC request.
    pub fn upstream_request(&self, up: &mut RequestHeader) -> pingora_error::Result<()> {
        up.insert_header(
            http::header::CONTENT_TYPE,
            format!("application/grpc{}", self.suffix),
        )?;
        up.insert_header(http::header::TE, "trailers")?;
        up.remove_header("x-grpc-web");
        if self.mode == Mode::Text {
            // Decoding shrinks the body; h2 needs no length.
            up.remove_header(&http::header::CONTENT_LENGTH);
        }
        Ok(())
    }

    /// Text mode: base64 → bytes, across chunk boundaries and mid-stream padding.
    pub fn request_body(&mut self, body: &mut Option<Bytes>, eos: bool) -> Result<(), String> {
        if self.mode == Mode::Binary {
            return Ok(());
        }
        let data = body.as_deref().unwrap_or_default();
        *body = Some(self.decoder.decode(data, eos)?);
        Ok(())
    }

    /// The request body's decoder, for an engine that decodes the body apart from the
    /// call (the response goes back meanwhile): `None` in binary mode (nothing to decode).
    pub fn decoder(&self) -> Option<Decoder> {
        (self.mode == Mode::Text).then(Decoder::default)
    }

    /// Gives the response its gRPC-Web content type and CORS headers.
    pub fn response(&self, resp: &mut ResponseHeader) -> pingora_error::Result<()> {
        let is_grpc = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if is_grpc {
            resp.insert_header(http::header::CONTENT_TYPE, self.content_type.clone())?;
        }
        // The trailers frame (and base64) change the length.
        resp.remove_header(&http::header::CONTENT_LENGTH);
        self.cors(resp)
    }

    /// The CORS headers of an answer to this call, when the route allows its origin (on
    /// the service's answers and on busbar's own, whose status a script reads from the
    /// exposed `grpc-status`).
    pub fn cors(&self, resp: &mut ResponseHeader) -> pingora_error::Result<()> {
        if let Some(origin) = &self.origin {
            resp.insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())?;
            resp.insert_header(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE)?;
            resp.append_header(http::header::VARY, "origin")?;
        }
        Ok(())
    }

    /// Text mode: bytes → base64, whole quanta only until the end.
    pub fn response_body(&mut self, body: &mut Option<Bytes>, eos: bool) {
        if self.mode == Mode::Binary {
            return;
        }
        let data = body.take().unwrap_or_default();
        *body = Some(self.encode(data, eos));
    }

    /// A piece of the response body as the caller reads it: as it is in binary mode,
    /// base64 in text mode (whole quanta only until `eos`; the rest is carried).
    pub fn encode(&mut self, data: Bytes, eos: bool) -> Bytes {
        if self.mode == Mode::Binary {
            return data;
        }
        self.encode_carry.extend_from_slice(&data);
        let whole = if eos {
            self.encode_carry.len()
        } else {
            self.encode_carry.len() / 3 * 3
        };
        let rest = self.encode_carry.split_off(whole);
        let text = B64.encode(&self.encode_carry);
        self.encode_carry = rest;
        Bytes::from(text)
    }

    /// The end of the response body: the trailers frame ([`WebCall::trailers`]), or
    /// with no trailers what text mode still carries.
    pub fn finish(&mut self, trailers: Option<&HeaderMap>) -> Bytes {
        match trailers {
            Some(t) => self.trailers(t),
            None => self.encode(Bytes::new(), true),
        }
    }

    /// The trailers as the body's last frame (base64 in text mode, after any carried bytes).
    pub fn trailers(&mut self, trailers: &HeaderMap) -> Bytes {
        let frame = trailer_frame(trailers);
        match self.mode {
            Mode::Binary => frame,
            Mode::Text => {
                let mut all = std::mem::take(&mut self.encode_carry);
                all.extend_from_slice(&frame);
                Bytes::from(B64.encode(all))
            }
        }
    }
}

/// Text mode's request body decoding: base64 → bytes, across pieces and mid-stream
/// padding.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Base64 characters not yet decoded (fewer than a quantum).
    carry: Vec<u8>,
}

impl Decoder {
    /// The bytes of the next piece of base64 `text` (whitespace ignored); `eos`: the
    /// body ends with it. `Err` names what is not base64.
    pub fn decode(&mut self, text: &[u8], eos: bool) -> Result<Bytes, String> {
        self.carry
            .extend(text.iter().copied().filter(|c| !c.is_ascii_whitespace()));
        let out = decode_text(&mut self.carry)?;
        if eos && !self.carry.is_empty() {
            return Err("the base64 body ends in the middle of a quantum".to_string());
        }
        Ok(Bytes::from(out))
    }
}

/// Decodes every complete quantum of `carry` (keeping the rest); a padded quantum may
/// appear anywhere, as concatenated base64 messages produce.
pub fn decode_text(carry: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    let whole = carry.len() / 4 * 4;
    let mut out = Vec::with_capacity(whole / 4 * 3);
    let mut start = 0;
    while start < whole {
        // Up to and including the next padded quantum, or all whole quanta.
        let end = match carry[start..whole].iter().position(|&c| c == b'=') {
            Some(i) => (start + i) / 4 * 4 + 4,
            None => whole,
        };
        B64.decode_vec(&carry[start..end], &mut out)
            .map_err(|e| format!("the body is not valid base64: {e}"))?;
        start = end;
    }
    carry.drain(..whole);
    Ok(out)
}

/// `0x80`, length (u32 big-endian), then `name:value\r\n` per trailer.
pub fn trailer_frame(trailers: &HeaderMap) -> Bytes {
    let mut lines = BytesMut::new();
    for (name, value) in trailers {
        lines.put_slice(name.as_str().as_bytes());
        lines.put_u8(b':');
        lines.put_slice(value.as_bytes());
        lines.put_slice(b"\r\n");
    }
    let mut frame = BytesMut::with_capacity(5 + lines.len());
    frame.put_u8(0x80);
    frame.put_u32(lines.len() as u32);
    frame.put_slice(&lines);
    frame.freeze()
}

/// The answer to a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`), or
/// `None` when the request is not one or the route has no CORS policy.
pub fn preflight(req: &RequestHeader, settings: &GrpcWebSettings) -> Option<ResponseHeader> {
    if req.method != http::Method::OPTIONS || settings.cors_origins.is_empty() {
        return None;
    }
    req.headers
        .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)?;
    let origin = req.headers.get(http::header::ORIGIN)?;
    let allowed = settings.allowed(origin.as_bytes());
    let mut h = ResponseHeader::build(if allowed { 204 } else { 403 }, Some(8)).ok()?;
    let _ = h.insert_header(http::header::CONTENT_LENGTH, 0);
    let _ = h.insert_header(http::header::VARY, "origin");
    if allowed {
        let allow_headers = req
            .headers
            .get(http::header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or(HeaderValue::from_static(ALLOW_HEADERS));
        let _ = h.insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        let _ = h.insert_header(http::header::ACCESS_CONTROL_ALLOW_METHODS, "POST, OPTIONS");
        let _ = h.insert_header(http::header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
        let _ = h.insert_header(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSE);
        let _ = h.insert_header(
            http::header::ACCESS_CONTROL_MAX_AGE,
            settings.cors_max_age.as_secs(),
        );
    }
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> GrpcWebSettings {
        GrpcWebSettings {
            cors_origins: vec!["https://app.example".into()],
            cors_max_age: DEFAULT_CORS_MAX_AGE,
        }
    }

    fn req(ct: &str) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/pkg.S/M", None).unwrap();
        r.insert_header("content-type", ct).unwrap();
        r
    }

    #[test]
    fn content_types_are_recognised() {
        let s = settings();
        assert_eq!(
            WebCall::detect(&req("application/grpc-web"), &s)
                .unwrap()
                .mode,
            Mode::Binary
        );
        let w = WebCall::detect(&req("application/grpc-web+proto"), &s).unwrap();
        assert_eq!((w.mode, w.suffix.as_str()), (Mode::Binary, "+proto"));
        let w = WebCall::detect(&req("application/grpc-web-text+proto"), &s).unwrap();
        assert_eq!((w.mode, w.suffix.as_str()), (Mode::Text, "+proto"));
        assert!(WebCall::detect(&req("application/grpc"), &s).is_none());
        assert!(WebCall::detect(&req("application/grpc-webx"), &s).is_none());
        let mut up = req("application/grpc-web-text");
        up.insert_header("content-length", "12").unwrap();
        WebCall::detect(&up, &s)
            .unwrap()
            .upstream_request(&mut up)
            .unwrap();
        assert_eq!(up.headers["content-type"], "application/grpc");
        assert_eq!(up.headers["te"], "trailers");
        assert!(up.headers.get("content-length").is_none());
    }

    #[test]
    fn text_mode_decodes_across_chunks_and_mid_stream_padding() {
        // Two messages base64'd separately and concatenated: padding in the middle.
        let a = B64.encode([0u8, 0, 0, 0, 1, 7]); // 6 bytes: no padding
        let b = B64.encode([0u8, 0, 0, 0, 2, 8, 9]); // 7 bytes: "=" padded
        let c = B64.encode([0x80u8]); // "gA=="
        let all = format!("{a}{b}{c}");
        assert!(
            all[..all.len() - 4].contains('='),
            "padding is mid-stream: {all}"
        );
        let mut call = WebCall::detect(&req("application/grpc-web-text"), &settings()).unwrap();
        let mut out = Vec::new();
        // Feed in awkward pieces, with a line break that must be ignored.
        let text = format!("{}\r\n{}", &all[..5], &all[5..]);
        let bytes = text.as_bytes();
        let cuts = [0, 3, 7, 8, 13, 14, bytes.len()];
        for w in cuts.windows(2) {
            let mut body = Some(Bytes::copy_from_slice(&bytes[w[0]..w[1]]));
            call.request_body(&mut body, w[1] == bytes.len()).unwrap();
            out.extend_from_slice(&body.unwrap());
        }
        assert_eq!(out, [0, 0, 0, 0, 1, 7, 0, 0, 0, 0, 2, 8, 9, 0x80]);
        let mut bad = Some(Bytes::from_static(b"ab$d"));
        assert!(call.request_body(&mut bad, true).is_err());
        let mut short = Some(Bytes::from_static(b"abc"));
        let mut fresh = WebCall::detect(&req("application/grpc-web-text"), &settings()).unwrap();
        assert!(fresh.request_body(&mut short, true).is_err());
    }

    #[test]
    fn trailers_frame_is_byte_exact() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t.insert("grpc-message", HeaderValue::from_static("ok"));
        let f = trailer_frame(&t);
        let lines = b"grpc-status:0\r\ngrpc-message:ok\r\n";
        let mut want = vec![0x80, 0, 0, 0, lines.len() as u8];
        want.extend_from_slice(lines);
        assert_eq!(&f[..], &want[..]);
    }

    #[test]
    fn text_mode_encodes_whole_quanta_then_the_rest_with_the_trailers() {
        let mut call = WebCall::detect(&req("application/grpc-web-text"), &settings()).unwrap();
        let mut body = Some(Bytes::from_static(&[0, 0, 0, 0, 1, 5, 9]));
        call.response_body(&mut body, false);
        assert_eq!(body.unwrap(), B64.encode([0u8, 0, 0, 0, 1, 5]));
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let end = call.trailers(&t);
        let mut want = vec![9u8];
        want.extend_from_slice(&trailer_frame(&t));
        assert_eq!(end, B64.encode(want));
    }

    #[test]
    fn preflight_follows_the_route_policy() {
        let mut r = RequestHeader::build("OPTIONS", b"/pkg.S/M", None).unwrap();
        r.insert_header("origin", "https://app.example").unwrap();
        r.insert_header("access-control-request-method", "POST")
            .unwrap();
        r.insert_header("access-control-request-headers", "content-type,x-grpc-web")
            .unwrap();
        let h = preflight(&r, &settings()).unwrap();
        assert_eq!(h.status, 204);
        assert_eq!(
            h.headers["access-control-allow-origin"],
            "https://app.example"
        );
        assert_eq!(
            h.headers["access-control-allow-headers"],
            "content-type,x-grpc-web"
        );
        assert_eq!(h.headers["access-control-max-age"], "3600");
        r.insert_header("origin", "https://evil.example").unwrap();
        assert_eq!(preflight(&r, &settings()).unwrap().status, 403);
        let none = GrpcWebSettings {
            cors_origins: vec![],
            cors_max_age: DEFAULT_CORS_MAX_AGE,
        };
        assert!(preflight(&r, &none).is_none());
    }
}
