//! gRPC (and any HTTP/2) pass-through on busbar's own HTTP/2 engine (`drivers::h2`'s
//! `passthrough`): h2 on both sides to `h2c` services, against the real binary with
//! testkit's tonic backends and raw `h2` upstreams: unary, server, client and
//! bidirectional streaming with trailers intact, cancellation reaching the upstream, a
//! refused stream retried on another instance, and proof that the engine (not pingora's
//! proxy) served a config with an h2c service.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busbar_testkit::fidelity::pb::fidelity_client::FidelityClient;
use busbar_testkit::fidelity::pb::{MetadataRequest, StreamRequest};
use busbar_testkit::fidelity::FidelityBackend;
use busbar_testkit::pb::bookstore_client::BookstoreClient;
use busbar_testkit::pb::{Book, FailRequest, ListBooksRequest, PingRequest};
use busbar_testkit::GrpcBackend;
use bytes::Bytes;
use common::h2raw::RawH2;
use common::Busbar;
use h2::Reason;
use tokio::net::{TcpListener, TcpStream};

/// Service `s` (h2c) at `addrs`, one route to it; `sections` before (e.g. `[limits]`).
fn h2c_config(addrs: &[SocketAddr], sections: &str) -> String {
    let endpoints = addrs
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{sections}\n[[service]]\nname = \"s\"\nprotocol = \"h2c\"\nendpoints = [{endpoints}]\n\
         [[route]]\nname = \"all\"\nservice = \"s\"\n"
    )
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

/// What a raw upstream does with each stream.
#[derive(Clone, Copy)]
enum Mode {
    /// Answers 200 at once, echoes each DATA frame as it comes, then the request's
    /// trailers (plus `grpc-status: 0` and `x-echo: done`) as its own.
    Echo,
    /// Answers 200 and one DATA frame, then waits: records how the stream ended.
    Hold,
    /// Resets every stream with REFUSED_STREAM (not processed).
    Refuse,
    /// Answers 200 and one DATA frame, then resets the stream with ENHANCE_YOUR_CALM.
    ResetMidway,
    /// Reads the whole request body, then answers 200 with it: records `ended:<bytes>`
    /// or how the body failed (`reset:<reason>`).
    Drain,
}

/// A raw HTTP/2 upstream (`common::h2raw`) serving each stream by `mode`.
struct Raw {
    addr: SocketAddr,
    /// Streams it got.
    streams: Arc<AtomicUsize>,
    /// How held streams ended: `reset:<reason>`, `ended`.
    events: Arc<Mutex<Vec<String>>>,
    _server: RawH2,
}

