//! Every Prometheus metric busbar exports, declared once.
//!
//! Owns: the registry, metric names and label sets, and pre-resolved handles
//! ([`RouteMetrics`], [`ServiceMetrics`]) so the request path never formats a label
//! (`busbar_requests_total`'s, by class and method, are resolved on first use:
//! [`RequestCounters`]);
//! the process collector and build info; removing the series of routes and services a
//! reload took away ([`forget_removed`]).
//! Must not: carry user ids in labels.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex, OnceLock};

use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The `route` label of requests no route matched (`""` reads as "no label" in PromQL).
pub const NO_ROUTE: &str = "_no_route";

/// The gauges of the `[cluster]` Redis, exported only while `[cluster]` is configured.
const REDIS_FAMILIES: [&str; 3] = [
    "busbar_ratelimit_redis_up",
    "busbar_ratelimit_redis_shards_down",
    "busbar_cluster_live_nodes",
];

/// A labelled family whose series a reload may remove.
trait Forget: Send + Sync {
    fn forget(&self, labels: &HashMap<&str, &str>);
}

impl<T: MetricVecBuilder> Forget for MetricVec<T> {
    fn forget(&self, labels: &HashMap<&str, &str>) {
        // Absent already (a concurrent removal) is the wanted outcome.
        let _ = self.remove(labels);
    }
}

/// The registry while the metrics are declared, with every labelled family by name.
struct Declare {
    registry: Registry,
    labelled: Vec<(&'static str, Box<dyn Forget>)>,
}

/// Latency buckets in seconds: 0.5 ms to 30 s, dense where a proxy hop lives.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    /// Every labelled family by name, for [`forget_removed`].
    labelled: Vec<(&'static str, Box<dyn Forget>)>,
    /// Whether the running config has `[cluster]` (see [`REDIS_FAMILIES`]).
    redis_configured: AtomicBool,
    /// `busbar_build_info{version,commit}`, always 1.
    pub build_info: IntGaugeVec,
    pub config_reload_time: Gauge,
    pub config_hash: Gauge,
    /// `busbar_requests_total{route="_no_route"}` by status class and method.
    pub no_route: RequestCounters,
    pub requests: IntCounterVec,
    pub request_bytes: IntCounterVec,
    pub response_bytes: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub connect_failures: IntCounterVec,
    pub upstream_connections: IntCounterVec,
    pub pool_idle: IntGaugeVec,
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
    /// Spans dropped on the request path because the export queue was full (`otel`).
    pub trace_spans_dropped: IntCounter,
    /// Spans a collector accepted, and spans in exports that failed (sent, or not).
    pub trace_spans_exported: IntCounter,
    pub trace_spans_failed: IntCounter,
    /// Times the allocator gave back all it held freed at once, a spike of client
    /// connections being over (`base::memory::AfterSpike`).
    pub memory_released_after_spike: IntCounter,
    pub edge_refusals: IntCounterVec,
    pub self_preservation: IntGauge,
    pub registrations: IntCounterVec,
    pub registrations_refused: IntCounterVec,
    pub registry_degraded: IntGauge,
    pub dns_failures: IntCounterVec,
    pub version_requests: IntCounterVec,
    pub release_fallback: IntCounterVec,
    pub release_changes: IntCounterVec,
}

impl Declare {
    /// Registers a labelled family and remembers it by name.
    fn labelled<T: MetricVecBuilder + 'static>(
        &mut self,
        name: &'static str,
        v: MetricVec<T>,
    ) -> MetricVec<T> {
        self.registry
            .register(Box::new(v.clone()))
            .expect("metric registered once");
        self.labelled.push((name, Box::new(v.clone())));
        v
    }
}

fn counter(r: &mut Declare, name: &'static str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.labelled(name, c)
}

fn gauge(r: &mut Declare, name: &'static str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.labelled(name, g)
}

fn histogram(r: &mut Declare, name: &'static str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.labelled(name, h)
}

