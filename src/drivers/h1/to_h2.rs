//! An HTTP/1.x client's request to an `h2c` / `h2` service: plain HTTP, or a gRPC-Web
//! call (binary or text), which browsers send over HTTP/1.1.
//!
//! The request goes to the instance as a stream of `drivers::h2::pool`, opened by the
//! tries `drivers::h2::call` shares with HTTP/2 clients: the body's first bytes (up to
//! [`body::HOLD`]) are held, their framing taken off, and sent again by a try after a
//! stream the instance refused unprocessed; a longer body streams as it is read. The
//! response goes back as HTTP/1.1: its `Content-Length` kept when it has one (and no
//! codec changes the body), chunked otherwise (an HTTP/1.0 client: ended by the
//! close). HTTP/1 has no place for the upstream's trailers here: they are dropped, as
//! pingora's proxy dropped them, except for a gRPC-Web call, whose trailers become the
//! body's last frame (`translate::grpc_web`). A client that closes its connection
//! mid-response (once its body has all been read) leaves the upstream stream reset
//! with CANCEL at once.
//!
//! Owns: HTTP/1 framing of both sides for these requests, `Expect: 100-continue` (said
//! at once: an HTTP/2 service has no interim answer to wait for), and the gRPC-Web codec
//! on the body both ways.
//! Must not: hold policy (the phases'), or frame HTTP/2 (the `h2` crate's).

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderValue, Method, StatusCode};
use pingora_http::{RequestHeader, ResponseHeader};

use super::body::{self, BodyFail, RequestBody};
use super::client::{ClientStream, Downstream, Served};
use super::framing::ChunkScan;
use super::response::write_head;
use super::{body_failed, Sides};
use crate::base::deadline::within;
use crate::drivers::h2::call::{self, put, NotOpened, Opened};
use crate::drivers::h2::pool;
use crate::phases::ctx::RequestCtx;
use crate::phases::fail::{self, Failure};
use crate::phases::response_head;
use crate::phases::upstream_head::{self, Output};
use crate::phases::Phases;
use crate::proxy::reply::Cause;
use crate::routing::Route;
use crate::translate::grpc_web::Decoder;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// One read of a streaming body.
const STREAM_BUF: usize = 32 * 1024;

/// The request body's data, out of its HTTP/1 framing (and a gRPC-Web text call's
/// base64).
struct Plain {
    /// A chunked body's framing, scanned beside `RequestBody`'s for the data.
    scan: Option<ChunkScan>,
    text: Option<Decoder>,
}

impl Plain {
    /// The data in `raw`, the body's next bytes; `end`: the body ends with them.
    fn data(&mut self, raw: &[u8], end: bool) -> Result<Bytes, BodyFail> {
        let data = match self.scan.as_mut() {
            Some(s) => {
                let mut data = BytesMut::new();
                s.feed_with(raw, |d| data.extend_from_slice(d))
                    .map_err(|_| BodyFail::Malformed)?;
                data.freeze()
            }
            None => Bytes::copy_from_slice(raw),
        };
        match self.text.as_mut() {
            Some(t) => t.decode(&data, end).map_err(|_| BodyFail::Malformed),
            None => Ok(data),
        }
    }
}

/// The rest of a body that did not fit the hold, read from the client a piece at a
/// time while the upstream answers (an HTTP/2 service may answer before the request's
/// end, and read on: a stream both ways).
struct Upload<'a> {
    body: &'a mut RequestBody,
    /// The connection's buffer: bytes past the body's end go back to it.
    conn: &'a mut Vec<u8>,
    plain: &'a mut Plain,
    chunk: Vec<u8>,
}

impl Upload<'_> {
    /// The body still has bytes to come.
    fn pending(&self) -> bool {
        !self.body.done()
    }

    /// The body's next piece of data from the client. Only the read waits, so the
    /// future may be dropped (another branch of a `select!` won) without losing bytes.
    async fn read<S: ClientStream>(&mut self, client: &mut S) -> Result<Bytes, BodyFail> {
        self.chunk.clear();
        if self.chunk.capacity() < STREAM_BUF {
            self.chunk.reserve(STREAM_BUF);
        }
        let n = self.body.read(client, &mut self.chunk).await?;
        let take = self.body.feed(&self.chunk[..n])?;
        if take < n {
            // The client's next request, pipelined.
            self.conn.extend_from_slice(&self.chunk[take..n]);
        }
        self.plain.data(&self.chunk[..take], self.body.done())
    }
}

