//! Sticky: consistent hashing with bounded loads (Mirrokni et al.; Envoy's and HAProxy's
//! `hash-balance-factor`).
//!
//! Owns: the hash ring of virtual points. Must not: compute the request key (the proxy
//! hashes it with [`super::hash_key`]) or change load counters.

use std::sync::Arc;

use super::StableHasher;
use crate::model::Instance;

/// Virtual points per unit of weight: Ketama's 160 keeps each instance's share of the
/// ring within a few percent of its weight.
const POINTS_PER_WEIGHT: u64 = 160;

/// Cap on ring size: 40k points × 16 bytes = 640 KiB, and a binary search of 16 steps.
const MAX_POINTS: u64 = 40_000;

/// No instance takes more than this factor of the mean load while another has room
/// (Envoy's `hash_balance_factor` of 125): bounded extra load, bounded remapping.
const BALANCE_FACTOR_PERCENT: u64 = 125;

/// A ring of `(point hash, instance index)`, sorted by hash.
#[derive(Debug)]
pub(super) struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// 160 × weight points per instance, hashed from (id, replica); when that exceeds
    /// [`MAX_POINTS`], each count is scaled down proportionally, keeping at least one.
    pub(super) fn new(instances: &[Arc<Instance>]) -> Self {
        let wanted = |i: &Instance| u64::from(i.weight.max(1)) * POINTS_PER_WEIGHT;
        let total = instances
            .iter()
            .fold(0u64, |sum, i| sum.saturating_add(wanted(i)));
        let mut points = Vec::with_capacity(usize::try_from(total.min(MAX_POINTS)).unwrap_or(0));
        for (index, instance) in instances.iter().enumerate() {
            let Ok(index) = u32::try_from(index) else {
                break;
            };
            let mut replicas = wanted(instance);
            if total > MAX_POINTS {
                replicas = (replicas * MAX_POINTS / total).max(1);
            }
            let id = StableHasher::new()
                .write(instance.id.as_bytes())
                .write(&[0]);
            for replica in 0..replicas {
                points.push((id.write(&replica.to_le_bytes()).finish(), index));
            }
        }
        // Equal hashes (vanishingly rare) are ordered by index so the ring is deterministic.
        points.sort_unstable();
        Ring { points }
    }

    /// Walks clockwise from `key` to the first eligible instance within the load bound;
    /// if every eligible instance met is over it, the first eligible one met.
    pub(super) fn pick(
        &self,
        instances: &[Arc<Instance>],
        key: u64,
        eligible: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let (count, total) = instances
            .iter()
            .enumerate()
            .filter(|&(i, _)| eligible(i))
            .fold((0u64, 0u64), |(count, total), (_, inst)| {
                (count + 1, total + u64::from(inst.health.in_flight()))
            });
        if count == 0 || self.points.is_empty() {
            return None;
        }
        // ceil(1.25 × (total + 1) / count): "+ 1" counts the request being placed.
        let bound = ((total + 1) * BALANCE_FACTOR_PERCENT).div_ceil(count * 100);
        let start = self.points.partition_point(|&(hash, _)| hash < key);
        let (head, tail) = self.points.split_at(start.min(self.points.len()));
        let mut fallback = None;
        for &(_, index) in tail.iter().chain(head) {
            let i = index as usize;
            let Some(instance) = instances.get(i) else {
                continue;
            };
            if !eligible(i) {
                continue;
            }
            if u64::from(instance.health.in_flight()) <= bound {
                return Some(i);
            }
            fallback.get_or_insert(i);
        }
        fallback
    }
}

#[cfg(test)]
mod tests {
    use super::super::hash_key;
    use super::super::test_support::{instance, instances};
    use super::*;

    fn key(k: usize) -> u64 {
        hash_key(format!("user-{k}").as_bytes())
    }

    #[test]
    fn the_same_key_always_maps_to_the_same_instance() {
        let set = instances(&[1; 5]);
        let ring = Ring::new(&set);
        let again = Ring::new(&set);
        for k in 0..1000 {
            let first = ring.pick(&set, key(k), &|_| true);
            assert!(first.is_some());
            for _ in 0..3 {
                assert_eq!(ring.pick(&set, key(k), &|_| true), first);
            }
            assert_eq!(again.pick(&set, key(k), &|_| true), first);
        }
    }

    #[test]
    fn keys_spread_over_all_instances() {
        let set = instances(&[1; 5]);
        let ring = Ring::new(&set);
        let mut counts = [0; 5];
        for k in 0..5000 {
            counts[ring.pick(&set, key(k), &|_| true).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 600 && c < 1400), "{counts:?}");
    }

