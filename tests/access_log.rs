//! The access log and the process log (issue 24 part 3): every answer has its line,
//! busbar's own refusals included; the file is reopened on SIGUSR1 and by
//! `POST /v1/logs/reopen` with no line lost; the process log on stderr has no ANSI
//! colours when stderr is a file, or is JSON lines with `[log] format = "json"`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client, eventually, Backend, Busbar};

const SIGUSR1: i32 = 10;

fn one_route(backend: SocketAddr) -> String {
    format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{backend}" }}]
[[route]]
name = "r"
service = "s"
path_prefix = "/"
"#
    )
}

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// logrotate's way, twice under load: rename the file, then SIGUSR1 (and then the admin
/// call). Every answered request has exactly one line, in one of the three files, and
/// the lines after each reopen go to the new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_and_reopen_under_load_loses_no_line() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr)).await;
    let log = bus.dir.path().join("access.log");
    let first = bus.dir.path().join("access.log.1");
    let second = bus.dir.path().join("access.log.2");

    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (answered, stop, url) = (answered.clone(), stop.clone(), bus.url("/load"));
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = c.get(&url).send().await {
                    if r.status() == 200 && r.bytes().await.is_ok() {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let grows = |n: usize| {
        let a = answered.clone();
        eventually(Duration::from_secs(20), move || {
            a.load(Ordering::Relaxed) >= n
        })
    };
    assert!(grows(200).await, "no load got through");

    std::fs::rename(&log, &first).unwrap();
    bus.signal(SIGUSR1);
    // The signal is handled on its own task: count from when the new file exists (every
    // line written after that goes to it), not from when the signal was sent.
    let reopened_file = log.clone();
    assert!(
        eventually(Duration::from_secs(10), move || reopened_file.exists()).await,
        "SIGUSR1 made no new access.log"
    );
    let after_signal = answered.load(Ordering::Relaxed);
    assert!(grows(after_signal + 200).await);

    std::fs::rename(&log, &second).expect("SIGUSR1 made a new access.log");
    let reopened = client()
        .post(bus.admin_url("/v1/logs/reopen"))
        .bearer_auth(&bus.token)
        .send()
        .await
        .unwrap();
    assert_eq!(reopened.status(), 200);
    let after_call = answered.load(Ordering::Relaxed);
    assert!(grows(after_call + 200).await);

    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let total = answered.load(Ordering::Relaxed);
    // The flusher writes every 200 ms; a line may lag its answer by that much.
    let count = || {
        [&first, &second, &log]
            .iter()
            .map(|p| lines(p).len())
            .sum::<usize>()
    };
    let settled = eventually(Duration::from_secs(10), || count() >= total).await;
    // Let a line that should not be there show up too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (n1, n2, n3) = (lines(&first).len(), lines(&second).len(), lines(&log).len());
    eprintln!("rotation: {total} answered; lines {n1} + {n2} + {n3}");
    assert!(
        settled && n1 + n2 + n3 == total,
        "{total} answered, lines: {n1} + {n2} + {n3}"
    );
    // Each file has the lines of its own stretch (more than the 200 before the rename).
    assert!(n1 >= 200 && n2 >= 200 && n3 >= 200, "{n1} {n2} {n3}");
    assert!(bus.stderr().contains("SIGUSR1: access log reopened"));
}

/// The admin call needs the token, and says what it did.
#[tokio::test]
async fn reopen_needs_the_admin_token() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr)).await;
    let r = client()
        .post(bus.admin_url("/v1/logs/reopen"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .post(bus.admin_url("/v1/logs/reopen"))
        .bearer_auth(&bus.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["status"], "reopened");
    assert!(v["access_log"].as_str().unwrap().ends_with("access.log"));
}

/// stderr is a file here: plain text, no colour codes.
#[tokio::test]
async fn process_log_has_no_colours_in_a_file() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr)).await;
    let err = bus.stderr();
    assert!(err.contains("busbar started"), "{err}");
    assert!(!err.contains('\x1b'), "ANSI codes in stderr:\n{err}");
}

/// `[log] format = "json"`: every stderr line is a JSON object with time, level, target
/// and the event's fields.
#[tokio::test]
async fn process_log_as_json_lines() {
    let backend = Backend::start("b").await;
    // The keys before the first table header land in the harness's `[log]`.
    let body = format!(
        "format = \"json\"\n\n[registry]\nlisten = \"{{registry}}\"\n{}",
        one_route(backend.addr)
    );
    let bus = Busbar::start(&body).await;
    let err = bus.stderr();
    let mut started = None;
    for l in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["time"].is_string() && v["level"].is_string(), "{l}");
        if v["message"] == "busbar started" {
            started = Some(v);
        }
    }
    let started = started.unwrap_or_else(|| panic!("no start line:\n{err}"));
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["target"], "busbar::app");
    assert_eq!(started["admin"], bus.admin.to_string());
}

