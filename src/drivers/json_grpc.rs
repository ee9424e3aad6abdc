//! The JSON → gRPC driver: a JSON/HTTP request answered by a unary or server-streaming
//! gRPC call over h2c, made from the pingora driver's `request_filter`.
//!
//! Owns: reading the JSON request (bounded by the route's `max_body`), the gRPC call
//! over `translate::h2client`, mapping `grpc-status` from headers or trailers, and
//! writing the JSON (or NDJSON for server streaming) response. The tries are the
//! phases' like any route's (`Phases::begin_try`: balancer, health, gray release, the
//! sidecar or the app port through `fallback::target`; connect failures retried within
//! the retry policy, a dead sidecar switched to the app port; outlier accounting and
//! upstream metrics), the metadata is the one upstream-head builder's, and the answer's
//! head gets the one response-head editor's edits.
//! Why a driver and not the proxy pipeline: pingora sends response headers before the
//! upstream trailers arrive, so a status carried in trailers could not become the HTTP
//! status there. Must not: hold policy beyond the translation.

use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderMap;
use pingora_error::Result;
use pingora_http::RequestHeader;
use pingora_proxy::Session;

use crate::base::http::is_hop_by_hop;
use crate::phases::ctx::RequestCtx;
use crate::phases::fail::{self, Failure};
use crate::phases::upstream_head::{self, Output};
use crate::phases::{response_head, Phases};
use crate::proxy::reply::{self, Cause};
use crate::translate::h2client;
use crate::translate::json_grpc::{Binding, TranscodeError, Transcoder};
use crate::translate::status;

/// Largest reply message busbar decodes (gRPC's default receive limit is 4 MiB).
pub const MAX_REPLY_MESSAGE: usize = 16 * 1024 * 1024;

/// Request headers that are not gRPC metadata, besides the hop-by-hop ones
/// (`base::http::HOP_BY_HOP`).
const NOT_METADATA: [&str; 9] = [
    "host",
    "transfer-encoding",
    "content-type",
    "content-length",
    "accept",
    "accept-encoding",
    "expect",
    "http2-settings",
    "trailer",
];

/// What went wrong with the upstream reply: 502 with the reason.
#[derive(Debug, thiserror::Error)]
enum ReplyError {
    #[error("{0}")]
    Broken(String),
    #[error("the upstream did not answer in time")]
    Timeout,
}

/// Serves one JSON request through gRPC; always writes the response.
pub(crate) async fn serve(
    phases: &Phases,
    session: &mut Session,
    ctx: &mut RequestCtx,
    t: &Transcoder,
) -> Result<()> {
    let req = session.req_header();
    let path = req.uri.path().to_string();
    let query = req.uri.query().map(str::to_string);
    let method = req.method.clone();
    let (binding, vars) = match t.find(&method, &path) {
        Ok(found) => found,
        Err(e) => return transcode_error(session, ctx, &e).await,
    };
    let Some(max_body) = ctx.route.as_ref().map(|r| r.config.max_body) else {
        return answer(session, ctx, Cause::NoRoute).await;
    };
    // A body read while the request was queued is in the retry buffer (`drivers::gone`).
    let mut body = BytesMut::from(session.as_ref().get_retry_buffer().unwrap_or_default());
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if (body.len() + chunk.len()) as u64 > max_body {
                    session.as_downstream_mut().set_keepalive(None);
                    return answer(session, ctx, Cause::BodyTooLarge).await;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(e),
        }
    }
    let message = match t.request(binding, vars, query.as_deref(), &body) {
        Ok(m) => m,
        Err(e) => return transcode_error(session, ctx, &e).await,
    };
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.extend_from_slice(&[0]);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let frame = frame.freeze();
    let metadata = metadata(session, ctx)?;
    call(phases, session, ctx, t, binding, frame, metadata).await
}

