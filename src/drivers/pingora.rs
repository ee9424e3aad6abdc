//! The pingora driver: pingora's `ProxyHttp` adapter, a thin loop over the phases.
//!
//! pingora serves what busbar's own engines (`drivers::h1`, `drivers::h2`) do not: an
//! HTTP/1 upgrade to an HTTP/2 service or on a JSON→gRPC route, and the HTTP/1 heads
//! `h1::take` declines that the front door's check lets through: bytes in the head
//! httparse or the URI parser refuse (which pingora refuses or keeps). No HTTP/2
//! connection reaches it. Each `ProxyHttp` callback below
//! translates between pingora's types (its `Session`, its `Error`s) and the phases'
//! words, and calls the phase that owns the step: `request_filter` → setup, admission
//! (with the session's "client went away" future, `drivers::gone`), plan, and for a
//! JSON route the whole JSON→gRPC call (`drivers::json_grpc`); `upstream_peer` → a try;
//! `fail_to_connect` / `error_while_proxy` → the try's outcome; the request and response
//! filters → the one head builder and editor; `fail_to_proxy` → the one error path;
//! `logging` → finish.
//! Must not: hold policy of its own beyond that translation.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use pingora_core::modules::http::HttpModules;
use pingora_core::protocols::http::ServerSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use super::json_grpc::JsonIo;
use crate::admission::Refused;
use crate::phases::ctx::RequestCtx;
use crate::phases::fail::{self, Failure};
use crate::phases::pace::BodyPace;
use crate::phases::request::{logged_client, request_host};
use crate::phases::setup::{admission_parts, admission_policy};
use crate::phases::upstream_head::{self, Output};
use crate::phases::{response_head, Done, Phases, Routing, UPSTREAM_IDLE};
use crate::proxy::reply::Cause;
use crate::translate::{self, Translation};

/// pingora's `ProxyHttp` over the shared phases.
#[derive(Clone)]
pub struct BusbarProxy {
    pub phases: Arc<Phases>,
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .as_downstream()
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

fn is_tls(session: &Session) -> bool {
    session
        .as_downstream()
        .digest()
        .is_some_and(|d| d.ssl_digest.is_some())
}

/// Answers the request with busbar's own reply for `cause` (the one error path).
async fn answer(session: &mut Session, ctx: &mut RequestCtx, cause: Cause) -> Result<bool> {
    let (head, body) = fail::answer(ctx, cause);
    write_answer(session, head, body).await?;
    Ok(true)
}

/// Writes one of busbar's own answers. With no body (a gRPC caller's Trailers-Only
/// answer) the head ends the response: on HTTP/2 that must be one HEADERS frame with
/// END_STREAM, which pingora's `Session` never sends (its h2 head write passes
/// `end = false`, then an empty DATA frame ends the stream, and a gRPC client takes the
/// status for initial metadata), so the h2 session is written directly.
async fn write_answer(session: &mut Session, head: ResponseHeader, body: Bytes) -> Result<()> {
    if body.is_empty() {
        if let ServerSession::H2(h2) = session.as_downstream_mut() {
            return h2.write_response_header(Box::new(head), true);
        }
    }
    session.write_response_header(Box::new(head), false).await?;
    session.write_response_body(Some(body), true).await
}

fn upstream_error(cause: Cause) -> Box<Error> {
    let mut e = Error::explain(ErrorType::HTTPStatus(cause.status()), cause.code());
    e.esource = ErrorSource::Upstream;
    e
}

/// Did pingora's TLS connect fail on the instance's certificate? pingora keeps only
/// rustls's message ("invalid peer certificate: …") in the error's context.
fn certificate_rejected(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert
    ) && e
        .context
        .as_ref()
        .is_some_and(|c| c.as_str().contains("invalid peer certificate"))
}

/// Is this upstream error pingora's verdict on an answer it cannot frame: a bad head or
/// `Content-Length`, a bad chunk or trailer section?
fn malformed(e: &Error) -> bool {
    match e.etype() {
        ErrorType::InvalidHTTPHeader => true,
        ErrorType::Custom(name) => matches!(*name, "InvalidChunk" | "InvalidTrailerEnd"),
        _ => false,
    }
}

