//! A stream's request body, read as the HTTP/1 engine reads a client's: the DATA frames
//! (and the trailers) of an `h2::RecvStream` as an `AsyncRead` of HTTP/1.1 body bytes,
//! plain for a declared length, chunked otherwise. The HTTP/1 engine's body code
//! (`drivers::h1::body`: the ≤64 KiB retry hold, the streamed rest, `max_body`, the pace)
//! then works on it unchanged.
//!
//! Owns: HTTP/2 flow control for the request body: a DATA frame's bytes are released to
//! the client's window as they are read out of it, that is, as the engine copies them
//! towards the upstream; a stream busbar is not reading holds at most its window.
//! Must not: frame anything but this stream's body, or write to the client.

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::drivers::h1::ClientStream;

/// The request body of one stream, as HTTP/1.1 body bytes.
pub(crate) struct Incoming {
    recv: h2::RecvStream,
    /// Chunked framing around the data (no declared length); plain bytes otherwise.
    chunked: bool,
    /// Framing bytes to give before `data` (a chunk-size line, the last chunk and
    /// trailers).
    framing: Vec<u8>,
    /// What is left of the DATA frame being read.
    data: Bytes,
    /// The chunk's closing CRLF is still to come after `data`.
    crlf: bool,
    /// The stream's end has been read (or framed).
    ended: bool,
}

impl Incoming {
    pub(crate) fn new(recv: h2::RecvStream, chunked: bool) -> Incoming {
        Incoming {
            recv,
            chunked,
            framing: Vec::new(),
            data: Bytes::new(),
            crlf: false,
            ended: false,
        }
    }

    /// Copies what is ready (framing first, then data) into `buf`; false if nothing is.
    fn give(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if !self.framing.is_empty() {
            let n = self.framing.len().min(buf.remaining());
            buf.put_slice(&self.framing[..n]);
            self.framing.drain(..n);
            return true;
        }
        if !self.data.is_empty() {
            let n = self.data.len().min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data.advance(n);
            // The bytes left busbar's hands for the upstream: the client may send more.
            let _ = self.recv.flow_control().release_capacity(n);
            return true;
        }
        if self.crlf {
            self.crlf = false;
            self.framing.extend_from_slice(b"\r\n");
            return self.give(buf);
        }
        false
    }
}

impl AsyncRead for Incoming {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if buf.remaining() == 0 || this.give(buf) {
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) if data.is_empty() => {}
                Some(Ok(data)) => {
                    if this.chunked {
                        // The size line, written into the buffer kept for framing.
                        let _ = write!(this.framing, "{:x}\r\n", data.len());
                        this.crlf = true;
                    }
                    this.data = data;
                }
                // A reset by the client, or the connection's end: the body failed.
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => {
                    this.ended = true;
                    if this.chunked {
                        let trailers = match ready!(this.recv.poll_trailers(cx)) {
                            Ok(t) => t,
                            Err(e) => return Poll::Ready(Err(io::Error::other(e))),
                        };
                        this.framing.extend_from_slice(b"0\r\n");
                        for (name, value) in trailers.iter().flatten() {
                            crate::base::http::line(
                                &mut this.framing,
                                name.as_str().as_bytes(),
                                value.as_bytes(),
                            );
                        }
                        this.framing.extend_from_slice(b"\r\n");
                    }
                }
            }
        }
    }
}

/// Never written: the engine writes to a client only a `100 Continue`, which an HTTP/2
/// client is not waiting for (the stream takes no `Expect`).
impl AsyncWrite for Incoming {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A stream's body ends where its framing says: nothing follows it to put back.
impl ClientStream for Incoming {
    fn unread(&mut self, _bytes: &[u8]) {}
}