/// The request's headers as gRPC metadata: the one upstream-head builder's head (after
/// admission and the route's edits), less what is not metadata.
fn metadata(session: &Session, ctx: &RequestCtx) -> Result<HeaderMap> {
    let mut up: RequestHeader = session.req_header().clone();
    let down = upstream_head::Downstream {
        peer: session
            .as_downstream()
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
        tls: session
            .as_downstream()
            .digest()
            .is_some_and(|d| d.ssl_digest.is_some()),
        h2: up.version == http::Version::HTTP_2,
    };
    upstream_head::build(ctx, &mut up, down, Output::Map)?;
    let mut out = HeaderMap::with_capacity(up.headers.len());
    for (k, v) in up.headers.iter() {
        let name = k.as_str();
        if !is_hop_by_hop(name.as_bytes()) && !NOT_METADATA.contains(&name) {
            out.append(k.clone(), v.clone());
        }
    }
    Ok(out)
}

async fn call(
    phases: &Phases,
    session: &mut Session,
    ctx: &mut RequestCtx,
    t: &Transcoder,
    binding: &Binding,
    frame: Bytes,
    metadata: HeaderMap,
) -> Result<()> {
    let Some(route) = ctx.route.clone() else {
        return answer(session, ctx, Cause::NoRoute).await;
    };
    let svc = &route.service;
    let deadline = ctx
        .deadline
        .unwrap_or_else(|| Instant::now() + svc.config.timeout);
    // The phases' tries: a connect failure goes to another instance (or, for a dead
    // sidecar, to the same instance's app port) within the service's retry policy.
    let (mut sender, addr) = loop {
        let attempt = match phases.begin_try(ctx) {
            Ok(a) => a,
            Err(cause) => return answer(session, ctx, cause).await,
        };
        match h2client::sender(attempt.addr, attempt.connect_timeout).await {
            Ok(s) => break (s, attempt.addr),
            Err(e) => {
                tracing::debug!(upstream = %attempt.addr, "gRPC connect failed: {e}");
                let timed_out = matches!(e, h2client::ConnectError::Timeout);
                if !phases.on_connect_failure(ctx, timed_out) {
                    return upstream_failed(session, ctx).await;
                }
            }
        }
    };
    let start = Instant::now();
    let remaining = deadline.saturating_duration_since(start);
    let uri = format!("http://{addr}{}", binding.grpc_path);
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header(CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(
            "grpc-timeout",
            format!("{}m", remaining.as_millis().clamp(1, 99_999_999)),
        )
        .body(())
        .map_err(|e| {
            pingora_error::Error::because(
                pingora_error::ErrorType::InternalError,
                "gRPC request",
                e,
            )
        })?;
    request.headers_mut().extend(metadata);
    crate::otel::retrace_headers(request.headers_mut(), ctx);
    let sent = sender
        .send_request(request, false)
        .and_then(|(resp, mut stream)| {
            stream.send_data(frame, true)?;
            Ok(resp)
        });
    let response = match sent {
        Ok(resp) => tokio::time::timeout(remaining, resp).await,
        Err(e) => Ok(Err(e)),
    };
    let response = match response {
        Err(_) => {
            // Sent, and unanswered: it may have been acted on, so it is not sent again.
            phases.on_try_failure(ctx, true, true, false, false);
            return upstream_failed(session, ctx).await;
        }
        Ok(Err(e)) => {
            h2client::discard(addr);
            phases.on_try_failure(ctx, true, false, false, false);
            return bad_gateway(session, ctx, &format!("the gRPC call failed: {e}")).await;
        }
        Ok(Ok(r)) => r,
    };
    phases.on_response_head(ctx);
    let (parts, body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        if parts.status.is_server_error() {
            phases.on_response_health(ctx, parts.status);
        }
        ctx.release_instance();
        let why = format!(
            "the upstream answered HTTP {} instead of gRPC",
            parts.status.as_u16()
        );
        return bad_gateway(session, ctx, &why).await;
    }
    let is_grpc = parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !is_grpc {
        ctx.release_instance();
        let ct = parts
            .headers
            .get(CONTENT_TYPE)
            .map_or("none".to_string(), |v| {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            });
        return bad_gateway(
            session,
            ctx,
            &format!("the upstream is not a gRPC server (content-type: {ct})"),
        )
        .await;
    }
    phases.on_response_health(ctx, parts.status);
    let result = relay(
        session,
        ctx,
        t,
        binding,
        &parts.headers,
        body,
        svc.config.read_timeout,
    )
    .await;
    ctx.release_instance();
    match result {
        Ok(()) => Ok(()),
        Err(ReplyError::Timeout) => {
            svc.metrics.timeouts.inc();
            answer(session, ctx, Cause::UpstreamTimeout).await
        }
        Err(ReplyError::Broken(why)) => bad_gateway(session, ctx, &why).await,
    }
}

/// Reads the reply's messages and status and writes the JSON answer. Errors are only
/// returned while nothing has been written downstream.
async fn relay(
    session: &mut Session,
    ctx: &mut RequestCtx,
    t: &Transcoder,
    binding: &Binding,
    headers: &HeaderMap,
    mut body: h2::RecvStream,
    read_timeout: std::time::Duration,
) -> std::result::Result<(), ReplyError> {
    let streaming = binding.method.is_server_streaming();
    let mut buf = BytesMut::new();
    let mut messages: Vec<Vec<u8>> = Vec::new();
    let mut started = false;
    let mut trailers_only = headers.contains_key("grpc-status");
    if !trailers_only || !body.is_end_stream() {
        trailers_only = false;
        loop {
            let next = tokio::time::timeout(read_timeout, body.data()).await;
            let chunk = match next {
                Err(_) if started => {
                    return finish_stream_error(session, 4, "the upstream did not answer in time")
                        .await
                }
                Err(_) => return Err(ReplyError::Timeout),
                Ok(None) => break,
                Ok(Some(Err(e))) if started => {
                    return finish_stream_error(session, 14, &format!("the stream broke: {e}"))
                        .await
                }
                Ok(Some(Err(e))) => {
                    return Err(ReplyError::Broken(format!("the gRPC reply broke off: {e}")))
                }
                Ok(Some(Ok(c))) => c,
            };
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
            while let Some(msg) = next_frame(&mut buf)? {
                let json = t.response(binding, &msg).map_err(ReplyError::Broken)?;
                if streaming {
                    if !started {
                        started = true;
                        let _ = write_head(session, ctx, 200, "application/x-ndjson", None).await;
                    }
                    let mut line = json;
                    line.push(b'\n');
                    if session
                        .write_response_body(Some(Bytes::from(line)), false)
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                } else {
                    messages.push(json);
                }
            }
        }
        if !buf.is_empty() {
            return Err(ReplyError::Broken(
                "the gRPC reply ends inside a message".into(),
            ));
        }
    }
    let trailers = if trailers_only {
        None
    } else {
        match tokio::time::timeout(read_timeout, body.trailers()).await {
            Err(_) => return Err(ReplyError::Timeout),
            Ok(Err(e)) => {
                return Err(ReplyError::Broken(format!(
                    "reading gRPC trailers failed: {e}"
                )))
            }
            Ok(Ok(t)) => t,
        }
    };
    // Trailers-Only replies carry the status in the headers.
    let st = trailers
        .as_ref()
        .filter(|t| t.contains_key("grpc-status"))
        .unwrap_or(headers);
    let Some(code) = st
        .get("grpc-status")
        .and_then(|v| status::parse_code(v.as_bytes()))
    else {
        if started {
            return finish_stream_error(session, 13, "the upstream sent no grpc-status").await;
        }
        return Err(ReplyError::Broken(
            "the upstream sent no grpc-status".into(),
        ));
    };
    let message = st
        .get("grpc-message")
        .map_or_else(String::new, |v| status::decode_message(v.as_bytes()));
    if started {
        if code == 0 {
            let _ = session.write_response_body(None, true).await;
            return Ok(());
        }
        return finish_stream_error(session, code, &message).await;
    }
    if code != 0 {
        let details = status::details(
            st.get("grpc-status-details-bin").map(|v| v.as_bytes()),
            &t.pool,
        );
        let body = status::error_body(code, &message, details);
        let _ = write_json(session, ctx, status::http_status(code), body).await;
        return Ok(());
    }
    if streaming {
        let _ = write_head(session, ctx, 200, "application/x-ndjson", Some(0)).await;
        let _ = session.write_response_body(None, true).await;
        return Ok(());
    }
    let Some(json) = messages.into_iter().next() else {
        return Err(ReplyError::Broken(
            "the upstream replied OK without a message".into(),
        ));
    };
    let _ = write_json(session, ctx, 200, json).await;
    Ok(())
}

/// Takes one length-prefixed message off the front of `buf`, if complete.
fn next_frame(buf: &mut BytesMut) -> std::result::Result<Option<Vec<u8>>, ReplyError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let compressed = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if compressed != 0 {
        return Err(ReplyError::Broken(
            "the upstream sent a compressed message busbar did not ask for".into(),
        ));
    }
    if len > MAX_REPLY_MESSAGE {
        return Err(ReplyError::Broken(format!(
            "a reply message of {len} bytes is over the {MAX_REPLY_MESSAGE}-byte limit"
        )));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).to_vec()))
}

