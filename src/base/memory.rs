//! When the allocator should give back everything it holds freed at once: after a spike
//! of client connections has closed and the node has gone quiet.
//!
//! The housekeeping's once-a-second release (`RunOptions::release_memory`) runs only the
//! purges that are due, and mimalloc (3.3) can lose track of those: its purge clears the
//! process-wide "a purge is due" mark when it found nothing due, and a thread that frees
//! pages at that moment may have set only its arena's mark, which the due-only purge
//! does not look at while the process-wide one is clear; only a forced collect does
//! (read in `arena.c`, `mi_arenas_try_purge`). Once in ~16 runs here (and in the issue's
//! figure, 1.31×), a node that had 10,000 TLS connections kept ~7 MiB more than usual
//! 10 s after they closed; the other runs kept 2–4 MiB that is live (a forced collect
//! frees ~0.4 MiB of it). A forced collect decommits every freed page at once, which a
//! busy node would pay for in page faults as it reuses them: so it runs only when the
//! open connections have dropped to half their peak, by at least [`SPIKE`], and stopped
//! dropping.
//!
//! Owns: that decision ([`AfterSpike`]).
//! Must not: call the allocator (the binary chooses it), read metrics (the caller passes
//! the count).

/// The smallest drop in open connections worth a forced collect: 64 idle TLS connections
/// hold ~0.7 MiB, and below that a forced collect frees too little to matter.
pub const SPIKE: i64 = 64;

/// Watches the count of open client connections, one look per housekeeping tick, and
/// says when a spike of them is over.
#[derive(Debug, Default)]
pub struct AfterSpike {
    /// The most connections open since the last forced collect.
    peak: i64,
    /// The count at the previous tick.
    last: i64,
}

impl AfterSpike {
    /// Takes this tick's count of open connections; `true` when the allocator should be
    /// made to give back all it holds freed now: the count has fallen to half its peak
    /// or less, by at least [`SPIKE`], and did not change since the previous tick (the
    /// connections have finished closing). The peak then starts again from here.
    pub fn tick(&mut self, open: i64) -> bool {
        let open = open.max(0);
        self.peak = self.peak.max(open);
        let settled = open == self.last;
        self.last = open;
        let over = settled && self.peak - open >= SPIKE && open <= self.peak / 2;
        if over {
            self.peak = open;
        }
        over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticks(counts: &[i64]) -> Vec<bool> {
        let mut s = AfterSpike::default();
        counts.iter().map(|&c| s.tick(c)).collect()
    }

    #[test]
    fn a_spike_that_closed_is_collected_once_it_settles() {
        // Up to 10,000, closing over two ticks, then quiet: once, on the first quiet tick.
        assert_eq!(
            ticks(&[0, 5000, 10000, 10000, 4000, 10, 10, 10, 10]),
            [false, false, false, false, false, false, true, false, false]
        );
    }

    #[test]
    fn a_busy_node_is_left_alone() {
        // Steady load, and ups and downs that never halve the peak.
        assert!(!ticks(&[500, 500, 500, 300, 300, 400, 260, 260, 500]).contains(&true));
    }

    #[test]
    fn a_small_drop_is_not_worth_a_collect() {
        assert!(!ticks(&[0, 60, 60, 0, 0, 0]).contains(&true));
        assert_eq!(
            ticks(&[0, 64, 64, 0, 0]),
            [false, false, false, false, true]
        );
    }

    #[test]
    fn the_next_spike_counts_from_the_quiet_level() {
        assert_eq!(
            ticks(&[1000, 1000, 0, 0, 0, 1000, 1000, 0, 0]),
            [false, false, false, true, false, false, false, false, true]
        );
    }

    #[test]
    fn a_count_below_zero_reads_as_none() {
        assert!(!ticks(&[-5, -5, -5]).contains(&true));
    }
}