fn int_counter(r: &mut Declare, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn int_gauge(r: &mut Declare, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn float_gauge(r: &mut Declare, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric");
    r.registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut r = Declare {
        registry: Registry::new(),
        labelled: Vec::new(),
    };
    // CPU seconds, resident and virtual memory, open and max fds, threads, start time.
    #[cfg(target_os = "linux")]
    r.registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("metric registered once");
    let build_info = gauge(
        &mut r,
        "busbar_build_info",
        "Always 1; the labels say which busbar runs (its version and the commit it was built from).",
        &["version", "commit"],
    );
    build_info
        .with_label_values(&[crate::version::VERSION, crate::version::COMMIT])
        .set(1);
    let requests = counter(
        &mut r,
        "busbar_requests_total",
        "Requests answered, by route, service, status class, reason (empty for an upstream's answer, else busbar's own reason code for answering itself: a refusal at the front door or by admission, a failure) and method (GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH, or other).",
        &["route", "service", "class", "reason", "method"],
    );
    let in_flight = IntGauge::new(
        "busbar_in_flight_requests",
        "Requests being handled right now.",
    )
    .expect("valid metric");
    r.registry
        .register(Box::new(in_flight.clone()))
        .expect("metric registered once");
    let connections = IntGauge::new(
        "busbar_downstream_connections",
        "Client connections open on the service listeners.",
    )
    .expect("valid metric");
    r.registry
        .register(Box::new(connections.clone()))
        .expect("metric registered once");
    Metrics {
        no_route: RequestCounters::new(NO_ROUTE, ""),
        requests,
        request_bytes: counter(
            &mut r,
            "busbar_request_body_bytes_total",
            "Request body bytes received from clients, by route.",
            &["route"],
        ),
        response_bytes: counter(
            &mut r,
            "busbar_response_body_bytes_total",
            "Response body bytes sent to clients, by route.",
            &["route"],
        ),
        build_info,
        config_reload_time: float_gauge(
            &mut r,
            "busbar_config_last_reload_success_timestamp_seconds",
            "When the running configuration was loaded (at start or by the last successful reload), in seconds since the Unix epoch.",
        ),
        config_hash: float_gauge(
            &mut r,
            "busbar_config_hash",
            "The first 48 bits of the SHA-256 of the running configuration file's text: nodes running the same file show the same value.",
        ),
        redis_configured: AtomicBool::new(false),
        request_duration: histogram(
            &mut r,
            "busbar_request_duration_seconds",
            "Time from request start to the last byte of the response, by route.",
            &["route"],
        ),
        upstream_duration: histogram(
            &mut r,
            "busbar_upstream_duration_seconds",
            "Time from sending to the upstream to its response headers, by service.",
            &["service"],
        ),
        connect_failures: counter(
            &mut r,
            "busbar_upstream_connect_failures_total",
            "Failed connection attempts to upstream instances.",
            &["service"],
        ),
        upstream_connections: counter(
            &mut r,
            "busbar_upstream_connections_total",
            "Upstream connections that tries used, by service and where they came from: the idle pool (from=\"pool\") or a new connection (from=\"new\").",
            &["service", "from"],
        ),
        pool_idle: gauge(
            &mut r,
            "busbar_upstream_idle_connections",
            "Idle upstream connections busbar's own HTTP/1 path keeps pooled for reuse, by service (sampled each second; pingora's own pool, which h2c and bodied requests use, is not counted).",
            &["service"],
        ),
        upstream_errors: counter(
            &mut r,
            "busbar_upstream_errors_total",
            "Requests that failed at the upstream, by cause.",
            &["service", "cause"],
        ),
        retries: counter(
            &mut r,
            "busbar_upstream_retries_total",
            "Retries sent to another (or the same) instance.",
            &["service"],
        ),
        retry_budget_exhausted: counter(
            &mut r,
            "busbar_retry_budget_exhausted_total",
            "Retries not made because the service's retry budget was spent.",
            &["service"],
        ),
        ejections: counter(
            &mut r,
            "busbar_outlier_ejections_total",
            "Instances ejected by passive outlier detection.",
            &["service"],
        ),
        instances: gauge(
            &mut r,
            "busbar_instances",
            "Instances by health state.",
            &["service", "state"],
        ),
        panic_mode: gauge(
            &mut r,
            "busbar_panic_mode",
            "1 when a service balances over all instances because too few are available.",
            &["service"],
        ),
        reloads: counter(
            &mut r,
            "busbar_config_reloads_total",
            "Configuration reloads by result.",
            &["result"],
        ),
        in_flight,
        connections,
        admission: counter(
            &mut r,
            "busbar_admission_decisions_total",
            "Admission decisions by route: admitted, queued (admitted after a wait), limited, rejected, or abandoned (the client left while waiting), with the reason.",
            &["route", "decision", "reason"],
        ),
        queue_wait: histogram(
            &mut r,
            "busbar_queue_wait_seconds",
            "Time requests waited for a service slot, by service (requests that waited only).",
            &["service"],
        ),
        service_in_flight: gauge(
            &mut r,
            "busbar_service_in_flight",
            "Requests holding a slot of a service with max_in_flight (sampled each second).",
            &["service"],
        ),
        queue_waiting: gauge(
            &mut r,
            "busbar_queue_waiting",
            "Requests waiting for a slot of a service with max_in_flight (sampled each second).",
            &["service"],
        ),
        redis_fallback: counter(
            &mut r,
            "busbar_ratelimit_redis_fallback_total",
            "Cluster-wide rate-limit decisions made from the node's share of the limit because Redis was unreachable or slow, by route.",
            &["route"],
        ),
        redis_up: int_gauge(
            &mut r,
            "busbar_ratelimit_redis_up",
            "1 while this node reaches every shard of the Redis of [cluster]; 0 while the keys of one or more shards are limited on this node's share.",
        ),
        redis_shards_down: int_gauge(
            &mut r,
            "busbar_ratelimit_redis_shards_down",
            "Shards of the [cluster] Redis (masters with their slots; 1 for a single Redis) whose keys this node limits on its own share.",
        ),
        cluster_nodes: int_gauge(
            &mut r,
            "busbar_cluster_live_nodes",
            "Live busbar nodes in the [cluster] Redis as last seen (the divisor of the fallback share).",
        ),
        fallback: counter(
            &mut r,
            "busbar_fallback_requests_total",
            "Requests that took a mesh fallback path, by service and reason (sidecar_down, host, forward_proxy, connect).",
            &["service", "reason"],
        ),
        path_switches: counter(
            &mut r,
            "busbar_instance_path_switches_total",
            "Instances switching between sidecar and direct paths, by service and new path.",
            &["service", "to"],
        ),
        edge_refusals: counter(
            &mut r,
            "busbar_edge_refusals_total",
            "Requests refused at the front door (bad or slow heads), cut off for a slow body or a stalled response write, or TLS connections whose handshake failed or timed out, by reason.",
            &["reason"],
        ),
        connect_refused: int_counter(
            &mut r,
            "busbar_connect_refused_total",
            "CONNECT requests refused because the target is not a configured service.",
        ),
        trace_spans_dropped: int_counter(
            &mut r,
            "busbar_trace_spans_dropped_total",
            "Sampled spans dropped because the export queue was full (the collector is slow or down).",
        ),
        trace_spans_exported: int_counter(
            &mut r,
            "busbar_trace_spans_exported_total",
            "Spans the OTLP collector accepted.",
        ),
        trace_spans_failed: int_counter(
            &mut r,
            "busbar_trace_spans_export_failed_total",
            "Spans lost in exports that failed: no connection, a timeout, or a refusal by the collector.",
        ),
        memory_released_after_spike: int_counter(
            &mut r,
            "busbar_memory_released_after_spike_total",
            "Times busbar made the allocator give back to the OS all the memory it held freed, because the open client connections had dropped to half their peak or less (by at least 64) and stopped dropping.",
        ),
        registry_expired: int_counter(
            &mut r,
            "busbar_registry_expired_total",
            "Registered instances removed because their TTL ran out.",
        ),
        self_preservation: int_gauge(
            &mut r,
            "busbar_registry_self_preservation",
            "1 while renewals are below the threshold and expiry is suspended.",
        ),
        registrations: counter(
            &mut r,
            "busbar_registry_requests_total",
            "Registration API calls by operation and result.",
            &["op", "result"],
        ),
        registrations_refused: counter(
            &mut r,
            "busbar_registrations_refused_total",
            "Instances learned from etcd or the registry snapshot file that this node does not route, because their address (or sidecar) is one the address policy refuses here; counted once per instance and address, by source and reason.",
            &["source", "reason"],
        ),
        dns_failures: counter(
            &mut r,
            "busbar_dns_failures_total",
            "Failed lookups of endpoint names (timeout, SERVFAIL, NXDOMAIN, no records) by service and reason; the last good answer keeps routing.",
            &["service", "reason"],
        ),
        registry_degraded: int_gauge(
            &mut r,
            "busbar_registry_degraded",
            "1 while the registry store (etcd) is unreachable and routing runs from memory.",
        ),
        version_requests: counter(
            &mut r,
            "busbar_version_requests_total",
            "Responses from upstream instances by service, instance version and status class (judge a canary by these).",
            &["service", "version", "class"],
        ),
        release_fallback: counter(
            &mut r,
            "busbar_release_fallback_total",
            "Requests a split sent to the stable version (or, last resort, any) because their version had no available instance, by route.",
            &["route"],
        ),
        release_changes: counter(
            &mut r,
            "busbar_release_changes_total",
            "Release overrides applied on this node, by source (release, rollback, cluster).",
            &["source"],
        ),
        registry: r.registry,
        labelled: r.labelled,
    }
});

/// Renders every metric in the Prometheus text format.
pub fn render() -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 1024);
    let mut families = METRICS.registry.gather();
    if !METRICS.redis_configured.load(Relaxed) {
        families.retain(|f| !REDIS_FAMILIES.contains(&f.name()));
    }
    // Encoding into a Vec cannot fail on I/O; a bad family is skipped by the encoder's error.
    let _ = TextEncoder::new().encode(&families, &mut out);
    out
}

