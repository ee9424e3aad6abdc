//! The registry: which instances registered, until when, and whether the bus trusts
//! the absence of heartbeats (self-preservation).
//!
//! Owns: registrations, leases (TTL), renewal accounting, expiry with its per-sweep cap,
//! and a version number that changes with the set of instances.
//! Must not: do I/O, hold its lock across an await, or know about routing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::model::health::now_ms;
pub use crate::model::registration::Registration;

/// Renewals expected in one lease: instances are asked to renew every TTL/3.
const SLOTS: u64 = 3;

/// The shortest silence after which an instance is removed. With a 2 s TTL the API asks
/// for a renewal every second (its finest unit), so a lease holds only two: an instance
/// that stopped with the first one to run out may be just one renewal late, which cannot
/// be told from jitter. Waiting for three slots lets every instance that went quiet with
/// it show as missing before anything is removed.
const MIN_SILENCE_MS: u64 = 3_000;

/// How often an instance with this TTL is asked to renew, in seconds (the answer to a
/// registration says so).
pub fn heartbeat_every(ttl_secs: u64) -> u64 {
    (ttl_secs / SLOTS).max(1)
}

/// Silence after which an instance may be removed: its TTL, but at least [`MIN_SILENCE_MS`].
fn removable_after_ms(ttl_secs: u64) -> u64 {
    ttl_secs.saturating_mul(1000).max(MIN_SILENCE_MS)
}

/// One renewal slot of an instance's lease, as judged by self-preservation. Never
/// shorter than what the instance was asked for (TTL/3, at least 1 s).
fn slot_ms(ttl_secs: u64) -> u64 {
    (removable_after_ms(ttl_secs) / SLOTS).max(1)
}

/// Renewals missing from an instance silent for `silent_ms`: a renewal counts as missing
/// once a whole slot has passed after it was due (so a late one is not), and at most the
/// two that can be missing before the instance is removed. Past renewals of instances
/// that are gone leave the count with them.
fn missing_renewals(silent_ms: u64, ttl_secs: u64) -> u64 {
    (silent_ms / slot_ms(ttl_secs))
        .saturating_sub(1)
        .min(SLOTS - 1)
}

#[derive(Debug, Clone)]
struct Lease {
    reg: Arc<Registration>,
    /// When it last registered or renewed (on [`now_ms`]'s clock).
    renewed_ms: u64,
    /// Kept alive elsewhere (etcd): never expired here, not in the renewal accounting.
    external: bool,
}

impl Lease {
    fn expires_ms(&self) -> u64 {
        self.renewed_ms
            .saturating_add(self.reg.ttl_secs.saturating_mul(1000))
    }

    /// Its lease ran out and it has been silent long enough to be removed.
    fn removable(&self, now: u64) -> bool {
        !self.external
            && now.saturating_sub(self.renewed_ms) >= removable_after_ms(self.reg.ttl_secs)
    }
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("instance {id} of service {service} is not registered")]
    NotFound { service: String, id: String },
}

#[derive(Debug)]
struct Inner {
    services: BTreeMap<String, BTreeMap<String, Lease>>,
    /// As judged by the last sweep; expiry follows it.
    preservation: Preservation,
}

/// Settings the store needs from the config.
#[derive(Debug, Clone, Copy)]
pub struct StorePolicy {
    pub renewal_threshold: f64,
    pub max_expiry_share: f64,
}

