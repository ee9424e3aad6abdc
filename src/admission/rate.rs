//! Rate limits: GCRA (governor) per (route, user), plus an optional limit for the route.
//!
//! Owns: [`RouteLimiter`] (the per-user cells of one route, their eviction and cap) and
//! the [`RateInfo`] that becomes `RateLimit-*` headers.
//! Must not: know HTTP or identities beyond an opaque user key.
//!
//! Each user gets a governor direct limiter in a `DashMap`. A cell untouched for a whole
//! burst-refill period is indistinguishable from a fresh one, so the sweep drops it. The
//! map never holds more than `max_users` cells: past that, new users share one overflow
//! cell (strict for them, but memory stays bounded) until a sweep frees room.
//! The clock is tokio's, so tests run on a paused clock. A cluster-wide limiter uses one
//! as its node's share and [`charge`](RouteLimiter::charge)s it with what Redis granted.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::{Rate, RateLimitConfig};

/// Time since the limiter was built, on tokio's clock (paused in tests).
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: tokio::time::Instant,
}

impl TokioClock {
    fn new() -> Self {
        TokioClock {
            base: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.base.elapsed())
    }
}

type Cell = RateLimiter<NotKeyed, InMemoryState, TokioClock, StateInformationMiddleware>;

fn cell(quota: Quota, clock: &TokioClock) -> Cell {
    RateLimiter::direct_with_clock(quota, clock.clone()).with_middleware()
}

fn quota(rate: Rate, burst: u32) -> Quota {
    let burst = std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN);
    // Validation keeps the interval ≥ 1 µs, so with_period never sees zero.
    Quota::with_period(rate.interval().max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(std::num::NonZeroU32::MIN))
        .allow_burst(burst)
}

/// What the `RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    /// Requests allowed at once (the burst).
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the full burst is available again.
    pub reset_secs: u64,
}

