//! Endpoints that follow DNS: every A/AAAA record of an endpoint named `host:port` is an
//! instance, and so is every target of a service's `discovery = { dns_srv = ... }` (with
//! the record's priority and weight); resolved again on the answer's TTL (within
//! `[dns] min_ttl`/`max_ttl`).
//!
//! A failed lookup (timeout, SERVFAIL, NXDOMAIN, no records) keeps the last good answer:
//! logged once when the name starts failing and once when it answers again, counted in
//! `busbar_dns_failures_total` every time. Every address of an answer passes the address
//! policy (`Gate::admit_resolved`) before it routes. Answers become instances through
//! `Service::set_resolved`, the same merge registered instances take, so balancing,
//! health checks and ejection apply; an address that leaves DNS leaves the set like a
//! deregistered instance (requests already sent to it finish).
//!
//! Owns: the resolver (rebuilt when `[dns]` changes on reload), the refresh schedule and
//! the failure log. Must not: run on the request path, or hold a lock across an await.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use hickory_resolver::proto::rr::RData;

use crate::config::{DnsConfig, DnsName};
use crate::metrics::METRICS;
use crate::model::{Service, Target};
use crate::registry::gate::Gate;
use crate::snapshot::State;

/// The longest the task sleeps, so a reload's new names are looked up promptly.
const IDLE_AT_MOST: Duration = Duration::from_millis(500);

/// A lookup that failed, by the reason counted in the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
}

/// One good answer: the addresses and how long they are valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub targets: Vec<Target>,
    pub ttl: Duration,
}

/// What a name stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    /// An endpoint `host:port`: its A/AAAA records.
    Host(DnsName),
    /// `discovery = { dns_srv = ... }`: its SRV records' targets.
    Srv(Arc<str>),
}

impl Name {
    /// The name as configured, the key of its answers in the service.
    pub fn text(&self) -> &Arc<str> {
        match self {
            Name::Host(d) => &d.text,
            Name::Srv(s) => s,
        }
    }
}

/// `name` fully qualified: no search-list suffixes tried for a name that failed.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

fn failure(e: hickory_resolver::net::NetError) -> Failure {
    Failure {
        reason: if e.is_nx_domain() {
            "nxdomain"
        } else if e.is_no_records_found() {
            "no_records"
        } else {
            "error"
        },
        message: e.to_string(),
    }
}

/// A resolver built from `[dns]`.
pub struct Resolver {
    config: DnsConfig,
    inner: TokioResolver,
}

impl Resolver {
    /// The system's name servers unless `[dns] servers` names some.
    pub fn new(config: &DnsConfig) -> Result<Resolver, String> {
        let (rc, mut opts) = if config.servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| format!("cannot read the system's resolver config: {e}"))?
        } else {
            let servers = config
                .servers
                .iter()
                .map(|s| {
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut ns.connections {
                        c.port = s.port();
                    }
                    ns
                })
                .collect();
            (
                ResolverConfig::from_name_servers(servers),
                ResolverOpts::default(),
            )
        };
        opts.timeout = config.timeout;
        opts.attempts = config.attempts as usize;
        // busbar follows the TTL itself; a cached answer would hide a change.
        opts.cache_size = 0;
        let inner = TokioResolver::builder_with_config(rc, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| format!("cannot build the resolver: {e}"))?;
        Ok(Resolver {
            config: config.clone(),
            inner,
        })
    }

    /// Every address `name` stands for, sorted, with the answer's TTL.
    pub async fn resolve(&self, name: &Name) -> Result<Answer, Failure> {
        match name {
            Name::Host(d) => self.resolve_host(&d.host, d.port, None, 0).await,
            Name::Srv(s) => self.resolve_srv(s).await,
        }
    }

    /// Every A/AAAA address of `host`.
    async fn resolve_host(
        &self,
        host: &str,
        port: u16,
        weight: Option<u32>,
        priority: u16,
    ) -> Result<Answer, Failure> {
        let lookup = self
            .inner
            .lookup_ip(fqdn(host).as_str())
            .await
            .map_err(failure)?;
        let mut targets: Vec<Target> = lookup
            .iter()
            .map(|ip| Target {
                addr: SocketAddr::new(ip, port),
                weight,
                priority,
            })
            .collect();
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err(Failure {
                reason: "no_records",
                message: "no A or AAAA record".into(),
            });
        }
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(Instant::now());
        Ok(Answer { targets, ttl })
    }

    /// The SRV records of `name`, each target resolved; the shortest TTL of them all.
    /// A target that does not resolve is left out; none resolving is a failure.
    async fn resolve_srv(&self, name: &str) -> Result<Answer, Failure> {
        let lookup = self
            .inner
            .srv_lookup(fqdn(name).as_str())
            .await
            .map_err(failure)?;
        let mut ttl = lookup
            .valid_until()
            .saturating_duration_since(Instant::now());
        let records: Vec<(u16, u16, u16, String)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => {
                    Some((srv.priority, srv.weight, srv.port, srv.target.to_ascii()))
                }
                _ => None,
            })
            .collect();
        let mut targets = Vec::new();
        let mut last_failure = None;
        for (priority, weight, port, target) in records {
            // "." means "decidedly not available at this domain" (RFC 2782).
            if target == "." {
                continue;
            }
            match self
                .resolve_host(&target, port, Some(u32::from(weight)), priority)
                .await
            {
                Ok(a) => {
                    ttl = ttl.min(a.ttl);
                    targets.extend(a.targets);
                }
                Err(f) => last_failure = Some(f),
            }
        }
        targets.sort();
        targets.dedup_by_key(|t| t.addr);
        if targets.is_empty() {
            return Err(last_failure.unwrap_or(Failure {
                reason: "no_records",
                message: "no SRV record with a target".into(),
            }));
        }
        Ok(Answer { targets, ttl })
    }
}

