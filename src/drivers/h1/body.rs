//! A request body on busbar's own engine: read from the client, framed strictly, and
//! copied upstream with backpressure.
//!
//! The body's first bytes (those that came with the head, then up to [`HOLD`] more) are
//! held after the upstream head, in the one buffer the try writes: checked whole before
//! anything goes upstream when the body fits (a malformed chunked body busbar holds
//! reaches nobody), and sent again as they are by a retry. A longer body streams: one
//! read from the client, framed, written upstream, the next read; a framing error found
//! then ends that try (the caller drops the upstream connection). While it streams, and
//! while a client that sent `Expect: 100-continue` waits, the upstream is watched: an
//! answer that comes before the body has gone stops the body there.
//!
//! Owns: where the body ends (length, `framing::ChunkScan`), its limit (`max_body`, on
//! the data), its pace (`phases::pace`), the `100 Continue` to the client, and giving
//! back the bytes a client pipelined after the body.
//! Must not: decide retries or answer the client (the orchestration and the phases do).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::client::ClientStream;
use super::framing::ChunkScan;
use super::pool::Conn;
use super::request::BodyFraming;
use crate::base::deadline::within;
use crate::phases::pace::BodyPace;

/// Most body bytes (with their chunked framing) held before the upstream is tried: a
/// body up to 64 KiB of data, with room for the framing of a few chunks, is checked whole
/// first and kept for a retry (the pingora path's retry buffer is 64 KiB too).
pub(crate) const HOLD: usize = 64 * 1024 + 4096;

/// One read of a streaming body.
const STREAM_BUF: usize = 32 * 1024;

/// How long a client that sent `Expect: 100-continue` is left waiting for the
/// upstream's `100 Continue` (or final answer) before busbar says `100 Continue` itself
/// and sends the body (an upstream may ignore the expectation; curl waits 1 s too).
pub(super) const CONTINUE_WAIT: Duration = Duration::from_secs(1);

pub(super) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Why a request body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFail {
    /// Not chunked framing (400).
    Malformed,
    /// Over the route's `max_body` (413).
    TooLarge,
    /// Stalled, or behind `body_min_rate` (408).
    Slow,
    /// The client closed or failed mid-body.
    Gone,
}

/// The body of one request, as it is read.
pub(crate) struct RequestBody {
    /// `Content-Length` bytes still to come; `None` for a chunked body.
    left: Option<u64>,
    scan: ChunkScan,
    /// The route's `max_body`, on the body's data.
    limit: u64,
    /// Bytes read from the client (framing included), for the pace.
    read: u64,
    pace: BodyPace,
    done: bool,
}

impl RequestBody {
    pub(crate) fn new(framing: BodyFraming, limit: u64, pace: BodyPace) -> RequestBody {
        RequestBody {
            left: match framing {
                BodyFraming::Chunked => None,
                BodyFraming::Length(n) => Some(n),
                BodyFraming::None => Some(0),
            },
            scan: ChunkScan::default(),
            limit,
            read: 0,
            pace,
            done: framing == BodyFraming::None,
        }
    }

    /// The `Content-Length` bytes still to come; `None` for a chunked body.
    pub(crate) fn declared(&self) -> Option<u64> {
        self.left
    }

    /// The body's data read so far (without chunked framing): the request's body bytes
    /// in the metrics and the access log.
    pub(crate) fn data_read(&self, declared: u64) -> u64 {
        match self.left {
            Some(left) => declared - left,
            None => self.scan.data_bytes(),
        }
    }

    /// The whole body has been read.
    pub(crate) fn done(&self) -> bool {
        self.done
    }

