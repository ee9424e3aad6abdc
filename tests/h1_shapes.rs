//! The rarer HTTP/1.x shapes on busbar's own engine (`src/drivers/h1/`, issue 20), which
//! pingora's proxy served before: a `Connection` naming other headers, an `Expect` other
//! than `100-continue`, transfer codings other than `chunked` (refused with the RFC's
//! status) and `chunked` with spaces around it, absolute-form targets, a `;` in the path,
//! more header lines than the engine's usual room, and the TLS flag of the request
//! context.
//!
//! The engine is told from pingora's proxy by what only it does: it passes a chunked
//! response on as the upstream framed it, trailers included, where pingora decodes the
//! body and chunks it anew without them. Every answer of the upstream here ends with the
//! trailer `x-sum: 11`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http1::{Conn, Response};
use common::Busbar;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the upstream received it.
#[derive(Debug, Clone)]
struct Got {
    /// The head, lowercase, through its blank line.
    head: String,
    /// The body as it came on the wire (chunked framing included).
    body: Vec<u8>,
}

/// An upstream that records each request and answers it with a chunked body that names
/// the request's path, and a trailer.
struct Upstream {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

/// How the upstream's answers end: only busbar's engine passes the trailer on.
const TRAILER_END: &[u8] = b"0\r\nx-sum: 11\r\n\r\n";

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(answer(s, seen.clone()));
            }
        });
        Upstream { addr, got, task }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads into `buf` until `done` says where what is wanted ends; `None` at the close.
