//! Cluster-wide rate limits: three busbar nodes sharing one real Redis, or a real Redis
//! Cluster of three masters and three replicas.
//!
//! A client spreading requests over the nodes is admitted at the configured cluster-wide
//! rate; with Redis killed each node keeps serving on its share (limit ÷ live nodes) and
//! counts the fallback; with Redis back, shared limiting resumes. On a Redis Cluster, a
//! master's failover moves only its keys to the local share, once, and back once.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{Redis, RedisCluster};
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

/// One answer a paced client got.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// When the request was sent, since the test's start.
    at: Duration,
    user: usize,
    node: usize,
    status: u16,
}

type Answers = Arc<std::sync::Mutex<Vec<Answer>>>;

/// Sends `rate` requests a second as `user` until `stop`, round robin over `targets`
/// (node index, URL), each request on its own task so a slow answer does not delay the
/// next: evenly spread traffic, as a fleet of clients behind DNS sends it.
fn paced(
    user: (usize, String),
    targets: Vec<(usize, String)>,
    rate: f64,
    t0: Instant,
    answers: Answers,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = client();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sent = tokio::task::JoinSet::new();
        let mut i = 0usize;
        while !stop.load(Relaxed) {
            tick.tick().await;
            let (node, url) = targets[i % targets.len()].clone();
            i += 1;
            let (http, answers, name, uid) =
                (http.clone(), answers.clone(), user.1.clone(), user.0);
            sent.spawn(async move {
                let at = t0.elapsed();
                let status = match http.get(&url).header("x-user-id", name).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                answers.lock().unwrap().push(Answer {
                    at,
                    user: uid,
                    node,
                    status,
                });
            });
        }
        while sent.join_next().await.is_some() {}
    })
}

/// Requests of `user` sent in `[from, to)` that got `status`.
fn count(answers: &[Answer], user: usize, from: Duration, to: Duration, status: u16) -> usize {
    answers
        .iter()
        .filter(|a| a.user == user && a.status == status && a.at >= from && a.at < to)
        .count()
}

/// The most 200s `user` got within any `width` of `[from, to)` (windows start at each
/// admitted request).
fn busiest(
    answers: &[Answer],
    user: usize,
    from: Duration,
    to: Duration,
    width: Duration,
) -> usize {
    let mut ok: Vec<Duration> = answers
        .iter()
        .filter(|a| a.user == user && a.status == 200 && a.at >= from && a.at < to)
        .map(|a| a.at)
        .collect();
    ok.sort();
    (0..ok.len())
        .map(|i| ok[i..].iter().take_while(|t| **t < ok[i] + width).count())
        .max()
        .unwrap_or(0)
}

/// Times `busbar_ratelimit_redis_up` changed on `node` within `[from, to)`.
fn flips(samples: &[(Duration, usize, f64)], node: usize, from: Duration, to: Duration) -> usize {
    let values: Vec<f64> = samples
        .iter()
        .filter(|(at, n, _)| *n == node && *at >= from && *at < to)
        .map(|(_, _, v)| *v)
        .collect();
    values.windows(2).filter(|w| w[0] != w[1]).count()
}

const DOWN_LINE: &str = "fall back to this node's share";
const UP_LINE: &str = "Redis reachable again for these keys";

