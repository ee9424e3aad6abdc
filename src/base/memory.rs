//! When the allocator should give back everything it holds freed at once: after a spike
//! of client connections has closed and the node has gone quiet; and on which threads.
//!
//! The housekeeping's once-a-second release (`RunOptions::release_memory`) runs only the
//! purges that are due, and mimalloc (3.3) can lose track of those: its purge clears the
//! process-wide "a purge is due" mark when it found nothing due, and a thread that frees
//! pages at that moment may have set only its arena's mark, which the due-only purge
//! does not look at while the process-wide one is clear; only a forced collect does
//! (read in `arena.c`, `mi_arenas_try_purge`). A forced collect decommits every freed
//! page at once, which a busy node would pay for in page faults as it reuses them: so it
//! runs only when the open connections have dropped to half their peak, by at least
//! [`SPIKE`], and stopped dropping.
//!
//! And it must run on each thread that served the connections ([`ServingThreads`]):
//! mimalloc collects only the calling thread's heap. A page that thread emptied as the
//! spike closed (the last of its size, kept "retired" for reuse) is freed only by that
//! thread, after ~1,000 of its own slow-path allocations, which a quiet node never makes:
//! 0.6 MiB of such pages stayed on the proxy thread for good after 10,000 idle TLS
//! connections closed (read from mimalloc's page headers in /proc/PID/mem; none once
//! the release runs there). The housekeeping's own thread reaches only its heap and the
//! arenas.
//!
//! Owns: that decision ([`AfterSpike`]), the runtimes of the threads that served
//! connections ([`ServingThreads`]).
//! Must not: call the allocator (the binary chooses it, and passes the call in), read
//! metrics (the caller passes the count).

use std::cell::Cell;
use std::sync::Mutex;

use tokio::runtime::Handle;

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

/// The runtimes of the threads that served client connections, each noted once by its
/// first connection, so a release after a spike runs on each of them (see the module).
pub struct ServingThreads;

/// Each a current-thread runtime of the proxy service (busbar runs pingora's no-steal
/// runtime): a task spawned on one runs on its one thread.
static SERVING: Mutex<Vec<Handle>> = Mutex::new(Vec::new());

thread_local! {
    static NOTED: Cell<bool> = const { Cell::new(false) };
}

impl ServingThreads {
    /// Notes the current thread's runtime, the first time it serves a connection; after
    /// that a thread-local flag, per connection.
    pub fn note() {
        if NOTED.with(Cell::get) {
            return;
        }
        NOTED.with(|n| n.set(true));
        if let Ok(here) = Handle::try_current() {
            SERVING.lock().unwrap_or_else(|p| p.into_inner()).push(here);
        }
    }

    /// Runs `release(true)` on each noted thread, as a task of its runtime (one that has
    /// shut down drops it). Spawned, not waited for: the caller's tick goes on.
    pub fn release_each(release: fn(bool)) {
        let serving = SERVING.lock().unwrap_or_else(|p| p.into_inner());
        for rt in serving.iter() {
            drop(rt.spawn(async move { release(true) }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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

    thread_local! {
        static RELEASED_ON: Cell<bool> = const { Cell::new(false) };
    }

    fn mark(all: bool) {
        assert!(all);
        RELEASED_ON.with(|r| r.set(true));
    }

    #[test]
    fn a_release_runs_on_each_thread_that_served() {
        // Two current-thread runtimes on their own threads, as pingora's no-steal runtime
        // builds them; each notes itself (twice: listed once), then waits to be asked.
        let (tx, rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        ServingThreads::note();
                        ServingThreads::note();
                        tx.send(()).unwrap();
                        // Generous: a loaded machine may take a while to run the task.
                        for _ in 0..6000 {
                            if RELEASED_ON.with(Cell::get) {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        panic!("the release never ran on this thread");
                    });
                })
            })
            .collect();
        rx.recv().unwrap();
        rx.recv().unwrap();
        assert!(SERVING.lock().unwrap().len() >= 2);
        ServingThreads::release_each(mark);
        for t in threads {
            // Ends only once the release ran on that thread.
            t.join().unwrap();
        }
        // Outside a runtime nothing is noted, and nothing breaks.
        std::thread::spawn(ServingThreads::note).join().unwrap();
    }
}