async fn read_until(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> Option<usize>,
) -> Option<usize> {
    loop {
        if let Some(n) = done(buf) {
            return Some(n);
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
}

async fn answer(mut s: TcpStream, got: Arc<Mutex<Vec<Got>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = common::read_head(&mut s, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        buf.drain(..end);
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        let body_end = if header("transfer-encoding").is_some() {
            read_until(&mut s, &mut buf, common::http1::chunked_end).await
        } else {
            let n: usize = header("content-length").map_or(0, |v| v.parse().unwrap_or(0));
            read_until(&mut s, &mut buf, |b| (b.len() >= n).then_some(n)).await
        };
        let Some(body_end) = body_end else {
            return;
        };
        let body: Vec<u8> = buf.drain(..body_end).collect();
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        got.lock().unwrap().push(Got { head, body });
        let reply = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{path}\r\n{}",
            path.len(),
            String::from_utf8_lossy(TRAILER_END)
        );
        if s.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// busbar with one service `s` at `up` and one route for every request, `limits` in its
/// `[limits]`.
async fn bus(up: &Upstream, limits: &str) -> Busbar {
    Busbar::start(&format!(
        r#"
[limits]
{limits}

[[service]]
name = "s"
endpoints = [{{ addr = "{}" }}]
[[route]]
name = "all"
service = "s"
"#,
        up.addr
    ))
    .await
}

/// The answer was busbar's engine's: a 200 whose chunked body came as the upstream sent
/// it, trailer and all.
fn assert_engine(r: &Response, what: &str) {
    assert_eq!(r.status(), 200, "{what}: {}{}", r.head, r.text());
    assert!(
        r.complete && r.body.ends_with(TRAILER_END),
        "{what}: not busbar's engine (pingora drops trailers): {:?}",
        r.text()
    );
}

/// A refusal of busbar's own: the status, and its JSON `error` and `message`.
fn refusal(r: &Response) -> (u16, String, String) {
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let text = |k: &str| v[k].as_str().unwrap_or("").to_string();
    (r.status(), text("error"), text("message"))
}

async fn ask(bus: &Busbar, request: &[u8]) -> Response {
    Conn::connect(bus.http).await.ask(request, false).await
}

/// RFC 9110 §7.6.1: a header `Connection` names stays on the client's hop; the framing
/// header the body came with is kept (busbar forwards the body as it came, as nginx
/// does; pingora's proxy removed the length and chunked the body anew); Host and the
/// `X-Forwarded-*` headers cannot be named away (400, as pingora's proxy answered).
#[tokio::test]
async fn headers_connection_names_are_dropped_upstream_and_the_connection_goes_on() {
    let up = Upstream::start().await;
    let bus = bus(&up, "").await;
    let mut c = Conn::connect(bus.http).await;
    let r = c
        .ask(
            b"GET /named HTTP/1.1\r\nHost: a\r\nX-Hop: 1\r\nConnection: x-hop, keep-alive\r\nX-Kept: 2\r\n\r\n",
            false,
        )
        .await;
    assert_engine(&r, "x-hop");
    assert_eq!(r.header("connection"), Some("keep-alive"), "{}", r.head);
    let r = c
        .ask(
            b"POST /framing HTTP/1.1\r\nHost: a\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
            false,
        )
        .await;
    assert_engine(&r, "content-length named, on the same connection");
    let got = up.got();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(!got[0].head.contains("x-hop"), "{}", got[0].head);
    assert!(!got[0].head.contains("connection:"), "{}", got[0].head);
    assert!(got[0].head.contains("x-kept: 2"), "{}", got[0].head);
    assert!(got[1].head.contains("content-length: 5"), "{}", got[1].head);
    assert!(
        !got[1].head.contains("transfer-encoding"),
        "{}",
        got[1].head
    );
    assert_eq!(got[1].body, b"hello");

    for (connection, says) in [
        ("host", "Host"),
        ("x-forwarded-for", "X-Forwarded"),
        ("\"x-a\"", "not a header name"),
        ("a, b, c, d, e, f, g, h, i, close", "Connection tokens"),
    ] {
        let request =
            format!("GET /refused HTTP/1.1\r\nHost: a\r\nConnection: {connection}\r\n\r\n");
        let r = ask(&bus, request.as_bytes()).await;
        let (status, error, message) = refusal(&r);
        assert_eq!(
            (status, error.as_str()),
            (400, "malformed_request"),
            "{connection}: {}",
            r.text()
        );
        assert!(message.contains(says), "{connection}: {message}");
    }
    assert_eq!(up.got().len(), 2, "nothing refused went upstream");
}

/// RFC 9110 §10.1.1: an expectation busbar does not know goes upstream as it came (as
/// pingora's proxy, HAProxy and Envoy pass it); a list with `100-continue` in it still
/// makes the client wait, and busbar does not leave it waiting.
#[tokio::test]
async fn other_expectations_go_upstream_and_a_waiting_client_is_told_to_continue() {
    let up = Upstream::start().await;
    let bus = bus(&up, "").await;
    let r = ask(
        &bus,
        b"POST /foo HTTP/1.1\r\nHost: a\r\nExpect: foo\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_engine(&r, "expect foo");
    let mut c = Conn::connect(bus.http).await;
    c.send(
        b"POST /list HTTP/1.1\r\nHost: a\r\nExpect: 100-continue, foo\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let go = c.read_response(false).await;
    assert_eq!(go.status(), 100, "{}", go.head);
    c.send(b"hello").await.unwrap();
    assert_engine(&c.read_response(false).await, "expect list");
    let got = up.got();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].head.contains("expect: foo\r\n"), "{}", got[0].head);
    assert!(
        got[1].head.contains("expect: 100-continue, foo\r\n"),
        "{}",
        got[1].head
    );
    assert_eq!(
        (&got[0].body[..], &got[1].body[..]),
        (&b"hello"[..], &b"hello"[..])
    );
}

/// RFC 9112 §6.1: a transfer coding busbar does not implement is a 501 (nginx's answer
/// too); `chunked` not last, or twice, leaves the length unknown: 400 (§6.3). Nothing
/// reaches the upstream. Spaces around `chunked` or a length are whitespace the RFC
/// allows: served.
#[tokio::test]
async fn transfer_codings_get_the_rfcs_status_and_spaces_around_chunked_are_served() {
    let up = Upstream::start().await;
    let bus = bus(&up, "").await;
    for (coding, status, error) in [
        ("gzip, chunked", 501, "unsupported_transfer_coding"),
        ("x-custom,chunked", 501, "unsupported_transfer_coding"),
        ("chunked, gzip", 400, "malformed_request"),
        ("chunked, chunked", 400, "malformed_request"),
        ("gzip", 400, "malformed_request"),
    ] {
        let request = format!(
            "POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {coding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let r = ask(&bus, request.as_bytes()).await;
        let got = refusal(&r);
        assert_eq!(
            (got.0, got.1.as_str()),
            (status, error),
            "{coding}: {}{}",
            r.head,
            r.text()
        );
        assert!(!got.2.is_empty(), "{coding}: a reason");
        assert_eq!(r.header("connection"), Some("close"), "{coding}");
    }
    assert!(up.got().is_empty(), "{:?}", up.got());

    let mut c = Conn::connect(bus.http).await;
    let r = c
        .ask(
            b"POST /spaced HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  chunked \r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            false,
        )
        .await;
    assert_engine(&r, "chunked with spaces");
    let r = c
        .ask(
            b"POST /length HTTP/1.1\r\nHost: a\r\nContent-Length: 5  \r\n\r\nhello",
            false,
        )
        .await;
    assert_engine(&r, "a length with spaces after it");
    let got = up.got();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].body, b"5\r\nhello\r\n0\r\n\r\n");
    assert_eq!(got[1].body, b"hello");
}

/// RFC 9112 §3.2.2: an absolute-form target (a client whose `HTTP_PROXY` is busbar)
/// goes upstream in origin form with `Host` from its authority, and is counted as a
/// forward-proxy fallback when the mesh routes it. A `Host` that says otherwise (a client
/// MUST send them identical, §3.2), userinfo (RFC 9110 §4.2.4) and schemes busbar does
/// not speak are refused with busbar's JSON and a reason (pingora's proxy answered an
/// empty 400, or forwarded `ftp://…` as it came).
#[tokio::test]
async fn absolute_form_targets_are_served_and_bad_ones_refused_with_a_reason() {
    let up = Upstream::start().await;
    // No route: the mesh fallback routes by the target's host.
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "orders"
endpoints = [{{ addr = "{}" }}]
"#,
        up.addr
    ))
    .await;
    let mut c = Conn::connect(bus.http).await;
    let r = c
        .ask(
            b"GET http://orders/x?q=1 HTTP/1.1\r\nHost: orders\r\n\r\n",
            false,
        )
        .await;
    assert_engine(&r, "absolute form");
    let r = c
        .ask(
            b"POST http://orders:8080?only HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
            false,
        )
        .await;
    assert_engine(&r, "absolute form without Host, on the same connection");
    let got = up.got();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[0].head.starts_with("get /x?q=1 http/1.1\r\n"),
        "{}",
        got[0].head
    );
    assert!(
        got[0].head.contains("\r\nhost: orders\r\n"),
        "{}",
        got[0].head
    );
    assert!(
        got[1].head.starts_with("post /?only http/1.1\r\n"),
        "{}",
        got[1].head
    );
    assert!(
        got[1].head.contains("\r\nhost: orders:8080\r\n"),
        "{}",
        got[1].head
    );
    assert_eq!(got[1].body, b"hi");
    assert_eq!(
        bus.metric_settled(
            r#"busbar_fallback_requests_total{reason="forward_proxy",service="orders"}"#,
            2.0
        )
        .await,
        2.0
    );

    for (request, says) in [
        (
            &b"GET http://orders/x HTTP/1.1\r\nHost: payments\r\n\r\n"[..],
            "Host differs",
        ),
        (
            b"GET http://orders:80/x HTTP/1.1\r\nHost: orders\r\n\r\n",
            "Host differs",
        ),
        (b"GET http://u@orders/x HTTP/1.1\r\n\r\n", "userinfo"),
        (
            b"GET ftp://orders/x HTTP/1.1\r\nHost: orders\r\n\r\n",
            "scheme",
        ),
        (b"GET http:/\\orders/x HTTP/1.1\r\n\r\n", "ambiguous"),
    ] {
        let r = ask(&bus, request).await;
        let (status, error, message) = refusal(&r);
        let what = String::from_utf8_lossy(request);
        assert_eq!(
            (status, error.as_str()),
            (400, "malformed_request"),
            "{what}: {}",
            r.text()
        );
        assert!(message.contains(says), "{what}: {message}");
    }
    assert_eq!(up.got().len(), 2, "nothing refused went upstream");
}

