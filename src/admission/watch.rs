//! Admission on a live connection: the waits of a route's policy raced against the client
//! going away, so a request whose client left gives up its place in the queue at once
//! instead of holding it until `max_wait`.
//!
//! Owns: [`admit`], the pingora path's one call, and [`enter_watched`], the same for a
//! connection that watches its client itself (busbar's own HTTP/1 path); and what they
//! return when the client left ([`Refused::ClientGone`], counted as
//! `decision="abandoned"`).
//! Must not: write to the client, or read body bytes that pingora would not hand on.
//!
//! A close is noticed the way pingora notices it while it waits on an upstream
//! (`pingora-proxy`'s `proxy_h1.rs` / `proxy_h2.rs`):
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
//! Dropping the queue wait is what frees the place: `queue::WaitGuard` leaves the queue on
//! drop, or hands back a slot granted in the same instant.

use std::future::Future;

use pingora_core::protocols::http::ServerSession;
use pingora_error::{Error, ErrorType};

use super::{Admitted, Rejection, RequestParts, RoutePolicy};

/// Why a request was not let through.
#[derive(Debug)]
pub enum Refused {
    /// Refused by policy: write this to the client.
    Rejected(Rejection),
    /// The client left while the request waited: nothing to write. The error is a
    /// downstream one (`ConnectionClosed` for a close or reset).
    ClientGone(Box<Error>),
}

impl Refused {
    /// The rejection to write, or the error that ends the request (`?` in the proxy).
    pub fn into_rejection(self) -> pingora_error::Result<Rejection> {
        match self {
            Refused::Rejected(r) => Ok(r),
            Refused::ClientGone(e) => Err(e),
        }
    }
}

/// Admits the request on `session`: ACL, identity and the local rate limit at once, then
/// the cluster-wide limit and the service queue while watching the client. `path` is the
/// normalised path when it differs from the request's, `literal` its literal reading when
/// that differs (see [`super::normalize`]).
pub async fn admit(
    policy: &RoutePolicy,
    session: &mut ServerSession,
    who: super::Addresses,
    path: Option<&str>,
    literal: Option<&str>,
) -> Result<Admitted, Refused> {
    let admitted = {
        let req = session.req_header();
        let parts = RequestParts {
            client_ip: who.client,
            peer: who.peer,
            path: path.unwrap_or(req.uri.path()),
            literal,
            headers: &req.headers,
        };
        policy.check(&parts).map_err(Refused::Rejected)?
    };
    enter_watched(policy, admitted, client_gone(session)).await
}

/// What [`RoutePolicy::check`] let through, let in: at once when nothing needs waiting
/// for ([`RoutePolicy::enter_now`]), else after [`wait_watched`] (boxed: its state is
/// large, and only a request that waits needs it). The part of [`admit`] any connection
/// can use, given a `gone` that finishes when its client leaves.
pub async fn enter_watched(
    policy: &RoutePolicy,
    mut admitted: Admitted,
    gone: impl Future<Output = Box<Error>>,
) -> Result<Admitted, Refused> {
    if policy.enter_now(&mut admitted) {
        return Ok(admitted);
    }
    Box::pin(wait_watched(policy, admitted, gone)).await
}

/// The waits of a request `check` let through (cluster limit, service queue), given up
/// as soon as `gone` says the client left.
async fn wait_watched(
    policy: &RoutePolicy,
    admitted: Admitted,
    gone: impl Future<Output = Box<Error>>,
) -> Result<Admitted, Refused> {
    match until_gone(policy.wait(admitted), gone).await {
        Ok(r) => r.map_err(Refused::Rejected),
        Err(e) => {
            if matches!(e.etype(), ErrorType::ConnectionClosed) {
                policy.metrics.abandoned_closed.inc();
            } else {
                policy.metrics.abandoned_protocol.inc();
            }
            Err(Refused::ClientGone(e))
        }
    }
}

/// pingora's retry buffer for an HTTP/1 body (`pingora-core`'s `BODY_BUF_LIMIT`): a body
/// longer than this is truncated in it and would not reach the upstream.
const BODY_BUF_LIMIT: u64 = 64 * 1024;

/// Is the body's whole length declared, and does it fit the retry buffer?
fn fits_retry_buffer(req: &pingora_http::RequestHeader) -> bool {
    req.headers.get(http::header::TRANSFER_ENCODING).is_none()
        && crate::proxy::declared_length(req).is_some_and(|n| n <= BODY_BUF_LIMIT)
}

/// `work`, unless `gone` finishes first; then `work` is dropped (leaving any queue).
/// `work` is polled first, so a request that need not wait never polls `gone`.
async fn until_gone<T>(
    work: impl Future<Output = T>,
    gone: impl Future<Output = Box<Error>>,
) -> Result<T, Box<Error>> {
    tokio::select! {
        biased;
        r = work => Ok(r),
        e = gone => Err(e),
    }
}

/// Finishes when the client has gone away (see the module doc); pending forever when
/// it can't be watched without reading the body.
async fn client_gone(session: &mut ServerSession) -> Box<Error> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::admission::queue::ServiceQueue;
    use crate::config::QueuePolicy;

    fn policy() -> QueuePolicy {
        QueuePolicy {
            max_depth: 4,
            max_wait: Duration::from_secs(60),
        }
    }

    async fn gone_when(rx: oneshot::Receiver<()>) -> Box<Error> {
        let _ = rx.await;
        Error::explain(ErrorType::ConnectionClosed, "test: client closed")
    }

    /// A queued request whose client leaves gives up its place at once, and the next
    /// user gets the freed slot long before max_wait.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_frees_its_place() {
        let q = Arc::new(ServiceQueue::new(1, 100));
        let (hold, _) = q.acquire("ip:busy", &policy()).await.unwrap();
        let (close, closed) = oneshot::channel();
        let q1 = q.clone();
        let leaver = tokio::spawn(async move {
            until_gone(q1.acquire("ip:leaver", &policy()), gone_when(closed)).await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(q.waiting(), 1);
        close.send(()).unwrap();
        let left = leaver.await.unwrap();
        assert!(matches!(left, Err(e) if matches!(e.etype(), ErrorType::ConnectionClosed)));
        assert_eq!((q.waiting(), q.users()), (0, 0), "its place is gone");

        let q2 = q.clone();
        let next = tokio::spawn(async move { q2.acquire("ip:next", &policy()).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(hold);
        let (_permit, waited) = next.await.unwrap().unwrap();
        assert_eq!(
            waited,
            Duration::from_millis(10),
            "served when the slot freed"
        );
    }

    /// A request that need not wait is admitted without the watch being polled.
    #[tokio::test(start_paused = true)]
    async fn an_immediate_admission_never_polls_the_watch() {
        let q = Arc::new(ServiceQueue::new(1, 100));
        let gone = std::future::poll_fn(|_| -> std::task::Poll<Box<Error>> {
            panic!("the watch was polled")
        });
        let r = until_gone(q.acquire("ip:a", &policy()), gone).await;
        assert!(matches!(r, Ok(Ok((_, w))) if w.is_zero()));
    }
}
