//! What busbar knows of each service: its instances, their health, and how to pick one.
//!
//! Owns: [`Service`] (runtime form of a configured service), [`Instance`], the immutable
//! [`InstanceSet`] the request path reads through an `ArcSwap`, and the state each
//! instance carries: its health (`health`), its sidecar path (`sidecar`), its version
//! (`versions`), what it registered with (`registration`), and the balancer built for
//! each set (`balance`).
//! Must not: do I/O or import anything above it but `config` and `metrics` (probes are
//! the health checker's, registration the registry's; see ARCHITECTURE.md).

pub mod balance;
pub mod health;
pub mod registration;
pub mod sidecar;
pub mod versions;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

use rustls::pki_types::ServerName;

use crate::config::{ServiceConfig, UpstreamTls};
use crate::metrics::ServiceMetrics;
use crate::model::balance::Balancer;
use crate::model::health::{now_ms, InstanceHealth};
use crate::model::registration::Registration;
use crate::model::sidecar::SidecarState;

/// One place a service runs.
#[derive(Debug)]
pub struct Instance {
    /// Stable id: the address for instances listed in the config file, the registered id
    /// for the others.
    pub id: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub health: Arc<InstanceHealth>,
    /// What the instance registered with; `None` for instances from the config file.
    pub registration: Option<Arc<Registration>>,
    /// Its sidecar's address and state, when it registered one.
    pub sidecar: Option<(SocketAddr, Arc<SidecarState>)>,
    /// The endpoint name (`host:port`) or SRV name it was resolved from, for instances
    /// from DNS.
    pub dns: Option<Arc<str>>,
    /// Its SRV priority (lower first; the others are fallback); 0 for the rest.
    pub priority: u16,
    /// Reached over TLS (its app port and its sidecar alike): how. `None`: plaintext.
    pub tls: Option<Arc<TlsPeer>>,
}

/// How one instance is reached over TLS: its service's settings and the name it is asked
/// for. Built with the instance, so a connect only clones what is here.
#[derive(Debug)]
pub struct TlsPeer {
    /// The service's TLS client (CA, client certificate, verification).
    pub config: Arc<UpstreamTls>,
    /// The SNI sent and the name its certificate must carry: `server_name`, else the
    /// endpoint's host name, else the instance's IP address (no SNI is sent for an IP;
    /// the certificate must list it).
    pub name: ServerName<'static>,
    /// `name` as text, for pingora's peer (which reads an IP address back as one).
    pub sni: String,
    /// Tells the own engine's pooled connections apart: one made for another name or
    /// another configuration at the same address is never handed out for this one.
    pub pool_key: u64,
}

impl TlsPeer {
    /// The TLS way to an instance at `addr` of a service whose TLS client is `config`;
    /// `host` is the endpoint's host name when it was written as one.
    pub fn new(config: &Arc<UpstreamTls>, host: Option<&str>, addr: SocketAddr) -> TlsPeer {
        let name = config
            .server_name
            .clone()
            .or_else(|| {
                host.and_then(|h| ServerName::try_from(h).ok())
                    .map(|n| n.to_owned())
            })
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let sni = match &name {
            ServerName::DnsName(d) => d.as_ref().to_string(),
            ServerName::IpAddress(_) => addr.ip().to_string(),
            _ => String::new(),
        };
        let pool_key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            config.id.hash(&mut h);
            sni.hash(&mut h);
            // Never 0: the pool's key for plaintext.
            h.finish() | 1
        };
        TlsPeer {
            config: config.clone(),
            name,
            sni,
            pool_key,
        }
    }
}

impl Instance {
    /// May take traffic by at least one path: its app port, or its sidecar.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.health.is_available() || self.sidecar.as_ref().is_some_and(|(_, s)| s.is_up())
    }
}

/// An immutable view of a service's instances with the balancer built for them.
#[derive(Debug)]
pub struct InstanceSet {
    pub instances: Vec<Arc<Instance>>,
    pub balancer: Balancer,
    /// Which version each instance runs, for gray release and per-version metrics.
    pub versions: versions::VersionIndex,
    /// When instances differ in SRV priority: one balancer per priority, lowest first.
    /// Only the lowest priority with an available instance takes traffic; a balancer
    /// of its own keeps its weights exact (skipping other priorities' instances in one
    /// shared smooth-weighted sequence would skew them).
    tiers: Vec<Tier>,
}

/// The instances of one SRV priority.
#[derive(Debug)]
struct Tier {
    instances: Vec<Arc<Instance>>,
    /// Each one's index in the whole set.
    index: Vec<usize>,
    balancer: Balancer,
}

