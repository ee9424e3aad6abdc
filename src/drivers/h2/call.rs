//! A request's tries to an `h2c` / `h2` service over `pool`, whoever the client is: an
//! HTTP/2 stream (`passthrough`) or an HTTP/1 request (`drivers::h1::to_h2`).
//!
//! Owns: the upstream head as HTTP/2 (the one builder's map, `Host` back into
//! `:authority`, `te: trailers` where gRPC wants it), opening one try's stream (the
//! phases' pick, a pooled or new connection, connect and certificate failures and a
//! stream the connection no longer takes retried as the phases decide, the head copied
//! only while another try may follow), and sending request data within the upstream
//! stream's window.
//! Must not: read the client or write to it (the callers do, each in its protocol), or
//! decide retries or count outcomes (the phases').

use std::future::poll_fn;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::SendStream;
use http::header::{HOST, TE, TRANSFER_ENCODING};
use http::{HeaderValue, Uri};
use pingora_http::RequestHeader;

use super::pool::{self, OpenError};
use crate::base::deadline::within;
use crate::phases::ctx::RequestCtx;
use crate::phases::Phases;
use crate::proxy::reply::Cause;

/// Request body bytes held for a retry of a refused stream (as the HTTP/1 path's hold).
pub(crate) const HOLD: usize = 64 * 1024;

/// The upstream stream failed (reset, connection lost) or did not open its window.
pub(crate) struct UpstreamFailed;

/// Sends `data` to the upstream within its window, each wait for window within `limit`.
pub(crate) async fn put(
    up: &mut SendStream<Bytes>,
    mut data: Bytes,
    limit: Duration,
) -> Result<(), UpstreamFailed> {
    while !data.is_empty() {
        up.reserve_capacity(data.len());
        let granted = match within(limit, poll_fn(|cx| up.poll_capacity(cx))).await {
            Ok(Some(Ok(n))) => n,
            _ => return Err(UpstreamFailed),
        };
        if granted == 0 {
            continue;
        }
        let part = data.split_to(granted.min(data.len()));
        up.send_data(part, false).map_err(|_| UpstreamFailed)?;
    }
    Ok(())
}

/// The upstream head as HTTP/2: `Host` (the client's `:authority`, as the route's edits
/// left it) back into the target with the service's scheme, framing headers gone, and
/// `te: trailers` when `te` (gRPC servers want it).
pub(crate) fn h2_head(req: RequestHeader, tls: bool, te: bool) -> Option<http::request::Parts> {
    let mut parts: http::request::Parts = req.into();
    let host = parts.headers.remove(HOST);
    parts.headers.remove(TRANSFER_ENCODING);
    if te {
        parts
            .headers
            .insert(TE, HeaderValue::from_static("trailers"));
    }
    let path = parts.uri.path_and_query().cloned()?;
    parts.uri = match host {
        Some(h) => Uri::builder()
            .scheme(if tls { "https" } else { "http" })
            .authority(h.as_bytes())
            .path_and_query(path)
            .build()
            .ok()?,
        // Filled in per try from the instance (`pool::origin`).
        None => Uri::from(path),
    };
    Some(parts)
}

/// A copy of the head for one try (the template is kept while another try may come).
fn request_of(parts: &http::request::Parts) -> http::Request<()> {
    let mut r = http::Request::new(());
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.headers_mut() = parts.headers.clone();
    r
}

/// An empty head, left in the template once its last try took it.
fn empty_parts() -> http::request::Parts {
    http::Request::new(()).into_parts().0
}

/// One try's stream, its head sent.
pub(crate) struct Opened {
    pub(crate) ex: pool::Exchange,
    /// The instance (for logs).
    pub(crate) addr: SocketAddr,
    /// Each wait for the upstream (its window, its response data) is bounded by this.
    pub(crate) read_timeout: Duration,
    /// Another try may follow this one (the retry budget's attempts are not spent).
    pub(crate) another: bool,
}

/// Why no stream was opened.
pub(crate) enum NotOpened {
    /// No try could start: busbar answers with this cause.
    Cause(Cause),
    /// The tries failed: busbar answers with the cause they left (`fail::cause_of`).
    Failed,
}

