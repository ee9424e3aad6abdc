//! The front door: ambiguous framing, oversize heads and slow heads are refused before
//! anything reaches an upstream.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Busbar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn bus(backend: &Backend) -> Busbar {
    Busbar::start(&format!(
        r#"
[limits]
header_timeout = "1s"

[[service]]
name = "s"
endpoints = [{{ addr = "{}" }}]
[[route]]
name = "all"
service = "s"
"#,
        backend.addr
    ))
    .await
}

/// Sends raw bytes and returns what came back until the server closed or 3 s passed.
async fn raw(bus: &Busbar, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(bus.http).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
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
