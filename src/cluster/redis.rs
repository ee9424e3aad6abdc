//! Redis for cluster-wide rate limits: the GCRA script, the connection, node liveness.
//!
//! Owns: [`RedisLimits`] (one connection to a Redis server or Redis Cluster, whether it
//! is usable, the last count of live nodes) and [`RedisUpkeep`], the background service
//! that connects, refreshes this node's liveness and notices Redis coming back.
//! Must not: decide admission. `admission::cluster` takes tokens here and falls back to
//! the node's share when [`RedisLimits::take`] fails.
//!
//! The GCRA runs as one Lua script with Redis' own `TIME`, so nodes with skewed clocks
//! agree. It is sent once and called by its SHA (`Script::invoke_async` sends EVALSHA and
//! loads the script on NOSCRIPT, e.g. after Redis restarted empty). Live nodes are members
//! of one sorted set scored by expiry time, so counting them is one key (Redis Cluster safe).
//!
//! The request path never waits on a connect: it uses the connection the upkeep made, at
//! most `timeout` per call. An error marks Redis down at once, three timeouts in a row
//! too; while down, requests skip Redis until an upkeep round reaches it again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, RedisResult, Script};

use crate::config::{ClusterConfig, RedisTarget};
use crate::metrics::METRICS;
use crate::snapshot::State;

/// GCRA over `KEYS[1]` (the theoretical arrival time, µs): takes up to `ARGV[3]` tokens
/// of a limit of one per `ARGV[1]` µs with a burst of `ARGV[2]`.
/// Returns {granted, remaining, reset µs, retry-after µs}.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local avail = math.floor((burst * interval - (tat - now)) / interval)
local n = math.min(want, avail)
if n < 0 then n = 0 end
if n > 0 then
  tat = tat + n * interval
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
local remaining = math.floor((burst * interval - (tat - now)) / interval)
if remaining < 0 then remaining = 0 end
local retry = 0
if n == 0 then retry = (tat - now) - (burst - 1) * interval end
return {n, remaining, tat - now, retry}
"#;

/// Refreshes `ARGV[1]` in the live-node set `KEYS[1]` for `ARGV[2]` ms (0: leave it),
/// drops expired members and returns how many are live.
const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], math.max(ttl, 1000) * 2)
return redis.call('ZCARD', KEYS[1])
"#;

/// Timeouts in a row on the request path that count as Redis being down.
const TIMEOUTS_TO_DOWN: u32 = 3;
/// Longest an upkeep round waits to connect or for its heartbeat: generous, it is off
/// the request path.
const UPKEEP_TIMEOUT: Duration = Duration::from_millis(500);

/// Why Redis gave no answer; the caller falls back to the node's share.
#[derive(Debug, thiserror::Error)]
pub enum RedisLimitError {
    #[error("Redis is marked down")]
    Down,
    #[error("Redis did not answer in time")]
    Timeout,
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What the GCRA script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Tokens taken (0: limited).
    pub granted: u32,
    /// Tokens left in the burst after this grant.
    pub remaining: u32,
    /// Until the whole burst is available again.
    pub reset: Duration,
    /// When limited: until the next token is available anywhere in the cluster.
    pub retry_after: Duration,
}

/// A user's part of a Redis key: the first 128 bits of the SHA-256 of its key
/// (`hdr:alice`, `ip:10.0.0.1` …) as 32 hex digits. Bounded and printable whatever the
/// client sent, and no id in the clear in Redis; not a secret (a guessed id hashes the
/// same), but every node must derive the same key without sharing anything else. 128
/// bits keep collisions out of reach (about 2^64 users before one is likely).
pub fn user_digest(user: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let hash = Sha256::digest(user.as_bytes());
    let mut hex = String::with_capacity(32);
    for b in &hash[..16] {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn invoke<T: redis::FromRedisValue>(
        &mut self,
        script: &Script,
        key: &str,
        args: &[u64],
    ) -> RedisResult<T> {
        let mut call = script.key(key);
        for a in args {
            call.arg(*a);
        }
        match self {
            Conn::Single(c) => call.invoke_async(c).await,
            Conn::Cluster(c) => call.invoke_async(c).await,
        }
    }
}

/// The cluster's Redis as this node sees it.
pub struct RedisLimits {
    config: ClusterConfig,
    conn: ArcSwapOption<Conn>,
    up: AtomicBool,
    timeouts: AtomicU32,
    live_nodes: AtomicUsize,
    gcra: Script,
    heartbeat: Script,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimits")
            .field("redis", &self.config.redis)
            .field("up", &self.up.load(Relaxed))
            .field("live_nodes", &self.live_nodes.load(Relaxed))
            .finish()
    }
}

