//! Admission that must not be talked around (issue 22, part 6): `;` path parameters
//! against path ACLs, a second `Host` or `Authorization`, identity headers busbar did not
//! believe, malformed bearer credentials and JWT subjects with spaces at their ends.
//!
//! Every case goes over each way in: a bodyless HTTP/1.1 GET (busbar's own HTTP/1.1
//! engine), a POST with a body and an HTTP/1.0 GET (pingora's proxy), and, where the
//! client can say it, GET and POST over h2c. The requests are written byte for byte
//! (HTTP/1) or sent with paths the URL parser keeps as they are (h2c).

mod common;

use std::time::Duration;

use common::http1;
use common::{Backend, Busbar};
use serde_json::Value;

const JWT_SECRET: &str = "admission-security-secret-0123456789";

/// How a request reaches busbar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// HTTP/1.1 GET without a body: busbar's own engine.
    Get11,
    /// HTTP/1.1 POST with a body: pingora's proxy.
    Post11,
    /// HTTP/1.0 GET: pingora's proxy.
    Get10,
    /// h2c GET and POST: pingora's proxy.
    H2Get,
    H2Post,
}

const HTTP1: [Via; 3] = [Via::Get11, Via::Post11, Via::Get10];
const ALL: [Via; 5] = [Via::Get11, Via::Post11, Via::Get10, Via::H2Get, Via::H2Post];

/// The status and the body of busbar's answer.
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    /// The `field` of a JSON answer (busbar's own refusals), or `Null`.
    fn json(&self, field: &str) -> Value {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .map_or(Value::Null, |v| v[field].clone())
    }
}

