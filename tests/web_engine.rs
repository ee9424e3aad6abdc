//! HTTP/1 clients of `h2c` services and gRPC-Web calls on busbar's own engines
//! (`drivers::h1::to_h2`, the gRPC-Web codec on `drivers::h2`'s pass-through), against
//! the real binary with testkit's tonic backends and raw `h2` upstreams: bodies both
//! ways, gRPC-Web binary and text over HTTP/1.1 and over h2c with the status and the
//! trailing metadata in the trailers frame, CORS preflights, a server stream arriving
//! message by message, and a refused stream retried for an HTTP/1 client. Each test
//! also checks something only the engines do (pingora's proxy served these before):
//! a POST whose stream was refused is sent again; an HTTP/2 request over the front
//! door's count of header fields is refused (431) before any upstream.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use busbar_testkit::fidelity::pb::{Item, StreamRequest};
use busbar_testkit::fidelity::FidelityBackend;
use bytes::Bytes;
use common::h2raw::RawH2;
use common::http1::Conn;
use common::{client, Busbar};
use h2::Reason;
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Service `s` (h2c) at `addrs`; route `web` (gRPC-Web, CORS for `https://app.example`)
/// for `/fidelity.v1.Fidelity/`, route `drip` (gRPC-Web, no CORS) for `/drip.Svc/`, route
/// `json` (JSON→gRPC) for `/json/`, route `plain` for everything else;
/// `sections` first (e.g. `[limits]`).
fn config(addrs: &[SocketAddr], sections: &str) -> String {
    let endpoints = addrs
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"{sections}
[[service]]
name = "s"
protocol = "h2c"
endpoints = [{endpoints}]

[[route]]
name = "web"
path_prefix = "/fidelity.v1.Fidelity/"
service = "s"
[route.translate]
from = "grpc-web"
cors_origins = ["https://app.example"]

[[route]]
name = "drip"
path_prefix = "/drip.Svc/"
service = "s"
[route.translate]
from = "grpc-web"

[[route]]
name = "json"
path_prefix = "/json/"
service = "s"
[route.translate]
from = "json"
protos = ["{protos}/tests/protos/bookstore.proto"]

[[route]]
name = "plain"
path_prefix = "/"
service = "s"
"#,
        protos = env!("CARGO_MANIFEST_DIR"),
    )
}

/// What a raw upstream does with each stream.
#[derive(Clone, Copy)]
enum Mode {
    /// Echoes the request body after a 200 head (`x-upstream-saw` lists the request's
    /// `content-type` and `te`), then `grpc-status: 0` as trailers.
    Echo,
    /// Resets every stream with REFUSED_STREAM (not processed).
    Refuse,
    /// A gRPC server stream: one message, then waits for the test's go, a second
    /// message and the trailers.
    Drip,
    /// Answers 200 and one DATA frame, then waits: records how the stream ended.
    Hold,
}

/// A raw HTTP/2 upstream (`common::h2raw`) serving each stream by `mode`.
struct Raw {
    addr: SocketAddr,
    /// Streams it got.
    streams: Arc<AtomicUsize>,
    /// Lets a `Drip` stream go on.
    go: Arc<Notify>,
    /// How `Hold` streams ended: `reset:<reason>`, `error:…`.
    events: Arc<Mutex<Vec<String>>>,
    _server: RawH2,
}

impl Raw {
    async fn start(mode: Mode) -> Raw {
        let go = Arc::new(Notify::new());
        let events = Arc::new(Mutex::new(Vec::new()));
        let (g, e) = (go.clone(), events.clone());
        let server =
            RawH2::start(move |req, respond| stream(mode, req, respond, g.clone(), e.clone()))
                .await;
        Raw {
            addr: server.addr,
            streams: server.streams.clone(),
            go,
            events,
            _server: server,
        }
    }
}

/// A gRPC message frame (uncompressed).
fn frame(msg: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    f.extend_from_slice(msg);
    f
}