/// Sends a piece of the body up, and the stream's end after the last one. `false`: the
/// upstream stream failed (its response, or its error, says how).
async fn upload(up: &mut SendStream<Bytes>, data: Bytes, last: bool, limit: Duration) -> bool {
    put(up, data, limit).await.is_ok() && (!last || up.send_data(Bytes::new(), true).is_ok())
}

/// How one try ended before a response head.
enum Tried {
    Head(http::Response<RecvStream>),
    /// The client went away: nothing to answer.
    Gone,
    /// The request body could not be read.
    Body(BodyFail),
    /// Nothing came by the deadline.
    TimedOut,
    Failed(h2::Error),
}

/// Serves an admitted, planned request to an `h2c` / `h2` service: the tries, then the
/// response as HTTP/1.x.
pub(super) async fn exchange<S: ClientStream>(
    phases: &Phases,
    down: &mut Downstream<'_, S>,
    route: &Route,
    req: &mut RequestHeader,
    ctx: &mut RequestCtx,
    sides: &mut Sides<'_>,
) -> Served {
    let conn = upstream_head::Downstream {
        peer: down.peer.map(|a| a.ip()),
        tls: ctx.tls,
        h2: false,
        rendered: None,
    };
    let mut up = req.clone();
    if upstream_head::build(ctx, &mut up, conn, Output::Map).is_err() {
        return down.answer(ctx, Cause::BadRequest, false).await;
    }
    // HTTP/2 has no connection-specific fields; `Expect` is answered here.
    for name in crate::base::http::HOP_BY_HOP {
        up.remove_header(name);
    }
    up.remove_header(&http::header::EXPECT);
    let svc = &route.service;
    // gRPC wants `te: trailers` (the codec's edits asked for it).
    let web = ctx.grpc_web.is_some();
    let Some(mut template) = call::h2_head(up, svc.config.protocol.is_tls(), web) else {
        return down.answer(ctx, Cause::BadRequest, false).await;
    };
    let chunked = sides.body.declared().is_none();
    let mut plain = Plain {
        scan: chunked.then(ChunkScan::default),
        text: ctx.grpc_web.as_ref().and_then(|w| w.decoder()),
    };
    // The body's first bytes, held for a retry; a client that waits for `100 Continue`
    // hears it now.
    let mut held = Bytes::new();
    if !sides.body.done() {
        if sides.expect && sides.conn.is_empty() && !sides.http10 && !down.send(CONTINUE).await {
            return Served::nothing();
        }
        let mut raw = Vec::new();
        let read = body::hold(sides.body, down.client, sides.conn, &mut raw, true);
        if let Err(f) = read.await {
            return body_failed(down, ctx, f).await;
        }
        held = match plain.data(&raw, sides.body.done()) {
            Ok(d) => d,
            Err(f) => return body_failed(down, ctx, f).await,
        };
    }
    let streams = !sides.body.done();
    let no_body = !streams && held.is_empty();
    let mut rest = Upload {
        body: &mut *sides.body,
        conn: &mut *sides.conn,
        plain: &mut plain,
        chunk: Vec::new(),
    };
    let head_by = ctx
        .deadline
        .unwrap_or_else(|| Instant::now() + svc.config.timeout);
    let (resp, mut ex, read_timeout) = loop {
        let opened = call::open(phases, ctx, svc, &mut template, no_body, None).await;
        let Opened {
            mut ex,
            addr,
            read_timeout,
            another,
        } = match opened {
            Ok(o) => o,
            Err(NotOpened::Cause(cause)) => return down.answer(ctx, cause, false).await,
            Err(NotOpened::Failed) => return failed(down, ctx).await,
        };
        let tried = send_and_wait(down, &mut rest, &mut ex, &held, head_by, read_timeout);
        let tried = tried.await;
        match tried {
            Tried::Head(resp) => {
                phases.on_response_head(ctx);
                // The stream (and its slot) is held while the response is read.
                break (resp, ex, read_timeout);
            }
            Tried::Gone => {
                // Dropping the stream's handles resets it upstream with CANCEL.
                ctx.release_instance();
                return Served::nothing();
            }
            Tried::Body(f) => {
                phases.on_try_failure(ctx, false, false, false, false);
                return body_failed(down, ctx, f).await;
            }
            Tried::Failed(e) if pool::refused(&e) => {
                ex.slot.failed(&e);
                // Not processed (RFC 9113 §8.7): sent again while the whole body is held.
                tracing::debug!(upstream = %addr, "h2 stream refused: {e}");
                if phases.on_try_failure(ctx, false, false, !streams && another, true) {
                    continue;
                }
                ctx.cause = Some(Cause::UpstreamError);
            }
            Tried::Failed(e) => {
                ex.slot.failed(&e);
                phases.on_try_failure(ctx, true, false, false, false);
            }
            Tried::TimedOut => {
                phases.on_try_failure(ctx, true, true, false, false);
            }
        }
        return failed(down, ctx).await;
    };
    let head_request = req.method == Method::HEAD;
    let http10 = sides.http10;
    let sending = (&mut ex.body, &mut rest);
    let served = relay(
        phases,
        down,
        ctx,
        resp,
        head_request,
        http10,
        sending,
        read_timeout,
    );
    let served = served.await;
    drop(ex);
    ctx.release_instance();
    served
}

