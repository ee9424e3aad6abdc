//! Admission end to end: per-user rate limits, JWT / API key / trusted-header identity,
//! ACLs with path-normalisation bypass attempts, and per-user fair queues.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::http1;
use common::{client, Backend, Busbar};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const JWT_SECRET: &str = "integration-test-secret-0123456789";

/// The config these tests share: service `service` at `backend` (`service_extra` lines in
/// it, e.g. `max_in_flight = 1`), then one route to it per `(name, match lines,
/// admission lines)`, each with that `[route.admission]` table.
fn admitted(
    service: &str,
    backend: SocketAddr,
    service_extra: &str,
    routes: &[(&str, &str, &str)],
) -> String {
    use std::fmt::Write;
    let mut toml = format!(
        "[[service]]\nname = \"{service}\"\nendpoints = [{{ addr = \"{backend}\" }}]\n{service_extra}\n"
    );
    for (name, matching, admission) in routes {
        let _ = write!(
            toml,
            "[[route]]\nname = \"{name}\"\n{matching}\nservice = \"{service}\"\n[route.admission]\n{admission}\n"
        );
    }
    toml
}

/// Sends `GET {path}` byte for byte (clients would normalise the path) and returns the status.
async fn raw_status(bus: &Busbar, path: &str) -> u16 {
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let (text, _) = http1::exchange(bus.http, req.as_bytes(), Duration::from_secs(5)).await;
    http1::status_of(&text).unwrap_or_else(|| panic!("no status for {path}: {text}"))
}

/// `busbar_admission_decisions_total{decision="limited",reason="user"}` of `route`.
async fn limited_by_user(bus: &Busbar, route: &str) -> f64 {
    let sample = format!(
        r#"busbar_admission_decisions_total{{decision="limited",reason="user",route="{route}"}}"#
    );
    common::metric_value(&bus.metrics().await, &sample)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_per_user_with_headers() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&admitted(
        "a",
        a.addr,
        "",
        &[(
            "limited",
            "",
            r#"identity = ["header:x-user-id", "client_ip"]
trusted_proxies = ["127.0.0.0/8"]
rate_limit = { rate = "1/m", burst = 2 }"#,
        )],
    ))
    .await;
    let http = client();
    let get = |user: &str| {
        http.get(bus.url("/x"))
            .header("x-user-id", user)
            .header("x-busbar-user", "spoofed")
            .send()
    };
    let r = get("alice").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-limit"], "2");
    assert_eq!(r.headers()["ratelimit-remaining"], "1");
    assert_eq!(
        r.headers()["ratelimit-reset"],
        "60",
        "one used, refilled in 1 min"
    );
    let r = get("alice").await.unwrap();
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    let r = get("alice").await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["reason"], "user");
    // Another user is not affected.
    let r = get("bob").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-remaining"], "1");
    // The upstream saw busbar's identity header, not the client's.
    let seen = a.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].headers["x-busbar-user"], "alice");
    assert_eq!(seen[2].headers["x-busbar-user"], "bob");
    assert_eq!(limited_by_user(&bus, "limited").await, 1.0);
}