async fn stream(
    mode: Mode,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    go: Arc<Notify>,
    events: Arc<Mutex<Vec<String>>>,
) {
    let saw = |name: &str| {
        req.headers()
            .get(name)
            .map_or("-".to_string(), |v| v.to_str().unwrap_or("?").to_string())
    };
    let head = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header(
            "x-upstream-saw",
            format!("{} {}", saw("content-type"), saw("te")),
        )
        .body(())
        .unwrap();
    let mut body = req.into_body();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    match mode {
        Mode::Refuse => respond.send_reset(Reason::REFUSED_STREAM),
        Mode::Echo => {
            let Ok(mut tx) = respond.send_response(head, false) else {
                return;
            };
            while let Some(Ok(d)) = body.data().await {
                let n = d.len();
                let _ = body.flow_control().release_capacity(n);
                if tx.send_data(d, false).is_err() {
                    return;
                }
            }
            let _ = tx.send_trailers(trailers);
        }
        Mode::Hold => {
            let Ok(mut tx) = respond.send_response(head, false) else {
                return;
            };
            let _ = tx.send_data(Bytes::from_static(b"first"), false);
            let reason = std::future::poll_fn(|cx| tx.poll_reset(cx)).await;
            let what = match reason {
                Ok(r) => format!("reset:{r:?}"),
                Err(e) => format!("error:{e}"),
            };
            events.lock().unwrap().push(what);
        }
        Mode::Drip => {
            while let Some(Ok(d)) = body.data().await {
                let _ = body.flow_control().release_capacity(d.len());
            }
            let Ok(mut tx) = respond.send_response(head, false) else {
                return;
            };
            let _ = tx.send_data(Bytes::from(frame(b"one")), false);
            go.notified().await;
            let _ = tx.send_data(Bytes::from(frame(b"two")), false);
            trailers.insert("x-drip", "done".parse().unwrap());
            let _ = tx.send_trailers(trailers);
        }
    }
}

/// Splits a gRPC-Web response body into its message frames and its trailers frame's
/// lines.
fn split_frames(mut b: &[u8]) -> (Vec<Vec<u8>>, String) {
    let mut data = Vec::new();
    let mut trailer = String::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert!(b.len() >= 5 + len, "a whole frame: {b:?}");
        if b[0] & 0x80 != 0 {
            trailer = String::from_utf8(b[5..5 + len].to_vec()).unwrap();
        } else {
            data.push(b[5..5 + len].to_vec());
        }
        b = &b[5 + len..];
    }
    assert!(b.is_empty(), "trailing bytes");
    (data, trailer)
}

/// The `fidelity.v1` server stream of `count` items, as a gRPC-Web request body.
fn stream_request(count: i32) -> Vec<u8> {
    frame(
        &StreamRequest {
            count,
            fail_code: 0,
        }
        .encode_to_vec(),
    )
}

/// Checks a `Fidelity/Stream` answer of 3 items: the messages, then `grpc-status` and
/// the trailing metadata in the trailers frame.
fn check_stream(raw: &[u8]) {
    let (data, trailer) = split_frames(raw);
    let items: Vec<i32> = data
        .iter()
        .map(|d| Item::decode(d.as_slice()).unwrap().n)
        .collect();
    assert_eq!(items, [0, 1, 2]);
    assert!(trailer.contains("grpc-status:0\r\n"), "{trailer:?}");
    assert!(trailer.contains("x-trailer:t-value\r\n"), "{trailer:?}");
}

/// The data of a chunked body (no extensions, no trailers).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a size line");
        let size = usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap(), 16).unwrap();
        b = &b[line + 2..];
        if size == 0 {
            assert_eq!(b, b"\r\n", "no trailers");
            return out;
        }
        out.extend_from_slice(&b[..size]);
        assert_eq!(&b[size..size + 2], b"\r\n");
        b = &b[size + 2..];
    }
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

