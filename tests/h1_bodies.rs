//! Request bodies and HTTP/1.0 on busbar's own HTTP/1 engine (`src/drivers/h1/`, issue
//! 20): what a client and the upstream see. The upstream here is raw: it records the
//! exact bytes each connection carried and counts connections, and behaves by path.
//!
//! `/echo` reads the body (by its length or its chunked framing) and answers `200` with
//! the body's wire bytes counted; if the request expects `100-continue` it says `100
//! Continue` first (but `/quiet`, which ignores the expectation). `/early` answers `417`
//! from the head alone and reads nothing. `/fail` reads the body and closes without an
//! answer. `/chunked` answers chunked.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busbar::drivers::h1::framing::ChunkScan;
use common::http1::Conn;
use common::Busbar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What one upstream connection received.
#[derive(Default)]
struct Got {
    /// The first 1 MiB of what came, exactly.
    bytes: Vec<u8>,
    /// Every byte that came.
    total: u64,
    /// Requests whose body was read whole.
    requests: usize,
}

struct Raw {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    got: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Raw {
    async fn start() -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let (c, g) = (conns.clone(), got.clone());
        let task = tokio::spawn(async move {
            let mut all = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                let id = c.fetch_add(1, Ordering::SeqCst);
                g.lock().unwrap().push(Got::default());
                all.spawn(serve(s, id, g.clone()));
            }
        });
        Raw {
            addr,
            conns,
            got,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    fn bytes(&self, conn: usize) -> Vec<u8> {
        self.got.lock().unwrap()[conn].bytes.clone()
    }

    fn total(&self) -> u64 {
        self.got.lock().unwrap().iter().map(|g| g.total).sum()
    }

    fn requests(&self) -> usize {
        self.got.lock().unwrap().iter().map(|g| g.requests).sum()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads more into `buf`, recording it; false at the close.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, id: usize, got: &Mutex<Vec<Got>>) -> bool {
    let mut chunk = vec![0u8; 64 * 1024];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(k) => {
            let mut all = got.lock().unwrap();
            let g = &mut all[id];
            g.total += k as u64;
            let room = (1usize << 20).saturating_sub(g.bytes.len()).min(k);
            g.bytes.extend_from_slice(&chunk[..room]);
            buf.extend_from_slice(&chunk[..k]);
            true
        }
    }
}

async fn serve(mut s: TcpStream, id: usize, got: Arc<Mutex<Vec<Got>>>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(&mut s, &mut buf, id, &got).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        buf.drain(..end);
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        if path == "/early" {
            let _ = s
                .write_all(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 4\r\n\r\nnope")
                .await;
            // Reads nothing more: the body (if any comes) stays unread.
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        if head.contains("expect: 100-continue") && path != "/quiet" {
            let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        }
        let length: Option<u64> = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok());
        let chunked = head.contains("transfer-encoding: chunked");
        let mut body = 0u64;
        if chunked {
            let mut scan = ChunkScan::default();
            loop {
                match scan.feed(&buf) {
                    Ok(fed) => {
                        if let Some(e) = fed.end {
                            body += e as u64;
                            buf.drain(..e);
                            break;
                        }
                        body += buf.len() as u64;
                        buf.clear();
                    }
                    Err(_) => return,
                }
                if !fill(&mut s, &mut buf, id, &got).await {
                    return;
                }
            }
        } else if let Some(n) = length {
            let mut left = n;
            loop {
                let k = left.min(buf.len() as u64);
                buf.drain(..k as usize);
                left -= k;
                if left == 0 {
                    break;
                }
                if !fill(&mut s, &mut buf, id, &got).await {
                    return;
                }
            }
            body = n;
        }
        got.lock().unwrap()[id].requests += 1;
        if path == "/fail" {
            return;
        }
        let answer = if path == "/chunked" {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n".to_vec()
        } else {
            let text = format!("{body}");
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )
            .into_bytes()
        };
        if s.write_all(&answer).await.is_err() {
            return;
        }
    }
}

async fn bus(up: &Raw, sections: &str) -> Busbar {
    Busbar::start(&common::one_route(up.addr, sections, "")).await
}

