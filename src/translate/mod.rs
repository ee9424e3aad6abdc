//! Protocol translation: callers and services need not speak the same protocol.
//!
//! Owns: one file per protocol pair — `json_grpc` (+ `json_call`, `h2client`) for
//! JSON/HTTP → gRPC, `grpc_web` for gRPC-Web → gRPC — plus proto compilation
//! (`descriptors`), path templates and the gRPC status table; and the few hooks below
//! that the proxy phases call. HTTP/1.1 → h2c needs nothing here: an h2c service is
//! always reached over HTTP/2 (`upstream_peer`).
//! Must not: hold routing, admission or balancing policy (it uses theirs).

pub mod descriptors;
pub mod grpc_web;
pub mod h2client;
pub mod json_call;
pub mod json_grpc;
pub mod status;
pub mod template;

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use crate::model::Instance;
use crate::proxy::ctx::RequestCtx;
use crate::routing::Route;
use crate::snapshot::Snapshot;

/// A route's translation, compiled when the config loads.
#[derive(Debug, Clone)]
pub enum Translation {
    /// JSON/HTTP callers → unary or server-streaming gRPC.
    Json(Arc<json_grpc::Transcoder>),
    /// gRPC-Web callers (binary and text) → gRPC.
    GrpcWeb(Arc<grpc_web::GrpcWebSettings>),
}

fn of<'a>(snapshot: &'a Snapshot, route: &Route) -> Option<&'a Translation> {
    if snapshot.config.translations.is_empty() {
        return None;
    }
    snapshot.config.translations.get(route.name())
}

/// Does `route` translate anything (JSON→gRPC, gRPC-Web)?
pub fn translates(snapshot: &Snapshot, route: &Route) -> bool {
    of(snapshot, route).is_some()
}

/// Answers a CORS preflight for a gRPC-Web route (before admission: preflights carry
/// no credentials). `Ok(true)`: the response is written.
pub async fn preflight(session: &mut Session, snapshot: &Snapshot, route: &Route) -> Result<bool> {
    let Some(Translation::GrpcWeb(s)) = of(snapshot, route) else {
        return Ok(false);
    };
    let Some(h) = grpc_web::preflight(session.req_header(), s) else {
        return Ok(false);
    };
    session.write_response_header(Box::new(h), true).await?;
    Ok(true)
}

/// After admission: JSON routes are served here (`Ok(true)`); gRPC-Web requests get
/// their state and go on through the proxy.
pub async fn on_request(
    session: &mut Session,
    ctx: &mut RequestCtx,
    on_failure: &(dyn Fn(&RequestCtx, &Instance) + Send + Sync),
) -> Result<bool> {
    let (Some(snapshot), Some(route)) = (ctx.snapshot.clone(), ctx.route.clone()) else {
        return Ok(false);
    };
    match of(&snapshot, &route) {
        None => Ok(false),
        Some(Translation::Json(t)) => {
            json_call::serve(session, ctx, t, on_failure).await?;
            Ok(true)
        }
        Some(Translation::GrpcWeb(s)) => {
            ctx.grpc_web = grpc_web::WebCall::detect(session.req_header(), s);
            Ok(false)
        }
    }
}

/// `upstream_request_filter`: gRPC-Web headers → gRPC.
pub fn upstream_request(ctx: &RequestCtx, up: &mut RequestHeader) -> Result<()> {
    match &ctx.grpc_web {
        Some(w) => w.upstream_request(up),
        None => Ok(()),
    }
}

/// `request_body_filter`: text mode base64 → bytes; broken base64 is the caller's 400.
pub fn request_body(ctx: &mut RequestCtx, body: &mut Option<Bytes>, eos: bool) -> Result<()> {
    let Some(w) = ctx.grpc_web.as_mut() else {
        return Ok(());
    };
    w.request_body(body, eos).map_err(|e| {
        let mut err = Error::explain(ErrorType::HTTPStatus(400), e);
        err.esource = ErrorSource::Downstream;
        err
    })
}

/// `response_filter`: gRPC → gRPC-Web content type and CORS headers.
pub fn response(ctx: &RequestCtx, resp: &mut ResponseHeader) -> Result<()> {
    match &ctx.grpc_web {
        Some(w) => w.response(resp),
        None => Ok(()),
    }
}

/// `response_body_filter`: text mode bytes → base64.
pub fn response_body(ctx: &mut RequestCtx, body: &mut Option<Bytes>, eos: bool) {
    if let Some(w) = ctx.grpc_web.as_mut() {
        w.response_body(body, eos);
    }
}

/// `response_trailer_filter`: trailers → the 0x80 frame, sent as the end of the body.
pub fn trailers(ctx: &mut RequestCtx, trailers: &HeaderMap) -> Option<Bytes> {
    ctx.grpc_web.as_mut().map(|w| w.trailers(trailers))
}
