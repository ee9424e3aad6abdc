//! The TOML file as written by a user: serde types only.
//!
//! Owns: the shape of `busbar.toml` and the spans used for error messages.
//! Must not: validate or interpret values (that is `model.rs`); nothing outside
//! `config/` sees these types.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    pub listen: ListenFile,
    #[serde(default)]
    pub log: LogFile,
    #[serde(default)]
    pub limits: LimitsFile,
    pub registry: Option<super::registry::RegistryFile>,
    pub mesh: Option<super::mesh::MeshFile>,
    pub auth: Option<super::auth::AuthFile>,
    pub cluster: Option<super::cluster::ClusterFile>,
    /// `[dns]`: name servers and refresh bounds for endpoints named by host.
    pub dns: Option<super::dns::DnsFile>,
    /// `[tracing]`: sampling of new traces and OTLP export of busbar's spans.
    pub tracing: Option<super::tracing::TracingFile>,
    /// `[admin]`: who may read the admin API.
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceFile>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteFile>,
}

/// Only `[listen] admin`, everything else ignored: what `busbar reload` and `busbar
/// status` need to find a node (`super::admin_address`).
#[derive(Debug, Deserialize)]
pub struct AdminOnlyFile {
    pub listen: Option<AdminOnlyListen>,
}

#[derive(Debug, Deserialize)]
pub struct AdminOnlyListen {
    pub admin: Option<Spanned<String>>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// The admin API's topology and history reads without the admin token.
    pub open_reads: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub threads: Option<Spanned<i64>>,
    pub grace_period: Option<Spanned<String>>,
    pub runtime_dir: Option<Spanned<String>>,
    pub upstream_keepalive_pool: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    #[serde(default)]
    pub http: Vec<Spanned<HttpListenFile>>,
    #[serde(default)]
    pub tls: Vec<TlsListenFile>,
    pub admin: Option<Spanned<String>>,
    /// A listener for `GET /metrics` alone (off when unset).
    pub metrics: Option<Spanned<String>>,
    /// Load balancers whose PROXY headers and forwarding headers busbar believes.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
}

