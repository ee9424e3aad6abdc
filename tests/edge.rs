//! The front door: ambiguous framing, oversize heads and slow heads are refused before
//! anything reaches an upstream; slow bodies and clients that stop reading are cut off by
//! their timeouts.

mod common;

use std::time::{Duration, Instant};

use common::http1::{exchange, Conn};
use common::{Backend, Busbar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn bus(backend: &Backend) -> Busbar {
    bus_with(backend, r#"header_timeout = "1s""#).await
}

/// One route to `backend`, with these `[limits]`.
async fn bus_with(backend: &Backend, limits: &str) -> Busbar {
    Busbar::start(&common::one_route(
        backend.addr,
        &format!("[limits]\n{limits}"),
        "",
    ))
    .await
}

/// Sends raw bytes and returns what came back until the server closed or 3 s passed.
async fn raw(bus: &Busbar, bytes: &[u8]) -> String {
    exchange(bus.http, bytes, Duration::from_secs(3)).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_get_400_and_reach_nobody() {
    let backend = Backend::start("b").await;
    let bus = bus(&backend).await;
    let cases: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        // RFC 9112 §3.2: an HTTP/1.1 request without Host (nginx and Envoy answer 400).
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    ];
    for case in cases {
        let reply = raw(&bus, case).await;
        assert!(
            reply.starts_with("HTTP/1.1 400"),
            "{:?} → {reply}",
            String::from_utf8_lossy(case)
        );
        assert!(reply.contains("malformed_request"), "{reply}");
    }
    assert_eq!(backend.hits(), 0, "the upstream saw {:?}", backend.seen());
    // A clean request still goes through on a fresh connection.
    let reply = raw(
        &bus,
        b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(backend.hits(), 1);
    // HTTP/1.0 needs no Host; the upstream request (HTTP/1.1) gets the service's name,
    // as nginx sends its upstream's.
    let reply = raw(&bus, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(backend.hits(), 2);
    assert_eq!(backend.seen()[1].headers["host"], "s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_heads_get_414_and_431() {
    let backend = Backend::start("b").await;
    let bus = bus(&backend).await;
    let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9 * 1024));
    assert!(raw(&bus, long.as_bytes()).await.starts_with("HTTP/1.1 414"));
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    assert!(raw(&bus, big.as_bytes()).await.starts_with("HTTP/1.1 431"));
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    assert!(raw(&bus, many.as_bytes()).await.starts_with("HTTP/1.1 431"));
    assert_eq!(backend.hits(), 0);
    let m = bus.metrics().await;
    assert_eq!(
        common::metric_value(
            &m,
            r#"busbar_edge_refusals_total{reason="headers_too_large"}"#
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_head_is_cut_off_at_the_deadline() {
    let backend = Backend::start("b").await;
    let bus = bus(&backend).await;
    let mut s = TcpStream::connect(bus.http).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut out = Vec::new();
    // Keep trickling one header byte every 200 ms; the 1 s deadline must still end it.
    let trickle = async {
        for _ in 0..30 {
            if s.write_all(b"X").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(4), trickle)
        .await
        .ok();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    let reply = String::from_utf8_lossy(&out);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(backend.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_on_a_keepalive_connection_is_checked() {
    let backend = Backend::start("b").await;
    let bus = bus(&backend).await;
    let mut s = TcpStream::connect(bus.http).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for path in ["/1", "/2"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    // The third request on the same connection smuggles: refused, never forwarded.
    s.write_all(b"POST /3 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"));
    let paths: Vec<String> = backend.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/1", "/2"]);
}

/// HTTP/1.1 pipelining: requests sent back to back before any answer are each answered,
/// in order, and each reaches the backend whole (D11: the second was lost and the
/// client waited for an answer that never came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_in_order() {
    let backend = Backend::start("b").await;
    let bus = bus(&backend).await;
    let mut s = TcpStream::connect(bus.http).await.unwrap();
    s.write_all(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n\
          POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
          GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert_eq!(out.matches("HTTP/1.1 200").count(), 3, "{out}");
    let seen = backend.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/1", "/2", "/3"]);
    assert_eq!(seen[1].body, b"hello");
    assert!(seen[0].body.is_empty() && seen[2].body.is_empty());
}

/// A keep-alive connection idle past the second in which it keeps its head buffer gives
/// it back; its next request, arriving a byte at a time and then pipelined with a third,
/// is read and answered as on a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_past_its_buffer_still_serves_its_next_requests() {
    let backend = Backend::start("b").await;
    let bus = bus(&backend).await;
    let mut s = TcpStream::connect(bus.http).await.unwrap();
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let next: &[u8] = b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n\
        GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    s.write_all(&next[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&next[1..9]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&next[9..]).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    let paths: Vec<String> = backend.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/1", "/2", "/3"]);
}

/// A keep-alive connection's requests are served whether the next one comes at once
/// (pipelined, or while the connection is busy), after a pause in which the connection
/// went back to its idle wait (longer than the 100 ms a busy connection waits), or after
/// several such pauses: each on the same connection, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_serves_requests_after_short_and_longer_pauses() {
    let backend = Backend::start("b").await;
    let bus = bus(&backend).await;
    let mut s = TcpStream::connect(bus.http).await.unwrap();
    let mut got = Vec::new();
    for (i, pause) in [0u64, 0, 300, 10, 400, 250].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let req = format!("GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        // Read until this request's answer is whole (the backend's body is small).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while String::from_utf8_lossy(&got)
            .matches("HTTP/1.1 200")
            .count()
            <= i
        {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
                .await
                .expect("an answer within 10 s")
                .unwrap();
            assert!(n > 0, "the connection closed after {i} answers");
            got.extend_from_slice(&chunk[..n]);
        }
    }
    let paths: Vec<String> = backend.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/0", "/1", "/2", "/3", "/4", "/5"]);
}

/// A keep-alive connection with no next request is closed once `idle_timeout` passes
/// (the one second it keeps its head buffer included), not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let backend = Backend::start("b").await;
    let bus = bus_with(&backend, r#"idle_timeout = "2s""#).await;
    let mut s = TcpStream::connect(bus.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    let idle = idle_from.elapsed();
    assert!(
        matches!(read, Ok(Ok(_))),
        "the idle connection was not closed within 10 s: {read:?}"
    );
    assert!(
        idle >= Duration::from_millis(1900),
        "closed after {idle:?}, before idle_timeout"
    );
}

/// Defect D4 (RELIABILITY.md): a client still sending a body busbar refused got a
/// connection reset, which threw away the 413 it had already received. busbar now
/// closes such a connection lingering (FIN, then reads and discards), so the client
/// reads its 413 — for a declared Content-Length over the limit and for a chunked body
/// that crosses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_body_still_being_sent_gets_its_413() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{}" }}]
[[route]]
name = "all"
service = "s"
max_body = "1KiB"
"#,
        backend.addr
    ))
    .await;
    let piece = vec![b'x'; 64 * 1024];
    for round in 0..16 {
        // Declared lengths first: those are refused before anything goes upstream. A
        // chunked body is streamed upstream until it crosses the limit.
        let chunked = round >= 8;
        if round == 8 {
            assert_eq!(
                backend.hits(),
                0,
                "a refused Content-Length reached the backend: {:?}",
                backend.seen()
            );
        }
        let mut s = TcpStream::connect(bus.http).await.unwrap();
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_string()
        } else {
            format!("Content-Length: {}", 64 * piece.len())
        };
        let head = format!("POST /upload HTTP/1.1\r\nHost: a\r\n{framing}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        // Keep sending, as an upload client does. Many clients (curl, Python's) give up
        // on the answer when a write fails, so the body must never meet a reset.
        let mut write_error = None;
        for _ in 0..64 {
            let sent = if chunked {
                let mut c = b"10000\r\n".to_vec();
                c.extend_from_slice(&piece);
                c.extend_from_slice(b"\r\n");
                s.write_all(&c).await
            } else {
                s.write_all(&piece).await
            };
            if let Err(e) = sent {
                write_error = Some(e);
                break;
            }
        }
        assert!(
            write_error.is_none(),
            "round {round} (chunked: {chunked}): reset while sending the body: {write_error:?}"
        );
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "round {round} (chunked: {chunked}): the client did not get its 413 ({read:?}): {:?}",
            &text[..text.len().min(200)]
        );
    }
}

/// What the raw upstream of the slow-client tests saw on one connection.
#[derive(Debug, Clone)]
struct UpstreamConn {
    /// Body bytes received (POST) or response bytes written (`GET /big`).
    bytes: usize,
    /// The connection ended before the declared body was in (POST), or a response write
    /// failed because busbar closed the connection (`GET /big`).
    cut: bool,
}

/// A raw HTTP/1.1 upstream: records each connection's fate (see `UpstreamConn`), answers
/// a complete POST body with 200, and `GET /big` with `BIG` bytes written as fast as busbar
/// takes them. Stops when dropped.
struct RawUpstream {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<UpstreamConn>>>,
    task: tokio::task::JoinHandle<()>,
}

const BIG: usize = 256 << 20;

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.spawn(Self::serve(s, log.clone()));
            }
        });
        RawUpstream { addr, seen, task }
    }

    async fn serve(mut s: TcpStream, log: std::sync::Arc<std::sync::Mutex<Vec<UpstreamConn>>>) {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let end = loop {
            match s.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        let (bytes, cut) = if path == "/big" {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
            let mut sent = 0;
            let mut cut = s.write_all(head.as_bytes()).await.is_err();
            while !cut && sent < BIG {
                cut = s.write_all(&chunk).await.is_err();
                sent += chunk.len();
            }
            (sent, cut)
        } else {
            let declared: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut got = buf.len() - end;
            while got < declared {
                match s.read(&mut chunk).await {
                    Ok(n) if n > 0 => got += n,
                    _ => break,
                }
            }
            if got >= declared {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            }
            (got, got < declared)
        };
        log.lock().unwrap().push(UpstreamConn { bytes, cut });
    }

    fn seen(&self) -> Vec<UpstreamConn> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// busbar with a 1 s `client_timeout` (per read and write, and the body's grace) in front
/// of a raw upstream.
async fn slow_client_bus(upstream: &RawUpstream) -> Busbar {
    Busbar::start(&format!(
        r#"
[limits]
client_timeout = "1s"

[[service]]
name = "s"
endpoints = [{{ addr = "{}" }}]
timeout = "60s"
read_timeout = "60s"
[[route]]
name = "all"
service = "s"
"#,
        upstream.addr
    ))
    .await
}

/// Case 3b, slow body: a client that sends part of a declared body and then nothing gets
/// 408 `body_timeout` once `client_timeout` passes with no byte, its connection is closed,
/// and the upstream connection carrying the half request is closed with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_and_the_upstream_half_request_is_closed() {
    let upstream = RawUpstream::start().await;
    let bus = slow_client_bus(&upstream).await;
    let mut s = Conn::connect(bus.http).await;
    let start = Instant::now();
    s.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n0123456789")
        .await
        .unwrap();
    let (reply, closed) = s.read_to_close(Duration::from_secs(10)).await;
    let reply = String::from_utf8_lossy(&reply);
    let took = start.elapsed();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("body_timeout"), "{reply}");
    assert!(closed, "the connection stayed open after the 408");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "answered after {took:?} (client_timeout 1s)"
    );
    // busbar's own engine holds a body's first 64 KiB before it asks the upstream: the
    // half request reached nobody (pingora's path sent the head and the 10 bytes, then
    // cut that connection).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = upstream.seen();
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(
        bus.metric(r#"busbar_edge_refusals_total{reason="body_timeout"}"#)
            .await,
        1.0
    );
}