impl InstanceSet {
    pub fn new(service: &ServiceConfig, instances: Vec<Arc<Instance>>) -> Self {
        let balancer = Balancer::new(service.balance, &instances);
        let versions = versions::VersionIndex::new(service, &instances);
        let mut priorities: Vec<u16> = instances.iter().map(|i| i.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let tiers = if priorities.len() < 2 {
            Vec::new()
        } else {
            priorities
                .into_iter()
                .map(|priority| {
                    let index: Vec<usize> = (0..instances.len())
                        .filter(|&i| instances[i].priority == priority)
                        .collect();
                    let members: Vec<Arc<Instance>> =
                        index.iter().map(|&i| instances[i].clone()).collect();
                    Tier {
                        balancer: Balancer::new(service.balance, &members),
                        instances: members,
                        index,
                    }
                })
                .collect()
        };
        InstanceSet {
            instances,
            balancer,
            versions,
            tiers,
        }
    }

    /// Picks an index into `instances` among the `eligible`, with the set's balancer; in
    /// a set with SRV priorities, from the lowest priority that has an available instance
    /// (all of them when none has one).
    #[inline]
    pub fn pick(&self, key: u64, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let active = self
            .tiers
            .iter()
            .find(|t| t.instances.iter().any(|i| i.is_available()));
        match active {
            Some(t) => t
                .balancer
                .pick(&t.instances, key, |j| {
                    t.index.get(j).is_some_and(|&i| eligible(i))
                })
                .and_then(|j| t.index.get(j).copied()),
            None => self.balancer.pick(&self.instances, key, eligible),
        }
    }

    pub fn available(&self) -> usize {
        self.instances.iter().filter(|i| i.is_available()).count()
    }
}

/// A configured service at run time.
#[derive(Debug)]
pub struct Service {
    pub config: ServiceConfig,
    instances: ArcSwap<InstanceSet>,
    /// Set by the health checker when fewer than `panic_threshold`% of instances are
    /// available: the balancer then spreads over all of them.
    pub panic: AtomicBool,
    pub retry_budget: RetryBudget,
    pub metrics: ServiceMetrics,
    /// The last good answer for each endpoint name (`DnsName::text`): kept when DNS
    /// fails, carried over a reload. Also serialises rebuilding the instance set, so a
    /// DNS answer and a registration applied at once cannot undo each other.
    resolved: Mutex<Resolved>,
}

/// Addresses by endpoint name or SRV name.
pub type Resolved = HashMap<Arc<str>, Arc<[Target]>>;

/// One address from a DNS answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub addr: SocketAddr,
    /// The SRV record's weight; `None` for A/AAAA records (the endpoint's weight).
    pub weight: Option<u32>,
    /// The SRV record's priority; 0 for A/AAAA records.
    pub priority: u16,
}

impl Service {
    /// Builds a service from its config and its registered instances, keeping the
    /// health of instances `previous` already knew.
    pub fn new(
        config: ServiceConfig,
        previous: Option<&Service>,
        registered: &[Arc<Registration>],
    ) -> Self {
        let old = previous.map(|p| p.instances());
        // Answers for names this config still lists, so a reload re-resolves nothing.
        let resolved: Resolved = previous
            .map(|p| {
                let prev = p.lock_resolved();
                config
                    .endpoints
                    .iter()
                    .filter_map(|e| e.dns.as_ref().map(|d| &d.text))
                    .chain(config.dns_srv.as_ref())
                    .filter_map(|n| prev.get(n).map(|a| (n.clone(), a.clone())))
                    .collect()
            })
            .unwrap_or_default();
        let instances = Self::merge(&config, old.as_deref(), registered, &resolved);
        let set = InstanceSet::new(&config, instances);
        let retry_budget =
            RetryBudget::new(config.retry.budget, config.retry.min_retries_per_second);
        let metrics = ServiceMetrics::new(&config.name);
        Service {
            config,
            instances: ArcSwap::from_pointee(set),
            panic: AtomicBool::new(false),
            retry_budget,
            metrics,
            resolved: Mutex::new(resolved),
        }
    }

    fn lock_resolved(&self) -> MutexGuard<'_, Resolved> {
        self.resolved.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The current instances; load once per request.
    #[inline]
    pub fn instances(&self) -> Arc<InstanceSet> {
        self.instances.load_full()
    }