/// RFC 9112 §3.2.4: `OPTIONS *` asks about the server as a whole: it goes upstream as it
/// came; `*` with any other method is refused (pingora's proxy forwarded `GET *`).
#[tokio::test]
async fn options_asterisk_is_served_and_the_asterisk_is_for_options_only() {
    let up = Upstream::start().await;
    let bus = bus(&up, "").await;
    assert_engine(
        &ask(&bus, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").await,
        "OPTIONS *",
    );
    let r = ask(&bus, b"GET * HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let (status, error, message) = refusal(&r);
    assert_eq!(
        (status, error.as_str()),
        (400, "malformed_request"),
        "{}",
        r.text()
    );
    assert!(message.contains("OPTIONS"), "{message}");
    let got = up.got();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].head.starts_with("options * http/1.1\r\n"),
        "{}",
        got[0].head
    );
}

/// A `;` in the path gives it two readings (`/api;x/admin` is `/api/admin` to Tomcat):
/// the engine serves it, the ACL judges both readings, and readings that pick two
/// routes are refused. The path goes upstream as it came.
#[tokio::test]
async fn paths_with_parameters_are_served_by_the_engine_and_judged_both_ways() {
    let up = Upstream::start().await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{}" }}]
[[route]]
name = "app"
path_prefix = "/api"
service = "s"
[route.admission]
deny_paths = ["/api/admin"]
[[route]]
name = "rest"
service = "s"
"#,
        up.addr
    ))
    .await;
    let mut c = Conn::connect(bus.http).await;
    let r = c
        .ask(b"GET /api/x;v=1/y HTTP/1.1\r\nHost: a\r\n\r\n", false)
        .await;
    assert_engine(&r, "a parameter");
    let r = ask(&bus, b"GET /api;x/admin HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let (status, _, _) = refusal(&r);
    assert_eq!(status, 403, "{}", r.text());
    let r = ask(&bus, b"GET /api/admin/..;x/.. HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let (status, error, _) = refusal(&r);
    assert_eq!(
        (status, error.as_str()),
        (400, "ambiguous_path"),
        "{}",
        r.text()
    );
    let got = up.got();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].head.starts_with("get /api/x;v=1/y http/1.1"),
        "{}",
        got[0].head
    );
}

