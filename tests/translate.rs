//! Protocol translation against a real tonic backend (protos compiled with protox):
//! JSON → gRPC, gRPC-Web (binary and text) → gRPC, gRPC pass-through over h2c, and
//! reloading a changed proto.

mod common;

use std::time::Duration;

use base64::Engine;
use busbar_testkit::pb::bookstore_client::BookstoreClient;
use busbar_testkit::pb::{ListBooksRequest, PingReply, PingRequest};
use busbar_testkit::GrpcBackend;
use common::{client, Busbar};
use prost::Message;
use serde_json::{json, Value};

fn proto() -> String {
    format!(
        "{}/tests/protos/bookstore.proto",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn config(backend: &GrpcBackend, proto: &str) -> String {
    format!(
        r#"
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

[[route]]
name = "ping"
path = "/ping"
service = "books"
[route.translate]
from = "json"
protos = ["{proto}"]
method = "bookstore.v1.Bookstore/Ping"
emit_defaults = true

[[route]]
name = "grpc"
path_prefix = "/bookstore.v1.Bookstore/"
service = "books"
[route.translate]
from = "grpc-web"
cors_origins = ["https://app.example"]
"#,
        addr = backend.addr,
    )
}

async fn start() -> (GrpcBackend, Busbar) {
    let backend = GrpcBackend::start(1).await;
    let bus = Busbar::start(&config(&backend, &proto())).await;
    (backend, bus)
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_calls_reach_the_grpc_backend_and_come_back_as_json() {
    let (backend, bus) = start().await;
    let http = client();

    // GET with path variables and typed query parameters.
    let r = http
        .get(bus.url("/v1/shelves/3/books/42?with_reviews=true&tags=a&tags=b%20c&genre=POETRY"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.headers()["content-type"], "application/json");
    let (status, v) = json_of(r).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"id": "42", "title": "shelf=3 reviews=true tags=a,b c genre=3"})
    );
    let calls = backend.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, "GetBook");
    assert_eq!(
        calls[0].request,
        r#"GetBookRequest { shelf: 3, id: 42, with_reviews: true, tags: ["a", "b c"], genre: Poetry }"#
    );
    assert!(
        calls[0].metadata.iter().any(|(k, _)| k == "traceparent"),
        "{:?}",
        calls[0].metadata
    );

    // The additional binding.
    let (status, v) = json_of(http.get(bus.url("/v1/books/7")).send().await.unwrap()).await;
    assert_eq!((status, &v["id"]), (200, &json!("7")));

    // POST with `body: "book"` and the shelf from the path.
    let r = http
        .post(bus.url("/v1/shelves/9/books"))
        .json(&json!({"title": "Dune", "pageCount": "412"}))
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(status, 200);
    assert_eq!(v, json!({"title": "Dune (shelf 9)", "pageCount": "412"}));

    // PUT with a nested field path in the template.
    let r = http
        .put(bus.url("/v1/books/77"))
        .json(&json!({"title": "X"}))
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!((status, v), (200, json!({"id": "77", "title": "X"})));

    // Every field kind round-trips: int64 beyond 2^53, enum, Timestamp, nested, repeated, map.
    let book = json!({
        "id": "9007199254740993",
        "title": "Round trip",
        "genre": "SCIENCE",
        "published": "2024-05-01T12:30:00Z",
        "author": {"name": "Ada", "born": 1815},
        "tags": ["x", "y"],
        "stockByStore": {"paris": "3", "oslo": "-2"},
        "inPrint": true,
        "price": 12.5,
        "pageCount": "18446744073709551615"
    });
    let r = http
        .post(bus.url("/v1/echo"))
        .json(&book)
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!((status, v), (200, book));
    // Original (snake_case) names are accepted too.
    let r = http
        .post(bus.url("/v1/echo"))
        .json(&json!({"in_print": true, "stock_by_store": {"a": 1}}))
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(
        (status, v),
        (200, json!({"inPrint": true, "stockByStore": {"a": "1"}}))
    );

    // An explicit TOML mapping, with default-valued fields emitted.
    let r = http
        .post(bus.url("/ping"))
        .json(&json!({"text": ""}))
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!((status, v), (200, json!({"text": "", "servedBy": "1"})));

    // Server streaming: newline-delimited JSON.
    let r = http
        .get(bus.url("/v1/shelves/2/books?count=3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"id": "200", "title": "book 0"}),
            json!({"id": "201", "title": "book 1"}),
            json!({"id": "202", "title": "book 2"}),
        ]
    );

    // Unknown paths are 404 (client streaming: tests/translate_fidelity.rs).
    let before = backend.calls().len();
    let (status, v) = json_of(http.get(bus.url("/v1/nothing/here")).send().await.unwrap()).await;
    assert_eq!((status, &v["code"]), (404, &json!(5)));
    assert_eq!(
        backend.calls().len(),
        before,
        "refused requests never reach the backend"
    );

    // Every method's series of the route's 2xx answers.
    let text = bus.metrics().await;
    let ok: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with(r#"busbar_requests_total{class="2xx",method=""#)
                && l.contains(r#"reason="",route="json",service="books"}"#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(ok >= 7.0, "metrics count translated requests: {ok}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_map_to_http_statuses() {
    let (_backend, bus) = start().await;
    let http = client();
    for (code, want) in [
        (5, 404),
        (3, 400),
        (7, 403),
        (14, 503),
        (4, 504),
        (16, 401),
        (8, 429),
        (12, 501),
    ] {
        let message = format!("failure {code}: naïve 100% \"quoted\"");
        let r = http
            .post(bus.url("/v1/fail"))
            .json(&json!({"code": code, "message": message}))
            .send()
            .await
            .unwrap();
        let (status, v) = json_of(r).await;
        assert_eq!(status, want, "gRPC code {code}: {v}");
        assert_eq!(v, json!({"code": code, "message": message, "details": []}));
    }
    // A handler's own NOT_FOUND.
    let (status, v) = json_of(http.get(bus.url("/v1/books/404")).send().await.unwrap()).await;
    assert_eq!(
        (status, v),
        (
            404,
            json!({"code": 5, "message": "book 404 does not exist", "details": []})
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_is_a_400_naming_the_field_and_never_reaches_the_backend() {
    let (backend, bus) = start().await;
    let http = client();
    let cases: [(&str, &str, &str); 5] = [
        ("/v1/echo", r#"{"id": "1",#"#, "not valid JSON"),
        ("/v1/echo", r#"{"id": "twelve"}"#, "\"id\""),
        ("/v1/echo", r#"{"author": {"born": "old"}}"#, "author.born"),
        ("/v1/echo", r#"{"genre": "NOVEL"}"#, "genre"),
        ("/v1/echo", r#"{"titel": "typo"}"#, "titel"),
    ];
    for (path, body, names) in cases {
        let r = http
            .post(bus.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, v) = json_of(r).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["code"], 3);
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains(names),
            "{body}: message {msg:?} should name {names}"
        );
    }
    for q in [
        "/v1/books/seven",
        "/v1/books/1?with_reviews=maybe",
        "/v1/books/1?unknown=1",
    ] {
        let (status, v) = json_of(http.get(bus.url(q)).send().await.unwrap()).await;
        assert_eq!(status, 400, "{q}: {v}");
    }
    assert!(
        backend.calls().is_empty(),
        "the backend was called: {:?}",
        backend.calls()
    );
}

fn grpc_frame(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut f = vec![0u8];
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(&body);
    f
}

/// Splits a gRPC-Web response body into its data frames and its trailers frame.
fn split_frames(mut b: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut data = Vec::new();
    let mut trailer = Vec::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        let frame = b[..5 + len].to_vec();
        if b[0] & 0x80 != 0 {
            trailer = frame;
        } else {
            data.push(frame[5..].to_vec());
        }
        b = &b[5 + len..];
    }
    assert!(b.is_empty(), "trailing bytes");
    (data, trailer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_binary_and_text_over_http1_to_an_h2c_only_backend() {
    let (backend, bus) = start().await;
    let http = client();
    let want_trailer = {
        let lines = b"grpc-status:0\r\n";
        let mut t = vec![0x80, 0, 0, 0, lines.len() as u8];
        t.extend_from_slice(lines);
        t
    };

    // Binary.
    let r = http
        .post(bus.url("/bookstore.v1.Bookstore/Ping"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", "https://app.example")
        .body(grpc_frame(&PingRequest { text: "web".into() }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.version(),
        reqwest::Version::HTTP_11,
        "HTTP/1.1 caller, h2c-only backend"
    );
    assert_eq!(r.headers()["content-type"], "application/grpc-web+proto");
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("grpc-status"));
    let body = r.bytes().await.unwrap();
    let (data, trailer) = split_frames(&body);
    assert_eq!(data.len(), 1);
    assert_eq!(PingReply::decode(data[0].as_slice()).unwrap().text, "web");
    assert_eq!(trailer, want_trailer, "trailers frame byte for byte");

    // Text: the request is base64 with padding in the middle (two pieces encoded apart).
    let frame = grpc_frame(&PingRequest {
        text: "text-mode".into(),
    });
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = format!("{}{}", b64.encode(&frame[..4]), b64.encode(&frame[4..]));
    assert!(
        text[..text.len() - 4].contains('='),
        "padding mid-stream: {text}"
    );
    let r = http
        .post(bus.url("/bookstore.v1.Bookstore/Ping"))
        .header("content-type", "application/grpc-web-text")
        .header("accept", "application/grpc-web-text")
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/grpc-web-text");
    let mut chars = r.bytes().await.unwrap().to_vec();
    let raw = busbar::translate::grpc_web::decode_text(&mut chars).unwrap();
    assert!(chars.is_empty());
    let (data, trailer) = split_frames(&raw);
    assert_eq!(
        PingReply::decode(data[0].as_slice()).unwrap().text,
        "text-mode"
    );
    assert_eq!(trailer, want_trailer);

    // An error comes back in the status headers (tonic answers Trailers-Only).
    let r = http
        .post(bus.url("/bookstore.v1.Bookstore/GetBook"))
        .header("content-type", "application/grpc-web")
        .body(grpc_frame(&busbar_testkit::pb::GetBookRequest {
            id: 404,
            ..Default::default()
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["grpc-status"], "5");

    // CORS preflight, answered by busbar.
    let r = http
        .request(
            reqwest::Method::OPTIONS,
            bus.url("/bookstore.v1.Bookstore/Ping"),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-grpc-web")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        r.headers()["access-control-allow-headers"],
        "content-type,x-grpc-web"
    );
    let r = http
        .request(
            reqwest::Method::OPTIONS,
            bus.url("/bookstore.v1.Bookstore/Ping"),
        )
        .header("origin", "https://elsewhere.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        backend
            .calls()
            .iter()
            .filter(|c| c.method == "Ping")
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_pass_through_over_h2c_unary_and_streaming() {
    let (backend, bus) = start().await;
    let mut grpc = BookstoreClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap();
    let reply = grpc
        .ping(PingRequest {
            text: "through".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", bus.stderr()));
    assert_eq!(reply.get_ref().text, "through");
    let mut stream = grpc
        .list_books(ListBooksRequest { shelf: 4, count: 5 })
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(b) = stream.message().await.unwrap() {
        ids.push(b.id);
    }
    assert_eq!(ids, vec![400, 401, 402, 403, 404]);
    // Status in trailers-only headers passes through untouched.
    let err = grpc
        .get_book(busbar_testkit::pb::GetBookRequest {
            id: 404,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "book 404 does not exist");
    assert_eq!(backend.calls().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_a_changed_proto_swaps_the_mapping_without_dropping_requests() {
    let backend = GrpcBackend::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("bookstore.proto");
    let original = std::fs::read_to_string(proto()).unwrap();
    std::fs::write(&copy, &original).unwrap();
    let bus = Busbar::start(&config(&backend, &copy.display().to_string())).await;
    let http = client();
    assert_eq!(
        http.post(bus.url("/v1/echo"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Load while the proto changes and the config reloads.
    let url = bus.url("/v1/books/5");
    let load = tokio::spawn(async move {
        let http = client();
        let mut statuses = Vec::new();
        for _ in 0..200 {
            statuses.push(
                http.get(&url)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0),
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        statuses
    });
    std::fs::write(
        &copy,
        original.replace("post: \"/v1/echo\"", "post: \"/v1/echo-v2\""),
    )
    .unwrap();
    let r = bus.reload().await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let statuses = load.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "dropped during reload: {statuses:?}"
    );

    assert_eq!(
        http.post(bus.url("/v1/echo-v2"))
            .json(&json!({"title": "new"}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.post(bus.url("/v1/echo"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // A proto that does not compile is refused; the current mapping keeps serving.
    std::fs::write(&copy, "syntax = \"proto3\";\nmessage {").unwrap();
    let r = bus.reload().await;
    assert!(!r.status().is_success());
    assert_eq!(
        http.post(bus.url("/v1/echo-v2"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// A JSON call queued behind a full service: busbar reads its body while it waits (to see
/// the client leave) and the call made when its turn comes carries that body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_body_read_while_queued_reaches_the_grpc_backend() {
    let backend = GrpcBackend::start(1).await;
    let queued = config(&backend, &proto())
        .replace(
            "protocol = \"h2c\"\n",
            "protocol = \"h2c\"\nmax_in_flight = 1\n",
        )
        .replace(
            "cors_origins = [\"https://app.example\"]\n",
            "cors_origins = [\"https://app.example\"]\n[route.admission]\nqueue = { max_depth = 4, max_wait = \"20s\" }\n",
        )
        .replace(
            "path_prefix = \"/v1/\"\nservice = \"books\"\n",
            "path_prefix = \"/v1/\"\nservice = \"books\"\n[route.admission]\nqueue = { max_depth = 4, max_wait = \"20s\" }\n",
        );
    let bus = Busbar::start(&queued).await;

    // A client stream held open takes the only slot.
    let mut grpc = BookstoreClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap();
    let (more, books) = tokio::sync::mpsc::channel::<busbar_testkit::pb::Book>(1);
    let holder = tokio::spawn(async move {
        grpc.collect_books(tokio_stream::wrappers::ReceiverStream::new(books))
            .await
    });
    more.send(busbar_testkit::pb::Book {
        id: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    wait_gauge(
        &bus,
        r#"busbar_service_in_flight{service="books"}"#,
        "the stream never took the slot",
    )
    .await;

    let echo = tokio::spawn(
        client()
            .post(bus.url("/v1/echo"))
            .header("content-type", "application/json")
            .body(r#"{"id": "9", "title": "read while queued"}"#)
            .send(),
    );
    wait_gauge(
        &bus,
        r#"busbar_queue_waiting{service="books"}"#,
        "the JSON call never queued",
    )
    .await;
    assert!(backend.calls().iter().all(|c| c.method != "Echo"));
    drop(more);
    assert_eq!(holder.await.unwrap().unwrap().get_ref().id, 5);
    let (status, v) = json_of(echo.await.unwrap().unwrap()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"id": "9", "title": "read while queued"}));
}

/// Polls `/metrics` until `sample` reads 1 (the queue gauges are sampled once a second).
async fn wait_gauge(bus: &Busbar, sample: &str, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while common::metric_value(&bus.metrics().await, sample) != 1.0 {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