    /// Static endpoints plus registered instances; an instance keeps its health when
    /// the old set had the same id at the same address.
    fn merge(
        config: &ServiceConfig,
        old: Option<&InstanceSet>,
        registered: &[Arc<Registration>],
        resolved: &Resolved,
    ) -> Vec<Arc<Instance>> {
        let previous = |id: &str, addr: SocketAddr| {
            old.and_then(|set| set.instances.iter().find(|i| i.id == id && i.addr == addr))
        };
        let health_of = |id: &str, addr: SocketAddr| -> Arc<InstanceHealth> {
            previous(id, addr)
                .map(|i| i.health.clone())
                .unwrap_or_default()
        };
        let sidecar_of = |r: &Registration| {
            let addr = r.sidecar?;
            let state = previous(&r.id, r.address)
                .and_then(|i| i.sidecar.as_ref())
                .filter(|(a, _)| *a == addr)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            Some((addr, state))
        };
        // An https or h2 service's instances are all reached over TLS; an http1 or h2c
        // one's only those that registered saying so (the service's `tls` is built for
        // those).
        let https = config.protocol.is_tls();
        let tls_to = |on: bool, host: Option<&str>, addr: SocketAddr| {
            let config = config.tls.as_ref().filter(|_| on)?;
            Some(Arc::new(TlsPeer::new(config, host, addr)))
        };
        let mut out: Vec<Arc<Instance>> = Vec::with_capacity(config.endpoints.len());
        let mut push = |addr: SocketAddr,
                        weight: u32,
                        dns: Option<(&Arc<str>, Option<&str>)>,
                        priority: u16| {
            let id = addr.to_string();
            out.push(Arc::new(Instance {
                health: health_of(&id, addr),
                id,
                addr,
                weight,
                registration: None,
                sidecar: None,
                tls: tls_to(https, dns.and_then(|(_, host)| host), addr),
                dns: dns.map(|(name, _)| name.clone()),
                priority,
            }));
        };
        for e in &config.endpoints {
            match (&e.addr, &e.dns) {
                (Some(a), _) => push(*a, e.weight, None, 0),
                // A name not resolved yet has no instance: nothing is known to route to.
                (None, Some(d)) => {
                    for t in resolved.get(&d.text).map_or(&[][..], |a| &a[..]) {
                        push(t.addr, e.weight, Some((&d.text, Some(&d.host))), 0);
                    }
                }
                (None, None) => {}
            }
        }
        if let Some(srv) = &config.dns_srv {
            for t in resolved.get(srv).map_or(&[][..], |a| &a[..]) {
                // SRV weight 0 means "rarely", not "never" (RFC 2782). The SRV target's
                // name is not kept: TLS to it is asked for by `server_name` or by IP.
                push(
                    t.addr,
                    t.weight.unwrap_or(1).max(1),
                    Some((srv, None)),
                    t.priority,
                );
            }
        }
        if config.registration {
            out.extend(registered.iter().map(|r| {
                Arc::new(Instance {
                    tls: tls_to(https || r.tls == Some(true), None, r.address),
                    health: health_of(&r.id, r.address),
                    id: r.id.clone(),
                    addr: r.address,
                    weight: r.weight,
                    sidecar: sidecar_of(r),
                    registration: Some(r.clone()),
                    dns: None,
                    priority: 0,
                })
            }));
        }
        out
    }

    /// Replaces the registered part of the instance set. Requests already sent keep
    /// their instance; only new picks see the change.
    pub fn set_registered(&self, registered: &[Arc<Registration>]) {
        let resolved = self.lock_resolved();
        let old = self.instances();
        let instances = Self::merge(&self.config, Some(&old), registered, &resolved);
        self.instances
            .store(Arc::new(InstanceSet::new(&self.config, instances)));
    }

    /// Replaces the addresses endpoint `name` resolved to (the DNS task's good answer).
    /// Returns whether anything changed; an unchanged answer rebuilds nothing.
    pub fn set_resolved(&self, name: &Arc<str>, addrs: Vec<Target>) -> bool {
        let mut resolved = self.lock_resolved();
        if resolved.get(name).is_some_and(|a| **a == *addrs) {
            return false;
        }
        resolved.insert(name.clone(), addrs.into());
        let old = self.instances();
        // The registered part stays as the last `set_registered` left it (the lock
        // orders the two).
        let registered: Vec<_> = old
            .instances
            .iter()
            .filter_map(|i| i.registration.clone())
            .collect();
        let instances = Self::merge(&self.config, Some(&old), &registered, &resolved);
        self.instances
            .store(Arc::new(InstanceSet::new(&self.config, instances)));
        true
    }

    /// The last good answer for endpoint `name`, if it ever resolved.
    pub fn resolved(&self, name: &str) -> Option<Arc<[Target]>> {
        self.lock_resolved().get(name).cloned()
    }

    /// Recomputes panic mode from the current availability.
    pub fn refresh_panic(&self) {
        let set = self.instances();
        let total = set.instances.len();
        let available = set.available();
        let panic = total > 0 && available * 100 < total * self.config.panic_threshold as usize;
        self.panic.store(panic, Relaxed);
    }
}

