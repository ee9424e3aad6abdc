//! Three busbar nodes sharing one etcd: registrations on any node route on all of them,
//! routing survives etcd going away, and writes flow again when it returns; one node
//! drained by SIGTERM under a steady stream loses no request (issue 8, case 8); one node
//! killed with SIGKILL during registration traffic loses no acknowledged registration
//! (issue 8, case 10).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd::{orders_on_etcd, Etcd};
use common::http1::Conn;
use common::{client, connect_first, get_json, Backend, Busbar, SIGKILL, SIGTERM};
use serde_json::{json, Value};
use tokio::net::TcpStream;

const TOKEN: &str = "cluster-test-token";

fn config(etcd: &Etcd) -> String {
    config_with(etcd, "")
}

/// The cluster config with extra keys in service `orders` (e.g. its `balance`).
fn config_with(etcd: &Etcd, service_extra: &str) -> String {
    orders_on_etcd(&[etcd.endpoint()], TOKEN, service_extra)
}

async fn put(bus: &Busbar, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut req = client().put(bus.registry_url(path)).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

async fn routes_to(bus: &Busbar, backend: &str) -> bool {
    match client().get(bus.url("/orders/x")).send().await {
        Ok(r) => r.headers().get("x-backend").is_some_and(|v| v == backend),
        Err(_) => false,
    }
}

async fn wait_all_route(nodes: &[&Busbar], backend: &str, within: Duration) -> Duration {
    let start = Instant::now();
    for n in nodes {
        while !routes_to(n, backend).await {
            assert!(
                start.elapsed() < within,
                "node {} does not route to {backend}",
                n.http
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_registrations_through_etcd() {
    let mut etcd = Etcd::start().await;
    let app1 = Backend::start("app-1").await;
    let app2 = Backend::start("app-2").await;
    let cfg = config(&etcd);
    let mut n1 = Busbar::start(&cfg).await;
    let n2 = Busbar::start(&cfg).await;
    let n3 = Busbar::start(&cfg).await;

    // Register through node 1: nodes 2 and 3 route to it within 1 s.
    let r = put(
        &n1,
        "/v1/services/orders/instances/a1",
        Some(json!({ "address": app1.addr.to_string(), "ttl": 3 })),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let took = wait_all_route(&[&n2, &n3], "app-1", Duration::from_secs(1)).await;
    assert!(took < Duration::from_secs(1), "{took:?}");

    // Heartbeats through node 3 keep it alive past its TTL; node 1 is killed meanwhile.
    n1.kill_and_restart().await;
    for _ in 0..8 {
        assert_eq!(
            put(&n3, "/v1/services/orders/instances/a1/heartbeat", None)
                .await
                .status(),
            200
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    wait_all_route(&[&n1, &n2, &n3], "app-1", Duration::from_secs(2)).await;

    // etcd goes away: everyone keeps routing, writes answer 503, nodes say degraded.
    etcd.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for n in [&n1, &n2, &n3] {
        assert!(
            routes_to(n, "app-1").await,
            "node {} stopped routing",
            n.http
        );
    }
    let r = put(
        &n2,
        "/v1/services/orders/instances/a2",
        Some(json!({ "address": app2.addr.to_string(), "ttl": 3 })),
    )
    .await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "registry_unavailable");
    let deadline = Instant::now() + Duration::from_secs(5);
    while n2.metric("busbar_registry_degraded").await != 1.0 {
        assert!(Instant::now() < deadline, "node 2 never reported degraded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let h = get_json(client().get(n2.admin_url("/healthz"))).await;
    assert_eq!(h["status"], "degraded");

    // etcd is back: new registrations flow to every node again.
    etcd.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = put(
            &n2,
            "/v1/services/orders/instances/a2",
            Some(json!({ "address": app2.addr.to_string(), "ttl": 30 })),
        )
        .await;
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "registration never flowed again: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for n in [&n1, &n2, &n3] {
        loop {
            let ids = listed(n).await;
            if ids.contains("a2") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never saw a2: {ids:?}",
                n.http
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Issue 8, case 8: SIGTERM under load in a 3-node cluster.

/// Clients of the steady stream: half open a connection per request, half keep theirs.
const STREAM_CLIENTS: usize = 6;
/// Pause between two requests of one stream client.
const STREAM_PACE: Duration = Duration::from_millis(15);
/// A keep-alive client opens a new connection after this many requests (pools recycle).
const KEEPALIVE_REQUESTS: u32 = 20;
/// A stream request with no complete answer after this long has failed.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Slow requests in flight on node 1 when it gets SIGTERM, and how slow.
const SLOW_REQUESTS: usize = 3;
const SLOW_MS: u64 = 1500;

/// An answer, as a client reads it.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// The node said `Connection: close`.
    close: bool,
}

/// Why a request got no answer.
#[derive(Debug)]
enum NoReply {
    /// The request could not be written: nothing was sent, a client sends it again on a
    /// new connection.
    NotSent(String),
    /// The request was written and no complete answer came back: a failed request (a
    /// client can't know whether the node acted on it).
    Lost(String),
}

/// Sends `GET path` on `c` and reads the answer (Content-Length framing, which is what
/// busbar sends for the test backend's bodies).
async fn exchange(c: &mut Conn, path: &str, within: Duration) -> Result<Reply, NoReply> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: orders\r\n\r\n");
    c.send(req.as_bytes())
        .await
        .map_err(|e| NoReply::NotSent(e.to_string()))?;
    let r = tokio::time::timeout(within, c.read_response(false))
        .await
        .map_err(|_| NoReply::Lost(format!("no answer within {within:?}")))?;
    if r.head.is_empty() && r.closed {
        return Err(NoReply::Lost("closed before any answer".into()));
    }
    if !r.complete || r.header("content-length").is_none() {
        return Err(NoReply::Lost(format!(
            "no whole Content-Length answer (closed: {}): {}",
            r.closed, r.head
        )));
    }
    Ok(Reply {
        status: r.status(),
        close: r.header("connection") == Some("close"),
    })
}

/// Whether the node closed an idle keep-alive connection (a client's pool notices the
/// EOF and does not reuse it).
fn closed_while_idle(c: &Conn) -> bool {
    let mut b = [0u8; 1];
    !matches!(c.stream.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// One request of the stream as its client saw it.
#[derive(Debug)]
struct Sample {
    sent: Instant,
    /// The node it went to (index into the stream's addresses).
    node: usize,
    /// When the client started connecting the connection it went on.
    connecting: Instant,
    /// The connection had carried earlier requests.
    reused: bool,
    result: Result<Reply, String>,
}

#[derive(Debug, Default)]
struct StreamLog {
    samples: Vec<Sample>,
    /// Failed connects (node, by when, why): the client went on to the next address.
    refused: Vec<(usize, Instant, std::io::ErrorKind)>,
    /// Requests that could not be written on a connection and were sent on a new one.
    resent: usize,
    /// Idle keep-alive connections the node had closed, noticed before reuse.
    found_closed: usize,
    /// Requests no node took a connection for.
    unreachable: usize,
}

/// A client that resolved the bus's name to the nodes' addresses: every new connection
/// starts at the next address (DNS round robin) and moves on when a connect is refused.
/// Sends `GET /orders/stream/...` every [`STREAM_PACE`] until `stop`.
async fn stream_client(
    nodes: Vec<SocketAddr>,
    worker: usize,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
) -> StreamLog {
    let mut log = StreamLog::default();
    // (node, stream, connect started, requests carried)
    let mut conn: Option<(usize, Conn, Instant, u32)> = None;
    let mut next_start = worker;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let path = format!("/orders/stream/{worker}/{i}");
        let mut writes = 0;
        loop {
            if conn.as_ref().is_some_and(|c| closed_while_idle(&c.1)) {
                conn = None;
                log.found_closed += 1;
            }
            let (node, mut s, connecting, uses) = match conn.take() {
                Some(c) => c,
                None => {
                    let connecting = Instant::now();
                    let (refused, got) = connect_first(&nodes, next_start).await;
                    next_start += 1;
                    let now = Instant::now();
                    log.refused
                        .extend(refused.into_iter().map(|(n, e)| (n, now, e.kind())));
                    match got {
                        Some((n, s)) => (n, Conn::new(s), connecting, 0),
                        None => {
                            log.unreachable += 1;
                            break;
                        }
                    }
                }
            };
            let sent = Instant::now();
            writes += 1;
            let sample = |result| Sample {
                sent,
                node,
                connecting,
                reused: uses > 0,
                result,
            };
            match exchange(&mut s, &path, STREAM_TIMEOUT).await {
                Ok(reply) => {
                    let keep = keep_alive && !reply.close && uses + 1 < KEEPALIVE_REQUESTS;
                    log.samples.push(sample(Ok(reply)));
                    if keep {
                        conn = Some((node, s, connecting, uses + 1));
                    }
                    break;
                }
                // Nothing was sent: send it again on a new connection (at most twice).
                Err(NoReply::NotSent(_)) if writes < 3 => log.resent += 1,
                Err(NoReply::NotSent(e)) | Err(NoReply::Lost(e)) => {
                    log.samples.push(sample(Err(e)));
                    break;
                }
            }
        }
        tokio::time::sleep(STREAM_PACE).await;
    }
    log
}

/// Issue 8, case 8. A steady stream from clients that know the three nodes' addresses
/// (as from three DNS A records), on new and keep-alive connections, plus slow requests
/// in flight on node 1; node 1 gets SIGTERM. The slow requests complete, node 1 exits 0
/// within its grace period, takes no new connection once it stops listening, and the
/// stream goes on through nodes 2 and 3 without one failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_one_node_and_the_others_take_its_clients() {
    let etcd = Etcd::start().await;
    let app = Backend::start("app").await;
    let cfg = config(&etcd);
    let mut n1 = Busbar::start(&cfg).await;
    let n2 = Busbar::start(&cfg).await;
    let n3 = Busbar::start(&cfg).await;
    let r = put(
        &n2,
        "/v1/services/orders/instances/app",
        Some(json!({ "address": app.addr.to_string(), "ttl": 60 })),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    wait_all_route(&[&n1, &n2, &n3], "app", Duration::from_secs(2)).await;

    let nodes = vec![n1.http, n2.http, n3.http];
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..STREAM_CLIENTS)
        .map(|w| tokio::spawn(stream_client(nodes.clone(), w, w % 2 == 1, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Slow requests in flight on node 1, each on its own connection.
    let slow: Vec<_> = (0..SLOW_REQUESTS)
        .map(|i| {
            let addr = n1.http;
            tokio::spawn(async move {
                let mut s = Conn::new(TcpStream::connect(addr).await.map_err(|e| e.to_string())?);
                let path = format!("/orders/slow/{i}?sleep_ms={SLOW_MS}");
                let r = exchange(&mut s, &path, Duration::from_secs(10)).await;
                Ok::<_, String>((r.map_err(|e| format!("{e:?}"))?, Instant::now()))
            })
        })
        .collect();
    let slow_seen = || {
        app.seen()
            .iter()
            .filter(|s| s.path.starts_with("/orders/slow/"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while slow_seen() < SLOW_REQUESTS {
        assert!(Instant::now() < deadline, "the slow requests never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Taken before the signal: `kill` returns a moment after node 1 may have acted on it.
    let term = Instant::now();
    n1.signal(SIGTERM);
    let code = n1.wait_exit(Duration::from_secs(8)).await;
    let exited = term.elapsed();
    tokio::time::sleep_until((term + Duration::from_secs(3)).into()).await;
    stop.store(true, Ordering::Relaxed);

    let mut log = StreamLog::default();
    for c in clients {
        let l = c.await.unwrap();
        log.samples.extend(l.samples);
        log.refused.extend(l.refused);
        log.resent += l.resent;
        log.found_closed += l.found_closed;
        log.unreachable += l.unreachable;
    }
    let mut slow_done = Vec::new();
    for s in slow {
        let (reply, done) = s.await.unwrap().expect("a slow request on node 1 failed");
        assert_eq!(reply.status, 200, "a slow request on node 1");
        slow_done.push(done - term);
    }

    // Node 1 drained and exited 0 within its grace period (10 s in the harness).
    assert_eq!(
        code,
        Some(0),
        "node 1's exit after SIGTERM:\n{}",
        n1.stderr()
    );
    assert!(
        exited < Duration::from_secs(5),
        "node 1 exited after {exited:?}"
    );
    // The slow requests were finished, not cut short.
    for d in &slow_done {
        assert!(
            *d >= Duration::from_millis(1000),
            "a slow request ended {d:?} after SIGTERM"
        );
    }

    // Zero failed requests, all told.
    let failed: Vec<&Sample> = log
        .samples
        .iter()
        .filter(|s| s.result.as_ref().map_or(true, |r| r.status != 200))
        .collect();
    // Milliseconds from SIGTERM, negative before it.
    let since_term = |t: Instant| {
        t.saturating_duration_since(term).as_secs_f64() * 1e3
            - term.saturating_duration_since(t).as_secs_f64() * 1e3
    };
    assert!(
        failed.is_empty() && log.unreachable == 0,
        "{} failed, {} unreachable (ms from SIGTERM: connect started, sent): {:?}\nnode 1 stderr:\n{}",
        failed.len(),
        log.unreachable,
        failed
            .iter()
            .map(|s| (s.node, s.reused, since_term(s.connecting), since_term(s.sent), &s.result))
            .collect::<Vec<_>>(),
        n1.stderr()
    );

    // Node 1 stopped taking connections soon after SIGTERM and took none afterwards.
    let refused_1: Vec<Instant> = log
        .refused
        .iter()
        .filter(|(n, _, _)| *n == 0)
        .map(|(_, t, _)| *t)
        .collect();
    let early: Vec<_> = log
        .refused
        .iter()
        .filter(|(_, t, _)| *t < term)
        .map(|(n, t, e)| (n, since_term(*t), e))
        .collect();
    assert!(
        early.is_empty(),
        "connects failed before SIGTERM (node, ms from SIGTERM, why): {early:?}"
    );
    let kinds: BTreeSet<_> = log.refused.iter().map(|(_, _, e)| *e).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([std::io::ErrorKind::ConnectionRefused]),
        "why connects failed"
    );
    let first_refusal = *refused_1.iter().min().expect("no connect was refused");
    assert!(
        first_refusal - term < Duration::from_secs(1),
        "node 1 still took connections {:?} after SIGTERM",
        first_refusal - term
    );
    let late: Vec<&Sample> = log
        .samples
        .iter()
        .filter(|s| s.node == 0 && s.connecting > first_refusal)
        .collect();
    assert!(
        late.is_empty(),
        "node 1 took connections after refusing: {late:?}"
    );

    // Before SIGTERM every node served the stream; after it, new connections went to
    // nodes 2 and 3, which served the stream.
    let count = |node: usize, f: &dyn Fn(&Sample) -> bool| {
        log.samples
            .iter()
            .filter(|s| s.node == node && f(s))
            .count()
    };
    let before: Vec<usize> = (0..3).map(|n| count(n, &|s| s.sent < term)).collect();
    let after: Vec<usize> = (0..3).map(|n| count(n, &|s| s.sent >= term)).collect();
    let new_conns_after: Vec<usize> = (0..3)
        .map(|n| count(n, &|s| !s.reused && s.connecting > term))
        .collect();
    assert!(before.iter().all(|&c| c > 0), "before SIGTERM: {before:?}");
    assert!(after[1] > 0 && after[2] > 0, "after SIGTERM: {after:?}");
    assert!(
        new_conns_after[1] > 0 && new_conns_after[2] > 0,
        "new connections after SIGTERM: {new_conns_after:?}"
    );
    // What node 1 answered after SIGTERM, it answered with `Connection: close`, except
    // requests it had begun before the signal reached it.
    let n1_after: Vec<&Sample> = log
        .samples
        .iter()
        .filter(|s| s.node == 0 && s.sent >= term)
        .collect();
    let n1_after_open = n1_after
        .iter()
        .filter(|s| s.result.as_ref().is_ok_and(|r| !r.close))
        .count();

    // Node 1's access log agrees with what the clients counted.
    let access = n1.access_log();
    let logged = |prefix: &str| {
        access
            .lines()
            .filter(|l| l.contains(&format!("\"path\":\"{prefix}")))
            .collect::<Vec<_>>()
    };
    let stream_logged = logged("/orders/stream/");
    let slow_logged = logged("/orders/slow/");
    assert_eq!(
        stream_logged.len(),
        before[0] + after[0],
        "node 1's access log vs the clients' count"
    );
    assert_eq!(slow_logged.len(), SLOW_REQUESTS);
    assert!(
        stream_logged
            .iter()
            .chain(&slow_logged)
            .all(|l| l.contains("\"status\":200")),
        "node 1 logged a non-200"
    );

    eprintln!(
        "case 8: {} requests, 0 failed; per node before SIGTERM {before:?}, after {after:?}; \
         node 1 answered {} after SIGTERM ({n1_after_open} without `Connection: close`); \
         new connections after SIGTERM per node {new_conns_after:?}; \
         first refused connect {:?} after SIGTERM, {} refused connects moved on to the next node; \
         {} requests re-sent unsent, {} closed idle connections noticed; \
         slow requests 200 at {slow_done:?}; node 1 exited 0 after {exited:?}",
        log.samples.len(),
        n1_after.len(),
        first_refusal - term,
        refused_1.len(),
        log.resent,
        log.found_closed,
    );
}

// ---------------------------------------------------------------------------------------
// Issue 8, case 10: kill -9 one node during registration traffic.

/// Registration clients (4 per node, each registering one instance after another), and
/// how many instances each registers.
const REGISTRARS: usize = 12;
const INSTANCES_EACH: usize = 15;
/// The instances' TTL, and how often their clients renew it (well inside TTL/3).
const INSTANCE_TTL: u64 = 5;
const RENEW_EVERY: Duration = Duration::from_millis(1500);

/// A registration a node acknowledged with a 2xx.
#[derive(Debug, Clone)]
struct Acked {
    id: String,
    node: usize,
    at: Instant,
}

/// A registration whose request got no answer (sent, then the connection broke).
#[derive(Debug)]
struct Unanswered {
    id: String,
    node: usize,
    sent: Instant,
    error: String,
}

/// `PUT path` through the registration listeners `nodes` from `start` on, moving to the
/// next node when a connect fails (the request was not sent), as a client that resolved
/// the bus's name to three addresses does. Returns the node that took the request and
/// its status, or the error once it was sent (or every node refused).
async fn put_first(
    http: &reqwest::Client,
    nodes: &[SocketAddr],
    start: usize,
    path: &str,
    body: Option<&Value>,
) -> (usize, Result<u16, String>) {
    let mut last = (start, Err("no node".to_string()));
    for k in 0..nodes.len() {
        let i = (start + k) % nodes.len();
        let mut req = http
            .put(format!("http://{}{path}", nodes[i]))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(b);
        }
        match req.send().await {
            Ok(r) => return (i, Ok(r.status().as_u16())),
            Err(e) if e.is_connect() => last = (i, Err(root_cause(&e))),
            Err(e) => return (i, Err(root_cause(&e))),
        }
    }
    last
}

/// The innermost cause of a client error (e.g. "connection closed before message completed").
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

/// Registers `INSTANCES_EACH` instances, each with its own backend (named by its id),
/// through `nodes` starting at node `registrar % 3`. Returns the backends (they must
/// outlive the checks) and the registrations that got no answer.
async fn registrar(
    nodes: Vec<SocketAddr>,
    registrar: usize,
    acked: Arc<Mutex<Vec<Acked>>>,
) -> (Vec<Backend>, Vec<Unanswered>) {
    let http = client();
    let mut backends = Vec::new();
    let mut unanswered = Vec::new();
    for n in 0..INSTANCES_EACH {
        let id = format!("r{registrar:02}-{n:02}");
        let backend = Backend::start(&id).await;
        let body = json!({ "address": backend.addr.to_string(), "ttl": INSTANCE_TTL });
        let path = format!("/v1/services/orders/instances/{id}");
        let sent = Instant::now();
        match put_first(&http, &nodes, registrar % 3, &path, Some(&body)).await {
            (node, Ok(s)) if (200..300).contains(&s) => {
                acked.lock().unwrap().push(Acked {
                    id,
                    node,
                    at: Instant::now(),
                });
            }
            (node, Ok(s)) => panic!("registration {id} through node {} answered {s}", node + 1),
            (node, Err(error)) => unanswered.push(Unanswered {
                id,
                node,
                sent,
                error,
            }),
        }
        backends.push(backend);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (backends, unanswered)
}

/// What the heartbeats of the acknowledged instances came to.
#[derive(Debug, Default)]
struct Renewals {
    ok: usize,
    /// 404: the node does not know the instance ("register again"): a lost registration.
    not_found: Vec<String>,
    /// No answer or another status (a renewal in flight on the killed node).
    failed: Vec<String>,
}

/// Renews every acknowledged instance every [`RENEW_EVERY`] after its registration, each
/// renewal through the nodes in turn (with the same failover), until `stop`.
async fn renew(
    nodes: Vec<SocketAddr>,
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: Arc<AtomicBool>,
) -> Renewals {
    let http = client();
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut turn = 0;
    let mut out = Renewals::default();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        for a in acked.lock().unwrap().iter() {
            let next = due.entry(a.id.clone()).or_insert(a.at + RENEW_EVERY);
            if *next <= now {
                *next = now + RENEW_EVERY;
                turn += 1;
                let (http, nodes, id) = (http.clone(), nodes.clone(), a.id.clone());
                tasks.spawn(async move {
                    let path = format!("/v1/services/orders/instances/{id}/heartbeat");
                    (id, put_first(&http, &nodes, turn % 3, &path, None).await)
                });
            }
        }
        while let Some(done) = tasks.try_join_next() {
            record_renewal(&mut out, done.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while let Some(done) = tasks.join_next().await {
        record_renewal(&mut out, done.unwrap());
    }
    out
}

fn record_renewal(out: &mut Renewals, (id, (node, r)): (String, (usize, Result<u16, String>))) {
    match r {
        Ok(200) => out.ok += 1,
        Ok(404) => out.not_found.push(format!("{id} via node {}", node + 1)),
        Ok(s) => out.failed.push(format!("{id} via node {}: {s}", node + 1)),
        Err(e) => out.failed.push(format!("{id} via node {}: {e}", node + 1)),
    }
}

/// The instance ids node `bus` lists for `orders`.
async fn listed(bus: &Busbar) -> BTreeSet<String> {
    let v = get_json(
        client()
            .get(bus.registry_url("/v1/services/orders"))
            .bearer_auth(TOKEN),
    )
    .await;
    v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["id"].as_str().map(String::from))
        .collect()
}

/// Waits until `nodes` all list every id in `ids`; how many looks it took, or the ids
/// missing at the last one.
async fn wait_listed(
    nodes: &[&Busbar],
    ids: &BTreeSet<String>,
    within: Duration,
) -> Result<usize, Vec<String>> {
    let start = Instant::now();
    let mut looks = 0;
    loop {
        looks += 1;
        let mut missing = Vec::new();
        for n in nodes {
            let have = listed(n).await;
            missing.extend(
                ids.difference(&have)
                    .map(|id| format!("{id} on {}", n.http)),
            );
        }
        if missing.is_empty() {
            return Ok(looks);
        }
        if start.elapsed() > within {
            return Err(missing);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The backends (instance ids) that answered `requests` requests through `bus`.
async fn routed_to(bus: &Busbar, requests: usize) -> BTreeSet<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..4 {
        let url = bus.url(&format!("/orders/check/{t}"));
        tasks.spawn(async move {
            let http = client();
            let mut seen = BTreeSet::new();
            for _ in 0..requests.div_ceil(4) {
                let r = http.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200, "{url}");
                if let Some(b) = r.headers().get("x-backend") {
                    seen.insert(b.to_str().unwrap().to_string());
                }
            }
            seen
        });
    }
    let mut seen = BTreeSet::new();
    while let Some(s) = tasks.join_next().await {
        seen.extend(s.unwrap());
    }
    seen
}

/// Issue 8, case 10. Twelve registration clients register instances (each its own
/// backend, TTL 5 s, renewed every 1.5 s) through all three nodes at once; node 1 is
/// killed with SIGKILL when 40% are acknowledged, and its clients move on to the other
/// nodes. Every registration any node acknowledged, node 1 included, is then listed by
/// nodes 2 and 3, still listed a full TTL after the kill (renewed through them), and
/// routed to by both. Registrations whose request failed may be present or absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_registration_traffic_loses_no_acknowledged_registration() {
    let etcd = Etcd::start().await;
    let cfg = config_with(&etcd, "balance = \"round_robin\"");
    let mut n1 = Busbar::start(&cfg).await;
    let n2 = Busbar::start(&cfg).await;
    let n3 = Busbar::start(&cfg).await;
    let nodes = vec![n1.registry, n2.registry, n3.registry];
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let renewals = tokio::spawn(renew(nodes.clone(), acked.clone(), stop.clone()));
    let registrars: Vec<_> = (0..REGISTRARS)
        .map(|r| tokio::spawn(registrar(nodes.clone(), r, acked.clone())))
        .collect();

    let total = REGISTRARS * INSTANCES_EACH;
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < total * 2 / 5 {
        assert!(Instant::now() < deadline, "registrations too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let kill = Instant::now();
    n1.signal(SIGKILL);
    // `kill` has returned: node 1 is dead by now.
    let killed = Instant::now();
    let acked_at_kill = acked.lock().unwrap().len();
    n1.wait_exit(Duration::from_secs(5)).await;
    assert!(
        TcpStream::connect(n1.registry).await.is_err(),
        "node 1 still up"
    );

    // Node 1's acknowledged registrations are listed by the survivors.
    let by_node_1: BTreeSet<String> = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.node == 0)
        .map(|a| a.id.clone())
        .collect();
    let survivors = [&n2, &n3];
    let node_1_looks = wait_listed(&survivors, &by_node_1, Duration::from_secs(5))
        .await
        .unwrap_or_else(|missing| panic!("node 1's acknowledged registrations lost: {missing:?}"));
    let node_1_listed = kill.elapsed();

    let mut backends = Vec::new();
    let mut unanswered = Vec::new();
    for r in registrars {
        let (b, u) = r.await.unwrap();
        backends.extend(b);
        unanswered.extend(u);
    }
    let acked_all: Vec<Acked> = acked.lock().unwrap().clone();
    let ids: BTreeSet<String> = acked_all.iter().map(|a| a.id.clone()).collect();
    assert_eq!(ids.len() + unanswered.len(), total);
    let last_ack = acked_all.iter().map(|a| a.at).max().unwrap();
    let all_looks = wait_listed(&survivors, &ids, Duration::from_secs(5))
        .await
        .unwrap_or_else(|missing| panic!("acknowledged registrations lost: {missing:?}"));
    let all_listed = last_ack.elapsed();
    // Present right after: requests that failed on node 1 may or may not have reached etcd.
    let present: BTreeSet<String> = listed(&n2).await;
    let unanswered_present = unanswered
        .iter()
        .filter(|u| present.contains(&u.id))
        .count();

    // A full TTL after the kill, renewed through nodes 2 and 3, nothing has expired.
    tokio::time::sleep_until((killed + Duration::from_secs(INSTANCE_TTL + 1)).into()).await;
    let after_ttl = wait_listed(&survivors, &ids, Duration::ZERO).await;
    assert!(
        after_ttl.is_ok(),
        "acknowledged registrations expired after the kill: {:?}",
        after_ttl.err()
    );

    // And both survivors route to every one of them (round robin over what they list).
    for n in survivors {
        let listing = listed(n).await.len();
        let mut seen = BTreeSet::new();
        for _ in 0..3 {
            seen.extend(routed_to(n, listing).await);
            if ids.is_subset(&seen) {
                break;
            }
        }
        let unrouted: Vec<_> = ids.difference(&seen).collect();
        assert!(
            unrouted.is_empty(),
            "{} never routed to {unrouted:?}",
            n.http
        );
    }

    stop.store(true, Ordering::Relaxed);
    let renewals = renewals.await.unwrap();
    assert!(
        renewals.not_found.is_empty(),
        "renewals answered 404 (registration unknown): {:?}",
        renewals.not_found
    );
    let in_flight: Vec<&Unanswered> = unanswered.iter().filter(|u| u.node == 0).collect();
    assert_eq!(
        in_flight.len(),
        unanswered.len(),
        "registrations failed on a surviving node: {unanswered:?}"
    );
    // Sent before node 1 died (in flight at the kill), or just after on a keep-alive
    // connection the client had not yet seen closed: milliseconds from the kill.
    let sent_at: Vec<i64> = in_flight
        .iter()
        .map(|u| {
            u.sent.saturating_duration_since(kill).as_millis() as i64
                - kill.saturating_duration_since(u.sent).as_millis() as i64
        })
        .collect();
    // Before `kill` ran: surely in flight at the death; after it returned: sent on a
    // keep-alive connection to the dead node that the client had not yet seen closed.
    let before_kill = in_flight.iter().filter(|u| u.sent < kill).count();
    let after_killed = in_flight.iter().filter(|u| u.sent > killed).count();
    let errors: BTreeSet<&str> = in_flight.iter().map(|u| u.error.as_str()).collect();
    eprintln!(
        "case 10: {total} registrations, {} acknowledged ({} by node 1, {acked_at_kill} at the kill), \
         {} unanswered by node 1 ({before_kill} sent before `kill -9` ran, {after_killed} after it returned {:?} later; \
         sent at {sent_at:?} ms from it; {errors:?}; \
         {unanswered_present} of them present afterwards); \
         node 1's acknowledged listed by nodes 2 and 3 {node_1_listed:?} after the kill (look {node_1_looks}), \
         all {} {all_listed:?} after the last ack (look {all_looks}); \
         all still listed {INSTANCE_TTL}+1 s after the kill and routed by both; \
         renewals {} ok, {} failed ({:?}), 0 answered 404",
        ids.len(),
        by_node_1.len(),
        in_flight.len(),
        killed - kill,
        ids.len(),
        renewals.ok,
        renewals.failed.len(),
        renewals.failed,
    );
    drop(backends);
}
