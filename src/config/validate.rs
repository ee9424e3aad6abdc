//! File types → model, collecting every problem with its location.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use toml::Spanned;

use super::address::{OwnListeners, Refused};
use super::admission::{RateLimitConfig, RouteAdmission};
use super::dns::DnsName;
use super::error::{ConfigError, ConfigErrors, Locator};
use super::file::*;
use super::model::*;

/// What a configuration is loaded for: it decides what a problem of the host (rather
/// than of the file) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// To run or reload: every secret must be set; endpoint names resolve in the background.
    Run,
    /// `busbar check`, which must pass a right file on a machine without the production
    /// DNS or secrets (CI): a name that does not resolve or an unset secret is a warning.
    Check,
}

/// How long `busbar check` waits for one name to resolve. A DNS server that does not
/// answer would otherwise hold each lookup for the resolver's full retry schedule.
const CHECK_RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) struct Validator<'a> {
    loc: Locator<'a>,
    base: PathBuf,
    errors: Vec<ConfigError>,
    purpose: Purpose,
    /// Problems of the host found by `busbar check` (see [`Purpose::Check`]).
    warnings: Vec<ConfigError>,
    /// A lookup timed out: `check` asks DNS nothing more.
    dns_silent: bool,
    /// Rate-limit groups seen so far: the first route's settings, and where they were.
    pub(super) rate_groups: HashMap<String, (RateLimitConfig, String)>,
    /// Static endpoints (where, whose, what) to hold against the node's own listeners
    /// once every listener is known.
    endpoints: Vec<(Range<usize>, String, SocketAddr)>,
    /// What the file allows but an operator must hear about (`Config::cautions`).
    cautions: Vec<ConfigError>,
    /// The system's CA certificates, read once per load when a service needs them.
    system_roots: Option<std::sync::Arc<rustls::RootCertStore>>,
    /// Protos compiled so far, so routes sharing them compile (and report) them once.
    pub(super) protos: super::translate::ProtoCache,
}

/// Validates a file to run with.
pub fn validate(path: &Path, src: &str) -> Result<Config, ConfigErrors> {
    validate_for(path, src, Purpose::Run).0
}

/// Validates a file for `purpose`; also returns the warnings (only [`Purpose::Check`] has any).
pub fn validate_for(
    path: &Path,
    src: &str,
    purpose: Purpose,
) -> (Result<Config, ConfigErrors>, Vec<ConfigError>) {
    let loc = Locator::new(path, src);
    let file: FileConfig = match toml::from_str(src) {
        Ok(f) => f,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let ctx = enclosing_table(src, span.start);
            let e = loc.error(span, &ctx, e.message().to_string());
            return (Err(ConfigErrors(vec![e])), Vec::new());
        }
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut v = Validator {
        loc,
        base,
        errors: Vec::new(),
        purpose,
        warnings: Vec::new(),
        dns_silent: false,
        rate_groups: HashMap::new(),
        endpoints: Vec::new(),
        cautions: Vec::new(),
        system_roots: None,
        protos: Default::default(),
    };
    let mut config = v.config(path, file);
    config.hash = text_hash(src);
    let result = if v.errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(v.errors))
    };
    (result, v.warnings)
}

/// The first 48 bits of the SHA-256 of a config file's text (see `Config::hash`).
fn text_hash(src: &str) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(src.as_bytes());
    digest
        .iter()
        .take(6)
        .fold(0u64, |h, &b| (h << 8) | u64::from(b))
}

/// `listen.admin` of a config text (the default when absent), without validating the rest.
pub fn admin_address(path: &Path, src: &str) -> Result<SocketAddr, ConfigErrors> {
    let loc = Locator::new(path, src);
    let file: AdminOnlyFile = toml::from_str(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        ConfigErrors(vec![loc.error(span, "", e.message().to_string())])
    })?;
    let mut v = Validator {
        loc,
        base: PathBuf::new(),
        errors: Vec::new(),
        purpose: Purpose::Run,
        warnings: Vec::new(),
        dns_silent: false,
        rate_groups: HashMap::new(),
        endpoints: Vec::new(),
        cautions: Vec::new(),
        system_roots: None,
        protos: Default::default(),
    };
    let addr = match file.listen.and_then(|l| l.admin) {
        Some(a) => v.addr(&a, "[listen]"),
        None => DEFAULT_ADMIN_ADDR.parse().ok(),
    };
    match addr {
        Some(a) if v.errors.is_empty() => Ok(a),
        _ => Err(ConfigErrors(v.errors)),
    }
}

