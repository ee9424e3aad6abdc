//! A route's `[route.admission]` section: who the user is, who may call, how often and
//! how many may wait.
//!
//! Owns: the file types, validated types, defaults and validation of route admission
//! (ACLs, identity sources, rate limits, queue policy).
//! Must not: hold run-time state (limiters and queues live in `admission`).

use std::net::IpAddr;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::auth::AuthConfig;
use super::validate::Validator;

/// Header busbar sets to the identity it verified; whatever the client sent is replaced.
pub const DEFAULT_IDENTITY_HEADER: &str = "x-busbar-user";
/// Users one route's rate limiter tracks at most; beyond, new users share one overflow
/// bucket until idle users are swept, so memory is bounded whatever callers send.
pub const DEFAULT_RATE_LIMIT_MAX_USERS: usize = 100_000;
/// Requests one user may have waiting for a service slot: enough to smooth a burst,
/// small enough that a flood is refused fast instead of piling up.
pub const DEFAULT_QUEUE_DEPTH: usize = 16;
/// Longest wait for a service slot; past it 503. Longer waits mostly outlive the caller's patience.
pub const DEFAULT_QUEUE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAdmissionFile {
    #[serde(default)]
    pub identity: Vec<Spanned<String>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    pub require_auth: Option<Spanned<bool>>,
    pub identity_header: Option<Spanned<String>>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow_paths: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny_paths: Vec<Spanned<String>>,
    pub normalize_path: Option<Spanned<bool>>,
    pub rate_limit: Option<RateLimitFile>,
    pub queue: Option<QueueFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub rate: Spanned<String>,
    pub burst: Option<Spanned<i64>>,
    pub global: Option<Spanned<String>>,
    pub global_burst: Option<Spanned<i64>>,
    pub max_users: Option<Spanned<i64>>,
    /// `"node"` (default) or `"cluster"` (shared through `[cluster]` Redis).
    pub scope: Option<Spanned<String>>,
    /// Routes naming the same group share its counts.
    pub group: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueFile {
    pub max_depth: Option<Spanned<i64>>,
    pub max_wait: Option<Spanned<String>>,
}

/// Where a user's identity comes from, tried in the route's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// A header set by a trusted proxy; ignored from any other client.
    Header(HeaderName),
    /// `Authorization: Bearer` JWT from the named issuer, or from any issuer (`None`).
    Jwt(Option<String>),
    /// The `[auth] api_key_header`, looked up among `[[auth.api_key]]`.
    ApiKey,
    /// The client's address: always available, never authenticated.
    ClientIp,
}

/// `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// Time one request's share of the rate takes to refill.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Per (route, user).
    pub rate: Rate,
    /// Requests a user may send at once; default: `rate.count`.
    pub burst: u32,
    /// For the whole route, all users together.
    pub global: Option<(Rate, u32)>,
    pub max_users: usize,
    /// Where the count is kept: this node, or Redis for the whole cluster.
    pub scope: LimitScope,
    /// Routes of one group count together: a user's requests to any of them share one
    /// allowance, and `global` is for the group. `None`: the route counts alone.
    pub group: Option<String>,
}

impl RateLimitConfig {
    /// What the counts are kept under: the route, or `group:NAME` for a group (route names
    /// have no `:`, so the two never meet).
    pub fn counter_key(&self, route: &str) -> String {
        match &self.group {
            Some(g) => format!("group:{g}"),
            None => route.to_string(),
        }
    }
}

/// Where a rate limit is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimitScope {
    /// Each node counts on its own: N nodes admit up to N times the rate.
    #[default]
    Node,
    /// All nodes share one count in Redis (`[cluster]`).
    Cluster,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePolicy {
    pub max_depth: usize,
    pub max_wait: Duration,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        QueuePolicy {
            max_depth: DEFAULT_QUEUE_DEPTH,
            max_wait: DEFAULT_QUEUE_WAIT,
        }
    }
}

/// A route's validated admission settings. `Default` is "no `[route.admission]`".
#[derive(Debug, Clone)]
pub struct RouteAdmission {
    /// The route has an admission section.
    pub configured: bool,
    pub identity: Vec<IdentitySource>,
    pub trusted_proxies: Vec<IpNet>,
    pub require_auth: bool,
    pub identity_header: HeaderName,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub allow_paths: Vec<String>,
    pub deny_paths: Vec<String>,
    /// Send the normalised path upstream instead of the client's.
    pub normalize_path: bool,
    pub rate_limit: Option<RateLimitConfig>,
    pub queue: QueuePolicy,
}

