//! Cluster-wide rate limits: a route's `rate_limit` with `scope = "cluster"`.
//!
//! Owns: [`ClusterLimiter`] — per-user batches of tokens taken from Redis, the 429s
//! remembered until Redis' Retry-After, and the fallback limiter at the node's share.
//! Must not: talk to Redis itself (that is `cluster::redis`) or know HTTP.
//!
//! Every admitted request spends a token the shared GCRA in Redis granted, so while Redis
//! answers the cluster never admits more than the limit. To spare most requests the
//! round trip, a node takes up to `rate × sync_interval ÷ live nodes` tokens at once and
//! spends them locally for one `sync_interval`; tokens it does not spend in that time are
//! lost (the cluster then admits a little less than the limit, never more). Requests
//! that find the batch empty at the same moment each take a batch; the batches add up,
//! and a token is spent at most two sync intervals after Redis granted it. A refusal is
//! remembered until the Retry-After Redis computed, which is exact: no node can get a
//! token earlier.
//!
//! When the Redis shard that holds a key is down or slow, the node limits that key on its
//! own share of the limit (`limit ÷ live nodes`, last counted, the burst rounded up),
//! counts each such decision in `busbar_ratelimit_redis_fallback_total`, and goes back to
//! Redis once the shard answers again. Keys on other shards stay shared. While nodes
//! disagree about a shard, over-admission is bounded both ways: every grant from Redis is
//! charged to the node's share, so a node that falls back starts from what it already
//! took; and for a moment after a shard comes back a node admits no more than its share.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use prometheus::IntCounter;
use tokio::time::Instant;

use super::rate::{RateDecision, RateInfo, RouteLimiter, Scope};
use crate::cluster::redis::{Grant, RedisLimits};
use crate::config::{Rate, RateLimitConfig};
use crate::metrics::METRICS;

/// A node's view of one limit key.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Tokens taken from Redis and not spent yet.
    tokens: u32,
    /// Unspent tokens are dropped then.
    until: Instant,
    /// Refused until then (Redis' Retry-After).
    refused_until: Option<Instant>,
    /// Redis' last word on the burst left and its refill.
    remaining: u32,
    reset: Duration,
}

/// The node-local limiter at this node's share, built for a count of live nodes.
struct Share {
    nodes: usize,
    limiter: RouteLimiter,
}

/// One route's cluster-wide limit; survives reloads while its settings stay the same.
pub struct ClusterLimiter {
    route: String,
    config: RateLimitConfig,
    redis: Arc<RedisLimits>,
    leases: DashMap<Box<str>, Lease>,
    share: ArcSwap<Share>,
    fallbacks: IntCounter,
}

impl std::fmt::Debug for ClusterLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLimiter")
            .field("route", &self.route)
            .field("leases", &self.leases.len())
            .finish()
    }
}

/// A node's part of a burst: `burst ÷ n` rounded up, and never under 2 when the burst
/// is 2 or more. Rounded down, 5 ÷ 3 gave 1: a GCRA cell of burst 1 refuses every
/// request that arrives a hair early, and evenly spread traffic at twice the limit was
/// admitted 22% under it. One request of tolerance absorbs that jitter; the cluster's
/// total burst grows by at most `n` requests, its rate not at all.
fn share_burst(burst: u32, n: u32) -> u32 {
    burst.div_ceil(n.max(1)).max(burst.min(2)).max(1)
}

/// `rate ÷ n`, and the burst shared by [`share_burst`].
fn divided(config: &RateLimitConfig, n: usize) -> RateLimitConfig {
    let n = n.max(1) as u32;
    let div = |r: Rate| Rate {
        count: r.count,
        per: r.per.saturating_mul(n),
    };
    RateLimitConfig {
        rate: div(config.rate),
        burst: share_burst(config.burst, n),
        global: config.global.map(|(r, b)| (div(r), share_burst(b, n))),
        ..config.clone()
    }
}

