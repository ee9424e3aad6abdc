//! The validated configuration the rest of busbar reads.
//!
//! Owns: every configuration value after validation, with its defaults.
//! Must not: hold runtime state (health, counters) or serde types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

/// Default proxy worker threads: one, so a node's cost per request is easy to read;
/// raise it on machines with more cores than the load generator needs.
pub const DEFAULT_THREADS: usize = 1;
/// Default time SIGTERM leaves in-flight requests to finish before the process exits.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// Idle upstream connections kept per node, shared by all services (pingora's pool size).
pub const DEFAULT_UPSTREAM_KEEPALIVE_POOL: usize = 1024;
/// Admin listener: loopback only, so nothing off the host reaches it unless the operator says so.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9901";
/// Connect timeout to an upstream: Envoy's default. Not 1 s, Linux's initial SYN
/// retransmission timeout: a SYN an instance's full listen queue dropped is sent again
/// after 1 s (and 3 s), and a 1 s timeout gave up just as that retry would have
/// connected (issue 21: 504s in bursts). A dead host's instance is ejected by outlier
/// detection and health checks; a refused connect fails at once whatever this is.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-read timeout on an upstream connection.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for an upstream's response headers over all tries (Envoy's route timeout is 15 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an upgraded connection (WebSocket) or a `CONNECT` tunnel may carry no byte
/// either way before busbar closes it: HAProxy's `timeout tunnel` as it is commonly set
/// (1 h). nginx closes at `proxy_read_timeout` (60 s), which cuts quiet WebSockets whose
/// peers ping less often than that; an hour keeps them and still frees abandoned ones.
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Below this share of available instances a service balances over all of them (Envoy: 50%).
pub const DEFAULT_PANIC_THRESHOLD: u8 = 50;
/// Streams busbar opens at once on one HTTP/2 connection to an instance, when the
/// instance allows as many (its SETTINGS_MAX_CONCURRENT_STREAMS lowers it): RFC 9113
/// recommends servers allow at least 100, and 100 is what nginx, Envoy and tonic allow.
pub const DEFAULT_H2_MAX_STREAMS: u32 = 100;
/// Extra tries after the first (connect failures always, others only for idempotent requests).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// Retries allowed as a share of requests (linkerd and Envoy budgets use 20%).
pub const DEFAULT_RETRY_BUDGET: f64 = 0.2;
/// Retries always allowed per second whatever the traffic, so a quiet service can still fail over.
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
/// Health probe interval.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Health probe timeout.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Successive successful probes that make an unhealthy instance healthy.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
/// Successive failed probes that make a healthy instance unhealthy.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 2;
/// Consecutive 5xx or connect failures that eject an instance (Envoy: 5).
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// First ejection time; it grows with each ejection (Envoy: 30 s).
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// Longest ejection (Envoy: 300 s).
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
/// Never eject more than this share of a service's instances (Envoy: 10%; busbar services are
/// often small, and one of two instances must still be ejectable).
pub const DEFAULT_MAX_EJECTED_PERCENT: u8 = 50;
/// Request body limit when a route sets none.
pub const DEFAULT_MAX_BODY: u64 = 10 * 1024 * 1024;

