//! Redis for cluster-wide rate limits: the GCRA script, the connection, node liveness.
//!
//! Owns: [`RedisLimits`] (one connection to a Redis server or Redis Cluster, the map of
//! its shards and their health, the last count of live nodes) and [`RedisUpkeep`], the
//! background service that connects, follows the slot map, refreshes this node's
//! liveness and probes every shard.
//! Must not: decide admission. `admission::cluster` takes tokens here and falls back to
//! the node's share when [`RedisLimits::take`] fails. The connection itself is
//! `redis_conn`'s, the shard map and health rules `redis_shards`'.
//!
//! The GCRA runs as one Lua script with Redis' own `TIME`, so nodes with skewed clocks
//! agree. It is sent once and called by its SHA (`Script::invoke_async` sends EVALSHA and
//! loads the script on NOSCRIPT, e.g. after Redis restarted empty). Live nodes are members
//! of one sorted set scored by expiry time, so counting them is one key (Redis Cluster safe).
//!
//! The request path never waits on a connect: it uses the connection the upkeep made, at
//! most `timeout` per call. Health is kept per shard (`redis_shards`): one master failing
//! sends only its keys to the local share, an error takes its shard down at once, three
//! timeouts in a row too, and a shard is used again after its probes answered for a
//! hold-down. Each switch is logged once; `busbar_ratelimit_redis_up` is 1 only while
//! every shard answers.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use redis::{RedisResult, Script};
use tokio::time::Instant;

use super::redis_conn::{without_credentials, Conn};
use super::redis_shards::{Change, Outcome, Shard, Topology};
use crate::config::{ClusterConfig, RedisTarget};
use crate::metrics::METRICS;

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

/// Longest an upkeep round waits to connect or for its heartbeat: generous, it is off
/// the request path.
const UPKEEP_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest a probe of one shard (a `PING` to its master) or a `CLUSTER SLOTS` waits.
/// Off the request path; probes of all shards run at once, so a dead master delays an
/// upkeep round by this much at most.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// Upkeep rounds between two reads of the cluster's slot map while every shard is up
/// (every round while one is down, to follow a failover).
const TOPOLOGY_EVERY: u32 = 10;
const NEVER: u64 = u64::MAX;

/// Why Redis gave no answer; the caller falls back to the node's share.
#[derive(Debug, thiserror::Error)]
pub enum RedisLimitError {
    #[error("the Redis shard of this key is marked down")]
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
    /// The key's shard came back moments ago: other nodes may still decide from their
    /// share, so this node uses no more than its own (see
    /// [`SETTLE`](super::redis_shards::SETTLE)).
    pub settling: bool,
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

/// The cluster's Redis as this node sees it.
pub struct RedisLimits {
    config: ClusterConfig,
    conn: ArcSwapOption<Conn>,
    topology: ArcSwap<Topology>,
    live_nodes: AtomicUsize,
    /// Since when (ms) every liveness refresh has reached Redis (`NEVER`: the last failed).
    beats_since: AtomicU64,
    /// Zero of the ms clock of shard health.
    clock: Instant,
    rounds: AtomicU32,
    /// Reached at least once (the first connect is logged), or said it was not.
    reached: AtomicBool,
    said_unreachable: AtomicBool,
    gcra: Script,
    heartbeat: Script,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimits")
            .field("redis", &self.config.redis)
            .field("up", &self.is_up())
            .field("live_nodes", &self.live_nodes.load(Relaxed))
            .finish()
    }
}

