//! Reload says what it did, and does it: settings that need a restart are listed by
//! comparing the file with what runs; the log level, the grace period and the
//! registration listener (opened, moved, closed) are applied live; `/v1/registry` shows
//! where the registration API listens now. Every reload here is `POST /v1/reload`.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::{client, free_port, get_json, sha256_hex, Backend, Busbar, SIGTERM};
use serde_json::{json, Value};

const ORDERS_TOKEN: &str = "orders-secret-token";

/// Service `s` (static) and route `r` to it.
fn static_only(backend: SocketAddr) -> String {
    format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{backend}" }}]
[[route]]
name = "r"
service = "s"
"#
    )
}

/// Reloads and returns the answer's JSON, asserting a 200.
async fn reload_ok(bus: &Busbar) -> Value {
    let r = bus.reload().await;
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

fn names(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect()
}

fn listening(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_settings_are_compared_with_what_runs() {
    let a = Backend::start("a").await;
    let body = static_only(a.addr);
    let bus = Busbar::start(&body).await;
    let header = bus.header("");
    let access = format!("{}/access.log", bus.dir.path().display());
    assert!(header.contains(&access), "{header}");

    // threads and log.access changed: both need a restart.
    let changed = header
        .replace(
            "grace_period = \"10s\"",
            "grace_period = \"10s\"\nthreads = 2",
        )
        .replace(&access, &format!("{}/other.log", bus.dir.path().display()));
    std::fs::write(&bus.config, format!("{changed}{body}")).unwrap();
    let v = reload_ok(&bus).await;
    assert_eq!(
        names(&v["not_applied"]),
        ["server.threads", "log.access"],
        "{v}"
    );

    // Reverted: the file says what runs, so nothing needs a restart.
    bus.write_config(&body, "");
    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["not_applied"]), Vec::<&str>::new(), "{v}");
    assert!(v["note"].is_null(), "{v}");
    assert_eq!(names(&v["applied"]), Vec::<&str>::new(), "{v}");

    // Changed again and left: reported again, on every reload, until a restart.
    std::fs::write(&bus.config, format!("{changed}{body}")).unwrap();
    for _ in 0..2 {
        let v = reload_ok(&bus).await;
        assert_eq!(
            names(&v["not_applied"]),
            ["server.threads", "log.access"],
            "{v}"
        );
    }
    // The routes still reload.
    let r = client().get(bus.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_level_changes_on_reload() {
    let a = Backend::start("a").await;
    let body = static_only(a.addr);
    let bus = Busbar::start(&body).await;
    // Every reload logs "configuration reloaded" at info.
    let reloaded = || bus.stderr().matches("configuration reloaded").count();
    let with_level = |level: &str| {
        let text = std::fs::read_to_string(&bus.config).unwrap();
        let text = text.replace("level = \"info\"", &format!("level = \"{level}\""));
        let text = text.replace("level = \"warn\"", &format!("level = \"{level}\""));
        std::fs::write(&bus.config, text).unwrap();
    };

    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["applied"]), Vec::<&str>::new(), "{v}");
    assert_eq!(reloaded(), 1, "{}", bus.stderr());

    with_level("warn");
    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["applied"]), ["log.level"], "{v}");
    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["applied"]), Vec::<&str>::new(), "{v}");
    // Give a late line the chance to show.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        reloaded(),
        1,
        "info lines are still written at level warn:\n{}",
        bus.stderr()
    );

    with_level("info");
    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["applied"]), ["log.level"], "{v}");
    assert!(
        common::eventually(Duration::from_secs(5), || reloaded() == 2).await,
        "back at info, the reload is logged:\n{}",
        bus.stderr()
    );
}

/// Sends a request the backend answers after `ms`, returning its status (or the error).
fn slow_request(bus: &Busbar, ms: u64) -> tokio::task::JoinHandle<Result<u16, String>> {
    let url = bus.url(&format!("/slow?sleep_ms={ms}"));
    tokio::spawn(async move {
        let r = client().get(url).send().await.map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        r.bytes().await.map_err(|e| e.to_string())?;
        Ok(status)
    })
}