/// Says whether the running config has `[cluster]`: the Redis gauges are exported only
/// then (a 0 would read as "Redis down" where there is none).
pub fn set_redis_configured(configured: bool) {
    METRICS.redis_configured.store(configured, Relaxed);
}

/// Removes the series of routes and services a reload took away, so `/metrics` shows
/// only what runs. `routes`: every route the new snapshot has (mesh routes included)
/// with its service; `services`: every service. A route kept with another service loses
/// its series of the old service. In-flight requests of the old snapshot may still count
/// on the removed handles; those counts are lost with the series.
pub fn forget_removed(routes: &HashMap<&str, &str>, services: &HashSet<&str>) {
    let m = &*METRICS;
    for family in m.registry.gather() {
        let Some((_, vec)) = m.labelled.iter().find(|(n, _)| *n == family.name()) else {
            continue;
        };
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if !still_runs(&labels, routes, services) {
                vec.forget(&labels);
            }
        }
    }
}

/// Whether a series' route and service (where it has those labels) still run.
fn still_runs(
    labels: &HashMap<&str, &str>,
    routes: &HashMap<&str, &str>,
    services: &HashSet<&str>,
) -> bool {
    let service = labels.get("service").copied();
    match labels.get("route").copied() {
        Some(NO_ROUTE) => true,
        Some(route) => match (routes.get(route), service) {
            (None, _) => false,
            (Some(now), Some(was)) => *now == was,
            (Some(_), None) => true,
        },
        None => service.is_none_or(|s| s.is_empty() || services.contains(s)),
    }
}