/// busbar's answer for a request whose tries failed before a response head.
async fn failed<S: ClientStream>(down: &mut Downstream<'_, S>, ctx: &mut RequestCtx) -> Served {
    let cause = fail::cause_of(ctx, Failure::Upstream).unwrap_or(Cause::UpstreamError);
    down.answer(ctx, cause, false).await
}

/// One try: the held body, then the rest as it comes while the response head is
/// awaited, then the wait for the head, watching for a client that leaves. The body
/// goes on during the response (`relay`) if the head comes first.
async fn send_and_wait<S: ClientStream>(
    down: &mut Downstream<'_, S>,
    rest: &mut Upload<'_>,
    ex: &mut pool::Exchange,
    held: &Bytes,
    head_by: Instant,
    limit: Duration,
) -> Tried {
    // A failed upstream stream shows in its response.
    let mut sending =
        held.is_empty() || upload(&mut ex.body, held.clone(), !rest.pending(), limit).await;
    while sending && rest.pending() {
        tokio::select! {
            biased;
            r = &mut ex.response => return head_of(r),
            piece = rest.read(down.client) => match piece {
                Ok(d) => sending = upload(&mut ex.body, d, !rest.pending(), limit).await,
                Err(f) => return Tried::Body(f),
            },
            _ = tokio::time::sleep_until(head_by.into()) => return Tried::TimedOut,
        }
    }
    // The request has all been read (or the upstream failed taking it): a client that
    // closes now has left.
    down.watch = !rest.pending() && rest.conn.is_empty();
    tokio::select! {
        biased;
        r = &mut ex.response => head_of(r),
        _ = down.left() => Tried::Gone,
        _ = tokio::time::sleep_until(head_by.into()) => Tried::TimedOut,
    }
}

fn head_of(r: Result<http::Response<RecvStream>, h2::Error>) -> Tried {
    match r {
        Ok(r) => Tried::Head(r),
        Err(e) => Tried::Failed(e),
    }
}

/// How the response body goes to the HTTP/1 client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (`HEAD`, 204, 304, or an empty one: `Content-Length: 0`).
    None,
    /// The upstream's `Content-Length`.
    Length,
    Chunked,
    /// An HTTP/1.0 client: the close ends it.
    Close,
}

