//! A JSON→gRPC call's caller on busbar's HTTP/1 engine: the [`JsonIo`] the call
//! (`drivers::json_grpc`) reads the request body from and writes its answer to.
//!
//! Owns: the body's data as the engine reads it (`body::next_data`: framing, pace, the
//! `100 Continue` a waiting client is sent before its body is read, the bytes a client
//! pipelined after it), the answer's HTTP/1 framing (its `Content-Length`, or chunked
//! for a server stream; plain data ended by the close for an HTTP/1.0 client), no body
//! bytes for a `HEAD`, and noticing a client that closes while its call waits.
//! Must not: translate, try or decide what to answer (`drivers::json_grpc`, the phases).

use bytes::{BufMut, Bytes};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::body::{self, BodyFail, RequestBody, CONTINUE};
use super::client::{ClientStream, Downstream, Served};
use super::response::{finish_head, status_line, write_head};
use crate::base::deadline::within;
use crate::drivers::json_grpc::{self, JsonIo};
use crate::phases::ctx::RequestCtx;
use crate::phases::response_head::{self, Form};
use crate::phases::{upstream_head, Phases};
use crate::translate::json_grpc::Transcoder;

/// Bytes the answer's buffer starts with: a head (status line, a few fields, `Date`)
/// and a small body.
const HEAD_ROOM: usize = 512;

/// The caller of one JSON→gRPC call on an HTTP/1 connection.
pub(super) struct H1Json<'a, 'd, S> {
    pub(super) down: &'a mut Downstream<'d, S>,
    pub(super) req: &'a RequestHeader,
    pub(super) body: &'a mut RequestBody,
    /// The connection's buffer: the body's first bytes; the next request after it.
    pub(super) conn: &'a mut Vec<u8>,
    /// The client waits for `100 Continue` before it sends its body.
    pub(super) expect: bool,
    /// The client speaks HTTP/1.0: no 1xx, no chunked answer.
    pub(super) http10: bool,
    /// The response head, sent with the first body bytes.
    pub(super) out: Vec<u8>,
    /// The answer's body is chunked (a server stream to an HTTP/1.1 client).
    pub(super) chunked: bool,
    /// The answer's status, once its head is out.
    pub(super) status: u16,
    /// The status of the head waiting in `out`.
    pending: u16,
    /// Body bytes the client got (framing not counted).
    pub(super) sent: usize,
    /// The answer ended, whole.
    pub(super) ended: bool,
    /// The connection may carry another request after this answer.
    pub(super) keep_alive: bool,
    /// How the body failed, if it did: the engine answers that (as its own path does).
    pub(super) failed: Option<BodyFail>,
    /// The client sent bytes while its call waited (its next request): the watch for a
    /// close is over.
    pub(super) pipelined: bool,
    /// The client's connection is TLS (`ctx.tls`: `X-Forwarded-Proto` and `Forwarded`).
    tls: bool,
}

impl<'a, 'd, S: ClientStream> H1Json<'a, 'd, S> {
    pub(super) fn new(
        down: &'a mut Downstream<'d, S>,
        req: &'a RequestHeader,
        body: &'a mut RequestBody,
        conn: &'a mut Vec<u8>,
        expect: bool,
        http10: bool,
        tls: bool,
    ) -> Self {
        let keep_alive = down.keep_alive;
        H1Json {
            down,
            req,
            body,
            conn,
            expect,
            http10,
            out: Vec::new(),
            chunked: false,
            status: 0,
            pending: 0,
            sent: 0,
            ended: false,
            keep_alive,
            tls,
            failed: None,
            pipelined: false,
        }
    }

    /// What the answer was, for the access log and the keep-alive loop; `None` when
    /// nothing was answered (the body failed, or the client left).
    pub(super) fn served(&self) -> Option<Served> {
        (self.status != 0).then_some(Served {
            status: self.status,
            body_bytes: self.sent,
            keep_alive: self.keep_alive && self.ended && self.body.done(),
        })
    }

    /// Before a head goes into `out`: the connection goes on only once the whole request
    /// was read; room for the head and `body` bytes at once (written a field at a time
    /// into an empty buffer, a head grew it six times).
    fn start_head(&mut self, body: usize) {
        self.keep_alive &= self.body.done();
        self.out.clear();
        self.out.reserve(HEAD_ROOM + body);
    }

    /// Writes `data` (framed), after the head if it is waiting; `end` ends the answer.
    async fn send(&mut self, data: &[u8], end: bool) -> Result<()> {
        // A `HEAD` answer is its head alone.
        let head_only = self.req.method == http::Method::HEAD;
        let data = if head_only { &[][..] } else { data };
        if self.chunked && !data.is_empty() {
            let _ = std::io::Write::write_fmt(&mut self.out, format_args!("{:x}\r\n", data.len()));
            self.out.put_slice(data);
            self.out.put_slice(b"\r\n");
        } else {
            self.out.put_slice(data);
        }
        if self.chunked && end && !head_only {
            self.out.put_slice(b"0\r\n\r\n");
        }
        let sent = self.down.send(&self.out).await;
        self.out.clear();
        if !sent {
            return Err(Error::explain(ErrorType::WriteError, "client write failed").into_down());
        }
        if self.pending != 0 {
            self.status = std::mem::take(&mut self.pending);
        }
        self.sent += data.len();
        self.ended = end;
        Ok(())
    }
}

impl<S: ClientStream> JsonIo for H1Json<'_, '_, S> {
    fn head(&self) -> &RequestHeader {
        self.req
    }

