//! Cluster-wide rate limits: three busbar nodes sharing one real Redis.
//!
//! A client spreading requests over the nodes is admitted at the configured cluster-wide
//! rate; with Redis killed each node keeps serving on its share (limit ÷ live nodes) and
//! counts the fallback; with Redis back, shared limiting resumes.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::{client, Backend, Busbar};

const RATE: f64 = 100.0;
const BURST: f64 = 10.0;

fn config(redis: &str, backend: std::net::SocketAddr) -> String {
    format!(
        r#"
[cluster]
redis = "{redis}"
sync_interval = "100ms"
# Generous for a 2-core test machine running three nodes, Redis and the client.
timeout = "20ms"
node_ttl = "1s"

[[service]]
name = "a"
endpoints = [{{ addr = "{backend}" }}]
[[route]]
name = "shared"
service = "a"
[route.admission]
rate_limit = {{ rate = "100/s", burst = 10, scope = "cluster" }}
"#
    )
}

#[derive(Debug, Default)]
struct Counts {
    ok: u64,
    limited: u64,
    other: u64,
}

/// Sends requests for `window` from 8 tasks, each to the next of `targets` in turn,
/// pausing 5 ms between requests (about 1,500 requests a second in all).
async fn load(targets: &[String], window: Duration) -> Counts {
    let (ok, limited, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let targets = Arc::new(targets.to_vec());
    let until = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (ok, limited, other, next, targets) = (
            ok.clone(),
            limited.clone(),
            other.clone(),
            next.clone(),
            targets.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let http = client();
            while Instant::now() < until {
                let url = &targets[next.fetch_add(1, Relaxed) % targets.len()];
                match http.get(url).send().await.map(|r| r.status().as_u16()) {
                    Ok(200) => ok.fetch_add(1, Relaxed),
                    Ok(429) => limited.fetch_add(1, Relaxed),
                    _ => other.fetch_add(1, Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Counts {
        ok: ok.load(Relaxed),
        limited: limited.load(Relaxed),
        other: other.load(Relaxed),
    }
}

async fn wait_for(nodes: &[Busbar], sample: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in nodes {
        loop {
            let v = n.metric(sample).await;
            if v == value {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{sample} is {v}, not {value}:\n{}",
                n.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sends over the cluster limit to every node for `window` and checks the nodes admitted
/// the cluster-wide limit together, ±10%: the shared state in Redis is in use.
async fn shared_load(nodes: &[Busbar], all: &[String], window: Duration, when: &str) -> Counts {
    let c = load(all, window).await;
    let expected = RATE * window.as_secs_f64() + BURST;
    eprintln!("shared over {window:?} {when}: {c:?}, expected {expected}");
    assert_eq!(c.other, 0, "{c:?}");
    assert!(
        (c.ok as f64 - expected).abs() <= expected * 0.10,
        "admitted {} over {window:?} {when}, expected {expected} ±10% ({c:?}); fallbacks {:?}",
        c.ok,
        fallbacks(nodes).await
    );
    c
}

async fn fallbacks(nodes: &[Busbar]) -> Vec<f64> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(
            n.metric(r#"busbar_ratelimit_redis_fallback_total{route="shared"}"#)
                .await,
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_limit_and_fall_back_to_their_share() {
    let mut redis = Redis::start().await;
    let backend = Backend::start("a").await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Busbar::start(&config(&redis.url(), backend.addr)).await);
    }
    wait_for(&nodes, "busbar_ratelimit_redis_up", 1.0).await;
    wait_for(&nodes, "busbar_cluster_live_nodes", 3.0).await;
    let all: Vec<String> = nodes.iter().map(|n| n.url("/x")).collect();

    // 1. Shared: about 1,500 requests a second over three nodes, 100/s admitted in all.
    let c = shared_load(&nodes, &all, Duration::from_secs(5), "with Redis").await;
    assert!(
        c.limited > c.ok,
        "the client sent well over the limit: {c:?}"
    );
    assert_eq!(
        backend.hits() as u64,
        c.ok,
        "every admitted request reached the backend"
    );
    let fell_back: f64 = fallbacks(&nodes).await.iter().sum();
    assert!(
        fell_back <= (c.ok + c.limited) as f64 * 0.02,
        "a slow Redis answer falls back now and then, but rarely while Redis is up: {fell_back}"
    );

    // 2. Redis gone: each node keeps serving, on its share of 100/s ÷ 3 nodes.
    redis.stop();
    let c = load(&all[..1], Duration::from_millis(300)).await;
    assert_eq!(c.other, 0, "requests are answered without Redis: {c:?}");
    wait_for(&nodes[..1], "busbar_ratelimit_redis_up", 0.0).await;
    let window = Duration::from_secs(3);
    let c = load(&all[..1], window).await;
    let share = RATE / 3.0 * window.as_secs_f64();
    eprintln!("node 0 alone without Redis over {window:?}: {c:?}, share {share}");
    assert_eq!(c.other, 0, "{c:?}");
    assert!(
        c.ok as f64 >= share * 0.8 && c.ok as f64 <= share * 1.25 + BURST,
        "node 0 alone admitted {} over {window:?}: its share is about {share} ({c:?})",
        c.ok
    );
    let during = fallbacks(&nodes).await;
    assert!(during[0] > 0.0, "the fallback is counted: {during:?}");
    assert!(
        nodes[0].stderr().contains("fall back to this node's share"),
        "and logged"
    );
    assert_eq!(
        nodes[0]
            .stderr()
            .matches("fall back to this node's share")
            .count(),
        1,
        "logged once"
    );

    // 3. Redis back (empty, on the same port): the nodes reconnect and share again.
    redis.restart().await;
    wait_for(&nodes, "busbar_ratelimit_redis_up", 1.0).await;
    let before: f64 = fallbacks(&nodes).await.iter().sum();
    let c = shared_load(
        &nodes,
        &all,
        Duration::from_secs(3),
        "after Redis came back",
    )
    .await;
    let after: f64 = fallbacks(&nodes).await.iter().sum();
    assert!(
        after - before <= (c.ok + c.limited) as f64 * 0.02,
        "(almost) no fallback once Redis is back: {before} → {after}"
    );
}

/// Every key in Redis, by `KEYS *` over a raw socket (RESP array of bulk strings).
async fn redis_keys(redis: &Redis) -> Vec<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", redis.port))
        .await
        .unwrap();
    s.write_all(b"KEYS *\r\n").await.unwrap();
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(keys) = parse_bulk_array(&buf) {
            return keys;
        }
        assert!(Instant::now() < deadline, "no full KEYS reply: {buf:?}");
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "redis closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `*N\r\n($len\r\nbytes\r\n)*N`, or `None` while incomplete.
fn parse_bulk_array(buf: &[u8]) -> Option<Vec<Vec<u8>>> {
    fn line(buf: &[u8], at: usize) -> Option<(usize, usize)> {
        let end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
        Some((n, end + 2))
    }
    assert_eq!(buf.first().copied().unwrap_or(b'*'), b'*', "{buf:?}");
    let (count, mut at) = line(buf, 0)?;
    let mut keys = Vec::new();
    for _ in 0..count {
        let (len, start) = line(buf, at)?;
        keys.push(buf.get(start..start + len)?.to_vec());
        at = start + len + 2;
    }
    Some(keys)
}

/// Redis keys carry a fixed-size hash of the user, never the id itself: an id of any
/// length or bytes gives a short, printable key, and the limit still holds per user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_hold_a_hash_of_the_user_not_the_id() {
    let redis = Redis::start().await;
    let backend = Backend::start("a").await;
    let node = Busbar::start(&format!(
        r#"
[cluster]
redis = "{redis}"
[[service]]
name = "a"
endpoints = [{{ addr = "{backend}" }}]
[[route]]
name = "per-user"
service = "a"
[route.admission]
identity = ["header:x-user-id"]
trusted_proxies = ["127.0.0.1"]
rate_limit = {{ rate = "1/m", burst = 2, scope = "cluster" }}
"#,
        redis = redis.url(),
        backend = backend.addr
    ))
    .await;
    wait_for(
        std::slice::from_ref(&node),
        "busbar_ratelimit_redis_up",
        1.0,
    )
    .await;
    let long_id = format!("user:{{tag}} with spaces *?[] {}", "x".repeat(2000));
    let http = client();
    for user in [long_id.as_str(), "bob"] {
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let r = http
                .get(node.url("/x"))
                .header("x-user-id", user)
                .send()
                .await
                .unwrap();
            statuses.push(r.status().as_u16());
        }
        assert_eq!(statuses, [200, 200, 429], "{:.20}", user);
    }
    assert_eq!(
        node.metric(r#"busbar_ratelimit_redis_fallback_total{route="per-user"}"#)
            .await,
        0.0,
        "decided in Redis"
    );
    let keys: Vec<String> = redis_keys(&redis)
        .await
        .into_iter()
        .map(|k| String::from_utf8(k).expect("printable key"))
        .filter(|k| k.starts_with("busbar:rl:"))
        .collect();
    assert_eq!(keys.len(), 2, "one key per user: {keys:?}");
    for k in &keys {
        let hash = k
            .strip_prefix("busbar:rl:per-user:u:")
            .unwrap_or_else(|| panic!("key shape: {k}"));
        assert_eq!(hash.len(), 32, "{k}");
        // Hex only: neither id (nor any part of one) is in the key.
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{k}");
    }
}
