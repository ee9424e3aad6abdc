//! busbar nodes on a 3-member etcd cluster (issue 8, case 10): one member lost disturbs
//! nothing; quorum lost, the nodes route from memory (and a node restarted meanwhile from
//! its disk snapshot), refuse writes with 503 and say they are degraded; quorum back,
//! they converge, and an instance whose heartbeats stopped is gone within its TTL.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::wait_until;
use common::etcd::{orders_on_etcd, Etcd};
use common::{client, get_json, metric_value, Backend, Busbar};
use serde_json::{json, Value};

const TOKEN: &str = "cluster-etcd-test-token";
/// The instance that keeps heartbeating: long enough to ride out etcd's election after
/// quorum returns (its lease is then renewed for a full TTL anyway).
const KEEPER_TTL: u64 = 6;
/// The instance whose heartbeats stop: short, so the test waits little for its expiry.
const GHOST_TTL: u64 = 3;
/// After quorum returns, a new leader renews every lease for its TTL plus an election
/// timeout (etcd's lease promotion, 1 s by default); then its expiry loop runs every
/// 500 ms and the watch delivers the delete. Margin for a busy 2-core machine on top.
const EXPIRY_SLACK: Duration = Duration::from_secs(4);

/// The nodes' config, with the etcd endpoints in this order (a node starts on the first).
fn config(endpoints: &[String]) -> String {
    orders_on_etcd(endpoints, TOKEN, "")
}

/// A registration call: its status and JSON body (`null` when there is none).
async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, url).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

async fn register(bus: &Busbar, id: &str, addr: &str, ttl: u64) -> (u16, Value) {
    call(
        reqwest::Method::PUT,
        bus.registry_url(&format!("/v1/services/orders/instances/{id}")),
        Some(json!({ "address": addr, "ttl": ttl })),
    )
    .await
}

