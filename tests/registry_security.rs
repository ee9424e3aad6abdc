//! The registration API as an attacker holding a token sees it (issue 22, parts 1 and 3):
//! addresses no instance can have, busbar's own listeners, a token's networks, static
//! endpoints under `busbar check`, what a scoped token may learn about other services,
//! and instances this node learns from elsewhere (etcd, its snapshot file), which are held
//! to its own address policy before they are routed.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::daemon::wait_until;
use common::etcd::{orders_on_etcd, Etcd};
use common::{client, get_json, sha256_hex, Backend, Busbar};
use serde_json::{json, Value};

const ORDERS_TOKEN: &str = "orders-secret-token";
const NETS_TOKEN: &str = "orders-in-10-20-token";
const ALL_TOKEN: &str = "all-services-token";

fn config() -> String {
    config_with("")
}

/// With one more token, limited to networks.
fn config_with_nets() -> String {
    config_with(&format!(
        "[[registry.token]]\ntoken_sha256 = \"{}\"\nservices = [\"orders\"]\naddresses = [\"10.20.0.0/16\", \"127.0.0.1\"]\n",
        sha256_hex(NETS_TOKEN)
    ))
}

fn config_with(tokens: &str) -> String {
    format!(
        r#"
[registry]
listen = "{{registry}}"
{tokens}
[[registry.token]]
token_sha256 = "{orders}"
services = ["orders"]
[[registry.token]]
token_sha256 = "{all}"
services = ["*"]

{services}"#,
        services = common::ORDERS_AND_PAYMENTS,
        orders = sha256_hex(ORDERS_TOKEN),
        all = sha256_hex(ALL_TOKEN),
    )
}

