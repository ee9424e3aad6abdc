//! busbar's own HTTP/2 engine (`drivers::h2`): h2c and TLS clients to HTTP/1 services,
//! bodies both ways with flow control, RFC 9113's conversions and stream errors, and
//! the limits against abuse (concurrent streams, rapid reset, CONTINUATION floods,
//! drain).
//!
//! Clients: the `h2` crate for well-formed traffic, and a raw frame writer ([`Raw`]) for
//! what no well-behaved client library sends (malformed heads, floods).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Backend, Busbar};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn one_service(addr: SocketAddr, limits: &str) -> String {
    common::one_route(
        addr,
        &format!("[limits]\n{limits}\n"),
        r#"protocol = "http1""#,
    )
}

/// An h2c connection (prior knowledge) with the `h2` crate.
async fn h2c(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn get(path: &str) -> http::Request<()> {
    http::Request::get(format!("http://localhost{path}"))
        .body(())
        .unwrap()
}

/// Reads a whole response body, releasing the window as it goes.
async fn read_body(mut body: h2::RecvStream) -> Vec<u8> {
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    all
}

/// Sends `req` (no body) and returns the status and the JSON body.
async fn ask(send: &mut h2::client::SendRequest<Bytes>, req: http::Request<()>) -> (u16, Value) {
    let (resp, _) = send
        .clone()
        .ready()
        .await
        .expect("ready")
        .send_request(req, true)
        .expect("send");
    let resp = resp.await.expect("response");
    let status = resp.status().as_u16();
    let body = read_body(resp.into_body()).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// An HTTP/2 client's request to an h2c service carries busbar's own headers as an
/// HTTP/1 one does: the client-sent forwarding headers replaced by what busbar saw, its
/// `Via` hop after the client's, a `traceparent` and an `x-request-id` of the same trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_service_gets_busbars_own_headers_and_no_client_sent_forwarding() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&common::one_route(a.addr, "", r#"protocol = "h2c""#)).await;
    let mut send = h2c(bus.http).await;
    let req = http::Request::get("http://svc.example/who")
        .header("x-forwarded-for", "203.0.113.9")
        .header("forwarded", "for=203.0.113.9")
        .header("x-forwarded-host", "evil.example")
        .header("via", "1.1 edge")
        .body(())
        .unwrap();
    let (status, _) = ask(&mut send, req).await;
    assert_eq!(status, 200, "{}", bus.stderr());
    let seen = a.seen();
    assert_eq!(seen[0].version, "HTTP/2.0");
    let h = &seen[0].headers;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h:?}");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http", "{h:?}");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "svc.example");
    assert!(h["via"].starts_with("1.1 edge, 2 busbar-"), "{h:?}");
    let traceparent = &h["traceparent"];
    assert_eq!(traceparent.len(), 55, "{traceparent}");
    assert_eq!(h["x-request-id"], traceparent[3..35], "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_get_and_a_streamed_post_reach_an_http1_backend() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "")).await;
    let mut send = h2c(bus.http).await;

    let (status, body) = ask(&mut send, get("/over-h2c?x=1")).await;
    assert_eq!(status, 200, "{}", bus.stderr());
    assert_eq!(body["backend"], "a");
    let seen = a.seen();
    assert_eq!(seen[0].version, "HTTP/1.1");
    assert_eq!(seen[0].path, "/over-h2c?x=1");
    assert_eq!(
        seen[0].headers["host"], "localhost",
        ":authority became Host"
    );
    assert_eq!(seen[0].headers["x-forwarded-proto"], "http");
    assert!(
        seen[0].headers["via"].starts_with("2 busbar"),
        "{:?}",
        seen[0].headers
    );

    // 1 MiB without a content-length, in 16 KiB DATA frames, each sent as the window
    // allows: it reaches the backend chunked, whole.
    let req = http::Request::post("http://localhost/upload")
        .body(())
        .unwrap();
    let (resp, mut tx) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(req, false)
        .unwrap();
    let piece = Bytes::from(vec![b'x'; 16 * 1024]);
    for _ in 0..64 {
        tx.reserve_capacity(piece.len());
        let mut left = piece.clone();
        while !left.is_empty() {
            let n = std::future::poll_fn(|cx| tx.poll_capacity(cx))
                .await
                .expect("capacity")
                .expect("capacity");
            let part = left.split_to(n.min(left.len()));
            tx.send_data(part, false).unwrap();
        }
    }
    tx.send_data(Bytes::new(), true).unwrap();
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), 200);
    let body: Value = serde_json::from_slice(&read_body(resp.into_body()).await).unwrap();
    assert_eq!(body["body_bytes"], 1024 * 1024);
    let seen = a.seen();
    let post = seen.iter().find(|s| s.path == "/upload").expect("the POST");
    assert_eq!(post.body.len(), 1024 * 1024);
    assert_eq!(post.headers["transfer-encoding"], "chunked");
    assert!(!post.headers.contains_key("content-length"));

    // With a content-length, it goes as one.
    let req = http::Request::post("http://localhost/sized")
        .header("content-length", "5")
        .body(())
        .unwrap();
    let (resp, mut tx) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(req, false)
        .unwrap();
    tx.send_data(Bytes::from_static(b"hello"), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    let seen = a.seen();
    let sized = seen
        .iter()
        .find(|s| s.path == "/sized")
        .expect("the sized POST");
    assert_eq!(sized.body, b"hello");
    assert_eq!(sized.headers["content-length"], "5");

    // Each stream has its access log line.
    common::daemon::wait_until("access log lines", Duration::from_secs(10), Duration::from_millis(50), || {
        let log = bus.access_log();
        async move { log.contains("/over-h2c") && log.contains("/upload") && log.contains("/sized") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_cookie_fields_reach_an_http1_backend_as_one() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "")).await;
    let mut send = h2c(bus.http).await;
    let req = http::Request::get("http://localhost/c")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(())
        .unwrap();
    let (status, _) = ask(&mut send, req).await;
    assert_eq!(status, 200);
    // The backend joins repeated fields with ", ": one field reads as sent.
    assert_eq!(a.seen()[0].headers["cookie"], "a=1; b=2; c=3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_with_alpn_is_served_and_converted() {
    let a = Backend::start("a").await;
    let certs = tempfile::tempdir().unwrap();
    let (_bus, tls, cert_pem) =
        common::tls::busbar_with_tls(&one_service(a.addr, ""), certs.path()).await;
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .https_only(true)
        .resolve("localhost", tls)
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .build()
        .unwrap();
    let r = https
        .get(format!("https://localhost:{}/secure?q=1", tls.port()))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN chose h2");
    let seen = a.seen();
    assert_eq!(seen[0].path, "/secure?q=1");
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
    assert_eq!(seen[0].headers["cookie"], "a=1; b=2");
    let body = vec![b'y'; 200_000];
    let r = https
        .post(format!("https://localhost:{}/up", tls.port()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["body_bytes"], 200_000);
}

// ---------------------------------------------------------------------------------
// A raw HTTP/2 client: frames written by hand, headers as HPACK literals.

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;
const PROTOCOL_ERROR: u32 = 1;
const REFUSED_STREAM: u32 = 7;
const ENHANCE_YOUR_CALM: u32 = 11;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK string literal (short ones only), no Huffman.
fn hstr(out: &mut Vec<u8>, s: &[u8]) {
    assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

/// A header block: `:method GET`, `:scheme http`, `:path`, `:authority`, then
/// `extra` as literals without indexing (any bytes: uppercase names and all).
fn block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0x82, 0x86];
    b.push(0x04); // :path, literal without indexing, indexed name
    hstr(&mut b, path.as_bytes());
    b.push(0x01); // :authority
    hstr(&mut b, b"localhost");
    for (n, v) in extra {
        b.push(0x00);
        hstr(&mut b, n.as_bytes());
        hstr(&mut b, v.as_bytes());
    }
    b
}

struct Frame {
    ty: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn code(&self) -> u32 {
        let at = if self.ty == GOAWAY { 4 } else { 0 };
        self.payload
            .get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn last_stream(&self) -> u32 {
        self.payload.get(0..4).map_or(0, |b| {
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff
        })
    }
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    /// Acknowledge busbar's PINGs (a live client); off: a client that stopped answering.
    pong: bool,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        s.write_all(&hello).await.unwrap();
        Raw {
            s,
            buf: Vec::new(),
            pong: true,
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes).await
    }

    /// The next frame, acknowledging SETTINGS and answering PINGs on the way; `None` at
    /// the close or after `within`.
    async fn next(&mut self, within: Duration) -> Option<Frame> {
        let until = tokio::time::Instant::now() + within;
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        ty: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    if f.ty == SETTINGS && f.flags & 1 == 0 {
                        let _ = self.s.write_all(&frame(SETTINGS, 1, 0, &[])).await;
                    }
                    if f.ty == PING && f.flags & 1 == 0 && self.pong {
                        let _ = self.s.write_all(&frame(PING, 1, 0, &f.payload)).await;
                    }
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(until, self.s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads frames until busbar closes the connection: how long that took, or `None`
    /// when it was still open after `within`.
    async fn closed_within(&mut self, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        let until = tokio::time::Instant::now() + within;
        let mut chunk = [0u8; 16384];
        loop {
            match tokio::time::timeout_at(until, self.s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                Ok(_) => return Some(started.elapsed()),
                Err(_) => return None,
            }
        }
    }

    /// Frames until the close (or `within`), keeping only those `keep` wants.
    async fn collect(&mut self, within: Duration, keep: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let until = Instant::now() + within;
        let mut out = Vec::new();
        while let Some(f) = self
            .next(until.saturating_duration_since(Instant::now()))
            .await
        {
            if keep(&f) {
                out.push(f);
            }
        }
        out
    }
}

/// `:status 200` as the `h2` crate encodes it (indexed, static table 8).
fn is_200(f: &Frame) -> bool {
    f.ty == HEADERS && f.payload.first() == Some(&0x88)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_stream_is_reset_alone_and_reaches_no_backend() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "")).await;
    let mut raw = Raw::connect(bus.http).await;
    let bad: [(u32, Vec<(&str, &str)>); 6] = [
        (1, vec![("connection", "close")]),
        (5, vec![("keep-alive", "timeout=5")]),
        (7, vec![("te", "gzip")]),
        (9, vec![("transfer-encoding", "chunked")]),
        (11, vec![("host", "elsewhere")]),
        (13, vec![("upgrade", "websocket")]),
    ];
    let mut out = Vec::new();
    for (id, extra) in &bad {
        out.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            *id,
            &block("/bad", extra),
        ));
        if *id == 1 {
            // Between them, a good one on the same connection.
            out.extend(frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                3,
                &block("/good", &[]),
            ));
        }
    }
    // And a body that disagrees with its content-length.
    out.extend(frame(
        HEADERS,
        END_HEADERS,
        15,
        &block("/short", &[("content-length", "10")]),
    ));
    out.extend(frame(DATA, END_STREAM, 15, b"12345"));
    raw.send(&out).await.unwrap();

    let mut resets = std::collections::BTreeMap::new();
    let mut good = false;
    let mut goaway = None;
    let until = Instant::now() + Duration::from_secs(10);
    while resets.len() < 7 || !good {
        let Some(f) = raw
            .next(until.saturating_duration_since(Instant::now()))
            .await
        else {
            break;
        };
        match f.ty {
            RST_STREAM => {
                resets.insert(f.stream, f.code());
            }
            HEADERS if f.stream == 3 => good = is_200(&f),
            GOAWAY => goaway = Some(f.code()),
            _ => {}
        }
    }
    assert!(
        good,
        "the good stream got its 200 (resets {resets:?}, goaway {goaway:?})"
    );
    assert_eq!(goaway, None, "the connection stays up");
    for id in [1, 5, 7, 9, 11, 13, 15] {
        assert_eq!(
            resets.get(&id),
            Some(&PROTOCOL_ERROR),
            "stream {id}: {resets:?}"
        );
    }
    assert!(!resets.contains_key(&3));
    let seen = a.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the good stream reached the backend: {seen:?}"
    );
    assert_eq!(seen[0].path, "/good");

    // An uppercase field name: the `h2` crate's HPACK decoder refuses it for the whole
    // connection (GOAWAY PROTOCOL_ERROR), stricter than RFC 9113's stream error; it
    // reaches no backend either.
    let mut raw = Raw::connect(bus.http).await;
    raw.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &block("/upper", &[("X-Upper", "1")]),
    ))
    .await
    .unwrap();
    let frames = raw
        .collect(Duration::from_secs(5), |f| f.ty == GOAWAY || is_200(f))
        .await;
    assert!(frames
        .iter()
        .all(|f| f.ty == GOAWAY && f.code() == PROTOCOL_ERROR));
    assert_eq!(a.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_concurrency_limit_are_refused_or_queued_and_all_answered() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "h2_max_concurrent_streams = 100")).await;

    // A client that respects SETTINGS_MAX_CONCURRENT_STREAMS queues past 100: 1,000
    // streams at once, each held by the backend a moment, all answered.
    let send = h2c(bus.http).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let send = send.clone();
        calls.spawn(async move {
            let req = get(&format!("/many/{i}?sleep_ms=20"));
            let (resp, _) = send.ready().await?.send_request(req, true)?;
            let resp = resp.await?;
            let status = resp.status().as_u16();
            read_body(resp.into_body()).await;
            Ok::<u16, h2::Error>(status)
        });
    }
    let mut ok = 0;
    let mut refused = 0;
    while let Some(r) = calls.join_next().await {
        match r.unwrap() {
            Ok(200) => ok += 1,
            Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => refused += 1,
            other => panic!("unexpected: {other:?}"),
        }
    }
    // Streams opened before the client had busbar's SETTINGS may be refused; every
    // stream is answered or refused, none lost.
    assert_eq!(ok + refused, 1000);
    assert!(ok >= 100, "{ok} answered, {refused} refused");
    eprintln!("1,000 streams through the h2 client: {ok} answered, {refused} refused");

    // A client that does not: 150 streams at once, the ones past 100 get REFUSED_STREAM,
    // the rest their 200.
    let mut raw = Raw::connect(bus.http).await;
    // Let busbar's SETTINGS arrive first (the limit applies from its ACK on).
    let _ = raw.next(Duration::from_secs(5)).await;
    let mut out = Vec::new();
    for i in 0..150u32 {
        let path = format!("/raw/{i}?sleep_ms=500");
        out.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            1 + 2 * i,
            &block(&path, &[]),
        ));
    }
    raw.send(&out).await.unwrap();
    let mut answered = std::collections::BTreeSet::new();
    let mut refused = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(20);
    while answered.len() + refused.len() < 150 {
        let Some(f) = raw
            .next(until.saturating_duration_since(Instant::now()))
            .await
        else {
            break;
        };
        if is_200(&f) {
            answered.insert(f.stream);
        } else if f.ty == RST_STREAM {
            assert_eq!(f.code(), REFUSED_STREAM, "stream {}", f.stream);
            refused.insert(f.stream);
        }
    }
    assert_eq!(
        answered.len() + refused.len(),
        150,
        "{answered:?} {refused:?}"
    );
    assert!(answered.len() <= 100, "{} answered at once", answered.len());
    assert!(refused.len() >= 50, "{} refused", refused.len());
    eprintln!(
        "150 raw streams: {} answered, {} refused",
        answered.len(),
        refused.len()
    );
}

