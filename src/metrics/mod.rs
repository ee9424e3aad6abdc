//! Every Prometheus metric busbar exports, declared once.
//!
//! Owns: the registry, metric names and label sets, and pre-resolved handles
//! ([`RouteMetrics`], [`ServiceMetrics`]) so the request path never formats a label.
//! Must not: carry user ids in labels.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: 0.5 ms to 30 s, dense where a proxy hop lives.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub connect_failures: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub retry_budget_exhausted: IntCounterVec,
    pub ejections: IntCounterVec,
    pub instances: IntGaugeVec,
    pub panic_mode: IntGaugeVec,
    pub reloads: IntCounterVec,
    pub in_flight: IntGauge,
    pub connections: IntGauge,
    pub admission: IntCounterVec,
    pub queue_wait: HistogramVec,
    pub service_in_flight: IntGaugeVec,
    pub queue_waiting: IntGaugeVec,
    pub redis_fallback: IntCounterVec,
    pub redis_up: IntGauge,
    pub redis_shards_down: IntGauge,
    pub cluster_nodes: IntGauge,
    pub registry_expired: IntCounter,
    pub fallback: IntCounterVec,
    pub path_switches: IntCounterVec,
    pub connect_refused: IntCounter,
    pub edge_refusals: IntCounterVec,
    pub self_preservation: IntGauge,
    pub registrations: IntCounterVec,
    pub registrations_refused: IntCounterVec,
    pub registry_degraded: IntGauge,
    pub dns_failures: IntCounterVec,
    pub version_requests: IntCounterVec,
    pub release_fallback: IntCounterVec,
    pub release_changes: IntCounterVec,
    /// Always 1, labelled with what this binary is (`busbar --version`).
    pub build_info: IntGaugeVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