impl Default for RouteAdmission {
    fn default() -> Self {
        RouteAdmission {
            configured: false,
            identity: vec![IdentitySource::ClientIp],
            trusted_proxies: Vec::new(),
            require_auth: false,
            identity_header: HeaderName::from_static(DEFAULT_IDENTITY_HEADER),
            allow: Vec::new(),
            deny: Vec::new(),
            allow_paths: Vec::new(),
            deny_paths: Vec::new(),
            normalize_path: false,
            rate_limit: None,
            queue: QueuePolicy::default(),
        }
    }
}

/// `"100/s"`, `"6000/m"`, `"10/h"`, `"5/d"` or `"3/10s"` (any duration after the slash).
pub fn parse_rate(s: &str) -> Option<Rate> {
    let (n, per) = s.trim().split_once('/')?;
    let count: u32 = n.trim().parse().ok().filter(|&c| c > 0)?;
    let per = match per.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86_400),
        other => humantime::parse_duration(other).ok()?,
    };
    // A one-request interval under a microsecond is not a limit anyone means.
    (per / count >= Duration::from_micros(1)).then_some(Rate { count, per })
}

fn cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

impl Validator<'_> {
    pub(super) fn cidrs(&mut self, list: &[Spanned<String>], ctx: &str) -> Vec<IpNet> {
        let mut out = Vec::with_capacity(list.len());
        for c in list {
            match cidr(c.get_ref()) {
                Some(n) => out.push(n),
                None => self.err(
                    c.span(),
                    ctx,
                    format!(
                        "\"{}\" is not a CIDR like \"10.0.0.0/8\" or an IP address",
                        c.get_ref()
                    ),
                ),
            }
        }
        out
    }

    fn acl_paths(&mut self, list: &[Spanned<String>], ctx: &str) -> Vec<String> {
        let mut out = Vec::with_capacity(list.len());
        for p in list {
            let v = p.get_ref();
            let normal = crate::base::path::normalize_path(v);
            if !v.starts_with('/') || v.bytes().any(|b| b <= b' ' || b == b'?' || b == b'#') {
                self.err(
                    p.span(),
                    ctx,
                    "an ACL path starts with '/' and has no spaces, '?' or '#'",
                );
            } else if normal != v.as_str() {
                self.err(
                    p.span(),
                    ctx,
                    format!("ACL paths are matched on normalised paths: write \"{normal}\""),
                );
            } else {
                out.push(v.trim_end_matches('/').to_string());
            }
        }
        out
    }

    fn rate(&mut self, r: &Spanned<String>, ctx: &str) -> Option<Rate> {
        let rate = parse_rate(r.get_ref());
        if rate.is_none() {
            self.err(
                r.span(),
                ctx,
                format!(
                    "\"{}\" is not a rate like \"100/s\", \"6000/m\" or \"10/h\"",
                    r.get_ref()
                ),
            );
        }
        rate
    }

    /// The first route of a group sets its limit; the others must say the same, since they
    /// share one count.
    fn rate_group(&mut self, g: &Spanned<String>, config: &RateLimitConfig, ctx: &str) {
        match self.rate_groups.get(g.get_ref()) {
            None => {
                self.rate_groups
                    .insert(g.get_ref().clone(), (config.clone(), ctx.to_string()));
            }
            Some((first, _)) if first == config => {}
            Some((_, first_ctx)) => {
                let msg = format!(
                    "rate-limit group \"{}\" is set differently in {first_ctx}: the routes of a group share one limit, so rate, burst, global, max_users and scope must be the same",
                    g.get_ref()
                );
                self.err(g.span(), ctx, msg);
            }
        }
    }

    pub(super) fn route_admission(
        &mut self,
        f: Option<&RouteAdmissionFile>,
        auth: &AuthConfig,
        ctx: &str,
    ) -> RouteAdmission {
        let mut out = RouteAdmission::default();
        let Some(f) = f else {
            return out;
        };
        out.configured = true;
        out.trusted_proxies = self.cidrs(&f.trusted_proxies, ctx);
        if !f.identity.is_empty() {
            out.identity.clear();
        }
        for s in &f.identity {
            let v = s.get_ref().as_str();
            let source = match v.split_once(':') {
                None if v == "client_ip" => Some(IdentitySource::ClientIp),
                None if v == "api_key" => {
                    if auth.api_keys.is_empty() {
                        self.err(
                            s.span(),
                            ctx,
                            "identity \"api_key\" needs [[auth.api_key]] entries",
                        );
                    }
                    Some(IdentitySource::ApiKey)
                }
                None if v == "jwt" => {
                    if auth.jwt.is_empty() {
                        self.err(
                            s.span(),
                            ctx,
                            "identity \"jwt\" needs an [[auth.jwt]] issuer",
                        );
                    }
                    Some(IdentitySource::Jwt(None))
                }
                Some(("jwt", name)) => {
                    if !auth.jwt.iter().any(|j| j.name == name) {
                        self.err(
                            s.span(),
                            ctx,
                            format!("no [[auth.jwt]] issuer named \"{name}\""),
                        );
                    }
                    Some(IdentitySource::Jwt(Some(name.to_string())))
                }
                Some(("header", name)) => match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(h) => {
                        if f.trusted_proxies.is_empty() {
                            self.err(
                                s.span(),
                                ctx,
                                "a header identity is only believed from trusted_proxies: list them",
                            );
                        }
                        Some(IdentitySource::Header(h))
                    }
                    Err(_) => None,
                },
                _ => None,
            };
            match source {
                Some(src) => out.identity.push(src),
                None => self.err(
                    s.span(),
                    ctx,
                    "identity entries are \"header:NAME\", \"jwt\", \"jwt:ISSUER\", \"api_key\" or \"client_ip\"",
                ),
            }
        }
        out.require_auth = f.require_auth.as_ref().is_some_and(|r| *r.get_ref());
        if let Some(h) = &f.identity_header {
            match HeaderName::from_bytes(h.get_ref().as_bytes()) {
                Ok(n) => out.identity_header = n,
                Err(_) => self.err(h.span(), ctx, "not a valid header name"),
            }
        }
        out.allow = self.cidrs(&f.allow, ctx);
        out.deny = self.cidrs(&f.deny, ctx);
        out.allow_paths = self.acl_paths(&f.allow_paths, ctx);
        out.deny_paths = self.acl_paths(&f.deny_paths, ctx);
        out.normalize_path = f.normalize_path.as_ref().is_some_and(|b| *b.get_ref());
        if let Some(r) = &f.rate_limit {
            let rate = self.rate(&r.rate, ctx);
            let burst = self.int(&r.burst, ctx, 1, 1_000_000).map(|n| n as u32);
            let global = r.global.as_ref().and_then(|g| self.rate(g, ctx));
            let global_burst = self
                .int(&r.global_burst, ctx, 1, 10_000_000)
                .map(|n| n as u32);
            if r.global.is_none() {
                if let Some(b) = &r.global_burst {
                    self.err(b.span(), ctx, "global_burst needs global");
                }
            }
            let max_users = self
                .int(&r.max_users, ctx, 1, 10_000_000)
                .map_or(DEFAULT_RATE_LIMIT_MAX_USERS, |n| n as usize);
            let scope = match r.scope.as_ref().map(|s| (s, s.get_ref().as_str())) {
                None | Some((_, "node")) => LimitScope::Node,
                Some((_, "cluster")) => LimitScope::Cluster,
                Some((s, _)) => {
                    self.err(s.span(), ctx, "scope is \"node\" or \"cluster\"");
                    LimitScope::Node
                }
            };
            if let Some(g) = &r.group {
                if !super::validate::valid_identifier(g.get_ref()) {
                    self.err(
                        g.span(),
                        ctx,
                        "a group name is 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter",
                    );
                }
            }
            if let Some(rate) = rate {
                let config = RateLimitConfig {
                    scope,
                    rate,
                    burst: burst.unwrap_or(rate.count),
                    global: global.map(|g| (g, global_burst.unwrap_or(g.count))),
                    max_users,
                    group: r.group.as_ref().map(|g| g.get_ref().clone()),
                };
                if let Some(g) = &r.group {
                    self.rate_group(g, &config, ctx);
                }
                out.rate_limit = Some(config);
            }
        }
        if let Some(q) = &f.queue {
            out.queue = QueuePolicy {
                max_depth: self
                    .int(&q.max_depth, ctx, 0, 100_000)
                    .map_or(DEFAULT_QUEUE_DEPTH, |n| n as usize),
                max_wait: self.duration(&q.max_wait, ctx, DEFAULT_QUEUE_WAIT),
            };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let r = parse_rate("100/s").unwrap();
        assert_eq!((r.count, r.per), (100, Duration::from_secs(1)));
        assert_eq!(
            parse_rate("6000/m").unwrap().interval(),
            Duration::from_millis(10)
        );
        assert_eq!(parse_rate("3/10s").unwrap().per, Duration::from_secs(10));
        assert_eq!(parse_rate("0/s"), None);
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_rate("10/lightyear"), None);
        assert_eq!(parse_rate("4000000000/s"), None);
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(cidr("::1").unwrap().to_string(), "::1/128");
        assert!(cidr("10.0.0.0/33").is_none());
    }
}