impl RedisLimits {
    /// Not connected yet: the first upkeep round connects.
    pub fn new(config: ClusterConfig) -> Self {
        let name = match &config.redis {
            RedisTarget::Single(url) => without_credentials(url),
            RedisTarget::Cluster(_) => "Redis Cluster".to_string(),
        };
        RedisLimits {
            config,
            conn: ArcSwapOption::empty(),
            topology: ArcSwap::from_pointee(Topology::whole(name)),
            live_nodes: AtomicUsize::new(1),
            beats_since: AtomicU64::new(NEVER),
            clock: Instant::now(),
            rounds: AtomicU32::new(0),
            reached: AtomicBool::new(false),
            said_unreachable: AtomicBool::new(false),
            gcra: Script::new(GCRA),
            heartbeat: Script::new(HEARTBEAT),
        }
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Connected, and every shard answers: every key's limit is shared.
    pub fn is_up(&self) -> bool {
        self.conn.load().is_some() && self.topology.load().down() == 0
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

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Takes up to `want` tokens of the limit at `key`, waiting at most the configured
    /// timeout; at once `Down` while the shard that holds `key` is down.
    pub async fn take(
        &self,
        key: &str,
        interval: Duration,
        burst: u32,
        want: u32,
    ) -> Result<Grant, RedisLimitError> {
        let health = self.topology.load().shard_of(key.as_bytes()).health.clone();
        if !health.is_up() {
            health.fell_back();
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
                health.request(Outcome::Answered, 0);
                Ok(Grant {
                    granted: granted.clamp(0, u32::MAX as i64) as u32,
                    remaining: remaining.clamp(0, u32::MAX as i64) as u32,
                    reset: Duration::from_micros(reset.max(0) as u64),
                    retry_after: Duration::from_micros(retry.max(0) as u64),
                    settling: health.settling(self.now_ms()),
                })
            }
            Ok(Err(e)) => {
                // A single Redis' connection is dead after an I/O error (upkeep makes a
                // new one); a cluster connection repairs its own node connections.
                if matches!(self.config.redis, RedisTarget::Single(_))
                    && (e.is_unrecoverable_error() || e.is_io_error())
                {
                    self.conn.store(None);
                }
                if health.request(Outcome::Failed, self.now_ms()) {
                    self.went_down(key.as_bytes(), &e.to_string());
                }
                Err(e.into())
            }
            Err(_) => {
                if health.request(Outcome::TimedOut, self.now_ms()) {
                    self.went_down(key.as_bytes(), "requests timed out");
                }
                Err(RedisLimitError::Timeout)
            }
        }
    }

    /// Logs a shard's switch to the local share: once per switch, not once per request.
    fn went_down(&self, key: &[u8], why: &str) {
        let topology = self.topology.load();
        let shard = topology.shard_of(key);
        self.log_down(shard, why);
        self.publish(&topology);
    }

    fn log_down(&self, shard: &Shard, why: &str) {
        tracing::warn!(
            shard = %shard.master,
            slots = %shard.slots,
            reason = why,
            live_nodes = self.live_nodes(),
            "Redis unreachable for these keys: their cluster-wide rate limits fall back to this node's share"
        );
    }

    /// `busbar_ratelimit_redis_up` is 1 only while every shard a key may need answers.
    fn publish(&self, topology: &Topology) {
        let connected = self.conn.load().is_some();
        let down = match connected {
            true => topology.down(),
            false => topology.shards().len(),
        };
        METRICS.redis_up.set(i64::from(down == 0));
        METRICS.redis_shards_down.set(down as i64);
    }

    /// One upkeep round: connect if needed, follow the cluster's slot map, refresh this
    /// node's liveness and count live nodes, probe every shard (a down shard is used
    /// again after its hold-down of answered probes).
    pub async fn upkeep(&self) {
        let conn = match self.conn.load_full() {
            Some(c) => c,
            None => match tokio::time::timeout(
                UPKEEP_TIMEOUT,
                Conn::connect(&self.config.redis, UPKEEP_TIMEOUT),
            )
            .await
            {
                Ok(Ok(c)) => {
                    let c = Arc::new(c);
                    self.conn.store(Some(c.clone()));
                    if !self.reached.swap(true, Relaxed) {
                        tracing::info!("Redis reachable: cluster-wide rate limits are shared");
                    }
                    c
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connect timed out".to_string(),
                    };
                    let topology = self.topology.load_full();
                    if self.reached.load(Relaxed) {
                        // Lost since (a single Redis' connection after an I/O error).
                        self.probed(&topology, &[]);
                    } else {
                        if !self.said_unreachable.swap(true, Relaxed) {
                            tracing::warn!(
                                reason = %why,
                                "Redis not reachable yet: cluster-wide rate limits use this node's share until it is"
                            );
                        }
                        self.publish(&topology);
                    }
                    return;
                }
            },
        };
        let round = self.rounds.fetch_add(1, Relaxed);
        let topology = self.topology.load_full();
        let mapped = matches!(self.config.redis, RedisTarget::Single(_))
            || topology.shards().len() > 1
            || topology.shards().first().is_some_and(|s| s.slots != "all");
        let refresh = !mapped || topology.down() > 0 || round.is_multiple_of(TOPOLOGY_EVERY);
        let ttl_ms = self.config.node_ttl.as_millis() as u64;
        let (_, beat, answered) = tokio::join!(
            async {
                if refresh {
                    self.follow_slots(&conn).await;
                }
            },
            tokio::time::timeout(UPKEEP_TIMEOUT, self.heartbeat(&conn, ttl_ms)),
            Self::probe(&conn, &topology),
        );
        match beat {
            Ok(Ok(n)) => self.counted(n),
            // The liveness key lives on one shard: while it is down the last count stands.
            Ok(Err(e)) => {
                self.beats_since.store(NEVER, Relaxed);
                tracing::debug!("Redis liveness refresh failed: {e}");
            }
            Err(_) => {
                self.beats_since.store(NEVER, Relaxed);
                tracing::debug!("Redis liveness refresh timed out");
            }
        }
        // A single Redis' connection does not outlive its server: reconnect next round
        // (a cluster connection repairs its node connections itself).
        if matches!(self.config.redis, RedisTarget::Single(_)) && answered.first() != Some(&true) {
            self.conn.store(None);
        }
        self.probed(&topology, &answered);
    }

