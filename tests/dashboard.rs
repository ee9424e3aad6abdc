//! The Grafana dashboard (`conf/grafana/busbar.json`) cannot rot: every metric name its
//! queries use (panels, variables, annotations) must be one a running busbar exports.
//! The node is driven through what makes each family appear (requests, a 429, a reload,
//! a registration, a release change, a refused head) and then scraped.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{client, Backend, Busbar};
use serde_json::{json, Value};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/grafana/busbar.json");

/// The keys whose strings are PromQL in a Grafana dashboard.
const QUERY_KEYS: &[&str] = &["expr", "query", "definition"];

/// busbar metric names in a PromQL expression (`busbar_…` identifiers; label names and
/// values never start with it).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("busbar_") {
        // A name starts where the previous character cannot continue an identifier.
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"') {
            names.push(tail[..len].to_string());
        }
        rest = &tail[len..];
    }
    names
}

/// Every (where, metric) the dashboard's queries name.
fn queried(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                let here = m
                    .get("title")
                    .or_else(|| m.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or(at);
                for (k, v) in m {
                    match v {
                        Value::String(s) if QUERY_KEYS.contains(&k.as_str()) => {
                            out.extend(metric_names(s).into_iter().map(|n| (here.to_string(), n)))
                        }
                        _ => walk(v, here, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, at, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, "dashboard", &mut out);
    out
}

/// Sample names in a Prometheus text scrape (histograms as `_bucket`, `_sum`, `_count`).
fn exported(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The dashboard's queries that name a metric the scrape lacks: "panel: metric".
fn missing(dashboard: &Value, scrape: &str) -> Vec<String> {
    let have = exported(scrape);
    let mut seen = BTreeSet::new();
    queried(dashboard)
        .into_iter()
        .filter(|(_, n)| !have.contains(n))
        .map(|(at, n)| format!("{at}: {n}"))
        .filter(|line| seen.insert(line.clone()))
        .collect()
}

fn load_dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("conf/grafana/busbar.json");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

#[test]
fn the_checker_reports_a_query_on_a_metric_busbar_does_not_export() {
    let scrape = "# TYPE busbar_requests_total counter\n\
                  busbar_requests_total{route=\"a\",service=\"s\",class=\"2xx\"} 3\n\
                  busbar_request_duration_seconds_bucket{route=\"a\",le=\"0.5\"} 3\n";
    let good = json!({"panels": [{"title": "ok", "targets": [{"expr":
        "sum(rate(busbar_requests_total[5m])) / histogram_quantile(0.9, sum by (le) (rate(busbar_request_duration_seconds_bucket[5m])))"}]}]});
    assert_eq!(missing(&good, scrape), Vec::<String>::new());
    let bad = json!({"panels": [{"title": "typo", "targets": [{"expr":
        "sum(rate(busbar_request_total{route=\"busbar_x\"}[5m]))"}]}],
        "templating": {"list": [{"name": "node", "query": {"query": "label_values(busbar_nodes_up, instance)"}}]}});
    assert_eq!(
        missing(&bad, scrape),
        vec!["typo: busbar_request_total", "node: busbar_nodes_up"]
    );
    // The shipped dashboard with one query pointed at a name that does not exist.
    let mut d = load_dashboard();
    let first = d["panels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p.get("targets").is_some())
        .unwrap();
    first["targets"][0]["expr"] = json!("sum(rate(busbar_no_such_metric_total[5m]))");
    let title = first["title"].as_str().unwrap().to_string();
    let everything: String = queried(&load_dashboard())
        .into_iter()
        .map(|(_, n)| format!("{n} 1\n"))
        .collect();
    assert_eq!(
        missing(&d, &everything),
        vec![format!("{title}: busbar_no_such_metric_total")]
    );
}

#[test]
fn the_dashboard_covers_what_issue_26_asks_for() {
    let names: BTreeSet<String> = queried(&load_dashboard())
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    for family in [
        "busbar_requests_total",                  // traffic by route and status class
        "busbar_request_duration_seconds_bucket", // latency percentiles
        "busbar_instances",                       // upstream health
        "busbar_outlier_ejections_total",         // ejections
        "busbar_admission_decisions_total",       // 429/503 by reason
        "busbar_queue_waiting",                   // queue depth
        "busbar_registry_self_preservation",      // registry
        "busbar_registry_degraded",
        "busbar_version_requests_total", // releases
        "busbar_release_changes_total",
        "busbar_config_reloads_total", // reloads
    ] {
        assert!(
            names.contains(family),
            "the dashboard has no query on {family}"
        );
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let v1 = Backend::start("v1").await;
    let v2 = Backend::start("v2").await;
    // A cluster node: its Redis gauges exist only with [cluster] configured.
    let redis = common::redis::Redis::start().await;
    let body = format!(
        r#"
[cluster]
redis = "{redis}"
sync_interval = "100ms"

[registry]
listen = "{{registry}}"
[[registry.token]]
token_env = "BUSBAR_TOKEN_API"
services = ["api"]

[[service]]
name = "api"
registration = true
max_in_flight = 8
endpoints = [{{ addr = "{v1}", version = "v1" }}, {{ addr = "{v2}", version = "v2" }}]
[service.health]
type = "http"
path = "/healthz"
interval = "1s"

[[route]]
name = "api"
service = "api"
[route.admission]
rate_limit = {{ rate = "3/m", burst = 3 }}
[route.split]
stable = "v1"
weights = {{ v2 = 50 }}
"#,
        v1 = v1.addr,
        v2 = v2.addr,
        redis = redis.url()
    );
    let bus = Busbar::start_with_env(&body, &[("BUSBAR_TOKEN_API", "reg-token")]).await;
    let c = client();

    // Traffic, and a 429 from the route's rate limit.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(c.get(bus.url("/x")).send().await.unwrap().status().as_u16());
    }
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
    // A registration, a release change, a reload.
    let r = c
        .put(bus.registry_url("/v1/services/api/instances/api-3"))
        .bearer_auth("reg-token")
        .body(format!(
            r#"{{"address":"{}","version":"v2","ttl":30}}"#,
            v2.addr
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "registration: {}", r.status());
    let r = c
        .put(bus.admin_url("/v1/releases/api"))
        .bearer_auth(&bus.token)
        .body(r#"{"stable":"v1","weights":{"v2":10}}"#)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "release: {}", r.status());
    assert!(bus.reload().await.status().is_success());
    // A head the front door refuses (obs-fold): 400.
    let mut s = std::net::TcpStream::connect(bus.http).unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = [0u8; 12];
    let _ = s.read(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    // Gauges sampled by background tasks (health, queues) appear within a few seconds.
    let dashboard = load_dashboard();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut gaps;
    loop {
        gaps = missing(&dashboard, &bus.metrics().await);
        if gaps.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        gaps.is_empty(),
        "the dashboard queries metrics busbar does not export:\n  {}",
        gaps.join("\n  ")
    );
    println!(
        "{} metric names in the dashboard, all exported",
        queried(&dashboard)
            .into_iter()
            .map(|(_, n)| n)
            .collect::<BTreeSet<_>>()
            .len()
    );
}