impl Validator<'_> {
    pub(super) fn err(&mut self, span: Range<usize>, ctx: &str, msg: impl Into<String>) {
        let e = self.loc.error(span, ctx, msg);
        self.errors.push(e);
    }

    /// A problem of the host rather than of the file (a name that does not resolve, a
    /// secret missing from the environment): an error to run with, a warning from
    /// `busbar check`.
    pub(super) fn host_problem(&mut self, span: Range<usize>, ctx: &str, msg: impl Into<String>) {
        let e = self.loc.error(span, ctx, msg);
        match self.purpose {
            Purpose::Run => self.errors.push(e),
            Purpose::Check => self.warnings.push(e),
        }
    }

    /// Something the file may do but an operator must hear about at every load.
    pub(super) fn caution(&mut self, span: Range<usize>, ctx: &str, msg: impl Into<String>) {
        let e = self.loc.error(span, ctx, msg);
        self.cautions.push(e);
    }

    /// The system's CA certificates, read on first use in this load.
    pub(super) fn system_roots(&mut self) -> std::sync::Arc<rustls::RootCertStore> {
        self.system_roots
            .get_or_insert_with(super::upstream_tls::system_roots)
            .clone()
    }

    /// Loaded for `busbar check` only: what the host lacks may be stood in for.
    pub(super) fn checking(&self) -> bool {
        self.purpose == Purpose::Check
    }

    fn config(&mut self, path: &Path, f: FileConfig) -> Config {
        let server = self.server(f.server);
        let listen = self.listen(f.listen);
        let log = self.log(f.log);
        let auth = self.auth(f.auth.as_ref());
        let limits = self.limits(&f.limits);
        let default_max_body = match &f.limits.max_body {
            Some(s) => self.size(s, "limits").unwrap_or(DEFAULT_MAX_BODY),
            None => DEFAULT_MAX_BODY,
        };

        let mut names = HashSet::new();
        let mut services: Vec<ServiceConfig> = Vec::with_capacity(f.services.len());
        for s in f.services {
            let ctx = format!("service \"{}\"", s.name.get_ref());
            if !names.insert(s.name.get_ref().clone()) {
                self.err(s.name.span(), &ctx, "duplicate service name");
            }
            if let Some(svc) = self.service(s, &ctx) {
                services.push(svc);
            }
        }

        let cluster = self.cluster(f.cluster.as_ref(), &f.routes);
        let dns = self.dns(f.dns.as_ref());
        let tracing = self.tracing(f.tracing.as_ref());
        let mut route_names = HashSet::new();
        let mut routes = Vec::with_capacity(f.routes.len());
        let mut translations = super::Translations::new();
        let mut splits = super::Splits::new();
        for r in f.routes {
            let ctx = format!("route \"{}\"", r.name.get_ref());
            if !route_names.insert(r.name.get_ref().clone()) {
                self.err(r.name.span(), &ctx, "duplicate route name");
            }
            if !names.contains(r.service.get_ref()) {
                self.err(
                    r.service.span(),
                    &ctx,
                    format!("unknown service \"{}\"", r.service.get_ref()),
                );
            }
            let admission = self.route_admission(r.admission.as_ref(), &auth, &ctx);
            let svc = services.iter().find(|s| s.name == *r.service.get_ref());
            if let Some(t) = self.route_translate(r.translate.as_ref(), svc, &ctx) {
                translations.insert(r.name.get_ref().clone(), t);
            }
            if let Some(s) = self.route_split(r.split.as_ref(), svc, &ctx) {
                splits.insert(r.name.get_ref().clone(), s);
            }
            if let Some(mut route) = self.route(r, &ctx, default_max_body) {
                route.admission = admission;
                routes.push(route);
            }
        }

        let registry = self.registry(f.registry.as_ref(), &server, &names);
        let takes_registrations = services.iter().any(|s| s.registration);
        let own = OwnListeners::new(&listen, takes_registrations.then_some(registry.listen));
        for (span, ctx, addr) in std::mem::take(&mut self.endpoints) {
            if own.reached_by(addr) {
                self.err(
                    span,
                    &ctx,
                    format!("endpoint {addr} is refused: {}", Refused::OwnListener),
                );
            }
        }
        let mesh = self.mesh(f.mesh.as_ref());
        let admin = AdminSettings {
            open_reads: f
                .admin
                .open_reads
                .map_or(DEFAULT_OPEN_READS, |o| *o.get_ref()),
        };
        Config {
            source: path.to_path_buf(),
            hash: 0,
            server,
            listen,
            log,
            limits,
            registry,
            mesh,
            auth,
            cluster,
            dns,
            tracing,
            admin,
            services,
            routes,
            translations,
            splits,
            cautions: std::mem::take(&mut self.cautions),
        }
    }

    fn limits(&mut self, l: &LimitsFile) -> Limits {
        let ctx = "[limits]";
        let size = |v: &mut Self, s: &Option<Spanned<String>>, default: usize| match s {
            Some(s) => v.size(s, ctx).map_or(default, |n| n as usize),
            None => default,
        };
        Limits {
            header_timeout: self.duration(&l.header_timeout, ctx, DEFAULT_HEADER_TIMEOUT),
            idle_timeout: self.duration(&l.idle_timeout, ctx, DEFAULT_IDLE_TIMEOUT),
            client_timeout: self.duration(&l.client_timeout, ctx, DEFAULT_CLIENT_TIMEOUT),
            body_min_rate: l
                .body_min_rate
                .as_ref()
                .and_then(|r| self.size(r, ctx))
                .unwrap_or(DEFAULT_BODY_MIN_RATE),
            max_request_line: size(self, &l.max_request_line, DEFAULT_MAX_REQUEST_LINE),
            max_header_bytes: size(self, &l.max_header_bytes, DEFAULT_MAX_HEADER_BYTES),
            max_headers: self
                .int(&l.max_headers, ctx, 1, 250)
                .map_or(DEFAULT_MAX_HEADERS, |n| n as usize),
            max_hops: self
                .int(&l.max_hops, ctx, 0, i64::from(MAX_MAX_HOPS))
                .map_or(DEFAULT_MAX_HOPS, |n| n as u32),
            h2_max_concurrent_streams: self
                .int(&l.h2_max_concurrent_streams, ctx, 1, 10_000)
                .map_or(DEFAULT_H2_MAX_CONCURRENT_STREAMS, |n| n as u32),
            h2_stream_window: self.h2_window(&l.h2_stream_window, ctx, DEFAULT_H2_STREAM_WINDOW),
            h2_connection_window: self.h2_window(
                &l.h2_connection_window,
                ctx,
                DEFAULT_H2_CONNECTION_WINDOW,
            ),
            // Absent: off (a bad value is reported, and leaves it off).
            h2_keepalive_interval: l
                .h2_keepalive_interval
                .is_some()
                .then(|| self.duration(&l.h2_keepalive_interval, ctx, Duration::ZERO))
                .filter(|d| !d.is_zero()),
            h2_keepalive_timeout: self.duration(
                &l.h2_keepalive_timeout,
                ctx,
                DEFAULT_H2_KEEPALIVE_TIMEOUT,
            ),
        }
    }

    /// An HTTP/2 window: a size within what the protocol allows.
    fn h2_window(&mut self, v: &Option<Spanned<String>>, ctx: &str, default: u32) -> u32 {
        let Some(v) = v else {
            return default;
        };
        match self.size(v, ctx) {
            Some(n) if (MIN_H2_WINDOW..=MAX_H2_WINDOW).contains(&n) => n as u32,
            Some(n) => {
                self.err(
                    v.span(),
                    ctx,
                    format!("must be between {MIN_H2_WINDOW} and {MAX_H2_WINDOW} bytes, got {n}"),
                );
                default
            }
            None => default,
        }
    }

    fn server(&mut self, s: ServerFile) -> ServerSettings {
        let ctx = "[server]";
        ServerSettings {
            threads: self
                .int(&s.threads, ctx, 1, 256)
                .map_or(DEFAULT_THREADS, |n| n as usize),
            grace_period: self.duration(&s.grace_period, ctx, DEFAULT_GRACE_PERIOD),
            runtime_dir: s
                .runtime_dir
                .map(|d| self.path(d.get_ref()))
                .unwrap_or_else(|| super::runtime_dir::default_runtime_dir(&self.base)),
            upstream_keepalive_pool: self
                .int(&s.upstream_keepalive_pool, ctx, 0, 1_000_000)
                .map_or(DEFAULT_UPSTREAM_KEEPALIVE_POOL, |n| n as usize),
        }
    }

    fn listen(&mut self, l: ListenFile) -> Listen {
        let ctx = "[listen]";
        let mut seen = HashSet::new();
        let mut http = Vec::new();
        let mut proxy_protocol = Vec::new();
        for a in &l.http {
            let (text, proxied) = match a.get_ref() {
                HttpListenFile::Addr(s) => (s, false),
                HttpListenFile::Table(t) => (&t.addr, t.proxy_protocol),
            };
            let spanned = Spanned::new(a.span(), text.clone());
            if let Some(addr) = self.addr(&spanned, ctx) {
                if !seen.insert(addr) {
                    self.err(a.span(), ctx, format!("address {addr} is already used"));
                }
                http.push(addr);
                if proxied {
                    proxy_protocol.push(addr);
                }
            }
        }
        let trusted_proxies = self.cidrs(&l.trusted_proxies, ctx);
        if let Some(first) = l
            .http
            .iter()
            .find(|a| matches!(a.get_ref(), HttpListenFile::Table(t) if t.proxy_protocol))
        {
            if trusted_proxies.is_empty() {
                self.err(
                    first.span(),
                    ctx,
                    "proxy_protocol is only accepted from trusted_proxies: list the load balancers in listen.trusted_proxies",
                );
            }
        }
        let mut tls = Vec::new();
        for t in &l.tls {
            if let Some(addr) = self.addr(&t.addr, ctx) {
                if !seen.insert(addr) {
                    self.err(
                        t.addr.span(),
                        ctx,
                        format!("address {addr} is already used"),
                    );
                }
                if let Some(p) = t.proxy_protocol.as_ref().filter(|p| *p.get_ref()) {
                    // Read before the TLS handshake (`listeners`).
                    if trusted_proxies.is_empty() {
                        self.err(
                            p.span(),
                            ctx,
                            "proxy_protocol is only accepted from trusted_proxies: list the load balancers in listen.trusted_proxies",
                        );
                    }
                    proxy_protocol.push(addr);
                }
                tls.push(self.tls_listener(t, addr, ctx));
            }
        }
        if http.is_empty() && tls.is_empty() && self.errors.is_empty() {
            self.err(0..0, ctx, "no listener: set listen.http or listen.tls");
        }
        let admin = match &l.admin {
            Some(a) => self.addr(a, ctx),
            None => DEFAULT_ADMIN_ADDR.parse().ok(),
        };
        let admin = admin.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901)));
        if !seen.insert(admin) {
            if let Some(a) = &l.admin {
                self.err(a.span(), ctx, format!("address {admin} is already used"));
            }
        }
        let metrics = l.metrics.as_ref().and_then(|m| {
            let addr = self.addr(m, ctx)?;
            if !seen.insert(addr) {
                self.err(m.span(), ctx, format!("address {addr} is already used"));
            }
            Some(addr)
        });
        Listen {
            http,
            tls,
            admin,
            metrics,
            proxy_protocol,
            trusted_proxies,
        }
    }

    fn log(&mut self, l: LogFile) -> LogSettings {
        let level = match &l.level {
            Some(s) => {
                let v = s.get_ref().to_ascii_lowercase();
                if !["error", "warn", "info", "debug", "trace"].contains(&v.as_str()) {
                    self.err(
                        s.span(),
                        "[log]",
                        "level must be one of error, warn, info, debug, trace",
                    );
                }
                v
            }
            None => "info".to_string(),
        };
        let access = match l.access.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("stdout") => AccessLogTarget::Stdout,
            Some("off") => AccessLogTarget::Off,
            Some(p) => AccessLogTarget::File(self.path(p)),
        };
        let format = match l.format.as_ref() {
            None => LogFormat::Text,
            Some(f) => match f.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    self.err(f.span(), "[log]", "format must be \"text\" or \"json\"");
                    LogFormat::Text
                }
            },
        };
        let mut redact_query = Vec::new();
        for name in l.redact_query.iter().flatten() {
            if name.get_ref().is_empty() {
                self.err(
                    name.span(),
                    "[log]",
                    "redact_query: a parameter name is empty",
                );
            } else {
                redact_query.push(name.get_ref().to_ascii_lowercase());
            }
        }
        LogSettings {
            level,
            access,
            format,
            redact_query,
        }
    }

    fn service(&mut self, s: ServiceFile, ctx: &str) -> Option<ServiceConfig> {
        let before = self.errors.len();
        let (prefer, hold_down) = self.path_preference(&s.prefer, &s.hold_down, ctx);
        if !valid_identifier(s.name.get_ref()) {
            self.err(
                s.name.span(),
                ctx,
                "a service name is 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter",
            );
        }
        let protocol = match s.protocol.as_ref().map(|p| p.get_ref().as_str()) {
            None | Some("http1") => Protocol::Http1,
            Some("https") => Protocol::Https,
            Some("h2c") => Protocol::H2c,
            Some("h2") => Protocol::H2,
            Some(_) => {
                let span = s.protocol.as_ref().map_or(0..0, |p| p.span());
                self.err(
                    span,
                    ctx,
                    "protocol must be \"http1\", \"https\", \"h2c\" or \"h2\"",
                );
                Protocol::Http1
            }
        };
        let balance = match s.balance.as_ref().map(|p| p.get_ref().as_str()) {
            None | Some("round_robin") => BalancePolicy::RoundRobin,
            Some("weighted") => BalancePolicy::Weighted,
            Some("p2c") => BalancePolicy::P2c,
            Some("sticky") => BalancePolicy::Sticky,
            Some(_) => {
                let span = s.balance.as_ref().map_or(0..0, |p| p.span());
                self.err(
                    span,
                    ctx,
                    "balance must be one of \"round_robin\", \"weighted\", \"p2c\", \"sticky\"",
                );
                BalancePolicy::RoundRobin
            }
        };
        let hash_key = match &s.hash_key {
            None => HashKey::ClientIp,
            Some(k) => {
                if balance != BalancePolicy::Sticky {
                    self.err(
                        k.span(),
                        ctx,
                        "hash_key only applies to balance = \"sticky\"",
                    );
                }
                self.hash_key(k, ctx).unwrap_or(HashKey::ClientIp)
            }
        };
        let listed: &[EndpointFile] = s.endpoints.as_ref().map_or(&[], |e| e.get_ref());
        let mut endpoints = Vec::with_capacity(listed.len());
        let mut seen = HashSet::new();
        let mut seen_names = HashSet::new();
        for e in listed {
            let weight = self.int(&e.weight, ctx, 1, 10_000).unwrap_or(1) as u32;
            let version = self.endpoint_version(&e.version, ctx);
            let text = e.addr.get_ref();
            if text.parse::<SocketAddr>().is_err() {
                if let Some((host, port)) = split_host_port(text) {
                    // A name: resolved in the background (`registry::dns`), every address
                    // an instance. `busbar check` still says when it does not resolve here.
                    if self.checking() {
                        let _ = self.addr(&e.addr, ctx);
                    }
                    if !seen_names.insert(text.clone()) {
                        self.err(
                            e.addr.span(),
                            ctx,
                            format!("endpoint {text} is listed twice"),
                        );
                    }
                    endpoints.push(EndpointConfig {
                        addr: None,
                        dns: Some(DnsName {
                            host: host.into(),
                            port,
                            text: text.as_str().into(),
                        }),
                        weight,
                        version,
                    });
                    continue;
                }
            }
            let Some(addr) = self.addr(&e.addr, ctx) else {
                continue;
            };
            if let Err(why) = super::address::check_kind(addr) {
                self.err(
                    e.addr.span(),
                    ctx,
                    format!("endpoint {addr} is refused: {why}"),
                );
                continue;
            }
            self.endpoints.push((e.addr.span(), ctx.to_string(), addr));
            if !seen.insert(addr) {
                self.err(
                    e.addr.span(),
                    ctx,
                    format!("endpoint {addr} is listed twice"),
                );
            }
            endpoints.push(EndpointConfig {
                addr: Some(addr),
                dns: None,
                weight,
                version,
            });
        }
        let registration = s.registration.as_ref().is_some_and(|r| *r.get_ref());
        let tls = self.upstream_tls(s.tls.as_ref(), protocol, registration, ctx);
        let dns_srv = s.discovery.as_ref().and_then(|d| {
            let name = d.dns_srv.get_ref();
            if split_host_port(&format!("{name}:1")).is_some() {
                Some(std::sync::Arc::<str>::from(name.as_str()))
            } else {
                self.err(
                    d.dns_srv.span(),
                    ctx,
                    format!("discovery.dns_srv: \"{name}\" is not a DNS name like \"_http._tcp.orders.internal\""),
                );
                None
            }
        });
        if listed.is_empty() && !registration && s.discovery.is_none() {
            let span = s.endpoints.as_ref().map_or(s.name.span(), |e| e.span());
            self.err(
                span,
                ctx,
                "no endpoints: list at least one in `endpoints = [{ addr = \"host:port\" }]`, set `registration = true`, or `discovery = { dns_srv = \"...\" }`",
            );
        }
        let connect_timeout = self.duration(&s.connect_timeout, ctx, DEFAULT_CONNECT_TIMEOUT);
        let read_timeout = self.duration(&s.read_timeout, ctx, DEFAULT_READ_TIMEOUT);
        let timeout = self.duration(&s.timeout, ctx, DEFAULT_TIMEOUT);
        let tunnel_idle_timeout =
            self.duration(&s.tunnel_idle_timeout, ctx, DEFAULT_TUNNEL_IDLE_TIMEOUT);
        let panic_threshold = self
            .int(&s.panic_threshold, ctx, 0, 100)
            .map_or(DEFAULT_PANIC_THRESHOLD, |n| n as u8);
        let retry = match &s.retry {
            None => RetryPolicy {
                attempts: DEFAULT_RETRY_ATTEMPTS,
                budget: DEFAULT_RETRY_BUDGET,
                min_retries_per_second: DEFAULT_MIN_RETRIES_PER_SECOND,
            },
            Some(r) => {
                let budget = match &r.budget {
                    Some(b) if !(0.0..=1.0).contains(b.get_ref()) => {
                        self.err(b.span(), ctx, "retry.budget must be between 0.0 and 1.0");
                        DEFAULT_RETRY_BUDGET
                    }
                    Some(b) => *b.get_ref(),
                    None => DEFAULT_RETRY_BUDGET,
                };
                RetryPolicy {
                    attempts: self
                        .int(&r.attempts, ctx, 0, 10)
                        .map_or(DEFAULT_RETRY_ATTEMPTS, |n| n as u32),
                    budget,
                    min_retries_per_second: self
                        .int(&r.min_retries, ctx, 0, 100_000)
                        .map_or(DEFAULT_MIN_RETRIES_PER_SECOND, |n| n as u32),
                }
            }
        };
        let health = s.health.as_ref().map(|h| self.health(h, ctx));
        if let (Some(n), false) = (&s.h2_max_streams, protocol.is_h2()) {
            self.err(
                n.span(),
                ctx,
                "h2_max_streams applies to protocol = \"h2c\" or \"h2\"",
            );
        }
        let h2_max_streams = match &s.h2_max_streams {
            Some(n) if !(1..=10_000).contains(n.get_ref()) => {
                let msg = format!(
                    "h2_max_streams must be between 1 and 10000, got {}",
                    n.get_ref()
                );
                self.err(n.span(), ctx, msg);
                DEFAULT_H2_MAX_STREAMS
            }
            Some(n) => *n.get_ref() as u32,
            None => DEFAULT_H2_MAX_STREAMS,
        };
        let outlier = match &s.outlier {
            None => OutlierPolicy::default(),
            Some(o) => OutlierPolicy {
                consecutive_failures: self
                    .int(&o.consecutive_failures, ctx, 1, 1000)
                    .map_or(DEFAULT_CONSECUTIVE_FAILURES, |n| n as u32),
                base_ejection: self.duration(&o.base_ejection, ctx, DEFAULT_BASE_EJECTION),
                max_ejection: self.duration(&o.max_ejection, ctx, DEFAULT_MAX_EJECTION),
                max_ejected_percent: self
                    .int(&o.max_ejected_percent, ctx, 0, 100)
                    .map_or(DEFAULT_MAX_EJECTED_PERCENT, |n| n as u8),
            },
        };
        if self.errors.len() > before {
            return None;
        }
        Some(ServiceConfig {
            prefer,
            hold_down,
            name: s.name.into_inner(),
            registration,
            protocol,
            balance,
            hash_key,
            endpoints,
            dns_srv,
            connect_timeout,
            read_timeout,
            timeout,
            tunnel_idle_timeout,
            panic_threshold,
            retry,
            health,
            outlier,
            max_in_flight: self
                .int(&s.max_in_flight, ctx, 1, 1_000_000)
                .map(|n| n as u32),
            tls,
            h2_max_streams,
        })
    }

    fn hash_key(&mut self, k: &Spanned<String>, ctx: &str) -> Option<HashKey> {
        let v = k.get_ref().as_str();
        let key = match v.split_once(':') {
            None if v == "client_ip" => Some(HashKey::ClientIp),
            None if v == "path" => Some(HashKey::Path),
            Some(("header", name)) => HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(HashKey::Header),
            Some(("cookie", name)) if !name.is_empty() => Some(HashKey::Cookie(name.to_string())),
            _ => None,
        };
        if key.is_none() {
            self.err(
                k.span(),
                ctx,
                "hash_key must be \"client_ip\", \"path\", \"header:NAME\" or \"cookie:NAME\"",
            );
        }
        key
    }

    fn health(&mut self, h: &HealthFile, ctx: &str) -> HealthCheck {
        let kind = match h.kind.get_ref().as_str() {
            "http" => {
                let path = h
                    .path
                    .as_ref()
                    .map_or_else(|| "/".to_string(), |p| p.get_ref().clone());
                if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                    let span = h.path.as_ref().map_or(h.kind.span(), |p| p.span());
                    self.err(
                        span,
                        ctx,
                        "health.path must start with '/' and contain no spaces",
                    );
                }
                ProbeKind::Http { path }
            }
            "tcp" => {
                if let Some(p) = &h.path {
                    self.err(p.span(), ctx, "health.path only applies to type = \"http\"");
                }
                ProbeKind::Tcp
            }
            _ => {
                self.err(
                    h.kind.span(),
                    ctx,
                    "health.type must be \"http\" or \"tcp\"",
                );
                ProbeKind::Tcp
            }
        };
        HealthCheck {
            kind,
            interval: self.duration(&h.interval, ctx, DEFAULT_HEALTH_INTERVAL),
            timeout: self.duration(&h.timeout, ctx, DEFAULT_HEALTH_TIMEOUT),
            healthy_threshold: self
                .int(&h.healthy_threshold, ctx, 1, 100)
                .map_or(DEFAULT_HEALTHY_THRESHOLD, |n| n as u32),
            unhealthy_threshold: self
                .int(&h.unhealthy_threshold, ctx, 1, 100)
                .map_or(DEFAULT_UNHEALTHY_THRESHOLD, |n| n as u32),
        }
    }

    fn route(&mut self, r: RouteFile, ctx: &str, default_max_body: u64) -> Option<RouteConfig> {
        let before = self.errors.len();
        let mut hosts = Vec::with_capacity(r.hosts.len());
        for h in &r.hosts {
            let v = h.get_ref().to_ascii_lowercase();
            let (suffix, name) = match v.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, v.as_str()),
            };
            if name.is_empty()
                || name.contains(['*', ':', '/', ' '])
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            {
                self.err(
                    h.span(),
                    ctx,
                    "a host is a name like \"api.example.com\" or a wildcard \"*.example.com\" (no port)",
                );
                continue;
            }
            hosts.push(if suffix {
                HostMatch::Suffix(format!(".{name}"))
            } else {
                HostMatch::Exact(name.to_string())
            });
        }
        let path = match (&r.path, &r.path_prefix) {
            (Some(p), Some(_)) => {
                self.err(p.span(), ctx, "set either path or path_prefix, not both");
                PathMatch::Any
            }
            (Some(p), None) => {
                self.check_path(p, ctx);
                PathMatch::Exact(p.get_ref().clone())
            }
            (None, Some(p)) => {
                self.check_path(p, ctx);
                if p.get_ref() == "/" {
                    PathMatch::Any
                } else {
                    PathMatch::Prefix(p.get_ref().clone())
                }
            }
            (None, None) => PathMatch::Any,
        };
        let mut methods = Vec::with_capacity(r.methods.len());
        for m in &r.methods {
            match Method::from_bytes(m.get_ref().to_ascii_uppercase().as_bytes()) {
                Ok(method) => methods.push(method),
                Err(_) => self.err(m.span(), ctx, "not an HTTP method"),
            }
        }
        let mut headers = Vec::with_capacity(r.headers.len());
        for (name, value) in &r.headers {
            if let Some(pair) = self.header_pair(name, value, ctx) {
                headers.push(pair);
            }
        }
        let rewrite = match (&r.strip_prefix, &r.prefix_rewrite) {
            (Some(s), Some(_)) => {
                self.err(
                    s.span(),
                    ctx,
                    "set either strip_prefix or prefix_rewrite, not both",
                );
                Rewrite::None
            }
            (Some(s), None) if *s.get_ref() => {
                if !matches!(path, PathMatch::Prefix(_)) {
                    self.err(
                        s.span(),
                        ctx,
                        "strip_prefix needs a path_prefix other than \"/\"",
                    );
                }
                Rewrite::Prefix("/".to_string())
            }
            (None, Some(p)) => {
                if !matches!(path, PathMatch::Prefix(_) | PathMatch::Any) {
                    self.err(p.span(), ctx, "prefix_rewrite needs a path_prefix");
                }
                self.check_path(p, ctx);
                Rewrite::Prefix(p.get_ref().clone())
            }
            _ => Rewrite::None,
        };
        let timeout = r
            .timeout
            .as_ref()
            .map(|t| self.duration(&Some(t.clone()), ctx, DEFAULT_TIMEOUT));
        let max_body = match &r.max_body {
            Some(s) => self.size(s, ctx).unwrap_or(default_max_body),
            None => default_max_body,
        };
        let request_headers = self.header_edit(r.request_headers.as_ref(), ctx, true);
        let response_headers = self.header_edit(r.response_headers.as_ref(), ctx, false);
        if self.errors.len() > before {
            return None;
        }
        Some(RouteConfig {
            name: r.name.into_inner(),
            hosts,
            path,
            methods,
            headers,
            service: r.service.into_inner(),
            rewrite,
            timeout,
            max_body,
            request_headers,
            response_headers,
            admission: RouteAdmission::default(),
        })
    }

    fn check_path(&mut self, p: &Spanned<String>, ctx: &str) {
        let v = p.get_ref();
        if !v.starts_with('/')
            || v.bytes()
                .any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#')
        {
            self.err(
                p.span(),
                ctx,
                "a path starts with '/' and has no spaces, '?' or '#'",
            );
        }
    }

    fn header_pair(
        &mut self,
        name: &str,
        value: &Spanned<String>,
        ctx: &str,
    ) -> Option<(HeaderName, HeaderValue)> {
        let Ok(n) = HeaderName::from_bytes(name.as_bytes()) else {
            self.err(
                value.span(),
                ctx,
                format!("\"{name}\" is not a valid header name"),
            );
            return None;
        };
        let Ok(v) = HeaderValue::from_str(value.get_ref()) else {
            self.err(
                value.span(),
                ctx,
                format!("the value of header \"{name}\" is not valid"),
            );
            return None;
        };
        Some((n, v))
    }

    /// A route's header edits; `request`: of the upstream request, where `Via` is
    /// busbar's loop detection and stays out of reach (a route that removed it would
    /// erase the hops before it, and two such nodes would loop unseen).
    fn header_edit(&mut self, e: Option<&HeaderEditFile>, ctx: &str, request: bool) -> HeaderEdit {
        let Some(e) = e else {
            return HeaderEdit::default();
        };
        const VIA: &str =
            "a route cannot set or remove \"via\": busbar detects forwarding loops with it";
        let mut out = HeaderEdit::default();
        for (name, value) in &e.set {
            if let Some(pair) = self.header_pair(name, value, ctx) {
                if request && pair.0 == http::header::VIA {
                    self.err(value.span(), ctx, VIA);
                    continue;
                }
                out.set.push(pair);
            }
        }
        for name in &e.remove {
            match HeaderName::from_bytes(name.get_ref().as_bytes()) {
                Ok(n) if request && n == http::header::VIA => self.err(name.span(), ctx, VIA),
                Ok(n) => out.remove.push(n),
                Err(_) => self.err(name.span(), ctx, "not a valid header name"),
            }
        }
        out
    }

    pub(super) fn addr(&mut self, a: &Spanned<String>, ctx: &str) -> Option<SocketAddr> {
        let v = a.get_ref();
        if let Ok(addr) = v.parse::<SocketAddr>() {
            return Some(addr);
        }
        let Some((host, port)) = split_host_port(v) else {
            self.err(
                a.span(),
                ctx,
                format!("\"{v}\" is not an address of the form host:port"),
            );
            return None;
        };
        // Names are resolved once, here, never on the request path.
        let resolved = match self.purpose {
            Purpose::Run => resolve(host, port),
            Purpose::Check if self.dns_silent => {
                Err("not looked up: DNS did not answer for an earlier name".to_string())
            }
            Purpose::Check => {
                let r = resolve_within(host, port, CHECK_RESOLVE_TIMEOUT);
                self.dns_silent = matches!(r, Err(None));
                r.map_err(|e| {
                    e.unwrap_or_else(|| {
                        format!(
                            "DNS did not answer within {}s",
                            CHECK_RESOLVE_TIMEOUT.as_secs()
                        )
                    })
                })
            }
        };
        match resolved {
            Ok(addr) => Some(addr),
            Err(why) => {
                self.host_problem(
                    a.span(),
                    ctx,
                    format!("host \"{host}\" does not resolve ({why})"),
                );
                None
            }
        }
    }

    pub(super) fn int(
        &mut self,
        v: &Option<Spanned<i64>>,
        ctx: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let v = v.as_ref()?;
        let n = *v.get_ref();
        if n < min || n > max {
            self.err(
                v.span(),
                ctx,
                format!("must be between {min} and {max}, got {n}"),
            );
            return None;
        }
        Some(n)
    }

    pub(super) fn duration(
        &mut self,
        v: &Option<Spanned<String>>,
        ctx: &str,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else {
            return default;
        };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.err(v.span(), ctx, "a duration must be greater than zero");
                default
            }
            Err(e) => {
                self.err(
                    v.span(),
                    ctx,
                    format!(
                        "\"{}\" is not a duration like \"500ms\" or \"5s\": {e}",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn size(&mut self, v: &Spanned<String>, ctx: &str) -> Option<u64> {
        let parsed = parse_size(v.get_ref());
        if parsed.is_none() {
            self.err(
                v.span(),
                ctx,
                format!(
                    "\"{}\" is not a size like \"512KiB\", \"10MiB\" or \"1000\"",
                    v.get_ref()
                ),
            );
        }
        parsed
    }

    pub(super) fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

/// For a syntax or type error at `offset`: the `[[route]]` / `[[service]]` it sits in,
/// named when its `name` can be found (`route "api"`), else the table header.
fn enclosing_table(src: &str, offset: usize) -> String {
    let before = src.get(..offset).unwrap_or(src);
    let header_at = match before.rfind("\n[") {
        Some(i) => i + 1,
        None if before.starts_with('[') => 0,
        None => return String::new(),
    };
    let header = src[header_at..].lines().next().unwrap_or("").trim();
    let kind = match header {
        h if h.starts_with("[[route") || h.starts_with("[route.") => "route",
        h if h.starts_with("[[service") || h.starts_with("[service.") => "service",
        h => return h.to_string(),
    };
    // The name of the nearest table of that kind: its `name = "…"` line.
    let table = format!("[[{kind}]]");
    let start = before.rfind(&table).unwrap_or(header_at);
    let name = src[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("[["))
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "name").then(|| v.trim().trim_matches('"').to_string())
        });
    match name {
        Some(n) => format!("{kind} \"{n}\""),
        None => kind.to_string(),
    }
}