    /// Takes the body's next bytes: how many of `bytes` belong to it (the rest is the
    /// client's next request). Counts the data against the limit.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Result<usize, BodyFail> {
        self.feed_with(bytes, |_| {})
    }

    /// [`RequestBody::feed`], handing the body's data in `bytes` (its chunked framing
    /// removed) to `data`.
    fn feed_with(&mut self, bytes: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize, BodyFail> {
        if self.done {
            return Ok(0);
        }
        let (take, data) = match self.left.as_mut() {
            Some(left) => {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                self.done = *left == 0;
                data(&bytes[..take as usize]);
                (take as usize, 0)
            }
            None => {
                let fed = self
                    .scan
                    .feed_with(bytes, &mut data)
                    .map_err(|_| BodyFail::Malformed)?;
                self.done = fed.end.is_some();
                (fed.end.unwrap_or(bytes.len()), self.scan.data_bytes())
            }
        };
        // A length over the limit is refused from the head; a chunked body as it grows.
        if data > self.limit {
            return Err(BodyFail::TooLarge);
        }
        Ok(take)
    }

    /// Where the body ends in `bytes`, if it is all there (nothing is taken).
    pub(super) fn whole_in(mut self, bytes: &[u8]) -> Option<usize> {
        self.feed(bytes).ok().filter(|_| self.done)
    }

    /// Reads what the client sends next into `into`'s spare capacity, within the pace.
    pub(super) async fn read<S: ClientStream>(
        &mut self,
        client: &mut S,
        into: &mut Vec<u8>,
    ) -> Result<usize, BodyFail> {
        let wait = self
            .pace
            .next_wait(self.read, Instant::now())
            .filter(|w| !w.is_zero())
            .ok_or(BodyFail::Slow)?;
        match within(wait, client.read_buf(into)).await {
            Ok(Ok(0)) | Ok(Err(_)) => Err(BodyFail::Gone),
            Ok(Ok(n)) => {
                self.read += n as u64;
                Ok(n)
            }
            Err(_) => Err(BodyFail::Slow),
        }
    }
}

/// The body's next data, its framing removed, for a driver that reads the body itself
/// (a JSON→gRPC call, `drivers::h1::json`): first from what the front door read
/// (`conn`), then from the client within the pace. Bytes past the body's end stay in
/// `conn`, the connection's next request. `Ok(None)`: the body has ended.
pub(crate) async fn next_data<S: ClientStream>(
    body: &mut RequestBody,
    client: &mut S,
    conn: &mut Vec<u8>,
) -> Result<Option<Bytes>, BodyFail> {
    loop {
        if body.done {
            return Ok(None);
        }
        if conn.is_empty() {
            conn.reserve(STREAM_BUF);
            body.read(client, conn).await?;
        }
        let mut data = BytesMut::new();
        let take = body.feed_with(conn, |d| data.extend_from_slice(d))?;
        conn.drain(..take);
        if !data.is_empty() {
            return Ok(Some(data.freeze()));
        }
    }
}

/// Moves the body's first bytes after the upstream head in `wire`: those the front door
/// read with the head (`conn`), then, if `more`, what the client sends until the body
/// ends or [`HOLD`] bytes are held. Bytes past the body's end stay in (or go back to)
/// `conn`, the connection's next request.
pub(crate) async fn hold<S: ClientStream>(
    body: &mut RequestBody,
    client: &mut S,
    conn: &mut Vec<u8>,
    wire: &mut Vec<u8>,
    more: bool,
) -> Result<(), BodyFail> {
    let start = wire.len();
    let take = body.feed(conn)?;
    wire.extend_from_slice(&conn[..take]);
    conn.drain(..take);
    while more && !body.done() && wire.len() - start < HOLD {
        let room = HOLD - (wire.len() - start);
        wire.reserve(room.min(STREAM_BUF));
        let before = wire.len();
        let n = body.read(client, wire).await?;
        let take = body.feed(&wire[before..before + n])?;
        if take < n {
            conn.extend_from_slice(&wire[before + take..]);
            wire.truncate(before + take);
        }
    }
    Ok(())
}

/// What [`Streamer::pump`] stopped for.
pub(super) enum Pumped {
    /// The whole body has gone upstream.
    Sent,
    /// The upstream sent bytes (into the response buffer) before that.
    Spoke,
}

/// Why [`Streamer::pump`] failed.
pub(super) enum PumpFail {
    Client(BodyFail),
    Upstream { timed_out: bool },
}

