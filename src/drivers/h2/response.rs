//! The response of one HTTP/2 stream from an HTTP/1 upstream: the head the h1 engine's
//! codec read (`upstream_header`), edited by the phases, sent as HEADERS; the body as
//! DATA frames within the client's window (`reserve_capacity` / `poll_capacity`, each
//! wait within `client_timeout`: a client that stops reading is cut off, and busbar reads
//! no more of the upstream's body than the client takes); chunked trailers as a trailing
//! HEADERS frame.
//! Owns: where the upstream's body ends (the h1 `Framing`, the chunk scanner), whether
//! the upstream connection goes back to the pool, and what HTTP/2 may not carry
//! (connection-specific fields, `Transfer-Encoding`).
//! Must not: decide retries or count outcomes (the phases'), or parse HTTP/1 itself.

use std::future::poll_fn;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, SendStream};
use http::header::TRANSFER_ENCODING;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora_http::ResponseHeader;
use tokio::io::AsyncReadExt;

use super::stream::{Answered, Exchange};
use crate::base::deadline::within;
use crate::drivers::h1::framing::ChunkScan;
use crate::drivers::h1::pool;
use crate::drivers::h1::response::{upstream_header, Framing, Head};
use crate::phases::fail::{self, Failure};
use crate::phases::response_head::{self, Kind};
use crate::proxy::reply::Cause;

/// One read of the upstream's response body: a full HTTP/2 DATA frame's worth.
const READ: usize = 16 * 1024;

/// A response head for the client: HTTP/2 has no connection-specific fields (the `h2`
/// crate refuses to send them).
pub(super) fn to_h2(resp: ResponseHeader) -> http::Response<()> {
    let mut parts: http::response::Parts = resp.into();
    let h = &mut parts.headers;
    // Hop-by-hop fields were dropped from the upstream's head (`upstream_header`);
    // busbar's own answers carry none. `Transfer-Encoding` is framing: HTTP/2 has its own.
    // One scan of the names (a length check for most) before any removal: five removals
    // by name parse and hash each name every time (~2,000 instructions a response).
    let stray = h.keys().any(|n| {
        crate::base::http::is_hop_by_hop(n.as_str().as_bytes()) || *n == TRANSFER_ENCODING
    });
    if stray {
        for name in crate::base::http::HOP_BY_HOP {
            h.remove(name);
        }
        h.remove(TRANSFER_ENCODING);
    }
    http::Response::from_parts(parts, ())
}

/// Why data could not be sent to the client.
#[derive(Debug)]
pub(super) enum SendFail {
    /// It reset the stream or the connection went.
    Gone,
    /// It stopped reading: no window within the client timeout (slow read).
    Slow,
}

/// Sends `data` within the client's window: each part waits for capacity, so busbar
/// holds no more than the window and the `h2` send buffer for a slow reader.
pub(super) async fn send(
    tx: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    limit: Duration,
) -> Result<(), SendFail> {
    if data.is_empty() {
        return match end {
            true => tx.send_data(data, true).map_err(|_| SendFail::Gone),
            false => Ok(()),
        };
    }
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let granted = match within(limit, poll_fn(|cx| tx.poll_capacity(cx))).await {
            Ok(Some(Ok(n))) => n,
            Ok(_) => return Err(SendFail::Gone),
            Err(_) => {
                fail::note(Failure::ClientSendTimeout);
                return Err(SendFail::Slow);
            }
        };
        if granted == 0 {
            continue;
        }
        let part = data.split_to(granted.min(data.len()));
        tx.send_data(part, end && data.is_empty())
            .map_err(|_| SendFail::Gone)?;
    }
    Ok(())
}

/// The upstream's trailer section (its lines and the final empty line) as HTTP/2
/// trailers, less the fields no trailer may carry on this hop. `None`: no fields.
fn trailers_of(section: &[u8]) -> Option<HeaderMap> {
    let mut lines = [httparse::EMPTY_HEADER; 64];
    let parsed = match httparse::parse_headers(section, &mut lines) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        _ => return None,
    };
    let mut map = HeaderMap::new();
    for h in parsed.iter() {
        let kind = Kind::of(h.name.as_bytes());
        if kind.hop_by_hop() || matches!(kind, Kind::ContentLength | Kind::TransferEncoding) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            map.append(n, v);
        }
    }
    (!map.is_empty()).then_some(map)
}