/// One request over h2c; the response head and its whole body and trailers.
async fn h2_call(
    send: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Vec<u8>,
) -> (http::response::Parts, Vec<u8>, Option<http::HeaderMap>) {
    let end = body.is_empty();
    let (resp, mut tx) = send.send_request(req, end).unwrap();
    if !end {
        tx.send_data(Bytes::from(body), true).unwrap();
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a head in time")
        .expect("a response");
    let (parts, mut rx) = resp.into_parts();
    let mut got = Vec::new();
    while let Some(d) = rx.data().await {
        let d = d.expect("data");
        let _ = rx.flow_control().release_capacity(d.len());
        got.extend_from_slice(&d);
    }
    let trailers = rx.trailers().await.expect("trailers");
    (parts, got, trailers)
}

/// An HTTP/1.1 client posts a body larger than busbar holds for a retry (it streams)
/// to an h2c-only upstream, chunked and with a length: the upstream gets it over
/// HTTP/2 and its echo comes back whole, chunked (HTTP/1 has no trailers for it here),
/// and the connection carries the next request (pingora's proxy closed it after a
/// chunked body). An HTTP/1.0 client gets the echo ended by the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_streams_a_body_to_an_h2c_service_and_back() {
    let up = Raw::start(Mode::Echo).await;
    let bus = Busbar::start(&config(&[up.addr], "")).await;
    let http = client();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    // A length.
    let r = http
        .post(bus.url("/echo/length"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", bus.stderr());
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.headers()["transfer-encoding"], "chunked");
    assert_eq!(r.headers()["x-upstream-saw"], "- -");
    assert_eq!(r.bytes().await.unwrap(), big, "the echo, whole");
    // Chunked, in pieces as they come.
    let mut conn = Conn::connect(bus.http).await;
    let mut req =
        b"POST /echo/chunked HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for c in big.chunks(7_000) {
        req.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        req.extend_from_slice(c);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = conn.ask(&req, false).await;
    assert_eq!(r.status(), 200, "{}", r.head);
    assert!(r.complete, "{}", r.head);
    assert_eq!(dechunk(&r.body), big, "the echo of a chunked body");
    assert_eq!(r.header("connection"), Some("keep-alive"));
    // The connection carries the next request.
    let r = conn
        .ask(
            b"POST /echo/again HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\n\r\nhello",
            false,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(dechunk(&r.body), b"hello");
    // HTTP/1.0: no chunked framing; the close ends the body.
    let mut conn = Conn::connect(bus.http).await;
    let r = conn
        .ask(
            b"POST /echo/ten HTTP/1.0\r\nHost: s\r\nContent-Length: 3\r\n\r\nabc",
            false,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("transfer-encoding"), None);
    assert!(r.closed && r.complete, "{}", r.head);
    assert_eq!(r.body, b"abc");
    assert_eq!(up.streams.load(SeqCst), 4);
}

/// A POST from an HTTP/1 client whose stream an instance refuses (REFUSED_STREAM: not
/// processed) goes to the other instance, body and all. pingora's proxy never sent a
/// POST again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried_for_an_http1_client() {
    let refusing = Raw::start(Mode::Refuse).await;
    let good = Raw::start(Mode::Echo).await;
    let bus = Busbar::start(&config(&[refusing.addr, good.addr], "")).await;
    let http = client();
    for n in 0..6 {
        let body = format!("payload {n}");
        let r = http
            .post(bus.url(&format!("/retry/{n}")))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {n}\n{}", bus.stderr());
        assert_eq!(r.text().await.unwrap(), body);
    }
    let refused = refusing.streams.load(SeqCst);
    assert!(refused >= 2, "round robin sent some to the refusing one");
    assert_eq!(good.streams.load(SeqCst), 6);
    eprintln!("REFUSED_STREAM, HTTP/1 client: 6 POSTs, {refused} refused and retried, 6 answered");
}

/// A plain gRPC caller over HTTP/1.1 on a JSON→gRPC route goes to the route's service as
/// it is (only JSON callers are translated), on the engine: a stream the instance refused
/// is sent again (pingora's proxy, which had these, answered 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_grpc_caller_of_a_json_route_over_http1_is_passed_through() {
    let refusing = Raw::start(Mode::Refuse).await;
    let good = Raw::start(Mode::Echo).await;
    let bus = Busbar::start(&config(&[refusing.addr, good.addr], "")).await;
    let http = client();
    for n in 0..6u8 {
        let body = frame(&[n; 5]);
        let r = http
            .post(bus.url("/json/bookstore.v1.Bookstore/Ping"))
            .header("content-type", "application/grpc")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "call {n}\n{}", bus.stderr());
        assert_eq!(
            r.bytes().await.unwrap().as_ref(),
            &body[..],
            "call {n}: echoed as sent"
        );
    }
    assert!(
        refusing.streams.load(SeqCst) >= 2,
        "round robin sent some to the refusing one"
    );
    assert_eq!(good.streams.load(SeqCst), 6);
}