/// The rest of a body that did not fit [`HOLD`], or that a client holds back until it
/// hears `100 Continue`: copied from the client to the upstream during the try.
pub(crate) struct Streamer<'a, S> {
    pub(crate) client: &'a mut S,
    pub(crate) body: &'a mut RequestBody,
    /// The connection's buffer: bytes past the body's end go back to it.
    pub(crate) conn: &'a mut Vec<u8>,
    /// The one buffer the streamed body goes through.
    pub(crate) chunk: &'a mut Vec<u8>,
    /// The client sent `Expect: 100-continue` and waits: no body until it is told to go on.
    pub(crate) waiting: bool,
    /// The upstream said `100 Continue`: no need to wait for it.
    pub(crate) continued: bool,
    /// Longest a write to the client may take.
    pub(crate) send_limit: Duration,
    /// Bytes the client sent went upstream in this try: it cannot be tried again.
    pub(crate) started: bool,
    /// The upstream answered before the whole body went: the rest is not sent.
    pub(crate) stopped: bool,
}

impl<S: ClientStream> Streamer<'_, S> {
    /// The body still has bytes to send.
    pub(super) fn pending(&self) -> bool {
        !self.body.done() && !self.stopped
    }

    /// Copies the body upstream until it has all gone ([`Pumped::Sent`]) or the upstream
    /// sends something first ([`Pumped::Spoke`], its bytes in `resp`). Each read from the
    /// client and each write upstream races the upstream's answer, so an upstream that
    /// answers early (and stops reading) is heard at once, not after a write timeout.
    pub(super) async fn pump(
        &mut self,
        up: &mut Conn,
        resp: &mut Vec<u8>,
        write_limit: Duration,
    ) -> Result<Pumped, PumpFail> {
        if self.waiting {
            if !self.continued {
                match within(CONTINUE_WAIT, read_up(up, resp)).await {
                    Ok(Ok(())) => return Ok(Pumped::Spoke),
                    Ok(Err(e)) => return Err(e),
                    // An upstream that ignores the expectation: the body goes anyway.
                    Err(_) => {}
                }
            }
            self.waiting = false;
            // Only now, about to send the body upstream, is the client told to send it.
            match within(self.send_limit, self.client.write_all(CONTINUE)).await {
                Ok(Ok(())) => {}
                _ => return Err(PumpFail::Client(BodyFail::Gone)),
            }
        }
        while !self.body.done() {
            self.chunk.clear();
            self.chunk.reserve(STREAM_BUF);
            let n = tokio::select! {
                biased;
                r = read_up(up, resp) => return r.map(|()| Pumped::Spoke),
                r = self.body.read(self.client, self.chunk) => r.map_err(PumpFail::Client)?,
            };
            let take = self.body.feed(&self.chunk[..n]).map_err(PumpFail::Client)?;
            if take < n {
                self.conn.extend_from_slice(&self.chunk[take..n]);
            }
            self.started = true;
            let chunk = &self.chunk[..take];
            let spoke = match up {
                Conn::Plain(tcp) => {
                    let (r, w) = tcp.split();
                    write_racing(r, w, chunk, resp, write_limit).await?
                }
                // A TLS session is one object: its halves share it through a lock.
                Conn::Tls(tls) => {
                    let (r, w) = tokio::io::split(&mut **tls);
                    write_racing(r, w, chunk, resp, write_limit).await?
                }
            };
            if spoke {
                return Ok(Pumped::Spoke);
            }
        }
        // What a TLS session still holds of the body goes out (a no-op on TCP).
        match within(write_limit, up.flush()).await {
            Ok(Ok(())) => Ok(Pumped::Sent),
            Ok(Err(_)) => Err(PumpFail::Upstream { timed_out: false }),
            Err(_) => Err(PumpFail::Upstream { timed_out: true }),
        }
    }
}

/// Writes `chunk` upstream through `w` while reading `r` for an answer; `Ok(true)`: the
/// upstream spoke first (its bytes in `resp`), `Ok(false)`: the chunk has gone.
async fn write_racing(
    mut r: impl AsyncRead + Unpin,
    mut w: impl AsyncWrite + Unpin,
    chunk: &[u8],
    resp: &mut Vec<u8>,
    write_limit: Duration,
) -> Result<bool, PumpFail> {
    let mut off = 0;
    while off < chunk.len() {
        tokio::select! {
            biased;
            got = r.read_buf(resp) => {
                return match got {
                    Ok(k) if k > 0 => Ok(true),
                    _ => Err(PumpFail::Upstream { timed_out: false }),
                };
            }
            wrote = within(write_limit, w.write(&chunk[off..])) => match wrote {
                Ok(Ok(k)) if k > 0 => off += k,
                Ok(_) => return Err(PumpFail::Upstream { timed_out: false }),
                Err(_) => return Err(PumpFail::Upstream { timed_out: true }),
            },
        }
    }
    Ok(false)
}

