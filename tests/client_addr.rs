//! The real client address behind a load balancer (issue 24 part 1): trusted
//! `X-Forwarded-For` / `Forwarded` hops, PROXY protocol v1/v2, and HAProxy in front.
//! Clients connect from chosen loopback addresses (all of 127/8 is local): 127.0.0.3
//! plays the trusted load balancer, 127.0.0.2 an untrusted client.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{Backend, Busbar};

const LB: &str = "127.0.0.3";
const STRANGER: &str = "127.0.0.2";

/// A client whose connections come from `from`; h2c (prior knowledge) when `h2c`.
fn client_from(from: &str, h2c: bool) -> reqwest::Client {
    let b = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .local_address(from.parse::<IpAddr>().ok());
    let b = if h2c { b.http2_prior_knowledge() } else { b };
    b.build().unwrap()
}

/// One route to `a`, an ACL denying 198.51.100.66 and a client_ip rate limit of one
/// request a minute.
fn limited(a: SocketAddr) -> String {
    format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{a}" }}]
[[route]]
name = "all"
service = "s"
[route.admission]
deny = ["198.51.100.66/32"]
rate_limit = {{ rate = "1/m", burst = 1 }}
"#
    )
}

/// Waits until the access log has a line with `needle` (it is flushed every 200 ms).
async fn logged(bus: &Busbar, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if bus.access_log().contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_load_balancers_chain_names_the_client_on_both_paths() {
    let a = Backend::start("a").await;
    let bus = Busbar::start_with_header(
        &limited(a.addr),
        &format!("trusted_proxies = [\"{LB}/32\"]"),
    )
    .await;
    let lb = client_from(LB, false);
    // busbar's own HTTP/1.1 path (a bodyless GET). The client wrote 1.2.3.4 itself;
    // the load balancer appended the address it saw.
    let get = |xff: &'static str| lb.get(bus.url("/x")).header("x-forwarded-for", xff).send();
    let r = get("1.2.3.4, 198.51.100.7").await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = a.seen();
    assert_eq!(
        seen[0].headers["x-forwarded-for"],
        format!("1.2.3.4, 198.51.100.7, {LB}"),
        "the chain goes on with the peer appended"
    );
    assert_eq!(seen[0].headers["forwarded"], format!("for={LB};proto=http"));
    // The rate limit is the client's, not the load balancer's.
    assert_eq!(get("198.51.100.7").await.unwrap().status(), 429);
    assert_eq!(get("198.51.100.8").await.unwrap().status(), 200);
    // The ACL sees the client.
    let r = get("198.51.100.66").await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("client_address"));

    // pingora's path: h2c, and an HTTP/1.1 request with a body.
    let h2 = client_from(LB, true);
    let r = h2
        .get(bus.url("/x"))
        .header("x-forwarded-for", "198.51.100.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        a.seen().last().unwrap().headers["x-forwarded-for"],
        format!("198.51.100.9, {LB}")
    );
    let post = |xff: &'static str| {
        lb.post(bus.url("/x"))
            .header("x-forwarded-for", xff)
            .body("body")
            .send()
    };
    assert_eq!(post("198.51.100.9").await.unwrap().status(), 429);
    assert_eq!(post("198.51.100.10").await.unwrap().status(), 200);
    assert_eq!(post("198.51.100.66").await.unwrap().status(), 403);
    // `Forwarded` names the client when there is no X-Forwarded-For.
    let r = lb
        .get(bus.url("/x"))
        .header("forwarded", "for=\"[2001:db8::7]:4711\";proto=https")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        a.seen().last().unwrap().headers["forwarded"],
        format!("for=\"[2001:db8::7]:4711\";proto=https, for={LB};proto=http")
    );
    for client in [
        "198.51.100.7",
        "198.51.100.9",
        "198.51.100.10",
        "2001:db8::7",
    ] {
        let needle = format!("\"client\":\"{client}\"");
        assert!(
            logged(&bus, &needle).await,
            "{needle}: {}",
            bus.access_log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_peer_cannot_name_another_client() {
    let a = Backend::start("a").await;
    let bus = Busbar::start_with_header(
        &limited(a.addr),
        &format!("trusted_proxies = [\"{LB}/32\"]"),
    )
    .await;
    for h2c in [false, true] {
        let c = client_from(STRANGER, h2c);
        let spoof = |who: &'static str| {
            c.get(bus.url("/x"))
                .header("x-forwarded-for", who)
                .header("forwarded", format!("for={who}"))
                .send()
        };
        let r = spoof("198.51.100.20").await.unwrap();
        if !h2c {
            assert_eq!(r.status(), 200);
            let seen = a.seen();
            let sent = &seen.last().unwrap().headers;
            assert_eq!(sent["x-forwarded-for"], STRANGER, "replaced, not kept");
            assert_eq!(sent["forwarded"], format!("for={STRANGER};proto=http"));
        } else {
            // The stranger's one request a minute is spent, whatever it claims.
            assert_eq!(r.status(), 429);
        }
        assert_eq!(spoof("198.51.100.21").await.unwrap().status(), 429);
        // Denied addresses can't be dodged, nor an allowed one borrowed.
        assert_ne!(spoof("198.51.100.66").await.unwrap().status(), 403);
    }
    assert_eq!(a.seen().len(), 1);
    let needle = format!("\"client\":\"{STRANGER}:");
    assert!(logged(&bus, &needle).await, "{}", bus.access_log());
    assert!(!bus.access_log().contains("198.51.100.2"));
}
