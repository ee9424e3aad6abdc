//! HTTP/2 on both sides: a stream to an `h2c` or `h2` service (gRPC, or any HTTP/2
//! request) goes to the instance as a stream of one of `pool`'s connections, with no
//! conversion to HTTP/1.1: protocol-generic pass-through.
//!
//! Owns: the request's DATA and trailers streamed to the
//! upstream stream while its response comes back (both at once: bidirectional calls),
//! flow control both ways (a DATA frame's bytes go back to the sender's window once the
//! other side accepted them), the retry hold (up to [`HOLD`] bytes of the request body,
//! kept so a stream the instance refused unprocessed, `pool::refused`, goes to the next
//! try), and cancellation: a client that resets its stream (or goes) leaves the upstream
//! stream reset with CANCEL (the `h2` crate resets a stream whose handles are all dropped
//! before its end), an upstream reset reaches the client as a reset, or before the
//! response head as busbar's own answer (Trailers-Only UNAVAILABLE for a gRPC caller).
//! The route's deadline bounds the wait for the response head; each wait for response
//! data is bounded by the service's `read_timeout`. A gRPC caller's `grpc-timeout` makes
//! the call's deadline the earlier of it and the route's, and that deadline bounds the
//! whole call: each try's upstream gets a `grpc-timeout` of what remains of it (grpc-go's
//! and Envoy's propagation), and at the deadline the caller gets DEADLINE_EXCEEDED
//! (Trailers-Only, when no head went out yet) or RST_STREAM CANCEL (after it), and the
//! upstream stream is reset with CANCEL. Until the response head, the request body
//! keeps the HTTP/1 engine's pace (`client_timeout`, `body_min_rate`; 408 `body_timeout`
//! past it); after it the call is the two ends' (a bidirectional call's client may rightly
//! be quiet). A stream that got no head by its deadline has its connection PINGed
//! (`pool::Slot::suspect`). The access log's `grpc_status` is read from the head or the
//! trailers while the log is on. A gRPC-Web call (`ctx.grpc_web`) goes
//! through the codec of `translate::grpc_web`: a text body decoded on the way up, the
//! response encoded on the way down, its trailers the body's last frame. The head and
//! the tries' streams are `call`'s (shared with HTTP/1 clients of HTTP/2 services).
//! Must not: decide retries or count outcomes (the phases'), or frame HTTP/2 (the `h2`
//! crate's).

use std::future::poll_fn;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use pingora_http::{RequestHeader, ResponseHeader};

use super::call::{self, put, NotOpened, Opened, HOLD};
use super::grpc_timeout;
use super::pool;
use super::response::{send, to_h2};
use super::stream::{Answered, Exchange};
use crate::base::deadline::within;
use crate::drivers::h1::body::BodyFail;
use crate::phases::fail::{self, Failure};
use crate::phases::pace::BodyPace;
use crate::phases::response_head;
use crate::phases::upstream_head::{self, Output};
use crate::proxy::grpc::trailers_only;
use crate::proxy::reply::Cause;
use crate::translate::grpc_web::Decoder;

/// The request body read so far, for a retry.
#[derive(Default)]
struct Held {
    /// The DATA read, while all of it is here (shared with what went upstream: no copy).
    chunks: Vec<Bytes>,
    /// Bytes read from the client in all.
    read: usize,
    /// More than [`HOLD`] was read: a refused stream cannot be sent again.
    spilled: bool,
    /// The client's stream ended (its trailers, if any, are in `trailers`).
    ended: bool,
    trailers: Option<HeaderMap>,
}

impl Held {
    /// Can the whole request go to another try?
    fn whole(&self) -> bool {
        !self.spilled
    }
}

/// Why forwarding the request body stopped early.
enum Fwd {
    /// The client reset its stream or went.
    ClientGone,
    /// The upstream stream failed (reset, connection lost) or did not open its window.
    Upstream,
    /// Over the route's `max_body` (the upstream stream is reset with CANCEL).
    TooLarge,
    /// A gRPC-Web text body that is not base64 (the upstream stream is reset with CANCEL).
    Malformed,
    /// The client's DATA fell behind the body pace before the upstream answered (the
    /// upstream stream is reset with CANCEL).
    Slow,
}

impl From<call::UpstreamFailed> for Fwd {
    fn from(_: call::UpstreamFailed) -> Fwd {
        Fwd::Upstream
    }
}

