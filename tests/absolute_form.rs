//! Mesh fallback, caller side: a client whose `HTTP_PROXY` is busbar sends absolute-form
//! requests (`GET http://orders/x?q HTTP/1.1`); the instance, an origin server, gets them
//! in origin form with `Host` from the target's authority (RFC 9112 §3.2.1, §3.2.2), for
//! every method, with bodies, over HTTP/1.0 and 1.1. An upstream that records the exact
//! request line and `Host` lines checks what went out.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http1;
use common::Busbar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the upstream received it.
#[derive(Debug, Clone)]
struct Got {
    /// The request line, without its CRLF.
    line: String,
    /// Every `Host` line's value, in order.
    hosts: Vec<String>,
    body: Vec<u8>,
}

/// An upstream that records each request (head and `Content-Length` body) and answers
/// `200 ok`, keeping the connection.
struct Recorder {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(record(s, seen.clone()));
            }
        });
        Recorder { addr, got, task }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(mut s: TcpStream, got: Arc<Mutex<Vec<Got>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = common::read_head(&mut s, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or("").to_string();
        let mut hosts = Vec::new();
        let mut length = 0usize;
        for l in lines {
            let Some((name, value)) = l.split_once(':') else {
                continue;
            };
            if name.eq_ignore_ascii_case("host") {
                hosts.push(value.trim().to_string());
            }
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        got.lock().unwrap().push(Got { line, hosts, body });
        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        if s.write_all(reply).await.is_err() {
            return;
        }
    }
}

/// busbar with one service, `orders`, and no TOML route: callers reach it by name.
async fn bus(upstream: SocketAddr) -> Busbar {
    Busbar::start(&format!(
        r#"
[[service]]
name = "orders"
endpoints = [{{ addr = "{upstream}" }}]
"#
    ))
    .await
}

/// Sends `request` on a new connection and reads until busbar closes it (requests here
/// say `Connection: close` or are HTTP/1.0): the status line and the whole answer.
async fn send(bus: &Busbar, request: &[u8]) -> (String, String) {
    let (text, closed) = http1::exchange(bus.http, request, Duration::from_secs(15)).await;
    assert!(closed, "an answer in time: {text}");
    let status = text.lines().next().unwrap_or("").to_string();
    (status, text)
}

#[tokio::test]
async fn forward_proxy_requests_reach_the_instance_in_origin_form_with_host_from_the_target() {
    let up = Recorder::start().await;
    let bus = bus(up.addr).await;
    // (what the client sends, the request line and Host the instance must get, its body)
    let cases: [(&[u8], &str, &str, &[u8]); 6] = [
        (
            b"GET http://orders/x?q=1&r=%2F HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
            "GET /x?q=1&r=%2F HTTP/1.1",
            "orders",
            b"",
        ),
        (
            b"POST http://orders/submit?id=7 HTTP/1.1\r\nHost: orders\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            "POST /submit?id=7 HTTP/1.1",
            "orders",
            b"hello",
        ),
        // HTTP/1.0 needs no Host: the target names the service.
        (
            b"GET http://orders/ten?a=b HTTP/1.0\r\n\r\n",
            "GET /ten?a=b HTTP/1.1",
            "orders",
            b"",
        ),
        (
            b"PUT http://orders:8080/p HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
            "PUT /p HTTP/1.1",
            "orders:8080",
            b"abc",
        ),
        // No path: `/`.
        (
            b"GET http://orders?only=query HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
            "GET /?only=query HTTP/1.1",
            "orders",
            b"",
        ),
        // Origin form with Host (busbar's own HTTP/1.1 path) is unchanged.
        (
            b"GET /y?z HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
            "GET /y?z HTTP/1.1",
            "orders",
            b"",
        ),
    ];
    for (i, (request, line, host, body)) in cases.iter().enumerate() {
        let (status, text) = send(&bus, request).await;
        assert!(status.contains(" 200 "), "{status}\n{text}");
        let got = up.got();
        assert_eq!(got.len(), i + 1, "{got:?}");
        let last = got.last().unwrap();
        assert_eq!(last.line, *line, "{}", String::from_utf8_lossy(request));
        assert_eq!(last.hosts, vec![host.to_string()], "{last:?}");
        assert_eq!(last.body, *body, "{last:?}");
    }
    // A Host that names another service than the target: refused, nothing forwarded.
    let (status, _) = send(
        &bus,
        b"GET http://orders/x HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status.contains(" 400 "), "{status}");
    assert_eq!(up.got().len(), cases.len());

    // The access log names the host and path the caller asked for.
    let log = || bus.access_log();
    common::daemon::wait_until(
        "access log",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let l = log();
            async move { l.contains("\"path\":\"/ten\"") }
        },
    )
    .await;
    assert!(
        log().contains("\"host\":\"orders\",\"path\":\"/ten\""),
        "{}",
        log()
    );
}

/// What `curl -x` and every `HTTP_PROXY`-aware client send, through reqwest.
#[tokio::test]
async fn an_http_proxy_client_gets_its_answer_and_the_instance_sees_origin_form() {
    let up = Recorder::start().await;
    let bus = bus(up.addr).await;
    let proxied = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(bus.url("")).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let r = proxied.get("http://orders/hello?x=1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = proxied
        .post("http://orders/form?y=2")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = up.got();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].line, "GET /hello?x=1 HTTP/1.1");
    assert_eq!(got[1].line, "POST /form?y=2 HTTP/1.1");
    for g in &got {
        assert_eq!(g.hosts, vec!["orders".to_string()], "{g:?}");
    }
    assert_eq!(got[1].body, b"payload");
}
