//! Balancing policies as a client sees them: which backend answers, counted over many
//! requests through the real binary.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{client, get_json, Backend, Busbar};

/// One service `s` over `backends` (with these weights) and a catch-all route `r`.
fn config(balance: &str, extra: &str, backends: &[(&Backend, u32)]) -> String {
    let endpoints: Vec<String> = backends
        .iter()
        .map(|(b, w)| format!("{{ addr = \"{}\", weight = {w} }}", b.addr))
        .collect();
    format!(
        r#"
[[service]]
name = "s"
balance = "{balance}"
{extra}
endpoints = [{endpoints}]

[[route]]
name = "r"
service = "s"
"#,
        endpoints = endpoints.join(", ")
    )
}

/// Sends `n` sequential GETs and counts the answers by `x-backend`; every one must be a 200.
async fn count_by_backend(bus: &Busbar, n: usize) -> BTreeMap<String, usize> {
    let http = client();
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let r = http.get(bus.url(&format!("/n/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        let name = r.headers()["x-backend"].to_str().unwrap().to_string();
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// Waits until the backends together have seen `n` requests.
async fn until_hits(backends: &[&Backend], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen: usize = backends.iter().map(|b| b.hits()).sum();
        if seen >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backends saw {seen} of {n} requests"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the admin API shows no request in flight on any instance.
async fn until_idle(bus: &Busbar) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = get_json(bus.admin_get("/v1/services")).await;
        let busy: u64 = v["services"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["instances"].as_array().unwrap())
            .map(|i| i["in_flight"].as_u64().unwrap())
            .sum();
        if busy == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{busy} requests still in flight: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_gives_each_instance_its_turn() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let bus = Busbar::start(&config("round_robin", "", &[(&a, 1), (&b, 1), (&c, 1)])).await;

    let counts = count_by_backend(&bus, 300).await;

    for name in ["a", "b", "c"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!(n.abs_diff(100) <= 2, "{name} answered {n}: {counts:?}");
    }
    assert_eq!(a.hits() + b.hits() + c.hits(), 300, "one try per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_splits_by_weight() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let bus = Busbar::start(&config("weighted", "", &[(&a, 3), (&b, 1)])).await;

    let counts = count_by_backend(&bus, 400).await;

    let (na, nb) = (
        counts.get("a").copied().unwrap_or(0),
        counts.get("b").copied().unwrap_or(0),
    );
    assert_eq!(na + nb, 400, "{counts:?}");
    // ±5% of 300:100.
    assert!(
        na.abs_diff(300) <= 15 && nb.abs_diff(100) <= 5,
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_sends_new_requests_to_the_less_loaded_instance() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let bus = Busbar::start(&config("p2c", "", &[(&a, 1), (&b, 1)])).await;
    let http = client();

    // 20 long requests at once: with two instances p2c always compares both, so each
    // goes to whichever has fewer in flight and they end up split evenly.
    let long: Vec<_> = (0..20)
        .map(|i| {
            let req = http
                .get(bus.url(&format!("/long/{i}?sleep_ms=1000")))
                .send();
            tokio::spawn(req)
        })
        .collect();
    for r in long {
        assert_eq!(r.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(a.hits() + b.hits(), 20);
    assert!(
        a.hits().abs_diff(b.hits()) <= 2,
        "a {} b {}",
        a.hits(),
        b.hits()
    );

    // One long request occupies one instance; every short request sent meanwhile goes to
    // the other (round robin or random would send about half of them to the busy one).
    until_idle(&bus).await;
    let (a0, b0) = (a.hits(), b.hits());
    let held = tokio::spawn(http.get(bus.url("/held?sleep_ms=3000")).send());
    until_hits(&[&a, &b], a0 + b0 + 1).await;
    let busy = if a.hits() > a0 { "a" } else { "b" };
    let counts = count_by_backend(&bus, 10).await;
    assert_eq!(
        counts.get(busy),
        None,
        "short requests went to the busy instance {busy}: {counts:?}"
    );
    let held = held.await.unwrap().unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(held.headers()["x-backend"], busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_keeps_each_user_on_one_instance() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let bus = Busbar::start(&config(
        "sticky",
        "hash_key = \"header:x-user-id\"",
        &[(&a, 1), (&b, 1), (&c, 1)],
    ))
    .await;
    let http = client();

    let mut placement: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for round in 0..5 {
        for user in 0..50 {
            let id = format!("user-{user}");
            let r = http
                .get(bus.url(&format!("/u/{round}")))
                .header("x-user-id", &id)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let name = r.headers()["x-backend"].to_str().unwrap().to_string();
            placement.entry(id).or_default().insert(name);
        }
    }

    for (user, backends) in &placement {
        assert_eq!(backends.len(), 1, "{user} was served by {backends:?}");
    }
    let used: BTreeSet<_> = placement.values().flatten().collect();
    assert!(used.len() >= 2, "50 users all on {used:?}");
    assert_eq!(a.hits() + b.hits() + c.hits(), 250);
}