/// gRPC-Web over HTTP/1.1, binary and text, to tonic: the server stream's messages,
/// then `grpc-status` and the trailing metadata in the trailers frame. A CORS preflight
/// is answered by busbar. Beside tonic an instance refuses every stream: a call it
/// refused is sent on to tonic (pingora's proxy sent no POST again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_over_http1_binary_text_and_preflight() {
    let refusing = Raw::start(Mode::Refuse).await;
    let backend = FidelityBackend::start().await;
    let bus = Busbar::start(&config(&[refusing.addr, backend.addr], "")).await;
    let http = client();
    let url = bus.url("/fidelity.v1.Fidelity/Stream");
    let r = http
        .post(&url)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", "https://app.example")
        .body(stream_request(3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", bus.stderr());
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.headers()["content-type"], "application/grpc-web+proto");
    assert_eq!(r.headers()["x-initial"], "i-value");
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    check_stream(&r.bytes().await.unwrap());

    // Text: base64 with padding mid-stream (two pieces encoded apart).
    let req = stream_request(3);
    let text = format!("{}{}", B64.encode(&req[..4]), B64.encode(&req[4..]));
    assert!(text[..text.len() - 4].contains('='), "{text}");
    let r = http
        .post(&url)
        .header("content-type", "application/grpc-web-text")
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/grpc-web-text");
    let mut chars = r.bytes().await.unwrap().to_vec();
    let raw = busbar::translate::grpc_web::decode_text(&mut chars).unwrap();
    assert!(chars.is_empty(), "whole quanta");
    check_stream(&raw);

    // Text that is not base64: busbar's bad request, in the caller's shape
    // (Trailers-Only, INTERNAL as Envoy answers a malformed request).
    let r = http
        .post(&url)
        .header("content-type", "application/grpc-web-text")
        .body("AAA$")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["grpc-status"], "13");
    assert!(r.bytes().await.unwrap().is_empty());

    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,x-grpc-web")
            .send()
    };
    let r = preflight("https://app.example").await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        r.headers()["access-control-allow-headers"],
        "content-type,x-grpc-web"
    );
    assert_eq!(
        preflight("https://evil.example").await.unwrap().status(),
        403
    );
    // Round robin sent one of the two calls to the refusing instance first.
    assert!(
        refusing.streams.load(SeqCst) >= 1,
        "a refused call was retried"
    );
}

