//! One HTTP/2 stream on busbar's own engine: the same phases as an HTTP/1 request
//! (setup, admission, plan, tries, response head, finish), to an HTTP/1 service through
//! the HTTP/1 engine's try, pool and response codec (`drivers::h1`), to an `h2c` /
//! `h2` service through `passthrough`, or, for a JSON caller of a JSON→gRPC route, as
//! the route's gRPC call (`json`).
//!
//! Owns: the stream's side of the exchange: its head converted (`request`), its body
//! read with flow control (`body`) and held or streamed by the h1 engine's body code,
//! the tries, busbar's own answers, and RST_STREAM for what is malformed or not this
//! engine's. The upstream's response goes back through `response`.
//! Must not: hold policy (the phases'), or frame HTTP/1 (the h1 engine's codecs).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::Method;
use pingora_http::{RequestHeader, ResponseHeader};

use super::body::Incoming;
use super::json;
use super::request::{self, Refused};
use super::response::{send, to_h2};
use crate::admission::Refused as NotAdmitted;
use crate::base::reply::Refusal;
use crate::drivers::h1::body::{self as h1body, BodyFail, RequestBody, Streamer};
use crate::drivers::h1::pool;
use crate::drivers::h1::request::BodyFraming;
use crate::drivers::h1::upstream::{one_try, Ask, TryFail, BUF};
use crate::drivers::json_grpc;
use crate::metrics::METRICS;
use crate::phases::ctx::RequestCtx;
use crate::phases::fail::{self, Failure};
use crate::phases::request as phase;
use crate::phases::setup::{admission_parts, admission_policy, grpc_web};
use crate::phases::upstream_head::{self, Output};
use crate::phases::{Done, Phases, Routing};
use crate::proxy::reply::{json_header, Cause};
use crate::routing::Route;
use crate::snapshot::Snapshot;

/// The connection a stream came on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conn {
    /// The client (the PROXY header's, when one was read).
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) tls: bool,
}

/// What a stream's answer was, for the access log.
pub(super) struct Answered {
    /// 0: nothing was answered (a reset, a client gone).
    pub(super) status: u16,
    pub(super) body_bytes: usize,
}

impl Answered {
    pub(super) fn nothing() -> Answered {
        Answered {
            status: 0,
            body_bytes: 0,
        }
    }
}