/// Counts an answer busbar gave itself in `busbar_requests_total`, with its `reason`
/// (one of busbar's own codes: a bounded set). Not pre-resolved: these are the rare path.
pub fn count_answer(route: &str, service: &str, status: u16, reason: &'static str, method: &str) {
    METRICS
        .requests
        .with_label_values(&[
            route,
            service,
            CLASSES[class_index(status)],
            reason,
            METHODS[method_index(method)],
        ])
        .inc();
}

/// [`count_answer`] for a refusal before any route was matched; `method` as the client
/// sent it, `""` when its head had none busbar could read (counted as `other`).
pub fn count_refusal(status: u16, reason: &'static str, method: &str) {
    count_answer(NO_ROUTE, "", status, reason, method);
}

/// Status class index: 1xx → 0 … 5xx → 4.
#[inline]
pub fn class_index(status: u16) -> usize {
    ((status / 100).clamp(1, 5) - 1) as usize
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `method` label's values: the standard methods, and `other` for any other (a
/// client may send any token as a method; a label per token would be unbounded).
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other",
];

/// Index into [`METHODS`]: a standard method's, or `other`'s.
#[inline]
pub fn method_index(method: &str) -> usize {
    METHODS[..METHODS.len() - 1]
        .iter()
        .position(|m| *m == method)
        .unwrap_or(METHODS.len() - 1)
}

/// Stands in for a series of a route a reload removed: what a request still running on
/// the old snapshot counts is lost, as the series is.
static DETACHED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new("busbar_detached_total", "never exported").expect("valid metric")
});