/// Ends the upstream stream: with the client's trailers, or an empty END_STREAM DATA.
fn end(up: &mut SendStream<Bytes>, trailers: Option<HeaderMap>) -> Result<(), Fwd> {
    let sent = match trailers {
        Some(t) => up.send_trailers(t),
        None => up.send_data(Bytes::new(), true),
    };
    sent.map_err(|_| Fwd::Upstream)
}

/// The next DATA of the client's stream, at `pace` until the upstream has answered
/// (`answered`): from then on the call is the two ends' (a bidirectional call's client
/// may rightly say nothing for long), and the upstream's `read_timeout` and the caller's
/// deadline bound it. `Err` when the body fell behind its pace.
async fn paced_data(
    recv: &mut RecvStream,
    pace: &mut BodyPace,
    received: usize,
    answered: &AtomicBool,
) -> Result<Option<Result<Bytes, h2::Error>>, ()> {
    loop {
        if answered.load(Relaxed) {
            return Ok(recv.data().await);
        }
        let wait = pace.next_wait(received as u64, Instant::now()).ok_or(())?;
        match within(wait, recv.data()).await {
            Ok(d) => return Ok(d),
            // The upstream answered meanwhile: wait on, unpaced.
            Err(_) if answered.load(Relaxed) => continue,
            // A read that waited its whole grace, or the pace's deadline: too slow.
            Err(_) => return Err(()),
        }
    }
}

/// The request body to the upstream: what is held first (a retry), then the client's
/// DATA as it comes (at the body pace until the upstream answers), each frame released
/// to the client's window once the upstream took it, then its trailers. A client that
/// resets its stream resets the upstream's (CANCEL).
/// `text`: a gRPC-Web text call's decoder, each frame's base64 decoded on the way.
#[allow(clippy::too_many_arguments)]
async fn forward(
    recv: &mut RecvStream,
    up: &mut SendStream<Bytes>,
    held: &mut Held,
    limit: Duration,
    max_body: u64,
    text: &mut Option<Decoder>,
    pace: &mut BodyPace,
    answered: &AtomicBool,
) -> Result<(), Fwd> {
    for c in &held.chunks {
        put(up, c.clone(), limit).await?;
    }
    if held.ended {
        return end(up, held.trailers.clone());
    }
    loop {
        let Ok(next) = paced_data(recv, pace, held.read, answered).await else {
            up.send_reset(Reason::CANCEL);
            return Err(Fwd::Slow);
        };
        match next {
            Some(Ok(d)) => {
                let n = d.len();
                held.read += n;
                if held.read as u64 > max_body {
                    up.send_reset(Reason::CANCEL);
                    return Err(Fwd::TooLarge);
                }
                // What goes upstream is held (a text call's decoded bytes).
                let d = match text.as_mut().map(|t| t.decode(&d, false)) {
                    None => d,
                    Some(Ok(plain)) => plain,
                    Some(Err(_)) => {
                        up.send_reset(Reason::CANCEL);
                        return Err(Fwd::Malformed);
                    }
                };
                if !held.spilled {
                    if held.read <= HOLD {
                        held.chunks.push(d.clone());
                    } else {
                        held.spilled = true;
                        held.chunks = Vec::new();
                    }
                }
                put(up, d, limit).await?;
                let _ = recv.flow_control().release_capacity(n);
            }
            Some(Err(_)) => {
                up.send_reset(Reason::CANCEL);
                return Err(Fwd::ClientGone);
            }
            None => break,
        }
    }
    if text.as_mut().is_some_and(|t| t.decode(&[], true).is_err()) {
        up.send_reset(Reason::CANCEL);
        return Err(Fwd::Malformed);
    }
    let trailers = match recv.trailers().await {
        Ok(t) => t,
        Err(_) => {
            up.send_reset(Reason::CANCEL);
            return Err(Fwd::ClientGone);
        }
    };
    held.ended = true;
    if !held.spilled {
        held.trailers.clone_from(&trailers);
    }
    end(up, trailers)
}

/// How one try ended before a response head.
enum Tried {
    /// The head came.
    Head(http::Response<RecvStream>),
    /// The client reset its stream or went: nothing to answer.
    Gone,
    /// Nothing came by the deadline.
    TimedOut,
    /// The request body went over the route's `max_body`.
    TooLarge,
    /// A gRPC-Web text body was not base64.
    Malformed,
    /// The request body fell behind its pace.
    Slow,
    Failed(h2::Error),
}

