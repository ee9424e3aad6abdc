//! The end of every request, answered by the upstream or by busbar: the gray-release
//! outcome, the route's metrics and the access-log line.
//!
//! Owns: [`Phases::finish`], the one call every driver makes once per request, after
//! the last byte (or the failure). Anything that must see every request at its end
//! (metrics, the access log, a span's end) belongs here. The status recorded is the one
//! the client got (200 for a gRPC caller's Trailers-Only refusal), the cause its reason.
//! Must not: write to the client.

use super::ctx::RequestCtx;
use super::Phases;
use crate::accesslog::Entry;
use crate::metrics::METRICS;
use crate::proxy::reply::Cause;

/// The status a version's per-class counts judge the request by: the one written, but
/// for busbar's own answer to a gRPC caller, which goes out as 200 (Trailers-Only), its
/// cause's HTTP status, so a connect failure to a version is not counted a success.
/// Metrics and the access log keep the status written, with the cause as the reason.
fn judged(ctx: &RequestCtx, status: u16) -> u16 {
    match ctx.cause {
        Some(cause) if status > 0 && ctx.caller.is_grpc() => cause.status(),
        _ => status,
    }
}

/// How a request ended, for [`Phases::finish`].
pub(crate) struct Done<'a> {
    /// The request as the client sent it: method, host (see `request::host_of`) and path.
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The query string as sent, for the access log.
    pub query: Option<&'a str>,
    pub client: Option<std::net::SocketAddr>,
    /// The status written to the client; 0 when none was.
    pub status: u16,
    pub body_bytes: usize,
    /// The request ended in an error busbar did not name with a cause.
    pub error: bool,
}

impl Phases {
    /// The request is over: gray-release outcome, metrics, and the access log line.
    pub(crate) fn finish(&self, ctx: &mut RequestCtx, done: &Done<'_>) {
        ctx.release_instance();
        let status = done.status;
        // Read before `finish` takes it: the access log's release version.
        let served = ctx.release.served_instance();
        ctx.release.finish(ctx.set.as_deref(), judged(ctx, status));
        let total = crate::base::clock::now().saturating_duration_since(ctx.start);
        if let Some(route) = &ctx.route {
            let m = &route.metrics;
            if status > 0 {
                match ctx.cause {
                    // busbar answered itself: counted with its reason.
                    Some(c) => crate::metrics::count_answer(
                        route.name(),
                        route.service.name(),
                        status,
                        c.code(),
                        done.method,
                    ),
                    None => m.requests.inc(status, done.method),
                }
            }
            m.request_bytes.inc_by(ctx.body_bytes);
            m.response_bytes.inc_by(done.body_bytes as u64);
            route.metrics.duration.observe(total.as_secs_f64());
        } else if status > 0 {
            match ctx.cause {
                Some(c) => crate::metrics::count_refusal(status, c.code(), done.method),
                None => METRICS.no_route.inc(status, done.method),
            }
        }
        let error = ctx.cause.map(Cause::code).or(done.error.then_some("error"));
        crate::otel::finish(ctx, done.method, status, error);
        if !self.access_log.enabled() {
            return;
        }
        let trace_id = ctx.trace.trace_id_hex();
        let route = ctx.route.as_ref();
        self.access_log.write(&Entry {
            client: done.client,
            method: done.method,
            host: done.host,
            path: done.path,
            route: route.map_or("", |r| r.name()),
            service: route.map_or("", |r| r.service.name()),
            instance: ctx.last_addr,
            status,
            bytes: done.body_bytes,
            total,
            upstream: ctx.upstream_time,
            tries: ctx.tries,
            trace_id: &trace_id,
            // A tunnel busbar closed (idle, drained) says why; its span is no error.
            error: error.or(ctx.tunnel_end),
            seen: ctx.seen.as_ref(),
            query: done.query,
            redact: ctx
                .snapshot
                .as_ref()
                .map_or(&[][..], |s| &s.config.log.redact_query[..]),
            user: ctx.admitted.as_ref().and_then(|a| a.user()),
            version: match (&ctx.set, served) {
                (Some(set), Some(i)) => Some(set.versions.name_of(i)),
                _ => None,
            },
            grpc_status: ctx.grpc_status,
        });
    }
}