/// Ends an NDJSON stream whose head is already sent with an error line.
async fn finish_stream_error(
    session: &mut Session,
    code: u32,
    message: &str,
) -> std::result::Result<(), ReplyError> {
    let mut line = serde_json::to_vec(
        &serde_json::json!({"error": {"code": code, "message": message, "details": []}}),
    )
    .unwrap_or_default();
    line.push(b'\n');
    let _ = session
        .write_response_body(Some(Bytes::from(line)), true)
        .await;
    Ok(())
}

async fn write_head(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    content_type: &str,
    len: Option<usize>,
) -> Result<()> {
    let mut h = match len {
        Some(n) => reply::json_header(status, n),
        None => {
            let mut h = reply::json_header(status, 0);
            h.remove_header(&CONTENT_LENGTH);
            h
        }
    };
    h.insert_header(CONTENT_TYPE, content_type)?;
    response_head::edit(ctx, &mut h)?;
    session.write_response_header(Box::new(h), false).await
}

async fn write_json(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    body: Vec<u8>,
) -> Result<()> {
    let mut h = reply::json_header(status, body.len());
    response_head::edit(ctx, &mut h)?;
    session.write_response_header(Box::new(h), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

async fn transcode_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    e: &TranscodeError,
) -> Result<()> {
    let (http, code) = e.status();
    ctx.cause = Some(match http {
        404 => Cause::NoRoute,
        _ => Cause::BadRequest,
    });
    write_json(
        session,
        ctx,
        http,
        status::error_body(code, &e.to_string(), Vec::new()),
    )
    .await
}

/// busbar's own answer for `cause` (the one error path).
async fn answer(session: &mut Session, ctx: &mut RequestCtx, cause: Cause) -> Result<()> {
    let (head, body) = fail::answer(ctx, cause);
    session.write_response_header(Box::new(head), false).await?;
    session.write_response_body(Some(body), true).await
}

/// The try failed on the upstream's side: the cause the phases named.
async fn upstream_failed(session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    let cause = fail::cause_of(ctx, Failure::Upstream).unwrap_or(Cause::UpstreamError);
    answer(session, ctx, cause).await
}

/// 502 naming why the reply could not be translated.
async fn bad_gateway(session: &mut Session, ctx: &mut RequestCtx, why: &str) -> Result<()> {
    ctx.cause = Some(Cause::UpstreamError);
    let body = serde_json::to_vec(&serde_json::json!({"error": "bad_gateway", "message": why}))
        .unwrap_or_default();
    write_json(session, ctx, 502, body).await
}
