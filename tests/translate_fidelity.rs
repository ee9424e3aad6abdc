//! JSON ↔ gRPC where callers notice (issue 25), against the real binary and the tonic
//! `fidelity.v1` backend: proto errors with line:col, the standard `google.rpc` error
//! details built in, `response_body`, every error in the translation's shape, plain gRPC
//! through a JSON route, metadata both ways, and the three server-stream formats.

mod common;

use std::process::Command;

use busbar_testkit::fidelity::pb::fidelity_client::FidelityClient;
use busbar_testkit::fidelity::pb::MetadataRequest;
use busbar_testkit::fidelity::FidelityBackend;
use busbar_testkit::GrpcBackend;
use common::{client, Busbar};
use serde_json::{json, Value};

fn proto() -> String {
    format!("{}/tests/protos/fidelity.proto", env!("CARGO_MANIFEST_DIR"))
}

/// One JSON route over the whole path space, with `options` added to its translation.
fn config(addr: &str, options: &str) -> String {
    format!(
        r#"
[[service]]
name = "fid"
protocol = "h2c"
endpoints = [{{ addr = "{addr}" }}]

[[route]]
name = "json"
path_prefix = "/"
service = "fid"
[route.translate]
from = "json"
protos = ["{proto}"]
{options}
"#,
        proto = proto(),
    )
}

async fn start(options: &str) -> (FidelityBackend, Busbar) {
    let backend = FidelityBackend::start().await;
    let bus = Busbar::start(&config(&backend.addr.to_string(), options)).await;
    (backend, bus)
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// Item 7: a broken proto named by two routes is reported once, as file:line:col.
#[test]
fn check_names_the_proto_file_line_and_column_once() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.proto");
    std::fs::write(
        &bad,
        "syntax = \"proto3\";\npackage b;\n\nmessage M {\n  strnig name = 1;\n}\n",
    )
    .unwrap();
    let mut conf = String::from(
        "[listen]\nhttp = [\"127.0.0.1:18080\"]\n\n[[service]]\nname = \"s\"\nprotocol = \"h2c\"\nendpoints = [{ addr = \"127.0.0.1:9\" }]\n",
    );
    for name in ["one", "two"] {
        conf.push_str(&format!(
            "\n[[route]]\nname = \"{name}\"\npath_prefix = \"/{name}/\"\nservice = \"s\"\n[route.translate]\nfrom = \"json\"\nprotos = [\"broken.proto\"]\nmethod = \"b.S/M\"\n"
        ));
    }
    let file = dir.path().join("busbar.toml");
    std::fs::write(&file, conf).unwrap();
    let out = Command::new(common::bin())
        .arg("check")
        .arg(&file)
        .output()
        .expect("busbar check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let at = format!("{}:5:3: ", bad.display());
    assert_eq!(
        stderr.matches(&at).count(),
        1,
        "once, with line:col:\n{stderr}"
    );
    assert!(stderr.contains("strnig"), "{stderr}");
    println!("busbar check says:\n{stderr}");
}

/// Item 5: ErrorInfo, RetryInfo and BadRequest decode with their fields though the
/// route's proto does not import google/rpc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_error_details_decode_with_their_fields() {
    let (_backend, bus) = start("").await;
    let r = client()
        .post(bus.url("/f/details"))
        .json(&json!({"code": 8}))
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(
        v,
        json!({
            "code": 8,
            "message": "details attached",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "QUOTA_EXCEEDED",
                    "domain": "fidelity.test",
                    "metadata": {"limit": "10"}
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"},
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "code", "description": "must be odd"}]
                }
            ]
        })
    );
}

/// Item 1: `response_body` answers the named field alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_answers_the_named_field() {
    let (_backend, bus) = start("").await;
    let http = client();
    let get = |p: &str| http.get(bus.url(p)).send();
    assert_eq!(
        json_of(get("/f/shelves/7").await.unwrap()).await,
        (200, json!({"id": "7", "theme": "theme 7"}))
    );
    // A repeated field: the array; an unset message: `{}`.
    assert_eq!(
        json_of(get("/f/shelves/7/tags").await.unwrap()).await,
        (200, json!(["a", "b"]))
    );
    assert_eq!(
        json_of(get("/f/shelves/0").await.unwrap()).await,
        (200, json!({}))
    );
    // A binding without response_body: the whole reply.
    assert_eq!(
        json_of(get("/f/whole/7").await.unwrap()).await,
        (
            200,
            json!({"shelf": {"id": "7", "theme": "theme 7"}, "tags": ["a", "b"], "servedBy": "fidelity"})
        )
    );
}

/// Item 2: a service that refuses connections is UNAVAILABLE: 503 in the translation's
/// shape, as grpc-gateway and Envoy answer; busbar's own refusal shape is not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_down_is_503_unavailable_in_the_translation_shape() {
    // A port that was just free: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bus = Busbar::start(&config(&addr.to_string(), "")).await;
    let r = client()
        .post(bus.url("/f/metadata"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/json")
    );
    let (status, v) = json_of(r).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["code"], 14, "{v}");
    assert_eq!(v["details"], json!([]), "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(v.get("error").is_none(), "not busbar's refusal shape: {v}");
}