/// Waits until the backend has seen `n` requests.
async fn seen(backend: &Backend, n: usize) {
    assert!(
        common::eventually(Duration::from_secs(10), || backend.hits() >= n).await,
        "the backend saw {} requests",
        backend.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_grace_period_ends_the_next_drain_sooner() {
    let a = Backend::start("a").await;
    let body = static_only(a.addr);
    let mut bus = Busbar::start(&body).await;
    let text = std::fs::read_to_string(&bus.config).unwrap();
    std::fs::write(
        &bus.config,
        text.replace("grace_period = \"10s\"", "grace_period = \"1s\""),
    )
    .unwrap();
    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["applied"]), ["server.grace_period"], "{v}");

    let slow = slow_request(&bus, 8000);
    seen(&a, 1).await;
    let sent = Instant::now();
    bus.signal(SIGTERM);
    let code = bus.wait_exit(Duration::from_secs(15)).await;
    let took = sent.elapsed();
    assert_eq!(code, Some(0), "{}", bus.stderr());
    assert!(
        took < Duration::from_secs(5),
        "the drain waited {took:?}, not the 1 s grace period now running"
    );
    let r = slow.await.unwrap();
    assert!(
        r.is_err(),
        "the 8 s request was cut at the grace period: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_grace_period_lets_the_next_drain_wait_longer() {
    let a = Backend::start("a").await;
    let body = static_only(a.addr);
    let mut bus = Busbar::start(&body).await;
    // Restarted on a 1 s grace period, so that is what pingora and busbar start with.
    let short = std::fs::read_to_string(&bus.config)
        .unwrap()
        .replace("grace_period = \"10s\"", "grace_period = \"1s\"");
    std::fs::write(&bus.config, &short).unwrap();
    bus.kill_and_restart().await;
    std::fs::write(
        &bus.config,
        short.replace("grace_period = \"1s\"", "grace_period = \"6s\""),
    )
    .unwrap();
    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["applied"]), ["server.grace_period"], "{v}");

    let slow = slow_request(&bus, 2500);
    seen(&a, 1).await;
    bus.signal(SIGTERM);
    let code = bus.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{}", bus.stderr());
    let r = slow.await.unwrap();
    assert_eq!(
        r,
        Ok(200),
        "the request in flight gets the 6 s grace period now running"
    );
}

/// `[registry]` with a token for `orders`, and `services`; `listen` is the registration address.
fn with_registry(listen: &str, services: &str) -> String {
    format!(
        r#"
[registry]
listen = "{listen}"
[[registry.token]]
token_sha256 = "{token}"
services = ["*"]
{services}"#,
        token = sha256_hex(ORDERS_TOKEN),
    )
}

/// Service `s` (static, route `r`) and, with `orders`, service `orders` that takes
/// registrations (route `orders` on `/orders`).
fn services(backend: SocketAddr, orders: bool) -> String {
    let mut text = String::new();
    if orders {
        text.push_str(
            r#"
[[service]]
name = "orders"
registration = true
[[route]]
name = "orders"
path_prefix = "/orders"
service = "orders"
"#,
        );
    }
    text.push_str(&static_only(backend));
    text
}

async fn register(at: SocketAddr, id: &str, app: SocketAddr) -> Result<u16, String> {
    client()
        .put(format!("http://{at}/v1/services/orders/instances/{id}"))
        .bearer_auth(ORDERS_TOKEN)
        .json(&json!({ "address": app.to_string(), "ttl": 30 }))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

async fn registry_listen(bus: &Busbar) -> Value {
    get_json(bus.admin_get("/v1/registry")).await["listen"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_listener_follows_reloads() {
    let a = Backend::start("a").await;
    let orders_app = Backend::start("orders-1").await;
    let first: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let moved: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let bus = Busbar::start(&with_registry(&first.to_string(), &services(a.addr, false))).await;
    assert!(!listening(first), "no service takes registrations: no port");
    assert_eq!(registry_listen(&bus).await, Value::Null);

    // A service that takes registrations arrives: the API opens and works.
    bus.write_config(
        &with_registry(&first.to_string(), &services(a.addr, true)),
        "",
    );
    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["applied"]), ["registry.listen"], "{v}");
    assert_eq!(registry_listen(&bus).await, first.to_string());
    assert_eq!(register(first, "o1", orders_app.addr).await, Ok(200));
    let r = client().get(bus.url("/orders/x")).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "the added service routes to its registration"
    );
    assert_eq!(r.headers()["x-backend"], "orders-1");

    // The same file again: nothing to do.
    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["applied"]), Vec::<&str>::new(), "{v}");

    // A busy address refuses the reload and changes nothing.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap();
    bus.write_config(
        &with_registry(&busy.to_string(), &services(a.addr, true)),
        "",
    );
    let r = bus.reload().await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    let message = v["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("registry.listen") && message.contains(&busy.to_string()),
        "{v}"
    );
    assert_eq!(registry_listen(&bus).await, first.to_string());
    assert_eq!(register(first, "o1", orders_app.addr).await, Ok(200));
    drop(held);

    // Moved: the new address takes registrations, the old one closes.
    bus.write_config(
        &with_registry(&moved.to_string(), &services(a.addr, true)),
        "",
    );
    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["applied"]), ["registry.listen"], "{v}");
    assert_eq!(registry_listen(&bus).await, moved.to_string());
    assert_eq!(register(moved, "o2", orders_app.addr).await, Ok(200));
    assert_eq!(
        register(moved, "o3", moved).await,
        Ok(400),
        "the registration listener where it is now is one of busbar's own"
    );
    assert!(
        common::eventually(Duration::from_secs(5), || !listening(first)).await,
        "the old registration address still accepts connections"
    );

    // No service takes registrations any more: the API closes.
    bus.write_config(
        &with_registry(&moved.to_string(), &services(a.addr, false)),
        "",
    );
    let v = reload_ok(&bus).await;
    assert_eq!(names(&v["applied"]), ["registry.listen"], "{v}");
    assert_eq!(registry_listen(&bus).await, Value::Null);
    assert!(
        common::eventually(Duration::from_secs(5), || !listening(moved)).await,
        "the registration API still accepts connections"
    );
    let r = client().get(bus.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
