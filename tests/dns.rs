//! Endpoints that follow DNS (issue 27), against a real DNS server (dnsmasq) started by
//! the test: every A record an instance, re-resolved on the TTL without a reload, the
//! last good answer kept when DNS fails.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::wait_until;
use common::dns::Dnsmasq;
use common::{client, free_port, get_json, Backend, Busbar};

/// Backends named `b2`, `b3`, ... on 127.0.0.`n`, all on one port (as behind one name).
async fn backends_on(port: u16, hosts: &[u8]) -> HashMap<u8, Backend> {
    let mut out = HashMap::new();
    for &n in hosts {
        let addr: SocketAddr = format!("127.0.0.{n}:{port}").parse().unwrap();
        out.insert(n, Backend::start_on(&format!("b{n}"), addr).await);
    }
    out
}

fn hosts_file(name: &str, hosts: &[u8]) -> String {
    hosts
        .iter()
        .map(|n| format!("127.0.0.{n} {name}\n"))
        .collect()
}

fn config(dns: &Dnsmasq, endpoint: &str) -> String {
    format!(
        r#"
[dns]
servers = ["{server}"]
timeout = "500ms"
attempts = 1
min_ttl = "1s"
max_ttl = "2s"

[[service]]
name = "s"
endpoints = [{{ addr = "{endpoint}" }}]

[[route]]
name = "all"
service = "s"
"#,
        server = dns.server()
    )
}

