//! Round robin: each instance in turn, skipping those not eligible.
//!
//! Owns: the shared cursor. Must not: look at weights or load.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// A cursor shared by all requests; each pick advances it by one.
#[derive(Debug, Default)]
pub(super) struct RoundRobin {
    cursor: AtomicUsize,
}

impl RoundRobin {
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// Starts at the next cursor position and scans forward (wrapping) to the first
    /// eligible index below `n`.
    pub(super) fn pick(&self, n: usize, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Relaxed) % n;
        (0..n).map(|k| (start + k) % n).find(|&i| eligible(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_evenly() {
        let rr = RoundRobin::new();
        let mut counts = [0; 4];
        for _ in 0..400 {
            counts[rr.pick(4, &|_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [100; 4]);
    }

    #[test]
    fn takes_turns_in_order() {
        let rr = RoundRobin::new();
        let picks: Vec<_> = (0..6).map(|_| rr.pick(3, &|_| true).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn skips_ineligible() {
        let rr = RoundRobin::new();
        let mut counts = [0; 4];
        for _ in 0..400 {
            counts[rr.pick(4, &|i| i != 1).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        // The skipped instance's turn falls to the next one.
        assert_eq!(counts, [100, 0, 200, 100]);
    }

    #[test]
    fn none_when_nothing_eligible_or_empty() {
        let rr = RoundRobin::new();
        assert_eq!(rr.pick(3, &|_| false), None);
        assert_eq!(rr.pick(0, &|_| true), None);
    }

    #[test]
    fn cursor_wrap_does_not_panic() {
        let rr = RoundRobin {
            cursor: AtomicUsize::new(usize::MAX),
        };
        assert!(rr.pick(3, &|_| true).is_some());
        assert!(rr.pick(3, &|_| true).is_some());
    }
}
