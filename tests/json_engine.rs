//! JSON→gRPC on busbar's own engines (`drivers::h1::json`, `drivers::h2::json`), against
//! the real binary: each test shows the engine, not pingora's proxy, served the JSON
//! caller (a behaviour only the engine has: the `100 Continue` it sends a waiting
//! HTTP/1 client as the call reads the body, which pingora never sends; its HTTP/2
//! front door's 431 for too many header fields), for HTTP/1.1 (plaintext and TLS) and
//! h2c; a server stream written as its messages arrive, and cancelled upstream when the
//! client resets its stream or closes; a client stream sent upstream as its messages
//! arrive.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busbar_testkit::pb::Book;
use busbar_testkit::GrpcBackend;
use bytes::Bytes;
use common::h2raw::RawH2;
use common::Busbar;
use h2::Reason;
use prost::Message;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;

const WAIT: Duration = Duration::from_secs(15);

fn proto() -> String {
    format!(
        "{}/tests/protos/bookstore.proto",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// One JSON→gRPC route (`/v1/`, the bookstore proto) to the h2c service at `addr`;
/// `sections` before it (e.g. `[limits]`). No gRPC-Web route: HTTP/2 clients are the
/// engine's.
fn config(addr: SocketAddr, sections: &str) -> String {
    format!(
        "{sections}\n[[service]]\nname = \"books\"\nprotocol = \"h2c\"\nendpoints = [{{ addr = \"{addr}\" }}]\n\
         [[route]]\nname = \"json\"\npath_prefix = \"/v1/\"\nservice = \"books\"\n\
         [route.translate]\nfrom = \"json\"\nprotos = [\"{}\"]\n",
        proto()
    )
}

async fn until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// Reads from `s` until `want` is in what was read (returned whole), or fails after
/// [`WAIT`] or at the connection's end.
async fn read_until<S: AsyncRead + Unpin>(s: &mut S, got: &mut Vec<u8>, want: &[u8]) {
    let end = Instant::now() + WAIT;
    while !got.windows(want.len()).any(|w| w == want) {
        let left = end.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "no {:?} (read: {other:?}); got:\n{}",
                String::from_utf8_lossy(want),
                String::from_utf8_lossy(got)
            ),
        }
    }
}