    #[test]
    fn removing_one_of_five_remaps_only_its_keys() {
        let five = instances(&[1; 5]);
        let four: Vec<_> = [0, 1, 3, 4].iter().map(|&i| five[i].clone()).collect();
        let (ring5, ring4) = (Ring::new(&five), Ring::new(&four));
        let mut moved = 0;
        for k in 0..1000 {
            let before = &five[ring5.pick(&five, key(k), &|_| true).unwrap()].id;
            let after = &four[ring4.pick(&four, key(k), &|_| true).unwrap()].id;
            if before == &five[2].id {
                moved += 1;
            } else {
                assert_eq!(before, after, "key {k} moved off a surviving instance");
            }
        }
        assert!(
            moved > 100 && moved < 300,
            "{moved} keys were on the removed instance"
        );
    }

    #[test]
    fn ineligible_instance_remaps_only_its_keys() {
        let set = instances(&[1; 5]);
        let ring = Ring::new(&set);
        for k in 0..1000 {
            let before = ring.pick(&set, key(k), &|_| true).unwrap();
            let after = ring.pick(&set, key(k), &|i| i != 2).unwrap();
            assert_ne!(after, 2);
            if before != 2 {
                assert_eq!(before, after);
            }
        }
    }

    #[test]
    fn bounded_load_moves_a_key_off_an_overloaded_instance() {
        let set = instances(&[1; 5]);
        let ring = Ring::new(&set);
        let k = key(42);
        let home = ring.pick(&set, k, &|_| true).unwrap();
        // 10 in flight, bound = ceil(1.25 × 11 / 5) = 3.
        for _ in 0..10 {
            set[home].health.begin_request();
        }
        let away = ring.pick(&set, k, &|_| true).unwrap();
        assert_ne!(away, home);
        // It moves where it would go if its home were gone: the next instance clockwise.
        assert_eq!(ring.pick(&set, k, &|i| i != home), Some(away));
        for _ in 0..10 {
            set[home].health.end_request();
        }
        assert_eq!(ring.pick(&set, k, &|_| true), Some(home));
    }

    #[test]
    fn a_load_within_the_bound_keeps_the_key_home() {
        let set = instances(&[1; 5]);
        let ring = Ring::new(&set);
        let k = key(7);
        let home = ring.pick(&set, k, &|_| true).unwrap();
        // Everyone at 2: bound = ceil(1.25 × 11 / 5) = 3, so home is fine.
        for inst in &set {
            inst.health.begin_request();
            inst.health.begin_request();
        }
        assert_eq!(ring.pick(&set, k, &|_| true), Some(home));
    }

    #[test]
    fn weights_scale_points_and_the_ring_is_capped() {
        let ring = Ring::new(&instances(&[1, 3]));
        assert_eq!(ring.points.len(), 4 * 160);
        let big = instances(&[10_000, 1, 10_000]);
        let ring = Ring::new(&big);
        assert!(ring.points.len() as u64 <= MAX_POINTS + 3);
        // The light instance keeps at least one point.
        assert!(ring.points.iter().any(|&(_, i)| i == 1));
    }

    #[test]
    fn ring_depends_only_on_ids_not_on_order() {
        let a = instances(&[1; 3]);
        let b = vec![a[2].clone(), a[0].clone(), a[1].clone()];
        let (ra, rb) = (Ring::new(&a), Ring::new(&b));
        for k in 0..300 {
            let ia = ra.pick(&a, key(k), &|_| true).unwrap();
            let ib = rb.pick(&b, key(k), &|_| true).unwrap();
            assert_eq!(a[ia].id, b[ib].id);
        }
    }

    #[test]
    fn none_when_nothing_eligible_or_empty() {
        let set = vec![instance(1, 1), instance(2, 1)];
        let ring = Ring::new(&set);
        assert_eq!(ring.pick(&set, 5, &|_| false), None);
        assert_eq!(Ring::new(&[]).pick(&[], 5, &|_| true), None);
    }

    #[test]
    fn keys_past_the_last_point_wrap_to_the_first() {
        let set = instances(&[1; 3]);
        let ring = Ring::new(&set);
        let first = ring.points[0].1 as usize;
        assert_eq!(ring.pick(&set, u64::MAX, &|_| true), Some(first));
        assert_eq!(ring.pick(&set, 0, &|_| true), Some(first));
    }
}
