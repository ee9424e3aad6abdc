//! One try at an instance, and what its outcome means: which instance and which path
//! (sidecar or app port), the try's timeouts within the request's deadline, whether a
//! failure counts against the instance (outlier detection), and whether to try again.
//!
//! Owns: the try's bookkeeping in the context, the retry decision (attempts, deadline,
//! the service's retry budget) and ejection within `max_ejected_percent`.
//! Must not: connect or send (each driver's pool does), or decide a request is safe to
//! send again (the driver knows whether its body is still held and its answer not
//! started, and says so).

use std::time::Duration;

use super::ctx::RequestCtx;
use super::Phases;
use crate::fallback;
use crate::model::health::now_ms;
use crate::proxy::reply::Cause;

/// How long an idle upstream connection stays pooled.
pub(crate) const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

/// What a try needs to reach its instance (from [`Phases::begin_try`]).
pub(crate) struct Try {
    /// The sidecar's address or the app port's (`fallback::target`).
    pub addr: std::net::SocketAddr,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// The instance is reached over TLS: how (`model::TlsPeer`).
    pub tls: Option<std::sync::Arc<crate::model::TlsPeer>>,
}

impl Phases {
    /// Starts a try: picks its instance and path (sidecar or app port) and its timeouts
    /// within the request's deadline. `Err` is the cause that answers the request when
    /// no try can start (also left in the context).
    pub(crate) fn begin_try(&self, ctx: &mut RequestCtx) -> Result<Try, Cause> {
        ctx.cause = None;
        let (Some(route), Some(_)) = (ctx.route.clone(), ctx.set.as_ref()) else {
            ctx.cause = Some(Cause::UpstreamError);
            return Err(Cause::UpstreamError);
        };
        let svc = &route.service;
        let now = crate::base::clock::now();
        let remaining = ctx
            .deadline
            .map_or(svc.config.timeout, |d| d.saturating_duration_since(now));
        if remaining.is_zero() {
            ctx.cause = Some(Cause::UpstreamTimeout);
            svc.metrics.timeouts.inc();
            return Err(Cause::UpstreamTimeout);
        }
        let Some((idx, instance)) = ctx.pick_instance() else {
            ctx.cause = Some(Cause::NoHealthyInstance);
            svc.metrics.no_instance.inc();
            return Err(Cause::NoHealthyInstance);
        };
        ctx.tried.push(idx);
        ctx.tries += 1;
        instance.health.begin_request();
        let (addr, path) = fallback::target(svc, &instance, now_ms());
        crate::otel::try_begin(ctx, idx, addr);
        ctx.path = path;
        ctx.last_addr = Some(addr);
        let tls = instance.tls.clone();
        ctx.instance = Some(instance);
        ctx.upstream_start = Some(now);
        Ok(Try {
            addr,
            connect_timeout: svc.config.connect_timeout.min(remaining),
            read_timeout: svc.config.read_timeout.min(remaining),
            tls,
        })
    }

    /// A try could not connect. Switches a dead sidecar to its app port, counts the
    /// failure against the instance otherwise; says whether to try again.
    pub(crate) fn on_connect_failure(&self, ctx: &mut RequestCtx, timed_out: bool) -> bool {
        crate::otel::connect_failed(ctx, timed_out);
        if let Some(instance) = ctx.release_instance() {
            if let Some(route) = &ctx.route {
                route.service.metrics.connect_failures.inc();
            }
            // A dead sidecar is not a dead instance: switch it to its app port and try
            // this same request again there (nothing was sent, so it is safe).
            if ctx.path == Some(fallback::path::Path::Sidecar) && !ctx.sidecar_failover {
                if let Some((_, state)) = &instance.sidecar {
                    if state.connect_failed() {
                        tracing::warn!(instance = %instance.id, "sidecar connect failed: switching to the app port");
                    }
                }
                ctx.sidecar_failover = true;
                ctx.tried.pop();
                ctx.cause = Some(Cause::ConnectFailed);
                return true;
            }
            self.record_failure(ctx, &instance);
        }
        ctx.cause = Some(if timed_out {
            Cause::UpstreamTimeout
        } else {
            Cause::ConnectFailed
        });
        // Nothing reached the upstream: any method may be retried.
        self.may_retry(ctx)
    }

    /// A try's TLS handshake failed because the instance's certificate did not verify
    /// (unknown issuer, wrong name, expired): a connect failure (nothing was sent; retried
    /// elsewhere as one), answered with its own reason if it is the last.
    pub(crate) fn on_certificate_failure(&self, ctx: &mut RequestCtx) -> bool {
        if let Some(route) = &ctx.route {
            route.service.metrics.certificate_failures.inc();
        }
        let retry = self.on_connect_failure(ctx, false);
        ctx.cause = Some(Cause::UpstreamCertificate);
        retry
    }