/// Sends one request on a fresh connection, `headers` in order (a name may repeat) after
/// `Host: t` unless they name a Host themselves.
async fn send(bus: &Busbar, via: Via, path: &str, headers: &[(&str, &str)]) -> Answer {
    let body = b"hello";
    if matches!(via, Via::H2Get | Via::H2Post) {
        let http = common::h2c_client();
        let mut req = match via {
            Via::H2Get => http.get(bus.url(path)),
            _ => http.post(bus.url(path)).body(&body[..]),
        };
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{via:?} {path}: {e}"));
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        return Answer {
            status: r.status().as_u16(),
            body: r.text().await.unwrap_or_default(),
        };
    }
    let (method, version) = match via {
        Via::Get11 => ("GET", "HTTP/1.1"),
        Via::Post11 => ("POST", "HTTP/1.1"),
        _ => ("GET", "HTTP/1.0"),
    };
    let mut head = format!("{method} {path} {version}\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str("Host: t\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if via == Via::Post11 {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut request = head.into_bytes();
    if via == Via::Post11 {
        request.extend_from_slice(body);
    }
    let (text, _) = http1::exchange(bus.http, &request, Duration::from_secs(20)).await;
    let status =
        http1::status_of(&text).unwrap_or_else(|| panic!("{via:?} {path}: no status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Answer { status, body }
}

/// A backend's requests less those it had before: what one step of a test sent it.
fn since(a: &Backend, before: usize) -> Vec<common::backend::Seen> {
    a.seen().split_off(before)
}

fn jwt(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

fn claims(sub: Value) -> Value {
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    serde_json::json!({"sub": sub, "iss": "https://id.test", "exp": exp})
}

const AUTH: &str = r#"
[auth]
[[auth.jwt]]
name = "corp"
algorithm = "HS256"
secret_env = "SECURITY_TEST_JWT_SECRET"
issuer = "https://id.test"
[[auth.api_key]]
user = "reports"
"#;

/// The API key of the user "reports".
const API_KEY: &str = "key-of-reports";

async fn start_with_jwt(body: &str) -> Busbar {
    let key = common::sha256_hex(API_KEY);
    Busbar::start_with_env(
        &format!("{AUTH}sha256 = \"{key}\"\n{body}"),
        &[("SECURITY_TEST_JWT_SECRET", JWT_SECRET)],
    )
    .await
}

/// `GET /api;x/admin` and `GET /api/x/..;/admin` are `/api/admin` to Tomcat and Jetty:
/// `deny_paths = ["/api/admin"]` refuses them; with `normalize_path = true` the upstream
/// gets the parameter-free path; a last-segment parameter (`;jsessionid=`) still routes
/// and is allowed as the path without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semicolon_parameters_do_not_pass_path_acls() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "a"
endpoints = [{{ addr = "{a}" }}]
[[route]]
name = "app"
path_prefix = "/api"
service = "a"
[route.admission]
deny_paths = ["/api/admin"]
[[route]]
name = "normalised"
path_prefix = "/n"
service = "a"
[route.admission]
deny_paths = ["/n/admin"]
normalize_path = true
[[route]]
name = "docs"
path_prefix = "/pub"
service = "a"
[route.admission]
allow_paths = ["/pub/open"]
[[route]]
name = "session"
path = "/a/b"
service = "a"
request_headers = {{ set = {{ "x-route" = "session" }} }}
[route.admission]
allow_paths = ["/a/b"]
[[route]]
name = "rest"
service = "a"
"#,
        a = a.addr
    ))
    .await;
    let denied_h1 = [
        "/api;x/admin",
        "/api/x/..;/admin",
        "/api/x/%2e%2e;/admin",
        "/api%3Bx/admin",
        "/api/x/..%3b/admin",
        "/api;/admin;jsessionid=1/users",
        "/n;x/admin",
        "/n/x/..;/admin",
        // Under the allow list as Tomcat reads it, not as a literal server does, and
        // the other way round.
        "/pub/open/..;/secret",
        "/pub/x/..;/open",
    ];
    // Paths that h2c clients send as they are (the URL parser resolves `%2e%2e`).
    let denied_h2 = ["/api;x/admin", "/api/x/..;/admin", "/n/x/..;/admin"];
    for via in ALL {
        let paths: &[&str] = if HTTP1.contains(&via) {
            &denied_h1
        } else {
            &denied_h2
        };
        for path in paths {
            let r = send(&bus, via, path, &[]).await;
            assert_eq!(r.status, 403, "{via:?} {path}: {}", r.body);
            assert_eq!(r.json("reason"), "path", "{via:?} {path}");
        }
    }
    assert_eq!(a.hits(), 0, "nothing refused reached the upstream");

    // The readings pick different routes (`/` is "rest", `/api/admin` is "app"):
    // refused, whichever route's rules would have passed it.
    for via in HTTP1 {
        let r = send(&bus, via, "/api/admin/..;x/..", &[]).await;
        assert_eq!(r.status, 400, "{via:?}: {}", r.body);
        assert_eq!(r.json("error"), "ambiguous_path", "{via:?}");
    }
    assert_eq!(a.hits(), 0);

    // What passes reaches the upstream: as it came, or normalised when the route says so.
    for via in ALL {
        let before = a.hits();
        for (path, upstream) in [
            ("/api/x;v=1", "/api/x;v=1"),
            ("/api/x/..;/public", "/api/x/..;/public"),
            ("/n/x;v=1/..;/y?q=1", "/n/y?q=1"),
            ("/pub/open;x/doc", "/pub/open;x/doc"),
            ("/a/b;jsessionid=1", "/a/b;jsessionid=1"),
        ] {
            let r = send(&bus, via, path, &[]).await;
            assert_eq!(r.status, 200, "{via:?} {path}: {}", r.body);
            let seen = since(&a, a.hits() - 1);
            assert_eq!(seen[0].path, upstream, "{via:?} {path}");
        }
        assert_eq!(a.hits(), before + 5);
        // The session path was routed by its parameter-free reading (an exact route).
        let last = a.seen().pop().unwrap();
        assert_eq!(
            last.headers.get("x-route").map(String::as_str),
            Some("session")
        );
    }
}

/// Two `Host` headers: 400 on every HTTP/1 way in (RFC 9112 §3.2), before routing picks
/// either; an absolute-form target whose authority disagrees with `Host` is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_is_refused() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "a"
endpoints = [{{ addr = "{a}" }}]
[[route]]
name = "guarded"
hosts = ["inner"]
service = "a"
[route.admission]
deny = ["127.0.0.0/8"]
[[route]]
name = "open"
hosts = ["outer"]
service = "a"
"#,
        a = a.addr
    ))
    .await;
    // Each alone is routed as it says.
    assert_eq!(
        send(&bus, Via::Get11, "/x", &[("Host", "outer")])
            .await
            .status,
        200
    );
    assert_eq!(
        send(&bus, Via::Get11, "/x", &[("Host", "inner")])
            .await
            .status,
        403
    );
    let before = a.hits();
    for via in HTTP1 {
        for hosts in [["outer", "inner"], ["outer", "outer"]] {
            let r = send(&bus, via, "/x", &[("Host", hosts[0]), ("host", hosts[1])]).await;
            assert_eq!(r.status, 400, "{via:?} {hosts:?}: {}", r.body);
            assert!(r.body.contains("Host"), "{via:?}: {}", r.body);
        }
    }
    // RFC 9112 §3.2.2: the target's authority is the host; a Host that names another
    // one is not believed either way, and the request goes nowhere.
    for via in HTTP1 {
        let r = send(&bus, via, "http://inner/x", &[("Host", "outer")]).await;
        assert_eq!(r.status, 400, "{via:?}: {}", r.body);
    }
    assert_eq!(
        a.hits(),
        before,
        "no ambiguous request reached the upstream"
    );
}

