//! A throwaway Redis (Debian's redis-server) on a run-time port, stopped when dropped.

use std::time::Duration;

use super::daemon::{wait_until, Daemon};
use super::free_port;

pub struct Redis {
    daemon: Daemon,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut args = vec!["--port".into(), port.to_string().into()];
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ]
            .map(Into::into),
        );
        args.push(dir.path().as_os_str().to_owned());
        let daemon = Daemon::new(
            "redis-server",
            args,
            dir.path().join("redis.log"),
            "Debian's redis-server package",
        );
        let mut r = Redis { daemon, port, dir };
        r.spawn().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        self.daemon.start();
        let within = Duration::from_secs(10);
        wait_until(
            "redis-server start",
            within,
            Duration::from_millis(50),
            || self.ping(),
        )
        .await;
    }

    /// `PING` over a raw socket: true on `+PONG`.
    pub async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        if s.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
            Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
        )
    }

    /// Kills Redis (SIGKILL, by its pid); its data is gone (no persistence).
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Starts a fresh Redis on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

/// One reply of Redis' protocol (RESP2).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl Reply {
    /// A status or bulk string as text.
    pub fn text(&self) -> String {
        match self {
            Reply::Status(s) | Reply::Error(s) => s.clone(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        }
    }
}

/// Parses one reply from the start of `buf`: the reply and the bytes it took, or `None`
/// while incomplete.
fn parse_reply(buf: &[u8]) -> Option<(Reply, usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(buf.get(1..end)?).ok()?;
    let after = end + 2;
    match buf.first()? {
        b'+' => Some((Reply::Status(line.to_string()), after)),
        b'-' => Some((Reply::Error(line.to_string()), after)),
        b':' => Some((Reply::Int(line.parse().ok()?), after)),
        b'$' => {
            let len: i64 = line.parse().ok()?;
            if len < 0 {
                return Some((Reply::Bulk(None), after));
            }
            let body = buf.get(after..after + len as usize)?.to_vec();
            Some((Reply::Bulk(Some(body)), after + len as usize + 2))
        }
        b'*' => {
            let n: i64 = line.parse().ok()?;
            let mut at = after;
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                let (item, used) = parse_reply(buf.get(at..)?)?;
                items.push(item);
                at += used;
            }
            Some((Reply::Array(items), at))
        }
        _ => panic!("not RESP: {:?}", String::from_utf8_lossy(buf)),
    }
}

/// Sends one command to the Redis on `port` over a fresh socket; `None` when it does not
/// answer within a second (dead, or busy).
pub async fn command(port: u16, args: &[&str]) -> Option<Reply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        loop {
            if let Some((reply, _)) = parse_reply(&buf) {
                return Some(reply);
            }
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten()
}

/// A throwaway Redis Cluster on loopback: `masters` masters with one replica each, every
/// server on run-time ports (client and cluster bus), killed by its pid when stopped or
/// dropped (also when the test fails).
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    pub dir: tempfile::TempDir,
}

pub struct ClusterNode {
    daemon: Daemon,
    pub port: u16,
}

