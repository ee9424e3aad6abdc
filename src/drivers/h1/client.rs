//! The client side of one request on busbar's own engine: writing to the client within
//! its time limit, busbar's own answers, and noticing a client that leaves while its
//! request waits.
//!
//! Owns: [`Downstream`] (the client connection for one request) and [`Served`] (what
//! the request's answer was, for the access log and the keep-alive loop).
//! Must not: decide what to answer (the phases name the cause; `phases::fail`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_http::ResponseHeader;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::response::write_head;
use crate::base::deadline::within;
use crate::phases::ctx::RequestCtx;
use crate::phases::fail::{self, Failure};
use crate::proxy::reply::Cause;

/// The request's outcome for the access log and the keep-alive loop.
pub(super) struct Served {
    pub(super) status: u16,
    pub(super) body_bytes: usize,
    pub(super) keep_alive: bool,
}

impl Served {
    /// Nothing was written (the client left); the connection ends.
    pub(super) fn nothing() -> Served {
        Served::cut(0, 0)
    }

    /// The response stopped after its head (`status`) and `body_bytes`: the connection
    /// ends, as the client cannot tell where the response would have ended.
    pub(super) fn cut(status: u16, body_bytes: usize) -> Served {
        Served {
            status,
            body_bytes,
            keep_alive: false,
        }
    }
}

/// A client connection busbar's own engine serves (plaintext TCP, or TLS over it).
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Puts `bytes` back, to be read before anything else: a pipelined request's first
    /// byte, read while [`Downstream::left`] watched the connection.
    fn unread(&mut self, bytes: &[u8]);
}

impl ClientStream for L4Stream {
    fn unread(&mut self, bytes: &[u8]) {
        self.rewind(bytes);
    }
}

/// The client side of one request.
pub(super) struct Downstream<'a, S> {
    pub(super) client: &'a mut S,
    pub(super) peer: Option<SocketAddr>,
    /// The connection may carry another request after this one.
    pub(super) keep_alive: bool,
    /// Watch the client for leaving while the request waits (see [`Downstream::left`]).
    pub(super) watch: bool,
    /// Longest a write to the client may take.
    pub(super) limit: Duration,
}

impl<S: ClientStream> Downstream<'_, S> {
    /// Writes `bytes` within `limit`: a client that stops reading is cut off (slow
    /// read), and counted as the pingora path counts it.
    pub(super) async fn send(&mut self, bytes: &[u8]) -> bool {
        // The flush: a TLS stream may keep the last records of a write it could not
        // send at once (a full socket) until it is flushed; TCP's is a no-op.
        let client = &mut *self.client;
        let write = async move {
            client.write_all(bytes).await?;
            client.flush().await
        };
        match within(self.limit, write).await {
            Ok(r) => r.is_ok(),
            Err(_) => {
                fail::note(Failure::ClientSendTimeout);
                false
            }
        }
    }

    /// Writes a whole response of busbar's own; what was written, for the access log.
    ///
    /// Boxed: busbar's own answers are the rare path, and inline their state (hundreds
    /// of bytes, with the header) would be part of every request's future, which is
    /// copied whole when the connection boxes it.
    pub(super) fn reply(
        &mut self,
        mut resp: ResponseHeader,
        body: Bytes,
        keep_alive: bool,
    ) -> Pin<Box<dyn Future<Output = Served> + Send + '_>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(256 + body.len());
            write_head(&mut out, &mut resp, keep_alive);
            out.put_slice(&body);
            let sent = self.send(&out).await;
            Served {
                status: if sent { resp.status.as_u16() } else { 0 },
                body_bytes: if sent { body.len() } else { 0 },
                keep_alive: keep_alive && sent,
            }
        })
    }

    /// busbar's answer for `cause`, named in the context for the access log.
    pub(super) fn answer(
        &mut self,
        ctx: &mut RequestCtx,
        cause: Cause,
        keep_alive: bool,
    ) -> Pin<Box<dyn Future<Output = Served> + Send + '_>> {
        let (head, body) = fail::answer(ctx, cause);
        self.reply(head, body, keep_alive)
    }

    /// Finishes when the client has gone away (a close or a reset) while its request
    /// waits, for admission or for the upstream. Bytes that arrive instead are the
    /// client's next request, pipelined: they are put back for the front door, and the
    /// watch ends there (pending for good). Pending from the start when not `watch`ing:
    /// the front door already holds pipelined bytes, and reading on would put these
    /// before them.
    pub(super) async fn left(&mut self) -> Box<pingora_error::Error> {
        if self.watch {
            let mut byte = [0u8; 1];
            match self.client.read(&mut byte).await {
                Ok(0) | Err(_) => {
                    return pingora_error::Error::explain(
                        pingora_error::ErrorType::ConnectionClosed,
                        "client went away before its response",
                    )
                }
                Ok(_) => self.client.unread(&byte),
            }
        }
        std::future::pending().await
    }
}
