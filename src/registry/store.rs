//! The registry: which instances registered, until when, and whether the bus trusts
//! the absence of heartbeats (self-preservation).
//!
//! Owns: registrations, leases (TTL), renewal accounting, expiry with its per-sweep cap,
//! and a version number that changes with the set of instances.
//! Must not: do I/O, hold its lock across an await, or know about routing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::health::state::now_ms;

/// Self-preservation looks at renewals over this window (Eureka: one minute).
const WINDOW_SECS: usize = 60;

/// What an instance said about itself when it registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub service: String,
    pub id: String,
    pub address: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SocketAddr>,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    pub ttl_secs: u64,
}

#[derive(Debug, Clone)]
struct Lease {
    reg: Arc<Registration>,
    registered_ms: u64,
    expires_ms: u64,
    /// Kept alive elsewhere (etcd): never expired here, not in the renewal accounting.
    external: bool,
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("instance {id} of service {service} is not registered")]
    NotFound { service: String, id: String },
}

/// Renewals seen per second over the last minute, in a ring of one-second buckets.
#[derive(Debug)]
struct Renewals {
    buckets: [u32; WINDOW_SECS],
    /// The second each bucket holds.
    stamps: [u64; WINDOW_SECS],
}

impl Renewals {
    fn record(&mut self, now_s: u64) {
        let i = (now_s % WINDOW_SECS as u64) as usize;
        if self.stamps[i] != now_s {
            self.stamps[i] = now_s;
            self.buckets[i] = 0;
        }
        self.buckets[i] = self.buckets[i].saturating_add(1);
    }

    fn last_minute(&self, now_s: u64) -> u64 {
        self.buckets
            .iter()
            .zip(&self.stamps)
            .filter(|(_, &s)| s + (WINDOW_SECS as u64) > now_s && s <= now_s)
            .map(|(&b, _)| b as u64)
            .sum()
    }
}

#[derive(Debug)]
struct Inner {
    services: BTreeMap<String, BTreeMap<String, Lease>>,
    renewals: Renewals,
    self_preservation: bool,
}

/// Settings the store needs from the config.
#[derive(Debug, Clone, Copy)]
pub struct StorePolicy {
    pub renewal_threshold: f64,
    pub max_expiry_share: f64,
}

/// The state of self-preservation, for the admin API and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Preservation {
    pub active: bool,
    pub expected_per_minute: f64,
    pub seen_last_minute: u64,
}

pub struct Store {
    inner: Mutex<Inner>,
    degraded: std::sync::atomic::AtomicBool,
    policy: Mutex<StorePolicy>,
    version: watch::Sender<u64>,
}

impl Store {
    pub fn new(policy: StorePolicy) -> Store {
        Store {
            inner: Mutex::new(Inner {
                services: BTreeMap::new(),
                renewals: Renewals {
                    buckets: [0; WINDOW_SECS],
                    stamps: [0; WINDOW_SECS],
                },
                self_preservation: false,
            }),
            policy: Mutex::new(policy),
            degraded: std::sync::atomic::AtomicBool::new(false),
            version: watch::Sender::new(0),
        }
    }

