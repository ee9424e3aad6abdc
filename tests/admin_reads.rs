//! The admin API's reads that show topology or config history need the admin token
//! unless `[admin] open_reads = true` (issue 24 part 4): refused without it (401), with a
//! wrong one (403), and when the node has none (403); answered with it; open when the
//! file says so, and a reload applies the setting. The health checks, `/metrics` and the
//! console's pages stay open.

mod common;

use common::{client, Backend, Busbar};
use serde_json::Value;

/// Every read that shows topology or config history.
const READS: [&str; 5] = [
    "/v1/routes",
    "/v1/services",
    "/v1/registry",
    "/v1/releases",
    "/v1/config/history",
];

/// What a load balancer, Prometheus or a browser reads without a token.
const OPEN: [&str; 5] = ["/livez", "/readyz", "/healthz", "/metrics", "/console/"];

fn config(backend: std::net::SocketAddr, admin: &str) -> String {
    format!(
        r#"{admin}
[[service]]
name = "secret-svc"
endpoints = [{{ addr = "{backend}" }}]
[[route]]
name = "secret-route"
service = "secret-svc"
path_prefix = "/"
"#
    )
}

/// Status and body of a GET on the admin API, with `token` when given.
async fn get(bus: &Busbar, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = client().get(bus.admin_url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Asserts a refusal in busbar's JSON shape that gives nothing away.
fn refused(path: &str, (status, body): &(u16, String), want: u16, code: &str) {
    assert_eq!(*status, want, "{path}: {body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    assert_eq!(v["error"], code, "{path}: {body}");
    assert!(v["message"].is_string(), "{path}: {body}");
    assert!(!body.contains("secret"), "{path}: {body}");
}

#[tokio::test]
async fn topology_reads_need_the_admin_token() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&config(backend.addr, "")).await;
    for path in READS {
        refused(path, &get(&bus, path, None).await, 401, "unauthorized");
        refused(
            path,
            &get(&bus, path, Some("wrong")).await,
            403,
            "forbidden",
        );
        let (status, body) = get(&bus, path, Some(&bus.token)).await;
        assert_eq!(status, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v.is_object(), "{path}: {body}");
    }
    // With the token, the listings say what runs.
    let (_, routes) = get(&bus, "/v1/routes", Some(&bus.token)).await;
    assert!(routes.contains("secret-route"), "{routes}");
    let (_, services) = get(&bus, "/v1/services", Some(&bus.token)).await;
    assert!(services.contains("secret-svc"), "{services}");
    // Health checks, metrics and the console's pages need none.
    for path in OPEN {
        let (status, body) = get(&bus, path, None).await;
        // `/readyz` may still say 503 while the node probes its own listeners.
        let answered = status == 200 || (path == "/readyz" && status == 503);
        assert!(answered, "{path}: {status} {body}");
    }
}

#[tokio::test]
async fn open_reads_opens_them_and_a_reload_applies_it() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&config(backend.addr, "[admin]\nopen_reads = true\n")).await;
    for path in READS {
        let (status, body) = get(&bus, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (_, services) = get(&bus, "/v1/services", None).await;
    assert!(services.contains("secret-svc"), "{services}");
    // Writes still need the token.
    let r = client()
        .post(bus.admin_url("/v1/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The console's data is never open.
    let (status, _) = get(&bus, "/console/api/services", None).await;
    assert_eq!(status, 401);

    // Closed again by a reload, which says it applied the change.
    bus.write_config(&config(backend.addr, ""), "");
    let r = bus.reload().await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["applied"]
            .as_array()
            .unwrap()
            .contains(&Value::from("admin.open_reads")),
        "{v}"
    );
    for path in READS {
        refused(path, &get(&bus, path, None).await, 401, "unauthorized");
    }
}

#[tokio::test]
async fn without_a_token_configured_the_reads_are_refused() {
    let backend = Backend::start("b").await;
    // An empty BUSBAR_ADMIN_TOKEN is no token.
    let bus =
        Busbar::start_with_env(&config(backend.addr, ""), &[("BUSBAR_ADMIN_TOKEN", "")]).await;
    for path in READS {
        for token in [None, Some(""), Some(bus.token.as_str())] {
            let answer = get(&bus, path, token).await;
            refused(path, &answer, 403, "admin_token_not_configured");
            assert!(answer.1.contains("open_reads"), "{path}: {}", answer.1);
        }
    }
    let (status, _) = get(&bus, "/healthz", None).await;
    assert_eq!(status, 200);
}

/// `GET /v1/services` and the console's `GET /console/api/services` are one listing: the
/// same JSON, with each instance's version, zone, lease and DNS name in both.
#[tokio::test]
async fn the_admin_api_and_the_console_list_services_alike() {
    const TOKEN: &str = "reg-token";
    let backend = Backend::start("b").await;
    let other = Backend::start("c").await;
    let body = format!(
        r#"
[registry]
listen = "{{registry}}"
[[registry.token]]
token_sha256 = "{hash}"
services = ["*"]

[[service]]
name = "orders"
registration = true
[[service]]
name = "named"
endpoints = [{{ addr = "localhost:{port}", version = "v1" }}]
[[route]]
name = "orders"
service = "orders"
path_prefix = "/"
"#,
        hash = common::sha256_hex(TOKEN),
        port = other.addr.port(),
    );
    let bus = Busbar::start(&body).await;
    let r = client()
        .put(bus.registry_url("/v1/services/orders/instances/o1"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({
            "address": backend.addr.to_string(), "version": "v2", "zone": "eu-west-1a", "ttl": 60
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let read = |path: &'static str| {
        let req = bus.admin_get(path);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            let mut v: Value = r.json().await.unwrap();
            // Live numbers that may move between the two reads.
            for s in v["services"].as_array_mut().unwrap() {
                for i in s["instances"].as_array_mut().unwrap() {
                    i["ttl_left_ms"] = Value::Null;
                }
            }
            v
        }
    };
    let admin = read("/v1/services").await;
    let console = read("/console/api/services").await;
    assert_eq!(admin, console);
    let instance = |v: &Value, service: &str| {
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == service)
            .unwrap_or_else(|| panic!("{service}: {v}"))["instances"][0]
            .clone()
    };
    let o1 = instance(&admin, "orders");
    assert_eq!(o1["id"], "o1", "{o1}");
    assert_eq!(o1["version"], "v2", "{o1}");
    assert_eq!(o1["zone"], "eu-west-1a", "{o1}");
    assert_eq!(o1["source"], "registered", "{o1}");
    assert_eq!(o1["ttl_secs"], 60, "{o1}");
    let named = instance(&console, "named");
    assert_eq!(named["source"], "dns", "{named}");
    let name = format!("localhost:{}", other.addr.port());
    assert_eq!(named["dns_name"], name.as_str(), "{named}");
    assert_eq!(named["version"], "v1", "{named}");
}