impl Exchange<'_, '_> {
    /// Serves an admitted, planned stream to an `h2c` / `h2` service. Returns the answer
    /// and the request body bytes read.
    pub(super) async fn pass(
        &mut self,
        mut req: RequestHeader,
        mut recv: RecvStream,
        had_te: bool,
    ) -> (Answered, u64) {
        let down = upstream_head::Downstream {
            peer: self.conn.peer.map(|a| a.ip()),
            tls: self.conn.tls,
            h2: true,
            rendered: None,
        };
        if upstream_head::build(self.ctx, &mut req, down, Output::Map).is_err() {
            return (self.answer(Cause::BadRequest).await, 0);
        }
        let svc = &self.route.service;
        let Some(mut template) = call::h2_head(req, svc.config.protocol.is_tls(), had_te) else {
            return (self.answer(Cause::BadRequest).await, 0);
        };
        let mut held = Held {
            ended: recv.is_end_stream(),
            ..Held::default()
        };
        let mut head_by = self
            .ctx
            .deadline
            .unwrap_or_else(|| Instant::now() + svc.config.timeout);
        // A gRPC caller's own deadline, from when its request came (a value that is not
        // the header's syntax counts as none, and goes on as it is): the earlier one
        // bounds the call, its tries' timeouts and its retries (through the context).
        let theirs = if self.ctx.caller.is_grpc() {
            template
                .headers
                .get(grpc_timeout::NAME)
                .and_then(grpc_timeout::parse)
        } else {
            None
        };
        let bounded = theirs.is_some();
        let call_by = theirs
            .and_then(|t| self.ctx.start.checked_add(t))
            .map_or(head_by, |by| by.min(head_by));
        if bounded {
            head_by = call_by;
            self.ctx.deadline = Some(call_by);
        }
        // The body pace of the HTTP/1 engine's bodies (`client_timeout`, `body_min_rate`),
        // over all tries; off once the upstream answered.
        let limits = self.ctx.snapshot.as_ref().map(|s| s.config.limits);
        let mut pace = BodyPace::new(
            limits.map_or(crate::config::DEFAULT_CLIENT_TIMEOUT, |l| l.client_timeout),
            limits.map_or(0, |l| l.body_min_rate),
        );
        let answered = AtomicBool::new(false);
        // A gRPC-Web text call's body is decoded on the way (kept across tries: it may
        // carry part of a quantum).
        let mut text = self.ctx.grpc_web.as_ref().and_then(|w| w.decoder());
        loop {
            let no_body = held.ended && held.chunks.is_empty() && held.trailers.is_none();
            let grpc_by = bounded.then_some(call_by);
            let opened =
                call::open(self.phases, self.ctx, svc, &mut template, no_body, grpc_by).await;
            let Opened {
                mut ex,
                addr,
                read_timeout,
                another,
            } = match opened {
                Ok(o) => o,
                Err(NotOpened::Cause(Cause::UpstreamTimeout)) if bounded => {
                    return (self.deadline_exceeded().await, held.read as u64)
                }
                Err(NotOpened::Cause(cause)) => {
                    return (self.answer(cause).await, held.read as u64)
                }
                Err(NotOpened::Failed) => return (self.failed().await, held.read as u64),
            };
            // The request body goes up while the response head is awaited, and on while
            // the response comes back (a bidirectional call).
            let tried = {
                let max_body = self.route.config.max_body;
                let mut fwd = pin!(forward(
                    &mut recv,
                    &mut ex.body,
                    &mut held,
                    read_timeout,
                    max_body,
                    &mut text,
                    &mut pace,
                    &answered,
                ));
                let mut fwd_done = no_body;
                let tried = loop {
                    tokio::select! {
                        biased;
                        _ = poll_fn(|cx| self.respond.poll_reset(cx)) => break Tried::Gone,
                        f = &mut fwd, if !fwd_done => {
                            fwd_done = true;
                            match f {
                                Err(Fwd::ClientGone) => break Tried::Gone,
                                Err(Fwd::TooLarge) => break Tried::TooLarge,
                                Err(Fwd::Malformed) => break Tried::Malformed,
                                Err(Fwd::Slow) => break Tried::Slow,
                                // An upstream failure shows in its response (below).
                                _ => {}
                            }
                        }
                        // Before the response: an upstream that gave up at the same
                        // deadline (its `grpc-timeout`) does not answer for busbar.
                        _ = tokio::time::sleep_until(head_by.into()) => break Tried::TimedOut,
                        r = &mut ex.response => break match r {
                            Ok(r) => Tried::Head(r),
                            Err(e) => Tried::Failed(e),
                        },
                    }
                };
                match tried {
                    Tried::Head(resp) => {
                        answered.store(true, Relaxed);
                        self.phases.on_response_head(self.ctx);
                        let (parts, body) = resp.into_parts();
                        Ok(self
                            .relay(parts, body, fwd, fwd_done, read_timeout, grpc_by)
                            .await)
                    }
                    other => Err(other),
                }
            };
            let read = held.read as u64;
            match tried {
                Ok(answered) => {
                    drop(ex.slot);
                    self.ctx.release_instance();
                    return (answered, read);
                }
                Err(Tried::Gone) => {
                    // Dropping the stream's handles resets it upstream with CANCEL.
                    self.ctx.release_instance();
                    return (Answered::nothing(), read);
                }
                Err(Tried::TooLarge) => {
                    self.phases
                        .on_try_failure(self.ctx, false, false, false, false);
                    return (self.body_failed(BodyFail::TooLarge).await, read);
                }
                Err(Tried::Malformed) => {
                    self.phases
                        .on_try_failure(self.ctx, false, false, false, false);
                    return (self.body_failed(BodyFail::Malformed).await, read);
                }
                Err(Tried::Slow) => {
                    // The client's fault, not the instance's: 408 (or its gRPC shape).
                    self.phases
                        .on_try_failure(self.ctx, false, false, false, false);
                    return (self.body_failed(BodyFail::Slow).await, read);
                }
                Err(Tried::Failed(e)) if pool::refused(&e) => {
                    ex.slot.failed(&e);
                    // Not processed (RFC 9113 §8.7): not the instance's fault; sent again
                    // only while the whole body is held.
                    tracing::debug!(upstream = %addr, "h2 stream refused: {e}");
                    let safe = held.whole() && another;
                    if self
                        .phases
                        .on_try_failure(self.ctx, false, false, safe, true)
                    {
                        continue;
                    }
                    self.ctx.cause = Some(Cause::UpstreamError);
                }
                Err(Tried::Failed(e)) => {
                    ex.slot.failed(&e);
                    self.phases
                        .on_try_failure(self.ctx, true, false, false, false);
                }
                Err(_) => {
                    // No head by the deadline: is the connection itself still alive?
                    ex.slot.suspect();
                    self.phases
                        .on_try_failure(self.ctx, true, true, false, false);
                    if bounded {
                        return (self.deadline_exceeded().await, read);
                    }
                }
            }
            return (self.failed().await, read);
        }
    }