fn int_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    let in_flight = IntGauge::new(
        "busbar_in_flight_requests",
        "Requests being handled right now.",
    )
    .expect("valid metric");
    r.register(Box::new(in_flight.clone()))
        .expect("metric registered once");
    let connections = IntGauge::new(
        "busbar_downstream_connections",
        "Client connections open on the service listeners.",
    )
    .expect("valid metric");
    r.register(Box::new(connections.clone()))
        .expect("metric registered once");
    Metrics {
        requests: counter(
            &r,
            "busbar_requests_total",
            "Requests answered, by route, service and status class.",
            &["route", "service", "class"],
        ),
        request_duration: histogram(
            &r,
            "busbar_request_duration_seconds",
            "Time from request start to the last byte of the response, by route.",
            &["route"],
        ),
        upstream_duration: histogram(
            &r,
            "busbar_upstream_duration_seconds",
            "Time from sending to the upstream to its response headers, by service.",
            &["service"],
        ),
        connect_failures: counter(
            &r,
            "busbar_upstream_connect_failures_total",
            "Failed connection attempts to upstream instances.",
            &["service"],
        ),
        upstream_errors: counter(
            &r,
            "busbar_upstream_errors_total",
            "Requests that failed at the upstream, by cause.",
            &["service", "cause"],
        ),
        retries: counter(
            &r,
            "busbar_upstream_retries_total",
            "Retries sent to another (or the same) instance.",
            &["service"],
        ),
        retry_budget_exhausted: counter(
            &r,
            "busbar_retry_budget_exhausted_total",
            "Retries not made because the service's retry budget was spent.",
            &["service"],
        ),
        ejections: counter(
            &r,
            "busbar_outlier_ejections_total",
            "Instances ejected by passive outlier detection.",
            &["service"],
        ),
        instances: gauge(
            &r,
            "busbar_instances",
            "Instances by health state.",
            &["service", "state"],
        ),
        panic_mode: gauge(
            &r,
            "busbar_panic_mode",
            "1 when a service balances over all instances because too few are available.",
            &["service"],
        ),
        reloads: counter(
            &r,
            "busbar_config_reloads_total",
            "Configuration reloads by result.",
            &["result"],
        ),
        in_flight,
        connections,
        admission: counter(
            &r,
            "busbar_admission_decisions_total",
            "Admission decisions by route: admitted, queued (admitted after a wait), limited, rejected, or abandoned (the client left while waiting), with the reason.",
            &["route", "decision", "reason"],
        ),
        queue_wait: histogram(
            &r,
            "busbar_queue_wait_seconds",
            "Time requests waited for a service slot, by service (requests that waited only).",
            &["service"],
        ),
        service_in_flight: gauge(
            &r,
            "busbar_service_in_flight",
            "Requests holding a slot of a service with max_in_flight (sampled each second).",
            &["service"],
        ),
        queue_waiting: gauge(
            &r,
            "busbar_queue_waiting",
            "Requests waiting for a slot of a service with max_in_flight (sampled each second).",
            &["service"],
        ),
        redis_fallback: counter(
            &r,
            "busbar_ratelimit_redis_fallback_total",
            "Cluster-wide rate-limit decisions made from the node's share of the limit because Redis was unreachable or slow, by route.",
            &["route"],
        ),
        redis_up: int_gauge(
            &r,
            "busbar_ratelimit_redis_up",
            "1 while this node reaches every shard of the Redis of [cluster]; 0 while the keys of one or more shards are limited on this node's share.",
        ),
        redis_shards_down: int_gauge(
            &r,
            "busbar_ratelimit_redis_shards_down",
            "Shards of the [cluster] Redis (masters with their slots; 1 for a single Redis) whose keys this node limits on its own share.",
        ),
        cluster_nodes: int_gauge(
            &r,
            "busbar_cluster_live_nodes",
            "Live busbar nodes in the [cluster] Redis as last seen (the divisor of the fallback share).",
        ),
        fallback: counter(
            &r,
            "busbar_fallback_requests_total",
            "Requests that took a mesh fallback path, by service and reason (sidecar_down, host, forward_proxy, connect).",
            &["service", "reason"],
        ),
        path_switches: counter(
            &r,
            "busbar_instance_path_switches_total",
            "Instances switching between sidecar and direct paths, by service and new path.",
            &["service", "to"],
        ),
        edge_refusals: counter(
            &r,
            "busbar_edge_refusals_total",
            "Requests refused at the front door (bad or slow heads), or cut off for a slow body or a stalled response write, by reason.",
            &["reason"],
        ),
        connect_refused: int_counter(
            &r,
            "busbar_connect_refused_total",
            "CONNECT requests refused because the target is not a configured service.",
        ),
        registry_expired: int_counter(
            &r,
            "busbar_registry_expired_total",
            "Registered instances removed because their TTL ran out.",
        ),
        self_preservation: int_gauge(
            &r,
            "busbar_registry_self_preservation",
            "1 while renewals are below the threshold and expiry is suspended.",
        ),
        registrations: counter(
            &r,
            "busbar_registry_requests_total",
            "Registration API calls by operation and result.",
            &["op", "result"],
        ),
        registrations_refused: counter(
            &r,
            "busbar_registrations_refused_total",
            "Instances learned from etcd or the registry snapshot file that this node does not route, because their address (or sidecar) is one the address policy refuses here; counted once per instance and address, by source and reason.",
            &["source", "reason"],
        ),
        dns_failures: counter(
            &r,
            "busbar_dns_failures_total",
            "Failed lookups of endpoint names (timeout, SERVFAIL, NXDOMAIN, no records) by service and reason; the last good answer keeps routing.",
            &["service", "reason"],
        ),
        registry_degraded: int_gauge(
            &r,
            "busbar_registry_degraded",
            "1 while the registry store (etcd) is unreachable and routing runs from memory.",
        ),
        version_requests: counter(
            &r,
            "busbar_version_requests_total",
            "Responses from upstream instances by service, instance version and status class (judge a canary by these).",
            &["service", "version", "class"],
        ),
        release_fallback: counter(
            &r,
            "busbar_release_fallback_total",
            "Requests a split sent to the stable version (or, last resort, any) because their version had no available instance, by route.",
            &["route"],
        ),
        release_changes: counter(
            &r,
            "busbar_release_changes_total",
            "Release overrides applied on this node, by source (release, rollback, cluster).",
            &["source"],
        ),
        build_info: {
            let g = gauge(
                &r,
                "busbar_build_info",
                "Always 1: the version and git commit this node runs (count by version to follow an upgrade through a cluster).",
                &["version", "commit"],
            );
            g.with_label_values(&[crate::version::VERSION, crate::version::COMMIT])
                .set(1);
            g
        },
        registry: r,
    }
});

/// Renders every metric in the Prometheus text format.
pub fn render() -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 1024);
    let families = METRICS.registry.gather();
    // Encoding into a Vec cannot fail on I/O; a bad family is skipped by the encoder's error.
    let _ = TextEncoder::new().encode(&families, &mut out);
    out
}