/// A TLS handshake must be done within this (a client that connects and says nothing, or
/// stalls mid-handshake, holds a connection no longer); nginx's `ssl_handshake_timeout`
/// is 60 s, HAProxy's `timeout client` bounds it; 10 s is the head deadline's, as a
/// handshake is the same kind of wait.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head must arrive whole within this (slowloris), else 408.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection may sit idle this long between requests.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Each read of a request body and each write of a response to the client must make
/// progress within this (slow body, slow read).
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes per second a request body must average once `client_timeout` has passed since its
/// first byte (Apache mod_reqtimeout's default `MinRate=500`): a legitimate upload on the
/// slowest mobile link is far faster, a body trickled to hold a connection is not.
pub const DEFAULT_BODY_MIN_RATE: u64 = 500;
/// Longest request line, else 414 (nginx's large_client_header_buffers is 8 KiB).
pub const DEFAULT_MAX_REQUEST_LINE: usize = 8 * 1024;
/// Largest request head, else 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most request header lines, else 431 (pingora itself refuses more than 256 with 400).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Other busbar nodes a request may have passed (its `Via` lists them) before it is taken
/// for a forwarding loop (508). A real chain is an edge node, perhaps a regional one, and
/// the node in front of the service: 8 leaves room, and a loop through nodes that each
/// see the request once is still cut within 9 hops.
pub const DEFAULT_MAX_HOPS: u32 = 8;
/// Highest `max_hops` accepted.
pub const MAX_MAX_HOPS: u32 = 64;
/// Streams an HTTP/2 client may have open at once on one connection: RFC 9113 §6.5.2
/// recommends no less than 100, and nginx, HAProxy, Envoy's edge guidance and pingora
/// use 100–128. More concurrency is more connections, each with its own limits.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// An HTTP/2 stream's receive window: 1 MiB lets one upload run at ~1 GB/s over a 1 ms
/// round trip (the protocol's 64 KiB caps it at ~64 MB/s), and is what one stream can
/// make busbar buffer while its upstream is slow.
pub const DEFAULT_H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// An HTTP/2 connection's receive window over all its streams: 4 MiB, so a few uploads
/// run at full stream windows, while what one connection can make busbar hold stays
/// bounded whatever its stream count.
pub const DEFAULT_H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// How long an HTTP/2 client has to answer busbar's PING (with its GOAWAY, or every
/// `h2_keepalive_interval`) before the connection is closed: hyper's and grpc-go's
/// default keepalive timeout. A client that stopped answering (gone without a FIN, a
/// dead NAT entry) would otherwise hold the connection after its GOAWAY for ever: the
/// `h2` crate waits for that PING's answer before it closes.
pub const DEFAULT_H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Highest window HTTP/2 allows (RFC 9113 §6.9.1: 2^31 - 1).
pub const MAX_H2_WINDOW: u64 = (1 << 31) - 1;
/// Lowest window accepted: the protocol's initial 65,535 bytes.
pub const MIN_H2_WINDOW: u64 = 65_535;

/// Limits on what a client may send, and how slowly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub client_timeout: Duration,
    /// Bytes per second a request body must average after `client_timeout`; 0: no pace.
    pub body_min_rate: u64,
    pub max_request_line: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Other busbar nodes a request may have passed (see `via`); more is a loop: 508.
    pub max_hops: u32,
    /// HTTP/2 clients: most concurrent streams on one connection (SETTINGS).
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 clients: each stream's receive window, bytes.
    pub h2_stream_window: u32,
    /// HTTP/2 clients: each connection's receive window, bytes.
    pub h2_connection_window: u32,
    /// HTTP/2 clients: a PING this often on each connection (Envoy's
    /// `connection_keepalive.interval`); `None`: only with a GOAWAY (off by default, as
    /// in Envoy, hyper and grpc-go: streams are already bounded by `client_timeout` and
    /// the services' `read_timeout`, idle connections by `idle_timeout`).
    pub h2_keepalive_interval: Option<Duration>,
    /// HTTP/2 clients: how long a PING may go unanswered before the connection is closed
    /// (Envoy's `connection_keepalive.timeout`).
    pub h2_keepalive_timeout: Duration,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for reloads.
    pub source: PathBuf,
    /// The first 48 bits of the SHA-256 of the file's text (exact in an `f64`, so the
    /// `busbar_config_hash` gauge shows it whole): nodes running the same file agree.
    pub hash: u64,
    pub server: ServerSettings,
    pub listen: Listen,
    pub log: LogSettings,
    pub limits: Limits,
    pub registry: super::RegistryConfig,
    pub mesh: super::MeshConfig,
    /// JWT issuers and API keys that routes' identity lists use.
    pub auth: super::AuthConfig,
    /// `[cluster]`: the Redis that cluster-wide rate limits share.
    pub cluster: Option<super::ClusterConfig>,
    /// `[dns]`: how endpoints named by host are resolved.
    pub dns: super::DnsConfig,
    /// `[tracing]`: sampling of new traces and where busbar's spans are exported.
    pub tracing: super::TracingConfig,
    /// `[admin]`: who may read the admin API.
    pub admin: AdminSettings,
    pub services: Vec<ServiceConfig>,
    pub routes: Vec<RouteConfig>,
    /// Compiled protocol translations by route name (`[route.translate]`).
    pub translations: super::Translations,
    /// Gray-release splits by route name (`[route.split]`).
    pub splits: super::Splits,
    /// What the file allows but an operator must hear about at every load (logged when it
    /// is loaded, printed by `busbar check`): `insecure_skip_verify = true`.
    pub cautions: Vec<super::ConfigError>,
}

