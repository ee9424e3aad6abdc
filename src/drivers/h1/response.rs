//! The HTTP/1.1 response codec of busbar's own engine: an upstream's response head
//! parsed for its framing and written for the client, in one pass; the body's end is
//! found by `framing` (lengths, the chunk scanner).
//!
//! Owns: how a response body ends (RFC 9112 §6.3), whether the upstream connection may
//! carry another request, and the head's bytes for the client: which upstream lines go
//! on and what busbar adds are the response-head editor's (`phases::response_head`);
//! `Date` and `Connection` are this hop's. A head busbar cannot frame or be sure of
//! (`framing`) is refused.
//! Must not: read or write sockets.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BufMut;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderName, HeaderValue, StatusCode};
use pingora_core::protocols::http::date::get_cached_date;
use pingora_http::ResponseHeader;

use super::request::connection_tokens;
use super::{framing, MAX_HEADERS};
use crate::admission::RateInfo;
use crate::base::clock;
use crate::base::http::line;
use crate::phases::response_head::{self, Kind};

/// Largest upstream response head (pingora's `MAX_HEADER_SIZE` is 1 MiB; nginx's
/// `proxy_buffer_size` default is 4–8 KiB).
pub(super) const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// How a response's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes: the client connection closes after it.
    Close,
}

/// An upstream response head, parsed: what framing and reuse need. Its lines for the
/// client were written by [`parse_head`] (see there).
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) framing: Framing,
    /// Bytes of the head in the read buffer (the body starts after them).
    pub(crate) len: usize,
    /// The upstream connection may carry another request.
    pub(crate) reusable: bool,
    /// The upstream's `Connection` names more hop-by-hop headers (rare): they are found
    /// by building the whole header map (see [`upstream_header`]).
    pub(super) nominates: bool,
}

/// Room for the lines busbar adds to a response head: `Date`, `Connection`, and the
/// `RateLimit-*` set.
const OWN_LINES: usize = 256;

/// Parses the response head at the start of `buf`: `Ok(None)` while incomplete.
///
/// A complete head is also written into `lines` (replacing what was there) as the
/// client gets it, up to busbar's own headers: the status line, then the upstream's
/// header lines as they came, less hop-by-hop ones, `Date`, a `Content-Length` that
/// `Transfer-Encoding` overrides, and `RateLimit-*` when `own_rate` (busbar sets its
/// own). [`finish_head`] finishes it. One parse serves framing and forwarding.
///
/// `Err`: a head busbar cannot frame or be sure of (see `drivers::h1::framing`): not HTTP, a
/// `Content-Length` that is not one line of digits, transfer codings with `chunked` not
/// once and last, `Transfer-Encoding` in HTTP/1.0, or a `Connection` that nominates a
/// framing header.
pub(super) fn parse_head(
    buf: &[u8],
    head_request: bool,
    lines: &mut Vec<u8>,
    own_rate: bool,
) -> Result<Option<Head>, ()> {
    // Left uninitialized: httparse writes the lines it finds (an initialized array was
    // 4 KiB of stores a response, ~300 instructions).
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        _ => return Err(()),
    };
    let code = parsed.code.ok_or(())?;
    let status = StatusCode::from_u16(code).map_err(|_| ())?;
    let http11 = parsed.version == Some(1);
    let mut reusable = http11;
    let mut length: Option<u64> = None;
    let mut codings = framing::Codings::default();
    let mut encoded = false;
    let mut nominates = false;
    let mut kinds = [Kind::Other; MAX_HEADERS];
    for (h, kind) in parsed.headers.iter().zip(kinds.iter_mut()) {
        *kind = Kind::of(h.name.as_bytes());
        match *kind {
            Kind::Connection => {
                let mut close = false;
                if !connection_tokens(h.value, &mut close) {
                    // Framing headers are not hop-by-hop: stripping them would leave the
                    // body without an end for the client.
                    if framing::nominates_framing(h.value) {
                        return Err(());
                    }
                    nominates = true;
                }
                reusable &= !close;
            }
            Kind::ContentLength => {
                // One line of `1*DIGIT`: a second line, even an equal one, or a list is
                // refused as nginx does, so no next hop can pick another value.
                if length.is_some() {
                    return Err(());
                }
                length = Some(framing::content_length(h.value).ok_or(())?);
            }
            Kind::TransferEncoding => {
                encoded = true;
                codings.add(h.value).map_err(|_| ())?;
            }
            _ => {}
        }
    }
    // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
    if encoded && !http11 {
        return Err(());
    }
    let chunked = codings.chunked;
    lines.clear();
    // Room for the head, the body bytes that came with it (the caller appends them: one
    // write to the client) and busbar's own lines (`finish_head`): one allocation, where
    // a fixed first size grew by a copy for most answers (~300 instructions a request).
    lines.reserve(buf.len() + OWN_LINES);
    status_line(lines, status);
    // Which lines go on is the response-head editor's call.
    for (h, kind) in parsed.headers.iter().zip(kinds) {
        if kind.keep(encoded, own_rate) {
            line(lines, h.name.as_bytes(), h.value);
        }
    }
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    if framing == Framing::Close {
        reusable = false;
    }
    Ok(Some(Head {
        status,
        framing,
        len,
        reusable,
        nominates,
    }))
}

