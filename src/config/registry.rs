//! The `[registry]` section: where services register and how long registrations live.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::model::ServerSettings;
use super::validate::Validator;

/// Registration API listener. Loopback by default: set it to a routable address to let
/// services on other hosts register (they still need a token).
pub const DEFAULT_REGISTRY_ADDR: &str = "127.0.0.1:9902";
/// TTL when a registration names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Shortest TTL (etcd's minimum lease is 2 s).
pub const MIN_TTL: Duration = Duration::from_secs(2);
/// Longest TTL.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Self-preservation starts when the renewals seen over the instances' current leases
/// fall below this share of those expected (Eureka's 85%; see `registry::store`).
pub const DEFAULT_RENEWAL_THRESHOLD: f64 = 0.85;
/// One expiry sweep removes at most this share of a service's instances (at least one).
pub const DEFAULT_MAX_EXPIRY_SHARE: f64 = 0.15;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    pub listen: Option<Spanned<String>>,
    pub backend: Option<Spanned<String>>,
    pub snapshot: Option<Spanned<String>>,
    pub default_ttl: Option<Spanned<String>>,
    pub renewal_threshold: Option<Spanned<f64>>,
    pub max_expiry_share: Option<Spanned<f64>>,
    pub etcd: Option<EtcdFile>,
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFile {
    pub endpoints: Vec<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// Name of the environment variable holding the token (secrets stay out of the file).
    pub token_env: Option<Spanned<String>>,
    /// Or the token's SHA-256, hex.
    pub token_sha256: Option<Spanned<String>>,
    pub services: Vec<Spanned<String>>,
    /// CIDRs the token's instances (and their sidecars) may use; absent: any address the
    /// address policy allows.
    pub addresses: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RegistryBackend {
    /// The node's own registry, persisted to its snapshot file.
    Embedded,
    /// Shared through etcd: instance keys under `prefix`, bound to leases.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

/// A registration token: its SHA-256, the services it may touch (`*`: all) and the
/// networks its instances may be in (empty: any).
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryToken {
    pub sha256: [u8; 32],
    pub services: Vec<String>,
    pub addresses: Vec<IpNet>,
}

impl RegistryToken {
    /// Whether the token may touch `service`.
    pub fn allows(&self, service: &str) -> bool {
        self.services.iter().any(|s| s == "*" || s == service)
    }

    /// Whether the token may see and touch every service (`*`).
    pub fn is_wildcard(&self) -> bool {
        self.services.iter().any(|s| s == "*")
    }

    /// Whether an instance registered with this token may use `ip` (IPv4-mapped IPv6
    /// addresses are judged as the IPv4 address they reach).
    pub fn allows_address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.addresses.is_empty() || self.addresses.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RegistryConfig {
    pub listen: SocketAddr,
    pub backend: RegistryBackend,
    pub snapshot: PathBuf,
    pub default_ttl: Duration,
    pub renewal_threshold: f64,
    pub max_expiry_share: f64,
    pub tokens: Vec<RegistryToken>,
}

fn share(v: &mut Validator<'_>, s: &Option<Spanned<f64>>, default: f64) -> f64 {
    match s {
        Some(x) if (0.0..=1.0).contains(x.get_ref()) => *x.get_ref(),
        Some(x) => {
            v.err(x.span(), "[registry]", "must be between 0.0 and 1.0");
            default
        }
        None => default,
    }
}

impl Validator<'_> {
    pub(super) fn registry(
        &mut self,
        f: Option<&RegistryFile>,
        server: &ServerSettings,
        services: &HashSet<String>,
    ) -> RegistryConfig {
        let ctx = "[registry]";
        let default_addr: SocketAddr = DEFAULT_REGISTRY_ADDR
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9902)));
        let Some(f) = f else {
            return RegistryConfig {
                listen: default_addr,
                backend: RegistryBackend::Embedded,
                snapshot: server.runtime_dir.join("busbar-registry.json"),
                default_ttl: DEFAULT_TTL,
                renewal_threshold: DEFAULT_RENEWAL_THRESHOLD,
                max_expiry_share: DEFAULT_MAX_EXPIRY_SHARE,
                tokens: Vec::new(),
            };
        };
        let listen = f
            .listen
            .as_ref()
            .and_then(|a| self.addr(a, ctx))
            .unwrap_or(default_addr);
        let backend = match f.backend.as_ref().map(|b| b.get_ref().as_str()) {
            None | Some("embedded") => {
                if f.etcd.is_some() {
                    let span = f.backend.as_ref().map_or(0..0, |b| b.span());
                    self.err(
                        span,
                        ctx,
                        "[registry.etcd] is set but backend is not \"etcd\"",
                    );
                }
                RegistryBackend::Embedded
            }
            Some("etcd") => match &f.etcd {
                Some(e) if !e.endpoints.is_empty() => RegistryBackend::Etcd {
                    endpoints: e.endpoints.iter().map(|s| s.get_ref().clone()).collect(),
                    prefix: e
                        .prefix
                        .as_ref()
                        .map_or_else(|| "/busbar/services/".to_string(), |p| p.get_ref().clone()),
                },
                _ => {
                    let span = f.backend.as_ref().map_or(0..0, |b| b.span());
                    self.err(span, ctx, "backend = \"etcd\" needs [registry.etcd] endpoints = [\"http://host:2379\"]");
                    RegistryBackend::Embedded
                }
            },
            Some(_) => {
                let span = f.backend.as_ref().map_or(0..0, |b| b.span());
                self.err(span, ctx, "backend must be \"embedded\" or \"etcd\"");
                RegistryBackend::Embedded
            }
        };
        let snapshot = f.snapshot.as_ref().map_or_else(
            || server.runtime_dir.join("busbar-registry.json"),
            |p| self.path(p.get_ref()),
        );
        let default_ttl = self.duration(&f.default_ttl, ctx, DEFAULT_TTL);
        if !(MIN_TTL..=MAX_TTL).contains(&default_ttl) {
            let span = f.default_ttl.as_ref().map_or(0..0, |d| d.span());
            self.err(span, ctx, "default_ttl must be between 2s and 1h");
        }
        let renewal_threshold = share(self, &f.renewal_threshold, DEFAULT_RENEWAL_THRESHOLD);
        let max_expiry_share = share(self, &f.max_expiry_share, DEFAULT_MAX_EXPIRY_SHARE);
        let mut tokens = Vec::new();
        for t in &f.tokens {
            if let Some(tok) = self.token(t, services) {
                tokens.push(tok);
            }
        }
        RegistryConfig {
            listen,
            backend,
            snapshot,
            default_ttl,
            renewal_threshold,
            max_expiry_share,
            tokens,
        }
    }

    fn token(&mut self, t: &TokenFile, services: &HashSet<String>) -> Option<RegistryToken> {
        let ctx = "[[registry.token]]";
        let sha256 = match (&t.token_env, &t.token_sha256) {
            (Some(env), None) => match std::env::var(env.get_ref()) {
                Ok(v) if !v.is_empty() => {
                    use sha2::Digest;
                    sha2::Sha256::digest(v.as_bytes()).into()
                }
                _ => {
                    self.host_problem(
                        env.span(),
                        ctx,
                        format!("environment variable {} is not set", env.get_ref()),
                    );
                    if !self.checking() {
                        return None;
                    }
                    // `check` goes on with the rest of the token; no token hashes to this.
                    [0; 32]
                }
            },
            (None, Some(hex)) => match super::auth::parse_sha256_hex(hex.get_ref()) {
                Some(h) => h,
                None => {
                    self.err(hex.span(), ctx, "token_sha256 must be 64 hex digits");
                    return None;
                }
            },
            (Some(env), Some(_)) => {
                self.err(
                    env.span(),
                    ctx,
                    "set either token_env or token_sha256, not both",
                );
                return None;
            }
            (None, None) => {
                let span = t.services.first().map_or(0..0, |s| s.span());
                self.err(span, ctx, "a token needs token_env or token_sha256");
                return None;
            }
        };
        // Where a problem of the whole token is reported: its secret's key.
        let token_span = t
            .token_env
            .as_ref()
            .or(t.token_sha256.as_ref())
            .map_or(0..0, |s| s.span());
        if t.services.is_empty() {
            self.err(
                token_span.clone(),
                ctx,
                "a token needs services = [\"name\", ...] (or [\"*\"])",
            );
        }
        for s in &t.services {
            if s.get_ref() != "*" && !services.contains(s.get_ref()) {
                self.err(
                    s.span(),
                    ctx,
                    format!("unknown service \"{}\"", s.get_ref()),
                );
            }
        }
        let addresses = match &t.addresses {
            None => Vec::new(),
            Some(list) if list.is_empty() => {
                self.err(
                    token_span,
                    ctx,
                    "addresses = [] would refuse every instance: list CIDRs like \"10.20.0.0/16\", or leave addresses out",
                );
                Vec::new()
            }
            Some(list) => self.cidrs(list, ctx),
        };
        Some(RegistryToken {
            sha256,
            services: t.services.iter().map(|s| s.get_ref().clone()).collect(),
            addresses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_addresses_judge_mapped_addresses_as_ipv4() {
        let token = |nets: &[&str]| RegistryToken {
            sha256: [0; 32],
            services: vec!["orders".into()],
            addresses: nets.iter().map(|n| n.parse().unwrap()).collect(),
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let any = token(&[]);
        assert!(any.allows_address(ip("192.168.1.1")));
        let t = token(&["10.20.0.0/16", "fd00::/8"]);
        assert!(t.allows_address(ip("10.20.255.1")));
        assert!(t.allows_address(ip("::ffff:10.20.0.9")));
        assert!(t.allows_address(ip("fd12::1")));
        assert!(!t.allows_address(ip("10.21.0.1")));
        assert!(!t.allows_address(ip("::ffff:10.21.0.1")));
        assert!(!t.allows_address(ip("::1")));
    }
}