    /// busbar's answer for a call whose tries failed before a response head.
    async fn failed(&mut self) -> Answered {
        let cause = fail::cause_of(self.ctx, Failure::Upstream).unwrap_or(Cause::UpstreamError);
        self.answer(cause).await
    }

    /// A gRPC call's deadline passed before a response head: DEADLINE_EXCEEDED,
    /// Trailers-Only (the access log names the cause `upstream_timeout`).
    async fn deadline_exceeded(&mut self) -> Answered {
        self.ctx.cause = Some(Cause::UpstreamTimeout);
        self.ctx.grpc_status = Some(4);
        let head = trailers_only(
            self.ctx.caller,
            4,
            "deadline_exceeded",
            "the call's deadline (its grpc-timeout, or the route's timeout) passed before the upstream answered",
        );
        let Ok(_) = self.respond.send_response(to_h2(head), true) else {
            return Answered::nothing();
        };
        Answered {
            status: 200,
            body_bytes: 0,
        }
    }

    /// The upstream's response to the client: its head edited by the phases, its DATA
    /// within the client's window (released to the upstream's as the client takes it),
    /// its trailers; the request body keeps going up meanwhile (`fwd`). At `call_by` (a
    /// gRPC caller's deadline) the client's stream is reset with CANCEL, and the
    /// upstream's with it (its handles are dropped).
    async fn relay<F: std::future::Future<Output = Result<(), Fwd>>>(
        &mut self,
        parts: http::response::Parts,
        mut body: RecvStream,
        mut fwd: std::pin::Pin<&mut F>,
        mut fwd_done: bool,
        read_timeout: Duration,
        call_by: Option<Instant>,
    ) -> Answered {
        let status = parts.status;
        // The access log's `grpc_status`: in the head of a Trailers-Only answer, else in
        // the trailers (below). Looked up only while the log is on.
        let logged = self.ctx.caller.is_grpc() && self.phases.access_log.enabled();
        if logged {
            self.ctx.grpc_status = grpc_status(&parts.headers);
        }
        let mut resp = ResponseHeader::from(parts);
        if response_head::edit(self.ctx, &mut resp).is_err() {
            return self.answer(Cause::UpstreamError).await;
        }
        let whole = body.is_end_stream();
        let Ok(mut tx) = self.respond.send_response(to_h2(resp), whole) else {
            return Answered::nothing();
        };
        let code = status.as_u16();
        let mut sent = 0;
        if whole {
            self.phases.on_response_health(self.ctx, status);
            return Answered {
                status: code,
                body_bytes: 0,
            };
        }
        let cut = |sent| Answered {
            status: code,
            body_bytes: sent,
        };
        // The timer is made only when first polled, and only a call with a deadline
        // polls it (its arm is off otherwise).
        let timed = call_by.is_some();
        let mut expiry = pin!(async {
            match call_by {
                Some(by) => tokio::time::sleep_until(by.into()).await,
                None => std::future::pending().await,
            }
        });
        loop {
            tokio::select! {
                biased;
                _ = poll_fn(|cx| tx.poll_reset(cx)) => return cut(sent),
                _ = expiry.as_mut(), if timed => {
                    self.ctx.cause = Some(Cause::UpstreamTimeout);
                    tx.send_reset(Reason::CANCEL);
                    return cut(sent);
                }
                f = &mut fwd, if !fwd_done => {
                    fwd_done = true;
                    match f {
                        Err(Fwd::ClientGone) => return cut(sent),
                        // Slow: not paced once the head came, cannot happen here.
                        Err(Fwd::TooLarge | Fwd::Malformed | Fwd::Slow) => {
                            // The upstream answered early and its stream was reset:
                            // the client's is cut too.
                            tx.send_reset(Reason::CANCEL);
                            return cut(sent);
                        }
                        _ => {}
                    }
                }
                d = within(read_timeout, body.data()) => match d {
                    Ok(Some(Ok(data))) => {
                        let n = data.len();
                        // A gRPC-Web caller reads it in its mode (text: base64).
                        let data = match self.ctx.grpc_web.as_mut() {
                            Some(w) => w.encode(data, false),
                            None => data,
                        };
                        let k = data.len();
                        if send(&mut tx, data, false, self.limit).await.is_err() {
                            return cut(sent);
                        }
                        let _ = body.flow_control().release_capacity(n);
                        sent += k;
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        self.phases.on_try_failure(self.ctx, e.reason() != Some(Reason::CANCEL), false, false, false);
                        tx.send_reset(e.reason().unwrap_or(Reason::INTERNAL_ERROR));
                        return cut(sent);
                    }
                    Err(_) => {
                        self.phases.on_try_failure(self.ctx, true, true, false, false);
                        tx.send_reset(Reason::CANCEL);
                        return cut(sent);
                    }
                },
            }
        }
        let wait = call_by.map_or(read_timeout, |by| {
            read_timeout.min(by.saturating_duration_since(Instant::now()))
        });
        let trailers = match within(wait, body.trailers()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                self.phases
                    .on_try_failure(self.ctx, true, false, false, false);
                tx.send_reset(e.reason().unwrap_or(Reason::INTERNAL_ERROR));
                return cut(sent);
            }
            Err(_) => {
                self.phases
                    .on_try_failure(self.ctx, true, true, false, false);
                tx.send_reset(Reason::CANCEL);
                return cut(sent);
            }
        };
        let ended = match (self.ctx.grpc_web.as_mut(), trailers) {
            // gRPC-Web: the trailers are the body's last frame.
            (Some(w), t) => {
                if logged {
                    self.ctx.grpc_status =
                        t.as_ref().and_then(grpc_status).or(self.ctx.grpc_status);
                }
                let last = w.finish(t.as_ref());
                sent += last.len();
                send(&mut tx, last, true, self.limit).await.map_err(|_| ())
            }
            (None, Some(t)) => {
                if logged {
                    self.ctx.grpc_status = grpc_status(&t).or(self.ctx.grpc_status);
                }
                tx.send_trailers(t).map_err(|_| ())
            }
            (None, None) => tx.send_data(Bytes::new(), true).map_err(|_| ()),
        };
        if ended.is_ok() {
            self.phases.on_response_health(self.ctx, status);
        }
        cut(sent)
    }
}

/// A `grpc-status` field's value: 1 to 3 digits (gRPC's codes are 0 to 16; another
/// number is logged as it came), else `None`.
fn grpc_status(h: &HeaderMap) -> Option<u16> {
    let v = h.get("grpc-status")?.as_bytes();
    if v.is_empty() || v.len() > 3 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + u16::from(d - b'0')))
}