impl Raw {
    async fn start(mode: Mode) -> Raw {
        let events = Arc::new(Mutex::new(Vec::new()));
        let e = events.clone();
        let server = RawH2::start(move |req, respond| stream(mode, req, respond, e.clone())).await;
        Raw {
            addr: server.addr,
            streams: server.streams.clone(),
            events,
            _server: server,
        }
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
}

async fn stream(
    mode: Mode,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    events: Arc<Mutex<Vec<String>>>,
) {
    let head = || {
        http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
    };
    let req_timeout = req
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = req.into_body();
    match mode {
        Mode::Refuse => respond.send_reset(Reason::REFUSED_STREAM),
        Mode::ResetMidway => {
            let Ok(mut tx) = respond.send_response(head(), false) else {
                return;
            };
            let _ = tx.send_data(Bytes::from_static(b"first"), false);
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send_reset(Reason::ENHANCE_YOUR_CALM);
        }
        Mode::Echo => {
            let Ok(mut tx) = respond.send_response(head(), false) else {
                return;
            };
            while let Some(Ok(d)) = body.data().await {
                let n = d.len();
                let _ = body.flow_control().release_capacity(n);
                if tx.send_data(d, false).is_err() {
                    return;
                }
            }
            let mut t = body.trailers().await.ok().flatten().unwrap_or_default();
            t.insert("grpc-status", "0".parse().unwrap());
            t.insert("x-echo", "done".parse().unwrap());
            let _ = tx.send_trailers(t);
        }
        Mode::Drain => {
            let mut got = Vec::new();
            while let Some(d) = body.data().await {
                match d {
                    Ok(d) => {
                        let _ = body.flow_control().release_capacity(d.len());
                        got.extend_from_slice(&d);
                    }
                    Err(e) => {
                        let what = match e.reason() {
                            Some(r) => format!("reset:{r:?}"),
                            None => format!("error:{e}"),
                        };
                        events.lock().unwrap().push(what);
                        return;
                    }
                }
            }
            events.lock().unwrap().push(format!("ended:{}", got.len()));
            let Ok(mut tx) = respond.send_response(head(), false) else {
                return;
            };
            let _ = tx.send_data(Bytes::from(got), true);
        }
        Mode::Hold => {
            if let Some(t) = req_timeout {
                events.lock().unwrap().push(format!("grpc-timeout:{t}"));
            }
            let Ok(mut tx) = respond.send_response(head(), false) else {
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
    }
}

/// Polls `f` until it is true or `within` passes.
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

/// The engine, not pingora's proxy, serves a config with an h2c service: the engine
/// holds an HTTP/2 request to the front door's count of header fields (431, busbar's
/// own JSON); pingora's proxy passes it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_serves_a_config_with_an_h2c_service() {
    let backend = GrpcBackend::start(1).await;
    let bus = Busbar::start(&h2c_config(&[backend.addr], "[limits]\nmax_headers = 8\n")).await;
    let mut send = h2c(bus.http).await;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/bookstore.v1.Bookstore/Ping", bus.http))
        .header("content-type", "application/grpc");
    for i in 0..12 {
        req = req.header(format!("x-extra-{i}"), "v");
    }
    let (resp, _) = send.send_request(req.body(()).unwrap(), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("an answer")
        .expect("a response");
    assert_eq!(resp.status(), 431, "{:?}", resp.headers());
    assert!(backend.calls().is_empty(), "nothing reached the backend");
}

/// Unary, server streaming and client streaming through busbar to tonic, with the
/// status and message of a failed call intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_server_and_client_streaming_calls_pass_through() {
    let backend = GrpcBackend::start(7).await;
    let bus = Busbar::start(&h2c_config(&[backend.addr], "")).await;
    let mut client = BookstoreClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap();
    let r = client
        .ping(PingRequest { text: "hi".into() })
        .await
        .expect("ping");
    assert_eq!(r.get_ref().text, "hi");
    assert_eq!(r.get_ref().served_by, 7);

    let mut books = client
        .list_books(ListBooksRequest { shelf: 3, count: 5 })
        .await
        .expect("list")
        .into_inner();
    let mut ids = Vec::new();
    while let Some(b) = books.message().await.expect("a book") {
        ids.push(b.id);
    }
    assert_eq!(ids, [300, 301, 302, 303, 304]);

    let out = tokio_stream::iter((1..=4).map(|id| Book {
        id,
        ..Default::default()
    }));
    let sum = client.collect_books(out).await.expect("collect");
    assert_eq!(sum.get_ref().id, 10);

    let failed = client
        .fail(FailRequest {
            code: 5,
            message: "no such shelf".into(),
        })
        .await
        .expect_err("the call fails");
    assert_eq!(failed.code(), tonic::Code::NotFound);
    assert_eq!(failed.message(), "no such shelf");
    let methods: Vec<_> = backend.calls().iter().map(|c| c.method).collect();
    assert_eq!(methods, ["Ping", "ListBooks", "Fail"]);
}

/// Custom trailing metadata reaches the caller: on a failed unary call, and after a
/// server stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailing_metadata_passes_through() {
    let backend = FidelityBackend::start().await;
    let bus = Busbar::start(&h2c_config(&[backend.addr], "")).await;
    let mut client = FidelityClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap();
    let failed = client
        .metadata(MetadataRequest { code: 9 })
        .await
        .expect_err("fails on purpose");
    assert_eq!(failed.code(), tonic::Code::FailedPrecondition);
    assert_eq!(failed.metadata().get("x-trailer").unwrap(), "t-value");

    let mut items = client
        .stream(StreamRequest {
            count: 3,
            fail_code: 0,
        })
        .await
        .expect("stream")
        .into_inner();
    let mut n = 0;
    while items.message().await.expect("an item").is_some() {
        n += 1;
    }
    assert_eq!(n, 3);
    let trailers = items.trailers().await.expect("trailers").expect("some");
    assert_eq!(trailers.get("x-trailer").unwrap(), "t-value");
}

/// Bidirectional: each DATA frame comes back before the next is sent (nothing waits
/// for the request's end), and the request's trailers reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bidirectional_stream_flows_both_ways_with_trailers() {
    let up = Raw::start(Mode::Echo).await;
    let bus = Busbar::start(&h2c_config(&[up.addr], "")).await;
    let mut send = h2c(bus.http).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/echo.Echo/Chat", bus.http))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut tx) = send.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a head before the request ends")
        .expect("a response");
    assert_eq!(resp.status(), 200);
    let mut rx = resp.into_body();
    for i in 0..5 {
        let msg = Bytes::from(format!("message {i}"));
        tx.send_data(msg.clone(), false).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), rx.data())
            .await
            .expect("the echo before the next message")
            .expect("data")
            .expect("no error");
        let _ = rx.flow_control().release_capacity(got.len());
        assert_eq!(got, msg);
    }
    let mut t = http::HeaderMap::new();
    t.insert("x-client-trailer", "c".parse().unwrap());
    tx.send_trailers(t).unwrap();
    assert!(rx.data().await.is_none());
    let trailers = rx.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echo"], "done");
    assert_eq!(trailers["x-client-trailer"], "c");
}

