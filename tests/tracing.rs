//! Traces a tracing system can use: parent-based sampling with a ratio for new traces,
//! busbar's spans exported over OTLP/HTTP to a real receiver (`busbar_testkit::otlp`,
//! the official protos), from both drivers (busbar's HTTP/1 engine, pingora's h2c path)
//! and the JSON→gRPC call; and a collector that hangs costs requests nothing.

mod common;

use std::time::{Duration, Instant};

use busbar_testkit::otlp::{OtlpReceiver, Received};
use busbar_testkit::GrpcBackend;
use common::{client, h2c_client, Backend, Busbar};

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const KIND_SERVER: i32 = 2;
const KIND_CLIENT: i32 = 3;
const WAIT: Duration = Duration::from_secs(20);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `(trace id, parent id, flags)` of a `traceparent` value.
fn parts(traceparent: &str) -> (String, String, String) {
    let p: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(p.len(), 4, "{traceparent}");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

fn tracing_section(endpoint: &str, ratio: &str, extra: &str) -> String {
    format!("[tracing]\nendpoint = \"{endpoint}\"\nsample_ratio = {ratio}\n{extra}\n")
}

fn of_trace(spans: &[Received], trace: &str) -> Vec<Received> {
    spans
        .iter()
        .filter(|s| hex(&s.span.trace_id) == trace)
        .cloned()
        .collect()
}

/// The server span and the client spans of one trace, once all `tries` client spans came.
async fn trace_spans(otlp: &OtlpReceiver, trace: &str, tries: usize) -> (Received, Vec<Received>) {
    let spans = otlp
        .wait_for(WAIT, |s| of_trace(s, trace).len() > tries)
        .await;
    let mine = of_trace(&spans, trace);
    let servers: Vec<_> = mine.iter().filter(|s| s.span.kind == KIND_SERVER).collect();
    let clients: Vec<_> = mine
        .iter()
        .filter(|s| s.span.kind == KIND_CLIENT)
        .cloned()
        .collect();
    assert_eq!(servers.len(), 1, "one server span: {mine:#?}");
    assert_eq!(clients.len(), tries, "client spans: {mine:#?}");
    (servers[0].clone(), clients)
}

/// A sampled caller's request through `http` (busbar's HTTP/1 engine, or pingora's path
/// for h2c): the backend's parent is busbar's client span, whose parent is busbar's server
/// span, whose parent is the caller's span; the attributes say what served it.
async fn sampled_caller_through(http: reqwest::Client, url_of: impl Fn(&Busbar, &str) -> String) {
    let otlp = OtlpReceiver::start().await;
    let a = Backend::start("a").await;
    let key_hash = common::sha256_hex("key-of-reports");
    // Ratio 0: only the caller's decision can make this trace sampled (parent-based).
    let bus = Busbar::start(&format!(
        r#"
{tracing}
[auth]
[[auth.api_key]]
user = "reports"
sha256 = "{key_hash}"

[[service]]
name = "s"
endpoints = [{{ addr = "{a}", version = "v2" }}]
[[route]]
name = "api"
service = "s"
[route.admission]
identity = ["api_key"]
"#,
        tracing = tracing_section(&otlp.endpoint(), "0.0", ""),
        a = a.addr,
    ))
    .await;
    let r = http
        .get(url_of(&bus, "/orders/1"))
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .header("x-api-key", "key-of-reports")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = a.seen().last().cloned().expect("the backend was called");
    let (trace, parent, flags) = parts(&seen.headers["traceparent"]);
    assert_eq!((trace.as_str(), flags.as_str()), (CALLER_TRACE, "01"));
    assert_ne!(parent, CALLER_SPAN);

    let (server, clients) = trace_spans(&otlp, CALLER_TRACE, 1).await;
    let client = &clients[0];
    assert_eq!(
        hex(&client.span.span_id),
        parent,
        "the backend's parent is the client span"
    );
    assert_eq!(client.span.parent_span_id, server.span.span_id);
    assert_eq!(hex(&server.span.parent_span_id), CALLER_SPAN);
    assert!(server.span.start_time_unix_nano <= client.span.start_time_unix_nano);
    assert!(client.span.end_time_unix_nano <= server.span.end_time_unix_nano + 1_000_000);
    assert!(server.span.start_time_unix_nano > 0);

    for (key, want) in [
        ("http.request.method", "GET".to_string()),
        ("http.response.status_code", "200".to_string()),
        ("busbar.route", "api".to_string()),
        ("busbar.service", "s".to_string()),
        ("busbar.instance", a.addr.to_string()),
        ("busbar.tries", "1".to_string()),
        ("busbar.release.version", "v2".to_string()),
        ("user.id", "reports".to_string()),
    ] {
        assert_eq!(
            server.attr(key),
            Some(want),
            "server span {key}: {server:#?}"
        );
    }
    assert_eq!(server.span.name, "GET api");
    assert_eq!(
        server.resource_attr("service.name").as_deref(),
        Some("busbar")
    );
    assert!(server.span.status.is_none(), "a 200 is no error");
    assert_eq!(client.attr("server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(client.attr("server.port"), Some(a.addr.port().to_string()));
    assert_eq!(
        client.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(client.attr("busbar.release.version").as_deref(), Some("v2"));
    assert_eq!(otlp.bad_requests(), 0);
    assert_eq!(
        bus.metric_settled("busbar_trace_spans_exported_total", 2.0)
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_caller_gets_busbars_spans_over_http1() {
    sampled_caller_through(client(), |b, p| b.url(p)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_caller_gets_busbars_spans_over_h2c() {
    sampled_caller_through(h2c_client(), |b, p| b.url(p)).await;
}

/// Ratio 1: a new trace is sampled (flags 01 upstream) and exported, with no parent.
/// Ratio 0: flags 00 upstream, and nothing of that trace is exported (checked once a
/// later, sampled request's spans have arrived: the exporter sends in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_traces_follow_the_ratio() {
    let otlp = OtlpReceiver::start().await;
    let a = Backend::start("a").await;
    let body = |ratio: &str| {
        format!(
            "{}\n{}",
            tracing_section(&otlp.endpoint(), ratio, ""),
            common::one_route(a.addr, "", "")
        )
    };
    let bus = Busbar::start(&body("1.0")).await;
    let http = client();
    assert_eq!(http.get(bus.url("/x")).send().await.unwrap().status(), 200);
    let (trace, parent, flags) = parts(&a.seen().last().unwrap().headers["traceparent"]);
    assert_eq!(flags, "01", "ratio 1.0 samples every new trace");
    let (server, clients) = trace_spans(&otlp, &trace, 1).await;
    assert!(
        server.span.parent_span_id.is_empty(),
        "busbar started the trace"
    );
    assert_eq!(hex(&clients[0].span.span_id), parent);

    // The same node, ratio 0 by a reload (the exporter and sampler follow the snapshot).
    bus.write_config(&body("0.0"), "");
    assert_eq!(bus.reload().await.status(), 200);
    for _ in 0..20 {
        assert_eq!(http.get(bus.url("/y")).send().await.unwrap().status(), 200);
    }
    let unsampled: Vec<String> = a
        .seen()
        .iter()
        .filter(|s| s.path == "/y")
        .map(|s| {
            let (trace, _, flags) = parts(&s.headers["traceparent"]);
            assert_eq!(flags, "00", "ratio 0 samples no new trace");
            trace
        })
        .collect();
    assert_eq!(unsampled.len(), 20);
    // A sampled caller's request after them: its spans arriving means theirs would have.
    let r = http
        .get(bus.url("/z"))
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    trace_spans(&otlp, CALLER_TRACE, 1).await;
    let spans = otlp.spans();
    for t in &unsampled {
        assert!(of_trace(&spans, t).is_empty(), "trace {t} was not sampled");
    }
    // An unsampled caller stays unsampled at ratio 1 too (parent-based).
    bus.write_config(&body("1.0"), "");
    assert_eq!(bus.reload().await.status(), 200);
    let r = http
        .get(bus.url("/w"))
        .header(
            "traceparent",
            format!("00-{}-{CALLER_SPAN}-00", "ab".repeat(16)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, _, flags) = parts(&a.seen().last().unwrap().headers["traceparent"]);
    assert_eq!(flags, "00");
    assert_eq!(spans.len(), 4, "two traces of two spans: {spans:#?}");
}

/// A try that cannot connect is a client span of its own, with an error; the next try
/// gets a new span id, and that is the parent the backend that answered received (busbar's
/// HTTP/1 engine writes the upstream head once and rewrites the id in place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_try_is_a_client_span() {
    let otlp = OtlpReceiver::start().await;
    let a = Backend::start("a").await;
    let dead = format!("127.0.0.1:{}", common::free_port());
    let bus = Busbar::start(&format!(
        r#"
{tracing}
[[service]]
name = "s"
balance = "round_robin"
endpoints = [{{ addr = "{a}" }}, {{ addr = "{dead}" }}]
[service.retry]
attempts = 2
[[route]]
name = "all"
service = "s"
"#,
        tracing = tracing_section(&otlp.endpoint(), "1.0", ""),
        a = a.addr,
    ))
    .await;
    let http = client();
    // Round robin: one of two requests goes to the dead instance first.
    for _ in 0..2 {
        assert_eq!(http.get(bus.url("/x")).send().await.unwrap().status(), 200);
    }
    let seen = a.seen();
    assert_eq!(seen.len(), 2);
    let mut retried = 0;
    for s in &seen {
        let (trace, parent, _) = parts(&s.headers["traceparent"]);
        let spans = otlp
            .wait_for(WAIT, |all| {
                let mine = of_trace(all, &trace);
                mine.iter().any(|s| s.span.kind == KIND_SERVER)
            })
            .await;
        let mine = of_trace(&spans, &trace);
        let server = mine.iter().find(|s| s.span.kind == KIND_SERVER).unwrap();
        let tries: usize = server.attr("busbar.tries").unwrap().parse().unwrap();
        let clients: Vec<_> = mine.iter().filter(|s| s.span.kind == KIND_CLIENT).collect();
        assert_eq!(clients.len(), tries, "{mine:#?}");
        let answered = clients
            .iter()
            .find(|c| hex(&c.span.span_id) == parent)
            .expect("the backend's parent is one of the client spans");
        assert_eq!(
            answered.attr("http.response.status_code").as_deref(),
            Some("200")
        );
        assert!(clients
            .iter()
            .all(|c| c.span.parent_span_id == server.span.span_id));
        if tries == 2 {
            retried += 1;
            let failed = clients
                .iter()
                .find(|c| hex(&c.span.span_id) != parent)
                .unwrap();
            assert_eq!(failed.attr("error.type").as_deref(), Some("connect_failed"));
            assert_eq!(failed.span.status.as_ref().map(|s| s.code), Some(2));
            assert_eq!(
                answered.attr("http.request.resend_count").as_deref(),
                Some("1")
            );
        }
    }
    assert_eq!(retried, 1, "one request tried the dead instance first");
}

/// The JSON→gRPC call: its client span's id is the `traceparent` parent in the metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_to_grpc_calls_are_traced() {
    let otlp = OtlpReceiver::start().await;
    let backend = GrpcBackend::start(1).await;
    let proto = format!(
        "{}/tests/protos/bookstore.proto",
        env!("CARGO_MANIFEST_DIR")
    );
    let bus = Busbar::start(&format!(
        r#"
{tracing}
[[service]]
name = "books"
protocol = "h2c"
endpoints = [{{ addr = "{addr}" }}]

[[route]]
name = "json"
path_prefix = "/v1/"
service = "books"
[route.translate]
from = "json"
protos = ["{proto}"]
"#,
        tracing = tracing_section(&otlp.endpoint(), "0.0", ""),
        addr = backend.addr,
    ))
    .await;
    let r = client()
        .get(bus.url("/v1/books/7"))
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let calls = backend.calls();
    let tp = calls[0]
        .metadata
        .iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| v.clone())
        .expect("traceparent in the metadata");
    let (trace, parent, flags) = parts(&tp);
    assert_eq!((trace.as_str(), flags.as_str()), (CALLER_TRACE, "01"));
    let (server, clients) = trace_spans(&otlp, CALLER_TRACE, 1).await;
    assert_eq!(hex(&clients[0].span.span_id), parent);
    assert_eq!(hex(&server.span.parent_span_id), CALLER_SPAN);
    assert_eq!(server.attr("busbar.route").as_deref(), Some("json"));
    assert_eq!(server.attr("busbar.service").as_deref(), Some("books"));
}

/// A collector that accepts and never answers: every request is still answered at once,
/// the queue stays bounded and what does not fit is dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_collector_costs_requests_nothing() {
    let otlp = OtlpReceiver::hanging().await;
    let a = Backend::start("a").await;
    // The smallest queue (one batch), and an export that would wait longer than the test.
    let bus = Busbar::start(&format!(
        "{}\n{}",
        tracing_section(
            &otlp.endpoint(),
            "1.0",
            "queue_size = 512\nexport_timeout = \"120s\""
        ),
        common::one_route(a.addr, "", "")
    ))
    .await;
    let http = client();
    const N: usize = 800; // 1,600 spans: 512 in the hung export, 512 queued, the rest dropped
    let mut slowest = Duration::ZERO;
    for i in 0..N {
        let t = Instant::now();
        let r = http.get(bus.url(&format!("/r{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        slowest = slowest.max(t.elapsed());
    }
    assert_eq!(a.hits(), N);
    // The collector got a request (and never answered it).
    common::daemon::wait_until(
        "an export reaches the collector",
        WAIT,
        Duration::from_millis(50),
        || async { otlp.requests() >= 1 },
    )
    .await;
    let dropped = bus.metrics().await;
    let dropped = common::metric_value(&dropped, "busbar_trace_spans_dropped_total");
    assert!(
        dropped >= (2 * N - 2 * 512) as f64,
        "spans beyond the queue and the hung export are dropped: {dropped}"
    );
    assert_eq!(bus.metric("busbar_trace_spans_exported_total").await, 0.0);
    eprintln!("{N} requests answered, slowest {slowest:?}, {dropped} spans dropped");
    // Nothing waited on the collector: a request that did would have waited up to 120 s.
    assert!(
        slowest < Duration::from_secs(10),
        "slowest request {slowest:?}"
    );
}
