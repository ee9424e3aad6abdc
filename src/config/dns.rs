//! The `[dns]` section: how endpoints named by host (and SRV names) are resolved, and
//! how often they are resolved again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::validate::Validator;

/// How long one DNS query waits for an answer (hickory's and glibc's default).
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries per name server before a lookup fails (glibc's default).
pub const DEFAULT_DNS_ATTEMPTS: u32 = 2;
/// A record's TTL is never followed more often than this: a TTL of 0 would otherwise
/// make busbar query DNS in a loop (Envoy's `dns_min_refresh_rate` is 5 s).
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(5);
/// ... nor less often than this, so a long TTL still notices a change within minutes.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(300);
/// How long `run` waits for names that have not resolved yet before it starts serving
/// (their services answer 503 until they do).
pub const DEFAULT_START_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsFile {
    pub servers: Option<Vec<Spanned<String>>>,
    pub timeout: Option<Spanned<String>>,
    pub attempts: Option<Spanned<i64>>,
    pub min_ttl: Option<Spanned<String>>,
    pub max_ttl: Option<Spanned<String>>,
    pub start_wait: Option<Spanned<String>>,
}

/// How names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers to ask (`ip:port`); empty: the system's (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub attempts: u32,
    /// Bounds on the TTL followed: a name is resolved again after its TTL, within these.
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// How long `run` waits for the first answers.
    pub start_wait: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            timeout: DEFAULT_DNS_TIMEOUT,
            attempts: DEFAULT_DNS_ATTEMPTS,
            min_ttl: DEFAULT_MIN_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            start_wait: DEFAULT_START_WAIT,
        }
    }
}

impl DnsConfig {
    /// When to resolve again after an answer valid for `ttl`.
    pub fn refresh_after(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min_ttl, self.max_ttl)
    }
}

/// An endpoint named by host: every address the name resolves to is an instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsName {
    pub host: Arc<str>,
    pub port: u16,
    /// `host:port` as written, shown with the instances it gave.
    pub text: Arc<str>,
}

impl Validator<'_> {
    pub(super) fn dns(&mut self, f: Option<&DnsFile>) -> DnsConfig {
        let Some(f) = f else {
            return DnsConfig::default();
        };
        let ctx = "dns";
        let mut servers = Vec::new();
        for s in f.servers.iter().flatten() {
            match s.get_ref().parse::<SocketAddr>() {
                Ok(a) => servers.push(a),
                Err(_) => match s.get_ref().parse::<std::net::IpAddr>() {
                    Ok(ip) => servers.push(SocketAddr::new(ip, 53)),
                    Err(_) => self.err(
                        s.span(),
                        ctx,
                        format!(
                            "servers: \"{}\" is not an address like \"10.0.0.2:53\"",
                            s.get_ref()
                        ),
                    ),
                },
            }
        }
        let timeout = self.duration(&f.timeout, ctx, DEFAULT_DNS_TIMEOUT);
        let attempts = self
            .int(&f.attempts, ctx, 1, 10)
            .map_or(DEFAULT_DNS_ATTEMPTS, |n| n as u32);
        let min_ttl = self.duration(&f.min_ttl, ctx, DEFAULT_MIN_TTL);
        let max_ttl = self.duration(&f.max_ttl, ctx, DEFAULT_MAX_TTL);
        if min_ttl > max_ttl {
            if let Some(m) = &f.min_ttl {
                self.err(m.span(), ctx, "min_ttl must not be above max_ttl");
            } else if let Some(m) = &f.max_ttl {
                self.err(
                    m.span(),
                    ctx,
                    format!(
                        "max_ttl must not be below min_ttl ({}s by default)",
                        DEFAULT_MIN_TTL.as_secs()
                    ),
                );
            }
        }
        let start_wait = self.duration(&f.start_wait, ctx, DEFAULT_START_WAIT);
        DnsConfig {
            servers,
            timeout,
            attempts,
            min_ttl,
            max_ttl: max_ttl.max(min_ttl),
            start_wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn errors(dns: &str) -> Vec<String> {
        let src = format!(
            "[listen]\nhttp = [\"127.0.0.1:8080\"]\n[dns]\n{dns}\n[[service]]\nname = \"s\"\nendpoints = [{{ addr = \"127.0.0.1:9001\" }}]\n[[route]]\nname = \"r\"\nservice = \"s\"\n"
        );
        match super::super::parse(Path::new("t.toml"), &src) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn dns_settings_are_checked_with_their_place() {
        assert!(errors("servers = [\"127.0.0.1:5353\", \"10.0.0.2\"]\nattempts = 3").is_empty());
        assert_eq!(
            errors("servers = [\"dns.internal\"]"),
            ["t.toml:4:12: dns: servers: \"dns.internal\" is not an address like \"10.0.0.2:53\""]
        );
        assert_eq!(
            errors("min_ttl = \"10s\"\nmax_ttl = \"5s\""),
            ["t.toml:4:11: dns: min_ttl must not be above max_ttl"]
        );
        let e = errors("attempts = 0\ntypo = 1");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("unknown field `typo`"), "{e:?}");
    }
}