/// A raw HTTP/1.1 upstream that answers every request with `total` bytes
/// (`Content-Length`), written as fast as its peer takes them; `written` counts them.
async fn big_upstream(total: usize, written: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let written = written.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&b[..n]),
                        _ => return,
                    }
                }
                let h = format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n");
                if s.write_all(h.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'z'; 64 * 1024];
                let mut left = total;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    written.fetch_add(n as u64, Ordering::SeqCst);
                    left -= n;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_throttles_the_upstream_and_busbar_stays_small() {
    const TOTAL: usize = 256 * 1024 * 1024;
    let written = Arc::new(AtomicU64::new(0));
    let up = big_upstream(TOTAL, written.clone()).await;
    let bus = Busbar::start(&one_service(up, "client_timeout = \"60s\"")).await;
    let before = common::rss_kib(bus.pid());

    let mut send = h2c(bus.http).await;
    let (resp, _) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(get("/big"), true)
        .unwrap();
    let resp = resp.await.expect("head");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // Read nothing for a while: only the client's 64 KiB window, busbar's send buffer
    // and the sockets' buffers may fill.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled = written.load(Ordering::SeqCst);
    let grown = common::rss_kib(bus.pid()).saturating_sub(before);
    eprintln!("slow reader: upstream wrote {stalled} bytes in 2 s, busbar RSS +{grown} KiB");
    assert!(
        stalled < 48 * 1024 * 1024,
        "the upstream wrote {stalled} bytes to a client that read nothing"
    );
    assert!(grown < 48 * 1024, "busbar grew by {grown} KiB");
    // Then read it all: it arrives whole.
    let mut got = 0usize;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("chunk");
        got += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
        if got >= 16 * 1024 * 1024 {
            break;
        }
    }
    assert!(got >= 16 * 1024 * 1024);
    let _ = &mut send;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_gets_goaway_while_another_connection_is_served() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "")).await;
    let mut raw = Raw::connect(bus.http).await;
    let mut out = Vec::new();
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        out.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            id,
            &block("/flood?sleep_ms=50", &[]),
        ));
        out.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes())); // CANCEL
    }
    // The write may fail once busbar has closed: that is the point.
    let flood = raw.send(&out).await;
    let goaway = raw
        .collect(Duration::from_secs(10), |f| f.ty == GOAWAY)
        .await;
    assert!(
        goaway.iter().any(|f| f.code() == ENHANCE_YOUR_CALM),
        "GOAWAY ENHANCE_YOUR_CALM (write: {flood:?}; goaways {:?})",
        goaway.iter().map(Frame::code).collect::<Vec<_>>()
    );
    // Another connection is served meanwhile and after.
    let mut send = h2c(bus.http).await;
    let (status, _) = ask(&mut send, get("/calm")).await;
    assert_eq!(status, 200);
    assert!(
        a.hits() < 2000,
        "{} flood streams reached the backend",
        a.hits()
    );
    eprintln!(
        "rapid reset: {} of 2,000 flood streams reached the backend",
        a.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_ends_the_connection_and_others_are_served() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "")).await;
    let mut raw = Raw::connect(bus.http).await;
    let mut out = frame(HEADERS, END_STREAM, 1, &block("/cont", &[]));
    let mut piece = Vec::new();
    for i in 0..40 {
        piece.push(0x00);
        hstr(&mut piece, format!("x-junk-{i:03}").as_bytes());
        hstr(&mut piece, &[b'v'; 100]);
    }
    // ~5 KiB of headers a frame, far past the 64 KiB header list limit, never ended.
    for _ in 0..200 {
        out.extend(frame(CONTINUATION, 0, 1, &piece));
    }
    let _ = raw.send(&out).await;
    let frames = raw
        .collect(Duration::from_secs(10), |f| {
            f.ty == GOAWAY || f.ty == HEADERS
        })
        .await;
    assert!(
        frames.iter().any(|f| f.ty == GOAWAY),
        "the connection went away"
    );
    assert!(
        !frames.iter().any(is_200),
        "the flooded stream was not served"
    );
    assert_eq!(a.hits(), 0);
    let mut send = h2c(bus.http).await;
    let (status, _) = ask(&mut send, get("/fine")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_goaway_and_the_stream_in_flight_completes() {
    let a = Backend::start("a").await;
    let mut bus = Busbar::start(&one_service(a.addr, "")).await;
    let mut raw = Raw::connect(bus.http).await;
    raw.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &block("/slow?sleep_ms=1500", &[]),
    ))
    .await
    .unwrap();
    // The request reaches the backend, then the node is told to stop.
    common::daemon::wait_until(
        "the request in flight",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            let n = a.seen().len();
            async move { n == 1 }
        },
    )
    .await;
    bus.signal(15);
    let mut goaways = Vec::new();
    let mut status = false;
    let mut ended = false;
    let until = Instant::now() + Duration::from_secs(15);
    while let Some(f) = raw
        .next(until.saturating_duration_since(Instant::now()))
        .await
    {
        match f.ty {
            GOAWAY => goaways.push((f.last_stream(), f.code(), status)),
            HEADERS if f.stream == 1 => status = is_200(&f),
            DATA if f.stream == 1 && f.flags & END_STREAM != 0 => ended = true,
            _ => {}
        }
        if ended && !goaways.is_empty() {
            break;
        }
    }
    assert!(!goaways.is_empty(), "no GOAWAY");
    assert!(
        goaways.iter().all(|(_, code, _)| *code == 0),
        "GOAWAY NO_ERROR: {goaways:?}"
    );
    assert!(
        goaways
            .iter()
            .any(|(last, _, answered)| *last >= 1 && !answered),
        "a GOAWAY before the answer kept stream 1: {goaways:?}"
    );
    assert!(status && ended, "the stream in flight completed");
    assert!(
        bus.wait_exit(Duration::from_secs(15)).await.is_some(),
        "busbar exited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_translating_routes_keeps_the_connection_on_the_engine() {
    let a = Backend::start("a").await;
    let h2svc = Backend::start("h2c").await;
    let bus = Busbar::start(&one_service(a.addr, "")).await;
    let mut raw = Raw::connect(bus.http).await;
    raw.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &block("/before", &[]),
    ))
    .await
    .unwrap();
    let first = raw.collect(Duration::from_millis(1500), is_200).await;
    assert_eq!(first.len(), 1, "served before the reload");

    // A reload adds both kinds of translating route (first: routes match in file order).
    // Until this wave they sent every HTTP/2 connection to pingora's proxy (REFUSED_STREAM
    // and a GOAWAY on the open ones); the engine serves them now, on the same connection.
    let body = format!(
        "[[service]]\nname = \"g\"\nprotocol = \"h2c\"\nendpoints = [{{ addr = \"{}\" }}]\n[[route]]\nname = \"g\"\nservice = \"g\"\npath_prefix = \"/g\"\n[route.translate]\nfrom = \"json\"\nprotos = [\"{}/tests/protos/bookstore.proto\"]\n[[route]]\nname = \"w\"\nservice = \"g\"\npath_prefix = \"/w\"\n[route.translate]\nfrom = \"grpc-web\"\n{}",
        h2svc.addr,
        env!("CARGO_MANIFEST_DIR"),
        one_service(a.addr, ""),
    );
    bus.write_config(&body, "");
    let r = bus.reload().await;
    assert!(r.status().is_success(), "{:?}", r.text().await);
    // A gRPC caller of the JSON route passes through to the h2c service.
    raw.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        3,
        &block("/g/x", &[("content-type", "application/grpc")]),
    ))
    .await
    .unwrap();
    let frames = raw
        .collect(Duration::from_secs(3), |f| {
            f.ty == RST_STREAM || f.ty == GOAWAY || (f.ty == HEADERS && f.stream == 3)
        })
        .await;
    assert!(
        frames.iter().any(|f| f.stream == 3 && is_200(f)),
        "stream 3 answered 200 on the same connection: {:?}",
        frames.iter().map(|f| (f.ty, f.stream)).collect::<Vec<_>>()
    );
    assert!(
        !frames.iter().any(|f| f.ty == RST_STREAM || f.ty == GOAWAY),
        "no REFUSED_STREAM, no GOAWAY"
    );
    assert_eq!(h2svc.hits(), 1);
    assert_eq!(h2svc.seen()[0].version, "HTTP/2.0");
}