/// Sends `bytes` on a new connection and reads the answer until the close.
async fn raw(addr: SocketAddr, bytes: &[u8], then_wait: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let _ = then_wait;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The access log's lines once it has at least `n` (the flusher writes every 200 ms).
async fn log_lines(bus: &Busbar, n: usize) -> Vec<serde_json::Value> {
    let path = bus.dir.path().join("access.log");
    eventually(Duration::from_secs(10), || lines(&path).len() >= n).await;
    lines(&path)
}

/// Heads the front door refuses (414, 431, 400, 408) get an access-log line and count
/// in `busbar_requests_total` with their reason, under `route="_no_route"`.
#[tokio::test]
async fn front_door_refusals_are_logged_and_counted() {
    let backend = Backend::start("b").await;
    let body = format!(
        "[limits]\nheader_timeout = \"1s\"\n\n[registry]\nlisten = \"{{registry}}\"\n{}",
        one_route(backend.addr)
    );
    let bus = Busbar::start(&body).await;
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
    assert!(raw(bus.http, long_line.as_bytes(), false)
        .await
        .starts_with("HTTP/1.1 414"));
    let big_head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "X-Pad: 0123456789012345678901234567890123456789\r\n".repeat(1500)
    );
    assert!(raw(bus.http, big_head.as_bytes(), false)
        .await
        .starts_with("HTTP/1.1 431"));
    let smuggle =
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert!(raw(bus.http, smuggle, false)
        .await
        .starts_with("HTTP/1.1 400"));
    assert!(raw(bus.http, b"GET / HTTP/1.1\r\nHost: x\r\n", true)
        .await
        .starts_with("HTTP/1.1 408"));

    let lines = log_lines(&bus, 4).await;
    let mut seen: Vec<(u64, String, String)> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["route"], "_no_route", "{l}");
            assert!(
                l["client"].as_str().unwrap().starts_with("127.0.0.1:"),
                "{l}"
            );
            assert!(
                l["request_id"].as_str().is_some_and(|r| r.len() == 32),
                "{l}"
            );
            (
                l["status"].as_u64().unwrap(),
                l["error"].as_str().unwrap_or("").to_string(),
                l["method"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    seen.sort();
    let want = [
        (400, "malformed_request", "POST"),
        (408, "header_timeout", "GET"),
        (414, "request_line_too_long", "GET"),
        (431, "headers_too_large", "GET"),
    ]
    .map(|(s, e, m)| (s, e.to_string(), m.to_string()));
    assert_eq!(seen, want.to_vec(), "{lines:#?}");
    for (reason, method) in [
        ("malformed_request", "POST"),
        ("header_timeout", "GET"),
        ("request_line_too_long", "GET"),
        ("headers_too_large", "GET"),
    ] {
        let sample = format!(
            r#"busbar_requests_total{{class="4xx",method="{method}",reason="{reason}",route="_no_route",service=""}}"#
        );
        assert_eq!(bus.metric_settled(&sample, 1.0).await, 1.0, "{sample}");
    }
    assert_eq!(backend.hits(), 0);
}

/// A refusal by admission (429) counts with its reason on its route; the answers let
/// through name their user, release version, protocol, request id (kept, and sent
/// upstream), user agent and query with the configured parameters redacted.
#[tokio::test]
async fn answers_carry_user_protocol_request_id_agent_and_redacted_query() {
    let backend = Backend::start("b").await;
    let body = format!(
        r#"redact_query = ["token", "Secret"]

[registry]
listen = "{{registry}}"

[[service]]
name = "s"
endpoints = [{{ addr = "{a}" }}]
[[route]]
name = "limited"
service = "s"
[route.admission]
identity = ["header:x-user-id", "client_ip"]
trusted_proxies = ["127.0.0.0/8"]
rate_limit = {{ rate = "1/m", burst = 2 }}
"#,
        a = backend.addr
    );
    let bus = Busbar::start(&body).await;
    let http = client();
    let get = |id: Option<&str>| {
        let mut r = http
            .get(bus.url("/x?a=1&token=hunter2&SECRET=s&b=2"))
            .header("x-user-id", "alice")
            .header("user-agent", "probe/1.0");
        if let Some(id) = id {
            r = r.header("x-request-id", id);
        }
        r.send()
    };
    assert_eq!(get(Some("req-42")).await.unwrap().status(), 200);
    assert_eq!(get(None).await.unwrap().status(), 200);
    assert_eq!(get(None).await.unwrap().status(), 429);

    let lines = log_lines(&bus, 3).await;
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["protocol"], "http/1.1", "{l}");
        assert_eq!(l["user_agent"], "probe/1.0", "{l}");
        assert_eq!(l["query"], "a=1&token=REDACTED&SECRET=REDACTED&b=2", "{l}");
        assert!(!l.to_string().contains("hunter2"), "{l}");
    }
    assert_eq!(lines[0]["request_id"], "req-42");
    assert_eq!(lines[0]["user"], "alice");
    assert_eq!(lines[0]["version"], serde_json::Value::Null);
    // Made by busbar: the trace id, and what the backend received.
    let made = lines[1]["request_id"].as_str().unwrap();
    assert_eq!(made, lines[1]["trace_id"].as_str().unwrap());
    let seen = backend.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(
        seen[0].headers.get("x-request-id").map(String::as_str),
        Some("req-42"),
        "{seen:#?}"
    );
    assert_eq!(
        seen[1].headers.get("x-request-id").map(String::as_str),
        Some(made)
    );
    assert_eq!(lines[2]["status"], 429);
    assert_eq!(lines[2]["error"], "rate_limited");

    let limited = r#"busbar_requests_total{class="4xx",method="GET",reason="rate_limited",route="limited",service="s"}"#;
    assert_eq!(bus.metric_settled(limited, 1.0).await, 1.0);
    let ok =
        r#"busbar_requests_total{class="2xx",method="GET",reason="",route="limited",service="s"}"#;
    assert_eq!(bus.metric_settled(ok, 2.0).await, 2.0);
}