/// Item 3: a gRPC client on a JSON route is proxied as gRPC, untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_grpc_on_a_json_route_is_proxied_untouched() {
    let (_backend, bus) = start("").await;
    let mut grpc = FidelityClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap();
    let reply = grpc
        .metadata(MetadataRequest { code: 0 })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", bus.stderr()));
    assert_eq!(
        reply
            .metadata()
            .get("x-initial")
            .map(|v| v.to_str().unwrap()),
        Some("i-value")
    );
    // The gRPC status too, as the backend sent it.
    let err = grpc
        .metadata(MetadataRequest { code: 9 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(err.message(), "failed on purpose");
}

/// Item 4: `Grpc-Metadata-X` reaches the backend as `x`; initial metadata comes back as
/// `Grpc-Metadata-<name>` (or plain), trailers as `Grpc-Trailer-<name>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_goes_both_ways() {
    let (_backend, bus) = start("").await;
    let http = client();
    let r = http
        .post(bus.url("/f/metadata"))
        .header("Grpc-Metadata-Tenant", "acme")
        .header("Grpc-Metadata-grpc-timeout", "1S")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&r, "grpc-metadata-x-initial").as_deref(),
        Some("i-value")
    );
    assert_eq!(header(&r, "x-initial"), None);
    let (status, v) = json_of(r).await;
    assert_eq!(status, 200, "{v}");
    let seen: Vec<&str> = v["seen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(seen.contains(&"tenant=acme"), "{seen:?}");
    assert!(
        !seen.iter().any(|s| s.starts_with("grpc-metadata-")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|s| s.starts_with("grpc-timeout="))
            .count()
            == 1
            && !seen.contains(&"grpc-timeout=1S"),
        "reserved names are never taken from Grpc-Metadata-: {seen:?}"
    );

    // A failed call's metadata (a Trailers-Only reply) comes as trailers.
    let r = http
        .post(bus.url("/f/metadata"))
        .json(&json!({"code": 9}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&r, "grpc-trailer-x-trailer").as_deref(),
        Some("t-value")
    );
    assert_eq!(json_of(r).await.0, 400);

    // A stream with no message: the head waits for the trailers, so both are there.
    let r = http.get(bus.url("/f/stream?count=0")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "grpc-metadata-x-initial").as_deref(),
        Some("i-value")
    );
    assert_eq!(
        header(&r, "grpc-trailer-x-trailer").as_deref(),
        Some("t-value")
    );

    // Envoy's way: initial metadata under its own name.
    let (_backend, bus) = start("initial_metadata = \"plain\"").await;
    let r = client()
        .post(bus.url("/f/metadata"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "x-initial").as_deref(), Some("i-value"));
    assert_eq!(header(&r, "grpc-metadata-x-initial"), None);
}

/// Item 8: NDJSON by default; grpc-gateway's result lines and Envoy's JSON array as route
/// options; a failure after the first message ends each in its own way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streams_in_three_formats() {
    let fail = json!({"error": {"code": 9, "message": "stream failed", "details": []}});
    let cases = [
        ("", "application/x-ndjson"),
        ("stream_format = \"ndjson-result\"", "application/x-ndjson"),
        ("stream_format = \"json-array\"", "application/json"),
    ];
    for (option, content_type) in cases {
        let (_backend, bus) = start(option).await;
        let http = client();
        let item = |n: i32| {
            let m = if n == 0 { json!({}) } else { json!({"n": n}) };
            match option {
                o if o.contains("ndjson-result") => json!({ "result": m }),
                _ => m,
            }
        };
        for (query, tail) in [
            ("count=2", None),
            ("count=2&fail_code=9", Some(fail.clone())),
        ] {
            let r = http
                .get(bus.url(&format!("/f/stream?{query}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{option} {query}");
            assert_eq!(header(&r, "content-type").as_deref(), Some(content_type));
            let text = r.text().await.unwrap();
            let mut want = vec![item(0), item(1)];
            want.extend(tail);
            let got: Vec<Value> = if option.contains("json-array") {
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
            } else {
                text.lines()
                    .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                    .collect()
            };
            assert_eq!(got, want, "{option} {query}: {text}");
        }
        // An empty stream is an empty body, or an empty array.
        let r = http.get(bus.url("/f/stream?count=0")).send().await.unwrap();
        let text = r.text().await.unwrap();
        let want = if option.contains("json-array") {
            "[]"
        } else {
            ""
        };
        assert_eq!(text, want, "{option}");
    }
}

/// Item 6: a client-streaming method takes a JSON array (Envoy) or NDJSON body, each
/// element one message; a body that is neither is a 400 naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streams_take_a_json_array_or_ndjson() {
    let backend = GrpcBackend::start(1).await;
    let proto = format!(
        "{}/tests/protos/bookstore.proto",
        env!("CARGO_MANIFEST_DIR")
    );
    let bus = Busbar::start(&format!(
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
"#,
        addr = backend.addr
    ))
    .await;
    let http = client();
    // CollectBooks answers the sum of the ids it received.
    let post = |body: &'static str| {
        http.post(bus.url("/v1/collect"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases = [
        (
            r#"[{"id": "1"}, {"id": "2"}, {"id": "39"}]"#,
            json!({"id": "42"}),
        ),
        ("{\"id\": \"1\"}\n{\"id\": \"2\"}\n", json!({"id": "3"})),
        ("[]", json!({})),
    ];
    for (body, want) in cases {
        let (status, v) = json_of(post(body).await.unwrap()).await;
        assert_eq!((status, v), (200, want), "{body}");
    }
    for (body, names) in [
        (r#"[{"id": "1"}, {"id": "x"}]"#, "id"),
        ("[1, 2]", "JSON object"),
        (r#"[{"id": "1"}"#, "ends inside"),
    ] {
        let (status, v) = json_of(post(body).await.unwrap()).await;
        assert_eq!((status, &v["code"]), (400, &json!(3)), "{body}: {v}");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains(names), "{body}: {msg}");
    }
}
