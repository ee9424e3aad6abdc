//! The pingora driver's "client went away" future, which admission's waits race
//! (`Phases::admit`): a request whose client left gives up its queue place at once.
//!
//! Owns: noticing a close on a pingora session without reading what pingora would not
//! hand on, the way pingora notices it while it waits on an upstream (`pingora-proxy`'s
//! `proxy_h1.rs` / `proxy_h2.rs`):
//! - HTTP/1: `read_body_or_idle(true)`, a one-byte read once the request body is done.
//!   0 bytes (FIN) or a reset is a close. Bytes are a request sent before this one was
//!   answered; pingora (pipelining off, its default) calls that an error, and so do we.
//!   pingora's default `abort_on_close` counts a half-close (client shut its write side
//!   and waits) as gone, as it does when proxying.
//! - An HTTP/1 body not yet read is read first, into pingora's retry buffer: the proxy
//!   sends that buffer upstream before reading on (as it does for a retry), and the
//!   JSON→gRPC call starts from it. Only a body of a declared length that fits the buffer
//!   ([`BODY_BUF_LIMIT`]) is read; a longer or chunked one would overflow it and be lost,
//!   so such a request is not watched and leaves at `max_wait`. A read error there (a
//!   stalled body past the read timeout) ends the request as the proxy's own read would.
//! - HTTP/2: the stream's reset, which reads nothing (`watch_h2_stream_close`), with a
//!   body or without.
//!
//! Must not: write to the client.

use pingora_core::protocols::http::ServerSession;
use pingora_error::{Error, ErrorType};

/// pingora's retry buffer for an HTTP/1 body (`pingora-core`'s `BODY_BUF_LIMIT`): a body
/// longer than this is truncated in it and would not reach the upstream.
const BODY_BUF_LIMIT: u64 = 64 * 1024;

/// Is the body's whole length declared, and does it fit the retry buffer?
fn fits_retry_buffer(req: &pingora_http::RequestHeader) -> bool {
    req.headers.get(http::header::TRANSFER_ENCODING).is_none()
        && crate::base::http::declared_length(&req.headers).is_some_and(|n| n <= BODY_BUF_LIMIT)
}

/// Finishes when the client has gone away (see the module doc); pending forever when
/// it can't be watched without reading the body.
pub(crate) async fn client_gone(session: &mut ServerSession) -> Box<Error> {
    let closed = |e: Box<Error>| {
        let closed = matches!(
            e.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::H2Error
        );
        if closed {
            Error::because(
                ErrorType::ConnectionClosed,
                "client went away while its request waited for admission",
                e,
            )
            .into_down()
        } else {
            e.into_down()
        }
    };
    if session.as_http1().is_some() {
        if !session.is_body_done() {
            if !fits_retry_buffer(session.req_header()) {
                return std::future::pending().await;
            }
            session.enable_retry_buffering();
            loop {
                match session.read_request_body().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => return closed(e),
                }
            }
        }
        return match session.read_body_or_idle(true).await {
            Err(e) => closed(e),
            // Not returned for a done body (it errs or stays pending); stay put if it is.
            Ok(_) => std::future::pending().await,
        };
    }
    match session.watch_h2_stream_close() {
        Some(idle) => match idle.await {
            Ok(reason) => closed(Error::explain(
                ErrorType::H2Error,
                format!("client reset the stream: {reason}"),
            )),
            Err(e) => closed(e),
        },
        None => std::future::pending().await,
    }
}
