//! Health, failover, error answers, retries and request metrics as a client and an
//! operator see them: statuses and bodies, which backend answered, backends' hit counts,
//! `GET /v1/services` and `/metrics`.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, free_port, get_json, Backend, Busbar};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Health of each instance of `service` in `GET /v1/services`, by address.
async fn instance_health(bus: &Busbar, service: &str) -> BTreeMap<String, String> {
    let v = get_json(bus.admin_get("/v1/services")).await;
    let svc = v["services"]
        .as_array()
        .expect("services array")
        .iter()
        .find(|s| s["name"] == service)
        .unwrap_or_else(|| panic!("service {service} not in {v}"));
    svc["instances"]
        .as_array()
        .expect("instances array")
        .iter()
        .map(|i| {
            let addr = i["addr"].as_str().expect("addr").to_string();
            let health = i["health"].as_str().expect("health").to_string();
            (addr, health)
        })
        .collect()
}

/// Polls `/v1/services` until `addr` of `service` is in state `want`; returns how long it took.
async fn until_health(
    bus: &Busbar,
    service: &str,
    addr: SocketAddr,
    want: &str,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let all = instance_health(bus, service).await;
        if all.get(&addr.to_string()).map(String::as_str) == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{addr} not {want} within {within:?}: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `/metrics` until `sample` reaches `at_least` (metrics are recorded once the
/// response has gone out, so they may trail the client by a moment); returns the value.
async fn metric_reaching(bus: &Busbar, sample: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let v = bus.metric(sample).await;
        if v >= at_least || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `n` sequential GETs to `path`; every one must be a 200. Returns the answering
/// backends' names, in order.
async fn get_n(bus: &Busbar, path: &str, n: usize) -> Vec<String> {
    let http = client();
    let mut names = Vec::with_capacity(n);
    for i in 0..n {
        let r = http.get(bus.url(path)).send().await.unwrap();
        let status = r.status();
        let name = r
            .headers()
            .get("x-backend")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        assert_eq!(
            status,
            200,
            "request {i} to {path}: {}",
            r.text().await.unwrap_or_default()
        );
        names.push(name);
    }
    names
}

/// Asserts busbar's own JSON error answer: status, content type and error code.
async fn assert_error(r: reqwest::Response, status: u16, code: &str) {
    assert_eq!(r.status(), status, "status for {code}");
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.expect("JSON error body");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// What a [`RawUpstream`] does once it has read a request head.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Never answers; holds the connection until the peer closes it.
    Silent,
    /// Aborts the connection with a TCP reset.
    Reset,
}

/// A TCP upstream that reads request heads and never sends a response.
struct RawUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    async fn start(how: Misbehaviour) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw upstream");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let task = tokio::spawn(async move {
            // Dropped with the task on abort, closing every connection.
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let count = count.clone();
                conns.spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    match how {
                        Misbehaviour::Reset => {
                            let _ = stream.set_zero_linger();
                            drop(stream);
                        }
                        Misbehaviour::Silent => {
                            while matches!(stream.read(&mut chunk).await, Ok(n) if n > 0) {}
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        RawUpstream {
            addr,
            requests,
            task,
        }
    }

    /// Request heads received.
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_is_ejected_and_clients_see_no_errors() {
    let live = Backend::start("live").await;
    let mut dead = Backend::start("dead").await;
    dead.stop().await;
    // The dead instance is listed first, so round robin tries it on the first request.
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{dead}" }}, {{ addr = "{live}" }}]
[service.outlier]
consecutive_failures = 1

[[route]]
name = "r"
service = "s"
"#,
        dead = dead.addr,
        live = live.addr
    ))
    .await;

    let names = get_n(&bus, "/x", 100).await;

    assert!(names.iter().all(|n| n == "live"), "{names:?}");
    assert_eq!(live.hits(), 100);
    let health = instance_health(&bus, "s").await;
    assert_eq!(health[&dead.addr.to_string()], "ejected", "{health:?}");
    assert_eq!(health[&live.addr.to_string()], "healthy", "{health:?}");
    let failures = bus
        .metric(r#"busbar_upstream_connect_failures_total{service="s"}"#)
        .await;
    assert!(failures >= 1.0, "connect failures {failures}");
    // Ejected once, on the first failure, and not tried again.
    assert_eq!(
        bus.metric(r#"busbar_outlier_ejections_total{service="s"}"#)
            .await,
        1.0
    );
    assert_eq!(failures, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_dies_in_use_is_ejected_without_client_errors() {
    let live = Backend::start("live").await;
    let mut dying = Backend::start("dying").await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{dying}" }}, {{ addr = "{live}" }}]
[service.outlier]
consecutive_failures = 1

[[route]]
name = "r"
service = "s"
"#,
        dying = dying.addr,
        live = live.addr
    ))
    .await;
    // Both in use, so busbar holds pooled connections to the one about to die.
    let names = get_n(&bus, "/x", 10).await;
    assert_eq!(
        names.iter().filter(|n| *n == "dying").count(),
        5,
        "{names:?}"
    );

    dying.stop().await;
    let names = get_n(&bus, "/x", 100).await;

    assert!(names.iter().all(|n| n == "live"), "{names:?}");
    let health = instance_health(&bus, "s").await;
    assert_eq!(health[&dying.addr.to_string()], "ejected", "{health:?}");
    assert_eq!(
        bus.metric(r#"busbar_outlier_ejections_total{service="s"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_an_instance_out_and_bring_it_back() {
    let a = Backend::start("a").await;
    let mut b = Backend::start("b").await;
    let b_addr = b.addr;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{a}" }}, {{ addr = "{b}" }}]
[service.health]
type = "http"
path = "/healthz"
interval = "100ms"
timeout = "500ms"
healthy_threshold = 1
unhealthy_threshold = 1

[[route]]
name = "r"
service = "s"
"#,
        a = a.addr,
        b = b_addr
    ))
    .await;
    let two = Duration::from_secs(2);
    until_health(&bus, "s", b_addr, "healthy", two).await;
    let names = get_n(&bus, "/x", 10).await;
    assert!(
        names.contains(&"a".into()) && names.contains(&"b".into()),
        "{names:?}"
    );

    // Down: probes notice, and traffic goes to the other instance without errors.
    b.stop().await;
    until_health(&bus, "s", b_addr, "unhealthy", two).await;
    let names = get_n(&bus, "/x", 20).await;
    assert!(names.iter().all(|n| n == "a"), "{names:?}");

    // Back on the same port: healthy again and taking its share.
    let b = Backend::start_on("b", b_addr).await;
    until_health(&bus, "s", b_addr, "healthy", two).await;
    let names = get_n(&bus, "/x", 20).await;
    let to_b = names.iter().filter(|n| *n == "b").count();
    assert!(
        (8..=12).contains(&to_b),
        "b answered {to_b} of 20: {names:?}"
    );
    assert_eq!(b.hits(), to_b);

    // Failing its health endpoint while still answering: out of rotation.
    b.set_healthy(false);
    until_health(&bus, "s", b_addr, "unhealthy", two).await;
    let before = b.hits();
    let names = get_n(&bus, "/x", 20).await;
    assert!(names.iter().all(|n| n == "a"), "{names:?}");
    assert_eq!(b.hits(), before, "an unhealthy instance got traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busbar_answers_name_the_cause() {
    let sick = Backend::start("sick").await;
    sick.set_healthy(false);
    let slow = Backend::start("slow").await;
    let closed = free_port();
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "closed"
endpoints = [{{ addr = "127.0.0.1:{closed}" }}]

[[service]]
name = "sick"
endpoints = [{{ addr = "{sick}" }}]
panic_threshold = 0
[service.health]
type = "http"
path = "/healthz"
interval = "100ms"
timeout = "500ms"
healthy_threshold = 1
unhealthy_threshold = 1

[[service]]
name = "slow"
endpoints = [{{ addr = "{slow}" }}]
timeout = "300ms"

[[route]]
name = "closed"
path_prefix = "/closed"
service = "closed"
[[route]]
name = "sick"
path_prefix = "/sick"
service = "sick"
[[route]]
name = "slow"
path_prefix = "/slow"
service = "slow"
"#,
        sick = sick.addr,
        slow = slow.addr
    ))
    .await;
    let http = client();

    let r = http.get(bus.url("/closed/x")).send().await.unwrap();
    assert_error(r, 502, "connect_failed").await;

    until_health(&bus, "sick", sick.addr, "unhealthy", Duration::from_secs(2)).await;
    let r = http.get(bus.url("/sick/x")).send().await.unwrap();
    assert_error(r, 503, "no_healthy_instance").await;
    assert_eq!(sick.hits(), 0);

    let start = Instant::now();
    let r = http
        .get(bus.url("/slow/x?sleep_ms=2000"))
        .send()
        .await
        .unwrap();
    let took = start.elapsed();
    assert_error(r, 504, "upstream_timeout").await;
    assert!(took < Duration::from_secs(1), "504 took {took:?}");
    assert_eq!(
        slow.hits(),
        1,
        "a timed-out request past its deadline is not retried"
    );

    let r = http.get(bus.url("/nowhere")).send().await.unwrap();
    assert_error(r, 404, "no_route").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_and_class() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{a}" }}]

[[route]]
name = "r"
service = "s"
"#,
        a = a.addr
    ))
    .await;
    let ok = r#"busbar_requests_total{class="2xx",method="GET",reason="",route="r",service="s"}"#;
    let failed =
        r#"busbar_requests_total{class="5xx",method="GET",reason="",route="r",service="s"}"#;
    let count = r#"busbar_request_duration_seconds_count{route="r"}"#;

    get_n(&bus, "/x", 25).await;
    assert_eq!(metric_reaching(&bus, count, 25.0).await, 25.0);
    assert_eq!(bus.metric(ok).await, 25.0);
    assert_eq!(bus.metric(failed).await, 0.0);

    let http = client();
    for _ in 0..3 {
        let r = http
            .get(bus.url("/x"))
            .header("x-respond-status", "500")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500);
        assert_eq!(
            r.headers()["x-backend"],
            "a",
            "the backend's own 500, passed through"
        );
    }
    assert_eq!(metric_reaching(&bus, count, 28.0).await, 28.0);
    assert_eq!(bus.metric(failed).await, 3.0);
    assert_eq!(bus.metric(ok).await, 25.0);
    assert_eq!(a.hits(), 28, "a 500 response is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_not_retried() {
    let (p1, p2) = (Backend::start("p1").await, Backend::start("p2").await);
    let reset = RawUpstream::start(Misbehaviour::Reset).await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "slow"
endpoints = [{{ addr = "{p1}" }}, {{ addr = "{p2}" }}]
read_timeout = "300ms"
timeout = "5s"

[[service]]
name = "reset"
endpoints = [{{ addr = "{reset}" }}]

[[route]]
name = "slow"
path_prefix = "/slow"
service = "slow"
[[route]]
name = "reset"
path_prefix = "/reset"
service = "reset"
"#,
        p1 = p1.addr,
        p2 = p2.addr,
        reset = reset.addr
    ))
    .await;
    let http = client();

    let start = Instant::now();
    let r = http
        .post(bus.url("/slow/x?sleep_ms=2000"))
        .body("order=1")
        .send()
        .await
        .unwrap();
    assert_error(r, 504, "upstream_timeout").await;
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(
        p1.hits() + p2.hits(),
        1,
        "the POST reached an instance once"
    );

    let r = http
        .post(bus.url("/reset/x"))
        .body("order=2")
        .send()
        .await
        .unwrap();
    assert_error(r, 502, "upstream_error").await;
    assert_eq!(reset.requests(), 1, "the POST reached the instance once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_is_retried_on_another_instance_up_to_the_attempts() {
    let silent = RawUpstream::start(Misbehaviour::Silent).await;
    let fast = Backend::start("fast").await;
    let reset = RawUpstream::start(Misbehaviour::Reset).await;
    // The silent instance is listed first, so round robin tries it first.
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "pair"
endpoints = [{{ addr = "{silent}" }}, {{ addr = "{fast}" }}]
read_timeout = "300ms"
timeout = "5s"

[[service]]
name = "reset"
endpoints = [{{ addr = "{reset}" }}]
[service.retry]
attempts = 2

[[route]]
name = "pair"
path_prefix = "/pair"
service = "pair"
[[route]]
name = "reset"
path_prefix = "/reset"
service = "reset"
"#,
        silent = silent.addr,
        fast = fast.addr,
        reset = reset.addr
    ))
    .await;
    let http = client();

    let r = http.get(bus.url("/pair/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-backend"], "fast");
    assert_eq!(
        silent.requests(),
        1,
        "the first try went to the silent instance"
    );
    assert_eq!(fast.hits(), 1);
    let retries = bus
        .metric(r#"busbar_upstream_retries_total{service="pair"}"#)
        .await;
    assert_eq!(retries, 1.0);

    // One instance that always fails: the first try and exactly `attempts` retries.
    let r = http.get(bus.url("/reset/x")).send().await.unwrap();
    assert_error(r, 502, "upstream_error").await;
    assert_eq!(reset.requests(), 3);
}

