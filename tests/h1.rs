//! busbar's own HTTP/1 path (`src/drivers/h1/`) on plain routes (request bodies and
//! HTTP/1.0: `tests/h1_bodies.rs`). What a client and the upstream see of the framing on both sides: chunked and
//! close-delimited responses, HEAD, 1xx, pipelining, hop-by-hop headers, and upstream
//! connections that are pooled, closed meanwhile, or answer ambiguously.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http1::{Conn, Response};
use common::Busbar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request head as the upstream received it, and the connection it came on.
#[derive(Debug, Clone)]
struct Got {
    conn: usize,
    head: String,
}

/// An upstream that answers each request head with the bytes `script` gives for
/// (path, the request's number on its connection); `None` closes the connection
/// without an answer.
struct Scripted {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

type Script = fn(&str, usize) -> Option<(Vec<u8>, bool)>;

impl Scripted {
    async fn start(script: Script) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        let task = tokio::spawn(async move {
            let mut conn = 0;
            while let Ok((s, _)) = listener.accept().await {
                conn += 1;
                tokio::spawn(serve(s, conn, script, seen.clone()));
            }
        });
        Scripted { addr, got, task }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, conn: usize, script: Script, got: Arc<Mutex<Vec<Got>>>) {
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        let Some(end) = common::read_head(&mut s, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        n += 1;
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        got.lock().unwrap().push(Got { conn, head });
        if path.starts_with("/slow") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        match script(&path, n) {
            Some((reply, close)) => {
                if s.write_all(&reply).await.is_err() || close {
                    return;
                }
            }
            None => return,
        }
    }
}

async fn bus(upstream: &Scripted) -> Busbar {
    Busbar::start(&common::one_route(upstream.addr, "", "")).await
}

/// Sends one raw request on `c` and reads its response, which must arrive whole:
/// its head (lowercase) and body.
async fn ask(c: &mut Conn, request: &[u8], head_request: bool) -> (String, Vec<u8>) {
    c.send(request).await.unwrap();
    whole(c.read_response(head_request).await)
}

/// The head and body of a response that arrived whole (framed, and its end came).
fn whole(r: Response) -> (String, Vec<u8>) {
    assert!(r.complete, "the response did not arrive whole: {r:?}");
    (r.head, r.body)
}

fn ok(body: &str) -> Option<(Vec<u8>, bool)> {
    Some((
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
        false,
    ))
}

async fn connect(bus: &Busbar) -> Conn {
    Conn::connect(bus.http).await
}

#[tokio::test]
async fn a_chunked_response_arrives_whole_with_its_trailers_and_both_connections_are_reused() {
    let up = Scripted::start(|_, _| {
        Some((
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n"
                .to_vec(),
            false,
        ))
    })
    .await;
    let bus = bus(&up).await;
    let mut c = connect(&bus).await;
    for _ in 0..3 {
        let (head, body) = ask(&mut c, b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n", false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(head.contains("connection: keep-alive"), "{head}");
        assert_eq!(
            String::from_utf8_lossy(&body),
            "5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n"
        );
    }
    let got = up.got();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|g| g.conn == 1),
        "one upstream connection: {got:?}"
    );
}