/// Reads what the upstream sends into `resp`: `Ok` for bytes, an error for a close.
async fn read_up(up: &mut Conn, resp: &mut Vec<u8>) -> Result<(), PumpFail> {
    if resp.capacity() - resp.len() < 512 {
        resp.reserve(4096);
    }
    match up.read_buf(resp).await {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(PumpFail::Upstream { timed_out: false }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(framing: BodyFraming, limit: u64) -> RequestBody {
        RequestBody::new(framing, limit, BodyPace::new(Duration::from_secs(5), 0))
    }

    #[test]
    fn a_length_takes_its_bytes_and_leaves_the_next_request() {
        let mut b = body(BodyFraming::Length(5), 100);
        assert_eq!(b.feed(b"abc"), Ok(3));
        assert!(!b.done());
        assert_eq!(b.feed(b"deGET / HTTP/1.1"), Ok(2));
        assert!(b.done());
        assert_eq!(b.feed(b"more"), Ok(0));
    }

    #[test]
    fn a_chunked_body_ends_at_its_last_chunk_and_its_data_is_limited() {
        let mut b = body(BodyFraming::Chunked, 100);
        let wire = b"3\r\nabc\r\n0\r\nx: 1\r\n\r\nGET /";
        assert_eq!(b.feed(wire), Ok(wire.len() - 5));
        assert!(b.done());
        let mut b = body(BodyFraming::Chunked, 4);
        assert_eq!(b.feed(b"3\r\nabc\r\n"), Ok(8));
        assert_eq!(b.feed(b"2\r\nde\r\n"), Err(BodyFail::TooLarge));
        let mut b = body(BodyFraming::Chunked, 100);
        assert_eq!(b.feed(b"fffffffffffffffff\r\n"), Err(BodyFail::Malformed));
    }

    #[tokio::test]
    async fn hold_takes_a_body_whole_and_gives_back_what_follows() {
        let (mut client, mut peer) = tokio::io::duplex(1 << 20);
        let mut b = body(BodyFraming::Chunked, 1 << 20);
        let mut conn = b"5\r\nhel".to_vec();
        peer.write_all(b"lo\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut wire = b"HEAD".to_vec();
        hold(&mut b, &mut client, &mut conn, &mut wire, true)
            .await
            .unwrap();
        assert_eq!(wire, b"HEAD5\r\nhello\r\n0\r\n\r\n");
        assert_eq!(conn, b"GET / HTTP/1.1\r\n\r\n");
        assert!(b.done());
    }

    #[tokio::test]
    async fn next_data_gives_the_data_without_framing_and_leaves_the_next_request() {
        let (mut client, mut peer) = tokio::io::duplex(1 << 20);
        let mut b = body(BodyFraming::Chunked, 1 << 20);
        let mut conn = b"5\r\nhel".to_vec();
        peer.write_all(b"lo\r\n2\r\n!!\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut data = Vec::new();
        while let Some(d) = next_data(&mut b, &mut client, &mut conn).await.unwrap() {
            data.extend_from_slice(&d);
        }
        assert_eq!(data, b"hello!!");
        assert_eq!(conn, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(b.data_read(0), 7);
        // A length: its bytes, then nothing.
        let mut b = body(BodyFraming::Length(3), 100);
        let mut conn = b"abcGET".to_vec();
        assert_eq!(
            next_data(&mut b, &mut client, &mut conn).await.unwrap(),
            Some(Bytes::from_static(b"abc"))
        );
        assert_eq!(
            next_data(&mut b, &mut client, &mut conn).await.unwrap(),
            None
        );
        assert_eq!(conn, b"GET");
        // Broken framing is the caller's 400.
        let mut b = body(BodyFraming::Chunked, 100);
        let mut conn = b"zz\r\n".to_vec();
        let got = next_data(&mut b, &mut client, &mut conn).await;
        assert_eq!(got, Err(BodyFail::Malformed));
    }

    impl ClientStream for tokio::io::DuplexStream {
        fn unread(&mut self, _bytes: &[u8]) {}
    }
}
