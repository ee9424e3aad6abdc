//! Gray release: splits between versions by weight (sticky per user) and by rule, the
//! fallback to stable, rollback through the admin API (one node and a 3-node etcd
//! cluster), and config rollback.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{client, Backend, Busbar};
use serde_json::{json, Value};

/// Two stable instances (`v1`) and one canary (`v2`); the user is `x-user-id`.
fn config(v1a: &Backend, v1b: &Backend, v2: &Backend, split: &str, registry: &str) -> String {
    format!(
        r#"{registry}
[[service]]
name = "orders"
endpoints = [
  {{ addr = "{a}", version = "v1" }},
  {{ addr = "{b}", version = "v1" }},
  {{ addr = "{c}", version = "v2" }},
]
[service.retry]
attempts = 3
[service.health]
type = "http"
path = "/healthz"
interval = "200ms"
healthy_threshold = 1
unhealthy_threshold = 1

[[route]]
name = "orders"
path_prefix = "/orders"
service = "orders"
[route.admission]
identity = ["header:x-user-id", "client_ip"]
trusted_proxies = ["127.0.0.0/8"]
{split}
"#,
        a = v1a.addr,
        b = v1b.addr,
        c = v2.addr,
    )
}

struct Fleet {
    v1a: Backend,
    v1b: Backend,
    v2: Backend,
}

impl Fleet {
    async fn start() -> Fleet {
        Fleet {
            v1a: Backend::start("v1-a").await,
            v1b: Backend::start("v1-b").await,
            v2: Backend::start("v2").await,
        }
    }

    fn config(&self, split: &str) -> String {
        config(&self.v1a, &self.v1b, &self.v2, split, "")
    }
}

/// The version that answered (`v1` or `v2`), or the status when it failed.
async fn version(bus: &Busbar, user: &str, extra: &[(&str, &str)]) -> String {
    let mut req = client().get(bus.url("/orders/x")).header("x-user-id", user);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("request");
    if !r.status().is_success() {
        return format!("status {}", r.status());
    }
    let backend = r
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    backend.split('-').next().unwrap_or("").to_string()
}

async fn tally(bus: &Busbar, users: impl Iterator<Item = String>) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for u in users {
        *out.entry(version(bus, &u, &[]).await).or_default() += 1;
    }
    out
}