/// A caller that resets its stream mid-call: the upstream's stream is reset with CANCEL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_reaches_the_upstream_as_a_cancellation() {
    let up = Raw::start(Mode::Hold).await;
    let bus = Busbar::start(&h2c_config(&[up.addr], "")).await;
    let mut send = h2c(bus.http).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/stream.Svc/Watch", bus.http))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (resp, mut tx) = send.send_request(req, false).unwrap();
    tx.send_data(Bytes::from_static(b"\0\0\0\0\0"), false)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a head")
        .expect("a response");
    let mut rx = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.data())
        .await
        .expect("the first message")
        .unwrap()
        .unwrap();
    assert_eq!(first, "first");
    // The client gives up on the call.
    tx.send_reset(Reason::CANCEL);
    assert!(
        until(Duration::from_secs(10), || !up.events().is_empty()).await,
        "the upstream saw the stream end"
    );
    assert_eq!(up.events(), ["reset:CANCEL"]);
}

/// An instance that refuses every stream (REFUSED_STREAM): each call goes on to the
/// other instance and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried_on_another_instance() {
    let refusing = Raw::start(Mode::Refuse).await;
    let good = GrpcBackend::start(2).await;
    let bus = Busbar::start(&h2c_config(&[refusing.addr, good.addr], "")).await;
    let mut client = BookstoreClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap();
    for n in 0..6 {
        let r = client
            .ping(PingRequest {
                text: format!("r{n}"),
            })
            .await
            .unwrap_or_else(|s| panic!("call {n}: {s:?}\n{}", bus.stderr()));
        assert_eq!(r.get_ref().served_by, 2);
    }
    let refused = refusing.streams.load(SeqCst);
    assert!(refused >= 2, "round robin sent some to the refusing one");
    assert_eq!(good.calls().len(), 6);
    eprintln!("REFUSED_STREAM: 6 calls, {refused} refused and retried, 6 answered");
}

/// The only instance refuses the stream: the caller gets busbar's own Trailers-Only
/// UNAVAILABLE, not an HTTP error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_before_its_head_is_unavailable_to_a_grpc_caller() {
    let refusing = Raw::start(Mode::Refuse).await;
    let bus = Busbar::start(&h2c_config(&[refusing.addr], "")).await;
    let mut client = BookstoreClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap();
    let status = client
        .ping(PingRequest { text: "x".into() })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("upstream_error"), "{status:?}");
}