/// Does the response carry at most one `Content-Length`, one value? pingora frames a
/// response whose values agree (`5, 5`, or two lines of `5`) by that value but would pass
/// the lines on as they came, for a lenient next hop to read otherwise; busbar's own path
/// refuses them, as nginx does, and so does this one.
fn one_content_length(resp: &ResponseHeader) -> bool {
    let mut values = resp.headers.get_all(CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(v), None) => !v.as_bytes().contains(&b','),
        _ => false,
    }
}

/// pingora's error, in the words of the one error path.
fn failure(e: &Error) -> Failure {
    match (e.esource(), e.etype()) {
        (
            ErrorSource::Downstream,
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
        ) => Failure::ClientGone,
        // Slow read: the client stopped reading its response.
        (ErrorSource::Downstream, ErrorType::WriteTimedout) => Failure::ClientSendTimeout,
        // Slow body: it stalled or fell behind its pace.
        (ErrorSource::Downstream, ErrorType::ReadTimedout) => Failure::ClientBodyTimeout,
        (_, ErrorType::HTTPStatus(413)) => Failure::BodyTooLarge,
        (ErrorSource::Downstream, _) => Failure::ClientBad,
        (ErrorSource::Upstream, _) => Failure::Upstream,
        _ => Failure::Other,
    }
}

impl BusbarProxy {
    /// Everything before proxying, in request-path order: client timeouts, setup, CORS
    /// preflight, admission, the plan, and a JSON route's whole call. `Ok(true)` when
    /// busbar has answered the request itself.
    async fn prepare(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // The one snapshot load of this request; `setup` keeps it in the context.
        let snapshot = self.phases.state.load();
        // Slow body, slow read: each read and write to the client must make progress,
        // and the body must keep its pace (`phases::pace`).
        let limits = snapshot.config.limits;
        let downstream = session.as_downstream_mut();
        downstream.set_read_timeout(Some(limits.client_timeout));
        downstream.set_write_timeout(Some(limits.client_timeout));
        ctx.body_pace = BodyPace::new(limits.client_timeout, limits.body_min_rate);
        let peer = client_ip(session);
        ctx.tls = is_tls(session);
        let set_up = self
            .phases
            .setup(ctx, snapshot, session.req_header(), peer, Routing::Find);
        let (route, path) = match set_up {
            Ok(found) => found,
            Err(cause) => {
                if cause == Cause::BodyTooLarge {
                    // The body was not read: the connection can't be reused.
                    session.as_downstream_mut().set_keepalive(None);
                }
                return answer(session, ctx, cause).await;
            }
        };
        let translation = ctx
            .snapshot
            .as_deref()
            .and_then(|s| translate::of(s, &route))
            .cloned();
        if let Some(h) = crate::phases::setup::grpc_web(ctx, session.req_header(), &route) {
            session.write_response_header(Box::new(h), true).await?;
            return Ok(true);
        }
        if let Some(policy) = admission_policy(ctx, &route) {
            let checked = policy.check(&admission_parts(ctx, peer, session.req_header(), &path));
            let gone = super::gone::client_gone(session.as_downstream_mut());
            match self.phases.admit(ctx, &policy, checked, gone).await {
                Ok(()) => {}
                Err(Refused::Rejected(rejection)) => {
                    let (head, body) = fail::refuse(ctx, &rejection);
                    write_answer(session, head, body).await?;
                    return Ok(true);
                }
                Err(Refused::ClientGone(e)) => return Err(e),
            }
        }
        self.phases.plan(ctx, session.req_header(), &route);
        match translation {
            // JSON routes are answered by their gRPC call here; gRPC-Web, and plain gRPC
            // callers of a JSON route, go on through the proxy untouched.
            Some(Translation::Json(_)) if translate::is_plain_grpc(session.req_header()) => {
                Ok(false)
            }
            Some(Translation::Json(t)) => {
                // A body read while the request was queued is in the retry buffer
                // (`drivers::gone`): the call's body starts from it.
                let queued = session.as_ref().get_retry_buffer();
                let mut io = PingoraJson { session, queued };
                super::json_grpc::serve(&self.phases, &mut io, ctx, &t).await?;
                Ok(true)
            }
            Some(Translation::GrpcWeb(_)) | None => Ok(false),
        }
    }
}

/// A JSON→gRPC call's caller on pingora's session (`drivers::json_grpc`).
struct PingoraJson<'a> {
    session: &'a mut Session,
    /// What was read of the body while the request was queued.
    queued: Option<Bytes>,
}