/// The upstream's response to the HTTP/1 client: its head edited by the phases, its
/// DATA as it comes (a gRPC-Web caller's in its mode), then its end.
#[allow(clippy::too_many_arguments)]
async fn relay<S: ClientStream>(
    phases: &Phases,
    down: &mut Downstream<'_, S>,
    ctx: &mut RequestCtx,
    resp: http::Response<RecvStream>,
    head_request: bool,
    http10: bool,
    (up, rest): (&mut SendStream<Bytes>, &mut Upload<'_>),
    read_timeout: Duration,
) -> Served {
    let (parts, mut rb) = resp.into_parts();
    let status = parts.status;
    let mut head = ResponseHeader::from(parts);
    if response_head::edit(ctx, &mut head).is_err() {
        return down.answer(ctx, Cause::UpstreamError, false).await;
    }
    if head.headers.contains_key(TRANSFER_ENCODING) {
        head.remove_header(&TRANSFER_ENCODING);
    }
    let bodyless = head_request
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    // The codec (gRPC-Web) took `Content-Length` off: its body is not the upstream's.
    let length = head.headers.contains_key(CONTENT_LENGTH);
    let framing = if bodyless {
        Framing::None
    } else if rb.is_end_stream() && !length {
        let _ = head.insert_header(CONTENT_LENGTH, HeaderValue::from_static("0"));
        Framing::None
    } else if length {
        Framing::Length
    } else if http10 {
        Framing::Close
    } else {
        let _ = head.insert_header(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        Framing::Chunked
    };
    // The connection goes on if the request's body is read to its end too (the caller
    // checks once this returns).
    let keep_alive = down.keep_alive && framing != Framing::Close;
    let code = status.as_u16();
    let mut out = Vec::with_capacity(512);
    write_head(&mut out, &mut head, keep_alive);
    if !down.send(&out).await {
        return Served::cut(code, 0);
    }
    let mut sent = 0;
    if framing == Framing::None {
        phases.on_response_health(ctx, status);
        // A body the client has no room for (a `HEAD`'s) is not read: the stream is
        // reset when its handles drop.
        return Served {
            status: code,
            body_bytes: 0,
            keep_alive,
        };
    }
    // The request's body goes on up while the response comes, until either ends.
    // Once it has all gone, a client that closes its connection has left: the
    // upstream's stream is reset (CANCEL, as the handles drop), not read to its end.
    let mut sending = rest.pending();
    loop {
        let next = if sending {
            tokio::select! {
                biased;
                d = within(read_timeout, rb.data()) => d,
                piece = rest.read(down.client) => {
                    match piece {
                        Ok(d) => sending = upload(up, d, !rest.pending(), read_timeout).await,
                        // The response is cut; the client connection closes.
                        Err(_) => return Served::cut(code, sent),
                    }
                    if !rest.pending() {
                        down.watch = rest.conn.is_empty();
                    }
                    continue;
                }
            }
        } else {
            tokio::select! {
                biased;
                d = within(read_timeout, rb.data()) => d,
                _ = down.left() => return Served::cut(code, sent),
            }
        };
        let data = match next {
            Ok(Some(Ok(d))) => d,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                let fault = e.reason() != Some(h2::Reason::CANCEL);
                phases.on_try_failure(ctx, fault, false, false, false);
                return Served::cut(code, sent);
            }
            Err(_) => {
                phases.on_try_failure(ctx, true, true, false, false);
                return Served::cut(code, sent);
            }
        };
        let n = data.len();
        let data = match ctx.grpc_web.as_mut() {
            Some(w) => w.encode(data, false),
            None => data,
        };
        if !send_piece(down, framing, &data, &mut out).await {
            return Served::cut(code, sent);
        }
        let _ = rb.flow_control().release_capacity(n);
        sent += data.len();
    }
    let trailers = match within(read_timeout, rb.trailers()).await {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => {
            phases.on_try_failure(ctx, true, false, false, false);
            return Served::cut(code, sent);
        }
        Err(_) => {
            phases.on_try_failure(ctx, true, true, false, false);
            return Served::cut(code, sent);
        }
    };
    // gRPC-Web: the trailers are the body's last frame. Anyone else's are dropped.
    if let Some(w) = ctx.grpc_web.as_mut() {
        let last = w.finish(trailers.as_ref());
        if !send_piece(down, framing, &last, &mut out).await {
            return Served::cut(code, sent);
        }
        sent += last.len();
    }
    if framing == Framing::Chunked && !down.send(b"0\r\n\r\n").await {
        return Served::cut(code, sent);
    }
    phases.on_response_health(ctx, status);
    Served {
        status: code,
        body_bytes: sent,
        keep_alive,
    }
}

/// Writes a piece of the response body in the response's framing (`out`: a buffer for
/// a chunk's size line and data).
async fn send_piece<S: ClientStream>(
    down: &mut Downstream<'_, S>,
    framing: Framing,
    data: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    if data.is_empty() {
        return true;
    }
    if framing != Framing::Chunked {
        return down.send(data).await;
    }
    out.clear();
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    let out = &*out;
    down.send(out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_text_bodies_come_out_plain() {
        let mut p = Plain {
            scan: Some(ChunkScan::default()),
            text: None,
        };
        assert_eq!(p.data(b"3\r\nabc\r\n2\r", false).unwrap(), "abc");
        assert_eq!(p.data(b"\nde\r\n0\r\n\r\n", true).unwrap(), "de");
        assert!(p.data(b"zz\r\n", false).is_err());
        let mut p = Plain {
            scan: None,
            text: Some(Decoder::default()),
        };
        assert_eq!(p.data(b"AAEC", false).unwrap(), &[0u8, 1, 2][..]);
        assert!(p.data(b"AA", true).is_err());
    }
}