/// An upstream that resets its stream after the response head: the caller's stream is
/// reset too, with the upstream's reason (not ended as if complete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_mid_response_reaches_the_caller_as_a_reset() {
    let up = Raw::start(Mode::ResetMidway).await;
    let bus = Busbar::start(&h2c_config(&[up.addr], "")).await;
    let mut send = h2c(bus.http).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/stream.Svc/Watch", bus.http))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (resp, _tx) = send.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a head")
        .expect("a response");
    let mut rx = resp.into_body();
    let first = rx.data().await.unwrap().unwrap();
    assert_eq!(first, "first");
    let end = tokio::time::timeout(Duration::from_secs(10), rx.data())
        .await
        .expect("the stream ends");
    let e = end
        .expect("an error, not a clean end")
        .expect_err("a reset");
    assert_eq!(e.reason(), Some(Reason::ENHANCE_YOUR_CALM), "{e}");
}

/// A `grpc-timeout` value as a duration (the test's own reading of the header).
fn grpc_timeout(v: &str) -> Duration {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().expect("digits");
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("unit of {v:?}"),
    }
}

/// The `grpc-timeout` the tonic backend got with its calls.
fn timeouts_seen(b: &GrpcBackend) -> Vec<Duration> {
    b.calls()
        .iter()
        .flat_map(|c| c.metadata.iter())
        .filter(|(k, _)| k == "grpc-timeout")
        .map(|(_, v)| grpc_timeout(v))
        .collect()
}

/// A unary `Ping` sent with the `h2` crate (a tonic client would enforce the
/// `grpc-timeout` itself and race busbar's answer), with `grpc-timeout: timeout`: the
/// response's `grpc-status`, and how long it took.
async fn ping_within(bus: SocketAddr, text: &str, timeout: &str) -> (String, Duration) {
    let mut send = h2c(bus).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{bus}/bookstore.v1.Bookstore/Ping"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    // PingRequest { text }: field 1, length-delimited; in one gRPC message frame.
    let mut msg = vec![0x0a, text.len() as u8];
    msg.extend_from_slice(text.as_bytes());
    let mut frame = vec![0];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let started = Instant::now();
    let (resp, mut tx) = send.send_request(req, false).unwrap();
    tx.send_data(Bytes::from(frame), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), resp)
        .await
        .expect("an answer")
        .expect("a response");
    let took = started.elapsed();
    if let Some(s) = resp.headers().get("grpc-status") {
        // Trailers-Only: the status in the head, nothing after it.
        assert!(resp.body().is_end_stream(), "Trailers-Only");
        return (s.to_str().unwrap().to_string(), took);
    }
    let mut body = resp.into_body();
    while let Some(d) = body.data().await {
        let _ = d.expect("data");
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    (trailers["grpc-status"].to_str().unwrap().to_string(), took)
}

/// A slow unary call with the caller's 600 ms `grpc-timeout`: the backend is told what
/// remains of it (less than 600 ms), and at 600 ms the caller gets busbar's
/// DEADLINE_EXCEEDED (4), not the backend's own timeout's CANCELLED (1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_grpc_timeout_bounds_the_call_and_is_lowered_upstream() {
    let slow = GrpcBackend::start(1).await;
    let bus = Busbar::start(&h2c_config(&[slow.addr], "")).await;
    let (status, took) = ping_within(bus.http, "sleep:5000", "600m").await;
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(4),
        "answered after {took:?}"
    );
    let seen = timeouts_seen(&slow);
    assert_eq!(seen.len(), 1, "{:?}", slow.calls());
    assert!(
        seen[0] < Duration::from_millis(600) && seen[0] > Duration::from_millis(100),
        "the backend's grpc-timeout: {:?}",
        seen[0]
    );
    eprintln!(
        "grpc-timeout 600m: upstream told {:?}, DEADLINE_EXCEEDED after {took:?}",
        seen[0]
    );
    // A call within its deadline is answered as usual.
    let (status, _) = ping_within(bus.http, "quick", "5S").await;
    assert_eq!(status, "0");
}