impl Exchange<'_, '_> {
    /// Sends the upstream's response: its head as a map (edited by the phases), then
    /// its body as DATA frames within the client's window, then its trailers.
    pub(super) async fn respond_with(
        &mut self,
        mut up: pool::Conn,
        key: pool::Key,
        head: Head,
        buf: &[u8],
        body_done: bool,
    ) -> Answered {
        let status = head.status.as_u16();
        let Ok(mut resp) = upstream_header(&buf[..head.len]) else {
            return self.upstream_broke().await;
        };
        if response_head::edit(self.ctx, &mut resp).is_err() {
            return self.answer(Cause::UpstreamError).await;
        }
        // What came with the head: where the body ends in it, and its data.
        let first = &buf[head.len..];
        let mut scan = (head.framing == Framing::Chunked).then(ChunkScan::keeping_trailers);
        let mut data = BytesMut::new();
        let (end, mut remaining) = match (head.framing, scan.as_mut()) {
            (Framing::None, _) => (Some(0), 0),
            (Framing::Length(n), _) => {
                let take = (first.len() as u64).min(n) as usize;
                data.extend_from_slice(&first[..take]);
                let left = n - take as u64;
                ((left == 0).then_some(take), left)
            }
            (Framing::Chunked, Some(s)) => {
                match s.feed_with(first, |d| data.extend_from_slice(d)) {
                    Ok(fed) => (fed.end, u64::from(fed.end.is_none())),
                    Err(_) => return self.upstream_broke().await,
                }
            }
            _ => {
                data.extend_from_slice(first);
                (None, 1)
            }
        };
        let mut reusable = head.reusable && body_done && end.is_none_or(|e| e == first.len());
        let trailers = scan
            .as_ref()
            .filter(|s| s.done())
            .and_then(|s| trailers_of(s.trailers()));
        let whole = end.is_some() && data.is_empty() && trailers.is_none();
        let Ok(mut tx) = self.respond.send_response(to_h2(resp), whole) else {
            return Answered::nothing();
        };
        let mut sent = 0;
        let cut = |sent| Answered {
            status,
            body_bytes: sent,
        };
        if whole {
            self.phases.on_response_health(self.ctx, head.status);
            if reusable {
                pool::give_back(key, up);
            }
            return cut(0);
        }
        // The body's end is in what came: the last data carries END_STREAM (or the
        // trailers do).
        let ends_here = end.is_some();
        let n = data.len();
        if send(
            &mut tx,
            data.split().freeze(),
            ends_here && trailers.is_none(),
            self.limit,
        )
        .await
        .is_err()
        {
            return cut(sent);
        }
        sent += n;
        let mut trailers = trailers;
        if !ends_here {
            let t_read = self.route.service.config.read_timeout;
            let mut rb = BytesMut::with_capacity(READ);
            loop {
                rb.clear();
                rb.reserve(READ);
                let got = match within(t_read, up.read_buf(&mut rb)).await {
                    Ok(Ok(0)) if head.framing == Framing::Close => 0,
                    Ok(Ok(n)) if n > 0 => n,
                    read => {
                        let timed_out = read.is_err();
                        self.phases
                            .on_try_failure(self.ctx, true, timed_out, false, false);
                        // The head went out: the stream is cut, not ended cleanly.
                        tx.send_reset(Reason::INTERNAL_ERROR);
                        return cut(sent);
                    }
                };
                let (chunk, last) = match (head.framing, scan.as_mut()) {
                    (Framing::Close, _) if got == 0 => (Bytes::new(), true),
                    (Framing::Close, _) => (rb.split().freeze(), false),
                    (Framing::Length(_), _) => {
                        let take = (got as u64).min(remaining) as usize;
                        remaining -= take as u64;
                        if take < got {
                            reusable = false;
                        }
                        (rb.split_to(take).freeze(), remaining == 0)
                    }
                    (Framing::Chunked, Some(s)) => {
                        let mut plain = BytesMut::new();
                        match s.feed_with(&rb, |d| plain.extend_from_slice(d)) {
                            Ok(fed) => {
                                if fed.end.is_some_and(|e| e < got) {
                                    reusable = false;
                                }
                                (plain.freeze(), fed.end.is_some())
                            }
                            Err(_) => {
                                // No part of a bad body goes on: the stream is cut.
                                self.phases.on_malformed_response(self.ctx);
                                tx.send_reset(Reason::INTERNAL_ERROR);
                                return cut(sent);
                            }
                        }
                    }
                    _ => (Bytes::new(), true),
                };
                if last {
                    trailers = scan.as_ref().and_then(|s| trailers_of(s.trailers()));
                }
                let k = chunk.len();
                if send(&mut tx, chunk, last && trailers.is_none(), self.limit)
                    .await
                    .is_err()
                {
                    return cut(sent);
                }
                sent += k;
                if last {
                    break;
                }
            }
        }
        if let Some(t) = trailers {
            if tx.send_trailers(t).is_err() {
                return cut(sent);
            }
        }
        self.phases.on_response_health(self.ctx, head.status);
        if reusable && head.framing != Framing::Close {
            pool::give_back(key, up);
        }
        cut(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_specific_fields_do_not_reach_an_http2_head() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (n, v) in [
            ("content-type", "application/grpc"),
            ("Connection", "close"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-kept", "1"),
        ] {
            resp.append_header(n, v).unwrap();
        }
        let head = to_h2(resp);
        let names: Vec<&str> = head.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-kept"]);
    }

    #[test]
    fn a_head_without_them_is_passed_whole() {
        let mut resp = ResponseHeader::build(204, None).unwrap();
        resp.append_header("te-x", "1").unwrap();
        resp.append_header("grpc-status", "0").unwrap();
        let head = to_h2(resp);
        assert_eq!(head.status(), 204);
        assert_eq!(head.headers().len(), 2);
    }
}
