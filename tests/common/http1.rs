//! A raw HTTP/1 client: the exact bytes a test writes go out (smuggling attempts, odd
//! framing, pipelined requests), and responses are read as HTTP/1.1 frames them —
//! `Content-Length`, chunked with trailers, no body for HEAD/204/304, or until the close.
//! Bytes past the end of one response are kept for the next, so pipelined or smuggled
//! answers are seen, not lost between reads.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one read may wait for a byte before a response counts as stalled: generous,
/// so a loaded machine does not fail a test, short enough that a hang does.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// One response as the client read it.
#[derive(Debug, Default)]
pub struct Response {
    /// The head (status line and headers, with its blank line), lowercase; what had
    /// arrived, perhaps nothing, when the connection closed or stalled before a whole head.
    pub head: String,
    pub body: Vec<u8>,
    /// Its framing said where it ends, and that end arrived (a close-delimited body is
    /// complete at the close).
    pub complete: bool,
    /// The connection closed while (or before) it was read.
    pub closed: bool,
}

impl Response {
    /// The status code; 0 without a status line.
    pub fn status(&self) -> u16 {
        status_of(&self.head).unwrap_or(0)
    }

    /// The value of the first header `name` (lowercase), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    }

    /// The body as text (lossy), for assertions and messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection with what it has read but not yet handed out.
pub struct Conn {
    /// Writes may go to it directly; reads must go through [`Conn`], which may hold
    /// bytes already read.
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Conn {
        Conn::new(TcpStream::connect(addr).await.unwrap())
    }

    /// Wraps a stream connected some other way (from a given source address, say).
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` as they are.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends one raw request and reads its response (`head_request`: no body follows).
    pub async fn ask(&mut self, request: &[u8], head_request: bool) -> Response {
        self.send(request).await.unwrap();
        self.read_response(head_request).await
    }

    /// Reads the next response; see [`Response`] for what an incomplete one says.
    pub async fn read_response(&mut self, head_request: bool) -> Response {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match self.fill().await {
                Some(k) if k > 0 => {}
                got => {
                    return Response {
                        head: String::from_utf8_lossy(&std::mem::take(&mut self.buf))
                            .to_lowercase(),
                        closed: got.is_some(),
                        ..Response::default()
                    };
                }
            }
        };
        let mut r = Response {
            head: String::from_utf8_lossy(&self.buf[..end]).to_lowercase(),
            ..Response::default()
        };
        self.buf.drain(..end);
        // Strict: a length that is not all digits frames nothing (read to the close).
        let length = r
            .header("content-length")
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<usize>().ok());
        let chunked = r.header("transfer-encoding") == Some("chunked");
        let no_body = head_request || r.status() == 204 || r.status() == 304;
        loop {
            let done = if no_body {
                Some(0)
            } else if chunked {
                chunked_end(&self.buf)
            } else {
                length.filter(|n| self.buf.len() >= *n)
            };
            if let Some(n) = done {
                r.complete = true;
                r.body = self.buf.drain(..n).collect();
                return r;
            }
            match self.fill().await {
                Some(0) => {
                    r.closed = true;
                    r.complete = length.is_none() && !chunked;
                    r.body = std::mem::take(&mut self.buf);
                    return r;
                }
                Some(_) => {}
                None => {
                    r.body = std::mem::take(&mut self.buf);
                    return r;
                }
            }
        }
    }

    /// Everything until the peer closes or `within` passes (bytes already read first),
    /// and whether it closed.
    pub async fn read_to_close(&mut self, within: Duration) -> (Vec<u8>, bool) {
        let mut out = std::mem::take(&mut self.buf);
        let closed = tokio::time::timeout(within, self.stream.read_to_end(&mut out))
            .await
            .is_ok_and(|r| r.is_ok());
        (out, closed)
    }

    /// Reads more into the buffer: the count, 0 at the close (or on a failure), `None`
    /// when nothing came for [`PATIENCE`].
    async fn fill(&mut self) -> Option<usize> {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk)).await {
            Ok(Ok(k)) => {
                self.buf.extend_from_slice(&chunk[..k]);
                Some(k)
            }
            Ok(Err(_)) => Some(0),
            Err(_) => None,
        }
    }
}

/// Sends `bytes` on a new connection to `addr` and reads until the server closes it or
/// `within` passes: what came back, as text, and whether it was closed.
pub async fn exchange(addr: SocketAddr, bytes: &[u8], within: Duration) -> (String, bool) {
    let mut c = Conn::connect(addr).await;
    c.send(bytes).await.unwrap();
    let (out, closed) = c.read_to_close(within).await;
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// The status code of a response's text (`HTTP/1.1 200 OK…`).
pub fn status_of(text: &str) -> Option<u16> {
    text.split(' ').nth(1)?.get(..3)?.parse().ok()
}

/// Where a chunked body ends in `b` (after the last chunk and its trailers), if it has.
pub fn chunked_end(b: &[u8]) -> Option<usize> {
    let line_end = |from: usize| -> Option<usize> {
        Some(from + b.get(from..)?.windows(2).position(|w| w == b"\r\n")?)
    };
    let mut i = 0;
    loop {
        let eol = line_end(i)?;
        let size = std::str::from_utf8(&b[i..eol]).ok()?;
        let size = size.split(';').next()?.trim_end_matches([' ', '\t']);
        let n = usize::from_str_radix(size, 16).ok()?;
        i = eol + 2;
        if n == 0 {
            // Trailer lines up to the empty one.
            loop {
                let eol = line_end(i)?;
                let empty = eol == i;
                i = eol + 2;
                if empty {
                    return Some(i);
                }
            }
        }
        i = i.checked_add(n)?.checked_add(2)?;
        if i > b.len() {
            return None;
        }
    }
}