/// Two `Authorization` headers: 400 on every way in, also on a route without admission;
/// busbar would verify one and the upstream might read the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_authorization_is_refused() {
    let a = Backend::start("a").await;
    let bus = start_with_jwt(&format!(
        r#"
[[service]]
name = "a"
endpoints = [{{ addr = "{a}" }}]
[[route]]
name = "api"
path_prefix = "/api"
service = "a"
[route.admission]
identity = ["jwt", "client_ip"]
[[route]]
name = "keys"
path_prefix = "/keys"
service = "a"
[route.admission]
identity = ["api_key", "client_ip"]
[[route]]
name = "plain"
service = "a"
"#,
        a = a.addr
    ))
    .await;
    let good = format!("Bearer {}", jwt(claims("alice".into())));
    let forged = format!("Bearer {}", jwt(claims("admin".into())).replace('.', ".x"));
    for via in ALL {
        let r = send(&bus, via, "/api/me", &[("Authorization", &good)]).await;
        assert_eq!(r.status, 200, "{via:?}: {}", r.body);
        for path in ["/api/me", "/other"] {
            for pair in [[&good, &forged], [&good, &good]] {
                let headers = [
                    ("Authorization", pair[0].as_str()),
                    ("authorization", pair[1]),
                ];
                let r = send(&bus, via, path, &headers).await;
                assert_eq!(r.status, 400, "{via:?} {path}: {}", r.body);
                assert_eq!(r.json("error"), "duplicate_authorization", "{via:?}");
            }
        }
    }
    assert_eq!(
        a.hits(),
        ALL.len(),
        "only the single-credential requests went up"
    );
    assert!(a.seen().iter().all(|s| s.headers["authorization"] == good));
    // The same for the API key header: one is checked, two are refused.
    for via in ALL {
        let r = send(&bus, via, "/keys/me", &[("x-api-key", API_KEY)]).await;
        assert_eq!(r.status, 200, "{via:?}: {}", r.body);
        let two = [("x-api-key", API_KEY), ("x-api-key", "guessed")];
        let r = send(&bus, via, "/keys/me", &two).await;
        assert_eq!(r.status, 401, "{via:?}: {}", r.body);
        assert_eq!(r.json("reason"), "malformed_credentials", "{via:?}");
    }
    assert_eq!(a.hits(), 2 * ALL.len());
}

/// `x-user-id` from a peer outside `trusted_proxies` is not believed, and not forwarded:
/// an upstream reading it would take busbar's word for an identity busbar refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_busbar_did_not_believe_are_removed() {
    let a = Backend::start("a").await;
    let bus = start_with_jwt(&format!(
        r#"
[[service]]
name = "a"
endpoints = [{{ addr = "{a}" }}]
[[route]]
name = "untrusted"
path_prefix = "/u"
service = "a"
[route.admission]
identity = ["header:x-user-id", "client_ip"]
trusted_proxies = ["10.0.0.0/8"]
[[route]]
name = "trusted"
path_prefix = "/t"
service = "a"
[route.admission]
identity = ["header:x-user-id"]
trusted_proxies = ["127.0.0.1"]
[[route]]
name = "token-first"
path_prefix = "/j"
service = "a"
[route.admission]
identity = ["jwt", "header:x-user-id"]
trusted_proxies = ["127.0.0.1"]
"#,
        a = a.addr
    ))
    .await;
    let bearer = format!("Bearer {}", jwt(claims("alice".into())));
    for via in ALL {
        let before = a.hits();
        let spoof = [("x-user-id", "admin"), ("x-busbar-user", "admin")];
        assert_eq!(send(&bus, via, "/u/x", &spoof).await.status, 200, "{via:?}");
        let seen = since(&a, before);
        assert_eq!(seen.len(), 1, "{via:?}");
        assert!(
            !seen[0].headers.contains_key("x-user-id"),
            "{via:?}: {:?}",
            seen[0].headers
        );
        assert!(!seen[0].headers.contains_key("x-busbar-user"), "{via:?}");

        // Believed (a trusted peer): it stays, and busbar says the same.
        assert_eq!(send(&bus, via, "/t/x", &spoof).await.status, 200);
        let seen = since(&a, before + 1);
        assert_eq!(seen[0].headers["x-user-id"], "admin", "{via:?}");
        assert_eq!(seen[0].headers["x-busbar-user"], "admin", "{via:?}");

        // A token said who the caller is: the header is not who it is.
        let headers = [("Authorization", bearer.as_str()), spoof[0]];
        assert_eq!(send(&bus, via, "/j/x", &headers).await.status, 200);
        let seen = since(&a, before + 2);
        assert_eq!(seen[0].headers["x-busbar-user"], "alice", "{via:?}");
        assert!(!seen[0].headers.contains_key("x-user-id"), "{via:?}");
    }
}