#[tokio::test]
async fn a_response_without_a_length_ends_when_the_upstream_closes_and_so_does_the_client_connection(
) {
    let up = Scripted::start(|_, _| {
        Some((
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it, until the close"
                .to_vec(),
            true,
        ))
    })
    .await;
    let bus = bus(&up).await;
    let mut c = connect(&bus).await;
    let (head, body) = ask(&mut c, b"GET /eof HTTP/1.1\r\nHost: a\r\n\r\n", false).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"all of it, until the close");
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_drops_is_replaced_for_a_get_but_not_resent_for_a_post() {
    // The upstream answers the first request on a connection and drops the connection
    // when the second one arrives, unanswered.
    let up = Scripted::start(|_, n| if n == 1 { ok("fresh") } else { None }).await;
    let bus = bus(&up).await;
    let mut c = connect(&bus).await;
    for _ in 0..3 {
        let (head, body) = ask(&mut c, b"GET /g HTTP/1.1\r\nHost: a\r\n\r\n", false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"fresh");
    }
    // Each GET after the first met the dropped connection and went again on a new one.
    let got = up.got();
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got.last().unwrap().conn, 3);
    assert_eq!(
        bus.metric_settled(
            r#"busbar_requests_total{class="2xx",method="GET",reason="",route="all",service="s"}"#,
            3.0
        )
        .await,
        3.0
    );
    assert_eq!(
        bus.metric(r#"busbar_upstream_retries_total{service="s"}"#)
            .await,
        0.0,
        "a dropped idle connection is not a failed try"
    );

    // A POST may have been acted on before the drop: it is not sent again.
    let (head, body) = ask(
        &mut c,
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        false,
    )
    .await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("upstream_error"),
        "{body:?}"
    );
    let posts = up
        .got()
        .iter()
        .filter(|g| g.head.starts_with("POST"))
        .count();
    assert_eq!(posts, 1, "the POST went upstream once");
}

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop() {
    let up = Scripted::start(|_, _| {
        Some((
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=3\r\nX-Hop: 1\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok"
                .to_vec(),
            false,
        ))
    })
    .await;
    let bus = bus(&up).await;
    let mut c = connect(&bus).await;
    c.send(
        b"GET /h HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nKeep-Alive: timeout=9\r\nX-Mine: 1\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, _) = whole(c.read_response(false).await);
    assert!(!head.contains("keep-alive: timeout"), "{head}");
    assert!(head.contains("x-kept: yes"), "{head}");
    assert!(
        !head.contains("x-hop"),
        "a header Connection names is hop-by-hop: {head}"
    );
    assert!(head.contains("connection: keep-alive"), "{head}");
    assert!(head.contains("date: "), "{head}");
    let sent = up.got()[0].head.to_lowercase();
    assert!(!sent.contains("keep-alive"), "{sent}");
    assert!(!sent.contains("connection:"), "{sent}");
    assert!(sent.contains("x-mine: 1"), "{sent}");
    assert!(sent.contains("x-forwarded-for: 127.0.0.1"), "{sent}");

    // `Connection: close` from the client: answered, then closed.
    let (head, _) = ask(
        &mut c,
        b"GET /h HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        false,
    )
    .await;
    assert!(head.contains("connection: close"), "{head}");
    let (rest, closed) = c.read_to_close(Duration::from_secs(5)).await;
    assert!(closed, "closed in time");
    assert!(rest.is_empty(), "nothing after the last response: {rest:?}");
}

#[tokio::test]
async fn head_responses_and_early_hints_carry_no_body_and_the_connection_goes_on() {
    let up = Scripted::start(|path, _| match path {
        "/hints" => Some((
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
                .to_vec(),
            false,
        )),
        _ => Some((
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec(),
            false,
        )),
    })
    .await;
    let bus = bus(&up).await;
    let mut c = connect(&bus).await;
    let (head, body) = ask(&mut c, b"HEAD /big HTTP/1.1\r\nHost: a\r\n\r\n", true).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length: 100"), "{head}");
    assert!(body.is_empty(), "{body:?}");
    let (head, body) = ask(&mut c, b"GET /hints HTTP/1.1\r\nHost: a\r\n\r\n", false).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"final");
    assert_eq!(up.got().len(), 2);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = Scripted::start(|path, _| ok(path)).await;
    let bus = bus(&up).await;
    let mut c = connect(&bus).await;
    c.send(
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\nGET /three HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .unwrap();
    for want in ["/one", "/two", "/three"] {
        let (head, body) = whole(c.read_response(false).await);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(String::from_utf8_lossy(&body), want);
    }
}

#[tokio::test]
async fn an_upstream_response_with_two_lengths_is_refused_as_a_bad_gateway() {
    let up = Scripted::start(|_, _| {
        Some((
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\nokSMUGGLED".to_vec(),
            false,
        ))
    })
    .await;
    let bus = bus(&up).await;
    let mut c = connect(&bus).await;
    let (head, body) = ask(&mut c, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", false).await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("upstream_error"),
        "{body:?}"
    );
}

/// One slot (`max_in_flight = 1`): a client that leaves while the upstream works on its
/// request gives the slot up then, not when the upstream answers.
#[tokio::test]
async fn a_client_that_leaves_while_the_upstream_works_frees_its_slot_at_once() {
    let up = Scripted::start(|path, _| ok(path)).await;
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{}" }}]
max_in_flight = 1
[[route]]
name = "all"
service = "s"
[route.admission]
queue = {{ max_depth = 4, max_wait = "10s" }}
"#,
        up.addr
    ))
    .await;
    let mut leaver = connect(&bus).await;
    leaver
        .send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    // The slow request is upstream, holding the one slot.
    common::daemon::wait_until(
        "the slow request upstream",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async { !up.got().is_empty() },
    )
    .await;
    drop(leaver);
    let start = std::time::Instant::now();
    let mut c = connect(&bus).await;
    let (head, body) = ask(&mut c, b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n", false).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"/next");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "waited {:?} for the slot the leaver held",
        start.elapsed()
    );
}