/// A master as `CLUSTER NODES` lists it.
#[derive(Debug, Clone)]
pub struct Master {
    /// Index in [`RedisCluster::nodes`].
    pub node: usize,
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts `masters × 2` servers, joins them with `redis-cli --cluster create
    /// --cluster-replicas 1`, and waits until every node sees a healthy cluster and every
    /// replica is in sync. Failover is quick (node timeout 2 s) and always allowed, and
    /// masters keep serving their slots while another shard has none
    /// (`cluster-require-full-coverage no`, as busbar's README recommends).
    pub async fn start(masters: usize) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..masters * 2 {
            let port = free_port();
            let bus = free_port();
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut args: Vec<std::ffi::OsString> = Vec::new();
            for a in [
                "--port",
                &port.to_string(),
                "--cluster-port",
                &bus.to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                "--cluster-replica-validity-factor",
                "0",
                "--cluster-require-full-coverage",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ] {
                args.push(a.into());
            }
            args.push("--cluster-config-file".into());
            args.push(node_dir.join("nodes.conf").into_os_string());
            args.push("--dir".into());
            args.push(node_dir.clone().into_os_string());
            let mut daemon = Daemon::new(
                "redis-server",
                args,
                node_dir.join("redis.log"),
                "Debian's redis-server package",
            );
            daemon.start();
            nodes.push(ClusterNode { daemon, port });
        }
        let cluster = RedisCluster { nodes, dir };
        for n in &cluster.nodes {
            let port = n.port;
            wait_until(
                "redis-server start",
                Duration::from_secs(10),
                Duration::from_millis(50),
                || async move { command(port, &["PING"]).await == Some(Reply::Status("PONG".into())) },
            )
            .await;
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let create = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), create)
            .await
            .expect("redis-cli --cluster create within 30 s")
            .expect("redis-cli (Debian's redis-tools package)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let ready = || async {
            let mut masters_seen = Vec::new();
            for n in &cluster.nodes {
                let Some(info) = command(n.port, &["CLUSTER", "INFO"]).await else {
                    return false;
                };
                if !info.text().contains("cluster_state:ok") {
                    return false;
                }
                let Some(repl) = command(n.port, &["INFO", "replication"]).await else {
                    return false;
                };
                let repl = repl.text();
                if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                    return false;
                }
                masters_seen.push(cluster.masters_seen_by(n.port).await.len());
            }
            masters_seen.iter().all(|m| *m == masters)
        };
        wait_until(
            "Redis Cluster healthy with replicas in sync",
            Duration::from_secs(20),
            Duration::from_millis(100),
            ready,
        )
        .await;
        cluster
    }

    /// `redis://` URLs of every node, as `redis_cluster` seeds.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Masters that serve slots, as the node on `port` sees them (not failed).
    async fn masters_seen_by(&self, port: u16) -> Vec<Master> {
        let Some(Reply::Bulk(Some(text))) = command(port, &["CLUSTER", "NODES"]).await else {
            return Vec::new();
        };
        let mut masters = Vec::new();
        for line in String::from_utf8_lossy(&text).lines() {
            // <id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(flags)) = (f.get(1), f.get(2)) else {
                continue;
            };
            if !flags.contains("master") || flags.contains("fail") || f.len() < 9 {
                continue;
            }
            let Some(p) = addr
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            let Some(node) = self.nodes.iter().position(|n| n.port == p) else {
                continue;
            };
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            masters.push(Master { node, slots });
        }
        masters
    }

    /// Masters serving slots now, as the first running node sees them.
    pub async fn masters(&self) -> Vec<Master> {
        for n in self.nodes.iter().filter(|n| n.daemon.is_running()) {
            let m = self.masters_seen_by(n.port).await;
            if !m.is_empty() {
                return m;
            }
        }
        Vec::new()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT` on a running node).
    pub async fn key_slot(&self, key: &str) -> u16 {
        for n in self.nodes.iter().filter(|n| n.daemon.is_running()) {
            if let Some(Reply::Int(s)) = command(n.port, &["CLUSTER", "KEYSLOT", key]).await {
                return s as u16;
            }
        }
        panic!("no Redis node answers CLUSTER KEYSLOT");
    }

    /// The node index of the master that serves `slot` now.
    pub async fn master_of(&self, slot: u16) -> Option<usize> {
        self.masters()
            .await
            .into_iter()
            .find(|m| m.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|m| m.node)
    }

    /// Kills node `i` (SIGKILL, by its pid).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].daemon.stop();
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].daemon.is_running()
    }

    /// What node `i` logged, for a failing assertion's message.
    pub fn log(&self, i: usize) -> String {
        self.nodes[i].daemon.log()
    }

    /// The last lines every node logged, for a failing assertion's message.
    pub fn tails(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let log = n.daemon.log();
            let lines: Vec<&str> = log.lines().collect();
            out.push_str(&format!("--- node {i} (port {}):\n", n.port));
            for l in &lines[lines.len().saturating_sub(12)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}