fn post(path: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn chunked_head(path: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes()
}

/// A process's resident memory, in KiB, from /proc (`VmRSS` or `VmHWM`).
fn vm(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_100_mib_body_streams_in_both_framings_with_bounded_memory() {
    let up = Raw::start().await;
    let bus = bus(&up, "[limits]\nmax_body = \"1GiB\"\n").await;
    // Warm up, then the baseline.
    let mut c = Conn::connect(bus.http).await;
    assert_eq!(c.ask(&post("/echo", "", b"hi"), false).await.status(), 200);
    let base = vm(bus.pid(), "VmRSS");
    const SIZE: usize = 100 << 20;
    let piece = vec![b'x'; 64 * 1024];
    // Content-Length.
    let mut c = Conn::connect(bus.http).await;
    c.send(format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    for _ in 0..SIZE / piece.len() {
        c.send(&piece).await.unwrap();
    }
    let r = c.read_response(false).await;
    assert_eq!(
        (r.status(), r.text()),
        (200, SIZE.to_string()),
        "{}",
        r.head
    );
    // Chunked, 64 KiB chunks.
    c.send(&chunked_head("/echo")).await.unwrap();
    let mut wire = 0;
    for _ in 0..SIZE / piece.len() {
        let line = format!("{:x}\r\n", piece.len());
        c.send(line.as_bytes()).await.unwrap();
        c.send(&piece).await.unwrap();
        c.send(b"\r\n").await.unwrap();
        wire += line.len() + piece.len() + 2;
    }
    c.send(b"0\r\n\r\n").await.unwrap();
    wire += 5;
    let r = c.read_response(false).await;
    assert_eq!(
        (r.status(), r.text()),
        (200, wire.to_string()),
        "{}",
        r.head
    );
    let peak = vm(bus.pid(), "VmHWM");
    eprintln!("busbar RSS before {base} KiB, peak {peak} KiB");
    assert!(
        peak < base + 64 * 1024,
        "busbar peaked at {peak} KiB from {base} KiB"
    );
    assert!(up.total() > 2 * SIZE as u64);
}

#[tokio::test]
async fn a_chunked_body_reaches_the_upstream_as_sent_with_its_trailers() {
    let up = Raw::start().await;
    let bus = bus(&up, "").await;
    let body: &[u8] =
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\nx-more: 1\r\n\r\n";
    let mut req = chunked_head("/echo");
    req.extend_from_slice(body);
    let mut c = Conn::connect(bus.http).await;
    let r = c.ask(&req, false).await;
    assert_eq!((r.status(), r.text()), (200, body.len().to_string()));
    let got = up.bytes(0);
    assert!(got.ends_with(body), "{}", String::from_utf8_lossy(&got));
    let head = String::from_utf8_lossy(&got).to_lowercase();
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
    // The same connection goes on, and so does the upstream's.
    let r = c.ask(&post("/echo", "", b"abc"), false).await;
    assert_eq!((r.status(), r.text()), (200, "3".into()));
    assert_eq!(up.connections(), 1);
    // The engine served them: counted and logged as every request is.
    assert_eq!(
        bus.metric_settled(
            "busbar_requests_total{class=\"2xx\",method=\"POST\",reason=\"\",route=\"all\",service=\"s\"}",
            2.0
        )
        .await,
        2.0
    );
    assert!(
        common::eventually(Duration::from_secs(5), || bus
            .access_log()
            .lines()
            .filter(|l| l.contains("\"POST\""))
            .count()
            == 2)
        .await
    );
}

#[tokio::test]
async fn a_malformed_chunked_body_busbar_holds_reaches_nobody() {
    let up = Raw::start().await;
    let bus = bus(&up, "").await;
    for bad in [
        &b"fffffffffffffffff\r\nx\r\n0\r\n\r\n"[..],
        b"5\r\nhelloXX0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"zz\r\n",
        b"3;a b\r\nabc\r\n0\r\n\r\n",
    ] {
        let mut req = chunked_head("/echo");
        req.extend_from_slice(bad);
        let mut c = Conn::connect(bus.http).await;
        let r = c.ask(&req, false).await;
        assert_eq!(
            r.status(),
            400,
            "{}: {}",
            String::from_utf8_lossy(bad),
            r.head
        );
        assert!(r.text().contains("\"error\""), "{}", r.text());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.connections(), 0, "the upstream was reached");
}

#[tokio::test]
async fn a_malformed_chunk_found_late_cuts_that_upstream_connection() {
    let up = Raw::start().await;
    let bus = bus(&up, "").await;
    let mut c = Conn::connect(bus.http).await;
    c.send(&chunked_head("/echo")).await.unwrap();
    let piece = vec![b'y'; 32 * 1024];
    for _ in 0..8 {
        c.send(format!("{:x}\r\n", piece.len()).as_bytes())
            .await
            .unwrap();
        c.send(&piece).await.unwrap();
        c.send(b"\r\n").await.unwrap();
    }
    // Over 64-bit, after 256 KiB went upstream.
    c.send(b"fffffffffffffffff\r\n").await.unwrap();
    let r = c.read_response(false).await;
    assert_eq!(r.status(), 400, "{}", r.head);
    // More than busbar holds went upstream before the bad line came.
    assert!(
        common::eventually(Duration::from_secs(5), || up.total() > 128 * 1024).await,
        "{}",
        up.total()
    );
    // The next request gets a new upstream connection: the cut one was not pooled.
    let mut c = Conn::connect(bus.http).await;
    let r = c.ask(&post("/echo", "", b"abc"), false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.connections(), 2);
    assert_eq!(up.requests(), 1, "only the good request was read whole");
}

#[tokio::test]
async fn expect_100_continue_is_forwarded_and_an_early_answer_comes_without_the_body() {
    let up = Raw::start().await;
    let bus = bus(&up, "").await;
    // The upstream says 417 before the body: the waiting client gets it, sends nothing.
    let mut c = Conn::connect(bus.http).await;
    c.send(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), c.read_response(false))
        .await
        .expect("no deadlock");
    assert_eq!((r.status(), r.text()), (417, "nope".into()), "{}", r.head);
    assert_eq!(r.header("connection"), Some("close"));
    let got = String::from_utf8_lossy(&up.bytes(0)).to_lowercase();
    assert!(got.contains("expect: 100-continue"), "{got}");
    // The upstream says 100: the client hears it, then sends, then gets the answer.
    let mut c = Conn::connect(bus.http).await;
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let r = c.read_response(false).await;
    assert_eq!(r.status(), 100, "{}", r.head);
    c.send(b"hello").await.unwrap();
    let r = c.read_response(false).await;
    assert_eq!((r.status(), r.text()), (200, "5".into()), "{}", r.head);
    // An upstream that ignores the expectation: busbar says 100 itself (after a moment),
    // then sends the body on; the client is never left waiting for good.
    let mut c = Conn::connect(bus.http).await;
    c.send(b"POST /quiet HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let r = c.read_response(false).await;
    assert_eq!(r.status(), 100, "{}", r.head);
    c.send(b"hello").await.unwrap();
    let r = c.read_response(false).await;
    assert_eq!((r.status(), r.text()), (200, "5".into()), "{}", r.head);
}

/// An upstream that answers while a large body is still on its way (and reads no more
/// of it): the client gets that answer, and its connection closes after it.
#[tokio::test]
async fn an_answer_that_comes_while_the_body_streams_reaches_the_client() {
    let up = Raw::start().await;
    let bus = bus(&up, "[limits]\nmax_body = \"1GiB\"\n").await;
    let s = TcpStream::connect(bus.http).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    const SIZE: usize = 64 << 20;
    let writer = tokio::spawn(async move {
        let head = format!("POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: {SIZE}\r\n\r\n");
        wr.write_all(head.as_bytes()).await.unwrap();
        let piece = vec![b'e'; 64 * 1024];
        for _ in 0..SIZE / piece.len() {
            if wr.write_all(&piece).await.is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut out)).await;
    writer.abort();
    let text = String::from_utf8_lossy(&out).to_lowercase();
    assert!(text.starts_with("http/1.1 417"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.ends_with("nope"), "{text}");
}

#[tokio::test]
async fn http10_is_answered_with_keep_alive_only_when_asked_and_never_chunked() {
    let up = Raw::start().await;
    let bus = bus(&up, "").await;
    let mut c = Conn::connect(bus.http).await;
    let keep = b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc";
    let r = c.ask(keep, false).await;
    assert_eq!((r.status(), r.text()), (200, "3".into()), "{}", r.head);
    assert_eq!(r.header("connection"), Some("keep-alive"));
    let r = c.ask(keep, false).await;
    assert_eq!((r.status(), r.text()), (200, "3".into()), "{}", r.head);
    // A chunked answer: the HTTP/1.0 client gets the data alone, ended by the close.
    let r = c
        .ask(
            b"GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            false,
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.head);
    assert!(r.header("transfer-encoding").is_none(), "{}", r.head);
    assert_eq!(r.text(), "hello world");
    assert!(r.closed && r.complete);
    // Without keep-alive: answered, then closed.
    let mut c = Conn::connect(bus.http).await;
    let r = c.ask(b"GET /echo HTTP/1.0\r\n\r\n", false).await;
    assert_eq!(r.status(), 200, "{}", r.head);
    assert_eq!(r.header("connection"), Some("close"));
    let (rest, closed) = c.read_to_close(Duration::from_secs(5)).await;
    assert!(rest.is_empty() && closed);
}

#[tokio::test]
async fn a_post_is_retried_on_connect_failure_but_not_after_its_body_was_sent() {
    let good = Raw::start().await;
    let closed = common::free_port();
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "127.0.0.1:{closed}" }}, {{ addr = "{}" }}]
[[route]]
name = "all"
service = "s"
"#,
        good.addr
    ))
    .await;
    for _ in 0..4 {
        let mut c = Conn::connect(bus.http).await;
        let r = c.ask(&post("/echo", "", &[b'p'; 1000]), false).await;
        assert_eq!((r.status(), r.text()), (200, "1000".into()), "{}", r.head);
    }
    assert_eq!(good.requests(), 4);
    // Some of them went to the closed port first, and were sent again.
    let failed = bus
        .metric("busbar_upstream_connect_failures_total{service=\"s\"}")
        .await;
    assert!(failed >= 1.0, "{failed}");
    drop(bus);

    // Both instances read the body; `/fail` then closes: a POST is not sent twice.
    let a = Raw::start().await;
    let b = Raw::start().await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{}" }}, {{ addr = "{}" }}]
[[route]]
name = "all"
service = "s"
"#,
        a.addr, b.addr
    ))
    .await;
    for _ in 0..4 {
        let mut c = Conn::connect(bus.http).await;
        let r = c.ask(&post("/fail", "", &[b'p'; 1000]), false).await;
        assert_eq!(r.status(), 502, "{}", r.head);
    }
    assert_eq!(
        a.requests() + b.requests(),
        4,
        "each POST reached one instance once"
    );
}