/// Retries allowed as a share of requests, plus a floor per second (linkerd's budget idea).
///
/// Each request deposits `ratio` of a token, each retry withdraws one; deposits are
/// capped at 10 s worth of the floor plus what requests deposit, so a burst of
/// failures can't be retried more than the budget allows.
#[derive(Debug)]
pub struct RetryBudget {
    /// Milli-tokens.
    tokens: AtomicI64,
    per_request: i64,
    floor_per_second: i64,
    last_refill_s: AtomicU64,
}

const TOKEN: i64 = 1000;

impl RetryBudget {
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        let floor = min_per_second as i64 * TOKEN;
        RetryBudget {
            tokens: AtomicI64::new(floor),
            per_request: (ratio * TOKEN as f64) as i64,
            floor_per_second: floor,
            last_refill_s: AtomicU64::new(now_ms() / 1000),
        }
    }

    #[inline]
    pub fn deposit(&self) {
        if self.per_request > 0 {
            let cap = self.cap();
            let _ = self.tokens.fetch_update(Relaxed, Relaxed, |t| {
                (t < cap).then_some((t + self.per_request).min(cap))
            });
        }
    }

    fn cap(&self) -> i64 {
        (self.floor_per_second * 10).max(100 * TOKEN)
    }

    /// Takes one retry token if there is one.
    pub fn try_withdraw(&self) -> bool {
        self.refill_floor();
        self.tokens
            .fetch_update(Relaxed, Relaxed, |t| (t >= TOKEN).then_some(t - TOKEN))
            .is_ok()
    }

    /// Once a second, make sure at least the floor is available.
    fn refill_floor(&self) {
        let now = now_ms() / 1000;
        let last = self.last_refill_s.load(Relaxed);
        if now > last
            && self
                .last_refill_s
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            let floor = self.floor_per_second;
            let _ = self
                .tokens
                .fetch_update(Relaxed, Relaxed, |t| (t < floor).then_some(floor));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(balance: &str) -> ServiceConfig {
        let src = format!(
            "[listen]\nhttp = [\"127.0.0.1:8080\"]\n[[service]]\nname = \"s\"\nbalance = \"{balance}\"\ndiscovery = {{ dns_srv = \"_http._tcp.s.test\" }}\n[[route]]\nname = \"r\"\nservice = \"s\"\n"
        );
        crate::config::parse(std::path::Path::new("t.toml"), &src)
            .unwrap()
            .services
            .remove(0)
    }

    fn target(n: u8, weight: u32, priority: u16) -> Target {
        Target {
            addr: format!("10.0.0.{n}:80").parse().unwrap(),
            weight: Some(weight),
            priority,
        }
    }

    #[test]
    fn srv_priorities_fall_back_and_keep_their_weights() {
        let svc = Service::new(service("weighted"), None, &[]);
        let name: Arc<str> = "_http._tcp.s.test".into();
        assert!(svc.set_resolved(
            &name,
            vec![
                target(1, 1, 10),
                target(2, 1, 10),
                target(3, 3, 20),
                target(4, 1, 20)
            ],
        ));
        assert!(
            !svc.set_resolved(
                &name,
                vec![
                    target(1, 1, 10),
                    target(2, 1, 10),
                    target(3, 3, 20),
                    target(4, 1, 20)
                ],
            ),
            "the same answer rebuilds nothing"
        );
        let set = svc.instances();
        let picks = |set: &InstanceSet| {
            let mut n = [0; 4];
            for _ in 0..40 {
                let i = set.pick(0, |i| set.instances[i].is_available()).unwrap();
                n[i] += 1;
            }
            n
        };
        assert_eq!(picks(&set), [20, 20, 0, 0]);
        for i in &set.instances[..2] {
            i.health.record_probe(false, 1, 1);
        }
        assert_eq!(picks(&set), [0, 0, 30, 10]);
        // None available anywhere: every instance may be picked (the caller's panic mode).
        for i in &set.instances[2..] {
            i.health.record_probe(false, 1, 1);
        }
        assert!(set.pick(0, |_| true).is_some());
    }

    #[test]
    fn budget_allows_ratio_of_requests() {
        let b = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            b.deposit();
        }
        let mut retries = 0;
        while b.try_withdraw() {
            retries += 1;
        }
        assert_eq!(retries, 20);
    }

    #[test]
    fn floor_allows_some_retries_without_traffic() {
        let b = RetryBudget::new(0.2, 3);
        let mut retries = 0;
        while b.try_withdraw() {
            retries += 1;
        }
        assert_eq!(retries, 3);
    }
}
