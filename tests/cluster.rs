//! Three busbar nodes sharing one etcd: registrations on any node route on all of them,
//! routing survives etcd going away, and writes flow again when it returns.

mod common;

use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{client, sha256_hex, Backend, Busbar};
use serde_json::{json, Value};

const TOKEN: &str = "cluster-test-token";

fn config(etcd: &Etcd) -> String {
    format!(
        r#"
[registry]
listen = "{{registry}}"
backend = "etcd"
[registry.etcd]
endpoints = ["{endpoint}"]
prefix = "/busbar-test/services/"
[[registry.token]]
token_sha256 = "{hash}"
services = ["orders"]

[[service]]
name = "orders"
registration = true
[[route]]
name = "orders"
path_prefix = "/orders"
service = "orders"
"#,
        endpoint = etcd.endpoint(),
        hash = sha256_hex(TOKEN),
    )
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
    let h: Value = client()
        .get(n2.admin_url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
            let v: Value = client()
                .get(n.registry_url("/v1/services/orders"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let ids: Vec<&str> = v["instances"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|i| i["id"].as_str())
                .collect();
            if ids.contains(&"a2") {
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
