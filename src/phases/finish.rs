//! The end of every request, answered by the upstream or by busbar: the gray-release
//! outcome, the route's metrics and the access-log line.
//!
//! Owns: [`Phases::finish`], the one call every driver makes once per request, after
//! the last byte (or the failure). Anything that must see every request at its end
//! (metrics, the access log, a span's end) belongs here.
//! Must not: write to the client.

use super::ctx::RequestCtx;
use super::Phases;
use crate::accesslog::Entry;
use crate::metrics::{class_index, method_index, METRICS};
use crate::proxy::reply::Cause;

/// How a request ended, for [`Phases::finish`].
pub(crate) struct Done<'a> {
    /// The request as the client sent it: method, host (see `request::host_of`) and path.
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
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
        ctx.release.finish(ctx.set.as_deref(), status);
        let total = ctx.start.elapsed();
        if let Some(route) = &ctx.route {
            let m = &route.metrics;
            if status > 0 {
                m.by_class[class_index(status)].inc();
                m.by_method[method_index(done.method)].inc();
            }
            m.request_bytes.inc_by(ctx.body_bytes);
            m.response_bytes.inc_by(done.body_bytes as u64);
            route.metrics.duration.observe(total.as_secs_f64());
        } else if status > 0 {
            METRICS.no_route[class_index(status)].inc();
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
            error,
        });
    }
}