/// Serves one stream: `snapshot` is the one its connection loaded when it accepted it.
/// Returns whether the client abandoned the stream (reset it, or went) before any
/// answer: what a rapid-reset flood does.
pub(crate) async fn serve(
    phases: &Phases,
    snapshot: Arc<Snapshot>,
    conn: Conn,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> bool {
    let started = Instant::now();
    let (parts, recv) = request.into_parts();
    let end_stream = recv.is_end_stream();
    // What the access log records of the request as it came (the request itself goes
    // upstream, edited).
    let (method, uri) = (parts.method.clone(), parts.uri.clone());
    let limits = snapshot.config.limits;
    // The header list's size is the `h2` crate's limit (`max_header_bytes`); the count
    // of fields is held to the HTTP/1 front door's.
    if parts.headers.len() > limits.max_headers {
        let code = "headers_too_large";
        let body = Refusal::new(code, "the request has too many header fields").to_json();
        let head = json_header(431, body.len());
        reply(&mut respond, head, Bytes::from(body), limits.client_timeout).await;
        METRICS.edge_refusals.with_label_values(&[code]).inc();
        let log = &phases.access_log;
        log.refusal(conn.peer, method.as_str(), 431, code, started);
        return false;
    }
    // `te: trailers` (the only `te` the h2 crate lets through) is kept for an HTTP/2
    // upstream, and dropped for an HTTP/1.1 one.
    let had_te = parts.headers.contains_key(http::header::TE);
    let (mut req, framing) = match request::convert(parts, end_stream) {
        Ok(converted) => converted,
        Err(Refused::Malformed) => {
            // RFC 9113 §8.1.1: a stream error; the connection's other streams go on.
            respond.send_reset(Reason::PROTOCOL_ERROR);
            let code = "malformed_request";
            METRICS.edge_refusals.with_label_values(&[code]).inc();
            let protocol = if conn.tls { "h2" } else { "h2c" };
            let log = &phases.access_log;
            log.stream_reset(conn.peer, method.as_str(), code, started, protocol);
            return false;
        }
        Err(Refused::Connect) => {
            let cause = Cause::BadRequest;
            let limit = limits.client_timeout;
            reply(&mut respond, cause.header(), cause.body(), limit).await;
            let client = conn.peer;
            phases
                .access_log
                .refusal(client, method.as_str(), 400, cause.code(), started);
            return false;
        }
    };
    let mut ctx = RequestCtx::new();
    ctx.tls = conn.tls;
    let set_up = phases.setup(
        &mut ctx,
        snapshot,
        &req,
        conn.peer.map(|a| a.ip()),
        Routing::Find,
    );
    let mut body_bytes = 0;
    let answered = match set_up {
        Err(cause) => answer(&mut respond, &mut ctx, cause, limits.client_timeout).await,
        Ok((route, _)) if let Some(h) = grpc_web(&mut ctx, &req, &route) => {
            // A gRPC-Web route's CORS preflight.
            reply(&mut respond, h, Bytes::new(), limits.client_timeout).await
        }
        Ok((route, path)) => {
            let admitted = match admission_policy(&ctx, &route) {
                None => Ok(()),
                Some(p) => {
                    let checked = p.check(&admission_parts(
                        &ctx,
                        conn.peer.map(|a| a.ip()),
                        &req,
                        &path,
                    ));
                    let gone = client_reset(&mut respond);
                    match phases.admit(&mut ctx, &p, checked, gone).await {
                        Ok(()) => Ok(()),
                        Err(NotAdmitted::ClientGone(_)) => Err(Answered::nothing()),
                        Err(NotAdmitted::Rejected(rejection)) => {
                            // In the caller's shape: JSON, or Trailers-Only for gRPC.
                            let (head, body) = fail::refuse(&ctx, &rejection);
                            Err(reply(&mut respond, head, body, limits.client_timeout).await)
                        }
                    }
                }
            };
            match admitted {
                Ok(()) => {
                    phases.plan(&mut ctx, &req, &route);
                    let pace = crate::phases::pace::BodyPace::new(
                        limits.client_timeout,
                        limits.body_min_rate,
                    );
                    // A JSON caller of a JSON→gRPC route: answered by the route's call.
                    if let Some(t) = json_grpc::transcoder(&ctx, &route, &req) {
                        let limit = limits.client_timeout;
                        let (answered, read) = json::serve(
                            phases,
                            &req,
                            conn,
                            recv,
                            &mut respond,
                            &mut ctx,
                            &t,
                            limit,
                            pace,
                        )
                        .await;
                        body_bytes = read;
                        answered
                    } else {
                        let mut x = Exchange {
                            phases,
                            route: &route,
                            ctx: &mut ctx,
                            respond: &mut respond,
                            conn,
                            limit: limits.client_timeout,
                        };
                        if route.service.config.protocol.is_h2() {
                            // HTTP/2 both sides: the stream is passed through as it is.
                            let (answered, read) = x.pass(req, recv, had_te).await;
                            body_bytes = read;
                            answered
                        } else {
                            let mut body = RequestBody::new(framing, route.config.max_body, pace);
                            let mut incoming = Incoming::new(recv, framing == BodyFraming::Chunked);
                            let answered = x.run(&mut req, &mut body, &mut incoming).await;
                            body_bytes = match framing {
                                BodyFraming::None => 0,
                                BodyFraming::Length(n) => body.data_read(n),
                                BodyFraming::Chunked => body.data_read(0),
                            };
                            answered
                        }
                    }
                }
                Err(answered) => answered,
            }
        }
    };
    ctx.body_bytes = body_bytes;
    let real = ctx.client;
    phases.finish(
        &mut ctx,
        &Done {
            method: method.as_str(),
            host: phase::host_of(&uri, None),
            path: uri.path(),
            query: uri.query(),
            client: phase::logged_client(conn.peer, real),
            status: answered.status,
            body_bytes: answered.body_bytes,
            error: false,
        },
    );
    answered.status == 0
}

/// Finishes when the client resets the stream (or the connection goes), for admission's
/// waits.
async fn client_reset(respond: &mut SendResponse<Bytes>) -> Box<pingora_error::Error> {
    let _ = poll_fn(|cx| respond.poll_reset(cx)).await;
    pingora_error::Error::explain(
        pingora_error::ErrorType::ConnectionClosed,
        "client reset the stream before its response",
    )
}

/// Sends a whole response of busbar's own.
async fn reply(
    respond: &mut SendResponse<Bytes>,
    head: ResponseHeader,
    body: Bytes,
    limit: Duration,
) -> Answered {
    let status = head.status.as_u16();
    let end = body.is_empty();
    let Ok(mut tx) = respond.send_response(to_h2(head), end) else {
        return Answered::nothing();
    };
    let len = body.len();
    if !end && send(&mut tx, body, true, limit).await.is_err() {
        return Answered {
            status,
            body_bytes: 0,
        };
    }
    Answered {
        status,
        body_bytes: len,
    }
}

/// busbar's answer for `cause`, named in the context for the access log.
pub(super) async fn answer(
    respond: &mut SendResponse<Bytes>,
    ctx: &mut RequestCtx,
    cause: Cause,
    limit: Duration,
) -> Answered {
    let (head, body) = fail::answer(ctx, cause);
    Box::pin(reply(respond, head, body, limit)).await
}

/// The tries and the response of one admitted stream.
pub(super) struct Exchange<'a, 'r> {
    pub(super) phases: &'a Phases,
    pub(super) route: &'a Route,
    pub(super) ctx: &'a mut RequestCtx,
    pub(super) respond: &'r mut SendResponse<Bytes>,
    pub(super) conn: Conn,
    /// Longest a wait for the client's window may take, and a body read's pace grace.
    pub(super) limit: Duration,
}

impl Exchange<'_, '_> {
    pub(super) async fn answer(&mut self, cause: Cause) -> Answered {
        answer(self.respond, self.ctx, cause, self.limit).await
    }

    /// What busbar answers for a body that could not be read; nothing for a client
    /// that left.
    pub(super) async fn body_failed(&mut self, f: BodyFail) -> Answered {
        let failure = match f {
            BodyFail::Malformed => Failure::ClientBad,
            BodyFail::TooLarge => Failure::BodyTooLarge,
            BodyFail::Slow => Failure::ClientBodyTimeout,
            BodyFail::Gone => Failure::ClientGone,
        };
        match fail::cause_of(self.ctx, failure) {
            Some(cause) => self.answer(cause).await,
            None => Answered::nothing(),
        }
    }

    /// The upstream's answer could not be framed before anything went to the client.
    pub(super) async fn upstream_broke(&mut self) -> Answered {
        self.phases.on_malformed_response(self.ctx);
        self.answer(Cause::UpstreamError).await
    }

    async fn run(
        &mut self,
        req: &mut RequestHeader,
        body: &mut RequestBody,
        incoming: &mut Incoming,
    ) -> Answered {
        let down = upstream_head::Downstream {
            peer: self.conn.peer.map(|a| a.ip()),
            tls: self.conn.tls,
            h2: true,
            rendered: None,
        };
        let mut wire = Vec::with_capacity(512);
        if upstream_head::build(self.ctx, req, down, Output::Wire(&mut wire)).is_err() {
            return self.answer(Cause::BadRequest).await;
        }
        let head_len = wire.len();
        // Bytes past the body's end: none on HTTP/2 (a stream's body ends where it says).
        let mut spill = Vec::new();
        if !body.done() {
            // Up to 64 KiB held after the head: checked whole, and kept for a retry.
            let held = h1body::hold(body, incoming, &mut spill, &mut wire, true);
            if let Err(f) = held.await {
                return self.body_failed(f).await;
            }
        }
        let streams = !body.done();
        let ask = Ask {
            wire: &[],
            head_request: req.method == Method::HEAD,
            idempotent: req.method.is_idempotent(),
            // The head goes to the client as a map, edited by `response_head::edit`.
            own_rate: false,
            // An HTTP/2 request cannot ask for an upgrade (RFC 9113 §8.6; the h2 crate
            // resets a stream that carries `upgrade`).
            upgrade: false,
            head_by: self
                .ctx
                .deadline
                .unwrap_or_else(|| Instant::now() + self.route.service.config.timeout),
        };
        let mut buf = Vec::with_capacity(BUF);
        let mut lines = Vec::new();
        let mut chunk = Vec::new();
        let (up, key, head) = loop {
            let t = match self.phases.begin_try(self.ctx) {
                Ok(t) => t,
                Err(cause) => return self.answer(cause).await,
            };
            crate::otel::retrace(&mut wire[..head_len], self.ctx);
            let ask = Ask { wire: &wire, ..ask };
            let metrics = &self.route.service.metrics;
            let mut st = Streamer {
                client: &mut *incoming,
                body: &mut *body,
                conn: &mut spill,
                chunk: &mut chunk,
                waiting: false,
                continued: false,
                send_limit: self.limit,
                started: false,
                stopped: false,
            };
            // A client that resets its stream while the upstream works ends the try: its
            // instance, and its admission slot, are free at once.
            let tried = tokio::select! {
                biased;
                r = one_try(&t, &ask, metrics, &mut buf, &mut lines, streams.then_some(&mut st)) => r,
                _ = poll_fn(|cx| self.respond.poll_reset(cx)) => {
                    self.ctx.release_instance();
                    return Answered::nothing();
                }
            };
            let started = st.started;
            let retry = match tried {
                Ok((up, head)) => break (up, pool::Key::of(&t), head),
                Err(TryFail::Connect { timed_out }) => {
                    self.phases.on_connect_failure(self.ctx, timed_out)
                }
                Err(TryFail::Certificate) => self.phases.on_certificate_failure(self.ctx),
                // Sent again only while the whole body is still held.
                Err(TryFail::Trip { timed_out }) => self.phases.on_try_failure(
                    self.ctx,
                    true,
                    timed_out,
                    ask.idempotent && !started,
                    false,
                ),
                Err(TryFail::Body(f)) => {
                    self.phases
                        .on_try_failure(self.ctx, false, false, false, false);
                    return self.body_failed(f).await;
                }
                Err(TryFail::Malformed) => {
                    self.phases.on_malformed_response(self.ctx);
                    false
                }
            };
            if !retry {
                let cause =
                    fail::cause_of(self.ctx, Failure::Upstream).unwrap_or(Cause::UpstreamError);
                return self.answer(cause).await;
            }
        };
        self.phases.on_response_head(self.ctx);
        self.respond_with(up, key, head, &buf, body.done()).await
    }
}