/// `[admin]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdminSettings {
    /// The admin API's reads of topology and config history (`/v1/routes`,
    /// `/v1/services`, `/v1/registry`, `GET /v1/releases`, `GET /v1/config/history`)
    /// answer without the admin token. Default false ([`DEFAULT_OPEN_READS`]).
    pub open_reads: bool,
}

/// Admin reads need the token by default: a listing of every service, instance address
/// and past configuration is a map for an attacker who reached the admin port (a
/// misplaced bind, a forwarded port, another tenant on the host).
pub const DEFAULT_OPEN_READS: bool = false;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub threads: usize,
    pub grace_period: Duration,
    /// The node's state folder: pid file, upgrade socket, registry snapshot, release
    /// overrides, and the lock that keeps a second node out (`runtime_dir::default_runtime_dir`
    /// when the file sets none).
    pub runtime_dir: PathBuf,
    pub upstream_keepalive_pool: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// HTTP/1.1 and h2c (prior knowledge) on the same port.
    pub http: Vec<SocketAddr>,
    pub tls: Vec<TlsListen>,
    pub admin: SocketAddr,
    /// `listen.metrics`: a listener that serves `GET /metrics` only, so Prometheus can
    /// scrape without reaching the admin API.
    pub metrics: Option<SocketAddr>,
    /// The `http` and `tls` addresses where a trusted peer speaks the PROXY protocol (v1
    /// or v2); on a TLS listener the header comes before the handshake.
    pub proxy_protocol: Vec<SocketAddr>,
    /// Peers (load balancers) whose PROXY headers, `X-Forwarded-For` and `Forwarded`
    /// busbar believes; from anyone else they say nothing about the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListen {
    pub addr: SocketAddr,
    /// The default certificate chain (PEM): for a client that sends no SNI name, or one
    /// no entry of `certs` has.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificates chosen by SNI name; a reload reads them (and the default) again.
    pub certs: Vec<SniCert>,
    /// A connection whose TLS handshake is not done within this is closed.
    pub handshake_timeout: Duration,
}

/// A certificate a TLS listener serves to the server names it lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Lower-case names, exact (`a.example.com`) or a wildcard for one label
    /// (`*.example.com`); empty: the certificate's own DNS names, read when it is loaded.
    pub names: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: String,
    pub access: AccessLogTarget,
    /// How the process log (stderr) is written.
    pub format: LogFormat,
    /// Query parameter names whose values the access log never writes (matched
    /// case-insensitively, as `token`, `Token` and `TOKEN` are the same secret to a reader).
    pub redact_query: Vec<String>,
}

/// The process log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Lines for a person; ANSI colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object a line, for a log shipper.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stdout,
    File(PathBuf),
}

/// What a service's instances speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/1.1 over TLS (`[service.tls]`; busbar offers ALPN `http/1.1`).
    Https,
    /// HTTP/2 in cleartext with prior knowledge; registered instances that say
    /// `"tls": true` are reached as [`Protocol::H2`] ones are.
    H2c,
    /// HTTP/2 over TLS (`[service.tls]`; busbar offers ALPN `h2` only).
    H2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalancePolicy {
    RoundRobin,
    Weighted,
    P2c,
    Sticky,
}

