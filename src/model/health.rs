//! Per-instance health: what active probes and passive outlier detection concluded.
//!
//! Owns: the atomics the request path reads (`is_available`, `in_flight`) and the
//! transitions probes and outlier detection make. Survives reloads: a new snapshot
//! reuses the `InstanceHealth` of an instance with the same service and address.
//! Must not: do I/O or know about routes.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::OutlierPolicy;

/// Milliseconds since the process started: a cheap, monotonic clock for ejection deadlines.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Why an instance is, or is not, taking traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Healthy,
    /// Failed its active probes.
    Unhealthy,
    /// Ejected by passive outlier detection until a deadline.
    Ejected,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
            HealthState::Ejected => "ejected",
        }
    }
}

#[derive(Debug)]
pub struct InstanceHealth {
    /// Last verdict of active probes; true when the service has none.
    probe_ok: AtomicBool,
    ejected: AtomicBool,
    ejected_until_ms: AtomicU64,
    times_ejected: AtomicU32,
    /// Consecutive 5xx / connect failures seen on the request path.
    consecutive_failures: AtomicU32,
    /// Probe streaks, touched only by the health checker.
    probe_successes: AtomicU32,
    probe_failures: AtomicU32,
    in_flight: AtomicU32,
}

impl Default for InstanceHealth {
    fn default() -> Self {
        InstanceHealth {
            probe_ok: AtomicBool::new(true),
            ejected: AtomicBool::new(false),
            ejected_until_ms: AtomicU64::new(0),
            times_ejected: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            probe_successes: AtomicU32::new(0),
            probe_failures: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
        }
    }
}

/// What a recorded outcome changed, so the caller can count and log transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Ejected,
    Unejected,
    BecameHealthy,
    BecameUnhealthy,
}

impl InstanceHealth {
    /// True when the instance may take traffic: probes pass and it is not ejected.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.probe_ok.load(Relaxed) && !self.ejected.load(Relaxed)
    }

    pub fn state(&self) -> HealthState {
        if self.ejected.load(Relaxed) {
            HealthState::Ejected
        } else if self.probe_ok.load(Relaxed) {
            HealthState::Healthy
        } else {
            HealthState::Unhealthy
        }
    }

    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    #[inline]
    pub fn begin_request(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn end_request(&self) {
        // Saturating: a request that never began must not wrap the counter.
        let _ = self
            .in_flight
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }

    /// A response below 500 resets the failure streak.
    #[inline]
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
    }

    /// A 5xx or a connect failure. Returns true when the streak reached the ejection
    /// threshold; the caller decides (with the service-wide cap) whether to [`Self::eject`].
    pub fn record_failure(&self, policy: &OutlierPolicy) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        n >= policy.consecutive_failures && !self.ejected.load(Relaxed)
    }

    /// Ejects for `base × times ejected`, capped at `max` (Envoy's outlier detection).
    pub fn eject(&self, policy: &OutlierPolicy, now_ms: u64) -> Transition {
        if self.ejected.swap(true, Relaxed) {
            return Transition::None;
        }
        let times = self.times_ejected.fetch_add(1, Relaxed) + 1;
        let span = policy
            .base_ejection
            .saturating_mul(times)
            .min(policy.max_ejection);
        self.ejected_until_ms
            .store(now_ms + span.as_millis() as u64, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        Transition::Ejected
    }

    /// Ends an ejection whose time is up. Called by the health checker's tick.
    pub fn expire_ejection(&self, now_ms: u64) -> Transition {
        if self.ejected.load(Relaxed) && now_ms >= self.ejected_until_ms.load(Relaxed) {
            self.ejected.store(false, Relaxed);
            return Transition::Unejected;
        }
        Transition::None
    }

    /// Time left in the current ejection, if any.
    pub fn ejection_left(&self, now_ms: u64) -> Option<Duration> {
        if !self.ejected.load(Relaxed) {
            return None;
        }
        let until = self.ejected_until_ms.load(Relaxed);
        Some(Duration::from_millis(until.saturating_sub(now_ms)))
    }

    /// Records one active probe. A probe that brings an instance back also ends its
    /// ejection: the instance answers again, so it gets traffic again.
    pub fn record_probe(
        &self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Transition {
        if ok {
            self.probe_failures.store(0, Relaxed);
            let n = self.probe_successes.fetch_add(1, Relaxed) + 1;
            if !self.probe_ok.load(Relaxed) && n >= healthy_threshold {
                self.probe_ok.store(true, Relaxed);
                self.ejected.store(false, Relaxed);
                self.consecutive_failures.store(0, Relaxed);
                return Transition::BecameHealthy;
            }
        } else {
            self.probe_successes.store(0, Relaxed);
            let n = self.probe_failures.fetch_add(1, Relaxed) + 1;
            if self.probe_ok.load(Relaxed) && n >= unhealthy_threshold {
                self.probe_ok.store(false, Relaxed);
                return Transition::BecameUnhealthy;
            }
        }
        Transition::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_grows_and_is_capped() {
        let p = OutlierPolicy {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(70),
            max_ejected_percent: 50,
        };
        let h = InstanceHealth::default();
        assert!(!h.record_failure(&p));
        assert!(h.record_failure(&p));
        assert_eq!(h.eject(&p, 0), Transition::Ejected);
        assert!(!h.is_available());
        assert_eq!(h.ejection_left(0), Some(Duration::from_secs(30)));
        assert_eq!(h.expire_ejection(29_999), Transition::None);
        assert_eq!(h.expire_ejection(30_000), Transition::Unejected);
        assert!(h.is_available());
        h.eject(&p, 30_000);
        assert_eq!(h.ejection_left(30_000), Some(Duration::from_secs(60)));
        h.expire_ejection(90_000);
        h.eject(&p, 90_000);
        assert_eq!(h.ejection_left(90_000), Some(Duration::from_secs(70)));
    }

    #[test]
    fn probes_need_their_thresholds() {
        let h = InstanceHealth::default();
        assert_eq!(h.record_probe(false, 2, 2), Transition::None);
        assert!(h.is_available());
        assert_eq!(h.record_probe(false, 2, 2), Transition::BecameUnhealthy);
        assert!(!h.is_available());
        assert_eq!(h.record_probe(true, 2, 2), Transition::None);
        assert_eq!(h.record_probe(true, 2, 2), Transition::BecameHealthy);
        assert!(h.is_available());
    }

    #[test]
    fn in_flight_never_wraps() {
        let h = InstanceHealth::default();
        h.end_request();
        assert_eq!(h.in_flight(), 0);
        h.begin_request();
        assert_eq!(h.in_flight(), 1);
    }
}
