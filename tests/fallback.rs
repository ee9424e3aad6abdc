//! Mesh fallback: a provider's sidecar dies and busbar goes straight to its app port;
//! a caller whose sidecar died reaches services through busbar by name.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::forwarder::Forwarder;
use common::{client, get_json, sha256_hex, Backend, Busbar};
use serde_json::{json, Value};

const TOKEN: &str = "mesh-test-token";

fn config(extra_service: &str) -> String {
    format!(
        r#"
[registry]
listen = "{{registry}}"
[[registry.token]]
token_sha256 = "{hash}"
services = ["*"]

[mesh]
domains = ["svc.cluster.local"]

[[service]]
name = "orders"
registration = true
prefer = "sidecar"
hold_down = "2s"
[service.health]
type = "http"
path = "/healthz"
interval = "100ms"
timeout = "500ms"
healthy_threshold = 1
unhealthy_threshold = 1
{extra_service}

[[route]]
name = "api"
path_prefix = "/api"
service = "orders"
"#,
        hash = sha256_hex(TOKEN)
    )
}

async fn register(bus: &Busbar, service: &str, id: &str, body: Value) {
    let r = client()
        .put(bus.registry_url(&format!("/v1/services/{service}/instances/{id}")))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sidecar_sends_traffic_straight_to_the_app_and_back_after_hold_down() {
    let app = Backend::start("orders-app").await;
    let mut sidecar = Forwarder::start(app.addr, b"GET /api/work").await;
    let bus = Busbar::start(&config("")).await;
    register(
        &bus,
        "orders",
        "o1",
        json!({ "address": app.addr.to_string(), "sidecar": sidecar.addr.to_string(), "ttl": 60 }),
    )
    .await;

    // A steady stream of idempotent requests, counting failures.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let stream = tokio::spawn({
        let (stop, failures, sent, url) = (
            stop.clone(),
            failures.clone(),
            sent.clone(),
            bus.url("/api/work"),
        );
        async move {
            let c = client();
            while !stop.load(Ordering::SeqCst) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => {
                        eprintln!("failed: {}", r.status());
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    // Wait until traffic flows through the sidecar.
    let deadline = Instant::now() + Duration::from_secs(3);
    while sidecar.carried() < 5 {
        assert!(Instant::now() < deadline, "no traffic through the sidecar");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Kill the sidecar: requests keep succeeding, straight to the app.
    sidecar.stop().await;
    let hits_at_kill = app.hits();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        app.hits() > hits_at_kill + 10,
        "the app did not receive direct traffic"
    );
    let m = bus.metrics().await;
    assert!(
        common::metric_value(
            &m,
            r#"busbar_fallback_requests_total{reason="sidecar_down",service="orders"}"#
        ) > 0.0,
        "fallback not counted"
    );
    let v = get_json(
        client()
            .get(bus.registry_url("/v1/services/orders"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(v["instances"][0]["path"], "direct", "{v}");
    assert_eq!(v["instances"][0]["sidecar"]["up"], false, "{v}");

    // The sidecar comes back: traffic returns through it only after the 2 s hold-down.
    sidecar.restart().await;
    let back = Instant::now();
    let carried_at_restart = sidecar.carried();
    let deadline = back + Duration::from_secs(6);
    while sidecar.carried() == carried_at_restart {
        assert!(
            Instant::now() < deadline,
            "traffic never returned to the sidecar"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = back.elapsed();
    assert!(
        after >= Duration::from_millis(1900),
        "returned after {after:?}, before the hold-down"
    );

    stop.store(true, Ordering::SeqCst);
    stream.await.unwrap();
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "client-visible errors out of {}\n{}",
        sent.load(Ordering::SeqCst),
        bus.stderr()
    );
    let m = bus.metrics().await;
    assert!(
        common::metric_value(
            &m,
            r#"busbar_instance_path_switches_total{service="orders",to="direct"}"#
        ) >= 1.0
    );
    assert!(
        common::metric_value(
            &m,
            r#"busbar_instance_path_switches_total{service="orders",to="sidecar"}"#
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_reach_services_by_name_and_nothing_else() {
    let app = Backend::start("orders-app").await;
    let bus = Busbar::start(&config("")).await;
    register(
        &bus,
        "orders",
        "o1",
        json!({ "address": app.addr.to_string(), "ttl": 60 }),
    )
    .await;

    // HTTP_PROXY style: absolute-form request line.
    let proxied = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(bus.url("")).unwrap())
        .build()
        .unwrap();
    let r = proxied.get("http://orders/hello?x=1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-backend"], "orders-app");
    let seen = app.seen();
    assert_eq!(
        seen.last().unwrap().path,
        "/hello?x=1",
        "origin form upstream"
    );

    // Host: <service>.<mesh domain>, with a port.
    let r = client()
        .get(bus.url("/hello"))
        .header("host", "orders.svc.cluster.local:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-backend"], "orders-app");

    // h2 with :authority orders.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve("orders", bus.http)
        .build()
        .unwrap();
    let r = h2
        .get(format!("http://orders:{}/grpc-ish", bus.http.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.headers()["x-backend"], "orders-app");

    // Unknown names: 404 for HTTP, never a connection anywhere else.
    let r = proxied.get("http://example.com/").send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .get(bus.url("/x"))
        .header("host", "payments")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let m = bus.metrics().await;
    assert!(
        common::metric_value(
            &m,
            r#"busbar_fallback_requests_total{reason="forward_proxy",service="orders"}"#
        ) >= 1.0
    );
    assert!(
        common::metric_value(
            &m,
            r#"busbar_fallback_requests_total{reason="host",service="orders"}"#
        ) >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_only_to_registered_services() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let tls = common::tls::TlsBackend::start("orders").await;
    let bus = Busbar::start(&config("")).await;
    register(
        &bus,
        "orders",
        "o1",
        json!({ "address": tls.addr.to_string(), "ttl": 60 }),
    )
    .await;

    // Not a service: 403, and busbar opened nothing.
    let mut s = tokio::net::TcpStream::connect(bus.http).await.unwrap();
    s.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // A target made to break the access log's JSON is refused and written escaped.
    const HOSTILE: &str = r#"x"},{"status":200,"y:443"#;
    let mut s = tokio::net::TcpStream::connect(bus.http).await.unwrap();
    s.write_all(format!("CONNECT {HOSTILE} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // A registered service: TLS end to end through the tunnel (HTTPS through HTTP_PROXY).
    let c = reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(bus.url("")).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(tls.cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = c.get("https://orders/secure").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tls ok: /secure");
    let m = bus.metrics().await;
    assert!(
        common::metric_value(
            &m,
            r#"busbar_fallback_requests_total{reason="connect",service="orders"}"#
        ) >= 1.0
    );
    assert!(common::metric_value(&m, "busbar_connect_refused_total") >= 1.0);
    assert_eq!(
        common::metric_value(
            &m,
            r#"busbar_requests_total{class="4xx",method="CONNECT",reason="not_a_service",route="_no_route",service=""}"#
        ),
        2.0,
        "{m}"
    );

    // Each CONNECT has its access log line: the refusal at once, the tunnel once it
    // closes (the client's pooled connection goes with the client).
    drop(c);
    let connects = || -> Vec<Value> {
        bus.access_log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["method"] == "CONNECT")
            .collect()
    };
    let logged = common::eventually(Duration::from_secs(10), || connects().len() == 3).await;
    let lines = connects();
    assert!(logged, "{}", bus.access_log());
    let refused: Vec<&Value> = lines.iter().filter(|e| e["status"] == 403).collect();
    assert_eq!(refused.len(), 2, "{lines:?}");
    assert_eq!(refused[1]["host"], HOSTILE);
    let refused = refused[0];
    assert_eq!(refused["host"], "example.com:443");
    assert_eq!(refused["error"], "not_a_service");
    assert_eq!(refused["service"], "");
    let tunnel = lines
        .iter()
        .find(|e| e["status"] == 200)
        .expect("the tunnel's line");
    assert_eq!(tunnel["host"], "orders:443");
    assert_eq!(tunnel["service"], "orders");
    assert_eq!(tunnel["instance"], tls.addr.to_string());
    assert!(tunnel["error"].is_null(), "{tunnel}");
    // The TLS handshake and the answer came back through it.
    assert!(tunnel["bytes"].as_u64().unwrap() > 100, "{tunnel}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_with_the_service_as_authority_reaches_the_provider() {
    use busbar_testkit::pb::bookstore_client::BookstoreClient;
    use busbar_testkit::pb::PingRequest;

    let grpc = busbar_testkit::GrpcBackend::start(7).await;
    let bus = Busbar::start(&config(
        "[[service]]\nname = \"bookstore\"\nregistration = true\nprotocol = \"h2c\"\n",
    ))
    .await;
    register(
        &bus,
        "bookstore",
        "b1",
        json!({ "address": grpc.addr.to_string(), "ttl": 60 }),
    )
    .await;

    // The caller's sidecar is gone: it dials busbar, and its :authority names the service.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", bus.http))
        .unwrap()
        .origin("http://bookstore".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let reply = BookstoreClient::new(channel)
        .ping(PingRequest {
            text: "by name".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", bus.stderr()));
    assert_eq!(reply.get_ref().text, "by name");
    assert_eq!(reply.get_ref().served_by, 7);
    assert_eq!(grpc.calls().len(), 1);
    let m = bus.metrics().await;
    assert!(
        common::metric_value(
            &m,
            r#"busbar_fallback_requests_total{reason="host",service="bookstore"}"#
        ) >= 1.0
    );
}

/// A JSON→gRPC route goes through the same plan and tries as any route: its provider's
/// sidecar carries the call while it lives, and when it dies the call goes straight to
/// the app port (counted as a fallback), not to a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_translated_route_falls_back_to_the_app_port_when_the_sidecar_dies() {
    const MARK: &[u8] = b"through-the-mesh";
    let app = busbar_testkit::GrpcBackend::start(1).await;
    let mut sidecar = Forwarder::start(app.addr, MARK).await;
    let proto = format!(
        "{}/tests/protos/bookstore.proto",
        env!("CARGO_MANIFEST_DIR")
    );
    let bus = Busbar::start(&format!(
        r#"
[registry]
listen = "{{registry}}"
[[registry.token]]
token_sha256 = "{hash}"
services = ["*"]

[[service]]
name = "books"
protocol = "h2c"
registration = true
prefer = "sidecar"
hold_down = "2s"

[[route]]
name = "ping"
path = "/ping"
service = "books"
[route.translate]
from = "json"
protos = ["{proto}"]
method = "bookstore.v1.Bookstore/Ping"
"#,
        hash = sha256_hex(TOKEN)
    ))
    .await;
    register(
        &bus,
        "books",
        "b1",
        json!({ "address": app.addr.to_string(), "sidecar": sidecar.addr.to_string(), "ttl": 60 }),
    )
    .await;
    let ping = || async {
        let r = client()
            .post(bus.url("/ping"))
            .json(&json!({ "text": "through-the-mesh" }))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };

    // While the sidecar lives, the call goes through it.
    let (status, body) = ping().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sidecar.carried(),
        1,
        "the call did not go through the sidecar"
    );

    // The sidecar dies: calls reach the app port directly. The first call after the kill
    // may find the pooled connection to the sidecar just closing; calls after it succeed.
    sidecar.stop().await;
    let calls_at_kill = app.calls().len();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failed = 0;
    loop {
        let (status, body) = ping().await;
        if status == 200 {
            break;
        }
        failed += 1;
        assert!(failed <= 1, "{status} {body}");
        assert!(
            Instant::now() < deadline,
            "never reached the app: {status} {body}"
        );
    }
    for _ in 0..3 {
        let (status, body) = ping().await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(sidecar.carried(), 1);
    assert!(
        app.calls().len() >= calls_at_kill + 4,
        "the app did not get the calls"
    );
    let m = bus.metrics().await;
    assert!(
        common::metric_value(
            &m,
            r#"busbar_fallback_requests_total{reason="sidecar_down",service="books"}"#
        ) > 0.0,
        "fallback not counted"
    );
    // Which saw the sidecar die first, a refused connect or the sidecar's probe, is a
    // race; either way the instance's path switched to its app port, once.
    assert_eq!(
        common::metric_value(
            &m,
            r#"busbar_instance_path_switches_total{service="books",to="direct"}"#
        ),
        1.0,
        "the switch to the app port was not counted"
    );
}