impl Protocol {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Https => "https",
            Protocol::H2c => "h2c",
            Protocol::H2 => "h2",
        }
    }

    /// HTTP/2 (`h2c` or `h2`): reached through `drivers::h2::pool`.
    pub fn is_h2(self) -> bool {
        matches!(self, Protocol::H2c | Protocol::H2)
    }

    /// Every instance is reached over TLS (`https`, `h2`).
    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::H2)
    }
}

impl BalancePolicy {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            BalancePolicy::RoundRobin => "round_robin",
            BalancePolicy::Weighted => "weighted",
            BalancePolicy::P2c => "p2c",
            BalancePolicy::Sticky => "sticky",
        }
    }
}

/// What a sticky service hashes to keep a caller on one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(String),
    ClientIp,
    Path,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// The address of an endpoint written `ip:port`; `None` for one named by host.
    pub addr: Option<SocketAddr>,
    /// An endpoint written `host:port`: every address the name resolves to is an
    /// instance, resolved again on its TTL (`registry::dns`).
    pub dns: Option<super::DnsName>,
    pub weight: u32,
    /// The version it runs (gray release); registered instances say theirs when they register.
    pub version: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    /// For instances registered with a sidecar: the path tried first.
    pub prefer: super::PathPreference,
    /// A recovered preferred path must pass probes this long before traffic returns to it.
    pub hold_down: Duration,
    /// Takes registrations: registered instances join `endpoints`.
    pub registration: bool,
    pub protocol: Protocol,
    pub balance: BalancePolicy,
    pub hash_key: HashKey,
    pub endpoints: Vec<EndpointConfig>,
    /// `discovery = { dns_srv = "..." }`: instances from that SRV name's records, the
    /// lowest priority first (the others fallback), weighted by the records' weights.
    pub dns_srv: Option<std::sync::Arc<str>>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub timeout: Duration,
    /// An upgraded connection or a `CONNECT` tunnel to the service with no byte either
    /// way for this long is closed (`tunnel_idle_timeout`).
    pub tunnel_idle_timeout: Duration,
    /// Percent of available instances below which the service balances over all of them.
    pub panic_threshold: u8,
    pub retry: RetryPolicy,
    pub health: Option<HealthCheck>,
    pub outlier: OutlierPolicy,
    /// Requests in flight to the service at most; beyond, they wait in per-user fair queues.
    pub max_in_flight: Option<u32>,
    /// How instances reached over TLS are reached: every instance of an `https` service,
    /// and the registered instances of an `http1` one that say `"tls": true`. `None` for
    /// a service none of whose instances can speak TLS.
    pub tls: Option<std::sync::Arc<super::UpstreamTls>>,
    /// `h2_max_streams`: streams busbar opens at once on one HTTP/2 connection to an
    /// instance (`h2c`, `h2`), at most; the instance's own limit may lower it.
    pub h2_max_streams: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub budget: f64,
    pub min_retries_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    Http { path: String },
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: ProbeKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u8,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            max_ejected_percent: DEFAULT_MAX_EJECTED_PERCENT,
        }
    }
}

/// How a route matches the request host (the `Host` header or `:authority`, port removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Lower-case host name.
    Exact(String),
    /// `*.example.com` is stored as `.example.com`: matches `a.example.com`, not `example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
}

/// What a matched route does to the path before it goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    None,
    /// Replace the matched prefix with this value (`strip_prefix = true` is `"/"`).
    Prefix(String),
}

#[derive(Debug, Clone, Default)]
pub struct HeaderEdit {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdit {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub hosts: Vec<HostMatch>,
    pub path: PathMatch,
    pub methods: Vec<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub service: String,
    pub rewrite: Rewrite,
    pub timeout: Option<Duration>,
    pub max_body: u64,
    pub request_headers: HeaderEdit,
    pub response_headers: HeaderEdit,
    /// ACL, identity, rate limit and queue policy.
    pub admission: super::RouteAdmission,
}
