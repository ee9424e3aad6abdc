//! Weighted round robin: nginx's smooth weighted round robin, precomputed.
//!
//! Owns: the schedule of instance indices built from weights, and its cursor.
//! Must not: look at load; eligibility is the caller's.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crate::model::Instance;

/// Longest schedule we build. Beyond it weights are scaled down: 4096 × 4 bytes stays in
/// L1/L2, and ratios finer than 1/4096 make no difference to real traffic.
const MAX_SCHEDULE: u64 = 4096;

/// One period of smooth weighted round robin, walked by a shared cursor.
#[derive(Debug)]
pub(super) struct SmoothWeighted {
    /// Instance indices in the order nginx's algorithm would pick them.
    schedule: Vec<u32>,
    cursor: AtomicUsize,
}

impl SmoothWeighted {
    pub(super) fn new(instances: &[Arc<Instance>]) -> Self {
        let weights = reduced_weights(instances);
        SmoothWeighted {
            schedule: smooth_schedule(&weights),
            cursor: AtomicUsize::new(0),
        }
    }

    /// The next schedule entry whose instance is eligible, scanning at most one period.
    pub(super) fn pick(&self, n: usize, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Relaxed) % len;
        let (head, tail) = self.schedule.split_at(start);
        tail.iter()
            .chain(head)
            .map(|&i| i as usize)
            .find(|&i| i < n && eligible(i))
    }
}

/// Weights divided by their gcd, then scaled so they sum to at most about
/// [`MAX_SCHEDULE`], every weight staying ≥ 1. A zero weight counts as 1: draining an
/// instance is the health module's job, and a set of zeros must still be served.
fn reduced_weights(instances: &[Arc<Instance>]) -> Vec<u64> {
    let mut weights: Vec<u64> = instances
        .iter()
        .map(|i| u64::from(i.weight.max(1)))
        .collect();
    let g = weights.iter().copied().fold(0, gcd).max(1);
    weights.iter_mut().for_each(|w| *w /= g);
    let total: u64 = weights.iter().sum();
    if total > MAX_SCHEDULE {
        weights
            .iter_mut()
            .for_each(|w| *w = (*w * MAX_SCHEDULE / total).max(1));
        let g = weights.iter().copied().fold(0, gcd).max(1);
        weights.iter_mut().for_each(|w| *w /= g);
    }
    weights
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// nginx's smooth weighted round robin over one full period (sum of weights picks): each
/// step every instance gains its weight, the highest (first on ties) is picked and loses
/// the total. Spreads picks of a heavy instance instead of bunching them.
fn smooth_schedule(weights: &[u64]) -> Vec<u32> {
    // Weights are ≤ u32::MAX and their count is small, so sums fit in i64.
    let weights: Vec<i64> = weights.iter().map(|&w| w as i64).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best: Option<(usize, i64)> = None;
        for (i, (c, &w)) in current.iter_mut().zip(&weights).enumerate() {
            *c += w;
            if best.is_none_or(|(_, b)| *c > b) {
                best = Some((i, *c));
            }
        }
        let Some((i, _)) = best else { break };
        if let Some(c) = current.get_mut(i) {
            *c -= total;
        }
        schedule.push(u32::try_from(i).unwrap_or(u32::MAX));
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::super::test_support::instances;
    use super::*;

    fn counts(
        w: &SmoothWeighted,
        n: usize,
        picks: usize,
        eligible: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let mut counts = vec![0; n];
        for _ in 0..picks {
            counts[w.pick(n, &eligible).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn three_to_one_is_exact_over_400() {
        let set = instances(&[3, 1]);
        let w = SmoothWeighted::new(&set);
        assert_eq!(counts(&w, 2, 400, |_| true), [300, 100]);
    }

    #[test]
    fn schedule_is_smooth_not_bunched() {
        let set = instances(&[5, 1, 1]);
        let w = SmoothWeighted::new(&set);
        // nginx's documented sequence for weights 5, 1, 1.
        assert_eq!(w.schedule, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weights_are_reduced_by_their_gcd() {
        let set = instances(&[300, 100, 200]);
        let w = SmoothWeighted::new(&set);
        assert_eq!(w.schedule.len(), 6);
        assert_eq!(counts(&w, 3, 600, |_| true), [300, 100, 200]);
    }

    #[test]
    fn one_against_a_thousand_does_not_blow_up() {
        let set = instances(&[1, 1000]);
        let w = SmoothWeighted::new(&set);
        assert_eq!(w.schedule.len(), 1001);
        assert_eq!(counts(&w, 2, 1001, |_| true), [1, 1000]);
    }

    #[test]
    fn huge_weights_are_scaled_down_keeping_every_instance() {
        let set = instances(&[1, 4_000_000_000, 7]);
        let w = SmoothWeighted::new(&set);
        assert!(
            w.schedule.len() as u64 <= MAX_SCHEDULE + 3,
            "{}",
            w.schedule.len()
        );
        let c = counts(&w, 3, w.schedule.len(), |_| true);
        assert!(c[0] >= 1 && c[2] >= 1, "{c:?}");
        assert!(c[1] > 4000, "{c:?}");
    }

    #[test]
    fn zero_weights_still_serve() {
        let set = instances(&[0, 0]);
        let w = SmoothWeighted::new(&set);
        assert_eq!(counts(&w, 2, 10, |_| true), [5, 5]);
    }

    #[test]
    fn skips_ineligible_and_returns_none_when_all_are() {
        let set = instances(&[3, 1, 2]);
        let w = SmoothWeighted::new(&set);
        let c = counts(&w, 3, 600, |i| i != 0);
        assert_eq!(c[0], 0);
        assert_eq!(c[1] + c[2], 600);
        assert_eq!(w.pick(3, &|_| false), None);
    }
}