/// Per (service, endpoint name): when to look again, and whether it is failing.
#[derive(Default)]
struct Schedule {
    due: HashMap<(Arc<str>, Arc<str>), Instant>,
    failing: HashSet<(Arc<str>, Arc<str>)>,
}

/// The names of every service in the snapshot, with their service.
fn names(services: &[Arc<Service>]) -> Vec<(Arc<Service>, Name)> {
    services
        .iter()
        .flat_map(|s| {
            s.config
                .endpoints
                .iter()
                .filter_map(|e| e.dns.clone().map(Name::Host))
                .chain(s.config.dns_srv.clone().map(Name::Srv))
                .map(|n| (s.clone(), n))
        })
        .collect()
}

/// Looks up `name` and applies a good answer; returns when to look again.
async fn refresh(
    resolver: &Resolver,
    gate: &Gate,
    state: &State,
    svc: &Service,
    name: &Name,
    failing: &mut HashSet<(Arc<str>, Arc<str>)>,
) -> Duration {
    let text = name.text();
    let key = (Arc::<str>::from(svc.name()), text.clone());
    match resolver.resolve(name).await {
        Ok(answer) => {
            let admitted: Vec<Target> = answer
                .targets
                .into_iter()
                .filter(|t| gate.admit_resolved(svc.name(), text, t.addr))
                .collect();
            if failing.remove(&key) {
                tracing::info!(service = svc.name(), name = %text, "endpoint name resolves again");
            }
            // A reload during the lookup built a new service (from the old one's answers):
            // the answer goes to the one requests use now.
            let now = state.load();
            let svc = now.service(svc.name()).map_or(svc, |s| &**s);
            if svc.set_resolved(text, admitted.clone()) {
                tracing::info!(service = svc.name(), name = %text, addresses = ?admitted.iter().map(|t| t.addr).collect::<Vec<_>>(), "endpoint name resolved");
            }
            resolver.config.refresh_after(answer.ttl)
        }
        Err(f) => {
            METRICS
                .dns_failures
                .with_label_values(&[svc.name(), f.reason])
                .inc();
            if failing.insert(key) {
                let kept = svc.resolved(text).map_or(0, |a| a.len());
                tracing::warn!(service = svc.name(), name = %text, reason = f.reason, kept,
                    "endpoint name does not resolve, keeping its last good answer: {}", f.message);
            }
            resolver.config.min_ttl
        }
    }
}

/// Resolves every name once, within `wait` in all: `run` calls it before serving so
/// instances behind names are there from the first request. A name that does not answer
/// in time leaves its service without those instances (503) until the task resolves it.
pub async fn resolve_all_once(state: &State, gate: &Gate, wait: Duration) {
    let snap = state.load();
    let names = names(&snap.services);
    if names.is_empty() {
        return;
    }
    let resolver = match Resolver::new(&snap.config.dns) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("endpoint names are not resolved: {e}");
            return;
        }
    };
    let all = async {
        let mut failing = HashSet::new();
        for (svc, name) in &names {
            refresh(&resolver, gate, state, svc, name, &mut failing).await;
        }
    };
    if tokio::time::timeout(wait, all).await.is_err() {
        tracing::warn!(
            waited = ?wait,
            "some endpoint names did not resolve before start: their services answer 503 until they do"
        );
    }
}

/// The background task: resolves each name again when its answer's TTL runs out.
pub struct DnsDiscovery {
    pub state: Arc<State>,
    pub gate: Arc<Gate>,
}

#[async_trait]
impl BackgroundService for DnsDiscovery {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut resolver: Option<Resolver> = None;
        let mut schedule = Schedule::default();
        loop {
            let snap = self.state.load();
            let names = names(&snap.services);
            if !names.is_empty()
                && resolver
                    .as_ref()
                    .is_none_or(|r| r.config != snap.config.dns)
            {
                resolver = match Resolver::new(&snap.config.dns) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::error!("endpoint names are not resolved: {e}");
                        None
                    }
                };
            }
            let mut next = Instant::now() + IDLE_AT_MOST;
            if let Some(r) = &resolver {
                for (svc, name) in &names {
                    let key = (Arc::<str>::from(svc.name()), name.text().clone());
                    let due = schedule.due.get(&key).copied();
                    let due = match due {
                        Some(at) if at > Instant::now() => at,
                        _ => {
                            let after = tokio::select! {
                                _ = shutdown.changed() => return,
                                after = refresh(r, &self.gate, &self.state, svc, name, &mut schedule.failing) => after,
                            };
                            let at = Instant::now() + after;
                            schedule.due.insert(key, at);
                            at
                        }
                    };
                    next = next.min(due);
                }
                // Names no longer configured leave the schedule.
                let live: HashSet<_> = names
                    .iter()
                    .map(|(s, n)| (Arc::<str>::from(s.name()), n.text().clone()))
                    .collect();
                schedule.due.retain(|k, _| live.contains(k));
                schedule.failing.retain(|k| live.contains(k));
            }
            drop(snap);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ttl_followed_is_bounded() {
        let c = DnsConfig {
            min_ttl: Duration::from_secs(2),
            max_ttl: Duration::from_secs(60),
            ..DnsConfig::default()
        };
        assert_eq!(c.refresh_after(Duration::ZERO), Duration::from_secs(2));
        assert_eq!(
            c.refresh_after(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(
            c.refresh_after(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
    }
}
