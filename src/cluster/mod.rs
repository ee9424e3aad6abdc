//! Shared state in existing engines: etcd for the registry and release overrides, Redis
//! for cluster-wide rate limits. Each client feeds a local view. Nothing on the request
//! path awaits etcd; only a route with a cluster-scope rate limit may wait on Redis, for
//! at most `[cluster] timeout`, and then falls back to the node's share.

pub mod etcd;
pub mod etcd_conn;
pub mod redis;
pub mod redis_conn;
pub mod redis_shards;