/// The state of self-preservation, for the admin API and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Preservation {
    /// Expiry is suspended.
    pub active: bool,
    /// Renewals expected over the current leases of the instances registered here
    /// (three per instance).
    pub expected_renewals: u64,
    /// Of those, how many are missing (more than one renewal interval late).
    pub missing_renewals: u64,
    /// Instances with at least one missing renewal.
    pub silent_instances: u64,
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
                preservation: Preservation::default(),
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
        self.insert_lease(reg, now_ms(), false);
    }

    /// Adds an instance known from elsewhere (the disk snapshot, etcd) with a fresh lease.
    pub fn restore(&self, reg: Registration) {
        self.insert_lease(reg, now_ms(), false);
    }

    /// Adds or replaces an instance whose lease lives elsewhere (etcd).
    pub fn upsert_external(&self, reg: Registration) {
        self.insert_lease(reg, now_ms(), true);
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

    fn insert_lease(&self, reg: Registration, renewed_ms: u64, external: bool) {
        let changed = {
            let mut inner = self.lock();
            let lease = Lease {
                renewed_ms,
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

    /// Renews an instance's lease. `NotFound` tells it to register again.
    pub fn heartbeat(&self, service: &str, id: &str) -> Result<Duration, StoreError> {
        self.heartbeat_at(service, id, now_ms())
    }

    fn heartbeat_at(&self, service: &str, id: &str, now: u64) -> Result<Duration, StoreError> {
        let mut inner = self.lock();
        let lease = inner
            .services
            .get_mut(service)
            .and_then(|s| s.get_mut(id))
            .ok_or_else(|| StoreError::NotFound {
                service: service.to_string(),
                id: id.to_string(),
            })?;
        lease.renewed_ms = now;
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
            .map(|l| Duration::from_millis(l.expires_ms().saturating_sub(now)))
    }

    /// Expected vs missing renewals, from each instance's own silence: the accounting
    /// holds only the instances registered now, so it follows registrations, departures
    /// and expiries (the fix for Eureka's stuck mode), and the mode ends as soon as the
    /// renewals come back.
    fn preservation(inner: &Inner, now: u64, threshold: f64) -> Preservation {
        let mut p = Preservation::default();
        for l in inner
            .services
            .values()
            .flat_map(|s| s.values())
            .filter(|l| !l.external)
        {
            let missing = missing_renewals(now.saturating_sub(l.renewed_ms), l.reg.ttl_secs);
            p.expected_renewals += SLOTS;
            p.missing_renewals += missing;
            p.silent_instances += (missing > 0) as u64;
        }
        // The silence of a single instance is that instance's death, not a network
        // partition: it expires.
        p.active = p.silent_instances >= 2
            && p.missing_renewals as f64 > (1.0 - threshold) * p.expected_renewals as f64;
        p
    }

    /// The state as of the last expiry sweep (which is what expiry follows).
    pub fn self_preservation(&self) -> Preservation {
        self.lock().preservation
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
            if p.active != inner.preservation.active {
                if p.active {
                    tracing::warn!(expected = p.expected_renewals, missing = p.missing_renewals,
                        silent = p.silent_instances,
                        "self-preservation on: renewals fell below the threshold, instances are not expired");
                } else {
                    tracing::info!(
                        expected = p.expected_renewals,
                        missing = p.missing_renewals,
                        silent = p.silent_instances,
                        "self-preservation off: renewals recovered"
                    );
                }
            }
            if inner.preservation.active && !p.active {
                // Renewals come back one by one after a partition: the instances not
                // heard from yet get one more lease from here, rather than expiring in
                // the sweep that ends the mode. If too many stay silent, it comes back.
                for l in inner.services.values_mut().flat_map(|s| s.values_mut()) {
                    if !l.external
                        && missing_renewals(now.saturating_sub(l.renewed_ms), l.reg.ttl_secs) > 0
                    {
                        l.renewed_ms = now;
                    }
                }
            }
            inner.preservation = p;
            if !p.active {
                for svc in inner.services.values_mut() {
                    let cap = ((svc.len() as f64 * policy.max_expiry_share).ceil() as usize).max(1);
                    let mut due: Vec<(u64, String)> = svc
                        .values()
                        .filter(|l| l.removable(now))
                        .map(|l| (l.renewed_ms, l.reg.id.clone()))
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
            tls: None,
        }
    }

    fn policy() -> StorePolicy {
        StorePolicy {
            renewal_threshold: 0.85,
            max_expiry_share: 0.15,
        }
    }

    fn lease_at(s: &Store, svc: &str, id: &str, registered: u64, ttl: u64) {
        s.insert_lease(reg(svc, id, ttl), registered, false);
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
    fn renewal_slots_and_removal_times() {
        assert_eq!(heartbeat_every(2), 1);
        assert_eq!(heartbeat_every(3), 1);
        assert_eq!(heartbeat_every(10), 3);
        assert_eq!(heartbeat_every(3600), 1200);
        // TTL 2 s: removed after 3 s of silence, judged in 1 s slots.
        assert_eq!(removable_after_ms(2), 3_000);
        assert_eq!(slot_ms(2), 1_000);
        assert_eq!(removable_after_ms(30), 30_000);
        assert_eq!(slot_ms(30), 10_000);
        // One slot of silence is forgiven (a late renewal), then one per slot, at most two.
        assert_eq!(missing_renewals(19_999, 30), 0);
        assert_eq!(missing_renewals(20_000, 30), 1);
        assert_eq!(missing_renewals(30_000, 30), 2);
        assert_eq!(missing_renewals(u64::MAX, 30), 2);
        // The slot is never shorter than what the instance was asked for.
        for ttl in 2..=3600 {
            assert!(slot_ms(ttl) >= heartbeat_every(ttl) * 1000, "ttl {ttl}");
        }
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

    /// Instances that renew on their own phase every `period` ms until told to stop, and
    /// the expiry sweep once a second, on explicit time.
    struct Sim {
        store: Store,
        n: usize,
        now: u64,
        period: u64,
        next_beat: Vec<u64>,
        next_sweep: u64,
        expired: Vec<String>,
        /// Every sweep's state, from the last `advance`.
        sweeps: Vec<(u64, Preservation)>,
    }

    impl Sim {
        fn new(ttl: u64, n: usize, period: u64, sweep_offset: u64) -> Sim {
            let t0 = 1_000_000;
            let store = Store::new(policy());
            let mut next_beat = Vec::new();
            for k in 0..n {
                let at = t0 + period * k as u64 / n as u64;
                store.insert_lease(reg("a", &format!("i{k}"), ttl), at, false);
                next_beat.push(at + period);
            }
            Sim {
                store,
                n,
                now: t0,
                period,
                next_beat,
                next_sweep: t0 + 1000 + sweep_offset,
                expired: Vec::new(),
                sweeps: Vec::new(),
            }
        }

        /// Runs until `until`; instance `k` renews only while `alive(k)`.
        fn advance(&mut self, until: u64, alive: impl Fn(usize) -> bool) {
            self.sweeps.clear();
            loop {
                let (k, beat) = self
                    .next_beat
                    .iter()
                    .copied()
                    .enumerate()
                    .min_by_key(|&(_, t)| t)
                    .unwrap();
                let next = beat.min(self.next_sweep);
                if next > until {
                    self.now = until;
                    return;
                }
                self.now = next;
                if beat <= self.next_sweep {
                    if alive(k) {
                        let _ = self.store.heartbeat_at("a", &format!("i{k}"), beat);
                    }
                    self.next_beat[k] += self.period;
                } else {
                    let (gone, p) = self.store.expire_at(self.next_sweep, policy());
                    self.expired.extend(gone.iter().map(|r| r.id.clone()));
                    self.sweeps.push((self.next_sweep, p));
                    self.next_sweep += 1000;
                }
            }
        }

        fn left(&self) -> usize {
            self.store.instances("a").len()
        }
    }

    /// The whole story at one TTL: one instance stopping expires; all stopping are held
    /// (and the mode says so before the first lease could be removed); renewals coming
    /// back end the mode at once, and instances that stay silent then expire.
    fn story(ttl: u64, period: u64, sweep_offset: u64) {
        let at = format!("ttl {ttl}s, renewing every {period} ms, sweep +{sweep_offset} ms");
        let ttl_ms = ttl * 1000;
        let mut sim = Sim::new(ttl, 10, period, sweep_offset);
        // Steady: nothing expires, no mode.
        sim.advance(sim.now + 3 * ttl_ms, |_| true);
        assert!(sim.expired.is_empty(), "{at}: {:?}", sim.expired);
        assert!(sim.sweeps.iter().all(|(_, p)| !p.active), "{at}");

        // One stops: it expires within a sweep of its removal time, alone.
        let t1 = sim.now;
        sim.advance(t1 + removable_after_ms(ttl) + period + 1000, |k| k != 0);
        assert_eq!(sim.expired, ["i0"], "{at}");
        assert!(sim.sweeps.iter().all(|(_, p)| !p.active), "{at}");

        // All stop: none is removed, however long the silence lasts.
        let t2 = sim.now;
        sim.advance(t2 + 3 * removable_after_ms(ttl) + 10_000, |_| false);
        assert_eq!(sim.left(), 9, "{at}: expired {:?}", sim.expired);
        let first_removable = t2 + removable_after_ms(ttl);
        assert!(
            sim.sweeps
                .iter()
                .filter(|(t, _)| *t >= first_removable)
                .all(|(_, p)| p.active),
            "{at}: {:?}",
            sim.sweeps
        );
        let p = sim.store.self_preservation();
        assert!(p.active, "{at}: {p:?}");
        assert_eq!(p.silent_instances, 9, "{at}");

        // They come back: the mode ends within a renewal period and a sweep.
        let t3 = sim.now;
        sim.advance(t3 + period + 1000, |_| true);
        assert!(!sim.store.self_preservation().active, "{at}");
        assert_eq!(sim.left(), 9, "{at}");

        // All stop again, then only 7 come back: the 2 that stay silent are 2 of 9,
        // under the threshold, so the mode ends and they expire.
        let t4 = sim.now;
        sim.advance(t4 + 2 * removable_after_ms(ttl), |_| false);
        assert!(sim.store.self_preservation().active, "{at}");
        let t5 = sim.now;
        sim.advance(t5 + removable_after_ms(ttl) + period + 2000, |k| k < 8);
        assert!(!sim.store.self_preservation().active, "{at}");
        assert_eq!(sim.left(), 7, "{at}: expired {:?}", sim.expired);
        assert_eq!(sim.n, 10);
    }

    #[test]
    fn mass_silence_is_held_and_one_death_expires_at_every_ttl() {
        for ttl in [
            2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 29, 30, 31, 60, 299, 300, 3599, 3600,
        ] {
            // As asked in the registration answer, and as the README words it (TTL/3).
            let mut periods = vec![heartbeat_every(ttl) * 1000];
            if ttl >= 3 {
                periods.push(ttl * 1000 / 3);
            }
            for period in periods {
                for sweep_offset in [0, 1, 500, 999] {
                    story(ttl, period, sweep_offset);
                }
            }
        }
    }

    #[test]
    fn an_expired_instance_takes_its_renewals_with_it() {
        // 20 instances at TTL 3 s; 3 die at once (15%): they expire, and the accounting
        // afterwards holds only the 17 that renew: no mode, then or later.
        let mut sim = Sim::new(3, 20, 1000, 250);
        sim.advance(sim.now + 10_000, |_| true);
        let t = sim.now;
        sim.advance(t + 30_000, |k| k >= 3);
        assert_eq!(sim.left(), 17, "{:?}", sim.expired);
        assert!(sim.sweeps.iter().all(|(_, p)| !p.active));
        let p = sim.store.self_preservation();
        assert_eq!((p.expected_renewals, p.missing_renewals), (51, 0), "{p:?}");
    }

    #[test]
    fn a_single_silent_instance_expires() {
        // Even when it is half the service.
        let mut sim = Sim::new(3, 2, 1000, 0);
        sim.advance(sim.now + 5_000, |_| true);
        let t = sim.now;
        sim.advance(t + 5_000, |k| k == 1);
        assert_eq!(sim.expired, ["i0"]);
        assert!(sim.sweeps.iter().all(|(_, p)| !p.active));
    }

    #[test]
    fn a_new_instance_does_not_trigger_self_preservation() {
        let s = Store::new(policy());
        lease_at(&s, "a", "new", 1_000_000, 30);
        lease_at(&s, "a", "new2", 1_000_000, 30);
        let (_, p) = s.expire_at(1_000_500, policy());
        assert!(!p.active, "{p:?}");
    }

    #[test]
    fn external_leases_are_neither_judged_nor_expired() {
        let s = Store::new(policy());
        for i in 0..5 {
            s.insert_lease(reg("a", &format!("e{i}"), 2), 1_000, true);
        }
        let (gone, p) = s.expire_at(1_000_000, policy());
        assert!(gone.is_empty());
        assert_eq!(p, Preservation::default());
    }
}