/// Opens the next try's stream to an instance of the route's service: `template` is
/// the head (from [`h2_head`]), taken by the last try; `no_body`: the head ends the
/// request. Connect and certificate failures, and a connection that takes no new
/// stream (nothing was sent: as a refused stream), go to the next try as the phases
/// decide. `grpc_by`: a gRPC call's deadline; each try's head carries a `grpc-timeout`
/// of what remains of it (grpc-go's and Envoy's propagation).
pub(crate) async fn open(
    phases: &Phases,
    ctx: &mut RequestCtx,
    svc: &crate::model::Service,
    template: &mut http::request::Parts,
    no_body: bool,
    grpc_by: Option<Instant>,
) -> Result<Opened, NotOpened> {
    loop {
        let t = phases.begin_try(ctx).map_err(NotOpened::Cause)?;
        let lease = match pool::open(&t, svc.config.h2_max_streams, &svc.metrics).await {
            Ok(l) => l,
            Err(e) => {
                let retry = match e {
                    OpenError::Certificate => phases.on_certificate_failure(ctx),
                    OpenError::Connect { timed_out } => phases.on_connect_failure(ctx, timed_out),
                };
                if retry {
                    continue;
                }
                return Err(NotOpened::Failed);
            }
        };
        if ctx.tries > 1 {
            crate::otel::retrace_headers(&mut template.headers, ctx);
        }
        if let Some(by) = grpc_by {
            // What remains of the call's deadline, for the upstream to work to.
            let left = by.saturating_duration_since(Instant::now());
            template
                .headers
                .insert(super::grpc_timeout::NAME, super::grpc_timeout::encode(left));
        }
        // The head is copied only while another try may follow.
        let another = ctx.tries <= svc.config.retry.attempts;
        let mut request = if another {
            request_of(template)
        } else {
            http::Request::from_parts(std::mem::replace(template, empty_parts()), ())
        };
        let tls = t.tls.is_some();
        if request.uri().authority().is_none() {
            // No `:authority` from the client: the instance's.
            if let Ok(u) = pool::origin(&t).parse::<Uri>() {
                let mut p = u.into_parts();
                p.path_and_query = request.uri().path_and_query().cloned();
                if let Ok(u) = Uri::from_parts(p) {
                    *request.uri_mut() = u;
                }
            }
        } else if tls != (request.uri().scheme() == Some(&http::uri::Scheme::HTTPS)) {
            // An h2c service's instance registered with `"tls": true`: reached over
            // TLS, so `https`.
            let mut p = request.uri().clone().into_parts();
            p.scheme = Some(if tls {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            });
            if let Ok(u) = Uri::from_parts(p) {
                *request.uri_mut() = u;
            }
        }
        match lease.send(request, no_body) {
            Ok(ex) => {
                return Ok(Opened {
                    ex,
                    addr: t.addr,
                    read_timeout: t.read_timeout,
                    another,
                })
            }
            Err(e) => {
                // Nothing was sent: as a refused stream.
                tracing::debug!(upstream = %t.addr, "h2 stream not opened: {e}");
                if phases.on_try_failure(ctx, false, false, true, true) {
                    continue;
                }
                return Err(NotOpened::Failed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_goes_back_to_h2_with_te_and_authority() {
        let mut req = RequestHeader::build("POST", b"/pkg.Svc/Call", None).unwrap();
        req.insert_header("host", "orders.local").unwrap();
        req.insert_header("transfer-encoding", "chunked").unwrap();
        req.insert_header("content-type", "application/grpc")
            .unwrap();
        let p = h2_head(req, false, true).unwrap();
        assert_eq!(p.uri.to_string(), "http://orders.local/pkg.Svc/Call");
        assert!(p.headers.get(HOST).is_none());
        assert!(p.headers.get(TRANSFER_ENCODING).is_none());
        assert_eq!(p.headers[TE], "trailers");
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        let p = h2_head(req, true, false).unwrap();
        assert!(p.uri.authority().is_none());
        assert!(p.headers.get(TE).is_none());
    }
}
