//! Protocol translation: callers and services need not speak the same protocol.
//!
//! Owns: one file per protocol pair — `json_grpc` for JSON/HTTP → gRPC,
//! `grpc_web` for gRPC-Web → gRPC — plus proto compilation (`descriptors`), path
//! templates and the gRPC status table; the few hooks below that the pingora driver
//! calls for gRPC-Web; and what a route translates ([`of`]). The JSON→gRPC call itself is
//! a driver (`drivers::json_grpc`).
//! HTTP/1.1 → HTTP/2 needs nothing here: an h2c or h2 service is always reached over
//! HTTP/2 (`upstream_peer`, `drivers::h2::pool`).
//! Must not: hold routing, admission or balancing policy (it uses theirs).

pub mod descriptors;
pub mod grpc_web;
pub mod json_grpc;
pub mod status;
pub mod template;

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::routing::Route;
use crate::snapshot::Snapshot;
use grpc_web::WebCall;

/// A route's translation, compiled when the config loads.
#[derive(Debug, Clone)]
pub enum Translation {
    /// JSON/HTTP callers → unary, server- or client-streaming gRPC (plain gRPC callers of
    /// the route pass through).
    Json(Arc<json_grpc::Transcoder>),
    /// gRPC-Web callers (binary and text) → gRPC.
    GrpcWeb(Arc<grpc_web::GrpcWebSettings>),
}

/// The route's translation, if it has one.
pub fn of<'a>(snapshot: &'a Snapshot, route: &Route) -> Option<&'a Translation> {
    if snapshot.config.translations.is_empty() {
        return None;
    }
    snapshot.config.translations.get(route.name())
}

/// Is this a plain gRPC request (`content-type: application/grpc`, `application/grpc+proto`,
/// …, not gRPC-Web)? A JSON route passes those through as they are.
pub fn is_plain_grpc(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| {
            let v = v.as_bytes();
            v.starts_with(b"application/grpc")
                && !v.starts_with(b"application/grpc-web")
                && matches!(v.get(16), None | Some(b'+' | b';'))
        })
}

/// `upstream_request_filter`: gRPC-Web headers → gRPC.
pub fn upstream_request(call: Option<&WebCall>, up: &mut RequestHeader) -> Result<()> {
    match call {
        Some(w) => w.upstream_request(up),
        None => Ok(()),
    }
}

/// `request_body_filter`: text mode base64 → bytes; broken base64 is the caller's 400.
pub fn request_body(call: Option<&mut WebCall>, body: &mut Option<Bytes>, eos: bool) -> Result<()> {
    let Some(w) = call else {
        return Ok(());
    };
    w.request_body(body, eos).map_err(|e| {
        let mut err = Error::explain(ErrorType::HTTPStatus(400), e);
        err.esource = ErrorSource::Downstream;
        err
    })
}

/// `response_filter`: gRPC → gRPC-Web content type and CORS headers.
pub fn response(call: Option<&WebCall>, resp: &mut ResponseHeader) -> Result<()> {
    match call {
        Some(w) => w.response(resp),
        None => Ok(()),
    }
}

/// `response_body_filter`: text mode bytes → base64.
pub fn response_body(call: Option<&mut WebCall>, body: &mut Option<Bytes>, eos: bool) {
    if let Some(w) = call {
        w.response_body(body, eos);
    }
}

/// `response_trailer_filter`: trailers → the 0x80 frame, sent as the end of the body.
pub fn trailers(call: Option<&mut WebCall>, trailers: &HeaderMap) -> Option<Bytes> {
    call.map(|w| w.trailers(trailers))
}