    fn connection(&self) -> upstream_head::Downstream<'_> {
        upstream_head::Downstream {
            peer: self.down.peer.map(|a| a.ip()),
            tls: self.tls,
            h2: false,
            rendered: None,
        }
    }

    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.expect {
            self.expect = false;
            // Told only now, as the call reads the body: a request refused before
            // (no route, admission) never asked the client for its body.
            if !self.http10 && self.conn.is_empty() && !self.body.done() {
                let limit = self.down.limit;
                let wrote = within(limit, self.down.client.write_all(CONTINUE)).await;
                if !matches!(wrote, Ok(Ok(()))) {
                    self.failed = Some(BodyFail::Gone);
                    return Err(body_error(BodyFail::Gone));
                }
            }
        }
        match body::next_data(self.body, self.down.client, self.conn).await {
            Ok(data) => Ok(data),
            Err(f) => {
                self.failed = Some(f);
                Err(body_error(f))
            }
        }
    }

    fn close(&mut self) {
        self.keep_alive = false;
    }

    async fn write_head(&mut self, mut head: ResponseHeader) -> Result<()> {
        // A server stream has no length: chunked to an HTTP/1.1 client, ended by the
        // close for an HTTP/1.0 one.
        if !head.headers.contains_key(CONTENT_LENGTH) {
            if self.http10 {
                self.keep_alive = false;
            } else {
                self.chunked = true;
                head.insert_header(TRANSFER_ENCODING, "chunked")?;
            }
        }
        self.start_head(0);
        write_head(&mut self.out, &mut head, self.keep_alive);
        // Sent with the first body bytes (`send`): one write for a whole answer.
        self.pending = head.status.as_u16();
        Ok(())
    }

    async fn write_ok(&mut self, ctx: &RequestCtx, body: &[u8]) -> Result<bool> {
        // Only where busbar's edits are lines (`Form::Lines`: admission's `RateLimit-*`);
        // a route that edits response headers gets them through the map.
        let Form::Lines { rate } = response_head::form(ctx) else {
            return Ok(false);
        };
        self.start_head(body.len());
        if !ok_head(&mut self.out, body.len()) {
            return Ok(false);
        }
        finish_head(&mut self.out, rate.as_ref(), self.keep_alive);
        self.pending = 200;
        self.send(body, true).await?;
        Ok(true)
    }

    async fn write_body(&mut self, data: Bytes, end: bool) -> Result<()> {
        self.send(&data, end).await
    }

    async fn gone(&mut self) {
        // Only once the body is all read, and nothing after it: the socket then holds
        // nothing but the client's next request (see `Downstream::left`).
        if self.pipelined || !self.body.done() || !self.conn.is_empty() {
            return std::future::pending().await;
        }
        let mut byte = [0u8; 1];
        match self.down.client.read(&mut byte).await {
            Ok(0) | Err(_) => {}
            Ok(_) => {
                self.down.client.unread(&byte);
                self.pipelined = true;
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The status line and fields of `reply::json_header(200, len)` as `write_head` writes
/// them, from a copy rendered once a thread and split around the length's value; `false`
/// (nothing written) if that copy has no `Content-Length: 0` line to split at.
fn ok_head(out: &mut Vec<u8>, len: usize) -> bool {
    thread_local! {
        static OK: Option<(Vec<u8>, Vec<u8>)> = {
            let h = crate::proxy::reply::json_header(200, 0);
            let mut wire = Vec::new();
            status_line(&mut wire, h.status);
            h.header_to_h1_wire(&mut wire);
            const FIELD: &[u8] = b"\r\ncontent-length: ";
            wire.windows(FIELD.len() + 3)
                .position(|w| w[..FIELD.len()].eq_ignore_ascii_case(FIELD) && &w[FIELD.len()..] == b"0\r\n")
                .map(|at| {
                    let value = at + FIELD.len();
                    (wire[..value].to_vec(), wire[value + 1..].to_vec())
                })
        };
    }
    OK.with(|ok| {
        let Some((before, after)) = ok else {
            return false;
        };
        out.extend_from_slice(before);
        out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
        out.extend_from_slice(after);
        true
    })
}

fn body_error(f: BodyFail) -> Box<Error> {
    let etype = match f {
        BodyFail::Slow => ErrorType::ReadTimedout,
        BodyFail::Gone => ErrorType::ConnectionClosed,
        BodyFail::Malformed => ErrorType::InvalidHTTPHeader,
        BodyFail::TooLarge => ErrorType::HTTPStatus(413),
    };
    Error::explain(etype, "request body").into_down()
}

/// Serves an admitted request on a JSON→gRPC route through its call; what the client got.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve<S: ClientStream>(
    phases: &Phases,
    down: &mut Downstream<'_, S>,
    req: &RequestHeader,
    ctx: &mut RequestCtx,
    t: &Transcoder,
    body: &mut RequestBody,
    conn: &mut Vec<u8>,
    http10: bool,
    expect: bool,
) -> Served {
    let mut io = H1Json::new(down, req, body, conn, expect, http10, ctx.tls);
    // An `Err` is the client's side failing: `failed` says how, if it was the body.
    let _ = json_grpc::serve(phases, &mut io, ctx, t).await;
    if let Some(served) = io.served() {
        return served;
    }
    match io.failed {
        Some(f) => super::body_failed(down, ctx, f).await,
        None => Served::nothing(),
    }
}
