//! The connection to the `[cluster]` Redis: one server or a Redis Cluster.
//!
//! Owns: [`Conn`] (connecting, running a script on a key, probing a key's master,
//! reading the cluster's slot map) and the parsing of what Redis answers to those.
//! Must not: decide health or admission (`cluster::redis` does), or log.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncConnectionConfig, RedisResult, Script};

use crate::config::RedisTarget;

/// One connection to a single Redis or to a Redis Cluster; cheap to clone (each clone
/// multiplexes over the same sockets).
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Connects to a single Redis or a Redis Cluster; `wait` bounds each connect and
    /// each answer inside the library (the request path has its own, shorter timeout).
    pub async fn connect(target: &RedisTarget, wait: Duration) -> RedisResult<Conn> {
        match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(wait))
                    .set_response_timeout(Some(wait));
                Ok(Conn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await?,
                ))
            }
            RedisTarget::Cluster(nodes) => {
                // The request path gives up after `timeout` and upkeep probes follow a
                // failover: the library's own retries (16, waiting from 1.28 s up) would
                // only pile up requests nobody waits for any more.
                let client =
                    redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                        .connection_timeout(wait)
                        .response_timeout(wait)
                        .retries(3)
                        .min_retry_wait(10)
                        .max_retry_wait(100)
                        .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// Runs `script` on `key` with `args` (EVALSHA, loading it on NOSCRIPT).
    pub async fn invoke<T: redis::FromRedisValue>(
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

    /// Reads `key` (`EXISTS`, writes nothing): answered by the master that serves its
    /// slot, or by the single Redis.
    pub async fn probe(&mut self, key: &str) -> RedisResult<()> {
        let mut exists = redis::cmd("EXISTS");
        exists.arg(key);
        match self {
            Conn::Single(c) => exists.query_async::<i64>(c).await.map(drop),
            Conn::Cluster(c) => exists.query_async::<i64>(c).await.map(drop),
        }
    }

    /// The cluster's slot ranges and their masters, from any node (`None` for a single
    /// Redis or an answer that is not a slot map).
    pub async fn cluster_slots(&mut self) -> RedisResult<Option<Vec<(u16, u16, String)>>> {
        let Conn::Cluster(c) = self else {
            return Ok(None);
        };
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let v = c
            .route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await?;
        Ok(parse_cluster_slots(&v))
    }
}

/// `CLUSTER SLOTS`: `[[start, end, [host, port, id, …], replicas…], …]`.
fn parse_cluster_slots(v: &redis::Value) -> Option<Vec<(u16, u16, String)>> {
    use redis::Value;
    fn int(v: Option<&Value>) -> Option<u16> {
        match v? {
            Value::Int(n) => u16::try_from(*n).ok(),
            _ => None,
        }
    }
    let Value::Array(entries) = v else {
        return None;
    };
    let mut ranges = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(parts) = e else { return None };
        let (Some(start), Some(end), Some(Value::Array(node))) =
            (int(parts.first()), int(parts.get(1)), parts.get(2))
        else {
            return None;
        };
        let host = match node.first()? {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        ranges.push((start, end, format!("{host}:{}", int(node.get(1))?)));
    }
    Some(ranges)
}

/// A Redis URL as it may appear in a log line: without a password.
pub fn without_credentials(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"0123abcd".to_vec()),
        ])
    }

    #[test]
    fn slot_maps_are_read_and_odd_answers_refused() {
        let map = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("10.0.0.2", 7001),
            ]),
        ]);
        assert_eq!(
            parse_cluster_slots(&map),
            Some(vec![
                (0, 5460, "10.0.0.1:7000".to_string()),
                (5461, 16383, "10.0.0.2:7001".to_string())
            ])
        );
        for odd in [
            Value::Okay,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(-1),
                Value::Int(3),
                node("h", 1),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(3),
                node("h", 70_000),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(3),
                Value::Nil,
            ])]),
        ] {
            assert_eq!(parse_cluster_slots(&odd), None, "{odd:?}");
        }
    }

    #[test]
    fn urls_in_logs_carry_no_password() {
        assert_eq!(
            without_credentials("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://10.0.0.1:6379/0"
        );
        assert_eq!(without_credentials("redis://u:p@h:1"), "redis://h:1");
        assert_eq!(without_credentials("redis://h:1"), "redis://h:1");
        assert_eq!(
            without_credentials("unix:///run/redis.sock"),
            "unix:///run/redis.sock"
        );
    }
}
