//! The `[cluster]` section: state the nodes of a busbar cluster share (Redis, for
//! cluster-wide rate limits).
//!
//! Owns: the file types, validated [`ClusterConfig`], defaults and validation of
//! `[cluster]`, and the check that routes with `scope = "cluster"` have a Redis to use.
//! Must not: connect to anything (that is `cluster::redis`).

use std::time::Duration;

use redis::IntoConnectionInfo;
use serde::Deserialize;
use toml::Spanned;

use super::file::RouteFile;
use super::validate::Validator;

/// Longest a request waits on Redis before it is answered from the node's share of the
/// limit. A loopback or LAN round trip is well under a millisecond, but on a busy 2-core
/// host (busbar, Redis and the load on the same cores) 5 ms was missed in half the
/// seconds of a fault-free run; 50 ms is met there. Only a request that needs a new batch
/// from Redis waits, and a slow answer alone switches nothing: three in a row take the
/// key's shard to the local share (see `cluster::redis_shards`).
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);
/// How often a node refreshes its liveness and checks Redis; also how long tokens a node
/// took from Redis in a batch stay usable. Short, so a batch a node does not use is lost
/// quickly rather than hoarded.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// A node that has not refreshed its liveness for this long no longer counts when the
/// others compute their share of a limit.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(3);
/// Prefix of every key busbar writes to Redis.
pub const DEFAULT_KEY_PREFIX: &str = "busbar";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// One Redis server: `redis://host:port[/db]` or `unix:///path`.
    pub redis: Option<Spanned<String>>,
    /// Or the seed nodes of a Redis Cluster.
    #[serde(default)]
    pub redis_cluster: Vec<Spanned<String>>,
    pub node_id: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub sync_interval: Option<Spanned<String>>,
    pub node_ttl: Option<Spanned<String>>,
    pub key_prefix: Option<Spanned<String>>,
}

/// Where the shared state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

/// The validated `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub redis: RedisTarget,
    /// This node's name in the live-node set; default: random per process.
    pub node_id: String,
    /// Request-path wait for Redis before falling back to the local share.
    pub timeout: Duration,
    /// Liveness refresh, Redis health check and batch lifetime.
    pub sync_interval: Duration,
    /// How long a silent node still counts as live.
    pub node_ttl: Duration,
    pub key_prefix: String,
}

fn random_node_id() -> String {
    format!("node-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

impl Validator<'_> {
    /// Validates `[cluster]`; routes asking for `scope = "cluster"` need it.
    pub(super) fn cluster(
        &mut self,
        f: Option<&ClusterFile>,
        routes: &[RouteFile],
    ) -> Option<ClusterConfig> {
        let ctx = "[cluster]";
        let config = f.and_then(|f| {
            let redis = match (&f.redis, f.redis_cluster.is_empty()) {
                (Some(url), true) => self.redis_url(url, ctx).map(RedisTarget::Single),
                (None, false) => {
                    let nodes: Vec<String> = f
                        .redis_cluster
                        .iter()
                        .filter_map(|u| self.redis_url(u, ctx))
                        .collect();
                    (nodes.len() == f.redis_cluster.len()).then_some(RedisTarget::Cluster(nodes))
                }
                (Some(url), false) => {
                    self.err(url.span(), ctx, "set redis or redis_cluster, not both");
                    None
                }
                (None, true) => {
                    self.err(
                        0..0,
                        ctx,
                        "[cluster] needs redis = \"redis://host:port\" or redis_cluster = [...]",
                    );
                    None
                }
            }?;
            let node_id = match &f.node_id {
                Some(n) if n.get_ref().is_empty() || n.get_ref().len() > 128 => {
                    self.err(n.span(), ctx, "node_id is 1 to 128 characters");
                    random_node_id()
                }
                Some(n) => n.get_ref().clone(),
                None => random_node_id(),
            };
            let key_prefix = match &f.key_prefix {
                Some(p) if p.get_ref().is_empty() => {
                    self.err(p.span(), ctx, "key_prefix must not be empty");
                    DEFAULT_KEY_PREFIX.to_string()
                }
                Some(p) => p.get_ref().clone(),
                None => DEFAULT_KEY_PREFIX.to_string(),
            };
            let timeout = self.duration(&f.timeout, ctx, DEFAULT_REDIS_TIMEOUT);
            let sync_interval = self.duration(&f.sync_interval, ctx, DEFAULT_SYNC_INTERVAL);
            let node_ttl = self.duration(&f.node_ttl, ctx, DEFAULT_NODE_TTL);
            if node_ttl < sync_interval * 2 {
                let span = f.node_ttl.as_ref().map(|s| s.span()).unwrap_or(0..0);
                self.err(span, ctx, "node_ttl must be at least twice sync_interval");
            }
            Some(ClusterConfig {
                redis,
                node_id,
                timeout,
                sync_interval,
                node_ttl,
                key_prefix,
            })
        });
        if config.is_none() {
            for r in routes {
                let scope = r
                    .admission
                    .as_ref()
                    .and_then(|a| a.rate_limit.as_ref())
                    .and_then(|l| l.scope.as_ref());
                if let Some(s) = scope.filter(|s| s.get_ref() == "cluster") {
                    let ctx = format!("route \"{}\"", r.name.get_ref());
                    self.err(
                        s.span(),
                        &ctx,
                        "scope = \"cluster\" needs a [cluster] section with redis",
                    );
                }
            }
        }
        config
    }

    fn redis_url(&mut self, url: &Spanned<String>, ctx: &str) -> Option<String> {
        let v = url.get_ref();
        let ok = (v.starts_with("redis://") || v.starts_with("unix://"))
            && v.as_str().into_connection_info().is_ok();
        if !ok {
            self.err(
                url.span(),
                ctx,
                format!("\"{v}\" is not a Redis URL like \"redis://127.0.0.1:6379\""),
            );
            return None;
        }
        Some(v.clone())
    }
}
