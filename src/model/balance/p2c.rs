//! Power of two choices: two random eligible instances, the less loaded one wins.
//!
//! Owns: the random sampling. Must not: change load counters; it only reads
//! `in_flight`, which the proxy maintains.

use std::sync::Arc;

use crate::model::Instance;

/// Random draws tried before falling back to a scan: with half the instances eligible,
/// three misses in a row happen one time in eight, so the scan is rare.
const RANDOM_TRIES: usize = 3;

/// Stateless: the randomness comes from `rand`'s thread-local generator (no lock).
#[derive(Debug)]
pub(super) struct PowerOfTwo;

impl PowerOfTwo {
    /// Draws two distinct eligible indices and keeps the one with fewer requests in flight
    /// (the first on a tie). With a single eligible instance, that one.
    pub(super) fn pick(
        &self,
        instances: &[Arc<Instance>],
        eligible: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = instances.len();
        let first = random_eligible(n, None, eligible)?;
        let Some(second) = random_eligible(n, Some(first), eligible) else {
            return Some(first);
        };
        let load = |i: usize| instances.get(i).map_or(u32::MAX, |x| x.health.in_flight());
        if load(second) < load(first) {
            Some(second)
        } else {
            Some(first)
        }
    }
}

/// A uniformly random eligible index below `n` other than `except`: a few random draws,
/// then a scan from a random start so few eligible instances cannot make it loop.
fn random_eligible(
    n: usize,
    except: Option<usize>,
    eligible: &impl Fn(usize) -> bool,
) -> Option<usize> {
    // Candidates are 0..n without `except`; draw among them and skip over `except`.
    let candidates = n.saturating_sub(usize::from(except.is_some_and(|e| e < n)));
    if candidates == 0 {
        return None;
    }
    let skip = |i: usize| match except {
        Some(e) if i >= e => i + 1,
        _ => i,
    };
    for _ in 0..RANDOM_TRIES {
        let i = skip(rand::random_range(0..candidates));
        if eligible(i) {
            return Some(i);
        }
    }
    let start = rand::random_range(0..candidates);
    (0..candidates)
        .map(|k| skip((start + k) % candidates))
        .find(|&i| eligible(i))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::instances;
    use super::*;

    #[test]
    fn two_instances_always_go_to_the_less_loaded() {
        let set = instances(&[1, 1]);
        for _ in 0..5 {
            set[0].health.begin_request();
        }
        set[1].health.begin_request();
        for _ in 0..200 {
            assert_eq!(PowerOfTwo.pick(&set, &|_| true), Some(1));
        }
    }

    #[test]
    fn the_most_loaded_of_three_is_never_picked() {
        // Any two distinct of three include an idle one.
        let set = instances(&[1, 1, 1]);
        for _ in 0..10 {
            set[1].health.begin_request();
        }
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[PowerOfTwo.pick(&set, &|_| true).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        // Both idle ones get a fair share.
        assert!(counts[0] > 1000 && counts[2] > 1000, "{counts:?}");
    }

    #[test]
    fn a_single_eligible_instance_is_picked() {
        let set = instances(&[1; 50]);
        for _ in 0..200 {
            assert_eq!(PowerOfTwo.pick(&set, &|i| i == 37), Some(37));
        }
        let one = instances(&[1]);
        assert_eq!(PowerOfTwo.pick(&one, &|_| true), Some(0));
    }

    #[test]
    fn two_eligible_among_many_are_both_compared() {
        let set = instances(&[1; 50]);
        set[3].health.begin_request();
        for _ in 0..200 {
            assert_eq!(PowerOfTwo.pick(&set, &|i| i == 3 || i == 41), Some(41));
        }
    }

    #[test]
    fn none_when_nothing_eligible_or_empty() {
        let set = instances(&[1; 5]);
        assert_eq!(PowerOfTwo.pick(&set, &|_| false), None);
        assert_eq!(PowerOfTwo.pick(&[], &|_| true), None);
    }

    #[test]
    fn random_eligible_never_returns_the_excluded_index() {
        for _ in 0..500 {
            let i = random_eligible(4, Some(2), &|_| true).unwrap();
            assert!(i < 4 && i != 2);
        }
        assert_eq!(random_eligible(1, Some(0), &|_| true), None);
    }
}