/// The upstream's response head as a header map, less hop-by-hop headers (those its
/// `Connection` names too): for routes that edit response headers, which need to see
/// and change the upstream's own.
pub(crate) fn upstream_header(raw: &[u8]) -> Result<ResponseHeader, ()> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut lines);
    parsed.parse(raw).map_err(|_| ())?;
    let status = StatusCode::from_u16(parsed.code.ok_or(())?).map_err(|_| ())?;
    let mut resp =
        ResponseHeader::build_no_case(status, Some(parsed.headers.len())).map_err(|_| ())?;
    let mut nominated = Vec::new();
    let mut encoded = false;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| ())?;
        if name == CONNECTION {
            nominated.extend(
                h.value
                    .split(|&b| b == b',')
                    .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok()),
            );
        }
        encoded |= name == TRANSFER_ENCODING;
        if Kind::of(name.as_str().as_bytes()).hop_by_hop() {
            continue;
        }
        let value = HeaderValue::from_bytes(h.value).map_err(|_| ())?;
        resp.append_header(name, value).map_err(|_| ())?;
    }
    // Framing headers are never hop-by-hop ([`parse_head`] refuses a head that says so).
    for name in nominated
        .iter()
        .filter(|n| **n != CONTENT_LENGTH && **n != TRANSFER_ENCODING)
    {
        resp.remove_header(name);
    }
    if encoded {
        // Transfer-Encoding wins over Content-Length, which must then go (RFC 9112 §6.3).
        resp.remove_header(&CONTENT_LENGTH);
    }
    Ok(resp)
}

/// `HTTP/1.1 <status> <canonical reason>` and CRLF.
pub(super) fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    if status == StatusCode::OK {
        // Nearly every answer: one copy, no reason lookup (~80 instructions less).
        out.put_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.put_slice(b"\r\n");
}

/// Finishes a head [`parse_head`] began: busbar's `RateLimit-*` lines (`rate`), then
/// `Date` and `Connection`.
pub(super) fn finish_head(out: &mut Vec<u8>, rate: Option<&RateInfo>, keep_alive: bool) {
    response_head::own_lines(out, rate);
    end_head(out, keep_alive);
}

/// busbar's `Date` and `Connection` lines (as lines: two map inserts cost more than the
/// rest of a small head), and the head's end.
fn end_head(out: &mut Vec<u8>, keep_alive: bool) {
    out.put_slice(b"Date: ");
    date(out);
    out.put_slice(if keep_alive {
        b"\r\nConnection: keep-alive\r\n\r\n".as_slice()
    } else {
        b"\r\nConnection: close\r\n\r\n".as_slice()
    });
}

/// The `Date` value, from this thread's copy while the second it names lasts: pingora's
/// `get_cached_date` reads the system clock and hands out a shared `HeaderValue` each
/// call (~120 instructions a response); this reads the turn's clock (`clock::now`),
/// which the request path has read already. The copy is refreshed no later than the
/// second's end (its end is worked out from a reading of the system clock taken before
/// the text, and from the turn's start, both no later than the text's).
fn date(out: &mut Vec<u8>) {
    struct Cached {
        /// When the second in `text` may have ended; `None`: no text yet.
        until: Option<Instant>,
        text: [u8; 32],
        len: usize,
    }
    thread_local! {
        static DATE: RefCell<Cached> =
            const { RefCell::new(Cached { until: None, text: [0; 32], len: 0 }) };
    }
    DATE.with(|cached| {
        let mut c = cached.borrow_mut();
        let now = clock::now();
        if c.until.is_none_or(|until| now >= until) {
            let wall = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let value = get_cached_date();
            let text = value.as_bytes();
            let len = text.len().min(c.text.len());
            c.text[..len].copy_from_slice(&text[..len]);
            c.len = len;
            let left = Duration::from_secs(1) - Duration::from_nanos(wall.subsec_nanos().into());
            c.until = now.checked_add(left);
        }
        out.put_slice(&c.text[..c.len]);
    });
}