/// Issue 8, case 9: a burst of failing requests doesn't become a retry storm. With a
/// budget of 10% and a floor of 1 retry a second, the upstream sees at most
/// (1 + 0.1) × requests, plus the floor, although each request may try 3 times.
#[tokio::test]
async fn retries_under_load_stay_within_the_budget() {
    let reset = RawUpstream::start(Misbehaviour::Reset).await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "reset"
endpoints = [{{ addr = "{reset}" }}]
[service.retry]
attempts = 2
budget = 0.1
min_retries = 1

[[route]]
name = "reset"
service = "reset"
"#,
        reset = reset.addr
    ))
    .await;
    let http = client();
    const REQUESTS: usize = 400;
    const CONCURRENCY: usize = 32;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let (http, url) = (http.clone(), bus.url("/x"));
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in (w..REQUESTS).step_by(CONCURRENCY) {
                statuses.push(http.get(&url).send().await.unwrap().status().as_u16());
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64().ceil() as usize;
    assert_eq!(statuses.len(), REQUESTS);
    assert!(statuses.iter().all(|&s| s == 502), "{statuses:?}");

    let hits = reset.requests();
    // Requests deposit 0.1 token each; the floor tops the bucket up to 1 token a second.
    let bound = REQUESTS + REQUESTS / 10 + secs + 1;
    assert!(
        hits <= bound,
        "{hits} upstream tries for {REQUESTS} requests in {secs} s: over the budget ({bound})"
    );
    assert!(hits > REQUESTS, "no retry at all: {hits}");
    let retries = bus
        .metric(r#"busbar_upstream_retries_total{service="reset"}"#)
        .await;
    assert_eq!(retries as usize, hits - REQUESTS);
    let exhausted = bus
        .metric(r#"busbar_retry_budget_exhausted_total{service="reset"}"#)
        .await;
    assert!(exhausted > 0.0, "the budget never ran out");
    eprintln!(
        "{hits} upstream tries for {REQUESTS} requests in {secs} s ({retries} retries, \
         budget exhausted {exhausted} times; without the budget: {})",
        REQUESTS * 3
    );
}