/// One `listen.http` entry: an address, or `{ addr, proxy_protocol }`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "an address (\"0.0.0.0:8080\") or { addr = \"0.0.0.0:8080\", proxy_protocol = true } (keys: addr, proxy_protocol)"
)]
pub enum HttpListenFile {
    Addr(String),
    Table(HttpListenTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpListenTable {
    pub addr: String,
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenFile {
    pub addr: Spanned<String>,
    /// The default certificate: for no SNI, and for a name no `certs` entry has.
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub proxy_protocol: Option<Spanned<bool>>,
    /// More certificates, chosen by the SNI name the client sends.
    #[serde(default)]
    pub certs: Vec<SniCertFile>,
    /// How long a client may take to complete its TLS handshake.
    pub handshake_timeout: Option<Spanned<String>>,
}

/// One `listen.tls.certs` entry: `{ cert, key, names }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertFile {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    /// Server names (`a.example.com`, `*.example.com`); the certificate's DNS names
    /// (subjectAltName) when absent.
    pub names: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    pub level: Option<Spanned<String>>,
    pub access: Option<Spanned<String>>,
    /// The process log's format on stderr: `text` (the default) or `json`.
    pub format: Option<Spanned<String>>,
    /// Query parameters whose values the access log writes as `REDACTED`.
    pub redact_query: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_body: Option<Spanned<String>>,
    pub header_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub client_timeout: Option<Spanned<String>>,
    pub body_min_rate: Option<Spanned<String>>,
    pub max_request_line: Option<Spanned<String>>,
    pub max_header_bytes: Option<Spanned<String>>,
    pub max_headers: Option<Spanned<i64>>,
    /// Busbar nodes a request may have passed (by `Via`) before this one.
    pub max_hops: Option<Spanned<i64>>,
    /// HTTP/2: most streams a client may have open on one connection.
    pub h2_max_concurrent_streams: Option<Spanned<i64>>,
    /// HTTP/2: the receive window of each stream (a size).
    pub h2_stream_window: Option<Spanned<String>>,
    /// HTTP/2: the receive window of each connection, over all its streams (a size).
    pub h2_connection_window: Option<Spanned<String>>,
    /// HTTP/2: how often busbar PINGs each client connection (a duration); absent: never,
    /// except with each GOAWAY.
    pub h2_keepalive_interval: Option<Spanned<String>>,
    /// HTTP/2: how long a client has to answer busbar's PING before its connection is
    /// closed (a duration).
    pub h2_keepalive_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    pub name: Spanned<String>,
    /// Takes registrations through the registration API (then `endpoints` may be empty).
    pub registration: Option<Spanned<bool>>,
    pub protocol: Option<Spanned<String>>,
    pub balance: Option<Spanned<String>>,
    pub hash_key: Option<Spanned<String>>,
    pub endpoints: Option<Spanned<Vec<EndpointFile>>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub read_timeout: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    /// How long an upgraded connection (WebSocket) or a `CONNECT` tunnel may stay quiet
    /// both ways before it is closed (HAProxy's `timeout tunnel`).
    pub tunnel_idle_timeout: Option<Spanned<String>>,
    pub panic_threshold: Option<Spanned<i64>>,
    pub retry: Option<RetryFile>,
    pub health: Option<HealthFile>,
    pub outlier: Option<OutlierFile>,
    pub max_in_flight: Option<Spanned<i64>>,
    /// Mesh fallback: which path to an instance with a sidecar comes first.
    pub prefer: Option<Spanned<String>>,
    /// How long a recovered preferred path must stay healthy before traffic returns to it.
    pub hold_down: Option<Spanned<String>>,
    /// Instances from DNS service discovery: `{ dns_srv = "_http._tcp.orders.internal" }`.
    pub discovery: Option<DiscoveryFile>,
    /// `[service.tls]`: how instances reached over TLS are verified and what busbar shows them.
    pub tls: Option<Spanned<UpstreamTlsFile>>,
    /// Streams busbar opens at once on one HTTP/2 connection to an instance (`h2c`, `h2`).
    pub h2_max_streams: Option<Spanned<i64>>,
}

/// `[service.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    /// SNI and the name the instance's certificate must carry.
    pub server_name: Option<Spanned<String>>,
    /// PEM CA certificates to verify instances with instead of the system's.
    pub ca_file: Option<Spanned<String>>,
    /// busbar's client certificate (PEM chain, the leaf first) for mTLS.
    pub cert: Option<Spanned<String>>,
    /// The client certificate's private key (PEM).
    pub key: Option<Spanned<String>>,
    /// Accept any certificate: only for a test bench.
    pub insecure_skip_verify: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryFile {
    /// An SRV name: each record's target and port an instance, by priority and weight.
    pub dns_srv: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    pub addr: Spanned<String>,
    pub weight: Option<Spanned<i64>>,
    /// The version this instance runs, for `[route.split]`.
    pub version: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    pub attempts: Option<Spanned<i64>>,
    pub budget: Option<Spanned<f64>>,
    pub min_retries: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    pub path: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub healthy_threshold: Option<Spanned<i64>>,
    pub unhealthy_threshold: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub base_ejection: Option<Spanned<String>>,
    pub max_ejection: Option<Spanned<String>>,
    pub max_ejected_percent: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    pub service: Spanned<String>,
    pub strip_prefix: Option<Spanned<bool>>,
    pub prefix_rewrite: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub max_body: Option<Spanned<String>>,
    pub request_headers: Option<HeaderEditFile>,
    pub response_headers: Option<HeaderEditFile>,
    pub admission: Option<super::admission::RouteAdmissionFile>,
    /// `[route.translate]`: JSON or gRPC-Web callers of a gRPC service.
    pub translate: Option<super::translate::RouteTranslateFile>,
    /// `[route.split]`: gray release between versions of the route's service.
    pub split: Option<Spanned<super::release::SplitSpec>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEditFile {
    #[serde(default)]
    pub set: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub remove: Vec<Spanned<String>>,
}
