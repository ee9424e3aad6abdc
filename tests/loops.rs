//! Forwarding loops and the data plane reaching the control plane (issue 22, part 2).
//!
//! busbar appends its hop to `Via` on every request it sends upstream and answers
//! `508 loop_detected` to a request that has passed it before or has passed more busbar
//! nodes than `[limits] max_hops`; the admin and registration listeners refuse whatever
//! a busbar service listener forwarded. The loops here go through a TCP forwarder or a
//! second busbar, so that no address-based check on the config could see them.

mod common;

use std::time::Duration;

use common::forwarder::Forwarder;
use common::http1;
use common::{client, h2c_client, sha256_hex, Backend, Busbar};
use serde_json::{json, Value};

const TOKEN: &str = "loops-test-token";

/// Services `s` (route `all`, every path) and `r` (route `reg`, for `Host: r`), both
/// taking registrations.
fn registering() -> String {
    format!(
        r#"
[registry]
listen = "{{registry}}"
[[registry.token]]
token_sha256 = "{hash}"
services = ["*"]

[[service]]
name = "s"
registration = true
timeout = "5s"

[[service]]
name = "r"
registration = true

[[route]]
name = "reg"
hosts = ["r"]
service = "r"

[[route]]
name = "all"
service = "s"
"#,
        hash = sha256_hex(TOKEN)
    )
}