async fn admin(
    bus: &Busbar,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client()
        .request(method, bus.admin_url(path))
        .bearer_auth(&bus.token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("admin call");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_lands_within_3_percent_and_users_stick() {
    let f = Fleet::start().await;
    let bus =
        Busbar::start(&f.config("[route.split]\nstable = \"v1\"\nweights = { v1 = 90, v2 = 10 }"))
            .await;

    let counts = tally(&bus, (0..2000).map(|i| format!("user-{i}"))).await;
    let canary = counts.get("v2").copied().unwrap_or(0);
    let stable = counts.get("v1").copied().unwrap_or(0);
    assert_eq!(canary + stable, 2000, "{counts:?}");
    let share = canary as f64 / 2000.0;
    assert!(
        (0.07..=0.13).contains(&share),
        "canary share {share}: {counts:?}"
    );

    // Prometheus and the admin API say the same.
    let m = bus
        .metric("busbar_version_requests_total{class=\"2xx\",service=\"orders\",version=\"v2\"}")
        .await;
    assert_eq!(m as usize, canary);
    let (status, v) = admin(&bus, reqwest::Method::GET, "/v1/releases", None).await;
    assert_eq!(status, 200);
    let r = &v["releases"][0];
    assert_eq!(r["route"], "orders");
    assert_eq!(r["origin"], "file");
    assert_eq!(r["served"]["v2"]["requests"], canary as u64, "{v}");

    // The same user always gets the same version.
    for i in 0..40 {
        let u = format!("sticky-{i}");
        let first = version(&bus, &u, &[]).await;
        for _ in 0..5 {
            assert_eq!(version(&bus, &u, &[]).await, first, "{u} flipped");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_rule_sends_only_matching_requests_to_the_canary() {
    let f = Fleet::start().await;
    let split = "[route.split]\nstable = \"v1\"\n[[route.split.rules]]\nversion = \"v2\"\nheader = { name = \"x-canary\", value = \"on\" }";
    let bus = Busbar::start(&f.config(split)).await;
    for i in 0..100 {
        let u = format!("u{i}");
        assert_eq!(version(&bus, &u, &[]).await, "v1");
        assert_eq!(version(&bus, &u, &[("x-canary", "off")]).await, "v1");
        assert_eq!(version(&bus, &u, &[("x-canary", "on")]).await, "v2");
    }
    assert_eq!(f.v2.hits(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_canary_moves_its_traffic_to_stable_without_errors() {
    let mut f = Fleet::start().await;
    let bus =
        Busbar::start(&f.config("[route.split]\nstable = \"v1\"\nweights = { v2 = 50 }")).await;
    let before = tally(&bus, (0..100).map(|i| format!("u{i}"))).await;
    assert!(before.get("v2").copied().unwrap_or(0) > 20, "{before:?}");

    f.v2.stop().await;
    let after = tally(&bus, (0..400).map(|i| format!("u{i}"))).await;
    assert_eq!(after.get("v1").copied(), Some(400), "{after:?}");
    let fallbacks = bus
        .metric("busbar_release_fallback_total{route=\"orders\"}")
        .await;
    assert!(fallbacks > 0.0, "fallbacks not counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_and_rollback_apply_at_once_and_survive_a_restart() {
    let f = Fleet::start().await;
    let mut bus = Busbar::start(&f.config("[route.split]\nstable = \"v1\"")).await;
    let users = || (0..200).map(|i| format!("u{i}"));
    assert_eq!(tally(&bus, users()).await.get("v1"), Some(&200));

    // Writes need the admin token and a valid split for a known route.
    let r = client()
        .put(bus.admin_url("/v1/releases/orders"))
        .json(&json!({ "stable": "v1", "weights": { "v2": 50 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (status, v) = admin(
        &bus,
        reqwest::Method::PUT,
        "/v1/releases/orders",
        Some(json!({ "stable": "v1", "weights": { "v2": 150 } })),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("weights.v2"),
        "{v}"
    );
    let (status, _) = admin(
        &bus,
        reqwest::Method::PUT,
        "/v1/releases/nope",
        Some(json!({ "stable": "v1" })),
    )
    .await;
    assert_eq!(status, 404);

    let (status, v) = admin(
        &bus,
        reqwest::Method::PUT,
        "/v1/releases/orders",
        Some(json!({ "stable": "v1", "weights": { "v2": 50 } })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let half = tally(&bus, users()).await;
    assert!(half.get("v2").copied().unwrap_or(0) > 60, "{half:?}");

    // Rollback: the very next request, and every one after, goes to stable.
    let (status, v) = admin(
        &bus,
        reqwest::Method::POST,
        "/v1/releases/orders/rollback",
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(tally(&bus, users()).await.get("v1"), Some(&200));

    // Widen again, restart: the override file brings it back.
    admin(
        &bus,
        reqwest::Method::PUT,
        "/v1/releases/orders",
        Some(json!({ "stable": "v1", "weights": { "v2": 100 } })),
    )
    .await;
    bus.kill_and_restart().await;
    assert_eq!(tally(&bus, users()).await.get("v2"), Some(&200));
    let (_, v) = admin(&bus, reqwest::Method::GET, "/v1/releases", None).await;
    assert_eq!(v["releases"][0]["origin"], "override", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_rollback_restores_the_previous_routes() {
    let f = Fleet::start().await;
    let bus = Busbar::start(&f.config("")).await;
    assert_eq!(version(&bus, "u", &[]).await, "v1");

    let moved = f
        .config("")
        .replace("path_prefix = \"/orders\"", "path_prefix = \"/shop\"");
    bus.write_config(&moved, "");
    assert_eq!(bus.reload().await.status(), 200);
    assert_eq!(
        client()
            .get(bus.url("/orders/x"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        client()
            .get(bus.url("/shop/x"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let (status, v) = admin(&bus, reqwest::Method::GET, "/v1/config/history", None).await;
    assert_eq!(status, 200);
    let entries = v["newest_first"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len(), 2, "{v}");
    assert_eq!(entries[0]["source"], "reload");
    assert_eq!(entries[1]["source"], "start");
    assert_ne!(entries[0]["digest"], entries[1]["digest"]);

    let r = client()
        .post(bus.admin_url("/v1/config/rollback"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (status, v) = admin(&bus, reqwest::Method::POST, "/v1/config/rollback", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["digest"], entries[1]["digest"]);
    assert_eq!(
        client()
            .get(bus.url("/orders/x"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(bus.url("/shop/x"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // The user's file is left as it was.
    assert!(std::fs::read_to_string(&bus.config)
        .unwrap()
        .contains("/shop"));
    // Nothing earlier than the start to go back to.
    let (status, _) = admin(&bus, reqwest::Method::POST, "/v1/config/rollback", None).await;
    assert_eq!(status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_changed_on_one_node_applies_to_all_three_and_survives_a_restart() {
    let etcd = Etcd::start().await;
    let f = Fleet::start().await;
    let registry = format!(
        "[registry]\nlisten = \"{{registry}}\"\nbackend = \"etcd\"\n[registry.etcd]\nendpoints = [\"{}\"]\nprefix = \"/busbar-release-test/services/\"\n",
        etcd.endpoint()
    );
    let cfg = config(
        &f.v1a,
        &f.v1b,
        &f.v2,
        "[route.split]\nstable = \"v1\"",
        &registry,
    );
    let n1 = Busbar::start(&cfg).await;
    let mut n2 = Busbar::start(&cfg).await;
    let mut n3 = Busbar::start(&cfg).await;
    for n in [&n1, &n2, &n3] {
        assert_eq!(version(n, "u", &[]).await, "v1");
    }
    // Give the release watches a moment to be established after the re-list.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let start = Instant::now();
    let (status, v) = admin(
        &n1,
        reqwest::Method::PUT,
        "/v1/releases/orders",
        Some(json!({ "stable": "v1", "weights": { "v2": 100 } })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    for n in [&n1, &n2, &n3] {
        while version(n, "u", &[]).await != "v2" {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "node {} still on v1",
                n.http
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    n2.kill_and_restart().await;
    n3.kill_and_restart().await;
    for n in [&n2, &n3] {
        assert_eq!(
            version(n, "u", &[]).await,
            "v2",
            "node {} lost the split",
            n.http
        );
    }

    // Rollback on node 3 reaches node 1.
    let (status, _) = admin(
        &n3,
        reqwest::Method::POST,
        "/v1/releases/orders/rollback",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let start = Instant::now();
    while version(&n1, "u", &[]).await != "v1" {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "node 1 did not roll back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