/// A raw HTTP/1.1 upstream that reads one request through the end of its chunked body
/// (trailers included) into `got`, then answers chunked with trailers.
async fn trailer_upstream(got: Arc<std::sync::Mutex<Vec<u8>>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let got = got.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let mut b = [0u8; 4096];
                // The body's end: the last chunk, its trailers, the empty line.
                while !all.windows(5).any(|w| w == b"\r\n0\r\n") || !all.ends_with(b"\r\n\r\n") {
                    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
                        Ok(Ok(n)) if n > 0 => all.extend_from_slice(&b[..n]),
                        _ => return,
                    }
                }
                *got.lock().unwrap() = all;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-head: 1\r\n\r\n\
                          5\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\nx-sum: 11\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_go_both_ways_between_h2_and_chunked_http1() {
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let up = trailer_upstream(got.clone()).await;
    let bus = Busbar::start(&one_service(up, "")).await;
    let send = h2c(bus.http).await;
    let req = http::Request::post("http://localhost/t").body(()).unwrap();
    let (resp, mut tx) = send
        .ready()
        .await
        .unwrap()
        .send_request(req, false)
        .unwrap();
    tx.send_data(Bytes::from_static(b"abc"), false).unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "abc1".parse().unwrap());
    tx.send_trailers(trailers).unwrap();
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-head"], "1");
    assert!(resp.headers().get("transfer-encoding").is_none());
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(c) = body.data().await {
        let c = c.unwrap();
        let _ = body.flow_control().release_capacity(c.len());
        data.extend_from_slice(&c);
    }
    assert_eq!(data, b"hello world");
    let t = body.trailers().await.unwrap().expect("response trailers");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["x-sum"], "11");
    let request = String::from_utf8_lossy(&got.lock().unwrap()).to_lowercase();
    assert!(
        request.contains("transfer-encoding: chunked\r\n"),
        "{request}"
    );
    assert!(
        request.ends_with("\r\n3\r\nabc\r\n0\r\nx-checksum: abc1\r\n\r\n"),
        "{request}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_header_fields_get_431_like_http1() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "max_headers = 20")).await;
    let mut send = h2c(bus.http).await;
    let mut req = get("/many-fields");
    for i in 0..25 {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-f{i}").as_bytes()).unwrap(),
            "1".parse().unwrap(),
        );
    }
    let (status, body) = ask(&mut send, req).await;
    assert_eq!(status, 431);
    assert_eq!(body["error"], "headers_too_large");
    assert_eq!(a.hits(), 0);
    // The connection goes on.
    let (status, _) = ask(&mut send, get("/few")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_gets_a_graceful_goaway() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "idle_timeout = \"1s\"")).await;
    let mut raw = Raw::connect(bus.http).await;
    raw.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &block("/once", &[]),
    ))
    .await
    .unwrap();
    let started = Instant::now();
    let frames = raw
        .collect(Duration::from_secs(10), |f| f.ty == GOAWAY || is_200(f))
        .await;
    let idle_for = started.elapsed();
    assert!(is_200(&frames[0]), "the request was answered");
    let goaway = frames.iter().find(|f| f.ty == GOAWAY).expect("GOAWAY");
    assert_eq!(goaway.code(), 0, "NO_ERROR");
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(8),
        "closed after {idle_for:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reset_after_busbar_took_them_also_count_as_a_flood() {
    // Each stream is reset only once the backend has it: the `h2` crate's limit (resets
    // before accept) never sees these; busbar's count of abandoned streams does.
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "")).await;
    let mut raw = Raw::connect(bus.http).await;
    let mut next_id = 1u32;
    let mut calm = false;
    'flood: for _ in 0..60 {
        let ids: Vec<u32> = (0..10).map(|i| next_id + 2 * i).collect();
        next_id += 20;
        let before = a.hits();
        let mut out = Vec::new();
        for id in &ids {
            out.extend(frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                *id,
                &block("/slow?sleep_ms=3000", &[]),
            ));
        }
        if raw.send(&out).await.is_err() {
            break;
        }
        let until = Instant::now() + Duration::from_secs(10);
        while a.hits() < before + ids.len() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut out = Vec::new();
        for id in &ids {
            out.extend(frame(RST_STREAM, 0, *id, &8u32.to_be_bytes()));
        }
        if raw.send(&out).await.is_err() {
            break;
        }
        while let Some(f) = raw.next(Duration::from_millis(20)).await {
            if f.ty == GOAWAY {
                calm = f.code() == ENHANCE_YOUR_CALM;
                break 'flood;
            }
        }
    }
    let hits = a.hits();
    assert!(
        calm,
        "GOAWAY ENHANCE_YOUR_CALM after {hits} streams reached the backend"
    );
    assert!(
        (100..400).contains(&hits),
        "{hits} streams reached the backend"
    );
    eprintln!("accepted-then-reset flood: GOAWAY after {hits} streams reached the backend");
    let mut send = h2c(bus.http).await;
    assert_eq!(ask(&mut send, get("/calm")).await.0, 200);
}