impl RedisLimits {
    /// Not connected yet: the first upkeep round connects.
    pub fn new(config: ClusterConfig) -> Self {
        RedisLimits {
            config,
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            timeouts: AtomicU32::new(0),
            live_nodes: AtomicUsize::new(1),
            gcra: Script::new(GCRA),
            heartbeat: Script::new(HEARTBEAT),
        }
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Redis answered the last call (or upkeep round).
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Live nodes as last counted in Redis (1 before the first count): the divisor of
    /// the fallback share.
    pub fn live_nodes(&self) -> usize {
        self.live_nodes.load(Relaxed).max(1)
    }

    /// The Redis key of a limit. A user appears as [`user_digest`] of its key, so ids of
    /// any length or bytes give keys of one short size.
    pub fn key(&self, route: &str, user: Option<&str>) -> String {
        match user {
            Some(u) => format!("{}:rl:{route}:u:{}", self.config.key_prefix, user_digest(u)),
            None => format!("{}:rl:{route}:all", self.config.key_prefix),
        }
    }

    /// Takes up to `want` tokens of the limit at `key`, waiting at most the configured
    /// timeout.
    pub async fn take(
        &self,
        key: &str,
        interval: Duration,
        burst: u32,
        want: u32,
    ) -> Result<Grant, RedisLimitError> {
        if !self.is_up() {
            return Err(RedisLimitError::Down);
        }
        let Some(conn) = self.conn.load_full() else {
            return Err(RedisLimitError::Down);
        };
        let mut conn = (*conn).clone();
        let interval_us = (interval.as_micros() as u64).max(1);
        let args = [interval_us, burst as u64, want.max(1) as u64];
        let call = conn.invoke::<(i64, i64, i64, i64)>(&self.gcra, key, &args);
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(Ok((granted, remaining, reset, retry))) => {
                self.timeouts.store(0, Relaxed);
                Ok(Grant {
                    granted: granted.clamp(0, u32::MAX as i64) as u32,
                    remaining: remaining.clamp(0, u32::MAX as i64) as u32,
                    reset: Duration::from_micros(reset.max(0) as u64),
                    retry_after: Duration::from_micros(retry.max(0) as u64),
                })
            }
            Ok(Err(e)) => {
                self.mark_down(
                    &e.to_string(),
                    e.is_unrecoverable_error() || e.is_io_error(),
                );
                Err(e.into())
            }
            Err(_) => {
                if self.timeouts.fetch_add(1, Relaxed) + 1 >= TIMEOUTS_TO_DOWN {
                    self.mark_down("requests timed out", false);
                }
                Err(RedisLimitError::Timeout)
            }
        }
    }

    /// Logs the switch to the local share once, not once per request.
    fn mark_down(&self, why: &str, drop_conn: bool) {
        if drop_conn {
            self.conn.store(None);
        }
        if self.up.swap(false, Relaxed) {
            METRICS.redis_up.set(0);
            tracing::warn!(
                reason = why,
                live_nodes = self.live_nodes(),
                "Redis unreachable: cluster-wide rate limits fall back to this node's share"
            );
        }
    }

    async fn connect(&self) -> RedisResult<Conn> {
        match &self.config.redis {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(UPKEEP_TIMEOUT))
                    .set_response_timeout(Some(UPKEEP_TIMEOUT));
                Ok(Conn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await?,
                ))
            }
            RedisTarget::Cluster(nodes) => {
                let client =
                    redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                        .connection_timeout(UPKEEP_TIMEOUT)
                        .response_timeout(UPKEEP_TIMEOUT)
                        .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// One upkeep round: connect if needed, refresh this node's liveness, count live
    /// nodes; Redis is usable again when this succeeds.
    pub async fn upkeep(&self) {
        let ttl_ms = self.config.node_ttl.as_millis() as u64;
        match tokio::time::timeout(UPKEEP_TIMEOUT * 2, self.heartbeat(ttl_ms)).await {
            Ok(Ok(n)) => {
                self.live_nodes.store(n.max(1), Relaxed);
                METRICS.cluster_nodes.set(n as i64);
                self.timeouts.store(0, Relaxed);
                if !self.up.swap(true, Relaxed) {
                    METRICS.redis_up.set(1);
                    tracing::info!(
                        live_nodes = n,
                        "Redis reachable: cluster-wide rate limits are shared"
                    );
                }
            }
            Ok(Err(e)) => self.mark_down(&e.to_string(), true),
            Err(_) => self.mark_down("upkeep timed out", true),
        }
    }

    async fn heartbeat(&self, ttl_ms: u64) -> RedisResult<usize> {
        let conn = match self.conn.load_full() {
            Some(c) => c,
            None => {
                let c = Arc::new(self.connect().await?);
                self.conn.store(Some(c.clone()));
                c
            }
        };
        let mut conn = (*conn).clone();
        let key = format!("{}:nodes", self.config.key_prefix);
        let mut call = self.heartbeat.key(&key);
        call.arg(&self.config.node_id).arg(ttl_ms);
        let n: i64 = match &mut conn {
            Conn::Single(c) => call.invoke_async(c).await?,
            Conn::Cluster(c) => call.invoke_async(c).await?,
        };
        Ok(n.max(0) as usize)
    }

    /// Leaves the live-node set, so the others' share grows at once.
    pub async fn leave(&self) {
        if self.is_up() {
            let _ = tokio::time::timeout(UPKEEP_TIMEOUT, self.heartbeat(0)).await;
        }
    }
}

/// Keeps the `[cluster]` Redis connected and this node's liveness fresh.
pub struct RedisUpkeep {
    pub state: Arc<State>,
}

#[async_trait]
impl BackgroundService for RedisUpkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            // Read each round: a reload may add, change or remove [cluster].
            let redis = self.state.load().admission.stores().redis();
            let every = redis
                .as_ref()
                .map_or(Duration::from_secs(1), |r| r.config.sync_interval);
            if let Some(r) = &redis {
                r.upkeep().await;
            }
            tokio::select! {
                _ = shutdown.changed() => {
                    if let Some(r) = &redis {
                        r.leave().await;
                    }
                    return;
                }
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::user_digest;

    #[test]
    fn user_digests_are_short_hex_whatever_the_id() {
        let long = "hdr:".to_string() + &"x".repeat(10_000);
        for id in [
            "hdr:alice",
            "ip:127.0.0.1",
            "hdr:a b\r\n{}*:",
            long.as_str(),
            "",
        ] {
            let d = user_digest(id);
            assert_eq!(d.len(), 32, "{id:.20}");
            assert!(d
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        assert_ne!(user_digest("hdr:alice"), user_digest("hdr:alicf"));
        // The first half of SHA-256(""): the same on every node, whatever its build.
        assert_eq!(user_digest(""), "e3b0c44298fc1c149afbf4c8996fb924");
    }
}