impl RateInfo {
    /// Limit, remaining and reset, in the order of the `RateLimit-*` headers.
    pub fn values(&self) -> [u64; 3] {
        [
            u64::from(self.limit),
            u64::from(self.remaining),
            self.reset_secs,
        ]
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User,
    Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed(RateInfo),
    Limited {
        info: RateInfo,
        retry_after: Duration,
        scope: Scope,
    },
}

struct UserCell {
    cell: Cell,
    /// Clock milliseconds of the last check, for idle eviction.
    last_ms: AtomicU64,
}

/// The limiter state of one route; survives reloads while its settings stay the same.
pub struct RouteLimiter {
    config: RateLimitConfig,
    quota: Quota,
    clock: TokioClock,
    users: DashMap<Box<str>, UserCell>,
    overflow: Cell,
    global: Option<Cell>,
}

impl std::fmt::Debug for RouteLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteLimiter")
            .field("config", &self.config)
            .field("users", &self.users.len())
            .finish()
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

impl RouteLimiter {
    pub fn new(config: RateLimitConfig) -> Self {
        let clock = TokioClock::new();
        let quota = quota(config.rate, config.burst);
        RouteLimiter {
            overflow: cell(quota, &clock),
            global: config.global.map(|(r, b)| cell(self::quota(r, b), &clock)),
            quota,
            clock,
            users: DashMap::new(),
            config,
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Users with a cell right now.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    fn now_ms(&self) -> u64 {
        self.clock.base.elapsed().as_millis() as u64
    }

    fn info(&self, remaining: u32) -> RateInfo {
        let limit = self.quota.burst_size().get();
        let used = limit.saturating_sub(remaining);
        RateInfo {
            limit,
            remaining,
            reset_secs: ceil_secs(self.quota.replenish_interval() * used),
        }
    }

    /// Takes one request from `user`'s cell, then from the route's.
    pub fn check(&self, user: &str) -> RateDecision {
        let now_ms = self.now_ms();
        let outcome = if let Some(c) = self.users.get(user) {
            c.last_ms.store(now_ms, Relaxed);
            c.cell.check()
        } else if self.users.len() >= self.config.max_users {
            self.overflow.check()
        } else {
            let c = self.users.entry(user.into()).or_insert_with(|| UserCell {
                cell: cell(self.quota, &self.clock),
                last_ms: AtomicU64::new(now_ms),
            });
            c.cell.check()
        };
        let info = match outcome {
            Ok(snapshot) => self.info(snapshot.remaining_burst_capacity()),
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(self.clock.now());
                let mut info = self.info(0);
                info.reset_secs = ceil_secs(retry_after).max(1);
                return RateDecision::Limited {
                    info,
                    retry_after,
                    scope: Scope::User,
                };
            }
        };
        if let Some(global) = &self.global {
            if let Err(not_until) = global.check() {
                let retry_after = not_until.wait_time_from(self.clock.now());
                return RateDecision::Limited {
                    info: RateInfo {
                        remaining: 0,
                        reset_secs: ceil_secs(retry_after).max(1),
                        ..info
                    },
                    retry_after,
                    scope: Scope::Route,
                };
            }
        }
        RateDecision::Allowed(info)
    }

    /// Takes up to `n` tokens from `user`'s cell (the route's cell when `user` is `None`)
    /// without deciding a request; returns how many it took. A cluster-wide limiter
    /// charges what Redis granted this node to its share, so a node that falls back
    /// starts from what it already took rather than from a full burst.
    pub fn charge(&self, user: Option<&str>, n: u32) -> u32 {
        let take = |cell: &Cell| {
            // A cell never holds more than its burst: past that it is empty anyway.
            let mut taken = 0;
            while taken < n && cell.check().is_ok() {
                taken += 1;
            }
            taken
        };
        let Some(user) = user else {
            return self.global.as_ref().map_or(0, take);
        };
        let now_ms = self.now_ms();
        if let Some(c) = self.users.get(user) {
            c.last_ms.store(now_ms, Relaxed);
            return take(&c.cell);
        }
        if self.users.len() >= self.config.max_users {
            return take(&self.overflow);
        }
        let c = self.users.entry(user.into()).or_insert_with(|| UserCell {
            cell: cell(self.quota, &self.clock),
            last_ms: AtomicU64::new(now_ms),
        });
        take(&c.cell)
    }

    /// Drops the cells of users idle long enough that their cell is full again.
    pub fn sweep(&self) -> usize {
        let refill_ms = self.quota.burst_size_replenished_in().as_millis() as u64;
        let now_ms = self.now_ms();
        let before = self.users.len();
        self.users
            .retain(|_, c| now_ms.saturating_sub(c.last_ms.load(Relaxed)) <= refill_ms);
        before.saturating_sub(self.users.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: &str, burst: u32, max_users: usize) -> RouteLimiter {
        RouteLimiter::new(RateLimitConfig {
            rate: crate::config::parse_rate(rate).unwrap(),
            burst,
            global: None,
            max_users,
            scope: Default::default(),
            group: None,
        })
    }

    fn allowed(d: RateDecision) -> bool {
        matches!(d, RateDecision::Allowed(_))
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate_with_retry_after() {
        let l = limiter("2/s", 3, 10);
        let infos: Vec<_> = (0..3).map(|_| l.check("ip:a")).collect();
        assert_eq!(
            infos.last(),
            Some(&RateDecision::Allowed(RateInfo {
                limit: 3,
                remaining: 0,
                reset_secs: 2
            }))
        );
        let RateDecision::Limited {
            retry_after, info, ..
        } = l.check("ip:a")
        else {
            panic!("fourth request in the burst must be limited");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        assert_eq!((info.remaining, info.reset_secs), (0, 1));
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(!allowed(l.check("ip:a")));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(allowed(l.check("ip:a")));
        // Over ten seconds at the rate: 2 per second pass, no more.
        let mut passed = 0;
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(100)).await;
            passed += allowed(l.check("ip:a")) as u32;
        }
        assert_eq!(passed, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn users_are_independent_and_the_route_limit_is_shared() {
        let mut c = limiter("1/s", 1, 10).config().clone();
        c.global = Some((crate::config::parse_rate("2/s").unwrap(), 2));
        let l = RouteLimiter::new(c);
        assert!(allowed(l.check("ip:a")));
        assert!(!allowed(l.check("ip:a")));
        assert!(allowed(l.check("ip:b")));
        let RateDecision::Limited { scope, .. } = l.check("ip:c") else {
            panic!("route limit of 2 spent")
        };
        assert_eq!(scope, Scope::Route);
    }

    #[tokio::test(start_paused = true)]
    async fn charging_takes_what_is_left_and_then_requests_wait_for_the_rate() {
        let mut c = limiter("10/s", 5, 10).config().clone();
        c.global = Some((crate::config::parse_rate("20/s").unwrap(), 4));
        let l = RouteLimiter::new(c);
        assert_eq!(l.charge(Some("ip:a"), 3), 3);
        assert_eq!(l.charge(Some("ip:a"), 7), 2, "only what the burst held");
        assert!(!allowed(l.check("ip:a")));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(allowed(l.check("ip:a")), "one interval later");
        assert_eq!(
            l.charge(None, 9),
            3,
            "the route's cell, less the request above"
        );
        assert_eq!(l.charge(Some("ip:b"), 0), 0);
        assert!(matches!(
            l.check("ip:b"),
            RateDecision::Limited {
                scope: Scope::Route,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_users_are_swept_and_keys_are_capped() {
        let l = limiter("10/s", 10, 100);
        for i in 0..1000 {
            l.check(&format!("ip:{i}"));
        }
        assert_eq!(l.users(), 100, "hard cap");
        // Users past the cap share the overflow cell: 10 of them pass, then it is dry.
        let passed = (0..50)
            .filter(|i| allowed(l.check(&format!("new:{i}"))))
            .count();
        assert_eq!(passed, 0, "the overflow cell was spent by users 100..1000");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(l.sweep(), 0, "not idle for a full refill yet");
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(l.sweep(), 100);
        assert_eq!(l.users(), 0);
        assert!(allowed(l.check("ip:0")));
    }
}