/// A client that stops answering busbar's PINGs while its stream waits on the backend
/// (Envoy's `connection_keepalive`): its connection is closed once a PING goes
/// unanswered for `h2_keepalive_timeout`, while a live connection keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_answering_ping_is_closed_and_others_are_served() {
    let a = Backend::start("a").await;
    let limits = "h2_keepalive_interval = \"1s\"\nh2_keepalive_timeout = \"1s\"";
    let bus = Busbar::start(&one_service(a.addr, limits)).await;
    let mut dead = Raw::connect(bus.http).await;
    // The handshake first (SETTINGS both ways), then the client goes silent.
    assert!(dead.next(Duration::from_secs(10)).await.is_some());
    dead.pong = false;
    dead.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &block("/hold?sleep_ms=30000", &[]),
    ))
    .await
    .unwrap();
    let started = Instant::now();
    let watch = tokio::spawn(async move {
        let mut pings = 0;
        let closed = loop {
            match dead.next(Duration::from_secs(20)).await {
                Some(f) if f.ty == PING && f.flags & 1 == 0 => pings += 1,
                Some(_) => {}
                None => break dead.closed_within(Duration::from_millis(100)).await,
            }
        };
        (pings, closed)
    });
    // A live connection (the `h2` crate answers PINGs) is served throughout.
    let mut live = h2c(bus.http).await;
    let mut served = 0;
    while !watch.is_finished() && started.elapsed() < Duration::from_secs(25) {
        assert_eq!(ask(&mut live, get("/live")).await.0, 200);
        served += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (pings, closed) = watch.await.unwrap();
    let after = started.elapsed();
    assert!(pings >= 1, "busbar sent a PING");
    assert!(closed.is_some(), "the silent connection was closed");
    // The first PING after 1 s, unanswered for 1 s: closed after about 2 s.
    assert!(
        after >= Duration::from_millis(1800) && after < Duration::from_secs(15),
        "closed after {after:?}"
    );
    assert_eq!(ask(&mut live, get("/after")).await.0, 200);
    eprintln!("unanswered PING: connection closed after {after:?}; {served} requests served meanwhile on another");
}

