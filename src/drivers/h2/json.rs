//! A JSON→gRPC call's caller on busbar's HTTP/2 engine: the [`JsonIo`] the call
//! (`drivers::json_grpc`) reads the stream's body from and writes its answer to.
//!
//! Owns: the stream's DATA as the body (flow control: a frame's bytes go back to the
//! client's window as the call takes them; `max_body` bounds what the call holds; each
//! wait within the body's pace), the answer as HEADERS and DATA within the client's
//! window (`response::send`), and the stream's reset while the call waits.
//! Must not: translate, try or decide what to answer (`drivers::json_grpc`, the phases).

use std::future::poll_fn;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};

use super::response::{send, to_h2};
use super::stream::{Answered, Conn};
use crate::base::deadline::within;
use crate::drivers::json_grpc::{self, JsonIo};
use crate::phases::ctx::RequestCtx;
use crate::phases::fail::{self, Failure};
use crate::phases::pace::BodyPace;
use crate::phases::{upstream_head, Phases};
use crate::translate::json_grpc::Transcoder;

/// The caller of one JSON→gRPC call on an HTTP/2 stream.
struct H2Json<'a> {
    req: &'a RequestHeader,
    conn: Conn,
    recv: RecvStream,
    respond: &'a mut SendResponse<Bytes>,
    /// The answer's body, once its head is out.
    tx: Option<SendStream<Bytes>>,
    /// Longest a wait for the client's window may take.
    limit: Duration,
    pace: BodyPace,
    /// Body bytes read from the client.
    read: u64,
    status: u16,
    sent: usize,
    /// How reading the body failed, if it did (a slow body is answered 408).
    failed: Option<Failure>,
}

impl JsonIo for H2Json<'_> {
    fn head(&self) -> &RequestHeader {
        self.req
    }

    fn connection(&self) -> upstream_head::Downstream<'_> {
        upstream_head::Downstream {
            peer: self.conn.peer.map(|a| a.ip()),
            tls: self.conn.tls,
            h2: true,
            rendered: None,
        }
    }

    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.recv.is_end_stream() {
                return Ok(None);
            }
            let Some(wait) = self
                .pace
                .next_wait(self.read, Instant::now())
                .filter(|w| !w.is_zero())
            else {
                return Err(self.fail(Failure::ClientBodyTimeout));
            };
            let data = match within(wait, self.recv.data()).await {
                Ok(None) => return Ok(None),
                Ok(Some(Ok(d))) => d,
                Ok(Some(Err(_))) => return Err(self.fail(Failure::ClientGone)),
                Err(_) => return Err(self.fail(Failure::ClientBodyTimeout)),
            };
            self.read += data.len() as u64;
            // The call takes the bytes (and holds at most `max_body` of them): the
            // client may send more.
            let _ = self.recv.flow_control().release_capacity(data.len());
            if !data.is_empty() {
                return Ok(Some(data));
            }
        }
    }

    fn close(&mut self) {
        // A stream's end is its own: the connection's other streams go on.
    }

    async fn write_head(&mut self, head: ResponseHeader) -> Result<()> {
        let status = head.status.as_u16();
        match self.respond.send_response(to_h2(head), false) {
            Ok(tx) => {
                self.tx = Some(tx);
                self.status = status;
                Ok(())
            }
            Err(_) => Err(gone()),
        }
    }

    async fn write_body(&mut self, data: Bytes, end: bool) -> Result<()> {
        let Some(tx) = self.tx.as_mut() else {
            return Err(gone());
        };
        let n = data.len();
        send(tx, data, end, self.limit).await.map_err(|_| gone())?;
        self.sent += n;
        Ok(())
    }

    async fn gone(&mut self) {
        let _ = match self.tx.as_mut() {
            Some(tx) => poll_fn(|cx| tx.poll_reset(cx)).await,
            None => poll_fn(|cx| self.respond.poll_reset(cx)).await,
        };
    }
}

impl H2Json<'_> {
    fn fail(&mut self, f: Failure) -> Box<Error> {
        self.failed = Some(f);
        let etype = match f {
            Failure::ClientBodyTimeout => ErrorType::ReadTimedout,
            _ => ErrorType::ConnectionClosed,
        };
        Error::explain(etype, "request body").into_down()
    }
}

fn gone() -> Box<Error> {
    Error::explain(ErrorType::WriteError, "client stream gone").into_down()
}

/// Serves an admitted stream on a JSON→gRPC route through its call: what the client
/// got, and the body bytes it sent.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve(
    phases: &Phases,
    req: &RequestHeader,
    conn: Conn,
    recv: RecvStream,
    respond: &mut SendResponse<Bytes>,
    ctx: &mut RequestCtx,
    t: &Transcoder,
    limit: Duration,
    pace: BodyPace,
) -> (Answered, u64) {
    let mut io = H2Json {
        req,
        conn,
        recv,
        respond,
        tx: None,
        limit,
        pace,
        read: 0,
        status: 0,
        sent: 0,
        failed: None,
    };
    // An `Err` is the client's side failing: `failed` says how, if it was the body.
    let _ = json_grpc::serve(phases, &mut io, ctx, t).await;
    let read = io.read;
    if io.status != 0 {
        let answered = Answered {
            status: io.status,
            body_bytes: io.sent,
        };
        return (answered, read);
    }
    let answered = match io.failed.and_then(|f| fail::cause_of(ctx, f)) {
        Some(cause) => super::stream::answer(io.respond, ctx, cause, limit).await,
        None => Answered::nothing(),
    };
    (answered, read)
}