/// The addresses of service `s` in the admin API, and the DNS names they came from.
async fn instances(bus: &Busbar) -> Vec<(String, String)> {
    let v = get_json(bus.admin_get("/v1/services")).await;
    let mut out: Vec<(String, String)> = v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == "s")
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .map(|i| {
            (
                i["addr"].as_str().unwrap_or("").to_string(),
                i["dns_name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn expect(port: u16, name: &str, hosts: &[u8]) -> Vec<(String, String)> {
    hosts
        .iter()
        .map(|n| (format!("127.0.0.{n}:{port}"), format!("{name}:{port}")))
        .collect()
}

async fn get_ok(bus: &Busbar) -> bool {
    matches!(client().get(bus.url("/x")).send().await, Ok(r) if r.status() == 200)
}

#[tokio::test]
async fn every_a_record_is_an_instance_and_traffic_is_balanced_over_them() {
    let port = free_port();
    let backends = backends_on(port, &[2, 3, 4]).await;
    let dns = Dnsmasq::start(&hosts_file("orders.test", &[2, 3, 4]), &[]).await;
    let bus = Busbar::start(&config(&dns, &format!("orders.test:{port}"))).await;
    // Resolved before the first request (the bounded wait at start).
    assert_eq!(
        instances(&bus).await,
        expect(port, "orders.test", &[2, 3, 4]),
        "{}",
        bus.stderr()
    );
    for _ in 0..30 {
        assert!(get_ok(&bus).await);
    }
    for (n, b) in &backends {
        assert_eq!(b.hits(), 10, "127.0.0.{n} got {} of 30", b.hits());
    }
}

#[tokio::test]
async fn a_record_removed_and_one_added_are_followed_with_no_failed_request() {
    let port = free_port();
    let backends = backends_on(port, &[2, 3, 4, 5]).await;
    let dns = Dnsmasq::start(&hosts_file("orders.test", &[2, 3, 4]), &[]).await;
    let bus = Arc::new(Busbar::start(&config(&dns, &format!("orders.test:{port}"))).await);
    assert_eq!(
        instances(&bus).await,
        expect(port, "orders.test", &[2, 3, 4])
    );

    // A steady stream of requests while DNS changes.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stream = {
        let (bus, stop, ok, failed) = (bus.clone(), stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if get_ok(&bus).await {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // .2 leaves DNS, .5 joins: busbar follows within the TTL bounds (max_ttl 2 s).
    let changed = Instant::now();
    dns.set_hosts(&hosts_file("orders.test", &[3, 4, 5]));
    let want = expect(port, "orders.test", &[3, 4, 5]);
    wait_until(
        "busbar follows the new answer",
        Duration::from_secs(15),
        Duration::from_millis(50),
        || {
            let bus = bus.clone();
            let want = want.clone();
            async move { instances(&bus).await == want }
        },
    )
    .await;
    let followed = changed.elapsed();
    // The new instance takes traffic, the one gone from DNS none.
    let gone_hits = backends[&2].hits();
    let new_hits = backends[&5].hits();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    stream.await.unwrap();
    assert_eq!(
        backends[&2].hits(),
        gone_hits,
        "a request went to an address DNS no longer gives"
    );
    assert!(
        backends[&5].hits() > new_hits,
        "the new address takes no traffic"
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed requests");
    assert!(ok.load(Ordering::SeqCst) > 50, "the stream ran");
    assert!(
        followed < Duration::from_secs(5),
        "followed in {followed:?}, the bound is 2 s (+ a lookup)"
    );
    eprintln!(
        "followed in {followed:?}; {} requests, 0 failed",
        ok.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn dns_down_keeps_the_last_good_answer() {
    let port = free_port();
    let backends = backends_on(port, &[2, 3]).await;
    let mut dns = Dnsmasq::start(&hosts_file("orders.test", &[2, 3]), &[]).await;
    let bus = Busbar::start(&config(&dns, &format!("orders.test:{port}"))).await;
    assert_eq!(instances(&bus).await, expect(port, "orders.test", &[2, 3]));

    dns.stop();
    // Lookups fail (time out) from now on: counted, and the instances stay.
    wait_until(
        "a failed lookup is counted",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async { bus.metrics().await.contains("busbar_dns_failures_total{") },
    )
    .await;
    for _ in 0..20 {
        assert!(get_ok(&bus).await, "{}", bus.stderr());
    }
    assert_eq!(instances(&bus).await, expect(port, "orders.test", &[2, 3]));
    assert_eq!(backends[&2].hits() + backends[&3].hits(), 20);
    // Logged once, not on every failed lookup.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = bus.stderr();
    assert_eq!(
        log.matches("endpoint name does not resolve").count(),
        1,
        "{log}"
    );
}

#[tokio::test]
async fn a_name_that_never_resolved_starts_empty_then_routes_once_it_does() {
    let port = free_port();
    let backends = backends_on(port, &[2]).await;
    let dns = Dnsmasq::start("", &[]).await;
    let body = config(&dns, &format!("later.test:{port}"))
        .replace("[dns]\n", "[dns]\nstart_wait = \"1s\"\n");
    let started = Instant::now();
    let bus = Busbar::start(&body).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let r = client().get(bus.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 503, "{}", bus.stderr());
    dns.set_hosts(&hosts_file("later.test", &[2]));
    wait_until(
        "the name resolves and routes",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || get_ok(&bus),
    )
    .await;
    assert!(backends[&2].hits() >= 1);
}

#[tokio::test]
async fn an_address_the_policy_refuses_is_not_routed_and_counted_once() {
    let port = free_port();
    let _backends = backends_on(port, &[2]).await;
    let dns = Dnsmasq::start("127.0.0.2 orders.test\n169.254.169.254 orders.test\n", &[]).await;
    let bus = Busbar::start(&config(&dns, &format!("orders.test:{port}"))).await;
    assert_eq!(instances(&bus).await, expect(port, "orders.test", &[2]));
    // Several refreshes (max_ttl 2 s) later: still counted and logged once.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(instances(&bus).await, expect(port, "orders.test", &[2]));
    let sample = r#"busbar_registrations_refused_total{reason="link_local",source="dns"}"#;
    assert_eq!(bus.metric(sample).await, 1.0, "{}", bus.metrics().await);
    let log = bus.stderr();
    assert_eq!(log.matches("DNS answer refused").count(), 1, "{log}");
    assert!(log.contains("169.254.169.254"), "{log}");
}

#[tokio::test]
async fn srv_priorities_fall_back_and_weights_balance() {
    let port = free_port();
    let mut backends = backends_on(port, &[2, 3, 4, 5]).await;
    let hosts = "127.0.0.2 a.test\n127.0.0.3 b.test\n127.0.0.4 c.test\n127.0.0.5 d.test\n";
    let srv = |t: &str, prio: u16, weight: u16| {
        format!("_http._tcp.orders.test,{t},{port},{prio},{weight}")
    };
    let records = [
        srv("a.test", 10, 1),
        srv("b.test", 10, 1),
        srv("c.test", 20, 3),
        srv("d.test", 20, 1),
    ];
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    let dns = Dnsmasq::start(hosts, &records).await;
    let body = format!(
        r#"
[dns]
servers = ["{server}"]
timeout = "500ms"
attempts = 1
min_ttl = "1s"
max_ttl = "2s"

[[service]]
name = "s"
balance = "weighted"
discovery = {{ dns_srv = "_http._tcp.orders.test" }}
health = {{ type = "http", path = "/healthz", interval = "200ms", timeout = "500ms", healthy_threshold = 1, unhealthy_threshold = 1 }}

[[route]]
name = "all"
service = "s"
"#,
        server = dns.server()
    );
    let bus = Busbar::start(&body).await;
    let name = "_http._tcp.orders.test";
    let want: Vec<(String, String)> = [2, 3, 4, 5]
        .iter()
        .map(|n| (format!("127.0.0.{n}:{port}"), name.to_string()))
        .collect();
    assert_eq!(instances(&bus).await, want, "{}", bus.stderr());

    // The first priority takes all the traffic.
    for _ in 0..20 {
        assert!(get_ok(&bus).await);
    }
    assert_eq!((backends[&2].hits(), backends[&3].hits()), (10, 10));
    assert_eq!((backends[&4].hits(), backends[&5].hits()), (0, 0));

    // Its instances all stop: once their probes fail, the second priority takes over,
    // by weight (3:1).
    let stopped = Instant::now();
    for n in [2, 3] {
        backends.get_mut(&n).unwrap().stop().await;
    }
    wait_until(
        "traffic moves to the second priority",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || get_ok(&bus),
    )
    .await;
    eprintln!(
        "traffic on the second priority {:?} after the first stopped",
        stopped.elapsed()
    );
    let before = (backends[&4].hits(), backends[&5].hits());
    for _ in 0..20 {
        assert!(get_ok(&bus).await, "{}", bus.stderr());
    }
    let after = (backends[&4].hits(), backends[&5].hits());
    assert_eq!((after.0 - before.0, after.1 - before.1), (15, 5));
}

#[tokio::test]
async fn the_registration_api_lists_resolved_instances_with_their_name() {
    let port = free_port();
    let _backends = backends_on(port, &[2, 3]).await;
    let dns = Dnsmasq::start(&hosts_file("orders.test", &[2, 3]), &[]).await;
    let token = "orders-dns-token";
    let body = config(&dns, &format!("orders.test:{port}")).replace(
        "[[service]]\nname = \"s\"\n",
        &format!(
            "[registry]\nlisten = \"{{registry}}\"\n[[registry.token]]\ntoken_sha256 = \"{}\"\nservices = [\"s\"]\n\n[[service]]\nname = \"s\"\nregistration = true\n",
            common::sha256_hex(token)
        ),
    );
    let bus = Busbar::start(&body).await;
    let v = get_json(
        client()
            .get(bus.registry_url("/v1/services/s"))
            .bearer_auth(token),
    )
    .await;
    let mut seen: Vec<(String, String, String)> = v["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let s = |k: &str| i[k].as_str().unwrap_or("").to_string();
            (s("address"), s("source"), s("dns_name"))
        })
        .collect();
    seen.sort();
    let name = format!("orders.test:{port}");
    assert_eq!(
        seen,
        [2, 3]
            .map(|n| (
                format!("127.0.0.{n}:{port}"),
                "dns".to_string(),
                name.clone()
            ))
            .to_vec(),
        "{v}"
    );
}

#[tokio::test]
async fn a_reload_keeps_the_resolved_instances() {
    let port = free_port();
    let _backends = backends_on(port, &[2, 3, 4]).await;
    let mut dns = Dnsmasq::start(&hosts_file("orders.test", &[2, 3, 4]), &[]).await;
    let bus = Busbar::start(&config(&dns, &format!("orders.test:{port}"))).await;
    assert_eq!(
        instances(&bus).await,
        expect(port, "orders.test", &[2, 3, 4])
    );
    // With DNS gone, a reload must not lose what the name resolved to.
    dns.stop();
    let r = bus.reload().await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!(
        instances(&bus).await,
        expect(port, "orders.test", &[2, 3, 4])
    );
    for _ in 0..6 {
        assert!(get_ok(&bus).await);
    }
}
