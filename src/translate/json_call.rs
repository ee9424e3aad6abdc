//! The JSON → gRPC call, made from `request_filter` over h2c, and the JSON answer.
//!
//! Owns: reading the JSON request (bounded by the route's `max_body`), picking an
//! instance through the service's balancer and health like any request, the gRPC call
//! (deadline, connect retries), mapping `grpc-status` from headers or trailers, and
//! writing the JSON (or NDJSON for server streaming) response.
//! Why here and not in the proxy pipeline: pingora sends response headers before the
//! upstream trailers arrive, so a status carried in trailers could not become the HTTP
//! status there. Must not: hold policy beyond the translation.

use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderMap;
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use super::h2client;
use super::json_grpc::{Binding, TranscodeError, Transcoder};
use super::status;
use crate::model::Instance;
use crate::proxy::ctx::RequestCtx;
use crate::proxy::reply::{self, Cause};

/// Largest reply message busbar decodes (gRPC's default receive limit is 4 MiB).
pub const MAX_REPLY_MESSAGE: usize = 16 * 1024 * 1024;

/// Request headers that are not gRPC metadata.
const NOT_METADATA: [&str; 14] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
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
/// `on_failure` is the proxy's outlier bookkeeping for a failed instance.
pub async fn serve(
    session: &mut Session,
    ctx: &mut RequestCtx,
    t: &Transcoder,
    on_failure: &(dyn Fn(&RequestCtx, &Instance) + Send + Sync),
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
        return reply::respond(session, Cause::NoRoute).await;
    };
    // A body read while the request was queued is in the retry buffer (admission::watch).
    let mut body = BytesMut::from(session.as_ref().get_retry_buffer().unwrap_or_default());
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if (body.len() + chunk.len()) as u64 > max_body {
                    ctx.cause = Some(Cause::BodyTooLarge);
                    session.as_downstream_mut().set_keepalive(None);
                    return reply::respond(session, Cause::BodyTooLarge).await;
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
    call(session, ctx, t, binding, frame, metadata, on_failure).await
}

/// The request's headers as gRPC metadata, after admission and the route's edits.
fn metadata(session: &Session, ctx: &RequestCtx) -> Result<HeaderMap> {
    let mut up: RequestHeader = session.req_header().clone();
    crate::proxy::upstream_headers(session, ctx, &mut up)?;
    let mut out = HeaderMap::with_capacity(up.headers.len());
    for (k, v) in up.headers.iter() {
        if !NOT_METADATA.contains(&k.as_str()) {
            out.append(k.clone(), v.clone());
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn call(
    session: &mut Session,
    ctx: &mut RequestCtx,
    t: &Transcoder,
    binding: &Binding,
    frame: Bytes,
    metadata: HeaderMap,
    on_failure: &(dyn Fn(&RequestCtx, &Instance) + Send + Sync),
) -> Result<()> {
    let Some(route) = ctx.route.clone() else {
        return reply::respond(session, Cause::NoRoute).await;
    };
    let svc = &route.service;
    let deadline = ctx
        .deadline
        .unwrap_or_else(|| Instant::now() + svc.config.timeout);
    // Connect failures go to another instance, within the service's retry policy.
    let (mut sender, instance) = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            svc.metrics.timeouts.inc();
            return fail(session, ctx, Cause::UpstreamTimeout).await;
        }
        let Some((idx, instance)) = ctx.pick_instance() else {
            svc.metrics.no_instance.inc();
            return fail(session, ctx, Cause::NoHealthyInstance).await;
        };
        ctx.tried.push(idx);
        ctx.tries += 1;
        instance.health.begin_request();
        ctx.last_addr = Some(instance.addr);
        ctx.instance = Some(instance.clone());
        let timeout = svc.config.connect_timeout.min(remaining);
        match h2client::sender(instance.addr, timeout).await {
            Ok(s) => break (s, instance),
            Err(e) => {
                tracing::debug!(instance = %instance.addr, "gRPC connect failed: {e}");
                ctx.release_instance();
                svc.metrics.connect_failures.inc();
                on_failure(ctx, &instance);
                let retry =
                    ctx.tries <= svc.config.retry.attempts && svc.retry_budget.try_withdraw();
                if !retry {
                    let cause = if matches!(e, h2client::ConnectError::Timeout) {
                        Cause::UpstreamTimeout
                    } else {
                        Cause::ConnectFailed
                    };
                    return fail(session, ctx, cause).await;
                }
                svc.metrics.retries.inc();
            }
        }
    };
    let start = Instant::now();
    ctx.upstream_start = Some(start);
    let remaining = deadline.saturating_duration_since(start);
    let uri = format!("http://{}{}", instance.addr, binding.grpc_path);
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
            ctx.release_instance();
            svc.metrics.timeouts.inc();
            on_failure(ctx, &instance);
            return fail(session, ctx, Cause::UpstreamTimeout).await;
        }
        Ok(Err(e)) => {
            h2client::discard(instance.addr);
            ctx.release_instance();
            on_failure(ctx, &instance);
            return bad_gateway(session, ctx, &format!("the gRPC call failed: {e}")).await;
        }
        Ok(Ok(r)) => r,
    };
    let elapsed = start.elapsed();
    ctx.upstream_time = Some(elapsed);
    svc.metrics.upstream_duration.observe(elapsed.as_secs_f64());
    let (parts, body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        ctx.release_instance();
        if parts.status.is_server_error() {
            on_failure(ctx, &instance);
        }
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
    instance.health.record_success();
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
            fail(session, ctx, Cause::UpstreamTimeout).await
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
    finish_head(&mut h, ctx)?;
    session.write_response_header(Box::new(h), false).await
}

/// What `response_filter` would add to a proxied response.
fn finish_head(h: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
    if let Some(a) = &ctx.admitted {
        a.apply_response(h);
    }
    if let Some(route) = &ctx.route {
        if !route.config.response_headers.is_empty() {
            crate::proxy::headers::edit_response(h, &route.config.response_headers)?;
        }
    }
    Ok(())
}

async fn write_json(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    body: Vec<u8>,
) -> Result<()> {
    let mut h = reply::json_header(status, body.len());
    finish_head(&mut h, ctx)?;
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

async fn fail(session: &mut Session, ctx: &mut RequestCtx, cause: Cause) -> Result<()> {
    ctx.cause = Some(cause);
    reply::respond(session, cause).await
}

/// 502 naming why the reply could not be translated.
async fn bad_gateway(session: &mut Session, ctx: &mut RequestCtx, why: &str) -> Result<()> {
    ctx.cause = Some(Cause::UpstreamError);
    let body = serde_json::to_vec(&serde_json::json!({"error": "bad_gateway", "message": why}))
        .unwrap_or_default();
    write_json(session, ctx, 502, body).await
}