/// An idle client that gets its GOAWAY but answers nothing (gone without a FIN): the
/// `h2` crate waits for its PING's answer before closing, so the connection would stay
/// open for ever; busbar closes it `h2_keepalive_timeout` after the GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_after_its_goaway() {
    let a = Backend::start("a").await;
    let limits = "idle_timeout = \"1s\"\nh2_keepalive_timeout = \"1s\"";
    let bus = Busbar::start(&one_service(a.addr, limits)).await;
    let mut raw = Raw::connect(bus.http).await;
    raw.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &block("/once", &[]),
    ))
    .await
    .unwrap();
    let mut answered = false;
    while let Some(f) = raw.next(Duration::from_secs(10)).await {
        if is_200(&f) {
            answered = true;
            break;
        }
    }
    assert!(answered, "the request was answered");
    raw.pong = false;
    let started = Instant::now();
    let mut goaway = None;
    while let Some(f) = raw.next(Duration::from_secs(10)).await {
        if f.ty == GOAWAY {
            goaway = Some(started.elapsed());
            break;
        }
    }
    assert!(goaway.is_some(), "a graceful GOAWAY once idle");
    let closed = raw.closed_within(Duration::from_secs(15)).await;
    let after = started.elapsed();
    assert!(closed.is_some(), "still open {after:?} after going idle");
    assert!(after < Duration::from_secs(10), "closed after {after:?}");
    eprintln!("silent client: GOAWAY after {goaway:?}, closed after {after:?}");
}