impl JsonIo for PingoraJson<'_> {
    fn head(&self) -> &RequestHeader {
        self.session.req_header()
    }

    fn connection(&self) -> upstream_head::Downstream<'_> {
        upstream_head::Downstream {
            peer: client_ip(self.session),
            tls: is_tls(self.session),
            h2: self.session.req_header().version == http::Version::HTTP_2,
            rendered: None,
        }
    }

    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if let Some(queued) = self.queued.take().filter(|b| !b.is_empty()) {
            return Ok(Some(queued));
        }
        self.session.read_request_body().await
    }

    fn close(&mut self) {
        self.session.as_downstream_mut().set_keepalive(None);
    }

    async fn write_head(&mut self, head: ResponseHeader) -> Result<()> {
        self.session
            .write_response_header(Box::new(head), false)
            .await
    }

    async fn write_body(&mut self, data: Bytes, end: bool) -> Result<()> {
        let data = (!data.is_empty()).then_some(data);
        self.session.write_response_body(data, end).await
    }

    async fn gone(&mut self) {
        // pingora's session is not watched during the call (as before the engines took
        // JSON routes): the call ends at its deadline.
        std::future::pending().await
    }
}

#[async_trait]
impl ProxyHttp for BusbarProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {
        // No response compression module: busbar forwards bodies as they are.
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.prepare(session, ctx).await
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(b), Some(route)) = (body.as_ref(), ctx.route.as_ref()) {
            ctx.body_bytes += b.len() as u64;
            if ctx.body_bytes > route.config.max_body {
                ctx.cause = Some(Cause::BodyTooLarge);
                // The client's fault, said so: pingora's h2 upstream loop takes a body
                // filter error of no source for the upstream's, stops reading the body
                // and waits for the response until the read timeout (a 504, not the 413).
                return Err(
                    Error::explain(ErrorType::HTTPStatus(413), "request body too large")
                        .into_down(),
                );
            }
            if !end_of_stream {
                // The next read may wait only as long as the pace allows; a body behind
                // it fails as a downstream read timeout, which busbar answers 408.
                match ctx.body_pace.next_wait(ctx.body_bytes, Instant::now()) {
                    Some(wait) if !wait.is_zero() => {
                        session.as_downstream_mut().set_read_timeout(Some(wait));
                    }
                    _ => {
                        return Err(Error::explain(
                            ErrorType::ReadTimedout,
                            "request body slower than body_min_rate",
                        )
                        .into_down())
                    }
                }
            }
        }
        translate::request_body(ctx.grpc_web.as_mut(), body, end_of_stream)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let t = self.phases.begin_try(ctx).map_err(upstream_error)?;
        let tls = t.tls.as_deref();
        // pingora verifies nothing when the SNI is empty (nginx's behaviour): an
        // instance without a name is asked for by its IP address, which its certificate
        // must list (`model::TlsPeer`).
        let sni = tls.map_or_else(String::new, |p| p.sni.clone());
        let mut peer = HttpPeer::new(t.addr, tls.is_some(), sni);
        if let Some(p) = tls {
            let c = &p.config;
            // Per peer, pingora builds the client configuration again for each new
            // connection: no session resumption on this path (the own engine has it).
            peer.client_cert_key = c.client_cert.clone();
            peer.options.ca = c.ca.clone();
            peer.options.verify_cert = !c.insecure_skip_verify;
            peer.options.verify_hostname = !c.insecure_skip_verify;
        }
        let opts = &mut peer.options;
        opts.connection_timeout = Some(t.connect_timeout);
        opts.read_timeout = Some(t.read_timeout);
        opts.write_timeout = Some(t.read_timeout);
        opts.idle_timeout = Some(UPSTREAM_IDLE);
        if let Some(svc) = ctx
            .route
            .as_ref()
            .map(|r| &r.service.config)
            .filter(|c| c.protocol.is_h2())
        {
            // h2c by prior knowledge, or ALPN `h2` alone over TLS.
            opts.set_http_version(2, 2);
            opts.max_h2_streams = svc.h2_max_streams as usize;
        }
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let timed_out = matches!(e.etype(), ErrorType::ConnectTimedout);
        let retry = if certificate_rejected(&e) {
            self.phases.on_certificate_failure(ctx)
        } else {
            self.phases.on_connect_failure(ctx, timed_out)
        };
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let upstream_fault = *e.esource() == ErrorSource::Upstream;
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        // Only idempotent requests whose body we still hold and whose response has not
        // started may go again; a stale reused connection is pingora's own retry case.
        let safe = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        // `retry()` panics while the error's retry is still "only if reused": decide it first.
        e.retry.decide_reuse(client_reused);
        if upstream_fault && malformed(&e) {
            self.phases.on_malformed_response(ctx);
            e.set_retry(false);
            return e;
        }
        let stale_reuse = client_reused && e.retry();
        let retry = self
            .phases
            .on_try_failure(ctx, upstream_fault, timed_out, safe, stale_reuse);
        e.set_retry(retry);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let down = upstream_head::Downstream {
            peer: client_ip(session),
            tls: is_tls(session),
            h2: session.req_header().version == http::Version::HTTP_2,
            rendered: None,
        };
        upstream_head::build(ctx, upstream, down, Output::Map)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !one_content_length(resp) {
            // An answer that cannot be framed ([`malformed`]): a 502, never retried.
            let mut e =
                Error::explain(ErrorType::InvalidHTTPHeader, "more than one Content-Length");
            e.esource = ErrorSource::Upstream;
            return Err(e);
        }
        self.phases.on_response(ctx, resp.status);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        response_head::edit(ctx, resp)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        translate::response_body(ctx.grpc_web.as_mut(), body, end_of_stream);
        Ok(None)
    }

    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Bytes>> {
        // gRPC-Web: the trailers go downstream as the body's last frame.
        Ok(translate::trailers(ctx.grpc_web.as_mut(), trailers))
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match fail::cause_of(ctx, failure(e)) {
            Some(cause) => match session.response_written() {
                // The status the client got: 200 for a gRPC caller's Trailers-Only answer.
                None => {
                    let (head, body) = fail::answer(ctx, cause);
                    let status = head.status.as_u16();
                    let downstream = session.as_downstream_mut();
                    let _ = match downstream {
                        ServerSession::H2(h2) if body.is_empty() => {
                            h2.write_response_header(Box::new(head), true)
                        }
                        _ => downstream.write_error_response(head, body).await,
                    };
                    status
                }
                Some(written) => written.status.as_u16(),
            },
            None => match e.etype() {
                ErrorType::HTTPStatus(code) => {
                    let _ = session.respond_error(*code).await;
                    *code
                }
                _ => 0,
            },
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(route) = &ctx.route {
            let m = &route.service.metrics;
            match reused {
                true => m.connection_pooled.inc(),
                false => m.connection_new.inc(),
            }
        }
        Ok(())
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, e: &Error) -> bool {
        // Clients that go away are normal; upstream failures are counted and logged by us.
        matches!(e.esource(), ErrorSource::Downstream | ErrorSource::Upstream)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        let downstream = session.as_downstream();
        self.phases.finish(
            ctx,
            &Done {
                method: req.method.as_str(),
                host: request_host(req),
                path: req.uri.path(),
                query: req.uri.query(),
                client: logged_client(
                    downstream.client_addr().and_then(|a| a.as_inet()).copied(),
                    ctx.client,
                ),
                status,
                body_bytes: downstream.body_bytes_sent(),
                error: e.is_some(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_errors_name_the_failure() {
        let down = |t| {
            let mut e = Error::new(t);
            e.esource = ErrorSource::Downstream;
            e
        };
        assert_eq!(
            failure(&down(ErrorType::ConnectionClosed)),
            Failure::ClientGone
        );
        assert_eq!(
            failure(&down(ErrorType::WriteTimedout)),
            Failure::ClientSendTimeout
        );
        assert_eq!(
            failure(&down(ErrorType::ReadTimedout)),
            Failure::ClientBodyTimeout
        );
        assert_eq!(
            failure(&down(ErrorType::InvalidHTTPHeader)),
            Failure::ClientBad
        );
        assert_eq!(
            failure(&Error::new(ErrorType::HTTPStatus(413))),
            Failure::BodyTooLarge
        );
        assert_eq!(
            failure(&down(ErrorType::HTTPStatus(413))),
            Failure::BodyTooLarge
        );
        assert_eq!(
            failure(&upstream_error(Cause::UpstreamError)),
            Failure::Upstream
        );
    }
}