async fn register(bus: &Busbar, service: &str, id: &str, body: Value, token: &str) -> (u16, Value) {
    let r = client()
        .put(bus.registry_url(&format!("/v1/services/{service}/instances/{id}")))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn call(bus: &Busbar, method: reqwest::Method, path: &str, token: &str) -> (u16, Value) {
    let r = client()
        .request(method, bus.registry_url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn orders_instances(bus: &Busbar) -> Vec<Value> {
    let v = get_json(
        client()
            .get(bus.registry_url("/v1/services/orders"))
            .bearer_auth(ORDERS_TOKEN),
    )
    .await;
    v["instances"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_no_instance_can_have_are_refused_naming_the_field() {
    let app = Backend::start("orders-1").await;
    let bus = Busbar::start(&config()).await;
    let refused = [
        "0.0.0.0:8080",
        "0.0.0.0:0",
        "[::]:8080",
        "[::ffff:0.0.0.0]:8080",
        "10.0.0.7:0",
        "224.0.0.1:8080",
        "239.255.255.250:1900",
        "[ff02::1]:8080",
        "255.255.255.255:8080",
        "169.254.169.254:80",
        "169.254.170.2:80",
        "[::ffff:169.254.169.254]:80",
        "[fe80::1]:8080",
        "[fd00:ec2::254]:80",
    ];
    for bad in refused {
        for (field, body) in [
            ("address", json!({ "address": bad })),
            (
                "sidecar",
                json!({ "address": app.addr.to_string(), "sidecar": bad }),
            ),
        ] {
            let (status, v) = register(&bus, "orders", "o1", body, ORDERS_TOKEN).await;
            assert_eq!(status, 400, "{field} = {bad}: {v}");
            assert_eq!(v["error"], "invalid_field", "{field} = {bad}: {v}");
            assert_eq!(v["field"], field, "{field} = {bad}: {v}");
            assert!(
                v["message"].as_str().unwrap_or("").contains("refused"),
                "{field} = {bad}: {v}"
            );
        }
    }
    assert!(
        orders_instances(&bus).await.is_empty(),
        "nothing was stored"
    );

    // Loopback stays allowed: instances on this host are ordinary.
    let (status, v) = register(
        &bus,
        "orders",
        "o1",
        json!({ "address": app.addr.to_string() }),
        ORDERS_TOKEN,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let r = client().get(bus.url("/orders/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-backend"], "orders-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busbars_own_listeners_are_refused() {
    let app = Backend::start("orders-1").await;
    let bus = Busbar::start(&config()).await;
    let mapped = |a: std::net::SocketAddr| format!("[::ffff:{}]:{}", a.ip(), a.port());
    let own = [
        ("service", bus.http.to_string()),
        ("admin", bus.admin.to_string()),
        ("registration", bus.registry.to_string()),
        ("service, mapped", mapped(bus.http)),
        ("admin, mapped", mapped(bus.admin)),
    ];
    for (which, addr) in &own {
        for (field, body) in [
            ("address", json!({ "address": addr })),
            (
                "sidecar",
                json!({ "address": app.addr.to_string(), "sidecar": addr }),
            ),
        ] {
            let (status, v) = register(&bus, "orders", "o1", body, ALL_TOKEN).await;
            assert_eq!(status, 400, "{which} listener {addr} as {field}: {v}");
            assert_eq!(v["field"], field, "{which}: {v}");
            assert!(
                v["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("busbar itself listens"),
                "{which}: {v}"
            );
        }
    }
    assert!(
        orders_instances(&bus).await.is_empty(),
        "nothing was stored"
    );
    // The data plane never reached the admin API through a registration.
    let r = client()
        .get(bus.url("/orders/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "no instance to send it to");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_addresses_limit_where_its_instances_may_be() {
    let app = Backend::start("orders-1").await;
    let bus = Busbar::start(&config_with_nets()).await;

    for ok in [
        "10.20.3.4:8080",
        "[::ffff:10.20.0.9]:8080",
        &app.addr.to_string(),
    ] {
        let (status, v) =
            register(&bus, "orders", "in", json!({ "address": ok }), NETS_TOKEN).await;
        assert_eq!(status, 200, "{ok}: {v}");
    }
    let (status, v) = register(
        &bus,
        "orders",
        "out",
        json!({ "address": "10.21.0.1:8080" }),
        NETS_TOKEN,
    )
    .await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"], "forbidden_address", "{v}");
    assert_eq!(v["field"], "address", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("10.21.0.1:8080"),
        "names the address: {v}"
    );
    let (status, v) = register(
        &bus,
        "orders",
        "out",
        json!({ "address": "10.20.0.1:8080", "sidecar": "192.168.7.7:15001" }),
        NETS_TOKEN,
    )
    .await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["field"], "sidecar", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("192.168.7.7:15001"),
        "{v}"
    );
    // The same address with a token that has no list is fine.
    let (status, v) = register(
        &bus,
        "orders",
        "other",
        json!({ "address": "10.21.0.1:8080" }),
        ORDERS_TOKEN,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let ids: Vec<String> = orders_instances(&bus)
        .await
        .iter()
        .map(|i| i["id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(ids, ["in", "other"], "the refused one was not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_token_sees_only_its_services_and_cannot_probe_names() {
    let bus = Busbar::start(&config()).await;
    let names = |v: &Value| -> Vec<String> {
        v["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s["name"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (status, v) = call(&bus, reqwest::Method::GET, "/v1/services", ORDERS_TOKEN).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(names(&v), ["orders"], "{v}");
    let (status, v) = call(&bus, reqwest::Method::GET, "/v1/services", ALL_TOKEN).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(names(&v), ["orders", "payments"], "{v}");

    // Out of scope: one answer, whether the service exists or not.
    let body = json!({ "address": "127.0.0.1:1" });
    for service in ["payments", "nosuch"] {
        let (get, _) = call(
            &bus,
            reqwest::Method::GET,
            &format!("/v1/services/{service}"),
            ORDERS_TOKEN,
        )
        .await;
        let (put, v) = register(&bus, service, "i1", body.clone(), ORDERS_TOKEN).await;
        let (beat, _) = call(
            &bus,
            reqwest::Method::PUT,
            &format!("/v1/services/{service}/instances/i1/heartbeat"),
            ORDERS_TOKEN,
        )
        .await;
        let (delete, _) = call(
            &bus,
            reqwest::Method::DELETE,
            &format!("/v1/services/{service}/instances/i1"),
            ORDERS_TOKEN,
        )
        .await;
        assert_eq!([get, put, beat, delete], [403; 4], "{service}: {v}");
        assert_eq!(v["error"], "forbidden", "{service}: {v}");
    }

    // A `*` token may learn what exists.
    let (status, _) = call(&bus, reqwest::Method::GET, "/v1/services/nosuch", ALL_TOKEN).await;
    assert_eq!(status, 404);
    let (status, _) = register(&bus, "nosuch", "i1", body.clone(), ALL_TOKEN).await;
    assert_eq!(status, 404);
    let (status, _) = call(
        &bus,
        reqwest::Method::GET,
        "/v1/services/payments",
        ALL_TOKEN,
    )
    .await;
    assert_eq!(status, 200);
    // The admin API is unchanged: it lists every service.
    let admin = get_json(bus.admin_get("/v1/services")).await;
    let text = admin.to_string();
    assert!(
        text.contains("orders") && text.contains("payments"),
        "{admin}"
    );
}

/// A registration as busbar stores it (in etcd and in its snapshot file).
fn stored(id: &str, address: &str, sidecar: Option<&str>) -> Value {
    let mut v = json!({
        "service": "orders",
        "id": id,
        "address": address,
        "weight": 1,
        "ttl_secs": 60,
    });
    if let Some(s) = sidecar {
        v["sidecar"] = json!(s);
    }
    v
}

/// The WARN busbar logs once per refused instance.
const REFUSED_LOG: &str = "registration refused";

fn refused_metric(source: &str, reason: &str) -> String {
    format!("busbar_registrations_refused_total{{reason=\"{reason}\",source=\"{source}\"}}")
}

/// The ids `GET /v1/services/orders` lists on `bus` (sorted).
async fn listed(bus: &Busbar, token: &str) -> Vec<String> {
    let v = get_json(
        client()
            .get(bus.registry_url("/v1/services/orders"))
            .bearer_auth(token),
    )
    .await;
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

/// What admin `/v1/registry` lists as refused: "id field reason source", sorted.
async fn refusals(bus: &Busbar) -> Vec<String> {
    let reg = get_json(bus.admin_get("/v1/registry")).await;
    let mut all: Vec<String> = reg["refused"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let s = |k: &str| r[k].as_str().unwrap_or("?");
                    format!("{} {} {} {}", s("id"), s("field"), s("reason"), s("source"))
                })
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    all
}

/// `n` requests to `/orders/x`: each must be a 200 from `backend`.
async fn all_reach(bus: &Busbar, n: usize, backend: &str) {
    for i in 0..n {
        let r = client().get(bus.url("/orders/x")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.headers()["x-backend"], backend, "request {i}");
    }
}

/// A peer node checks a registration against its own listeners, not this node's; and
/// anyone who can write etcd bypasses every node's API. So what arrives through etcd is
/// checked again here: an instance at this node's own service, admin or registration
/// port, or at the metadata address, is not routed, not listed, logged once and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_from_etcd_are_held_to_this_nodes_address_policy() {
    const TOKEN: &str = "etcd-policy-token";
    let etcd = Etcd::start().await;
    let app = Backend::start("orders-1").await;
    let other = Backend::start("orders-2").await;
    let kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client");
    let put = |id: &str, address: String, sidecar: Option<String>| {
        let key = format!("/busbar-test/services/orders/{id}");
        let value = stored(id, &address, sidecar.as_deref()).to_string();
        let mut kv = kv.clone();
        async move { kv.put(key, value, None).await.expect("etcd put") }
    };
    // Present before the node starts: it arrives through the first listing, not the watch.
    put("early", "[fe80::1]:80".into(), None).await;
    let bus = Busbar::start(&orders_on_etcd(&[etcd.endpoint()], TOKEN, "")).await;
    let metric = |reason: &str| refused_metric("etcd", reason);
    let own = metric("own_listener");
    let link_local = metric("link_local");

    // 1. Only refused instances: the service has none to route to.
    let asked = std::time::Instant::now();
    put("self", bus.http.to_string(), None).await;
    put("admin", bus.admin.to_string(), None).await;
    put("meta", "169.254.169.254:80".into(), None).await;
    put("side", app.addr.to_string(), Some(bus.registry.to_string())).await;
    wait_until(
        "three own-listener and two link-local refusals counted",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async { bus.metric(&own).await == 3.0 && bus.metric(&link_local).await == 2.0 },
    )
    .await;
    eprintln!(
        "4 refused puts counted {:?} after the first",
        asked.elapsed()
    );
    assert!(listed(&bus, TOKEN).await.is_empty());
    let r = client().get(bus.url("/orders/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "no_healthy_instance", "{v}");
    assert_eq!(
        app.hits(),
        0,
        "the instance whose sidecar is ours was not used"
    );
    assert_eq!(
        refusals(&bus).await,
        [
            "admin address own_listener etcd",
            "early address link_local etcd",
            "meta address link_local etcd",
            "self address own_listener etcd",
            "side sidecar own_listener etcd",
        ],
        "the admin API lists what this node refused"
    );

    // 2. A good instance beside them takes all the traffic.
    put("good", app.addr.to_string(), None).await;
    put("flip", other.addr.to_string(), None).await;
    wait_until(
        "good and flip listed",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async { listed(&bus, TOKEN).await == ["flip", "good"] },
    )
    .await;

    // 3. An instance moved to a refused address leaves; the same refusal again is not
    //    logged or counted again (the put after it shows the watch got that far).
    put("meta", "169.254.169.254:80".into(), None).await;
    put("flip", bus.admin.to_string(), None).await;
    wait_until(
        "flip gone",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async { listed(&bus, TOKEN).await == ["good"] },
    )
    .await;
    all_reach(&bus, 20, "orders-1").await;
    assert_eq!(other.hits(), 0, "flip was never sent to once refused");
    assert_eq!(bus.metric(&own).await, 4.0);
    assert_eq!(bus.metric(&link_local).await, 2.0, "meta counted once");
    let logged = bus.stderr().matches(REFUSED_LOG).count();
    assert_eq!(
        logged,
        6,
        "one WARN per refused instance:\n{}",
        bus.stderr()
    );
}

/// The snapshot file is read before anything else on start; one that names this node's
/// listeners (written under another config, or by hand) or the metadata address does not
/// make them routable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_from_the_snapshot_file_are_held_to_the_address_policy() {
    let app = Backend::start("orders-1").await;
    let mut bus = Busbar::start(&config()).await;
    let addr = |a: SocketAddr| a.to_string();
    let snapshot = json!({
        "format": 1,
        "saved_at": "2025-01-01T00:00:00Z",
        "instances": [
            stored("good", &addr(app.addr), None),
            stored("self", &addr(bus.http), None),
            stored("admin", &format!("[::ffff:127.0.0.1]:{}", bus.admin.port()), None),
            stored("meta", "169.254.169.254:80", None),
            stored("side", &addr(app.addr), Some(&addr(bus.registry))),
        ],
    });
    // Nothing is registered, so the running node never writes this file itself.
    std::fs::write(
        bus.dir.path().join("busbar-registry.json"),
        serde_json::to_vec(&snapshot).unwrap(),
    )
    .unwrap();
    bus.kill_and_restart().await;

    assert_eq!(listed(&bus, ORDERS_TOKEN).await, ["good"]);
    all_reach(&bus, 20, "orders-1").await;
    assert_eq!(
        bus.metric(&refused_metric("snapshot", "own_listener"))
            .await,
        3.0
    );
    assert_eq!(
        bus.metric(&refused_metric("snapshot", "link_local")).await,
        1.0
    );
    let logged = bus.stderr().matches(REFUSED_LOG).count();
    assert_eq!(
        logged,
        4,
        "one WARN per refused instance:\n{}",
        bus.stderr()
    );
    assert_eq!(
        refusals(&bus).await,
        [
            "admin address own_listener snapshot",
            "meta address link_local snapshot",
            "self address own_listener snapshot",
            "side sidecar own_listener snapshot",
        ]
    );
    // Registered again through the API, at an address it may have: no longer refused.
    let body = json!({ "address": addr(app.addr) });
    let (status, v) = register(&bus, "orders", "meta", body, ORDERS_TOKEN).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(listed(&bus, ORDERS_TOKEN).await, ["good", "meta"]);
    assert_eq!(refusals(&bus).await.len(), 3);
}

fn check(path: &Path) -> (bool, String) {
    let out = common::check(path);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn static_config(http: &str, admin: &str, endpoint: &str) -> String {
    format!(
        r#"[listen]
http = ["{http}"]
admin = "{admin}"

[[service]]
name = "legacy"
endpoints = [{{ addr = "127.0.0.1:9001" }}, {{ addr = "{endpoint}" }}]

[[route]]
name = "all"
service = "legacy"
"#
    )
}

#[test]
fn busbar_check_refuses_such_static_endpoints_with_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // (listener, admin, endpoint, what the error says)
        (
            "127.0.0.1:18080",
            "127.0.0.1:19901",
            "169.254.169.254:80",
            "link-local",
        ),
        (
            "127.0.0.1:18080",
            "127.0.0.1:19901",
            "[::ffff:169.254.169.254]:80",
            "link-local",
        ),
        (
            "127.0.0.1:18080",
            "127.0.0.1:19901",
            "0.0.0.0:80",
            "unspecified",
        ),
        (
            "127.0.0.1:18080",
            "127.0.0.1:19901",
            "127.0.0.1:18080",
            "busbar itself listens",
        ),
        (
            "127.0.0.1:18080",
            "127.0.0.1:19901",
            "127.0.0.1:19901",
            "busbar itself listens",
        ),
        // A wildcard listener owns its port on every local address.
        (
            "0.0.0.0:18080",
            "127.0.0.1:19901",
            "127.0.0.1:18080",
            "busbar itself listens",
        ),
        (
            "[::]:18080",
            "127.0.0.1:19901",
            "127.0.0.2:18080",
            "busbar itself listens",
        ),
    ];
    for (i, (http, admin, endpoint, says)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        let text = static_config(http, admin, endpoint);
        std::fs::write(&path, &text).unwrap();
        let (ok, stderr) = check(&path);
        assert!(!ok, "{endpoint} with {http} must fail the check");
        let needle = format!("\"{endpoint}\"");
        // The last place: the endpoint is also named earlier in the file.
        let at = text.rfind(&needle).expect("needle in text");
        let (line, col) = common::line_col_at(&text, at);
        let expected = format!(
            "{}:{line}:{col}: service \"legacy\": endpoint ",
            path.display()
        );
        assert!(stderr.contains(&expected), "{stderr:?} lacks {expected:?}");
        assert!(stderr.contains(says), "{stderr:?} lacks {says:?}");
    }
    // Same port on another address than a specific listener's: fine.
    let path = dir.path().join("ok.toml");
    std::fs::write(
        &path,
        static_config("127.0.0.1:18080", "127.0.0.1:19901", "127.0.0.2:18080"),
    )
    .unwrap();
    let (ok, stderr) = check(&path);
    assert!(ok, "{stderr}");
}

#[test]
fn busbar_check_reads_a_tokens_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let with = |addresses: &str| {
        format!(
            "[listen]\nhttp = [\"127.0.0.1:18080\"]\n\n[[registry.token]]\ntoken_sha256 = \"{}\"\nservices = [\"orders\"]\n{addresses}\n\n[[service]]\nname = \"orders\"\nregistration = true\n",
            sha256_hex("x")
        )
    };
    let path = dir.path().join("good.toml");
    std::fs::write(
        &path,
        with("addresses = [\"10.20.0.0/16\", \"fd00::/8\", \"192.168.1.5\"]"),
    )
    .unwrap();
    let (ok, stderr) = check(&path);
    assert!(ok, "{stderr}");
    for (bad, says) in [
        ("addresses = [\"10.20.0.0/33\"]", "not a CIDR"),
        ("addresses = []", "would refuse every instance"),
    ] {
        let path = dir.path().join("bad.toml");
        let text = with(bad);
        std::fs::write(&path, &text).unwrap();
        let (ok, stderr) = check(&path);
        assert!(!ok, "{bad} must fail the check");
        assert!(stderr.contains("[[registry.token]]: "), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}