/// The protocol a `101 Switching Protocols` head (`raw`, complete) switched to: its
/// `Upgrade` value, which RFC 9110 §15.2.2 requires; `None` without one (or with two).
pub(super) fn switched_to(raw: &[u8]) -> Option<&[u8]> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    parsed.parse(raw).ok()?;
    let mut lines = parsed
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("upgrade"));
    match (lines.next(), lines.next()) {
        (Some(h), None) if !h.value.is_empty() => Some(h.value),
        _ => None,
    }
}

/// Finishes a `101` head [`parse_head`] began: busbar's `RateLimit-*` lines (`rate`),
/// `Date`, and the switch: `Upgrade` (the upstream's `protocol`) with `Connection:
/// upgrade` instead of busbar's keep-alive line.
pub(super) fn finish_switch(out: &mut Vec<u8>, rate: Option<&RateInfo>, protocol: &[u8]) {
    response_head::own_lines(out, rate);
    end_switch(out, protocol);
}

/// A `101` head from a header map (a route that edits response headers) into `out`, with
/// the switch's lines (see [`finish_switch`]).
pub(super) fn write_switch(out: &mut Vec<u8>, resp: &mut ResponseHeader, protocol: &[u8]) {
    for name in [DATE, CONNECTION, UPGRADE] {
        if resp.headers.contains_key(&name) {
            resp.remove_header(&name);
        }
    }
    status_line(out, resp.status);
    resp.header_to_h1_wire(out);
    end_switch(out, protocol);
}

fn end_switch(out: &mut Vec<u8>, protocol: &[u8]) {
    out.put_slice(b"Date: ");
    date(out);
    out.put_slice(b"\r\n");
    line(out, b"Upgrade", protocol);
    out.put_slice(b"Connection: upgrade\r\n\r\n");
}