/// h2c: the protocol says so.
#[tokio::test]
async fn h2c_is_named_in_the_log() {
    let backend = Backend::start("b").await;
    let bus = Busbar::start(&one_route(backend.addr)).await;
    let r = common::h2c_client()
        .get(bus.url("/h2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lines = log_lines(&bus, 1).await;
    assert_eq!(lines[0]["protocol"], "h2c", "{:?}", lines[0]);
}

/// An upstream that records each request head it reads and answers 200 to each.
async fn recording_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(end) = common::read_head(&mut s, &mut buf).await {
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    seen.lock().unwrap().push(head);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// What a hostile client can do with `x-request-id`: send it twice, or with quotes and
/// backslashes, or with a space. The upstream gets exactly one `x-request-id` line (the
/// client's first value when busbar keeps it, else busbar's own), on busbar's own
/// HTTP/1.1 path and on pingora's (h2c); the log line stays one valid JSON object.
#[tokio::test]
async fn a_hostile_request_id_reaches_the_upstream_once() {
    let (up, heads) = recording_upstream().await;
    let bus = Busbar::start(&one_route(up)).await;
    let addr: SocketAddr = bus
        .url("/")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let ask = |ids: &[&str]| {
        let mut req = String::from("GET /r HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
        for id in ids {
            req.push_str(&format!("x-request-id: {id}\r\n"));
        }
        req.push_str("\r\n");
        req
    };
    for ids in [
        &["one", "two"][..],
        &[r#"q"u\o"te"#][..],
        &["has space"][..],
    ] {
        let (text, _) =
            common::http1::exchange(addr, ask(ids).as_bytes(), Duration::from_secs(10)).await;
        assert_eq!(common::http1::status_of(&text), Some(200), "{text}");
    }
    let h2 = common::h2c_client()
        .get(bus.url("/h2"))
        .header("x-request-id", "first")
        .header("x-request-id", "second")
        .send()
        .await
        .unwrap();
    assert_eq!(h2.status(), 200);

    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 4, "{heads:#?}");
    let ids: Vec<Vec<String>> = heads
        .iter()
        .map(|h| {
            h.lines()
                .filter_map(|l| l.split_once(':'))
                .filter(|(n, _)| n.eq_ignore_ascii_case("x-request-id"))
                .map(|(_, v)| v.trim().to_string())
                .collect()
        })
        .collect();
    assert_eq!(ids[0], ["one"], "{heads:#?}");
    assert_eq!(ids[1], [r#"q"u\o"te"#], "{heads:#?}");
    // A value with a space is not kept: busbar's own id (the trace id, 32 hex digits).
    assert_eq!(ids[2].len(), 1, "{heads:#?}");
    assert!(
        ids[2][0].len() == 32 && ids[2][0].bytes().all(|b| b.is_ascii_hexdigit()),
        "{heads:#?}"
    );
    assert_eq!(ids[3], ["first"], "{heads:#?}");

    let lines = log_lines(&bus, 4).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert_eq!(lines[1]["request_id"], r#"q"u\o"te"#);
    assert_eq!(lines[2]["request_id"], lines[2]["trace_id"]);
}