/// A real Redis Cluster (3 masters, 3 replicas) behind three busbar nodes at their default
/// `timeout`. One user's key lives on the master that is killed, another's on a master
/// that stays; then every master is killed. What a user sees: only 200 and 429, the limit
/// held within 10%, each node switching the dead shard's keys to its share once and back
/// once (one log line each, `busbar_ratelimit_redis_up` changing twice), the other user
/// shared throughout; with every master gone, each node on its share, the total still
/// within 10% of the limit for evenly spread traffic at twice it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_failover_moves_only_the_dead_masters_keys_and_once() {
    const LIMIT: f64 = 60.0;
    let mut cluster = RedisCluster::start(3).await;
    let seeds: Vec<String> = cluster.seeds().iter().map(|s| format!("\"{s}\"")).collect();

    // Two users whose keys live on different masters, the hot user's not on the master
    // of the live-node set: while the hot user's master is dead, every node's liveness
    // refresh still succeeds (what made a single up/down flag flap).
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3, "{masters:?}");
    let liveness = cluster.key_slot("busbar:nodes").await;
    let liveness_master = cluster.master_of(liveness).await.unwrap();
    let mut users: Vec<(String, usize, u16)> = vec![(String::new(), liveness_master, liveness)];
    for i in 0..64 {
        let name = format!("user-{i}");
        let key = format!(
            "busbar:rl:shared:u:{}",
            busbar::cluster::redis::user_digest(&format!("hdr:{name}"))
        );
        let slot = cluster.key_slot(&key).await;
        let master = cluster.master_of(slot).await.unwrap();
        if users.iter().all(|(_, m, _)| *m != master) {
            users.push((name, master, slot));
        }
        if users.len() == 3 {
            break;
        }
    }
    assert_eq!(
        users.len(),
        3,
        "two users on two masters, not the liveness one"
    );
    users.remove(0);
    let (hot, calm) = (0usize, 1usize);
    let (hot_master, hot_slot) = (users[hot].1, users[hot].2);

    let backend = Backend::start("a").await;
    let body = format!(
        r#"
[cluster]
redis_cluster = [{seeds}]

[[service]]
name = "a"
endpoints = [{{ addr = "{addr}" }}]
[[route]]
name = "shared"
service = "a"
[route.admission]
identity = ["header:x-user-id"]
trusted_proxies = ["127.0.0.1"]
rate_limit = {{ rate = "60/s", burst = 5, scope = "cluster" }}
"#,
        seeds = seeds.join(", "),
        addr = backend.addr
    );
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Busbar::start(&body).await);
    }
    wait_for(&nodes, "busbar_ratelimit_redis_up", 1.0).await;
    wait_for(&nodes, "busbar_cluster_live_nodes", 3.0).await;

    // The hot user's traffic is spread over the three nodes, the calm user's all goes to
    // node 0: shared, node 0 admits the calm user's whole limit; on its share, a third.
    let t0 = Instant::now();
    let answers: Answers = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let urls: Vec<(usize, String)> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (i, n.url("/x")))
        .collect();
    let load = [
        paced(
            (hot, users[hot].0.clone()),
            urls.clone(),
            2.0 * LIMIT,
            t0,
            answers.clone(),
            stop.clone(),
        ),
        paced(
            (calm, users[calm].0.clone()),
            urls[..1].to_vec(),
            2.0 * LIMIT,
            t0,
            answers.clone(),
            stop.clone(),
        ),
    ];
    let samples: Arc<std::sync::Mutex<Vec<(Duration, usize, f64)>>> = Default::default();
    let sampler = {
        let (samples, stop) = (samples.clone(), stop.clone());
        let admins: Vec<String> = nodes.iter().map(|n| n.admin_url("/metrics")).collect();
        tokio::spawn(async move {
            let http = client();
            while !stop.load(Relaxed) {
                for (i, url) in admins.iter().enumerate() {
                    if let Ok(r) = http.get(url).send().await {
                        let text = r.text().await.unwrap_or_default();
                        let v = common::metric_value(&text, "busbar_ratelimit_redis_up");
                        samples.lock().unwrap().push((t0.elapsed(), i, v));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // 1. Healthy: both users get the cluster-wide limit.
    let a = (Duration::from_secs(1), Duration::from_secs(4));
    tokio::time::sleep(a.1).await;
    let fallbacks_a = fallbacks(&nodes).await;

    // 2. The hot user's master dies; its replica takes over.
    cluster.kill(hot_master);
    let k1 = t0.elapsed();
    let promoted = Instant::now() + Duration::from_secs(30);
    while cluster
        .master_of(hot_slot)
        .await
        .is_none_or(|m| m == hot_master)
    {
        assert!(
            Instant::now() < promoted,
            "no replica took over slot {hot_slot}:\n{}",
            cluster.tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // busbar uses the shard again after a second of answered probes, then settles for
    // a second.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let b = (k1, t0.elapsed());
    let logs_b: Vec<String> = nodes.iter().map(|n| n.stderr()).collect();

    // 3. Every master dies: nothing is left to fail over to.
    let live_masters: Vec<usize> = cluster.masters().await.iter().map(|m| m.node).collect();
    for m in &live_masters {
        cluster.kill(*m);
    }
    let k2 = t0.elapsed();
    wait_for(&nodes, "busbar_ratelimit_redis_up", 0.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c0 = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let c = (c0, t0.elapsed());
    stop.store(true, Relaxed);
    for l in load {
        l.await.unwrap();
    }
    sampler.await.unwrap();
    let answers = answers.lock().unwrap().clone();
    let samples = samples.lock().unwrap().clone();

    let secs = |w: (Duration, Duration)| (w.1 - w.0).as_secs_f64();
    let report = |w: (Duration, Duration)| {
        format!(
            "hot {} ok / {} limited, calm {} ok / {} limited over {:.1} s",
            count(&answers, hot, w.0, w.1, 200),
            count(&answers, hot, w.0, w.1, 429),
            count(&answers, calm, w.0, w.1, 200),
            count(&answers, calm, w.0, w.1, 429),
            secs(w)
        )
    };
    eprintln!("healthy: {}", report(a));
    eprintln!("hot master {hot_master} killed at {k1:?}: {}", report(b));
    eprintln!(
        "all masters {live_masters:?} killed at {k2:?}; on shares: {}",
        report(c)
    );
    eprintln!(
        "busiest second of the hot user: healthy {}, failover {}, all down {}",
        busiest(&answers, hot, a.0, a.1, Duration::from_secs(1)),
        busiest(&answers, hot, b.0, b.1, Duration::from_secs(1)),
        busiest(&answers, hot, c.0, c.1, Duration::from_secs(1)),
    );
    eprintln!("fallback decisions while healthy: {fallbacks_a:?}");

    // Only 200 and 429, throughout.
    let odd: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status != 200 && a.status != 429)
        .collect();
    assert!(
        odd.is_empty(),
        "{} other answers, first {:?}",
        odd.len(),
        odd.first()
    );

    let within = |user: usize, w: (Duration, Duration), rate: f64, tolerance: f64, what: &str| {
        let ok = count(&answers, user, w.0, w.1, 200) as f64;
        let expected = rate * secs(w);
        assert!(
            (ok - expected).abs() <= expected * tolerance,
            "{what}: {ok} admitted, expected {expected:.0} ±{:.0}% ({})",
            tolerance * 100.0,
            report(w)
        );
    };
    // 1. Healthy, at the default timeout on this loaded host: shared, and (almost) no
    // decision falls back.
    within(hot, a, LIMIT, 0.10, "hot user, healthy");
    within(calm, a, LIMIT, 0.10, "calm user on one node, healthy");
    let sent_a = (count(&answers, hot, Duration::ZERO, a.1, 200)
        + count(&answers, hot, Duration::ZERO, a.1, 429)) as f64;
    assert!(
        fallbacks_a.iter().sum::<f64>() <= sent_a * 2.0 * 0.02,
        "fallbacks while healthy: {fallbacks_a:?} of ~{} requests",
        sent_a * 2.0
    );

    // 2. Failover: the calm user's master never failed, so node 0 kept deciding the calm
    // user in Redis (its share would be a third); the hot user stayed within the limit.
    within(calm, b, LIMIT, 0.10, "calm user during the failover");
    let hot_b = count(&answers, hot, b.0, b.1, 200) as f64;
    assert!(
        hot_b <= LIMIT * secs(b) * 1.10 && hot_b >= LIMIT * secs(b) * 0.85,
        "hot user during the failover: {}",
        report(b)
    );
    // Shared, no second holds more than the limit and the burst (65); on the shares,
    // the limit and the shares' bursts (3 × 2). Two more for the edges of the window.
    let busiest_b = busiest(&answers, hot, b.0, b.1, Duration::from_secs(1)) as f64;
    assert!(
        busiest_b <= LIMIT + 6.0 + 2.0,
        "the hot user's busiest second during the failover: {busiest_b} (limit {LIMIT})"
    );
    for (i, log) in logs_b.iter().enumerate() {
        assert_eq!(
            log.matches(DOWN_LINE).count(),
            1,
            "node {i} switched once:\n{log}"
        );
        assert_eq!(
            log.matches(UP_LINE).count(),
            1,
            "node {i} came back once:\n{log}"
        );
        assert_eq!(
            log.matches("redis::cluster_handling").count(),
            0,
            "the redis crate's own lines are quieted:\n{log}"
        );
        // From half a second before the kill (the switch follows the kill within
        // milliseconds, before the next sample).
        let f = flips(&samples, i, b.0 - Duration::from_millis(500), b.1);
        assert_eq!(
            f, 2,
            "node {i}: busbar_ratelimit_redis_up changed {f} times during the failover"
        );
    }

    // 3. Every master gone: each node on its share, the hot user's total within 10% of
    // the limit, the calm user (all on node 0) at a third of it; one more line per shard.
    within(hot, c, LIMIT, 0.10, "hot user on the nodes' shares");
    within(calm, c, LIMIT / 3.0, 0.15, "calm user on node 0's share");
    for node in 0..nodes.len() {
        let ok = answers
            .iter()
            .filter(|a| {
                a.user == hot && a.node == node && a.status == 200 && a.at >= c.0 && a.at < c.1
            })
            .count() as f64;
        let share = LIMIT / 3.0 * secs(c);
        assert!(
            (ok - share).abs() <= share * 0.15,
            "node {node} admitted the hot user {ok} times on its share of ~{share:.0}"
        );
    }
    for (i, n) in nodes.iter().enumerate() {
        let log = n.stderr();
        assert_eq!(
            log.matches(DOWN_LINE).count(),
            4,
            "node {i}: one line per shard:\n{log}"
        );
        assert_eq!(log.matches(UP_LINE).count(), 1, "node {i}:\n{log}");
        let f = flips(&samples, i, k2 - Duration::from_millis(500), c.1);
        assert_eq!(
            f, 1,
            "node {i}: busbar_ratelimit_redis_up changed {f} times with every master down"
        );
    }
}