/// Status class index: 1xx → 0 … 5xx → 4.
#[inline]
pub fn class_index(status: u16) -> usize {
    ((status / 100).clamp(1, 5) - 1) as usize
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Handles for one route, resolved when the snapshot is built.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    pub by_class: [IntCounter; 5],
    pub duration: Histogram,
}

impl RouteMetrics {
    pub fn new(route: &str, service: &str) -> Self {
        let m = &*METRICS;
        RouteMetrics {
            by_class: CLASSES.map(|c| m.requests.with_label_values(&[route, service, c])),
            duration: m.request_duration.with_label_values(&[route]),
        }
    }
}

/// Handles for one service, resolved when the snapshot is built.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    pub fallback_sidecar_down: IntCounter,
    pub fallback_host: IntCounter,
    pub fallback_forward_proxy: IntCounter,
    pub fallback_connect: IntCounter,
    switches: [IntCounter; 3],
    pub upstream_duration: Histogram,
    pub connect_failures: IntCounter,
    pub timeouts: IntCounter,
    /// Answers busbar could not frame (`edge::framing`), refused or cut off.
    pub malformed: IntCounter,
    pub no_instance: IntCounter,
    pub retries: IntCounter,
    pub budget_exhausted: IntCounter,
    pub ejections: IntCounter,
}

impl ServiceMetrics {
    /// The switch counter for a new path.
    pub fn path_switch(&self, to: crate::fallback::path::Path) -> &IntCounter {
        use crate::fallback::path::Path;
        &self.switches[match to {
            Path::Sidecar => 0,
            Path::Direct => 1,
            Path::Out => 2,
        }]
    }

    pub fn new(service: &str) -> Self {
        let m = &*METRICS;
        ServiceMetrics {
            fallback_sidecar_down: m.fallback.with_label_values(&[service, "sidecar_down"]),
            fallback_host: m.fallback.with_label_values(&[service, "host"]),
            fallback_forward_proxy: m.fallback.with_label_values(&[service, "forward_proxy"]),
            fallback_connect: m.fallback.with_label_values(&[service, "connect"]),
            switches: ["sidecar", "direct", "out"]
                .map(|to| m.path_switches.with_label_values(&[service, to])),
            upstream_duration: m.upstream_duration.with_label_values(&[service]),
            connect_failures: m.connect_failures.with_label_values(&[service]),
            timeouts: m.upstream_errors.with_label_values(&[service, "timeout"]),
            malformed: m.upstream_errors.with_label_values(&[service, "malformed"]),
            no_instance: m
                .upstream_errors
                .with_label_values(&[service, "no_healthy_instance"]),
            retries: m.retries.with_label_values(&[service]),
            budget_exhausted: m.retry_budget_exhausted.with_label_values(&[service]),
            ejections: m.ejections.with_label_values(&[service]),
        }
    }
}

/// Admission handles for one route, resolved when the snapshot is built.
#[derive(Debug, Clone)]
pub struct AdmissionMetrics {
    pub admitted: IntCounter,
    pub queued: IntCounter,
    pub limited_user: IntCounter,
    pub limited_route: IntCounter,
    pub unauthorized: IntCounter,
    pub forbidden: IntCounter,
    pub queue_full: IntCounter,
    pub queue_timeout: IntCounter,
    /// The client closed or reset its connection (HTTP/1) or stream (HTTP/2) while waiting.
    pub abandoned_closed: IntCounter,
    /// The client sent bytes before its request was answered (a pipelined request).
    pub abandoned_protocol: IntCounter,
    pub queue_wait: Histogram,
}

impl AdmissionMetrics {
    pub fn new(route: &str, service: &str) -> Self {
        let m = &*METRICS;
        let c = |decision: &str, reason: &str| {
            m.admission.with_label_values(&[route, decision, reason])
        };
        AdmissionMetrics {
            admitted: c("admitted", ""),
            queued: c("queued", ""),
            limited_user: c("limited", "user"),
            limited_route: c("limited", "route"),
            unauthorized: c("rejected", "unauthorized"),
            forbidden: c("rejected", "forbidden"),
            queue_full: c("rejected", "queue_full"),
            queue_timeout: c("rejected", "queue_timeout"),
            abandoned_closed: c("abandoned", "client_closed"),
            abandoned_protocol: c("abandoned", "client_protocol"),
            queue_wait: m.queue_wait.with_label_values(&[service]),
        }
    }
}