/// A stream busbar resets for a malformed head (here a `Host` that disagrees with
/// `:authority`) has its access-log line (status 0: nothing was answered;
/// `malformed_request`; the protocol), as an HTTP/1 refusal has. (What the `h2` crate
/// resets itself, connection-specific headers for one, never reaches busbar.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_as_malformed_has_an_access_log_line() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "")).await;
    let mut raw = Raw::connect(bus.http).await;
    raw.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &block("/bad", &[("host", "elsewhere")]),
    ))
    .await
    .unwrap();
    let reset = raw
        .collect(Duration::from_secs(3), |f| f.ty == RST_STREAM)
        .await;
    assert!(!reset.is_empty(), "the stream was reset");
    let until = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = bus.access_log();
        if let Some(l) = log.lines().find(|l| l.contains("malformed_request")) {
            break serde_json::from_str::<Value>(l).unwrap();
        }
        assert!(
            Instant::now() < until,
            "no line for the reset stream: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["status"], 0, "{line}");
    assert_eq!(line["error"], "malformed_request", "{line}");
    assert_eq!(line["protocol"], "h2c", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(a.hits(), 0);
}

/// The same to an HTTP/1 service: a stream whose body stops mid-way gets 408
/// `body_timeout` after `client_timeout`, while the connection serves other streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_to_an_http1_service_gets_408() {
    let a = Backend::start("a").await;
    let bus = Busbar::start(&one_service(a.addr, "client_timeout = \"1s\"")).await;
    let mut send = h2c(bus.http).await;
    let req = http::Request::post("http://localhost/stalls")
        .header("content-length", "100")
        .body(())
        .unwrap();
    let started = Instant::now();
    let (resp, mut tx) = send.clone().send_request(req, false).unwrap();
    tx.send_data(Bytes::from_static(b"ten bytes."), false)
        .unwrap();
    assert_eq!(ask(&mut send, get("/meanwhile")).await.0, 200);
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("an answer")
        .expect("a response");
    let took = started.elapsed();
    assert_eq!(resp.status(), 408);
    let body = read_body(resp.into_body()).await;
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "body_timeout", "{json}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "408 after {took:?}"
    );
    assert_eq!(ask(&mut send, get("/after")).await.0, 200);
}