    /// Takes a count of live nodes. More nodes count at once (a smaller share is safe);
    /// fewer only once this node's own refreshes have reached Redis for a whole
    /// `node_ttl`: after the liveness key was unreachable (its shard failing over, Redis
    /// restarted empty) the first refreshes find the others' entries expired, and a share
    /// computed from that count would let every node admit several times its part.
    fn counted(&self, n: usize) {
        let now = self.now_ms();
        let since = match self.beats_since.load(Relaxed) {
            NEVER => {
                self.beats_since.store(now, Relaxed);
                now
            }
            t => t,
        };
        let fresh = now.saturating_sub(since) >= self.config.node_ttl.as_millis() as u64;
        if n >= self.live_nodes.load(Relaxed) || fresh {
            self.live_nodes.store(n.max(1), Relaxed);
            METRICS.cluster_nodes.set(n as i64);
        }
    }

    /// Feeds probe answers (`answered[i]` for shard `i`; missing: not answered) into
    /// each shard's health and logs the switches.
    fn probed(&self, topology: &Topology, answered: &[bool]) {
        let now = self.now_ms();
        for (i, shard) in topology.shards().iter().enumerate() {
            let ok = answered.get(i).copied().unwrap_or(false);
            match shard.health.probe(ok, now) {
                Some(Change::Down) => self.log_down(shard, "probes failed"),
                Some(Change::Up { down_ms, fallbacks }) => tracing::info!(
                    shard = %shard.master,
                    slots = %shard.slots,
                    down_for = ?Duration::from_millis(down_ms),
                    local_decisions = fallbacks,
                    "Redis reachable again for these keys: their cluster-wide rate limits are shared"
                ),
                None => {}
            }
        }
        self.publish(topology);
    }

