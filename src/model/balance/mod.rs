//! Load balancing: which instance of a service takes the next request.
//!
//! Owns: the [`Balancer`] built once per instance set (one file per policy) and the
//! stable sticky-key hash [`hash_key`]. It sits in `model` because every
//! [`super::InstanceSet`] carries the balancer built for it.
//! Must not: decide eligibility (health, panic mode and retries are the caller's, passed
//! in as `eligible`), change instance state, allocate, lock or log on the pick path.

mod p2c;
mod round_robin;
mod sticky;
mod weighted;

use std::sync::Arc;

use crate::config::BalancePolicy;
use crate::model::Instance;

use p2c::PowerOfTwo;
use round_robin::RoundRobin;
use sticky::Ring;
use weighted::SmoothWeighted;

/// Picks instances for one instance set under one [`BalancePolicy`].
///
/// Built when the set changes (rarely); [`Balancer::pick`] runs per request and only
/// touches atomics.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
}

/// The precomputed state of each policy.
#[derive(Debug)]
enum Policy {
    RoundRobin(RoundRobin),
    Weighted(SmoothWeighted),
    P2c(PowerOfTwo),
    Sticky(Ring),
}

impl Balancer {
    /// Built once per instance set (instances change rarely; picks are per request).
    pub fn new(policy: BalancePolicy, instances: &[Arc<Instance>]) -> Self {
        let policy = match policy {
            BalancePolicy::RoundRobin => Policy::RoundRobin(RoundRobin::new()),
            BalancePolicy::Weighted => Policy::Weighted(SmoothWeighted::new(instances)),
            BalancePolicy::P2c => Policy::P2c(PowerOfTwo),
            BalancePolicy::Sticky => Policy::Sticky(Ring::new(instances)),
        };
        Balancer { policy }
    }

    /// Picks an index into `instances` (the same slice given to `new`) among those for which
    /// `eligible(i)` is true; None if none is eligible. `key` is the request's sticky-key hash
    /// (only Sticky uses it).
    ///
    /// Never panics, even if `instances` is not the slice given to `new`: indices the
    /// balancer remembers that fall outside it are skipped.
    pub fn pick(
        &self,
        instances: &[Arc<Instance>],
        key: u64,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if instances.is_empty() {
            return None;
        }
        match &self.policy {
            Policy::RoundRobin(rr) => rr.pick(instances.len(), &eligible),
            Policy::Weighted(w) => w.pick(instances.len(), &eligible),
            Policy::P2c(p) => p.pick(instances, &eligible),
            Policy::Sticky(ring) => ring.pick(instances, key, &eligible),
        }
    }
}

/// Stable 64-bit hash of a sticky key (same value in every process and run: e.g. FNV-1a 64 or
/// a fixed-key hash; NOT std's RandomState).
///
/// FNV-1a 64 followed by murmur3's 64-bit finalizer: FNV alone leaves short, similar keys
/// (`user-1`, `user-2`) close together in the high bits, which would bunch them on the ring.
pub fn hash_key(bytes: &[u8]) -> u64 {
    StableHasher::new().write(bytes).finish()
}

/// FNV-1a 64 with a murmur3 finalizer; streaming so ring points hash (id, replica)
/// without building a buffer.
#[derive(Clone, Copy)]
struct StableHasher(u64);

impl StableHasher {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        StableHasher(Self::OFFSET)
    }

    fn write(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
        self
    }

    fn finish(self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        h
    }
}

/// Instances shared by the policy tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use crate::model::Instance;

    /// Instances `10.0.0.{i}:80` for i in 1..=weights.len(), with the given weights.
    pub fn instances(weights: &[u32]) -> Vec<Arc<Instance>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| instance(i + 1, weight))
            .collect()
    }

    /// One instance `10.0.0.{i}:80`.
    pub fn instance(i: usize, weight: u32) -> Arc<Instance> {
        Arc::new(Instance {
            id: format!("10.0.0.{i}:80"),
            addr: format!("10.0.0.{i}:80").parse().unwrap(),
            weight,
            health: Default::default(),
            registration: None,
            sidecar: None,
            dns: None,
            priority: 0,
            tls: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::instances;
    use super::*;

    const ALL: [BalancePolicy; 4] = [
        BalancePolicy::RoundRobin,
        BalancePolicy::Weighted,
        BalancePolicy::P2c,
        BalancePolicy::Sticky,
    ];

    #[test]
    fn hash_key_is_stable_across_runs() {
        // Pinned values: a change here remaps every sticky client after an upgrade.
        assert_eq!(hash_key(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash_key(b"user-1"), 0x41a2_fca5_c684_01c5);
        assert_ne!(hash_key(b"user-1"), hash_key(b"user-2"));
    }

    #[test]
    fn hasher_core_is_fnv1a_64() {
        // Reference vectors from the FNV specification.
        assert_eq!(StableHasher::new().0, 0xcbf2_9ce4_8422_2325);
        assert_eq!(StableHasher::new().write(b"a").0, 0xaf63_dc4c_8601_ec8c);
        // Streaming equals one-shot, so ring points need no buffer.
        let parts = StableHasher::new().write(b"10.0.0.1").write(b":80");
        assert_eq!(parts.finish(), hash_key(b"10.0.0.1:80"));
    }

    #[test]
    fn empty_instances_give_none_for_every_policy() {
        for policy in ALL {
            let b = Balancer::new(policy, &[]);
            assert_eq!(b.pick(&[], 7, |_| true), None, "{policy:?}");
        }
    }

    #[test]
    fn nothing_eligible_gives_none_for_every_policy() {
        let set = instances(&[1, 2, 3]);
        for policy in ALL {
            let b = Balancer::new(policy, &set);
            for key in 0..50 {
                assert_eq!(b.pick(&set, key, |_| false), None, "{policy:?}");
            }
        }
    }

    #[test]
    fn picks_only_eligible_for_every_policy() {
        let set = instances(&[1, 2, 3, 4]);
        for policy in ALL {
            let b = Balancer::new(policy, &set);
            for key in 0..200 {
                assert_eq!(b.pick(&set, key, |i| i == 2), Some(2), "{policy:?}");
            }
        }
    }

    #[test]
    fn a_shorter_slice_than_at_new_never_panics() {
        let set = instances(&[1, 5, 1, 1]);
        let fewer = &set[..2];
        for policy in ALL {
            let b = Balancer::new(policy, &set);
            for key in 0..200 {
                let i = b.pick(fewer, key, |_| true);
                assert!(matches!(i, Some(0 | 1)), "{policy:?}: {i:?}");
            }
        }
    }
}