/// The route's 400 ms timeout is shorter than the caller's 30 s `grpc-timeout`: the
/// backend is told at most 400 ms, and the call ends with DEADLINE_EXCEEDED then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routes_timeout_caps_a_longer_grpc_timeout() {
    let slow = GrpcBackend::start(1).await;
    let config = h2c_config(&[slow.addr], "") + "timeout = \"400ms\"\n";
    let bus = Busbar::start(&config).await;
    let (status, took) = ping_within(bus.http, "sleep:5000", "30S").await;
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
    let seen = timeouts_seen(&slow);
    assert_eq!(seen.len(), 1, "{:?}", slow.calls());
    assert!(
        seen[0] <= Duration::from_millis(400),
        "the backend's grpc-timeout: {:?}",
        seen[0]
    );
}

/// The deadline passes after the response head: the caller's stream is reset with
/// CANCEL, and so is the upstream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_after_the_head_resets_both_streams_with_cancel() {
    let up = Raw::start(Mode::Hold).await;
    let bus = Busbar::start(&h2c_config(&[up.addr], "")).await;
    let mut send = h2c(bus.http).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/stream.Svc/Watch", bus.http))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "700m")
        .body(())
        .unwrap();
    let started = Instant::now();
    let (resp, _tx) = send.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a head")
        .expect("a response");
    let mut rx = resp.into_body();
    let first = rx.data().await.unwrap().unwrap();
    assert_eq!(first, "first");
    let end = tokio::time::timeout(Duration::from_secs(10), rx.data())
        .await
        .expect("the stream ends at the deadline");
    let took = started.elapsed();
    let e = end.expect("a reset, not a clean end").expect_err("a reset");
    assert_eq!(e.reason(), Some(Reason::CANCEL), "{e}");
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(5),
        "reset after {took:?}"
    );
    assert!(
        until(Duration::from_secs(10), || up.events().len() >= 2).await,
        "the upstream saw its stream end: {:?}",
        up.events()
    );
    let events = up.events();
    assert_eq!(events[1], "reset:CANCEL");
    let told = grpc_timeout(events[0].strip_prefix("grpc-timeout:").unwrap());
    assert!(told < Duration::from_millis(700), "upstream told {told:?}");
}

/// The access log's lines once it has at least `n` (the flusher writes every 200 ms).
async fn log_lines(bus: &Busbar, n: usize) -> Vec<serde_json::Value> {
    let read = || -> Vec<serde_json::Value> {
        bus.access_log()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    until(Duration::from_secs(10), || read().len() >= n).await;
    read()
}

/// Passed-through calls carry their `grpc-status` in the access log: from the trailers
/// (0, and the backend's NOT_FOUND 5 sent Trailers-Only by tonic), and busbar's own
/// DEADLINE_EXCEEDED; a plain HTTP/2 request has no such key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_each_calls_grpc_status() {
    let b = GrpcBackend::start(1).await;
    let bus = Busbar::start(&h2c_config(&[b.addr], "")).await;
    let mut client = BookstoreClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap();
    client
        .ping(PingRequest { text: "ok".into() })
        .await
        .expect("answered");
    let status = client
        .fail(FailRequest {
            code: 5,
            message: "nope".into(),
        })
        .await
        .expect_err("NOT_FOUND");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let (status, _) = ping_within(bus.http, "sleep:3000", "300m").await;
    assert_eq!(status, "4");
    let lines = log_lines(&bus, 3).await;
    let of = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
            .clone()
    };
    let ok = of("/bookstore.v1.Bookstore/Ping");
    assert_eq!(ok["grpc_status"], 0, "{ok}");
    assert_eq!(ok["protocol"], "grpc", "{ok}");
    let failed = of("/bookstore.v1.Bookstore/Fail");
    assert_eq!(failed["grpc_status"], 5, "{failed}");
    let late = lines
        .iter()
        .filter(|l| l["path"] == "/bookstore.v1.Bookstore/Ping")
        .nth(1)
        .expect("the late call's line");
    assert_eq!(late["grpc_status"], 4, "{late}");
    assert_eq!(late["error"], "upstream_timeout", "{late}");
}