/// The ids of the instances node `bus` routes `orders` to.
async fn ids(bus: &Busbar) -> Vec<String> {
    let (status, v) = call(
        reqwest::Method::GET,
        bus.registry_url("/v1/services/orders"),
        None,
    )
    .await;
    assert_eq!(status, 200, "listing on {}: {v}", bus.http);
    let mut ids: Vec<String> = v["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Waits until every node lists exactly `want` (sorted); returns how long it took.
async fn converge(nodes: &[&Busbar], want: &[&str], within: Duration) -> Duration {
    let start = Instant::now();
    for n in nodes {
        loop {
            let have = ids(n).await;
            if have == want {
                break;
            }
            assert!(
                start.elapsed() < within,
                "node {} lists {have:?}, not {want:?}, {:?} on",
                n.http,
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    start.elapsed()
}

/// `n` requests to `/orders/x` through `bus`: every one must be 200. Returns the
/// backends that answered.
async fn route(bus: &Busbar, n: usize, when: &str) -> Vec<String> {
    let http = client();
    let mut seen = Vec::new();
    for _ in 0..n {
        let r = http.get(bus.url("/orders/x")).send().await;
        let r = r.unwrap_or_else(|e| panic!("{when}: node {} refused: {e}", bus.http));
        assert_eq!(r.status(), 200, "{when}: node {}", bus.http);
        let b = r
            .headers()
            .get("x-backend")
            .map(|v| v.to_str().unwrap_or(""));
        seen.push(b.unwrap_or("").to_string());
    }
    seen.sort();
    seen.dedup();
    seen
}

async fn degraded(bus: &Busbar) -> (f64, String) {
    let h = get_json(client().get(bus.admin_url("/healthz"))).await;
    let status = h["status"].as_str().unwrap_or("").to_string();
    (bus.metric("busbar_registry_degraded").await, status)
}

async fn wait_degraded(nodes: &[&Busbar], want: bool, within: Duration) -> Duration {
    let start = Instant::now();
    let (gauge, status) = if want { (1.0, "degraded") } else { (0.0, "ok") };
    for n in nodes {
        let what = format!("node {} reports {status}", n.http);
        wait_until(&what, within, Duration::from_millis(100), || async {
            degraded(n).await == (gauge, status.to_string())
        })
        .await;
    }
    start.elapsed()
}

/// The member most of the nodes' watches are on.
async fn watched(etcd: &Etcd) -> usize {
    let mut watchers = Vec::new();
    for i in 0..3 {
        watchers.push(etcd.watchers(i).await);
    }
    let most = (0..3).max_by_key(|&i| watchers[i]).unwrap();
    assert!(watchers[most] > 0, "the nodes watch etcd: {watchers:?}");
    most
}

/// Polls the nodes' `busbar_registry_degraded` every 50 ms and keeps what was not 0.
struct DegradedWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl DegradedWatch {
    fn start(nodes: &[&Busbar]) -> DegradedWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let urls: Vec<String> = nodes.iter().map(|n| n.admin_url("/metrics")).collect();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let (http, start, mut seen) = (client(), Instant::now(), Vec::new());
            while !s.load(Relaxed) {
                for url in &urls {
                    let text = match http.get(url).send().await {
                        Ok(r) => r.text().await.unwrap_or_default(),
                        Err(e) => format!("busbar_registry_degraded {e}"),
                    };
                    let v = metric_value(&text, "busbar_registry_degraded");
                    if v != 0.0 {
                        seen.push(format!("{url} {v} at {:?}", start.elapsed()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        });
        DegradedWatch { stop, task }
    }

    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Relaxed);
        self.task.await.unwrap()
    }
}

/// An instance's agent: heartbeats every `every` through the nodes in turn, registers
/// again on a 404 (as a client of the API must), and logs every status it got.
struct Agent {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(Instant, u16)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    fn start(id: &str, addr: String, ttl: u64, nodes: &[&Busbar], every: Duration) -> Agent {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let bases: Vec<String> = nodes.iter().map(|n| n.registry_url("")).collect();
        let path = format!("/v1/services/orders/instances/{id}");
        let (s, l) = (stop.clone(), log.clone());
        let task = tokio::spawn(async move {
            let mut turn = 0;
            while !s.load(Relaxed) {
                let base = &bases[turn % bases.len()];
                turn += 1;
                let url = format!("{base}{path}/heartbeat");
                let (status, _) = call(reqwest::Method::PUT, url, None).await;
                l.lock().unwrap().push((Instant::now(), status));
                if status == 404 {
                    let body = json!({ "address": addr, "ttl": ttl });
                    let (status, _) =
                        call(reqwest::Method::PUT, format!("{base}{path}"), Some(body)).await;
                    l.lock().unwrap().push((Instant::now(), 1000 + status));
                }
                tokio::time::sleep(every).await;
            }
        });
        Agent { stop, log, task }
    }

    /// Statuses logged since `from` (a re-registration is logged as 1000 + its status).
    fn since(&self, from: Instant) -> Vec<u16> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(t, _)| *t >= from)
            .map(|e| e.1)
            .collect()
    }

    /// The whole log as "ms since `origin`: status", for a failure message.
    fn timeline(&self, origin: Instant) -> String {
        let log = self.log.lock().unwrap();
        let at = |t: Instant| {
            let ms = |d: Duration| d.as_millis() as i64;
            ms(t.saturating_duration_since(origin)) - ms(origin.saturating_duration_since(t))
        };
        log.iter()
            .map(|(t, s)| format!("{}ms:{s}", at(*t)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    async fn stop(self) {
        self.stop.store(true, Relaxed);
        let _ = self.task.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_ride_out_etcd_member_and_quorum_loss() {
    let t0 = Instant::now();
    let mut etcd = Etcd::cluster(3).await;
    let keeper_app = Backend::start("keeper").await;
    let ghost_app = Backend::start("ghost").await;
    let late_app = Backend::start("late").await;
    // The nodes start on a follower: phase 1 kills it under them.
    let leader = etcd.leader().await.expect("a leader");
    let mut endpoints = etcd.endpoints();
    endpoints.rotate_left((leader + 1) % 3);
    let cfg = config(&endpoints);
    let n1 = Busbar::start(&cfg).await;
    let mut n2 = Busbar::start(&cfg).await;
    eprintln!("etcd cluster and 2 nodes up after {:?}", t0.elapsed());

    let keeper_addr = keeper_app.addr.to_string();
    assert_eq!(
        register(&n1, "keeper", &keeper_addr, KEEPER_TTL).await.0,
        200
    );
    let ghost_addr = ghost_app.addr.to_string();
    assert_eq!(register(&n2, "ghost", &ghost_addr, GHOST_TTL).await.0, 200);
    let every = Duration::from_millis(700);
    let keeper = Agent::start("keeper", keeper_addr, KEEPER_TTL, &[&n1, &n2], every);
    let ghost = Agent::start("ghost", ghost_addr, GHOST_TTL, &[&n2, &n1], every);
    converge(&[&n1, &n2], &["ghost", "keeper"], Duration::from_secs(2)).await;

    // 1. One member of three killed, the follower the nodes are on: nothing notices.
    //    Writes through every node succeed, heartbeats too (the nodes move on to another
    //    member), no node says degraded, routing goes on.
    let follower = watched(&etcd).await;
    assert_ne!(
        etcd.leader().await,
        Some(follower),
        "the nodes are on a follower"
    );
    let from = Instant::now();
    etcd.stop_member(follower);
    let watch = DegradedWatch::start(&[&n1, &n2]);
    for round in 0..3 {
        for (i, n) in [&n1, &n2].into_iter().enumerate() {
            let id = format!("probe-{round}-{i}");
            let (status, v) = register(n, &id, &late_app.addr.to_string(), 30).await;
            assert_eq!(status, 200, "register via {}, one member down: {v}", n.http);
            let url = n.registry_url(&format!("/v1/services/orders/instances/{id}"));
            let (status, v) = call(reqwest::Method::DELETE, url, None).await;
            assert_eq!(
                status, 200,
                "deregister via {}, one member down: {v}",
                n.http
            );
            route(n, 5, "one member down").await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seen = watch.stop().await;
    assert!(seen.is_empty(), "degraded with one member down: {seen:?}");
    let beats = keeper.since(from);
    assert!(
        !beats.is_empty() && beats.iter().all(|&s| s == 200),
        "keeper's heartbeats with one member down: {beats:?}"
    );
    converge(&[&n1, &n2], &["ghost", "keeper"], Duration::from_secs(2)).await;
    etcd.start_members(&[follower]).await;
    eprintln!("one member down for {:?}: undisturbed", from.elapsed());

    // 2. Quorum lost (two of three killed), and the ghost's heartbeats stop with it.
    ghost.stop().await;
    let lost = Instant::now();
    // The survivor is the member the nodes' watches are on: a watch on a member that
    // lost its quorum does not break by itself.
    let survivor = watched(&etcd).await;
    let dead: Vec<usize> = (0..3).filter(|&i| i != survivor).collect();
    for &i in &dead {
        etcd.stop_member(i);
    }
    // Routing goes on from memory, through every node.
    for n in [&n1, &n2] {
        let seen = route(n, 20, "quorum lost").await;
        assert_eq!(seen, ["ghost", "keeper"], "node {}", n.http);
    }
    // Writes answer 503 registry_unavailable, through every node.
    let late_addr = late_app.addr.to_string();
    let asked = Instant::now();
    let (a, b) = tokio::join!(
        register(&n1, "late", &late_addr, 30),
        register(&n2, "late", &late_addr, 30)
    );
    for (status, v) in [a, b] {
        assert_eq!(status, 503, "a write without quorum: {v}");
        assert_eq!(v["error"], "registry_unavailable", "{v}");
    }
    let refused_in = asked.elapsed();
    // Every node says it is degraded, in /healthz and the metric.
    wait_degraded(&[&n1, &n2], true, Duration::from_secs(10)).await;
    eprintln!(
        "quorum lost: writes 503 in {refused_in:?}; both nodes degraded {:?} after the loss",
        lost.elapsed()
    );
    // A node restarted now comes up from its disk snapshot, routes, and says degraded.
    n2.kill_and_restart().await;
    assert_eq!(ids(&n2).await, ["ghost", "keeper"], "n2 from its snapshot");
    let seen = route(&n2, 20, "restarted without quorum").await;
    assert_eq!(seen, ["ghost", "keeper"]);
    wait_degraded(&[&n2], true, Duration::from_secs(10)).await;
    let (status, v) = register(&n2, "late", &late_addr, 30).await;
    assert_eq!((status, &v["error"]), (503, &json!("registry_unavailable")));
    // It has not seen the keeper's lease: a heartbeat through it is "try again" (503),
    // not "register again" (404): the keeper is registered, etcd just can't say so now.
    let beat = n2.registry_url("/v1/services/orders/instances/keeper/heartbeat");
    let (status, v) = call(reqwest::Method::PUT, beat.clone(), None).await;
    assert_eq!((status, &v["error"]), (503, &json!("registry_unavailable")));
    route(&n1, 10, "quorum lost").await;
    eprintln!("quorum lost for {:?}", lost.elapsed());

    // 3. Quorum back: the nodes catch up, writes flow to every node, the keeper's
    //    heartbeats succeed again, and the ghost leaves every node within its TTL: the
    //    new leader renewed its lease for a full TTL (plus an election timeout).
    let back = Instant::now();
    etcd.start_members(&dead).await;
    let healthy = Instant::now();
    eprintln!("quorum back: members healthy after {:?}", back.elapsed());
    let took = wait_degraded(&[&n1, &n2], false, Duration::from_secs(10)).await;
    eprintln!("quorum back: degraded cleared on both nodes after {took:?}");
    wait_until(
        "a registration flows again",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async { register(&n1, "late", &late_addr, 30).await.0 == 200 },
    )
    .await;
    eprintln!(
        "quorum back: registration 200 after {:?}",
        healthy.elapsed()
    );
    assert_eq!(
        call(reqwest::Method::PUT, beat, None).await.0,
        200,
        "heartbeat via n2"
    );
    let deadline = healthy + Duration::from_secs(GHOST_TTL) + EXPIRY_SLACK;
    let within = deadline.saturating_duration_since(Instant::now());
    converge(&[&n1, &n2], &["keeper", "late"], within).await;
    eprintln!(
        "quorum back: the ghost gone from both nodes {:?} after the members were healthy",
        healthy.elapsed()
    );
    let ghost_hits = ghost_app.hits();
    for n in [&n1, &n2] {
        let seen = route(n, 20, "after recovery").await;
        assert_eq!(seen, ["keeper", "late"], "node {}", n.http);
    }
    assert_eq!(ghost_app.hits(), ghost_hits, "nothing routed to the ghost");
    // The keeper never had to register again: its heartbeats failed (503) only while
    // quorum was lost or coming back, and all succeed once it is back (a call that was
    // waiting on a member then may still time out: look from 2 s on).
    let settled = healthy + Duration::from_secs(2);
    tokio::time::sleep_until((settled + Duration::from_millis(1500)).into()).await;
    let beats = keeper.since(lost);
    assert!(
        beats.iter().all(|&s| s == 200 || s == 503),
        "keeper's heartbeats since quorum was lost: {beats:?} (ms since the members restarted: {})",
        keeper.timeline(back)
    );
    let last = keeper.since(settled);
    assert!(
        !last.is_empty() && last.iter().all(|&s| s == 200),
        "keeper's heartbeats from 2 s after quorum returned: {last:?} ({})",
        keeper.timeline(back)
    );
    keeper.stop().await;
    eprintln!("whole test {:?}", t0.elapsed());
}
