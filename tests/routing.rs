//! Routing by host, path, method and header; rewrites; header edits; 404 body.

mod common;

use common::{client, Backend, Busbar};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_path_method_and_header() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "a"
endpoints = [{{ addr = "{a}" }}]
[[service]]
name = "b"
endpoints = [{{ addr = "{b}" }}]
[[service]]
name = "c"
endpoints = [{{ addr = "{c}" }}]

[[route]]
name = "canary"
headers = {{ "x-canary" = "yes" }}
service = "c"
[[route]]
name = "api-host"
hosts = ["api.example.com"]
service = "a"
[[route]]
name = "wild-post"
hosts = ["*.example.com"]
methods = ["POST"]
path_prefix = "/orders"
strip_prefix = true
service = "b"
[[route]]
name = "exact"
path = "/exact"
service = "c"
"#,
        a = a.addr,
        b = b.addr,
        c = c.addr
    ))
    .await;
    let http = client();
    let get = |host: &str, path: &str| http.get(bus.url(path)).header("host", host).send();
    let r = get("api.example.com:8080", "/x").await.unwrap();
    assert_eq!(r.headers()["x-backend"], "a");
    let r = http
        .post(bus.url("/orders/42?x=1"))
        .header("host", "shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-backend"], "b");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["path"], "/42?x=1", "prefix stripped, query kept");
    // GET on the POST-only route falls through to nothing.
    let r = get("shop.example.com", "/orders/42").await.unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "no_route");
    let r = http
        .get(bus.url("/anything"))
        .header("x-canary", "yes")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-backend"], "c");
    let r = get("other.org", "/exact").await.unwrap();
    assert_eq!(r.headers()["x-backend"], "c");
    let r = get("other.org", "/exact/more").await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_replaced_and_edits_applied() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "a"
endpoints = [{{ addr = "{a}" }}]
[[route]]
name = "all"
service = "a"
request_headers = {{ set = {{ "x-via" = "busbar" }}, remove = ["x-secret"] }}
response_headers = {{ set = {{ "x-served-by" = "busbar" }}, remove = ["x-backend"] }}
"#,
        a = a.addr
    ))
    .await;
    let r = client()
        .get(bus.url("/h"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-secret", "s")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("traceparent", "not-a-trace")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-served-by"], "busbar");
    assert!(r.headers().get("x-backend").is_none());
    let seen = a.seen();
    let h = &seen.last().unwrap().headers;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-via"], "busbar");
    assert!(!h.contains_key("x-secret"));
    assert!(
        !h.contains_key("x-hop"),
        "connection-nominated header stripped"
    );
    let tp = &h["traceparent"];
    assert_eq!(tp.len(), 55, "{tp}");
    assert!(tp.starts_with("00-"));

    // A valid traceparent keeps its trace id; the span id is busbar's own.
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    client()
        .get(bus.url("/t"))
        .header("traceparent", incoming)
        .send()
        .await
        .unwrap();
    let seen = a.seen();
    let tp = &seen.last().unwrap().headers["traceparent"];
    assert_eq!(&tp[..36], &incoming[..36]);
    assert_ne!(tp, incoming);
    // The access log carries the same trace id.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let log = bus.access_log();
    let line = log
        .lines()
        .find(|l| l.contains("\"path\":\"/t\""))
        .expect("access log line");
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(v["route"], "all");
    assert_eq!(v["status"], 200);
}
