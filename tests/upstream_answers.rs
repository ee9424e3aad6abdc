//! An upstream that answers badly on purpose (issue 22, part 5): what the client sees.
//!
//! A raw upstream sends exact bytes; the client sends a request and then, on the same
//! connection, `GET /ok`, which must get its own answer — or find the connection closed.
//! Never may the client get bytes busbar could not frame (the marker `SMUGGLED` stands for
//! them), nor a kept-alive connection whose answer has no end. Requests with and without a
//! body go through busbar's own HTTP/1 path (`src/drivers/h1/`).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http1::{self, Conn, Response};
use common::Busbar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What an upstream answers to a path: parts written in order, each after a pause.
type Answer = fn(&str) -> Vec<(Duration, Vec<u8>)>;

/// The smuggled response a bad answer carries after its own.
const SMUGGLED: &[u8] = b"HTTP/1.1 200 OK\r\nX-Smuggled: yes\r\nContent-Length: 8\r\n\r\nSMUGGLED";

fn now(bytes: &[u8]) -> Vec<(Duration, Vec<u8>)> {
    vec![(Duration::ZERO, bytes.to_vec())]
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A raw HTTP/1.1 upstream: reads each request (its head and a `Content-Length` body),
/// records `METHOD path`, writes what [`Answer`] gives, and keeps the connection open.
/// `/ok` is always `200 ok`.
struct Raw {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Raw {
    async fn start(answer: Answer) -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.spawn(Self::serve(s, answer, log.clone()));
            }
        });
        Raw { addr, seen, task }
    }

    async fn serve(mut s: TcpStream, answer: Answer, log: Arc<Mutex<Vec<String>>>) {
        let mut buf = Vec::new();
        loop {
            let Some(end) = common::read_head(&mut s, &mut buf).await else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let declared: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + declared {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            buf.drain(..end + declared);
            let mut words = head.split(' ');
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            log.lock().unwrap().push(format!("{method} {path}"));
            let parts = if path == "/ok" {
                now(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            } else {
                answer(path)
            };
            for (pause, bytes) in parts {
                tokio::time::sleep(pause).await;
                if s.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        }
    }

    /// How many times the upstream received `request` (`METHOD path`, lowercase).
    fn count(&self, request: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| *r == request)
            .count()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn bus(up: &Raw) -> Busbar {
    Busbar::start(&common::one_route(up.addr, "", "")).await
}

/// What one client connection saw: the answer to `first`, then (when the connection was
/// still open and that answer complete) the answer to `GET /ok`, and everything that came.
struct Seen {
    first: Response,
    second: Option<Response>,
    all: Vec<u8>,
}

impl Seen {
    /// The client never got a byte of the smuggled answer.
    fn nothing_smuggled(&self) -> bool {
        !self.all.windows(8).any(|w| w == b"SMUGGLED")
            && !String::from_utf8_lossy(&self.all)
                .to_lowercase()
                .contains("x-smuggled")
    }

    /// After the first answer: the connection closed, or `GET /ok` got its own `200 ok`.
    fn next_request_safe(&self) -> bool {
        match &self.second {
            None => self.first.closed,
            Some(r) => r.status() == 200 && r.body == b"ok" && r.complete,
        }
    }
}

async fn ask_twice(bus: &Busbar, first: &[u8]) -> Seen {
    let mut c = Conn::connect(bus.http).await;
    c.send(first).await.unwrap();
    let head_request = first.starts_with(b"HEAD ");
    let mut first = c.read_response(head_request).await;
    let mut all = [first.head.as_bytes(), &first.body].concat();
    if first.closed || !first.complete {
        // Whatever else comes before the close belongs to the client too.
        if !first.closed {
            let (rest, closed) = c.read_to_close(http1::PATIENCE).await;
            all.extend_from_slice(&rest);
            first.closed = closed;
        }
        return Seen {
            first,
            second: None,
            all,
        };
    }
    if c.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .is_err()
    {
        first.closed = true;
        return Seen {
            first,
            second: None,
            all,
        };
    }
    let second = c.read_response(false).await;
    all.extend_from_slice(second.head.as_bytes());
    all.extend_from_slice(&second.body);
    if second.head.is_empty() && second.closed {
        first.closed = true;
        return Seen {
            first,
            second: None,
            all,
        };
    }
    Seen {
        first,
        second: Some(second),
        all,
    }
}

/// The client got busbar's 502 `upstream_error`, nothing smuggled, and a safe connection.
fn assert_refused(seen: &Seen, what: &str) {
    let text = String::from_utf8_lossy(&seen.all);
    assert_eq!(seen.first.status(), 502, "{what}: {text}");
    assert!(
        String::from_utf8_lossy(&seen.first.body).contains("upstream_error"),
        "{what}: {text}"
    );
    assert!(seen.nothing_smuggled(), "{what}: {text}");
    assert!(seen.next_request_safe(), "{what}: {text}");
}

/// The client got a 502, or (when busbar could only find the fault after the head went
/// out) a cut-off answer and a closed connection; nothing smuggled either way.
fn assert_refused_or_cut(seen: &Seen, what: &str) {
    let text = String::from_utf8_lossy(&seen.all);
    assert!(seen.nothing_smuggled(), "{what}: {text}");
    if seen.first.status() == 502 {
        assert_refused(seen, what);
    } else {
        assert!(
            seen.first.closed && !seen.first.complete,
            "{what}: an answer cut off and the connection closed: {text}"
        );
    }
}

/// pingora's path decodes a chunked body and chunks it anew for the client, dropping
/// trailers: the client gets a framed answer (or a 502, or a cut), nothing smuggled, and
/// a safe connection. (It reads an empty chunk-size line as the last chunk, as httparse
/// does: the body is cut short there, framed.)
fn assert_framed(seen: &Seen, what: &str) {
    let text = String::from_utf8_lossy(&seen.all);
    assert!(seen.nothing_smuggled(), "{what}: {text}");
    assert!(seen.next_request_safe(), "{what}: {text}");
    assert!(
        seen.first.status() == 502 || seen.first.complete || seen.first.closed,
        "{what}: {text}"
    );
}

const GET: &[u8] = b"GET /bad HTTP/1.1\r\nHost: a\r\n\r\n";
/// A request with a body: pingora's path.
const POST: &[u8] = b"POST /bad HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx";

/// `Content-Length` is `1*DIGIT` (RFC 9110 §8.6): a sign, a list or hex is a 502.
#[tokio::test]
async fn a_content_length_that_is_not_digits_is_a_bad_gateway() {
    let up = Raw::start(|path| {
        let value = match path {
            "/plus" => "+5",
            "/minus" => "-5",
            "/list" => "5, 5",
            _ => "0x5",
        };
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\nhello");
        now(&cat(&[head.as_bytes(), SMUGGLED]))
    })
    .await;
    let bus = bus(&up).await;
    for path in ["/plus", "/minus", "/list", "/hex"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_refused(&ask_twice(&bus, request.as_bytes()).await, path);
        assert_eq!(up.count(&format!("get {path}")), 1, "{path} sent once");
        let request = format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx");
        assert_refused(&ask_twice(&bus, request.as_bytes()).await, path);
    }
}

/// Two equal `Content-Length` lines are refused (as nginx does) on both paths: pingora
/// would frame the body by their one value but pass both lines on.
#[tokio::test]
async fn two_content_length_lines_never_reach_the_client() {
    let up = Raw::start(|_| {
        now(&cat(&[
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            SMUGGLED,
        ]))
    })
    .await;
    let bus = bus(&up).await;
    assert_refused(&ask_twice(&bus, GET).await, "two lengths (own path)");
    assert_refused(&ask_twice(&bus, POST).await, "two lengths (pingora path)");
    // Not retried: a GET with a body goes through pingora's path too.
    let with_body = b"GET /body HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx";
    assert_refused(
        &ask_twice(&bus, with_body).await,
        "two lengths (pingora path)",
    );
    assert_eq!(up.count("get /body"), 1, "sent once");
}

#[tokio::test]
async fn an_empty_chunk_size_line_is_not_the_last_chunk() {
    let up = Raw::start(|path| {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
        let bad = cat(&[b"\r\n", SMUGGLED]);
        if path == "/late" {
            // The head has gone to the client when the empty line comes.
            vec![
                (Duration::ZERO, head.to_vec()),
                (Duration::from_millis(300), bad),
            ]
        } else {
            now(&cat(&[head, &bad]))
        }
    })
    .await;
    let bus = bus(&up).await;
    assert_refused(&ask_twice(&bus, GET).await, "empty chunk size (own path)");
    let seen = ask_twice(&bus, b"GET /late HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(seen.first.status(), 200);
    assert_refused_or_cut(&seen, "empty chunk size after the head (own path)");
    assert_framed(
        &ask_twice(&bus, POST).await,
        "empty chunk size (pingora path)",
    );
}

#[tokio::test]
async fn junk_after_the_last_chunk_never_reaches_the_client() {
    let up = Raw::start(|path| {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n";
        match path {
            // A valid trailer line first, the junk after a pause: the client must get
            // neither (the trailer section is held until it is complete).
            "/late" => vec![
                (Duration::ZERO, cat(&[head, b"x-sum: 5\r\n"])),
                (Duration::from_millis(300), SMUGGLED.to_vec()),
            ],
            "/big" => {
                let trailer = format!("x-big: {}\r\n", "v".repeat(70 * 1024));
                now(&cat(&[head, trailer.as_bytes(), b"\r\n", SMUGGLED]))
            }
            _ => now(&cat(&[head, SMUGGLED])),
        }
    })
    .await;
    let bus = bus(&up).await;
    assert_refused(&ask_twice(&bus, GET).await, "junk trailers (own path)");
    let seen = ask_twice(&bus, b"GET /late HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(seen.first.status(), 200);
    assert_refused_or_cut(&seen, "junk trailers after the head (own path)");
    assert!(
        !String::from_utf8_lossy(&seen.all).contains("x-sum"),
        "no part of the trailer section went out"
    );
    let seen = ask_twice(&bus, b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_refused_or_cut(&seen, "a trailer section over 64 KiB (own path)");
    let seen = ask_twice(&bus, POST).await;
    assert_framed(&seen, "junk trailers (pingora path)");
    if seen.first.status() == 200 {
        assert_eq!(
            seen.first.body, b"5\r\nhello\r\n0\r\n\r\n",
            "trailers dropped"
        );
    }
}

/// Well-formed trailers and chunk extensions (RFC 9112 §7.1.1) pass as they came.
#[tokio::test]
async fn chunk_extensions_and_trailers_pass_and_the_connection_goes_on() {
    const BODY: &[u8] =
        b"5;name=value\r\nhello\r\n6 ; q=\"a b\";flag\r\n world\r\n0\r\nx-sum: 11\r\n\r\n";
    let up = Raw::start(|path| {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        if path == "/split" {
            // The trailer section arrives in two reads.
            vec![
                (Duration::ZERO, cat(&[head, &BODY[..BODY.len() - 8]])),
                (Duration::from_millis(200), BODY[BODY.len() - 8..].to_vec()),
            ]
        } else {
            now(&cat(&[head, BODY]))
        }
    })
    .await;
    let bus = bus(&up).await;
    for request in [GET, b"GET /split HTTP/1.1\r\nHost: a\r\n\r\n"] {
        let seen = ask_twice(&bus, request).await;
        let text = String::from_utf8_lossy(&seen.all);
        assert_eq!(seen.first.status(), 200, "{text}");
        assert_eq!(seen.first.body, BODY, "{text}");
        assert!(seen.first.head.contains("connection: keep-alive"), "{text}");
        let Some(second) = seen.second.as_ref() else {
            panic!("the connection stays open: {text}");
        };
        assert_eq!(
            (second.status(), &second.body[..]),
            (200, &b"ok"[..]),
            "{text}"
        );
    }
    // pingora's path decodes and re-chunks the body (trailers dropped): the data arrives.
    let seen = ask_twice(&bus, POST).await;
    assert_eq!(seen.first.status(), 200);
    assert!(seen.next_request_safe());
}

#[tokio::test]
async fn junk_after_a_chunk_size_and_sizes_over_64_bits_are_refused() {
    let up = Raw::start(|path| {
        let head: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        match path {
            "/huge" => now(&cat(&[
                head,
                b"10000000000000005\r\nhello\r\n0\r\n\r\n",
                SMUGGLED,
            ])),
            "/bare-lf" => now(&cat(&[head, b"5\nhello\r\n0\r\n\r\n", SMUGGLED])),
            _ => now(&cat(&[head, b"5 zz\r\nhello\r\n0\r\n\r\n", SMUGGLED])),
        }
    })
    .await;
    let bus = bus(&up).await;
    for path in ["/bad", "/huge", "/bare-lf"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_refused(&ask_twice(&bus, request.as_bytes()).await, path);
        let request = format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx");
        assert_framed(&ask_twice(&bus, request.as_bytes()).await, path);
    }
}

/// `Connection: content-length` must not strip the framing: the client would get an
/// answer without an end on a kept-alive connection, and its next answer inside it.
#[tokio::test]
async fn connection_cannot_nominate_the_framing_headers() {
    let up = Raw::start(|path| match path {
        "/te" => now(&cat(&[
            b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            SMUGGLED,
        ])),
        _ => now(&cat(&[
            b"HTTP/1.1 200 OK\r\nConnection: x-a, Content-Length\r\nContent-Length: 5\r\n\r\nhello",
            SMUGGLED,
        ])),
    })
    .await;
    let bus = bus(&up).await;
    for path in ["/cl", "/te"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_refused(&ask_twice(&bus, request.as_bytes()).await, path);
        // pingora's path keeps the framing and replaces `Connection`.
        let request = format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx");
        let seen = ask_twice(&bus, request.as_bytes()).await;
        assert_framed(&seen, path);
        assert!(seen.first.complete, "{path}: pingora keeps the framing");
    }
}

/// A malformed answer is not retried (the upstream sees the GET once, as behind nginx or
/// HAProxy), is counted, and counts against the instance: with
/// `consecutive_failures = 2` the second ejects it.
#[tokio::test]
async fn a_malformed_answer_is_sent_once_and_counts_against_the_instance() {
    let up = Raw::start(|_| now(b"HTTP/1.1 200 OK\r\nNot a header line\r\n\r\nhello")).await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{}" }}]
[service.outlier]
consecutive_failures = 2
max_ejected_percent = 100
[[route]]
name = "all"
service = "s"
"#,
        up.addr
    ))
    .await;
    assert_refused(&ask_twice(&bus, GET).await, "first");
    assert_eq!(up.count("get /bad"), 1, "the own path sent the GET once");
    // A GET with a body goes through pingora's path: sent once too.
    let with_body = b"GET /body HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx";
    assert_refused(&ask_twice(&bus, with_body).await, "second");
    assert_eq!(up.count("get /body"), 1, "pingora's path sent the GET once");
    let metrics = bus.metrics().await;
    let malformed = common::metric_value(
        &metrics,
        r#"busbar_upstream_errors_total{cause="malformed",service="s"}"#,
    );
    assert_eq!(malformed, 2.0, "{metrics}");
    let ejected = common::metric_value(&metrics, r#"busbar_outlier_ejections_total{service="s"}"#);
    assert_eq!(ejected, 1.0, "{metrics}");
}

/// An answer found malformed only after its head went out counts against the instance
/// too, and is not first counted a success (which would end its failure streak): two in
/// a row eject it with `consecutive_failures = 2`.
#[tokio::test]
async fn answers_cut_for_bad_trailers_eject_the_instance() {
    let up = Raw::start(|_| {
        vec![
            (
                Duration::ZERO,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n".to_vec(),
            ),
            (Duration::from_millis(200), SMUGGLED.to_vec()),
        ]
    })
    .await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{}" }}]
[service.outlier]
consecutive_failures = 2
max_ejected_percent = 100
[[route]]
name = "all"
service = "s"
"#,
        up.addr
    ))
    .await;
    for round in 0..2 {
        let seen = ask_twice(&bus, GET).await;
        assert_eq!(seen.first.status(), 200, "round {round}");
        assert_refused_or_cut(&seen, &format!("round {round}"));
    }
    let metrics = bus.metrics().await;
    let sample = |s: &str| common::metric_value(&metrics, s);
    assert_eq!(
        sample(r#"busbar_upstream_errors_total{cause="malformed",service="s"}"#),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        sample(r#"busbar_outlier_ejections_total{service="s"}"#),
        1.0,
        "{metrics}"
    );
}

/// The route's `timeout` is the deadline for the whole response head: an upstream sending
/// one header line every 400 ms does not get through a 1 s timeout.
#[tokio::test]
async fn the_timeout_bounds_the_whole_response_head() {
    let up = Raw::start(|_| {
        let mut parts = vec![(Duration::ZERO, b"HTTP/1.1 200 OK\r\n".to_vec())];
        for i in 0..15 {
            parts.push((
                Duration::from_millis(400),
                format!("X-Line-{i}: v\r\n").into_bytes(),
            ));
        }
        parts.push((Duration::ZERO, b"Content-Length: 2\r\n\r\nok".to_vec()));
        parts
    })
    .await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{}" }}]
read_timeout = "30s"
[[route]]
name = "all"
service = "s"
timeout = "1s"
"#,
        up.addr
    ))
    .await;
    let start = Instant::now();
    let seen = ask_twice(&bus, GET).await;
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&seen.all);
    assert_eq!(seen.first.status(), 504, "after {took:?}: {text}");
    assert!(
        String::from_utf8_lossy(&seen.first.body).contains("upstream_timeout"),
        "{text}"
    );
    // 1 s, plus a loaded machine's slack; the upstream would finish after 6 s.
    assert!(took < Duration::from_secs(3), "504 after {took:?}");
    assert!(seen.next_request_safe(), "{text}");
    eprintln!("own path: 504 after {took:?}");
}
