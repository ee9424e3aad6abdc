//! Service registration on the embedded registry: lifecycle, token scopes, bad input,
//! self-preservation and the disk snapshot.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, get_json, sha256_hex, Backend, Busbar};
use serde_json::{json, Value};

const ORDERS_TOKEN: &str = "orders-secret-token";
const PAYMENTS_TOKEN: &str = "payments-secret-token";

fn config() -> String {
    format!(
        r#"
[registry]
listen = "{{registry}}"
default_ttl = "10s"
[[registry.token]]
token_sha256 = "{orders}"
services = ["orders"]
[[registry.token]]
token_sha256 = "{payments}"
services = ["payments"]

{services}"#,
        services = common::ORDERS_AND_PAYMENTS,
        orders = sha256_hex(ORDERS_TOKEN),
        payments = sha256_hex(PAYMENTS_TOKEN),
    )
}

async fn register(
    bus: &Busbar,
    service: &str,
    id: &str,
    body: Value,
    token: &str,
) -> reqwest::Response {
    client()
        .put(bus.registry_url(&format!("/v1/services/{service}/instances/{id}")))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn heartbeat(bus: &Busbar, service: &str, id: &str, token: &str) -> reqwest::StatusCode {
    client()
        .put(bus.registry_url(&format!("/v1/services/{service}/instances/{id}/heartbeat")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

/// Polls `path` until it answers `want` from the backend named `backend` (or, with `None`,
/// until it answers 503), within `within`.
async fn wait_routed(
    bus: &Busbar,
    path: &str,
    backend: Option<&str>,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let r = client().get(bus.url(path)).send().await.unwrap();
        let got = r
            .headers()
            .get("x-backend")
            .map(|v| v.to_str().unwrap().to_string());
        let ok = match backend {
            Some(b) => got.as_deref() == Some(b),
            None => r.status() == 503,
        };
        if ok {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{path}: wanted {backend:?}, still {} {got:?}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_heartbeat_expire_and_deregister() {
    let app = Backend::start("orders-1").await;
    let bus = Busbar::start(&config()).await;

    // No instance yet: the service answers 503 with a reason.
    let r = client().get(bus.url("/orders/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);

    let r = register(
        &bus,
        "orders",
        "o1",
        json!({ "address": app.addr.to_string(), "ttl": 2, "version": "v1" }),
        ORDERS_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let took = wait_routed(&bus, "/orders/x", Some("orders-1"), Duration::from_secs(1)).await;
    assert!(took < Duration::from_secs(1));

    // Heartbeats keep it past its TTL.
    for _ in 0..6 {
        assert_eq!(heartbeat(&bus, "orders", "o1", ORDERS_TOKEN).await, 200);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let r = client().get(bus.url("/orders/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // The listing shows it with its lease.
    let v = get_json(
        client()
            .get(bus.registry_url("/v1/services/orders"))
            .bearer_auth(ORDERS_TOKEN),
    )
    .await;
    assert_eq!(v["instances"][0]["id"], "o1");
    assert_eq!(v["instances"][0]["version"], "v1");
    assert_eq!(v["instances"][0]["source"], "registered");

    // Stop heartbeating: gone after 3 s of silence (TTL 2 s is the one TTL that waits a
    // second longer, see README) plus one sweep.
    let start = Instant::now();
    wait_routed(&bus, "/orders/x", None, Duration::from_secs(8)).await;
    assert!(
        start.elapsed() >= Duration::from_millis(1000),
        "expired too early"
    );
    // Its heartbeat now says: register again.
    assert_eq!(heartbeat(&bus, "orders", "o1", ORDERS_TOKEN).await, 404);
    assert!(bus.metric("busbar_registry_expired_total").await >= 1.0);

    // Register again, start a slow request, deregister: gone at once, the slow one finishes.
    register(
        &bus,
        "orders",
        "o1",
        json!({ "address": app.addr.to_string(), "ttl": 30 }),
        ORDERS_TOKEN,
    )
    .await;
    wait_routed(&bus, "/orders/x", Some("orders-1"), Duration::from_secs(1)).await;
    let slow = tokio::spawn({
        let url = bus.url("/orders/slow?sleep_ms=1500");
        async move { client().get(url).send().await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client()
        .delete(bus.registry_url("/v1/services/orders/instances/o1"))
        .bearer_auth(ORDERS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_routed(&bus, "/orders/x", None, Duration::from_millis(500)).await;
    assert_eq!(slow.await.unwrap(), 200, "the in-flight request completes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_scoped_and_bad_input_is_named() {
    let bus = Busbar::start(&config()).await;
    let body = json!({ "address": "127.0.0.1:1" });

    let r = client()
        .put(bus.registry_url("/v1/services/orders/instances/a"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = register(&bus, "orders", "a", body.clone(), "wrong").await;
    assert_eq!(r.status(), 401);
    let r = register(&bus, "payments", "a", body.clone(), ORDERS_TOKEN).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("payments"), "{v}");
    assert_eq!(
        register(&bus, "orders", "a", body.clone(), ORDERS_TOKEN)
            .await
            .status(),
        200
    );
    assert_eq!(
        register(&bus, "payments", "a", body.clone(), PAYMENTS_TOKEN)
            .await
            .status(),
        200
    );

    // 400 naming the field.
    for (body, field) in [
        (json!({ "address": "not-an-address" }), "address"),
        (json!({ "address": "127.0.0.1:1", "ttl": 1 }), "ttl"),
        (json!({ "address": "127.0.0.1:1", "ttl": "ten" }), "ttl"),
        (json!({ "address": "127.0.0.1:1", "weight": 0 }), "weight"),
        (
            json!({ "address": "127.0.0.1:1", "sidecar": "nope" }),
            "sidecar",
        ),
        (json!({ "addres": "127.0.0.1:1" }), "addres"),
        (json!({ "ttl": 5 }), "address"),
    ] {
        let r = register(&bus, "orders", "b", body.clone(), ORDERS_TOKEN).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["field"], field, "{body} → {v}");
    }
    let r = client()
        .put(bus.registry_url("/v1/services/orders/instances/b"))
        .bearer_auth(ORDERS_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = register(
        &bus,
        "Bad_Name",
        "b",
        json!({ "address": "127.0.0.1:1" }),
        ORDERS_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["field"], "service");
    let r = register(
        &bus,
        "orders",
        "bad/id",
        json!({ "address": "127.0.0.1:1" }),
        ORDERS_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 404, "a slash makes it another path");
    let r = client()
        .put(bus.registry_url("/v1/services/orders/instances/big"))
        .bearer_auth(ORDERS_TOKEN)
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Nothing bad was stored.
    let v = get_json(
        client()
            .get(bus.registry_url("/v1/services/orders"))
            .bearer_auth(ORDERS_TOKEN),
    )
    .await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_preservation_keeps_instances_when_heartbeats_stop_en_masse() {
    let bus = Busbar::start(&config()).await;
    let ids: Vec<String> = (0..20).map(|i| format!("o{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let r = register(
            &bus,
            "orders",
            id,
            json!({ "address": format!("127.0.0.1:{}", 20000 + i), "ttl": 3 }),
            ORDERS_TOKEN,
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    let beat = |n: usize| {
        let ids = ids[..n].to_vec();
        let bus_url = bus.registry.to_string();
        async move {
            for id in ids {
                let s = client()
                    .put(format!(
                        "http://{bus_url}/v1/services/orders/instances/{id}/heartbeat"
                    ))
                    .bearer_auth(ORDERS_TOKEN)
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(s, 200, "{id}");
            }
        }
    };
    // All 20 renew every second (TTL/3) for 3 s, then only 10 do.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        beat(20).await;
    }
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        beat(10).await;
    }
    assert_eq!(bus.metric("busbar_registry_self_preservation").await, 1.0);
    let v = get_json(
        client()
            .get(bus.registry_url("/v1/services/orders"))
            .bearer_auth(ORDERS_TOKEN),
    )
    .await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 20, "none expired");
    let admin = get_json(bus.admin_get("/v1/registry")).await;
    assert_eq!(admin["self_preservation"]["active"], true, "{admin}");

    // All renew again: the mode ends as soon as the renewals are back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        beat(20).await;
        if bus.metric("busbar_registry_self_preservation").await == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "self-preservation did not end");
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    assert_eq!(bus.metric("busbar_registry_expired_total").await, 0.0);
}

/// Ten instances of `orders` on their own busbar, renewing as the registration answer
/// asks, each until it is told to stop.
struct Fleet {
    bus: Busbar,
    alive: Arc<Vec<AtomicBool>>,
    beating: tokio::task::JoinHandle<()>,
    /// The renewal interval the registration answer gave.
    every: Duration,
}

const FLEET: usize = 10;

impl Fleet {
    async fn start(ttl: u64) -> Fleet {
        let bus = Busbar::start(&config()).await;
        let mut every = 0;
        for i in 0..FLEET {
            let r = register(
                &bus,
                "orders",
                &format!("o{i}"),
                json!({ "address": format!("127.0.0.1:{}", 20000 + i), "ttl": ttl }),
                ORDERS_TOKEN,
            )
            .await;
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            every = v["heartbeat_every"].as_u64().unwrap();
        }
        let every = Duration::from_secs(every);
        let alive: Arc<Vec<AtomicBool>> =
            Arc::new((0..FLEET).map(|_| AtomicBool::new(true)).collect());
        let urls: Vec<String> = (0..FLEET)
            .map(|i| bus.registry_url(&format!("/v1/services/orders/instances/o{i}/heartbeat")))
            .collect();
        let beating = tokio::spawn({
            let alive = alive.clone();
            async move {
                let c = client();
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let mut sends = tokio::task::JoinSet::new();
                    for (i, url) in urls.iter().enumerate() {
                        if alive[i].load(Relaxed) {
                            let req = c.put(url).bearer_auth(ORDERS_TOKEN);
                            sends.spawn(async move { req.send().await.map(|r| r.status()) });
                        }
                    }
                    sends.join_all().await;
                }
            }
        });
        Fleet {
            bus,
            alive,
            beating,
            every,
        }
    }

    fn renewing(&self, which: impl Fn(usize) -> bool) {
        for (i, a) in self.alive.iter().enumerate() {
            a.store(which(i), Relaxed);
        }
    }

    async fn ids(&self) -> Vec<String> {
        let v = get_json(
            client()
                .get(self.bus.registry_url("/v1/services/orders"))
                .bearer_auth(ORDERS_TOKEN),
        )
        .await;
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// The mode as the metric and the admin API say it; they must agree.
    async fn preserving(&self) -> bool {
        let metric = self.bus.metric("busbar_registry_self_preservation").await;
        let admin = get_json(self.bus.admin_get("/v1/registry")).await;
        let active = admin["self_preservation"]["active"] == true;
        if active != (metric == 1.0) {
            // A sweep ran between the two reads: ask again.
            return Box::pin(self.preserving()).await;
        }
        active
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.beating.abort();
    }
}

/// Silence after which busbar may remove an instance with this TTL (at least 3 s).
fn removable_after(ttl: u64) -> Duration {
    Duration::from_secs(ttl.max(3))
}

/// One instance of ten stops renewing: it expires, alone, and the mode never holds it.
async fn one_death_expires(ttl: u64) {
    let fleet = Fleet::start(ttl).await;
    tokio::time::sleep(fleet.every * 2).await;
    fleet.renewing(|i| i != 0);
    let stopped = Instant::now();
    let deadline = stopped + removable_after(ttl) + fleet.every + Duration::from_secs(10);
    while fleet.ids().await.contains(&"o0".to_string()) {
        assert!(Instant::now() < deadline, "ttl {ttl}: o0 did not expire");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        stopped.elapsed() + fleet.every >= removable_after(ttl),
        "ttl {ttl}: expired too early"
    );
    assert_eq!(
        heartbeat(&fleet.bus, "orders", "o0", ORDERS_TOKEN).await,
        404
    );
    assert_eq!(fleet.ids().await.len(), FLEET - 1, "ttl {ttl}");
    assert_eq!(
        fleet.bus.metric("busbar_registry_expired_total").await,
        1.0,
        "ttl {ttl}"
    );
    assert!(!fleet.preserving().await, "ttl {ttl}");
}

/// All ten renew for `steady` (at least two intervals), then stop: the mode engages
/// before the first lease could be removed, says so in the metric and the admin API, and
/// holds every instance however long the silence lasts; when they renew again it ends.
async fn mass_silence_is_held(ttl: u64, steady: Duration) {
    let fleet = Fleet::start(ttl).await;
    tokio::time::sleep(steady.max(fleet.every * 2)).await;
    fleet.renewing(|_| false);
    let stopped = Instant::now();
    let deadline = stopped + removable_after(ttl) + Duration::from_secs(10);
    while !fleet.preserving().await {
        assert!(Instant::now() < deadline, "ttl {ttl}: no self-preservation");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Silence for twice the time after which one instance alone would be gone.
    let held_until = stopped + removable_after(ttl) * 2 + Duration::from_secs(2);
    tokio::time::sleep_until(held_until.into()).await;
    assert!(fleet.preserving().await, "ttl {ttl}");
    let admin = get_json(fleet.bus.admin_get("/v1/registry")).await;
    assert_eq!(
        admin["self_preservation"]["silent_instances"], FLEET,
        "ttl {ttl}: {admin}"
    );
    let held = fleet.ids().await.len();
    assert!(held * 100 >= FLEET * 85, "ttl {ttl}: {held} held");
    assert_eq!(held, FLEET, "ttl {ttl}");
    assert_eq!(
        fleet.bus.metric("busbar_registry_expired_total").await,
        0.0,
        "ttl {ttl}"
    );

    // Renewals resume: the mode ends within a renewal interval and a sweep or two.
    fleet.renewing(|_| true);
    let deadline = Instant::now() + fleet.every + Duration::from_secs(10);
    while fleet.preserving().await {
        assert!(Instant::now() < deadline, "ttl {ttl}: the mode did not end");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(fleet.ids().await.len(), FLEET, "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_preservation_at_ttl_2s() {
    tokio::join!(
        one_death_expires(2),
        mass_silence_is_held(2, Duration::ZERO)
    );
}

/// The case of issue 23, over a minute: renewals over a whole minute used to hide a
/// silence of the length of a short TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_preservation_at_ttl_3s() {
    let a_minute = Duration::from_secs(65);
    tokio::join!(one_death_expires(3), mass_silence_is_held(3, a_minute));
}

/// About a minute and a half: TTL 30 s renews every 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_preservation_at_ttl_30s() {
    tokio::join!(
        one_death_expires(30),
        mass_silence_is_held(30, Duration::ZERO)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_routes_from_its_snapshot() {
    let app = Backend::start("orders-1").await;
    let mut bus = Busbar::start(&config()).await;
    register(
        &bus,
        "orders",
        "o1",
        json!({ "address": app.addr.to_string(), "ttl": 60 }),
        ORDERS_TOKEN,
    )
    .await;
    wait_routed(&bus, "/orders/x", Some("orders-1"), Duration::from_secs(1)).await;
    // The snapshot is written within its debounce.
    let snapshot = bus.dir.path().join("busbar-registry.json");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !std::fs::read_to_string(&snapshot)
        .unwrap_or_default()
        .contains("\"o1\"")
    {
        assert!(Instant::now() < deadline, "snapshot not written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // kill -9 and restart: nobody registers again, yet it routes at once.
    bus.kill_and_restart().await;
    let r = client().get(bus.url("/orders/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-backend"], "orders-1");

    // A corrupt snapshot: busbar starts, says so, and serves its static config.
    std::fs::write(&snapshot, b"{\"format\":1,\"instances\":[{\"serv").unwrap();
    bus.kill_and_restart().await;
    let r = client().get(bus.url("/orders/x")).send().await.unwrap();
    assert_eq!(r.status(), 503, "no instance: the snapshot was ignored");
    assert!(
        bus.stderr().contains("registry snapshot ignored"),
        "{}",
        bus.stderr()
    );
}