    /// A connected try failed before its response was complete. Counts an upstream fault
    /// against the instance; says whether to try again: only a request that is `safe` to
    /// send again (idempotent, body still held, no response started), after an upstream
    /// fault or a stale reused connection, within the retry budget.
    pub(crate) fn on_try_failure(
        &self,
        ctx: &mut RequestCtx,
        upstream_fault: bool,
        timed_out: bool,
        safe: bool,
        stale_reuse: bool,
    ) -> bool {
        crate::otel::try_failed(ctx, upstream_fault, timed_out);
        if let Some(instance) = ctx.release_instance() {
            if upstream_fault {
                self.record_failure(ctx, &instance);
            }
        }
        if upstream_fault {
            ctx.cause = Some(if timed_out {
                Cause::UpstreamTimeout
            } else {
                Cause::UpstreamError
            });
            if timed_out {
                if let Some(route) = &ctx.route {
                    route.service.metrics.timeouts.inc();
                }
            }
        }
        safe && (upstream_fault || stale_reuse) && self.may_retry(ctx)
    }

    /// The upstream's response head arrived: upstream time, and the instance's health.
    pub(crate) fn on_response(&self, ctx: &mut RequestCtx, status: http::StatusCode) {
        if status.is_informational() {
            return;
        }
        self.on_response_head(ctx);
        self.on_response_health(ctx, status);
    }

    /// The upstream's final response head arrived: the upstream time. A driver that
    /// reads the body itself judges the instance by [`Self::on_response_health`] once
    /// the body has ended cleanly, so that an answer whose body turns out malformed is
    /// not also counted a success (which would reset the instance's failure streak
    /// every time).
    pub(crate) fn on_response_head(&self, ctx: &mut RequestCtx) {
        if let (Some(route), Some(start)) = (&ctx.route, ctx.upstream_start) {
            let t = crate::base::clock::now().saturating_duration_since(start);
            ctx.upstream_time = Some(t);
            route
                .service
                .metrics
                .upstream_duration
                .observe(t.as_secs_f64());
        }
    }

    /// The instance's health after its answer: a 5xx counts against it, anything else
    /// ends its failure streak.
    pub(crate) fn on_response_health(&self, ctx: &mut RequestCtx, status: http::StatusCode) {
        if let Some(instance) = ctx.instance.clone() {
            if status.is_server_error() {
                self.record_failure(ctx, &instance);
            } else {
                instance.health.record_success();
            }
        }
    }

    /// The upstream answered with a head or a body busbar cannot frame (`drivers::h1::framing`).
    /// It counts against the instance like a 5xx and is counted in
    /// `busbar_upstream_errors_total{cause="malformed"}`; it is never retried: the
    /// request reached the upstream, which may have acted on it, and an instance that
    /// answers so would likely answer the next try the same way (nginx and HAProxy send
    /// such a request once too).
    pub(crate) fn on_malformed_response(&self, ctx: &mut RequestCtx) {
        if let Some(route) = &ctx.route {
            route.service.metrics.malformed.inc();
        }
        crate::otel::try_end(ctx, 0, Some("upstream_malformed"));
        self.on_try_failure(ctx, true, false, false, false);
    }

    /// Counts a failure against the instance and ejects it when its streak says so,
    /// unless that would eject more than the service allows.
    fn record_failure(&self, ctx: &RequestCtx, instance: &crate::model::Instance) {
        let Some(route) = &ctx.route else { return };
        let svc = &route.service;
        let policy = &svc.config.outlier;
        if !instance.health.record_failure(policy) {
            return;
        }
        let set = svc.instances();
        let total = set.instances.len();
        let ejected = set
            .instances
            .iter()
            .filter(|i| i.health.state() == crate::model::health::HealthState::Ejected)
            .count();
        if (ejected + 1) * 100 > total * policy.max_ejected_percent as usize {
            return;
        }
        if instance.health.eject(policy, now_ms()) == crate::model::health::Transition::Ejected {
            svc.metrics.ejections.inc();
            svc.refresh_panic();
            tracing::warn!(service = svc.name(), instance = %instance.addr, "instance ejected by outlier detection");
        }
    }

    /// May this failed try be tried again? Spends a retry token if so.
    fn may_retry(&self, ctx: &RequestCtx) -> bool {
        let Some(route) = &ctx.route else {
            return false;
        };
        let svc = &route.service;
        if ctx.tries > svc.config.retry.attempts {
            return false;
        }
        if ctx.deadline.is_some_and(|d| d <= crate::base::clock::now()) {
            return false;
        }
        if !svc.retry_budget.try_withdraw() {
            svc.metrics.budget_exhausted.inc();
            return false;
        }
        svc.metrics.retries.inc();
        true
    }
}