/// Service `a` at `backend` and route `api` to it whose users are the JWT's subject, or
/// the client's address without one.
fn jwt_or_client_ip(backend: std::net::SocketAddr) -> String {
    format!(
        r#"
[[service]]
name = "a"
endpoints = [{{ addr = "{backend}" }}]
[[route]]
name = "api"
service = "a"
[route.admission]
identity = ["jwt", "client_ip"]
"#
    )
}

/// `Bearer<TAB>token`, `Bearer<token>` and other malformed bearer credentials on a JWT
/// route are 401s, not anonymous requests forwarded with the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bearer_credentials_are_refused() {
    let a = Backend::start("a").await;
    let bus = start_with_jwt(&jwt_or_client_ip(a.addr)).await;
    let forged = jwt(claims("admin".into())).replace(".", ".A");
    let good = jwt(claims("alice".into()));
    let malformed = [
        format!("Bearer\t{forged}"),
        format!("Bearer{forged}"),
        format!("bearer\t{good}"),
        format!("Bearer{good}"),
        format!("Bearer {good} x"),
        "Bearer".to_string(),
    ];
    for via in ALL {
        for value in &malformed {
            let r = send(&bus, via, "/me", &[("Authorization", value)]).await;
            assert_eq!(r.status, 401, "{via:?} {value:?}: {}", r.body);
            assert_eq!(
                r.json("reason"),
                "malformed_credentials",
                "{via:?} {value:?}"
            );
        }
    }
    assert_eq!(a.hits(), 0, "nothing malformed reached the upstream");
    // The scheme in any case with one or more spaces is a bearer credential.
    for via in ALL {
        for value in [format!("bearer {good}"), format!("Bearer   {good}")] {
            let r = send(&bus, via, "/me", &[("Authorization", &value)]).await;
            assert_eq!(r.status, 200, "{via:?} {value:?}: {}", r.body);
            assert_eq!(a.seen().last().unwrap().headers["x-busbar-user"], "alice");
        }
    }
}

/// A JWT `sub` of `" admin "` is refused (an upstream would read `admin`); a numeric one
/// is its decimal digits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_subjects_with_spaces_at_the_ends_are_refused() {
    let a = Backend::start("a").await;
    let bus = start_with_jwt(&jwt_or_client_ip(a.addr)).await;
    for via in ALL {
        for sub in [" admin ", "admin ", " admin"] {
            let bearer = format!("Bearer {}", jwt(claims(sub.into())));
            let r = send(&bus, via, "/me", &[("Authorization", &bearer)]).await;
            assert_eq!(r.status, 401, "{via:?} {sub:?}: {}", r.body);
            assert_eq!(r.json("reason"), "missing_claim", "{via:?}");
        }
    }
    assert_eq!(a.hits(), 0);
    for via in ALL {
        let bearer = format!("Bearer {}", jwt(claims(42.into())));
        let r = send(&bus, via, "/me", &[("Authorization", &bearer)]).await;
        assert_eq!(r.status, 200, "{via:?}: {}", r.body);
        assert_eq!(a.seen().last().unwrap().headers["x-busbar-user"], "42");
    }
}