/// Routes that name one rate-limit group share a user's allowance (and the group's
/// global limit); a route outside the group counts on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_of_a_rate_limit_group_share_one_allowance() {
    let a = Backend::start("a").await;
    let admission = |group: &str| {
        format!(
            r#"identity = ["header:x-user-id"]
trusted_proxies = ["127.0.0.0/8"]
rate_limit = {{ rate = "1/m", burst = 3{group} }}"#
        )
    };
    let (shop, alone) = (admission(", group = \"shop\""), admission(""));
    let bus = Busbar::start(&admitted(
        "a",
        a.addr,
        "",
        &[
            ("orders", r#"path_prefix = "/orders""#, &shop),
            ("carts", r#"path_prefix = "/carts""#, &shop),
            ("search", r#"path_prefix = "/search""#, &alone),
        ],
    ))
    .await;
    let http = client();
    let get = |path: &'static str, user: &'static str| {
        let r = http.get(bus.url(path)).header("x-user-id", user).send();
        async move {
            let r = r.await.unwrap();
            let remaining = r.headers()["ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_string();
            (r.status().as_u16(), remaining)
        }
    };
    assert_eq!(get("/orders/1", "alice").await, (200, "2".into()));
    assert_eq!(get("/carts/1", "alice").await, (200, "1".into()));
    assert_eq!(get("/orders/2", "alice").await, (200, "0".into()));
    assert_eq!(
        get("/carts/2", "alice").await,
        (429, "0".into()),
        "the group's allowance is spent"
    );
    assert_eq!(
        get("/search", "alice").await,
        (200, "2".into()),
        "another route counts alone"
    );
    assert_eq!(
        get("/carts/3", "bob").await,
        (200, "2".into()),
        "another user"
    );
    assert_eq!(limited_by_user(&bus, "carts").await, 1.0);
}

fn jwt(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_and_api_key_identities_with_401s() {
    let a = Backend::start("a").await;
    let key_hash = common::sha256_hex("key-of-reports");
    let auth = format!(
        r#"
[auth]
[[auth.jwt]]
name = "corp"
algorithm = "HS256"
secret_env = "TEST_JWT_SECRET"
issuer = "https://id.test"
audience = ["busbar"]
leeway = "5s"
[[auth.api_key]]
user = "reports"
sha256 = "{key_hash}"
"#
    );
    let routes = admitted(
        "a",
        a.addr,
        "",
        &[(
            "api",
            "",
            r#"identity = ["jwt", "api_key", "header:x-user-id", "client_ip"]
trusted_proxies = ["10.0.0.0/8"]
require_auth = true"#,
        )],
    );
    let bus = Busbar::start_with_env(&(auth + &routes), &[("TEST_JWT_SECRET", JWT_SECRET)]).await;
    let http = client();
    let good = serde_json::json!({"sub": "alice", "iss": "https://id.test", "aud": "busbar", "exp": now() + 300});
    let r = http
        .get(bus.url("/me"))
        .bearer_auth(jwt(good.clone(), JWT_SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(a.seen().last().unwrap().headers["x-busbar-user"], "alice");

    let mut expired = good.clone();
    expired["exp"] = (now() - 600).into();
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = "other".into();
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = "https://evil.test".into();
    let mut early = good.clone();
    early["nbf"] = (now() + 600).into();
    for (token, reason) in [
        (jwt(expired, JWT_SECRET), "token_expired"),
        (jwt(wrong_aud, JWT_SECRET), "wrong_audience"),
        (jwt(wrong_iss, JWT_SECRET), "wrong_issuer"),
        (jwt(early, JWT_SECRET), "token_not_yet_valid"),
        (
            jwt(good.clone(), "some-other-secret-of-length"),
            "bad_signature",
        ),
    ] {
        let r = http
            .get(bus.url("/me"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{reason}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
        assert_eq!(body["reason"], reason);
    }

    let r = http
        .get(bus.url("/me"))
        .header("x-api-key", "key-of-reports")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(a.seen().last().unwrap().headers["x-busbar-user"], "reports");
    let r = http
        .get(bus.url("/me"))
        .header("x-api-key", "guessed")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "unknown_api_key");

    // 127.0.0.1 is not a trusted proxy: its x-user-id is ignored, and it is anonymous.
    let r = http
        .get(bus.url("/me"))
        .header("x-user-id", "admin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "authentication_required");
    assert_eq!(a.hits(), 2, "no refused request reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_header_identity_from_a_trusted_proxy() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&admitted(
        "a",
        a.addr,
        "",
        &[(
            "internal",
            "",
            r#"identity = ["header:x-user-id"]
trusted_proxies = ["127.0.0.1"]
require_auth = true
identity_header = "x-verified-user""#,
        )],
    ))
    .await;
    let http = client();
    let r = http
        .get(bus.url("/i"))
        .header("x-user-id", "carol")
        .header("x-verified-user", "mallory")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(a.seen()[0].headers["x-verified-user"], "carol");
    let r = http.get(bus.url("/i")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_hold_against_path_tricks() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&admitted(
        "a",
        a.addr,
        "",
        &[
            (
                "blocked",
                r#"path_prefix = "/blocked""#,
                r#"deny = ["127.0.0.0/8"]"#,
            ),
            (
                "open",
                r#"path_prefix = "/open""#,
                r#"allow = ["10.0.0.0/8", "127.0.0.1"]"#,
            ),
            ("app", "", r#"deny_paths = ["/admin"]"#),
        ],
    ))
    .await;
    assert_eq!(raw_status(&bus, "/blocked/x").await, 403);
    assert_eq!(raw_status(&bus, "/open/x").await, 200);
    assert_eq!(raw_status(&bus, "/app/x").await, 200);
    assert_eq!(raw_status(&bus, "/administrator").await, 200);
    for p in [
        "/admin",
        "/admin/users",
        "//admin",
        "/a/../admin",
        "/%2e%2e/admin",
        "/%2E%2E%2Fadmin",
        "/./admin/",
        "/%61dmin",
        "/admin;x=1",
        "/open/../admin",
    ] {
        assert_eq!(raw_status(&bus, p).await, 403, "{p}");
    }
    // Route matching uses the normalised path too: this is the "blocked" route.
    assert_eq!(raw_status(&bus, "/open/../blocked/x").await, 403);
    let r = client().get(bus.url("/admin")).send().await.unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["reason"], "path");
    assert!(
        a.seen()
            .iter()
            .all(|s| s.path == "/administrator" || !s.path.contains("admin")),
        "nothing about admin reached the backend"
    );
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// max_in_flight = 2 and a 200 ms backend: a user firing many concurrent requests gets
/// 429s, while a polite user's requests all succeed at close to unloaded latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_user_does_not_starve_a_polite_one() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&admitted(
        "slow",
        a.addr,
        "max_in_flight = 2",
        &[(
            "slow",
            "",
            r#"identity = ["header:x-user-id"]
trusted_proxies = ["127.0.0.1"]
queue = { max_depth = 4, max_wait = "10s" }"#,
        )],
    ))
    .await;
    let http = client();
    let polite = |http: reqwest::Client, url: String| async move {
        let t0 = Instant::now();
        let r = http
            .get(url)
            .header("x-user-id", "polite")
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), t0.elapsed())
    };
    let url = bus.url("/work?sleep_ms=200");
    let mut unloaded = Vec::new();
    for _ in 0..5 {
        let (status, t) = polite(http.clone(), url.clone()).await;
        assert_eq!(status, 200);
        unloaded.push(t);
    }
    let unloaded = median(unloaded);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..16 {
        let (http, url, stop) = (http.clone(), url.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            let (mut ok, mut limited) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http.get(&url).header("x-user-id", "flood").send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) if r.status() == 429 => {
                        limited += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    _ => {}
                }
            }
            (ok, limited)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut loaded = Vec::new();
    for _ in 0..8 {
        let (status, t) = polite(http.clone(), url.clone()).await;
        assert_eq!(status, 200, "the polite user is never refused");
        loaded.push(t);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut limited) = (0, 0);
    for f in flood {
        let (o, l) = f.await.unwrap();
        ok += o;
        limited += l;
    }
    let all = loaded.clone();
    let loaded = median(loaded);
    assert!(
        loaded <= unloaded * 2,
        "polite median {loaded:?} vs unloaded {unloaded:?}; all {all:?}"
    );
    assert!(limited > 0, "the flood got 429s (ok {ok})");
    assert!(ok > 0, "the flood still got its share");
    let m = bus.metrics().await;
    assert!(
        common::metric_value(
            &m,
            r#"busbar_admission_decisions_total{decision="rejected",reason="queue_full",route="slow"}"#
        ) > 0.0,
        "{m}"
    );
}

/// One slot (`max_in_flight = 1`), a queue of depth 1 per user and a long `max_wait`.
fn one_slot(backend: SocketAddr) -> String {
    admitted(
        "one",
        backend,
        "max_in_flight = 1",
        &[(
            "one",
            "",
            r#"identity = ["header:x-user-id"]
trusted_proxies = ["127.0.0.1"]
queue = { max_depth = 1, max_wait = "20s" }"#,
        )],
    )
}

/// Polls `sample` in `/metrics` until it equals `want`; the queue gauges are sampled
/// once a second.
async fn wait_metric(bus: &Busbar, sample: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let m = bus.metrics().await;
        if common::metric_value(&m, sample) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} never reached {want}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const ONE_WAITING: &str = r#"busbar_queue_waiting{service="one"}"#;
const ONE_ABANDONED: &str =
    r#"busbar_admission_decisions_total{decision="abandoned",reason="client_closed",route="one"}"#;

/// Takes the only slot for `hold_ms` and returns once the backend has the request.
async fn fill_the_slot(
    bus: &Busbar,
    a: &Backend,
    hold_ms: u64,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let busy = tokio::spawn(
        client()
            .get(bus.url(&format!("/busy?sleep_ms={hold_ms}")))
            .header("x-user-id", "busy")
            .send(),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.hits() == 0 {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    busy
}

/// After the client left: its place is gone (gauge, counter), its user may queue again
/// (depth 1 would refuse a second waiter), the next user gets the slot as soon as the slow
/// request ends (not after max_wait, nor after the abandoned request's own run), and the
/// abandoned request never reaches the backend.
async fn the_place_was_freed(
    bus: &Busbar,
    a: &Backend,
    leaver: &'static str,
    busy: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
    busy_ends: Instant,
) {
    wait_metric(bus, ONE_ABANDONED, 1.0, Duration::from_secs(3)).await;
    wait_metric(bus, ONE_WAITING, 0.0, Duration::from_secs(3)).await;
    assert!(
        Instant::now() < busy_ends,
        "the slow request ended before the checks; raise its sleep"
    );
    let get = |user: &'static str, path: &'static str| {
        tokio::spawn(client().get(bus.url(path)).header("x-user-id", user).send())
    };
    let next = get("next", "/next");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = get(leaver, "/again");
    let r = next.await.unwrap().unwrap();
    let served = Instant::now();
    assert_eq!(r.status(), 200);
    assert!(
        served < busy_ends + Duration::from_millis(1500),
        "next user served {:?} after the slot freed",
        served.saturating_duration_since(busy_ends)
    );
    assert_eq!(
        again.await.unwrap().unwrap().status(),
        200,
        "the user who left may queue again"
    );
    assert_eq!(busy.await.unwrap().unwrap().status(), 200);
    let paths: Vec<String> = a.seen().into_iter().map(|s| s.path).collect();
    assert!(
        !paths.iter().any(|p| p.starts_with("/left")),
        "the abandoned request reached the backend: {paths:?}"
    );
    assert_eq!(
        paths.iter().filter(|p| p.starts_with("/next")).count(),
        1,
        "{paths:?}"
    );
    let m = bus.metrics().await;
    assert_eq!(common::metric_value(&m, ONE_ABANDONED), 1.0, "{m}");
    assert!(!m.contains(leaver), "no user id in metrics");
}

/// HTTP/1: a request queued behind a full service, from a raw TCP client that then closes
/// its socket, gives its place up at once.
async fn h1_leaver_frees_its_place(request: &[u8], leaver: &'static str) {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_slot(a.addr)).await;
    let hold = Duration::from_millis(4000);
    let busy_ends = Instant::now() + hold;
    let busy = fill_the_slot(&bus, &a, hold.as_millis() as u64).await;

    let mut s = tokio::net::TcpStream::connect(bus.http).await.unwrap();
    s.write_all(request).await.unwrap();
    wait_metric(&bus, ONE_WAITING, 1.0, Duration::from_secs(3)).await;
    drop(s);
    the_place_was_freed(&bus, &a, leaver, busy, busy_ends).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_while_queued_frees_its_place() {
    h1_leaver_frees_its_place(
        b"GET /left?sleep_ms=8000 HTTP/1.1\r\nHost: t\r\nx-user-id: leaver-h1\r\n\r\n",
        "leaver-h1",
    )
    .await;
}

/// The same with a body: busbar reads it while the request waits (it would otherwise not
/// see the close behind it) and keeps it for the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_body_that_disconnects_while_queued_frees_its_place() {
    h1_leaver_frees_its_place(
        b"POST /left?sleep_ms=8000 HTTP/1.1\r\nHost: t\r\nx-user-id: leaver-body\r\n\
          Content-Length: 11\r\n\r\nhello world",
        "leaver-body",
    )
    .await;
}

/// A queued request whose body busbar read during the wait reaches the backend with that
/// body, whole and once, when its turn comes; so does one whose body is still arriving
/// when the slot frees, and one too long to be read ahead (64 KiB and more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_read_while_queued_reaches_the_backend_whole() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_slot(a.addr).replace("max_depth = 1", "max_depth = 4")).await;
    let busy = fill_the_slot(&bus, &a, 1500).await;

    let small: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let large: Vec<u8> = (0..100_000u32).map(|i| b'A' + (i % 26) as u8).collect();
    let post = |user: &'static str, path: &'static str, body: Vec<u8>| {
        tokio::spawn(
            client()
                .post(bus.url(path))
                .header("x-user-id", user)
                .body(body)
                .send(),
        )
    };
    let whole = post("u-small", "/small", small.clone());
    let big = post("u-large", "/large", large.clone());
    // A body in two parts, the second sent after the slot has freed.
    let mut s = tokio::net::TcpStream::connect(bus.http).await.unwrap();
    s.write_all(
        b"POST /split HTTP/1.1\r\nHost: t\r\nx-user-id: u-split\r\nContent-Length: 10\r\n\r\nfirst",
    )
    .await
    .unwrap();
    wait_metric(&bus, ONE_WAITING, 3.0, Duration::from_secs(3)).await;
    assert_eq!(busy.await.unwrap().unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b"-last").await.unwrap();
    let mut head = vec![0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut head)
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert_eq!(whole.await.unwrap().unwrap().status(), 200);
    assert_eq!(big.await.unwrap().unwrap().status(), 200);

    let body_of = |path: &str| -> Vec<Vec<u8>> {
        a.seen()
            .into_iter()
            .filter(|s| s.path == path)
            .map(|s| s.body)
            .collect()
    };
    assert_eq!(body_of("/small"), vec![small]);
    assert_eq!(body_of("/large"), vec![large]);
    assert_eq!(body_of("/split"), vec![b"first-last".to_vec()]);
}

/// HTTP/2 (h2c): cancelling a queued request (RST_STREAM) gives its place up at once,
/// also for a request with a body (the stream reset is watched without reading it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_reset_while_queued_frees_its_place() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_slot(a.addr)).await;
    let hold = Duration::from_millis(4000);
    let busy_ends = Instant::now() + hold;
    let busy = fill_the_slot(&bus, &a, hold.as_millis() as u64).await;

    let leaver = tokio::spawn(
        common::h2c_client()
            .post(bus.url("/left?sleep_ms=8000"))
            .header("x-user-id", "leaver-h2")
            .body("a body busbar has not read yet")
            .send(),
    );
    wait_metric(&bus, ONE_WAITING, 1.0, Duration::from_secs(3)).await;
    leaver.abort();
    let _ = leaver.await;
    the_place_was_freed(&bus, &a, "leaver-h2", busy, busy_ends).await;
}