/// Folds a grant that just came back from Redis (`new`, the request that asked already
/// counted) into the key's lease. Tokens still held are kept, and a new grant adds to
/// them and renews their deadline: unspent tokens live at most one more sync interval.
/// A refusal from Redis does not refuse while tokens granted to this node remain: the
/// request takes one of them. Returns the lease as it now stands for this request.
fn merge(held: &mut Lease, new: Lease, now: Instant) -> Lease {
    let spendable = held.until > now && held.tokens > 0;
    if !spendable {
        *held = new;
    } else if new.refused_until.is_none() {
        held.tokens += new.tokens;
        held.until = new.until;
        held.remaining = new.remaining;
        held.reset = new.reset;
        held.refused_until = None;
    } else {
        held.tokens -= 1;
    }
    *held
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

enum Step {
    Allowed(RateInfo),
    Limited(RateInfo, Duration),
}

impl ClusterLimiter {
    pub fn new(route: &str, config: RateLimitConfig, redis: Arc<RedisLimits>) -> Self {
        let nodes = redis.live_nodes();
        ClusterLimiter {
            route: route.to_string(),
            share: ArcSwap::from_pointee(Share {
                nodes,
                limiter: RouteLimiter::new(divided(&config, nodes)),
            }),
            config,
            redis,
            leases: DashMap::new(),
            fallbacks: METRICS.redis_fallback.with_label_values(&[route]),
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    pub fn redis(&self) -> &Arc<RedisLimits> {
        &self.redis
    }

    /// Takes one request from `user`'s limit, then from the route's, cluster-wide.
    pub async fn check(&self, user: &str) -> RateDecision {
        let user_key = self.redis.key(&self.route, Some(user));
        let info = match self
            .step(&user_key, self.config.rate, self.config.burst, Some(user))
            .await
        {
            Ok(Step::Allowed(info)) => info,
            Ok(Step::Limited(info, retry_after)) => {
                return RateDecision::Limited {
                    info,
                    retry_after,
                    scope: Scope::User,
                }
            }
            Err(()) => return self.fallback(user),
        };
        if let Some((rate, burst)) = self.config.global {
            let key = self.redis.key(&self.route, None);
            match self.step(&key, rate, burst, None).await {
                Ok(Step::Allowed(_)) => {}
                Ok(Step::Limited(g, retry_after)) => {
                    return RateDecision::Limited {
                        info: RateInfo {
                            remaining: 0,
                            reset_secs: g.reset_secs,
                            ..info
                        },
                        retry_after,
                        scope: Scope::Route,
                    }
                }
                Err(()) => return self.fallback(user),
            }
        }
        RateDecision::Allowed(info)
    }

    /// The node's share, rebuilt when the count of live nodes changed.
    fn share(&self) -> arc_swap::Guard<Arc<Share>> {
        let nodes = self.redis.live_nodes();
        let share = self.share.load();
        if share.nodes == nodes {
            return share;
        }
        self.share.store(Arc::new(Share {
            nodes,
            limiter: RouteLimiter::new(divided(&self.config, nodes)),
        }));
        self.share.load()
    }

    /// Decides from the node's share.
    fn fallback(&self, user: &str) -> RateDecision {
        self.fallbacks.inc();
        match self.share().limiter.check(user) {
            // Headers state the cluster-wide limit, not the share.
            RateDecision::Allowed(info) => RateDecision::Allowed(RateInfo {
                limit: self.config.burst,
                ..info
            }),
            RateDecision::Limited {
                info,
                retry_after,
                scope,
            } => RateDecision::Limited {
                info: RateInfo {
                    limit: self.config.burst,
                    ..info
                },
                retry_after,
                scope,
            },
        }
    }

    fn info(&self, burst: u32, remaining: u32, reset: Duration) -> RateInfo {
        RateInfo {
            limit: burst,
            remaining: remaining.min(burst),
            reset_secs: ceil_secs(reset),
        }
    }

    /// Tokens to take from Redis at once: this node's part of one sync interval's rate.
    fn batch(&self, rate: Rate, burst: u32) -> u32 {
        let per_interval =
            self.redis.config().sync_interval.as_secs_f64() / rate.interval().as_secs_f64();
        let mine = per_interval / self.redis.live_nodes() as f64;
        (mine.floor() as u32).clamp(1, burst.max(1))
    }

    /// One limit key: from the local batch or refusal when it still holds, else Redis.
    /// `user` names the share's cell the key stands for (`None`: the route's).
    async fn step(
        &self,
        key: &str,
        rate: Rate,
        burst: u32,
        user: Option<&str>,
    ) -> Result<Step, ()> {
        let now = Instant::now();
        if let Some(mut l) = self.leases.get_mut(key) {
            if let Some(t) = l.refused_until.filter(|t| *t > now) {
                let wait = t - now;
                return Ok(Step::Limited(self.info(burst, 0, l.reset.max(wait)), wait));
            }
            if l.tokens > 0 && l.until > now {
                l.tokens -= 1;
                let info = self.info(burst, l.remaining + l.tokens, l.reset);
                return Ok(Step::Allowed(info));
            }
        }
        let want = self.batch(rate, burst);
        let g: Grant = match self.redis.take(key, rate.interval(), burst, want).await {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(route = %self.route, "cluster rate limit from the local share: {e}");
                return Err(());
            }
        };
        // What Redis granted is charged to this node's share, so a node that has to fall
        // back takes its share minus what it already took (not a fresh burst on top of
        // it). Just after the key's shard came back, other nodes may still be on their
        // share: then this node uses no more than its own share either, and the tokens
        // beyond it are left unspent.
        let share = self.share();
        let charged = share.limiter.charge(user, g.granted);
        let (granted, retry_after) = match g.settling && charged < g.granted {
            true => (charged, rate.interval().saturating_mul(share.nodes as u32)),
            false => (g.granted, g.retry_after),
        };
        let now = Instant::now();
        let lease = Lease {
            tokens: granted.saturating_sub(1),
            until: now + self.redis.config().sync_interval,
            refused_until: (granted == 0).then(|| now + retry_after),
            remaining: g.remaining,
            reset: g.reset,
        };
        // Several requests may have found the batch empty at once, each asking Redis:
        // their grants add up (keeping only the last one lost the others' tokens, D9).
        // Memory stays bounded: past the cap, new keys are not remembered (each asks).
        let under_cap = self.leases.len() < self.config.max_users;
        let kept = match self.leases.entry(key.into()) {
            Entry::Occupied(mut e) => merge(e.get_mut(), lease, now),
            Entry::Vacant(e) => {
                if under_cap {
                    e.insert(lease);
                }
                lease
            }
        };
        if kept.refused_until.is_some() {
            let wait = retry_after.max(Duration::from_millis(1));
            Ok(Step::Limited(self.info(burst, 0, g.reset.max(wait)), wait))
        } else {
            Ok(Step::Allowed(self.info(
                burst,
                kept.remaining + kept.tokens,
                kept.reset,
            )))
        }
    }

    /// Drops spent batches and past refusals, and sweeps the fallback share.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.leases
            .retain(|_, l| l.until > now || l.refused_until.is_some_and(|t| t > now));
        self.share.load().limiter.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(tokens: u32, until: Instant, refused: bool) -> Lease {
        Lease {
            tokens,
            until,
            refused_until: refused.then_some(until),
            remaining: 7,
            reset: Duration::from_millis(100),
        }
    }

    #[test]
    fn grants_that_come_back_together_add_up() {
        let now = Instant::now();
        let later = now + Duration::from_millis(100);
        // Three requests found the batch empty; each was granted 10 (one spent by itself).
        let mut held = lease(0, now, false);
        merge(&mut held, lease(9, later, false), now);
        merge(&mut held, lease(9, later, false), now);
        let kept = merge(&mut held, lease(9, later, false), now);
        assert_eq!(kept.tokens, 27, "every grant's tokens stay spendable");
        assert_eq!(held.until, later);
    }

    #[test]
    fn a_refusal_spends_a_held_token_first_and_replaces_a_spent_lease() {
        let now = Instant::now();
        let later = now + Duration::from_millis(100);
        let mut held = lease(2, later, false);
        let kept = merge(&mut held, lease(0, later, true), now);
        assert!(
            kept.refused_until.is_none(),
            "a held token admits the request"
        );
        assert_eq!(held.tokens, 1);
        // Spent (or expired): the refusal stands and is remembered.
        let mut spent = lease(0, later, false);
        assert!(merge(&mut spent, lease(0, later, true), now)
            .refused_until
            .is_some());
        let mut expired = lease(5, now, false);
        let kept = merge(&mut expired, lease(4, later, false), now);
        assert_eq!(kept.tokens, 4, "an expired lease's tokens are gone");
    }

    #[test]
    fn the_fallback_share_divides_rate_and_burst() {
        let c = RateLimitConfig {
            rate: crate::config::parse_rate("90/s").unwrap(),
            burst: 30,
            global: Some((crate::config::parse_rate("300/s").unwrap(), 2)),
            max_users: 10,
            scope: crate::config::LimitScope::Cluster,
            group: None,
        };
        let d = divided(&c, 3);
        assert_eq!(d.rate.interval(), Duration::from_secs(1) / 30);
        assert_eq!(d.burst, 10);
        assert_eq!(
            d.global.map(|(r, b)| (r.interval(), b)),
            Some((Duration::from_millis(10), 2)),
            "a burst of 2 stays 2: one request of tolerance"
        );
    }

    #[test]
    fn share_bursts_round_up_and_keep_a_request_of_tolerance() {
        assert_eq!(share_burst(5, 3), 2, "not 1");
        assert_eq!(share_burst(30, 3), 10);
        assert_eq!(share_burst(31, 3), 11);
        assert_eq!(share_burst(2, 5), 2);
        assert_eq!(share_burst(1, 3), 1, "a burst of 1 is strict on purpose");
        assert_eq!(share_burst(0, 3), 1);
        assert_eq!(share_burst(7, 0), 7);
    }

    /// Evenly spread traffic at twice the limit, arriving with a little jitter, over three
    /// nodes deciding on their shares: together they admit the limit within 10%.
    #[tokio::test(start_paused = true)]
    async fn three_shares_admit_the_limit_under_jittery_traffic_at_twice_it() {
        let c = RateLimitConfig {
            rate: crate::config::parse_rate("300/s").unwrap(),
            burst: 5,
            global: None,
            max_users: 10,
            scope: crate::config::LimitScope::Cluster,
            group: None,
        };
        let nodes: Vec<RouteLimiter> = (0..3).map(|_| RouteLimiter::new(divided(&c, 3))).collect();
        // 600 requests a second for 10 s, round robin over the nodes; each arrives up to
        // ±0.8 ms off its slot (a fixed pseudo-random sequence).
        let (mut admitted, mut seed) = (0u32, 7u32);
        let mut now = Duration::ZERO;
        for i in 0..6_000u32 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let jitter_us = (seed >> 16) % 1_600;
            let at = Duration::from_micros(u64::from(i) * 1_666 + u64::from(jitter_us));
            if at > now {
                tokio::time::advance(at - now).await;
                now = at;
            }
            let node = &nodes[i as usize % 3];
            admitted += matches!(node.check("ip:a"), RateDecision::Allowed(_)) as u32;
        }
        let expected = 3_000.0 + 5.0;
        assert!(
            (f64::from(admitted) - expected).abs() <= expected * 0.10,
            "admitted {admitted} of ~{expected}"
        );
    }
}