/// `[limits] max_headers` may allow more lines than the engine's usual room (128): such a
/// head is still the engine's, every line forwarded; one past the limit is a 431.
#[tokio::test]
async fn a_head_with_many_lines_within_the_limit_is_served_by_the_engine() {
    let up = Upstream::start().await;
    let bus = bus(&up, "max_headers = 200").await;
    let lines: String = (0..190).map(|i| format!("X-Line-{i}: {i}\r\n")).collect();
    let request = format!("GET /many HTTP/1.1\r\nHost: a\r\n{lines}\r\n");
    assert_engine(&ask(&bus, request.as_bytes()).await, "190 lines");
    let got = up.got();
    assert_eq!(got.len(), 1);
    assert!(
        got[0].head.contains("x-line-189: 189\r\n"),
        "{}",
        got[0].head
    );
    let lines: String = (0..200).map(|i| format!("X-Line-{i}: {i}\r\n")).collect();
    let request = format!("GET /too-many HTTP/1.1\r\nHost: a\r\n{lines}\r\n");
    assert_eq!(ask(&bus, request.as_bytes()).await.status(), 431);
    assert_eq!(up.got().len(), 1);
}

/// The engine's request context knows the connection is TLS (`ctx.tls`, which pingora's
/// path and the HTTP/2 engine set too): the one upstream-head builder reads it for
/// `X-Forwarded-Proto` and `Forwarded`. (A bodiless HTTP/1.1 GET over TLS is the
/// engine's: `tests/tls_front.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_engine_says_https_upstream() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_bus, tls, _) =
        common::tls::busbar_with_tls(&common::one_route(up.addr, "", ""), dir.path()).await;
    let client = reqwest::Client::builder()
        .resolve("localhost", tls)
        .danger_accept_invalid_certs(true)
        .http1_only()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/tls", tls.port());
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let got = up.got();
    assert_eq!(got.len(), 1);
    assert!(
        got[0].head.contains("x-forwarded-proto: https\r\n"),
        "{}",
        got[0].head
    );
    assert!(got[0].head.contains("proto=https"), "{}", got[0].head);
}
