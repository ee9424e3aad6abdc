//! The pace a client must keep while it sends a request body (slow body, "R-U-Dead-Yet").
//!
//! pingora's downstream read timeout (`client_timeout`) bounds each read on its own, so a
//! client sending one byte every few seconds is never cut off: it holds its connection,
//! and the half request busbar streamed upstream, for as long as it likes. Like Apache's
//! `mod_reqtimeout` (`body=…,MinRate=…`), a body gets `client_timeout` from its first
//! byte for free, and each byte it sends buys `1 / body_min_rate` seconds more; past that
//! deadline it is cut off (408 if nothing was answered yet, the connection closed, the
//! upstream connection dropped). Each read still waits at most `client_timeout`.
//!
//! Owns: the deadline arithmetic, for every driver that reads a body (the pingora driver
//! sets each read's timeout from it).
//! Must not: read, buffer or change body bytes, or hold a driver's type.

use std::time::{Duration, Instant};

/// How slowly a request body may arrive, once its first byte is in.
#[derive(Debug, Clone, Copy)]
pub struct BodyPace {
    /// Free time from the first byte, and the longest any one read may wait.
    grace: Duration,
    /// Bytes per second the body must average after `grace`; 0: no pace, per-read only.
    min_rate: u64,
    /// When the first body byte arrived.
    start: Option<Instant>,
}

impl BodyPace {
    pub fn new(grace: Duration, min_rate: u64) -> BodyPace {
        BodyPace {
            grace,
            min_rate,
            start: None,
        }
    }

    /// How long the next read may wait once `received` bytes are in at `now`, or `None`
    /// when the body is already behind its pace.
    pub fn next_wait(&mut self, received: u64, now: Instant) -> Option<Duration> {
        if self.min_rate == 0 {
            return Some(self.grace);
        }
        let start = *self.start.get_or_insert(now);
        // Whole seconds and nanoseconds in integers: no float, no overflow for any size.
        let nanos =
            u128::from(received % self.min_rate) * 1_000_000_000 / u128::from(self.min_rate);
        let earned = Duration::new(received / self.min_rate, nanos as u32);
        let Some(deadline) = start
            .checked_add(self.grace)
            .and_then(|d| d.checked_add(earned))
        else {
            // Past what a clock can hold: no deadline to speak of.
            return Some(self.grace);
        };
        let left = deadline.checked_duration_since(now)?;
        Some(left.min(self.grace))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_byte_starts_the_grace_and_each_read_waits_at_most_the_grace() {
        let mut p = BodyPace::new(30 * S, 500);
        let t0 = Instant::now();
        assert_eq!(p.next_wait(10, t0), Some(30 * S));
        // 10 s later, 10 bytes in: 20 s of grace left plus 20 ms earned.
        assert_eq!(
            p.next_wait(10, t0 + 10 * S),
            Some(20 * S + Duration::from_millis(20))
        );
    }

    #[test]
    fn a_trickle_falls_behind_and_a_steady_body_does_not() {
        let t0 = Instant::now();
        // A byte a second against 500 B/s: behind once the 30 s grace is spent.
        let mut trickle = BodyPace::new(30 * S, 500);
        assert!(trickle.next_wait(1, t0).is_some());
        assert!(trickle.next_wait(29, t0 + 29 * S).is_some());
        assert_eq!(trickle.next_wait(31, t0 + 31 * S), None);
        // 1 KiB a second for an hour keeps ahead of 500 B/s.
        let mut steady = BodyPace::new(30 * S, 500);
        assert!(steady.next_wait(1024, t0).is_some());
        assert_eq!(steady.next_wait(3600 * 1024, t0 + 3600 * S), Some(30 * S));
    }

    #[test]
    fn no_rate_means_only_the_per_read_timeout() {
        let mut p = BodyPace::new(30 * S, 0);
        let t0 = Instant::now();
        assert_eq!(p.next_wait(1, t0), Some(30 * S));
        assert_eq!(p.next_wait(2, t0 + 86_400 * S), Some(30 * S));
    }

    #[test]
    fn huge_bodies_and_rates_do_not_overflow() {
        let mut p = BodyPace::new(30 * S, u64::MAX);
        let t0 = Instant::now();
        assert_eq!(p.next_wait(u64::MAX - 1, t0), Some(30 * S));
        let mut p = BodyPace::new(30 * S, 1);
        assert_eq!(p.next_wait(1 << 40, t0), Some(30 * S));
    }
}