/// gRPC-Web over h2c to tonic, binary and text, and a preflight, on the HTTP/2 engine:
/// a request over the front door's count of header fields is busbar's 431 (pingora's
/// proxy passed it on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_over_h2c_on_the_engine() {
    let backend = FidelityBackend::start().await;
    let bus = Busbar::start(&config(&[backend.addr], "[limits]\nmax_headers = 12\n")).await;
    let mut send = h2c(bus.http).await;
    let url = format!("http://{}/fidelity.v1.Fidelity/Stream", bus.http);
    let call = |ct: &str| {
        http::Request::builder()
            .method("POST")
            .uri(&url)
            .header("content-type", ct)
            .header("x-grpc-web", "1")
            .header("origin", "https://app.example")
    };

    let (head, body, trailers) = h2_call(
        &mut send,
        call("application/grpc-web+proto").body(()).unwrap(),
        stream_request(3),
    )
    .await;
    assert_eq!(head.status, 200, "{}", bus.stderr());
    assert_eq!(head.headers["content-type"], "application/grpc-web+proto");
    assert_eq!(
        head.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(trailers.is_none(), "the trailers are in the body");
    check_stream(&body);

    let req = stream_request(3);
    let text = format!("{}{}", B64.encode(&req[..4]), B64.encode(&req[4..]));
    let (head, body, _) = h2_call(
        &mut send,
        call("application/grpc-web-text").body(()).unwrap(),
        text.into_bytes(),
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-type"], "application/grpc-web-text");
    let mut chars = body;
    let raw = busbar::translate::grpc_web::decode_text(&mut chars).unwrap();
    check_stream(&raw);

    let preflight = http::Request::builder()
        .method("OPTIONS")
        .uri(&url)
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .body(())
        .unwrap();
    let (head, body, _) = h2_call(&mut send, preflight, Vec::new()).await;
    assert_eq!(head.status, 204);
    assert_eq!(
        head.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(body.is_empty());

    // Only the engine counts an HTTP/2 request's header fields.
    let mut many = call("application/grpc-web+proto");
    for i in 0..16 {
        many = many.header(format!("x-extra-{i}"), "v");
    }
    let (head, _, _) = h2_call(&mut send, many.body(()).unwrap(), stream_request(1)).await;
    assert_eq!(head.status, 431, "the engine's count of header fields");
}

/// A gRPC-Web server stream reaches an HTTP/1.1 client and an h2c client message by
/// message: the first message arrives while the upstream still holds the second. An
/// instance beside it refuses every stream: the calls it refused are sent on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_web_server_stream_arrives_message_by_message() {
    let refusing = Raw::start(Mode::Refuse).await;
    let up = Raw::start(Mode::Drip).await;
    let bus = Busbar::start(&config(&[refusing.addr, up.addr], "")).await;
    let url = bus.url("/drip.Svc/Watch");
    for _ in 0..2 {
        drip_over_http1(&bus, &up, &url).await;
        drip_over_h2c(&bus, &up, &url).await;
    }
    // Round robin: every call after the first went to the refusing instance first.
    assert!(refusing.streams.load(SeqCst) >= 3, "refused calls retried");
    assert_eq!(up.streams.load(SeqCst), 4);
}

async fn drip_over_http1(bus: &Busbar, up: &Raw, url: &str) {
    // HTTP/1.1.
    let mut r = client()
        .post(url)
        .header("content-type", "application/grpc-web")
        .body(frame(b"watch"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", bus.stderr());
    assert_eq!(
        r.headers()["x-upstream-saw"],
        "application/grpc trailers",
        "plain gRPC upstream"
    );
    let mut got = Vec::new();
    while got.len() < 8 {
        let piece = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("the first message while the upstream holds the second")
            .unwrap()
            .expect("more body");
        got.extend_from_slice(&piece);
    }
    assert_eq!(got, frame(b"one"));
    up.go.notify_one();
    while let Some(piece) = r.chunk().await.unwrap() {
        got.extend_from_slice(&piece);
    }
    let (data, trailer) = split_frames(&got);
    assert_eq!(data, [b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(trailer, "grpc-status:0\r\nx-drip:done\r\n");
}

async fn drip_over_h2c(bus: &Busbar, up: &Raw, url: &str) {
    let mut send = h2c(bus.http).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(url)
        .header("content-type", "application/grpc-web")
        .body(())
        .unwrap();
    let (resp, mut tx) = send.send_request(req, false).unwrap();
    tx.send_data(Bytes::from(frame(b"watch")), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a head")
        .expect("a response");
    let mut rx = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.data())
        .await
        .expect("the first message while the upstream holds the second")
        .unwrap()
        .unwrap();
    let _ = rx.flow_control().release_capacity(first.len());
    assert_eq!(first, frame(b"one"));
    up.go.notify_one();
    let mut rest = Vec::new();
    while let Some(d) = rx.data().await {
        rest.extend_from_slice(&d.unwrap());
    }
    let (data, trailer) = split_frames(&rest);
    assert_eq!(data, [b"two".to_vec()]);
    assert_eq!(trailer, "grpc-status:0\r\nx-drip:done\r\n");
}

/// An HTTP/1 client that closes its connection mid-response: the upstream's stream is
/// reset with CANCEL at once, not left to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_leaves_cancels_the_upstream_stream() {
    let up = Raw::start(Mode::Hold).await;
    let bus = Busbar::start(&config(&[up.addr], "")).await;
    let mut conn = TcpStream::connect(bus.http).await.unwrap();
    conn.write_all(b"POST /watch HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        while !buf.windows(5).any(|w| w == b"first") {
            use tokio::io::AsyncReadExt;
            if conn.read_buf(&mut buf).await.unwrap() == 0 {
                break;
            }
        }
    })
    .await;
    assert!(
        got.is_ok(),
        "the first data: {}",
        String::from_utf8_lossy(&buf)
    );
    assert!(up.events.lock().unwrap().is_empty(), "the stream is open");
    drop(conn);
    let end = Instant::now() + Duration::from_secs(10);
    while up.events.lock().unwrap().is_empty() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*up.events.lock().unwrap(), ["reset:CANCEL"]);
}