/// A service name: what a DNS label allows, plus '_', starting with a letter.
pub fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `"10MiB"`, `"512KiB"`, `"1GB"`, `"1000"` → bytes.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1024,
        "MB" => 1000 * 1000,
        "MiB" => 1024 * 1024,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// `host:port` with a host name (letters, digits, '-', '_', '.') and a port; IP addresses
/// are parsed before this.
fn split_host_port(v: &str) -> Option<(&str, u16)> {
    let (host, port) = v.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    (!host.is_empty() && host.len() <= 253 && host.chars().all(name_char)).then_some((host, port))
}

/// The first address `host` resolves to, or why there is none.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| "no address".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// [`resolve`], giving up after `timeout` (`Err(None)`).
fn resolve_within(host: &str, port: u16, timeout: Duration) -> Result<SocketAddr, Option<String>> {
    let host = host.to_string();
    match within(timeout, move || resolve(&host, port)) {
        Ok(r) => r.map_err(Some),
        Err(e) => Err(e),
    }
}

/// Runs `f` on its own thread and waits for it at most `timeout` (`Err(None)`). A lookup
/// cannot be cancelled: the thread is left to finish, which is fine for `busbar check`, a
/// short-lived process.
fn within<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Option<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("busbar-check-dns".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| Some(format!("cannot start a lookup: {e}")))?;
    rx.recv_timeout(timeout).map_err(|_| None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<String> {
        match validate(Path::new("t.toml"), src) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    const OK: &str = r#"
[listen]
http = ["127.0.0.1:8080"]

[[service]]
name = "echo"
endpoints = [{ addr = "127.0.0.1:9001", weight = 3 }, { addr = "127.0.0.1:9002" }]

[[route]]
name = "all"
path_prefix = "/api"
strip_prefix = true
service = "echo"
"#;

    #[test]
    fn a_good_file_validates() {
        let c = validate(Path::new("t.toml"), OK).unwrap();
        assert_eq!(c.services[0].endpoints[0].weight, 3);
        assert_eq!(c.routes[0].rewrite, Rewrite::Prefix("/".into()));
        assert_eq!(c.listen.admin.to_string(), DEFAULT_ADMIN_ADDR);
    }

    #[test]
    fn tunnel_idle_timeout_defaults_to_an_hour_and_is_a_positive_duration() {
        let c = validate(Path::new("t.toml"), OK).unwrap();
        assert_eq!(
            c.services[0].tunnel_idle_timeout,
            DEFAULT_TUNNEL_IDLE_TIMEOUT
        );
        let set = |v: &str| {
            OK.replace(
                "name = \"echo\"\n",
                &format!("name = \"echo\"\ntunnel_idle_timeout = {v}\n"),
            )
        };
        let c = validate(Path::new("t.toml"), &set("\"90s\"")).unwrap();
        assert_eq!(c.services[0].tunnel_idle_timeout, Duration::from_secs(90));
        for bad in ["\"0s\"", "\"soon\"", "5"] {
            let e = errors(&set(bad));
            assert!(e.iter().any(|e| e.contains("t.toml:7:")), "{bad}: {e:?}");
        }
    }

    #[test]
    fn admin_reads_need_the_token_unless_opened() {
        let c = validate(Path::new("t.toml"), OK).unwrap();
        assert!(!c.admin.open_reads);
        let open = format!("[admin]\nopen_reads = true\n{OK}");
        assert!(
            validate(Path::new("t.toml"), &open)
                .unwrap()
                .admin
                .open_reads
        );
        let e = errors(&format!("[admin]\nopen_reads = \"yes\"\n{OK}"));
        assert!(e.iter().any(|e| e.contains("t.toml:2:")), "{e:?}");
        let e = errors(&format!("[admin]\nopen_read = true\n{OK}"));
        assert!(
            e.iter()
                .any(|e| e.contains("t.toml:2:") && e.contains("open_read")),
            "{e:?}"
        );
    }

    #[test]
    fn the_metrics_listener_is_optional_and_has_its_own_address() {
        assert_eq!(
            validate(Path::new("t.toml"), OK).unwrap().listen.metrics,
            None
        );
        let with = |addr: &str| {
            OK.replace(
                "http = [\"127.0.0.1:8080\"]",
                &format!("http = [\"127.0.0.1:8080\"]\nmetrics = \"{addr}\""),
            )
        };
        let c = validate(Path::new("t.toml"), &with("127.0.0.1:9090")).unwrap();
        assert_eq!(c.listen.metrics, Some("127.0.0.1:9090".parse().unwrap()));
        let e = errors(&with("127.0.0.1:8080"));
        assert!(
            e.iter()
                .any(|e| e.contains("t.toml:4:") && e.contains("127.0.0.1:8080 is already used")),
            "{e:?}"
        );
        let e = errors(&with("nowhere"));
        assert!(e.iter().any(|e| e.contains("t.toml:4:")), "{e:?}");
    }

    #[test]
    fn a_rate_limit_group_must_say_the_same_in_every_route() {
        let limited = |name: &str, rate: &str, group: &str| {
            format!(
                "[[route]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nservice = \"echo\"\n\
                 [route.admission]\nrate_limit = {{ rate = \"{rate}\", group = \"{group}\" }}\n"
            )
        };
        let same = format!(
            "{OK}{}{}",
            limited("a", "5/s", "shop"),
            limited("b", "5/s", "shop")
        );
        let c = validate(Path::new("t.toml"), &same).unwrap();
        let key = |i: usize| {
            c.routes[i]
                .admission
                .rate_limit
                .as_ref()
                .unwrap()
                .counter_key("x")
        };
        assert_eq!((key(1), key(2)), ("group:shop".into(), "group:shop".into()));
        let differ = format!(
            "{OK}{}{}",
            limited("a", "5/s", "shop"),
            limited("b", "6/s", "shop")
        );
        assert_eq!(
            errors(&differ),
            vec![
                "t.toml:25:38: route \"b\": rate-limit group \"shop\" is set differently in route \"a\": \
                 the routes of a group share one limit, so rate, burst, global, max_users and scope must be the same"
            ]
        );
        let bad = format!("{OK}{}", limited("a", "5/s", "Shop!"));
        assert_eq!(errors(&bad).len(), 1, "{:?}", errors(&bad));
        assert!(
            errors(&bad)[0].contains("a group name is"),
            "{:?}",
            errors(&bad)
        );
    }

    #[test]
    fn unknown_service_names_the_route_and_position() {
        let src = OK.replace("service = \"echo\"\n", "service = \"ech\"\n");
        let e = errors(&src);
        assert_eq!(
            e,
            vec!["t.toml:13:11: route \"all\": unknown service \"ech\""]
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let src = OK.replace("strip_prefix = true", "strip_prefx = true");
        let e = errors(&src);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.toml:12:1: route \"all\": "), "{e:?}");
        assert!(e[0].contains("strip_prefx"), "{e:?}");
    }

    #[test]
    fn bad_duration_and_duplicates_are_all_reported() {
        let src = format!(
            "{OK}\n[[service]]\nname = \"echo\"\nendpoints = [{{ addr = \"127.0.0.1:1\" }}]\nconnect_timeout = \"fast\"\n"
        );
        let e = errors(&src);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("duplicate service name"));
        assert!(e[1].contains("\"fast\" is not a duration"));
    }

    #[test]
    fn empty_endpoints_are_refused() {
        let src = OK.replace(
            "endpoints = [{ addr = \"127.0.0.1:9001\", weight = 3 }, { addr = \"127.0.0.1:9002\" }]",
            "endpoints = []",
        );
        let e = errors(&src);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:7:13: service \"echo\": no endpoints"),
            "{e:?}"
        );
    }

    #[test]
    fn max_hops_defaults_to_8_and_is_bounded() {
        let c = validate(Path::new("t.toml"), OK).unwrap();
        assert_eq!(c.limits.max_hops, DEFAULT_MAX_HOPS);
        let c = validate(
            Path::new("t.toml"),
            &format!("[limits]\nmax_hops = 0\n{OK}"),
        )
        .unwrap();
        assert_eq!(c.limits.max_hops, 0);
        let e = errors(&format!("[limits]\nmax_hops = 65\n{OK}"));
        assert_eq!(
            e,
            vec!["t.toml:2:12: [limits]: must be between 0 and 64, got 65"]
        );
    }

    #[test]
    fn http2_keepalive_is_off_by_default_and_takes_durations() {
        let c = validate(Path::new("t.toml"), OK).unwrap();
        assert_eq!(c.limits.h2_keepalive_interval, None);
        assert_eq!(c.limits.h2_keepalive_timeout, Duration::from_secs(20));
        let c = validate(
            Path::new("t.toml"),
            &format!(
                "[limits]\nh2_keepalive_interval = \"30s\"\nh2_keepalive_timeout = \"5s\"\n{OK}"
            ),
        )
        .unwrap();
        assert_eq!(
            c.limits.h2_keepalive_interval,
            Some(Duration::from_secs(30))
        );
        assert_eq!(c.limits.h2_keepalive_timeout, Duration::from_secs(5));
        let e = errors(&format!(
            "[limits]\nh2_keepalive_interval = \"0s\"\nh2_keepalive_timeout = \"soon\"\n{OK}"
        ));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:2:25: [limits]: a duration must be greater than zero"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("t.toml:3:24: [limits]: \"soon\" is not a duration"),
            "{e:?}"
        );
    }

    #[test]
    fn http2_limits_default_and_are_bounded() {
        let c = validate(Path::new("t.toml"), OK).unwrap();
        assert_eq!(c.limits.h2_max_concurrent_streams, 100);
        assert_eq!(c.limits.h2_stream_window, 1024 * 1024);
        assert_eq!(c.limits.h2_connection_window, 4 * 1024 * 1024);
        let c = validate(
            Path::new("t.toml"),
            &format!("[limits]\nh2_max_concurrent_streams = 8\nh2_stream_window = \"64KiB\"\n{OK}"),
        )
        .unwrap();
        assert_eq!(c.limits.h2_max_concurrent_streams, 8);
        assert_eq!(c.limits.h2_stream_window, 65_536);
        let e = errors(&format!(
            "[limits]\nh2_max_concurrent_streams = 0\nh2_stream_window = \"lots\"\nh2_connection_window = \"2GiB\"\n{OK}"
        ));
        assert_eq!(
            e,
            vec![
                "t.toml:2:29: [limits]: must be between 1 and 10000, got 0",
                "t.toml:3:20: [limits]: \"lots\" is not a size like \"512KiB\", \"10MiB\" or \"1000\"",
                "t.toml:4:24: [limits]: must be between 65535 and 2147483647 bytes, got 2147483648",
            ]
        );
    }

    #[test]
    fn a_route_cannot_edit_via_in_the_upstream_request() {
        let src = OK.replace(
            "strip_prefix = true",
            "request_headers = { remove = [\"Via\"] }\nresponse_headers = { remove = [\"via\"] }",
        );
        let e = errors(&src);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:12:31: route \"all\": a route cannot set or remove \"via\""),
            "{e:?}"
        );
        let src = OK.replace(
            "strip_prefix = true",
            "request_headers = { set = { via = \"1.1 x\" } }",
        );
        let e = errors(&src);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("t.toml:12:35: "), "{e:?}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10MiB"), Some(10 * 1024 * 1024));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }

    #[test]
    fn host_port_is_split_before_any_lookup() {
        assert_eq!(
            split_host_port("api.internal:8080"),
            Some(("api.internal", 8080))
        );
        assert_eq!(split_host_port("localhost"), None, "no port");
        assert_eq!(split_host_port(":80"), None, "no host");
        assert_eq!(split_host_port("a b:80"), None, "not a host name");
        assert_eq!(split_host_port("api:99999"), None, "not a port");
        assert_eq!(split_host_port("::1:80"), None, "IPv6 needs brackets");
    }

    #[test]
    fn a_slow_lookup_is_given_up_on() {
        let slow = within(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_secs(2));
            1
        });
        assert_eq!(slow, Err(None));
        assert_eq!(within(Duration::from_secs(5), || 2), Ok(2));
    }

    #[test]
    fn a_name_is_resolved_in_the_background_to_run_and_a_warning_to_check() {
        // `.invalid` never resolves (RFC 6761).
        let src = OK.replace("127.0.0.1:9002", "orders.invalid:9002");
        let col = src.lines().nth(6).unwrap().find("\"orders").unwrap() + 1;
        // To run: the name is resolved by the DNS task, which keeps trying (issue 27).
        let c = validate(Path::new("t.toml"), &src).unwrap();
        let named = &c.services[0].endpoints[1];
        assert_eq!(named.addr, None);
        assert_eq!(
            named.dns.as_ref().map(|d| &*d.text),
            Some("orders.invalid:9002")
        );
        let (result, warnings) = validate_for(Path::new("t.toml"), &src, Purpose::Check);
        let c = result.unwrap();
        assert_eq!(c.services[0].endpoints.len(), 2);
        assert_eq!(warnings.len(), 1);
        let want =
            format!("t.toml:7:{col}: service \"echo\": host \"orders.invalid\" does not resolve (");
        assert!(warnings[0].to_string().starts_with(&want), "{warnings:?}");
        // A malformed address is the file's problem: an error either way.
        let src = OK.replace("127.0.0.1:9002", "orders.invalid");
        let (result, warnings) = validate_for(Path::new("t.toml"), &src, Purpose::Check);
        let e = result.unwrap_err().to_string();
        assert!(
            e.contains("\"orders.invalid\" is not an address of the form host:port"),
            "{e}"
        );
        assert!(warnings.is_empty());
    }
    #[test]
    fn log_format_and_redacted_query_parameters() {
        let src = format!("{OK}\n[log]\nformat = \"json\"\nredact_query = [\"Token\", \"key\"]\n");
        let c = validate(Path::new("t.toml"), &src).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.redact_query, ["token", "key"]);
        let c = validate(Path::new("t.toml"), OK).unwrap();
        assert_eq!(c.log.format, LogFormat::Text);
        let src = format!("{OK}\n[log]\nformat = \"xml\"\nredact_query = [\"\"]\n");
        let e = errors(&src);
        assert!(e.iter().any(|e| e.contains("format must be")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("redact_query")), "{e:?}");
    }

    #[test]
    fn proxy_protocol_on_tls_listeners_needs_trusted_proxies() {
        let dir = tempfile::tempdir().unwrap();
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, issued.cert.pem()).unwrap();
        std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
        let tls = format!(
            "tls = [{{ addr = \"127.0.0.1:8443\", cert = \"{}\", key = \"{}\", proxy_protocol = true }}]",
            cert.display(),
            key.display()
        );
        let with = |extra: &str| {
            OK.replace(
                r#"http = ["127.0.0.1:8080"]"#,
                &format!("http = [\"127.0.0.1:8080\"]\n{tls}\n{extra}"),
            )
        };
        let c = validate(
            Path::new("t.toml"),
            &with("trusted_proxies = [\"10.0.0.0/8\"]"),
        )
        .unwrap();
        assert_eq!(c.listen.proxy_protocol, vec![c.listen.tls[0].addr]);
        let e = errors(&with(""));
        assert!(
            e.iter()
                .any(|e| e.contains("t.toml:4:") && e.contains("listen.trusted_proxies")),
            "{e:?}"
        );
    }

    #[test]
    fn proxy_protocol_listeners_and_trusted_proxies() {
        let src = OK.replace(
            r#"http = ["127.0.0.1:8080"]"#,
            r#"http = ["127.0.0.1:8080", { addr = "127.0.0.1:8081", proxy_protocol = true }]
trusted_proxies = ["10.0.0.0/8", "192.0.2.1"]"#,
        );
        let c = validate(Path::new("t.toml"), &src).unwrap();
        assert_eq!(c.listen.http.len(), 2);
        assert_eq!(c.listen.proxy_protocol, vec![c.listen.http[1]]);
        assert_eq!(c.listen.trusted_proxies.len(), 2);

        // PROXY headers from nobody: refused, naming the entry.
        let src = OK.replace(
            r#"http = ["127.0.0.1:8080"]"#,
            r#"http = [{ addr = "127.0.0.1:8080", proxy_protocol = true }]"#,
        );
        let e = errors(&src);
        assert!(
            e.iter()
                .any(|e| e.contains("t.toml:3:") && e.contains("listen.trusted_proxies")),
            "{e:?}"
        );
        let src = OK.replace(
            r#"http = ["127.0.0.1:8080"]"#,
            "http = [\"127.0.0.1:8080\"]\ntrusted_proxies = [\"10.0.0.0/33\"]",
        );
        let e = errors(&src);
        assert!(
            e.iter()
                .any(|e| e.contains("t.toml:4:") && e.contains("10.0.0.0/33")),
            "{e:?}"
        );
        let src = OK.replace(
            r#"http = ["127.0.0.1:8080"]"#,
            r#"http = [{ addr = "127.0.0.1:8080", proxy_protcol = true }]"#,
        );
        assert!(!errors(&src).is_empty(), "a typo is an error");
    }
}
