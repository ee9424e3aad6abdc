//! Protocols on each side: h2c and TLS (ALPN h2) downstream, h2c upstream.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{client, h2c_client, Backend, Busbar};
use reqwest::Version;
use serde_json::Value;

fn one_service(addr: SocketAddr, protocol: &str) -> String {
    common::one_route(addr, "", &format!(r#"protocol = "{protocol}""#))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_downstream_to_an_http1_service() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "http1")).await;
    let r = h2c_client().get(bus.url("/over-h2c")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.version(),
        Version::HTTP_2,
        "the client spoke h2c to busbar"
    );
    assert_eq!(r.headers()["x-backend"], "a");
    let seen = a.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, "HTTP/1.1");
    assert_eq!(seen[0].path, "/over-h2c");
    assert_eq!(seen[0].headers["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_negotiates_h2_with_alpn() {
    let a = Backend::start("a").await;
    let certs = tempfile::tempdir().unwrap();
    let (bus, tls, cert_pem) =
        common::tls::busbar_with_tls(&one_service(a.addr, "http1"), certs.path()).await;

    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .https_only(true)
        .resolve("localhost", tls)
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap();
    let r = https
        .get(format!("https://localhost:{}/secure?q=1", tls.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), Version::HTTP_2, "ALPN chose h2");
    assert_eq!(r.headers()["x-backend"], "a");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["path"], "/secure?q=1");
    let seen = a.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=https");
    assert_eq!(seen[0].version, "HTTP/1.1");

    // The plain port next to it still speaks plain HTTP.
    let r = client().get(bus.url("/plain")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(a.seen()[1].headers["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstream_from_an_http1_client() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "h2c")).await;
    let http = client();
    for i in 0..3 {
        let r = http
            .post(bus.url(&format!("/up/{i}")))
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.version(),
            Version::HTTP_11,
            "the client spoke HTTP/1.1 to busbar"
        );
        assert_eq!(r.headers()["x-backend"], "a");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["body_bytes"], 7);
    }
    let seen = a.seen();
    assert_eq!(seen.len(), 3);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(
            s.version, "HTTP/2.0",
            "request {i} reached the backend over h2c"
        );
        assert_eq!(s.method, "POST");
        assert_eq!(s.path, format!("/up/{i}"));
        assert_eq!(s.body, b"payload");
    }
}