/// Case 3b, slow body (R-U-Dead-Yet): a byte every 200 ms never lets a 1 s per-read timeout
/// fire, but the body must average `body_min_rate` (500 B/s by default) once its 1 s of
/// grace is spent: it is cut off with 408, and the upstream's half request ends too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_off_once_it_falls_behind_its_pace() {
    let upstream = RawUpstream::start().await;
    let bus = slow_client_bus(&upstream).await;
    let s = TcpStream::connect(bus.http).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let start = Instant::now();
    wr.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\nx")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(b"x").await.is_err() {
                break;
            }
        }
        wr
    });
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(8), rd.read_to_end(&mut out))
        .await
        .is_ok();
    let took = start.elapsed();
    let _ = trickle.await;
    let reply = String::from_utf8_lossy(&out);
    assert!(
        reply.starts_with("HTTP/1.1 408"),
        "after {took:?}, closed: {closed}: {reply:?}"
    );
    assert!(reply.contains("body_timeout"), "{reply}");
    assert!(closed);
    assert!(took < Duration::from_secs(4), "cut off after {took:?}");
    // Held by busbar, not streamed: the upstream saw nothing of it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = upstream.seen();
    assert!(seen.is_empty(), "{seen:?}");
}

/// Case 3b, slow read: a client that asks for a large response and never reads it is
/// disconnected once a write to it has made no progress for `client_timeout`; busbar
/// drops the upstream connection (its writes fail) and holds no connection afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_by_the_send_timeout() {
    let upstream = RawUpstream::start().await;
    let bus = slow_client_bus(&upstream).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = Conn::new(sock.connect(bus.http).await.unwrap());
    let start = Instant::now();
    s.send(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    // Don't read; busbar's writes fill the socket buffers and stall.
    let deadline = start + Duration::from_secs(6);
    let mut held = f64::NAN;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        held = bus.metric("busbar_downstream_connections").await;
        if held == 0.0 && !upstream.seen().is_empty() {
            break;
        }
    }
    let took = start.elapsed();
    assert_eq!(
        held, 0.0,
        "busbar still holds the connection after {took:?}"
    );
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].cut && seen[0].bytes < BIG,
        "the upstream was not cut off: {seen:?}"
    );
    assert_eq!(
        bus.metric(r#"busbar_edge_refusals_total{reason="send_timeout"}"#)
            .await,
        1.0
    );
    // What the client can still read is what was in flight, then the connection ends.
    let (got, closed) = s.read_to_close(Duration::from_secs(10)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(closed, "the client's connection was never closed");
    assert!(got.starts_with("HTTP/1.1 200"));
    assert!(got.len() < BIG, "the whole response arrived");
}