#[tokio::test]
async fn pipelined_posts_are_answered_in_order() {
    let up = Raw::start().await;
    let bus = bus(&up, "").await;
    let mut both = post("/echo", "", b"first");
    both.extend_from_slice(&chunked_head("/echo"));
    both.extend_from_slice(b"2\r\nab\r\n0\r\n\r\n");
    both.extend_from_slice(&post("/echo", "", b"third!"));
    let mut c = Conn::connect(bus.http).await;
    c.send(&both).await.unwrap();
    for want in ["5", "12", "6"] {
        let r = c.read_response(false).await;
        assert_eq!((r.status(), r.text()), (200, want.into()), "{}", r.head);
    }
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_gets_413() {
    let up = Raw::start().await;
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
        up.addr
    ))
    .await;
    let mut req = chunked_head("/echo");
    for _ in 0..3 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'z'; 512]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let mut c = Conn::connect(bus.http).await;
    let r = c.ask(&req, false).await;
    assert_eq!(r.status(), 413, "{}", r.head);
    assert_eq!(up.connections(), 0);
    // Within the limit, chunked: through.
    let mut req = chunked_head("/echo");
    req.extend_from_slice(b"200\r\n");
    req.extend_from_slice(&[b'z'; 512]);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    let mut c = Conn::connect(bus.http).await;
    assert_eq!(c.ask(&req, false).await.status(), 200);
}

#[tokio::test]
async fn a_stalled_body_gets_408() {
    let up = Raw::start().await;
    let bus = bus(&up, "[limits]\nclient_timeout = \"1s\"\n").await;
    let mut c = Conn::connect(bus.http).await;
    let started = Instant::now();
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let r = c.read_response(false).await;
    assert_eq!(r.status(), 408, "{}", r.head);
    assert!(started.elapsed() < Duration::from_secs(8));
    // The body was held, never streamed: the half request reached nobody.
    assert_eq!(up.connections(), 0);
}