/// `busbar_requests_total{reason=""}` (upstream answers) of one route, or of unmatched
/// requests, by status class and method. 50 series a route if they were all resolved
/// when the snapshot is built, most never used: each is resolved the first time it
/// counts, after which a count costs what a pre-resolved handle's does (one load, one
/// add), with no label formatting or hashing.
#[derive(Debug)]
pub struct RequestCounters {
    route: Box<str>,
    service: Box<str>,
    /// By [`class_index`], then [`method_index`].
    slots: [[OnceLock<IntCounter>; METHODS.len()]; CLASSES.len()],
    /// Set by [`RequestCounters::retire`]; resolving holds the lock, so a series is either
    /// resolved before its route is retired (and then removed with it) or never.
    retired: Mutex<bool>,
}

impl RequestCounters {
    pub fn new(route: &str, service: &str) -> Self {
        RequestCounters {
            route: route.into(),
            service: service.into(),
            slots: [const { [const { OnceLock::new() }; METHODS.len()] }; CLASSES.len()],
            retired: Mutex::new(false),
        }
    }

    /// Counts an upstream's answer with `status` to a request with `method`.
    #[inline]
    pub fn inc(&self, status: u16, method: &str) {
        let (class, method) = (class_index(status), method_index(method));
        // Both indices are in range by construction (clamped class, bounded method).
        if let Some(slot) = self.slots.get(class).and_then(|s| s.get(method)) {
            slot.get_or_init(|| self.resolve(class, method)).inc();
        }
    }

    /// The series for a class and method: the first count of each, once per process.
    #[cold]
    fn resolve(&self, class: usize, method: usize) -> IntCounter {
        let retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        if *retired {
            return DETACHED.clone();
        }
        METRICS.requests.with_label_values(&[
            &self.route,
            &self.service,
            CLASSES[class],
            "",
            METHODS[method],
        ])
    }

    /// The route (with this service) is gone from the running snapshot: requests still
    /// running on the old one must not bring its series back once [`forget_removed`]
    /// has removed them. Call before it.
    pub fn retire(&self) {
        *self.retired.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }
}

/// Handles for one route, resolved when the snapshot is built (the request counters on
/// first use).
#[derive(Debug)]
pub struct RouteMetrics {
    /// `busbar_requests_total` for upstream answers, by class and method.
    pub requests: RequestCounters,
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
    pub duration: Histogram,
}

