//! Metrics an operator expects (issue 24 part 4), scraped from the real binary's
//! `/metrics`: the process collector, build info, when and which config was loaded,
//! `route="_no_route"` for unmatched requests, series of removed routes and services
//! gone after a reload, and the Redis gauges only where Redis is configured.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use common::{client, metric_value, Backend, Busbar};

fn two_routes(backend: SocketAddr) -> String {
    format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{backend}" }}]
[[service]]
name = "old"
endpoints = [{{ addr = "{backend}" }}]
[[route]]
name = "keep"
service = "s"
path_prefix = "/keep"
[[route]]
name = "gone"
service = "old"
path_prefix = "/gone"
"#
    )
}

fn one_route(backend: SocketAddr) -> String {
    format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{backend}" }}]
[[route]]
name = "keep"
service = "s"
path_prefix = "/keep"
"#
    )
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The sample lines (not comments) of `text` that start with `prefix`.
fn samples<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .collect()
}

/// Polls `/metrics` until `done` holds on its text, or 10 s; returns the last text.
async fn metrics_until(bus: &Busbar, done: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let text = bus.metrics().await;
        if done(&text) || Instant::now() > until {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn process_build_and_config_metrics() {
    let backend = Backend::start("b").await;
    let before = now_secs();
    let bus = Busbar::start(&one_route(backend.addr)).await;
    let text = bus.metrics().await;

    // The process collector: this process' fds, memory, CPU and start time.
    assert!(metric_value(&text, "process_open_fds") > 0.0, "{text}");
    assert!(
        metric_value(&text, "process_resident_memory_bytes") > 1e6,
        "{text}"
    );
    assert!(
        samples(&text, "process_cpu_seconds_total ").len() == 1,
        "{text}"
    );
    let started = metric_value(&text, "process_start_time_seconds");
    // Whole seconds, from the kernel's boot time and clock ticks: ±2 s of our clock.
    assert!(
        (before - 2.0..=now_secs() + 2.0).contains(&started),
        "start {started} not ≈ {before}: {text}"
    );

    // Build info: the package version and a commit (a hash here, in a git checkout).
    let info = samples(&text, "busbar_build_info{");
    assert_eq!(info.len(), 1, "{text}");
    assert!(
        info[0].contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{}",
        info[0]
    );
    assert!(info[0].contains("commit=\""), "{}", info[0]);
    assert!(!info[0].contains("commit=\"\""), "{}", info[0]);
    assert!(info[0].ends_with(" 1"), "{}", info[0]);

    // The config: loaded at start, and its hash.
    let loaded = metric_value(&text, "busbar_config_last_reload_success_timestamp_seconds");
    assert!(
        (before - 1.0..=now_secs() + 1.0).contains(&loaded),
        "loaded {loaded}: {text}"
    );
    let hash = metric_value(&text, "busbar_config_hash");
    assert!(hash > 0.0, "{text}");

    // A reload moves the timestamp; a changed file changes the hash, the same file not.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(bus.reload().await.status(), 200);
    let text = bus.metrics().await;
    let reloaded = metric_value(&text, "busbar_config_last_reload_success_timestamp_seconds");
    assert!(reloaded > loaded + 1.0, "{loaded} → {reloaded}");
    assert_eq!(metric_value(&text, "busbar_config_hash"), hash);

    bus.write_config(&format!("{}\n# changed\n", one_route(backend.addr)), "");
    assert_eq!(bus.reload().await.status(), 200);
    let changed = metric_value(&bus.metrics().await, "busbar_config_hash");
    assert!(changed > 0.0 && changed != hash, "{hash} → {changed}");

    // A refused reload moves neither.
    let before_bad = bus.metrics().await;
    bus.write_config("[[route]]\nname = \"x\"\nservice = \"missing\"\n", "");
    assert_ne!(bus.reload().await.status(), 200);
    let after_bad = bus.metrics().await;
    for m in [
        "busbar_config_last_reload_success_timestamp_seconds",
        "busbar_config_hash",
    ] {
        assert_eq!(
            metric_value(&before_bad, m),
            metric_value(&after_bad, m),
            "{m}"
        );
    }
}

#[tokio::test]
async fn unmatched_requests_count_under_no_route() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr)).await;
    for _ in 0..3 {
        let r = client().get(bus.url("/nowhere")).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    let sample = r#"busbar_requests_total{class="4xx",method="GET",reason="no_route",route="_no_route",service=""}"#;
    assert_eq!(bus.metric_settled(sample, 3.0).await, 3.0);
    let text = bus.metrics().await;
    assert!(!text.contains(r#"route="""#), "{text}");
}

#[tokio::test]
async fn a_reload_removes_the_series_of_removed_routes_and_services() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&two_routes(backend.addr)).await;
    for path in ["/keep", "/gone"] {
        let r = client().get(bus.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let kept =
        r#"busbar_requests_total{class="2xx",method="GET",reason="",route="keep",service="s"}"#;
    let gone =
        r#"busbar_requests_total{class="2xx",method="GET",reason="",route="gone",service="old"}"#;
    assert_eq!(bus.metric_settled(gone, 1.0).await, 1.0);
    assert_eq!(bus.metric_settled(kept, 1.0).await, 1.0);
    let text = bus.metrics().await;
    assert!(text.contains(r#"route="gone""#), "{text}");
    assert!(text.contains(r#"service="old""#), "{text}");

    bus.write_config(&one_route(backend.addr), "");
    assert_eq!(bus.reload().await.status(), 200);
    let text = metrics_until(&bus, |t| !t.contains(r#"route="gone""#)).await;
    assert!(!text.contains(r#"route="gone""#), "{text}");
    assert!(!text.contains(r#"service="old""#), "{text}");
    // What still runs keeps its series and counts.
    assert_eq!(metric_value(&text, kept), 1.0, "{text}");
    assert!(
        text.contains(r#"busbar_instances{service="s",state="healthy"}"#),
        "{text}"
    );

    // The route back under another service: a fresh series, and none of the old pair.
    bus.write_config(
        &two_routes(backend.addr).replace("service = \"old\"", "service = \"s\""),
        "",
    );
    assert_eq!(bus.reload().await.status(), 200);
    let r = client().get(bus.url("/gone")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let moved =
        r#"busbar_requests_total{class="2xx",method="GET",reason="",route="gone",service="s"}"#;
    assert_eq!(bus.metric_settled(moved, 1.0).await, 1.0);
    // Service "old" is back (unused), but not as route "gone"'s service.
    let text = metrics_until(&bus, |t| t.contains(r#"busbar_instances{service="old""#)).await;
    assert!(text.contains(r#"busbar_instances{service="old""#), "{text}");
    assert!(!text.contains(r#"route="gone",service="old""#), "{text}");
}

#[tokio::test]
async fn redis_gauges_only_with_redis_configured() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr)).await;
    let text = bus.metrics().await;
    for name in [
        "busbar_ratelimit_redis_up",
        "busbar_ratelimit_redis_shards_down",
        "busbar_cluster_live_nodes",
    ] {
        assert!(!text.contains(name), "{name} without [cluster]: {text}");
    }

    // A reload that adds [cluster] brings them, with Redis up; one that removes it, not.
    let redis = common::redis::Redis::start().await;
    let with_cluster = format!(
        "[cluster]\nredis = \"{}\"\nsync_interval = \"100ms\"\n{}",
        redis.url(),
        one_route(backend.addr)
    );
    bus.write_config(&with_cluster, "");
    assert_eq!(bus.reload().await.status(), 200);
    let up = "busbar_ratelimit_redis_up";
    let text = metrics_until(&bus, |t| metric_value(t, up) == 1.0).await;
    assert_eq!(metric_value(&text, up), 1.0, "{text}");
    assert_eq!(
        samples(&text, "busbar_ratelimit_redis_shards_down ").len(),
        1
    );
    bus.write_config(&one_route(backend.addr), "");
    assert_eq!(bus.reload().await.status(), 200);
    assert!(!bus.metrics().await.contains(up));
}

#[tokio::test]
async fn methods_are_bounded_and_bytes_are_counted_per_route() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr)).await;

    // Three methods; FOO (any token is a method) counts as `other`.
    for method in ["GET", "POST", "FOO", "FOO"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = client().request(m, bus.url("/keep")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{method}");
    }
    let sample = |method: &str| {
        format!(
            r#"busbar_requests_total{{class="2xx",method="{method}",reason="",route="keep",service="s"}}"#
        )
    };
    assert_eq!(bus.metric_settled(&sample("other"), 2.0).await, 2.0);
    let text = bus.metrics().await;
    for (method, n) in [("GET", 1.0), ("POST", 1.0), ("PUT", 0.0)] {
        assert_eq!(metric_value(&text, &sample(method)), n, "{method}: {text}");
    }
    assert!(!text.contains(r#"method="FOO""#), "{text}");
    // One family: the label is on busbar_requests_total itself.
    assert!(!text.contains("busbar_requests_by_method_total"), "{text}");
    // busbar's own answers carry it too.
    let r = client().delete(bus.url("/nowhere")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let no_route = r#"busbar_requests_total{class="4xx",method="DELETE",reason="no_route",route="_no_route",service=""}"#;
    assert_eq!(bus.metric_settled(no_route, 1.0).await, 1.0);

    // Bytes: what the client sent in bodies and what it read back, on both protocols.
    let up = "busbar_request_body_bytes_total{route=\"keep\"}";
    let down = "busbar_response_body_bytes_total{route=\"keep\"}";
    let (up0, down0) = (metric_value(&text, up), metric_value(&text, down));
    assert_eq!(up0, 0.0, "{text}");
    let mut read = 0usize;
    for (size, h2) in [(1000usize, false), (70_000, false), (5000, true)] {
        let c = if h2 { common::h2c_client() } else { client() };
        let r = c
            .post(bus.url("/keep"))
            .body(vec![b'x'; size])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        read += r.bytes().await.unwrap().len();
    }
    let sent = 1000.0 + 70_000.0 + 5000.0;
    assert_eq!(bus.metric_settled(up, sent).await, sent);
    let want = down0 + read as f64;
    assert!(read > 0);
    assert_eq!(bus.metric_settled(down, want).await, want);
}

/// The `method` label's values in a scrape's `busbar_requests_total` samples of `route`,
/// with the sum of their counts.
fn methods_of(text: &str, route: &str) -> (std::collections::BTreeSet<String>, f64) {
    let mut methods = std::collections::BTreeSet::new();
    let mut total = 0.0;
    for line in samples(text, "busbar_requests_total{") {
        if !line.contains(&format!("route=\"{route}\"")) {
            continue;
        }
        let method = line
            .split("method=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no method label: {line}"));
        methods.insert(method.to_string());
        total += line.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    }
    (methods, total)
}

#[tokio::test]
async fn random_methods_make_at_most_ten_method_values() {
    use rand::Rng;
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr)).await;
    const STANDARD: [&str; 8] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH",
    ];
    let mut rng = rand::rng();
    let c = client();
    let mut sent = std::collections::BTreeSet::new();
    for _ in 0..100 {
        // Half standard methods, half random tokens (letters, 1 to 12 of them).
        let method = if rng.random_bool(0.5) {
            STANDARD[rng.random_range(0..STANDARD.len())].to_string()
        } else {
            let len = rng.random_range(1..=12);
            (0..len)
                .map(|_| char::from(rng.random_range(b'A'..=b'Z')))
                .collect()
        };
        sent.insert(method.clone());
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = c.request(m, bus.url("/keep")).send().await.unwrap();
        r.bytes().await.unwrap();
    }
    assert!(sent.len() > 10, "the test sent only {sent:?}");
    let text = metrics_until(&bus, |t| methods_of(t, "keep").1 == 100.0).await;
    let (methods, total) = methods_of(&text, "keep");
    assert_eq!(total, 100.0, "{text}");
    assert!(methods.len() <= 10, "{methods:?}");
    let allowed = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other",
    ];
    for m in &methods {
        assert!(allowed.contains(&m.as_str()), "{m}: {text}");
    }
    assert!(methods.contains("other"), "{methods:?}");
}

#[tokio::test]
async fn a_metrics_listener_serves_metrics_and_nothing_else() {
    let backend = Backend::start("b").await;
    let port = common::free_port();
    let bus = Busbar::start_with_header(
        &one_route(backend.addr),
        &format!("metrics = \"127.0.0.1:{port}\""),
    )
    .await;
    let r = client().get(bus.url("/keep")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let sample =
        r#"busbar_requests_total{class="2xx",method="GET",reason="",route="keep",service="s"}"#;
    let until = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let r = client().get(url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        if metric_value(&text, sample) == 1.0 || Instant::now() > until {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric_value(&text, sample), 1.0, "{text}");
    // The admin API's reads and calls are not there.
    for path in [
        "/v1/routes",
        "/v1/services",
        "/healthz",
        "/v1/config/history",
    ] {
        let r = client().get(url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let body = r.text().await.unwrap();
        assert!(body.contains("\"error\""), "{path}: {body}");
        assert!(!body.contains("keep"), "{path}: {body}");
    }
    let r = client()
        .post(url("/v1/reload"))
        .bearer_auth(&bus.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The admin listener still serves it too.
    assert_eq!(bus.metric(sample).await, 1.0);
}

#[tokio::test]
async fn upstream_connections_count_pool_hits_and_new_ones_per_service() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr)).await;
    let pool = r#"busbar_upstream_connections_total{from="pool",service="s"}"#;
    let new = r#"busbar_upstream_connections_total{from="new",service="s"}"#;
    // HTTP/1.1 GETs (busbar's own path), then h2c (pingora's): each path opens one
    // connection and reuses it for the next requests, one after another.
    let h1 = client();
    for _ in 0..3 {
        let r = h1.get(bus.url("/keep")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(bus.metric_settled(new, 1.0).await, 1.0);
    assert_eq!(bus.metric_settled(pool, 2.0).await, 2.0);
    // The connection is back in busbar's own pool, idle (sampled each second).
    let idle = r#"busbar_upstream_idle_connections{service="s"}"#;
    let text = metrics_until(&bus, |t| metric_value(t, idle) == 1.0).await;
    assert_eq!(metric_value(&text, idle), 1.0, "{text}");
    let h2 = common::h2c_client();
    for _ in 0..3 {
        let r = h2.get(bus.url("/keep")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let text = metrics_until(&bus, |t| {
        metric_value(t, new) + metric_value(t, pool) == 6.0
    })
    .await;
    let (n, p) = (metric_value(&text, new), metric_value(&text, pool));
    assert_eq!(n + p, 6.0, "{text}");
    assert!((1.0..=2.0).contains(&n), "new {n}: {text}");
}