    /// Probes every shard at once (reads a key on its slots); whether each answered
    /// within [`PROBE_TIMEOUT`].
    async fn probe(conn: &Conn, topology: &Topology) -> Vec<bool> {
        let mut probes = tokio::task::JoinSet::new();
        for (i, shard) in topology.shards().iter().enumerate() {
            let (mut conn, key) = (conn.clone(), shard.probe_key.clone());
            probes.spawn(async move {
                let ok = tokio::time::timeout(PROBE_TIMEOUT, conn.probe(&key)).await;
                (i, matches!(ok, Ok(Ok(()))))
            });
        }
        let mut answered = vec![false; topology.shards().len()];
        while let Some(done) = probes.join_next().await {
            if let Ok((i, ok)) = done {
                if let Some(a) = answered.get_mut(i) {
                    *a = ok;
                }
            }
        }
        answered
    }

    /// Reads `CLUSTER SLOTS` and swaps in the new map when it changed (a failover moves
    /// ranges to another master; the shards keep their health).
    async fn follow_slots(&self, conn: &Conn) {
        let mut conn = conn.clone();
        let ranges = match tokio::time::timeout(PROBE_TIMEOUT, conn.cluster_slots()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return tracing::debug!("CLUSTER SLOTS failed: {e}"),
            Err(_) => return tracing::debug!("CLUSTER SLOTS timed out"),
        };
        let current = self.topology.load_full();
        if current.same_ranges(&ranges) {
            return;
        }
        match Topology::from_ranges(ranges, &current) {
            Some(t) => {
                tracing::debug!(shards = t.shards().len(), "Redis Cluster slot map changed");
                self.topology.store(Arc::new(t));
            }
            None => tracing::debug!("CLUSTER SLOTS answered no usable slot map"),
        }
    }

    async fn heartbeat(&self, conn: &Conn, ttl_ms: u64) -> RedisResult<usize> {
        let mut conn = conn.clone();
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
        if let Some(conn) = self.conn.load_full() {
            let _ = tokio::time::timeout(UPKEEP_TIMEOUT, self.heartbeat(&conn, 0)).await;
        }
    }
}

/// Keeps the `[cluster]` Redis connected and this node's liveness fresh.
pub struct RedisUpkeep {
    /// The Redis client of the snapshot now serving, if it has `[cluster]` (read each
    /// round: a reload may add, change or remove it). A closure, so this client needs
    /// nothing of the runtime that owns the snapshot.
    pub current: Box<dyn Fn() -> Option<Arc<RedisLimits>> + Send + Sync>,
}

#[async_trait]
impl BackgroundService for RedisUpkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            // Read each round: a reload may add, change or remove [cluster].
            let redis = (self.current)();
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
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fewer_live_nodes_count_only_after_a_node_ttl_of_refreshes() {
        let r = RedisLimits::new(ClusterConfig {
            redis: RedisTarget::Single("redis://127.0.0.1:1".into()),
            node_id: "n".into(),
            timeout: Duration::from_millis(50),
            sync_interval: Duration::from_millis(100),
            node_ttl: Duration::from_secs(3),
            key_prefix: "busbar".into(),
        });
        let step = |ms| tokio::time::advance(Duration::from_millis(ms));
        r.counted(3);
        assert_eq!(r.live_nodes(), 3, "more nodes count at once");
        // The liveness key was unreachable; the first refreshes back see the others'
        // entries expired.
        r.beats_since.store(NEVER, Relaxed);
        r.counted(1);
        step(2_900).await;
        r.counted(2);
        assert_eq!(r.live_nodes(), 3, "not yet a node_ttl of refreshes");
        r.counted(3);
        step(200).await;
        r.counted(2);
        assert_eq!(
            r.live_nodes(),
            2,
            "a node that left for good, after node_ttl"
        );
        r.counted(3);
        assert_eq!(r.live_nodes(), 3);
    }

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