impl RouteMetrics {
    pub fn new(route: &str, service: &str) -> Self {
        let m = &*METRICS;
        RouteMetrics {
            requests: RequestCounters::new(route, service),
            request_bytes: m.request_bytes.with_label_values(&[route]),
            response_bytes: m.response_bytes.with_label_values(&[route]),
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
    /// A try's connection from the idle pool, or a new one (the pool's hit ratio).
    pub connection_pooled: IntCounter,
    pub connection_new: IntCounter,
    /// `busbar_upstream_idle_connections` (`edge::pool::sample`).
    pub pool_idle: IntGauge,
    pub timeouts: IntCounter,
    /// Answers busbar could not frame (`drivers::h1::framing`), refused or cut off.
    pub malformed: IntCounter,
    /// Instances whose TLS certificate failed verification (also connect failures).
    pub certificate_failures: IntCounter,
    pub no_instance: IntCounter,
    pub retries: IntCounter,
    pub budget_exhausted: IntCounter,
    pub ejections: IntCounter,
    /// `busbar_instances` by state: healthy, unhealthy, ejected. Resolved here so a
    /// health round still running on a snapshot a reload replaced cannot bring back the
    /// series of a service the reload removed.
    pub instances: [IntGauge; 3],
    pub panic_mode: IntGauge,
}

/// The `to` label of `busbar_instance_path_switches_total`, in `switches` order.
const PATH_LABELS: [&str; 3] = ["sidecar", "direct", "out"];

impl ServiceMetrics {
    /// The switch counter for a new path, by its label (`model::sidecar::Path::as_str`:
    /// "sidecar", "direct", "out"; anything else counts as "out"). Called only when an
    /// instance's path changes, so the lookup by name costs nothing that matters.
    pub fn path_switch(&self, to: &str) -> &IntCounter {
        let i = PATH_LABELS.iter().position(|p| *p == to).unwrap_or(2);
        &self.switches[i]
    }

    pub fn new(service: &str) -> Self {
        let m = &*METRICS;
        ServiceMetrics {
            fallback_sidecar_down: m.fallback.with_label_values(&[service, "sidecar_down"]),
            fallback_host: m.fallback.with_label_values(&[service, "host"]),
            fallback_forward_proxy: m.fallback.with_label_values(&[service, "forward_proxy"]),
            fallback_connect: m.fallback.with_label_values(&[service, "connect"]),
            switches: PATH_LABELS.map(|to| m.path_switches.with_label_values(&[service, to])),
            upstream_duration: m.upstream_duration.with_label_values(&[service]),
            connect_failures: m.connect_failures.with_label_values(&[service]),
            connection_pooled: m.upstream_connections.with_label_values(&[service, "pool"]),
            connection_new: m.upstream_connections.with_label_values(&[service, "new"]),
            pool_idle: m.pool_idle.with_label_values(&[service]),
            timeouts: m.upstream_errors.with_label_values(&[service, "timeout"]),
            malformed: m.upstream_errors.with_label_values(&[service, "malformed"]),
            certificate_failures: m
                .upstream_errors
                .with_label_values(&[service, "certificate"]),
            no_instance: m
                .upstream_errors
                .with_label_values(&[service, "no_healthy_instance"]),
            retries: m.retries.with_label_values(&[service]),
            budget_exhausted: m.retry_budget_exhausted.with_label_values(&[service]),
            ejections: m.ejections.with_label_values(&[service]),
            instances: ["healthy", "unhealthy", "ejected"]
                .map(|state| m.instances.with_label_values(&[service, state])),
            panic_mode: m.panic_mode.with_label_values(&[service]),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_removed_routes_and_services_do_not_run() {
        let routes: HashMap<&str, &str> = [("r", "s"), ("mesh:s", "s")].into();
        let services: HashSet<&str> = ["s"].into();
        let runs = |labels: &[(&str, &str)]| {
            still_runs(&labels.iter().copied().collect(), &routes, &services)
        };
        assert!(runs(&[("route", "r"), ("service", "s"), ("class", "2xx")]));
        assert!(runs(&[("route", "mesh:s"), ("decision", "admitted")]));
        assert!(runs(&[("route", NO_ROUTE), ("service", "")]));
        assert!(runs(&[("service", "s"), ("state", "healthy")]));
        assert!(runs(&[("result", "ok")]));
        assert!(runs(&[("version", "0.1.0"), ("commit", "abc")]));
        // Gone, or the route now with another service.
        assert!(!runs(&[("route", "gone"), ("service", "s")]));
        assert!(!runs(&[("route", "gone"), ("decision", "admitted")]));
        assert!(!runs(&[("route", "r"), ("service", "old")]));
        assert!(!runs(&[("service", "old"), ("cause", "timeout")]));
    }

    /// The `busbar_requests_total` series of `route` in a scrape, as "class method value".
    fn series_of(route: &str) -> Vec<String> {
        let text = String::from_utf8(render()).unwrap();
        let want = format!("route=\"{route}\"");
        text.lines()
            .filter(|l| l.starts_with("busbar_requests_total{") && l.contains(&want))
            .map(|l| {
                let label = |k: &str| {
                    l.split(&format!("{k}=\""))
                        .nth(1)
                        .unwrap()
                        .split('"')
                        .next()
                        .unwrap()
                        .to_string()
                };
                let value = l.rsplit(' ').next().unwrap();
                format!("{} {} {value}", label("class"), label("method"))
            })
            .collect()
    }

    #[test]
    fn request_series_appear_when_first_counted_and_not_after_retirement() {
        let c = RequestCounters::new("unit-lazy", "s");
        assert!(series_of("unit-lazy").is_empty());
        c.inc(200, "GET");
        c.inc(204, "GET");
        c.inc(503, "FOO");
        let mut got = series_of("unit-lazy");
        got.sort();
        assert_eq!(got, ["2xx GET 2", "5xx other 1"]);
        // Retired, then removed as a reload does: a late request does not bring it back.
        c.retire();
        for (class, method) in [("2xx", "GET"), ("5xx", "other")] {
            METRICS
                .requests
                .remove_label_values(&["unit-lazy", "s", class, "", method])
                .unwrap();
        }
        c.inc(200, "POST");
        c.inc(200, "GET");
        assert!(series_of("unit-lazy").is_empty());
    }

    #[test]
    fn methods_are_bounded() {
        assert_eq!(METHODS[method_index("GET")], "GET");
        assert_eq!(METHODS[method_index("PATCH")], "PATCH");
        for m in ["FOO", "get", "", "PROPFIND", "GETX"] {
            assert_eq!(METHODS[method_index(m)], "other", "{m}");
        }
    }
}