    pub fn set_policy(&self, policy: StorePolicy) {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = policy;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Changes whenever the set of instances (or what they said) changes.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Registers or replaces an instance; its lease starts now. Renewals are expected
    /// from it every TTL/3 from now on.
    pub fn register(&self, reg: Registration) {
        let now = now_ms();
        self.insert(reg, now, now);
    }

    /// Adds an instance known from elsewhere (the disk snapshot, etcd) with a fresh lease.
    pub fn restore(&self, reg: Registration) {
        let now = now_ms();
        self.insert(reg, now, now);
    }

    /// Adds or replaces an instance whose lease lives elsewhere (etcd).
    pub fn upsert_external(&self, reg: Registration) {
        let now = now_ms();
        self.insert_lease(reg, now, u64::MAX, true);
    }

    /// Makes the external instances exactly `regs` (after a full re-list from etcd).
    pub fn replace_external(&self, regs: Vec<Registration>) {
        let keep: std::collections::HashSet<(String, String)> = regs
            .iter()
            .map(|r| (r.service.clone(), r.id.clone()))
            .collect();
        let removed = {
            let mut inner = self.lock();
            let mut removed = false;
            for (name, svc) in inner.services.iter_mut() {
                let before = svc.len();
                svc.retain(|id, l| !l.external || keep.contains(&(name.clone(), id.clone())));
                removed |= svc.len() != before;
            }
            inner.services.retain(|_, s| !s.is_empty());
            removed
        };
        if removed {
            self.bump();
        }
        for r in regs {
            self.upsert_external(r);
        }
    }

    fn insert(&self, reg: Registration, registered_ms: u64, now: u64) {
        let expires = now + reg.ttl_secs * 1000;
        self.insert_lease(reg, registered_ms, expires, false);
    }

    fn insert_lease(&self, reg: Registration, registered_ms: u64, expires_ms: u64, external: bool) {
        let changed = {
            let mut inner = self.lock();
            let lease = Lease {
                expires_ms,
                registered_ms,
                external,
                reg: Arc::new(reg),
            };
            let svc = inner.services.entry(lease.reg.service.clone()).or_default();
            let old = svc.insert(lease.reg.id.clone(), lease.clone());
            old.is_none_or(|o| o.reg != lease.reg)
        };
        if changed {
            self.bump();
        }
    }

    /// Renews an instance's lease. `NotFound` tells it to register again.
    /// The degraded flag: set while the shared store (etcd) is unreachable.
    pub fn set_degraded(&self, degraded: bool) {
        self.degraded
            .store(degraded, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::METRICS
            .registry_degraded
            .set(degraded as i64);
    }

    pub fn degraded(&self) -> bool {
        self.degraded.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn heartbeat(&self, service: &str, id: &str) -> Result<Duration, StoreError> {
        let now = now_ms();
        let mut inner = self.lock();
        inner.renewals.record(now / 1000);
        let lease = inner
            .services
            .get_mut(service)
            .and_then(|s| s.get_mut(id))
            .ok_or_else(|| StoreError::NotFound {
                service: service.to_string(),
                id: id.to_string(),
            })?;
        lease.expires_ms = now + lease.reg.ttl_secs * 1000;
        Ok(Duration::from_secs(lease.reg.ttl_secs))
    }

    /// Removes an instance at once. Requests already sent to it finish.
    pub fn deregister(&self, service: &str, id: &str) -> Result<(), StoreError> {
        let removed = {
            let mut inner = self.lock();
            let svc = inner.services.get_mut(service);
            let removed = svc.and_then(|s| s.remove(id)).is_some();
            if inner.services.get(service).is_some_and(|s| s.is_empty()) {
                inner.services.remove(service);
            }
            removed
        };
        if removed {
            self.bump();
            Ok(())
        } else {
            Err(StoreError::NotFound {
                service: service.to_string(),
                id: id.to_string(),
            })
        }
    }

    pub fn get(&self, service: &str, id: &str) -> Option<Arc<Registration>> {
        self.lock()
            .services
            .get(service)
            .and_then(|s| s.get(id))
            .map(|l| l.reg.clone())
    }

    /// The registered instances of one service.
    pub fn instances(&self, service: &str) -> Vec<Arc<Registration>> {
        self.lock()
            .services
            .get(service)
            .map(|s| s.values().map(|l| l.reg.clone()).collect())
            .unwrap_or_default()
    }

    /// Every registration, for the snapshot file and the listing API.
    pub fn all(&self) -> Vec<Arc<Registration>> {
        self.lock()
            .services
            .values()
            .flat_map(|s| s.values().map(|l| l.reg.clone()))
            .collect()
    }

    /// Seconds left on an instance's lease.
    pub fn lease_left(&self, service: &str, id: &str) -> Option<Duration> {
        let now = now_ms();
        self.lock()
            .services
            .get(service)
            .and_then(|s| s.get(id))
            .filter(|l| !l.external)
            .map(|l| Duration::from_millis(l.expires_ms.saturating_sub(now)))
    }

    /// Expected vs seen renewals. Each instance is expected to renew every TTL/3,
    /// counted only over the part of the window it has existed, so the expectation
    /// follows registrations and departures (the fix for Eureka's stuck mode).
    fn preservation(inner: &Inner, now: u64, threshold: f64) -> Preservation {
        let window_ms = (WINDOW_SECS as u64) * 1000;
        let expected: f64 = inner
            .services
            .values()
            .flat_map(|s| s.values())
            .filter(|l| !l.external)
            .map(|l| {
                let lived = now.saturating_sub(l.registered_ms).min(window_ms) as f64;
                let every = (l.reg.ttl_secs as f64 * 1000.0 / 3.0).max(1.0);
                lived / every
            })
            .sum();
        let seen = inner.renewals.last_minute(now / 1000);
        let instances = inner
            .services
            .values()
            .map(|s| s.len())
            .sum::<usize>()
            .max(1);
        let missing = expected - seen as f64;
        // Below one expected renewal there is nothing to judge yet; and the silence of a
        // single instance is that instance's death, not a network partition: it expires.
        // (1.5 instances' worth: a live instance may lag its expected count by one renewal.)
        let active = expected >= 1.0
            && (seen as f64) < threshold * expected
            && missing > 1.5 * expected / instances as f64;
        Preservation {
            active,
            expected_per_minute: expected,
            seen_last_minute: seen,
        }
    }

    pub fn self_preservation(&self) -> Preservation {
        let threshold = self
            .policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .renewal_threshold;
        Self::preservation(&self.lock(), now_ms(), threshold)
    }

    /// Removes instances whose lease ran out, unless the bus is in self-preservation;
    /// never more than `max_expiry_share` of a service (at least one) per sweep.
    /// Returns the expired instances and the self-preservation state.
    pub fn expire(&self) -> (Vec<Arc<Registration>>, Preservation) {
        let policy = *self.policy.lock().unwrap_or_else(|e| e.into_inner());
        self.expire_at(now_ms(), policy)
    }

    fn expire_at(&self, now: u64, policy: StorePolicy) -> (Vec<Arc<Registration>>, Preservation) {
        let mut expired = Vec::new();
        let p = {
            let mut inner = self.lock();
            let p = Self::preservation(&inner, now, policy.renewal_threshold);
            if p.active != inner.self_preservation {
                inner.self_preservation = p.active;
                if p.active {
                    tracing::warn!(expected = p.expected_per_minute, seen = p.seen_last_minute,
                        "self-preservation on: renewals fell below the threshold, instances are not expired");
                } else {
                    tracing::info!(
                        expected = p.expected_per_minute,
                        seen = p.seen_last_minute,
                        "self-preservation off: renewals recovered"
                    );
                }
            }
            if !p.active {
                for svc in inner.services.values_mut() {
                    let cap = ((svc.len() as f64 * policy.max_expiry_share).ceil() as usize).max(1);
                    let mut due: Vec<(u64, String)> = svc
                        .values()
                        .filter(|l| !l.external && l.expires_ms <= now)
                        .map(|l| (l.expires_ms, l.reg.id.clone()))
                        .collect();
                    due.sort();
                    for (_, id) in due.into_iter().take(cap) {
                        if let Some(l) = svc.remove(&id) {
                            expired.push(l.reg);
                        }
                    }
                }
                inner.services.retain(|_, s| !s.is_empty());
            }
            p
        };
        if !expired.is_empty() {
            self.bump();
        }
        (expired, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(service: &str, id: &str, ttl: u64) -> Registration {
        Registration {
            service: service.into(),
            id: id.into(),
            address: "127.0.0.1:1".parse().unwrap(),
            sidecar: None,
            weight: 1,
            zone: None,
            version: None,
            metadata: BTreeMap::new(),
            ttl_secs: ttl,
        }
    }

    fn policy() -> StorePolicy {
        StorePolicy {
            renewal_threshold: 0.85,
            max_expiry_share: 0.15,
        }
    }

    fn lease_at(s: &Store, svc: &str, id: &str, registered: u64, ttl: u64) {
        s.insert(reg(svc, id, ttl), registered, registered);
    }

    #[test]
    fn heartbeat_of_unknown_instance_is_not_found() {
        let s = Store::new(policy());
        assert!(matches!(
            s.heartbeat("a", "x"),
            Err(StoreError::NotFound { .. })
        ));
        s.register(reg("a", "x", 10));
        assert_eq!(s.heartbeat("a", "x").unwrap(), Duration::from_secs(10));
        s.deregister("a", "x").unwrap();
        assert!(s.instances("a").is_empty());
    }

    #[test]
    fn version_changes_only_when_the_set_does() {
        let s = Store::new(policy());
        s.register(reg("a", "x", 10));
        let v = s.version();
        s.register(reg("a", "x", 10));
        assert_eq!(s.version(), v, "same registration again changes nothing");
        s.heartbeat("a", "x").unwrap();
        assert_eq!(s.version(), v);
        s.register(reg("a", "y", 10));
        assert!(s.version() > v);
    }

    #[test]
    fn expiry_removes_at_most_a_share_per_sweep() {
        let s = Store::new(StorePolicy {
            renewal_threshold: 0.0,
            max_expiry_share: 0.15,
        });
        for i in 0..20 {
            lease_at(&s, "a", &format!("i{i}"), 1_000, 3);
        }
        let (gone, p) = s.expire_at(
            10_000,
            StorePolicy {
                renewal_threshold: 0.0,
                max_expiry_share: 0.15,
            },
        );
        assert!(!p.active);
        assert_eq!(gone.len(), 3, "ceil(15% of 20)");
        assert_eq!(s.instances("a").len(), 17);
        // A single instance can always expire.
        lease_at(&s, "b", "only", 1_000, 3);
        let (gone, _) = s.expire_at(
            10_000,
            StorePolicy {
                renewal_threshold: 0.0,
                max_expiry_share: 0.15,
            },
        );
        assert!(gone.iter().any(|r| r.service == "b"));
    }

    #[test]
    fn self_preservation_stops_expiry_and_ends_when_renewals_recover() {
        let s = Store::new(policy());
        let t0 = 100_000u64;
        // 20 instances, TTL 3 s: each should renew every second.
        for i in 0..20 {
            lease_at(&s, "a", &format!("i{i}"), t0, 3);
        }
        // For 60 s, only 10 renew.
        for sec in 1..=60u64 {
            let now = t0 + sec * 1000;
            let mut inner = s.lock();
            for i in 0..10 {
                let l = inner
                    .services
                    .get_mut("a")
                    .unwrap()
                    .get_mut(&format!("i{i}"))
                    .unwrap();
                l.expires_ms = now + 3000;
            }
            for _ in 0..10 {
                inner.renewals.record(now / 1000);
            }
        }
        let now = t0 + 60_500;
        let (gone, p) = s.expire_at(now, policy());
        assert!(p.active, "{p:?}");
        assert!(gone.is_empty(), "no instance expires in self-preservation");
        assert_eq!(s.instances("a").len(), 20);
        // The other 10 come back: a minute of full renewals ends the mode.
        for sec in 61..=121u64 {
            let now = t0 + sec * 1000;
            let mut inner = s.lock();
            for _ in 0..20 {
                inner.renewals.record(now / 1000);
            }
            for l in inner.services.get_mut("a").unwrap().values_mut() {
                l.expires_ms = now + 3000;
            }
        }
        let (gone, p) = s.expire_at(t0 + 121_500, policy());
        assert!(!p.active, "{p:?}");
        assert!(gone.is_empty());
    }

    #[test]
    fn a_single_silent_instance_expires() {
        let s = Store::new(policy());
        lease_at(&s, "a", "lone", 1_000_000, 3);
        lease_at(&s, "a", "other", 1_000_000, 3);
        for sec in 1..=10u64 {
            let now = 1_000_000 + sec * 1000;
            let mut inner = s.lock();
            inner
                .services
                .get_mut("a")
                .unwrap()
                .get_mut("other")
                .unwrap()
                .expires_ms = now + 3000;
            inner.renewals.record(now / 1000);
        }
        let (gone, p) = s.expire_at(1_010_500, policy());
        assert!(!p.active, "{p:?}");
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].id, "lone");
    }

    #[test]
    fn a_new_instance_does_not_trigger_self_preservation() {
        let s = Store::new(policy());
        lease_at(&s, "a", "new", 1_000_000, 30);
        let (_, p) = s.expire_at(1_000_500, policy());
        assert!(!p.active, "{p:?}");
    }
}