/// An Echo call with `Expect: 100-continue` on `s`: the engine says `100 Continue`
/// before the client sends its body (pingora's proxy never does: this waits for it),
/// then answers the call.
async fn echo_with_expect<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> (String, Value) {
    let body = br#"{"title":"Dune","pageCount":"412"}"#;
    let head = format!(
        "POST /v1/echo HTTP/1.1\r\nHost: books\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    read_until(s, &mut got, b"HTTP/1.1 100 Continue\r\n\r\n").await;
    assert!(got.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
    got.drain(..25);
    s.write_all(body).await.unwrap();
    read_until(s, &mut got, b"\r\n\r\n").await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, _) = text.split_once("\r\n\r\n").unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("a length: {head}"));
    let want = head.len() + 4 + len;
    while got.len() < want {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the body in time")
            .unwrap();
        assert!(n > 0, "the body: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, json) = text.split_once("\r\n\r\n").unwrap();
    (head.to_string(), serde_json::from_str(json).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_json_caller_is_served_by_the_engine_with_100_continue() {
    let backend = GrpcBackend::start(1).await;
    let bus = Busbar::start(&config(backend.addr, "")).await;
    let mut s = TcpStream::connect(bus.http).await.unwrap();
    // Twice on one connection: the engine's keep-alive goes on after a JSON call.
    for _ in 0..2 {
        let (head, v) = echo_with_expect(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.contains("Connection: keep-alive"), "{head}");
        assert_eq!(v, json!({"title": "Dune", "pageCount": "412"}));
    }
    assert_eq!(backend.calls().len(), 2);
    assert_eq!(backend.calls()[0].method, "Echo");
    // Logged and counted as on every route.
    let line = access_line(&bus, "/v1/echo").await;
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    let sample = r#"busbar_requests_total{class="2xx",method="POST",reason="",route="json",service="books"}"#;
    assert_eq!(bus.metric_settled(sample, 2.0).await, 2.0);
}

/// The engine renders a plain `200` JSON answer's head itself: it carries what every
/// JSON answer does (`Content-Type`, `Content-Length` of the body, `Cache-Control:
/// no-store`, `Date`) and, on a rate-limited route, admission's `RateLimit-*` fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_json_answer_carries_its_fields_and_the_rate_limit() {
    let backend = GrpcBackend::start(1).await;
    let config = config(backend.addr, "").replace(
        "[route.translate]",
        "[route.admission]\nidentity = [\"client_ip\"]\n\
         rate_limit = { rate = \"1/m\", burst = 3 }\n[route.translate]",
    );
    let bus = Busbar::start(&config).await;
    let body = br#"{"title":"Dune","pageCount":"412"}"#;
    let req = format!(
        "POST /v1/echo HTTP/1.1\r\nHost: books\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        String::from_utf8_lossy(body)
    );
    let (text, _) = common::http1::exchange(bus.http, req.as_bytes(), WAIT).await;
    let (head, json) = text.split_once("\r\n\r\n").expect("a head");
    let fields: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    let field = |name: &str| {
        let all: Vec<&str> = fields
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(all.len(), 1, "one {name} in:\n{head}");
        all[0].to_string()
    };
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(field("content-type"), "application/json");
    assert_eq!(field("content-length"), json.len().to_string());
    assert_eq!(field("cache-control"), "no-store");
    assert!(field("date").ends_with(" GMT"), "{head}");
    assert_eq!(field("connection"), "close");
    assert_eq!(field("ratelimit-limit"), "3");
    assert_eq!(field("ratelimit-remaining"), "2");
    let v: Value = serde_json::from_str(json).unwrap();
    assert_eq!(v, json!({"title": "Dune", "pageCount": "412"}));
    assert_eq!(backend.calls().len(), 1);
}

/// The access-log line of the request for `path` (waits for it).
async fn access_line(bus: &Busbar, path: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = bus
            .access_log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["path"] == path);
        if let Some(v) = found {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no access-log line for {path}:\n{}",
            bus.access_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_json_caller_is_served_by_the_engine_with_100_continue() {
    let backend = GrpcBackend::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::tls::self_signed_files(dir.path(), &["books.test"]);
    let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let line = format!(
        "tls = [{{ addr = \"{addr}\", cert = \"{}\", key = \"{}\" }}]",
        cert.display(),
        key.display()
    );
    let bus = Busbar::start_with_header(&config(backend.addr, ""), &line).await;
    assert!(
        until(WAIT, || std::net::TcpStream::connect(addr).is_ok()).await,
        "TLS listener up: {}",
        bus.stderr()
    );
    let tls_config = common::tls::trusting_client(&[b"http/1.1"]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("books.test".to_string()).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(tls_config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (head, v) = echo_with_expect(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(v, json!({"title": "Dune", "pageCount": "412"}));
    let calls = backend.calls();
    assert_eq!(calls.len(), 1);
    assert!(
        calls[0]
            .metadata
            .iter()
            .any(|(k, v)| k == "x-forwarded-proto" && v == "https"),
        "{:?}",
        calls[0].metadata
    );
}

/// An h2c connection (prior knowledge) to busbar with the `h2` crate.
async fn h2c(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn h2_request(bus: &Busbar, method: &str, path: &str) -> http::request::Builder {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", bus.http))
}

/// The engine's HTTP/2 front door holds a stream to `max_headers` fields: 431, busbar's
/// own JSON, nothing upstream (pingora's proxy passes such a request on).
async fn engine_refuses_too_many_fields(bus: &Busbar, send: &mut h2::client::SendRequest<Bytes>) {
    let mut req = h2_request(bus, "GET", "/v1/books/7");
    for i in 0..12 {
        req = req.header(format!("x-extra-{i}"), "v");
    }
    let (resp, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
    let resp = tokio::time::timeout(WAIT, resp)
        .await
        .expect("an answer")
        .expect("a response");
    assert_eq!(resp.status(), 431, "{:?}", resp.headers());
}

async fn body_of(resp: http::Response<h2::RecvStream>) -> (u16, Value) {
    let status = resp.status().as_u16();
    let mut rx = resp.into_body();
    let mut body = Vec::new();
    while let Some(d) = tokio::time::timeout(WAIT, rx.data()).await.expect("data") {
        let d = d.unwrap();
        let _ = rx.flow_control().release_capacity(d.len());
        body.extend_from_slice(&d);
    }
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_json_caller_is_served_by_the_engine() {
    let backend = GrpcBackend::start(1).await;
    let bus = Busbar::start(&config(backend.addr, "[limits]\nmax_headers = 8\n")).await;
    let mut send = h2c(bus.http).await;
    engine_refuses_too_many_fields(&bus, &mut send).await;
    assert!(backend.calls().is_empty(), "nothing reached the backend");
    // The same connection's JSON calls are answered: a GET, and a POST with a body.
    let req = h2_request(&bus, "GET", "/v1/shelves/3/books/42?with_reviews=true");
    let (resp, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let (status, v) = body_of(resp).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id"], "42");
    let req = h2_request(&bus, "POST", "/v1/echo").header("content-type", "application/json");
    let (resp, mut tx) = send.send_request(req.body(()).unwrap(), false).unwrap();
    tx.send_data(Bytes::from_static(br#"{"title":"Dune"}"#), true)
        .unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    let (status, v) = body_of(resp).await;
    assert_eq!((status, v), (200, json!({"title": "Dune"})));
    // A gRPC status comes back in the translation's shape.
    let req = h2_request(&bus, "POST", "/v1/fail");
    let (resp, mut tx) = send.send_request(req.body(()).unwrap(), false).unwrap();
    tx.send_data(Bytes::from_static(br#"{"code":5,"message":"gone"}"#), true)
        .unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    let (status, v) = body_of(resp).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["code"], 5, "{v}");
    assert_eq!(backend.calls().len(), 3);
    let line = access_line(&bus, "/v1/fail").await;
    assert_eq!(line["status"], 404, "{line}");
    let sample = r#"busbar_requests_total{class="2xx",method="POST",reason="",route="json",service="books"}"#;
    assert_eq!(bus.metric_settled(sample, 1.0).await, 1.0);
}

/// What a raw gRPC upstream does with each stream.
#[derive(Clone, Copy)]
enum Mode {
    /// Answers one message (a book titled "first"), then waits: records how the
    /// stream ended.
    Hold,
    /// Records each request message as it comes (`msg:<bytes>`), and once the request
    /// ends answers one book titled with the count of messages, and status 0.
    Collect,
}

/// A raw gRPC upstream (`common::h2raw`) serving each stream by its mode.
struct Raw {
    addr: SocketAddr,
    events: Arc<Mutex<Vec<String>>>,
    _server: RawH2,
}

fn frame(book: &Book) -> Bytes {
    let m = book.encode_to_vec();
    let mut f = vec![0];
    f.extend_from_slice(&(m.len() as u32).to_be_bytes());
    f.extend_from_slice(&m);
    Bytes::from(f)
}

impl Raw {
    async fn start(mode: Mode) -> Raw {
        let events = Arc::new(Mutex::new(Vec::new()));
        let e = events.clone();
        let server =
            RawH2::start(move |req, respond| raw_stream(mode, req, respond, e.clone())).await;
        Raw {
            addr: server.addr,
            events,
            _server: server,
        }
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
}

async fn raw_stream(
    mode: Mode,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    events: Arc<Mutex<Vec<String>>>,
) {
    let head = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let mut body = req.into_body();
    let Ok(mut tx) = respond.send_response(head, false) else {
        return;
    };
    match mode {
        Mode::Hold => {
            let first = Book {
                id: 1,
                title: "first".into(),
                ..Default::default()
            };
            let _ = tx.send_data(frame(&first), false);
            let reason = std::future::poll_fn(|cx| tx.poll_reset(cx)).await;
            let what = match reason {
                Ok(r) => format!("reset:{r:?}"),
                Err(e) => format!("error:{e}"),
            };
            events.lock().unwrap().push(what);
        }
        Mode::Collect => {
            let mut n = 0;
            while let Some(Ok(d)) = body.data().await {
                let _ = body.flow_control().release_capacity(d.len());
                if d.is_empty() {
                    continue;
                }
                n += 1;
                events.lock().unwrap().push(format!("msg:{}", d.len()));
            }
            let reply = Book {
                id: n,
                title: format!("{n} messages"),
                ..Default::default()
            };
            let _ = tx.send_data(frame(&reply), false);
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            let _ = tx.send_trailers(t);
        }
    }
}

/// A server stream over h2c is written as its messages arrive (the first line comes
/// while the service holds the stream open), and a client that resets its stream
/// leaves the service's stream reset with CANCEL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_server_stream_flows_and_a_client_reset_cancels_the_call() {
    let up = Raw::start(Mode::Hold).await;
    let bus = Busbar::start(&config(up.addr, "[limits]\nmax_headers = 8\n")).await;
    let mut send = h2c(bus.http).await;
    engine_refuses_too_many_fields(&bus, &mut send).await;
    let req = h2_request(&bus, "GET", "/v1/shelves/1/books?count=5");
    // The request ends with its head; its handle stays, to reset the stream with.
    let (resp, mut tx) = send.send_request(req.body(()).unwrap(), true).unwrap();
    let resp = tokio::time::timeout(WAIT, resp)
        .await
        .expect("a head")
        .expect("a response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut rx = resp.into_body();
    let first = tokio::time::timeout(WAIT, rx.data())
        .await
        .expect("the first message")
        .unwrap()
        .unwrap();
    let line: Value = serde_json::from_slice(first.strip_suffix(b"\n").unwrap()).unwrap();
    assert_eq!(line, json!({"id": "1", "title": "first"}));
    assert!(up.events().is_empty(), "the service's stream is still open");
    tx.send_reset(Reason::CANCEL);
    assert!(
        until(WAIT, || !up.events().is_empty()).await,
        "the upstream saw the stream end\n{}",
        bus.stderr()
    );
    assert_eq!(up.events(), ["reset:CANCEL"]);
}

/// The same over HTTP/1.1: the stream comes chunked as its messages arrive, and a
/// client that closes its connection leaves the service's stream reset with CANCEL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_server_stream_flows_and_a_client_close_cancels_the_call() {
    let up = Raw::start(Mode::Hold).await;
    let bus = Busbar::start(&config(up.addr, "")).await;
    let mut s = TcpStream::connect(bus.http).await.unwrap();
    s.write_all(b"GET /v1/shelves/1/books HTTP/1.1\r\nHost: books\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut s, &mut got, b"\"first\"}\n\r\n").await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("transfer-encoding: chunked\r\n"),
        "{text}"
    );
    assert!(up.events().is_empty(), "the service's stream is still open");
    drop(s);
    assert!(
        until(WAIT, || !up.events().is_empty()).await,
        "the upstream saw the stream end\n{}",
        bus.stderr()
    );
    assert_eq!(up.events(), ["reset:CANCEL"]);
}

/// A client stream (NDJSON) goes to the service message by message: the service has
/// the first before the client sends the second. Over h2c, and over HTTP/1.1 chunked
/// after the engine's `100 Continue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stream_goes_upstream_as_its_messages_arrive() {
    let up = Raw::start(Mode::Collect).await;
    let bus = Busbar::start(&config(up.addr, "[limits]\nmax_headers = 8\n")).await;
    let msgs = |up: &Raw| up.events().iter().filter(|e| e.starts_with("msg:")).count();

    let mut send = h2c(bus.http).await;
    engine_refuses_too_many_fields(&bus, &mut send).await;
    let req =
        h2_request(&bus, "POST", "/v1/collect").header("content-type", "application/x-ndjson");
    let (resp, mut tx) = send.send_request(req.body(()).unwrap(), false).unwrap();
    tx.send_data(Bytes::from_static(b"{\"title\":\"a\"}\n"), false)
        .unwrap();
    assert!(
        until(WAIT, || msgs(&up) == 1).await,
        "the first message went on its own"
    );
    tx.send_data(Bytes::from_static(b"{\"title\":\"b\"}\n"), true)
        .unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    let (status, v) = body_of(resp).await;
    assert_eq!(
        (status, v),
        (200, json!({"id": "2", "title": "2 messages"}))
    );

    let mut s = TcpStream::connect(bus.http).await.unwrap();
    s.write_all(
        b"POST /v1/collect HTTP/1.1\r\nHost: books\r\nContent-Type: application/x-ndjson\r\n\
          Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    read_until(&mut s, &mut got, b"HTTP/1.1 100 Continue\r\n\r\n").await;
    got.clear();
    s.write_all(b"e\r\n{\"title\":\"a\"}\n\r\n").await.unwrap();
    assert!(
        until(WAIT, || msgs(&up) == 3).await,
        "the first message went on its own"
    );
    s.write_all(b"e\r\n{\"title\":\"b\"}\n\r\ne\r\n{\"title\":\"c\"}\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, &mut got, b"messages\"}").await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let json = text.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(
        serde_json::from_str::<Value>(json).unwrap(),
        json!({"id": "3", "title": "3 messages"})
    );
}