async fn register(bus: &Busbar, service: &str, id: &str, addr: std::net::SocketAddr) {
    let r = client()
        .put(bus.registry_url(&format!("/v1/services/{service}/instances/{id}")))
        .bearer_auth(TOKEN)
        .json(&json!({ "address": addr.to_string(), "ttl": 60 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Open file descriptors of a process.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sends raw bytes on a new connection and reads until the close: status line, all.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (String, String) {
    let (text, closed) = http1::exchange(addr, request, Duration::from_secs(20)).await;
    assert!(closed, "an answer in time: {text}");
    (text.lines().next().unwrap_or("").to_string(), text)
}

/// The `error` of a JSON answer.
async fn error_of(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, v["error"].as_str().unwrap_or(&text).to_string())
}

/// Access-log lines once there are `n` (flushed every 200 ms), and still `n` a moment
/// later: each hop a request took is one line.
async fn log_lines(bus: &Busbar, n: usize) -> Vec<String> {
    let lines = || -> Vec<String> { bus.access_log().lines().map(str::to_string).collect() };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lines().len() < n && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    lines()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_comes_back_to_the_same_node_gets_508_and_goes_no_further() {
    let bus = Busbar::start(&registering()).await;
    // An instance of `s` that is busbar itself, behind a forwarder.
    let fwd = Forwarder::start(bus.http, b"/loop").await;
    register(&bus, "s", "me", fwd.addr).await;
    let before = fds(bus.pid());

    // busbar's own HTTP/1.1 path (GET), pingora's (POST with a body, HTTP/1.0), and h2c.
    let r = client().get(bus.url("/loop/get")).send().await.unwrap();
    assert_eq!(error_of(r).await, (508, "loop_detected".into()));
    let r = client()
        .post(bus.url("/loop/post"))
        .body("a body")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (508, "loop_detected".into()));
    let (status, text) = raw(bus.http, b"GET /loop/ten HTTP/1.0\r\n\r\n").await;
    assert!(status.contains(" 508 "), "{text}");
    assert!(text.contains("\"error\":\"loop_detected\""), "{text}");
    let r = h2c_client().get(bus.url("/loop/h2")).send().await.unwrap();
    assert_eq!(error_of(r).await, (508, "loop_detected".into()));
    // More of them: nothing piles up.
    for i in 0..16 {
        let r = client()
            .get(bus.url(&format!("/loop/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 508);
    }
    let sent = 20;
    // Each request went round once: out through the forwarder, back, refused.
    assert_eq!(fwd.carried(), sent, "requests the loop carried");
    let after = fds(bus.pid());
    eprintln!(
        "{sent} looping requests: {} hops carried, open files {before} -> {after}",
        fwd.carried()
    );
    assert!(
        after <= before + 16,
        "open files grew from {before} to {after} for {sent} requests"
    );
    // Two lines a request: the refusal on the way back in, and the 508 it became.
    let lines = log_lines(&bus, 2 * sent).await;
    assert_eq!(lines.len(), 2 * sent, "{lines:#?}");
    let refused = lines
        .iter()
        .filter(|l| l.contains("\"status\":508") && l.contains("\"error\":\"loop_detected\""))
        .count();
    assert_eq!(refused, sent, "{lines:#?}");
    // Half answered by busbar itself (the loop, with its reason), half passed on from
    // the next hop; one of the requests was a POST.
    let text = bus.metrics().await;
    for reason in ["", "loop_detected"] {
        let count = |method: &str| {
            common::metric_value(
                &text,
                &format!(
                    r#"busbar_requests_total{{class="5xx",method="{method}",reason="{reason}",route="all",service="s"}}"#
                ),
            )
        };
        assert_eq!(
            (count("GET"), count("POST")),
            (sent as f64 - 1.0, 1.0),
            "{reason:?}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_that_point_at_each_other_cut_the_loop_within_the_hop_limit() {
    let a = Busbar::start(&registering()).await;
    let b = Busbar::start(&common::one_route(a.http, "", "")).await;
    // A's `s` is B; B's `s` is A.
    register(&a, "s", "b", b.http).await;

    // client → A → B → A: refused there.
    let r = client().get(a.url("/x")).send().await.unwrap();
    assert_eq!(error_of(r).await, (508, "loop_detected".into()));
    // client → B → A → B, with a body on pingora's path.
    let r = client().post(b.url("/y")).body("z").send().await.unwrap();
    assert_eq!(error_of(r).await, (508, "loop_detected".into()));

    // What each node saw: three hops a request, far below the limit of 8.
    let seen_a = log_lines(&a, 3).await;
    let seen_b = log_lines(&b, 3).await;
    assert_eq!(seen_a.len(), 3, "{seen_a:#?}");
    assert_eq!(seen_b.len(), 3, "{seen_b:#?}");
    let looped = |lines: &[String], path: &str| {
        lines
            .iter()
            .filter(|l| l.contains(&format!("\"path\":\"{path}\"")) && l.contains("loop_detected"))
            .count()
    };
    assert_eq!((looped(&seen_a, "/x"), looped(&seen_b, "/x")), (1, 0));
    assert_eq!((looped(&seen_a, "/y"), looped(&seen_b, "/y")), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_proxies_in_via_pass_busbar_appends_its_hop_and_too_many_busbar_hops_are_a_loop() {
    let app = Backend::start("app").await;
    let bus = Busbar::start(&common::one_route(app.addr, "", "")).await;
    let via = |i: usize| {
        app.seen()[i]
            .headers
            .get("via")
            .cloned()
            .unwrap_or_default()
    };

    // Own HTTP/1.1 path.
    let r = client()
        .get(bus.url("/a"))
        .header("via", "1.1 nginx, 1.1 squid")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = via(0);
    let id = first
        .strip_prefix("1.1 nginx, 1.1 squid, 1.1 ")
        .unwrap_or_else(|| panic!("via {first:?}"))
        .to_string();
    assert!(id.starts_with("busbar-") && id.len() == 19, "{id}");
    // Other shapes: a body and HTTP/1.0 (busbar's own engine), h2c (pingora); and no Via.
    let r = client()
        .post(bus.url("/b"))
        .header("via", "1.1 nginx")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(via(1), format!("1.1 nginx, 1.1 {id}"));
    let (status, _) = raw(bus.http, b"GET /c HTTP/1.0\r\n\r\n").await;
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(via(2), format!("1.0 {id}"));
    let r = h2c_client().get(bus.url("/d")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(via(3), format!("2 {id}"));
    let r = client().get(bus.url("/e")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(via(4), format!("1.1 {id}"));
    assert_eq!(app.hits(), 5);

    // Up to 8 other busbar nodes before this one pass; a 9th is a loop, and so is this
    // node's own id, on both paths.
    let hops = |n: usize| {
        (1..=n)
            .map(|i| format!("1.1 busbar-{i:012x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let eight = hops(8);
    let nine = hops(9);
    let own = format!("1.1 proxy, 1.1 {id}");
    for (via, passes) in [(&eight, true), (&nine, false), (&own, false)] {
        let before = app.hits();
        let r = client()
            .get(bus.url("/f"))
            .header("via", via)
            .send()
            .await
            .unwrap();
        let r2 = client()
            .post(bus.url("/g"))
            .header("via", via)
            .body("x")
            .send()
            .await
            .unwrap();
        for r in [r, r2] {
            if passes {
                assert_eq!(r.status(), 200, "{via}");
            } else {
                assert_eq!(error_of(r).await, (508, "loop_detected".into()), "{via}");
            }
        }
        let expected = if passes { before + 2 } else { before };
        assert_eq!(app.hits(), expected, "{via}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_and_registration_apis_never_answer_what_a_service_listener_forwarded() {
    let bus = Busbar::start(&registering()).await;
    // `s` is the admin listener, `r` the registration listener, each behind a forwarder.
    let to_admin = Forwarder::start(bus.admin, b"GET /").await;
    let to_registry = Forwarder::start(bus.registry, b"GET /").await;
    register(&bus, "s", "admin", to_admin.addr).await;
    register(&bus, "r", "registry", to_registry.addr).await;

    for path in ["/v1/registry", "/metrics", "/v1/services", "/healthz"] {
        let r = client().get(bus.url(path)).send().await.unwrap();
        let (status, text) = (r.status(), r.text().await.unwrap());
        assert_eq!(status, 403, "{path}: {text}");
        assert!(text.contains("forwarded_by_busbar"), "{path}: {text}");
        assert!(!text.contains("busbar_requests_total"), "{path}: {text}");
    }
    let r = client()
        .post(bus.url("/v1/reload"))
        .bearer_auth(&bus.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Even with a valid registration token.
    let r = client()
        .get(bus.url("/v1/services"))
        .header("host", "r")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let (status, text) = (r.status(), r.text().await.unwrap());
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("forwarded_by_busbar"), "{text}");
    assert!(!text.contains("\"instances\""), "{text}");
    assert!(to_admin.carried() >= 4 && to_registry.carried() >= 1);

    // Asked directly, both answer as before.
    let r = bus.admin_get("/v1/registry").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(bus.registry_url("/v1/services"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