/// A response head from a header map into `out`: busbar's own answers, and upstream
/// responses of routes that edit response headers. `Date` and `Connection` are busbar's.
pub(super) fn write_head(out: &mut Vec<u8>, resp: &mut ResponseHeader, keep_alive: bool) {
    if resp.headers.contains_key(DATE) {
        resp.remove_header(&DATE);
    }
    if resp.headers.contains_key(CONNECTION) {
        resp.remove_header(&CONNECTION);
    }
    status_line(out, resp.status);
    resp.header_to_h1_wire(out);
    end_head(out, keep_alive);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread's copy names the system's second: what pingora's date says just
    /// before or just after (the second may turn between the readings).
    #[test]
    fn the_date_is_the_current_second() {
        for _ in 0..3 {
            let before = get_cached_date();
            let mut out = Vec::new();
            date(&mut out);
            let after = get_cached_date();
            assert!(
                out == before.as_bytes() || out == after.as_bytes(),
                "{:?} not {before:?} or {after:?}",
                String::from_utf8_lossy(&out)
            );
            std::thread::sleep(Duration::from_millis(600));
        }
    }

    #[test]
    fn status_lines() {
        for (status, line) in [
            (StatusCode::OK, "HTTP/1.1 200 OK\r\n"),
            (StatusCode::NOT_FOUND, "HTTP/1.1 404 Not Found\r\n"),
            (
                StatusCode::from_u16(299).unwrap(),
                "HTTP/1.1 299 Unknown\r\n",
            ),
        ] {
            let mut out = Vec::new();
            status_line(&mut out, status);
            assert_eq!(String::from_utf8_lossy(&out), line);
        }
    }

    #[test]
    fn response_framing() {
        let parse = |raw: &[u8], head_req| parse_head(raw, head_req, &mut Vec::new(), false);
        let head = |raw: &[u8], head_req| parse(raw, head_req).unwrap().unwrap();
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false);
        assert_eq!((h.framing, h.reusable), (Framing::Length(3), true));
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked);
        let h = head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false);
        assert_eq!((h.framing, h.reusable), (Framing::Close, false));
        let h = head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(!h.reusable);
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true);
        assert_eq!(h.framing, Framing::None);
        let h = head(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::None);
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le", false)
            .unwrap()
            .is_none());
        let h = head(b"HTTP/1.1 200 OK\r\nConnection: x-a\r\n\r\n", false);
        assert!(h.nominates);
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!((h.framing, h.reusable), (Framing::Close, false));
    }

    /// A `101`'s head for the client: the upstream's lines less hop-by-hop ones, then
    /// busbar's, and the switch (`Upgrade` as the upstream chose, `Connection: upgrade`).
    #[test]
    fn a_switch_head_names_the_protocol_and_keeps_the_connection_upgraded() {
        let raw: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: abc=\r\n\r\n";
        assert_eq!(switched_to(raw), Some(&b"websocket"[..]));
        let mut out = Vec::new();
        let head = parse_head(raw, false, &mut out, false).unwrap().unwrap();
        assert_eq!((head.status.as_u16(), head.framing), (101, Framing::None));
        finish_switch(&mut out, None, b"websocket");
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: abc=\r\nDate: "
            ),
            "{text}"
        );
        assert!(
            text.ends_with("\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"),
            "{text}"
        );
        assert_eq!(text.matches("pgrade:").count(), 1, "{text}");

        let mut resp = upstream_header(raw).unwrap();
        resp.insert_header("x-edit", "1").unwrap();
        let mut out = Vec::new();
        write_switch(&mut out, &mut resp, b"websocket");
        let text = String::from_utf8(out).unwrap().to_lowercase();
        assert!(text.contains("x-edit: 1\r\n"), "{text}");
        assert!(
            text.ends_with("\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"),
            "{text}"
        );

        // A 101 that does not say what it switched to (or says it twice).
        for bad in [
            &b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n"[..],
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: a\r\nUpgrade: b\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade:\r\n\r\n",
        ] {
            assert_eq!(switched_to(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    /// Heads busbar cannot frame or be sure of are refused (the client gets a 502).
    #[test]
    fn heads_that_cannot_be_framed_are_refused() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: +0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: x-a, Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nContent-Length: +5\r\n\r\n",
        ] {
            assert!(
                parse_head(raw, false, &mut Vec::new(), false).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    /// What the client gets of an upstream head: its lines as they came, less hop-by-hop
    /// ones, its `Date`, a `Content-Length` that `Transfer-Encoding` overrides, and the
    /// `RateLimit-*` busbar sets; then busbar's.
    #[test]
    fn upstream_lines_pass_through_less_what_belongs_to_the_hop() {
        let raw: &[u8] = b"HTTP/1.1 200 OK\r\nX-A:  1 \r\nDate: old\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nRateLimit-Limit: 9\r\nConnection: keep-alive\r\nTE: x\r\nUpgrade: y\r\nProxy-Connection: z\r\n\r\n";
        let rate = RateInfo {
            limit: 5,
            remaining: 4,
            reset_secs: 1,
        };
        let head = |own_rate: bool| {
            let mut out = Vec::new();
            parse_head(raw, false, &mut out, own_rate).unwrap().unwrap();
            finish_head(&mut out, own_rate.then_some(&rate), true);
            String::from_utf8(out).unwrap().to_lowercase()
        };
        let text = head(true);
        assert!(
            text.starts_with(
                "http/1.1 200 ok\r\nx-a: 1\r\ntransfer-encoding: chunked\r\nratelimit-limit: 5\r\n"
            ),
            "{text}"
        );
        for gone in [
            "date: old",
            "keep-alive: timeout",
            "content-length",
            "ratelimit-limit: 9",
            "te: x",
            "upgrade",
            "proxy-connection",
        ] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        assert!(text.contains("ratelimit-remaining: 4\r\n"), "{text}");
        assert!(text.contains("connection: keep-alive\r\n"), "{text}");
        assert_eq!(text.matches("date: ").count(), 1, "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        // A route without a rate limit passes the upstream's own on.
        let text = head(false);
        assert!(text.contains("ratelimit-limit: 9\r\n"), "{text}");
        assert!(!text.contains("ratelimit-remaining"), "{text}");

        // As a map (for routes that edit response headers): the same headers go.
        let map = upstream_header(b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n").unwrap();
        assert!(map.headers.get("x-hop").is_none());
        assert!(map.headers.get("content-length").is_none());
        assert!(map.headers.get("connection").is_none());
        assert_eq!(map.headers.get("x-a").unwrap(), "1");
    }
}