/// A chunked body that turns out malformed after its head went to the client: the
/// response is cut off (the client sees its connection close), not followed by a 502.
#[tokio::test]
async fn a_chunked_body_that_breaks_midway_is_cut_not_answered_twice() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 4096];
        let _ = s.read(&mut head).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = s.write_all(b"zz\r\nnot a chunk\r\n").await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let bus = Busbar::start(&format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{addr}" }}]
[[route]]
name = "all"
service = "s"
"#
    ))
    .await;
    let mut c = connect(&bus).await;
    c.send(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (got, closed) = c.read_to_close(Duration::from_secs(5)).await;
    assert!(closed, "the client connection is closed");
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.ends_with("5\r\nhello\r\n"), "{text}");
    assert_eq!(
        text.matches("http/1.1 ").count(),
        1,
        "one response only: {text}"
    );
    upstream.abort();
}

/// The headers busbar reads or replaces are found whatever case the client wrote their
/// names in (the engine records the head's names as it parses it, `base::http::Names`,
/// and skips the lookups of headers a request surely lacks): a request id and a trace
/// kept, forwarding headers and a spoofed identity replaced, a `Via` past the hop limit
/// refused; and a request without them gets busbar's own.
#[tokio::test]
async fn headers_busbar_reads_or_replaces_are_found_whatever_the_case_of_their_names() {
    let up = Scripted::start(|_, _| ok("fine")).await;
    let bus = Busbar::start(&common::one_route(up.addr, "[limits]\nmax_hops = 1\n", "")).await;
    let mut c = connect(&bus).await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let request = format!(
        "GET /a HTTP/1.1\r\nHOST: a\r\nX-REQUEST-ID: req-7\r\nTRACEPARENT: 00-{trace}-b7ad6b7169203331-01\r\nX-FORWARDED-FOR: 6.6.6.6\r\nFORWARDED: for=6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-BUSBAR-USER: mallory\r\n\r\n"
    );
    let (head, body) = ask(&mut c, request.as_bytes(), false).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"fine");
    let sent = up.got()[0].head.to_lowercase();
    assert!(sent.contains("x-request-id: req-7\r\n"), "{sent}");
    assert!(
        sent.contains(&format!("traceparent: 00-{trace}-")),
        "{sent}"
    );
    assert!(sent.contains("x-forwarded-for: 127.0.0.1\r\n"), "{sent}");
    assert!(!sent.contains("6.6.6.6"), "{sent}");
    assert!(sent.contains("x-forwarded-proto: http\r\n"), "{sent}");
    assert!(!sent.contains("mallory"), "{sent}");
    assert_eq!(sent.matches("traceparent:").count(), 1, "{sent}");
    assert_eq!(sent.matches("x-request-id:").count(), 1, "{sent}");

    // Nothing of the kind sent: busbar's own request id and trace go.
    let (head, _) = ask(&mut c, b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n", false).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let sent = up.got()[1].head.to_lowercase();
    assert_eq!(sent.matches("x-request-id: ").count(), 1, "{sent}");
    assert_eq!(sent.matches("traceparent: 00-").count(), 1, "{sent}");
    assert!(!sent.contains(trace), "{sent}");

    // Two busbar hops in an upper-case `VIA`, one allowed: refused, and not sent on.
    let (head, _) = ask(
        &mut c,
        b"GET /c HTTP/1.1\r\nHost: a\r\nVIA: 1.1 busbar-000000000001, 1.1 busbar-000000000002\r\n\r\n",
        false,
    )
    .await;
    assert!(head.starts_with("http/1.1 508"), "{head}");
    assert_eq!(up.got().len(), 2);
}

/// A busy connection keeps its exchange buffers from one request to the next
/// (`drivers::h1::Scratch`): after an answer whose head and body grew them past what is
/// kept, and after a small one, each answer arrives whole and alone, on one connection
/// both ways.
#[tokio::test]
async fn answers_of_every_size_in_turn_on_one_connection_arrive_whole() {
    let up = Scripted::start(|path, _| match path {
        "/big" => {
            let filler = "f".repeat(20_000);
            let body = "b".repeat(50_000);
            Some((
                format!(
                    "HTTP/1.1 200 OK\r\nX-Big: {filler}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
                false,
            ))
        }
        _ => ok("small"),
    })
    .await;
    let bus = bus(&up).await;
    let mut c = connect(&bus).await;
    for path in ["/small", "/big", "/small", "/big", "/big", "/small"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        let (head, body) = ask(&mut c, request.as_bytes(), false).await;
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        match path {
            "/big" => {
                assert!(head.contains(&format!("x-big: {}\r\n", "f".repeat(20_000))));
                assert_eq!(body, "b".repeat(50_000).as_bytes(), "{path}");
            }
            _ => {
                assert!(!head.contains("x-big"), "{head}");
                assert_eq!(body, b"small", "{path}");
            }
        }
    }
    let got = up.got();
    assert_eq!(got.len(), 6);
    assert!(
        got.iter().all(|g| g.conn == 1),
        "one upstream connection: {got:?}"
    );
}