/// A client that stops sending its request body mid-way, before the upstream answered:
/// after `client_timeout` it gets 408 `body_timeout` and the upstream's stream is reset
/// (CANCEL), while another stream of the same connection is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_408_and_the_connections_other_streams_go_on() {
    let up = Raw::start(Mode::Drain).await;
    let limits = "[limits]\nclient_timeout = \"1s\"\n";
    let bus = Busbar::start(&h2c_config(&[up.addr], limits)).await;
    let mut send = h2c(bus.http).await;
    let post = |path: &str| {
        http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", bus.http))
            .header("content-type", "application/octet-stream")
            .body(())
            .unwrap()
    };
    let started = Instant::now();
    let (stalled, mut tx) = send.send_request(post("/stalls"), false).unwrap();
    tx.send_data(Bytes::from_static(b"the first part"), false)
        .unwrap();
    // Another stream of the connection, whole, while the first is stalled.
    let (other, mut other_tx) = send.send_request(post("/whole"), false).unwrap();
    other_tx
        .send_data(Bytes::from_static(b"all of it"), true)
        .unwrap();
    let other = tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .expect("the other stream's answer")
        .expect("a response");
    assert_eq!(other.status(), 200);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "served at once"
    );
    let resp = tokio::time::timeout(Duration::from_secs(10), stalled)
        .await
        .expect("an answer to the stalled stream")
        .expect("a response");
    let took = started.elapsed();
    assert_eq!(resp.status(), 408);
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(Ok(d)) = body.data().await {
        text.extend_from_slice(&d);
    }
    let json: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(json["error"], "body_timeout", "{json}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "408 after {took:?}"
    );
    assert!(
        until(Duration::from_secs(10), || up.events().len() >= 2).await,
        "{:?}",
        up.events()
    );
    let mut events = up.events();
    events.sort();
    assert_eq!(events, ["ended:9", "reset:CANCEL"]);
    // The connection still serves new streams.
    let (again, mut again_tx) = send.send_request(post("/again"), false).unwrap();
    again_tx.send_data(Bytes::from_static(b"x"), true).unwrap();
    assert_eq!(again.await.unwrap().status(), 200);
    eprintln!("stalled h2 body: 408 after {took:?}; the connection's other streams served");
}

/// An h2c upstream whose first connection answers one stream and then goes silent (the
/// socket held, never read: a host gone without a FIN); later connections answer every
/// stream 200. Counts its connections.
async fn goes_silent() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let n = c.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    let _ = respond.send_response(http::Response::new(()), true);
                    if n == 0 {
                        // Flushed by polling on a little, then silence.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), conn.accept()).await;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                }
            });
        }
    });
    (addr, conns, task)
}

/// A pooled upstream connection that went silent: the stream sent on it times out, the
/// connection is then PINGed, found dead and closed, and the next request goes on a new
/// connection and is answered (it was reused, and timed out, for as long as it lived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_upstream_connection_gone_silent_is_replaced() {
    let (addr, conns, task) = goes_silent().await;
    let config = h2c_config(&[addr], "") + "timeout = \"500ms\"\n";
    let bus = Busbar::start(&config).await;
    let mut send = h2c(bus.http).await;
    let get = |path: &str| {
        http::Request::get(format!("http://{}{path}", bus.http))
            .body(())
            .unwrap()
    };
    let status = |r: http::Response<h2::RecvStream>| r.status().as_u16();
    let (r, _) = send.send_request(get("/one"), true).unwrap();
    assert_eq!(status(r.await.unwrap()), 200);
    let (r, _) = send.send_request(get("/two"), true).unwrap();
    assert_eq!(
        status(r.await.unwrap()),
        504,
        "the silent connection times out"
    );
    // The PING's answer is waited for within the try's connect timeout (here the 500 ms
    // left of the route's); then the next request is served on a new connection.
    let started = Instant::now();
    let mut served = false;
    while !served && started.elapsed() < Duration::from_secs(10) {
        let (r, _) = send.send_request(get("/three"), true).unwrap();
        served = status(r.await.unwrap()) == 200;
        if !served {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    eprintln!(
        "silent upstream connection replaced {:?} after the timed-out stream",
        started.elapsed()
    );
    assert!(served, "a later request was answered");
    assert_eq!(conns.load(SeqCst), 2, "on a second connection");
    task.abort();
}
