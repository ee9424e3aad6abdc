//! The fuzz harnesses: one function per target, each feeding arbitrary bytes to a busbar
//! parser of untrusted input. A harness passes when it returns; a panic is a finding.
//!
//! Shared by the cargo-fuzz targets (`fuzz_targets/*.rs`) and by busbar's
//! `tests/fuzz_corpus.rs`, which replays the checked-in corpora in CI without cargo-fuzz.
//! Besides "no panic", some harnesses assert a property that must hold for every input
//! (a registration that parses is within its limits; base64 text mode round-trips).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use busbar::config::{self, MAX_TTL, MIN_TTL};
use busbar::drivers::h1::framing::ChunkScan;
use busbar::drivers::h1::head::{self, HeadLimits};
use busbar::model::Service;
use busbar::routing::{self, RequestView, RouteTable};
use busbar::translate::grpc_web::{self, GrpcWebSettings, WebCall};
use busbar::translate::json_grpc::{
    JsonOptions, MessageSplitter, MetadataHeaders, StreamFormat, Transcoder,
};
use busbar::translate::template::PathTemplate;

/// The names of the targets, as in `fuzz/Cargo.toml` and `fuzz/corpus/<target>/`.
pub const TARGETS: &[&str] = &[
    "config",
    "route",
    "registration",
    "translate",
    "grpc_web",
    "head",
    "chunked",
    "h2_request",
];

/// Runs the harness of `target` on `data`.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "config" => config(data),
        "route" => route(data),
        "registration" => registration(data),
        "translate" => translate(data),
        "grpc_web" => grpc_web(data),
        "head" => head(data),
        "chunked" => chunked(data),
        "h2_request" => h2_request(data),
        other => panic!("no fuzz target named {other}"),
    }
}

/// The config loader: TOML text → validated `Config` or errors, never a panic.
pub fn config(data: &[u8]) {
    if let Ok(src) = std::str::from_utf8(data) {
        let _ = config::parse(Path::new("/nonexistent/fuzz.toml"), src);
    }
}

/// Routes of every shape the matcher knows: exact and wildcard hosts, exact and
/// segment-aware prefix paths, methods, header values, rewrites, a catch-all.
const ROUTES: &str = r#"
[listen]
http = ["127.0.0.1:1"]
[[service]]
name = "s"
endpoints = [{ addr = "127.0.0.1:2" }]
[[route]]
name = "wild-api"
hosts = ["*.example.com"]
path_prefix = "/api"
strip_prefix = true
service = "s"
[[route]]
name = "exact-host"
hosts = ["api.example.com", "API2.example.com"]
methods = ["get", "head"]
service = "s"
[[route]]
name = "slash-prefix"
path_prefix = "/static/"
prefix_rewrite = "/assets"
service = "s"
[[route]]
name = "exact-path"
hosts = ["x.org"]
path = "/exact"
service = "s"
[[route]]
name = "canary"
headers = { "x-canary" = "1", "x-zone" = "eu" }
service = "s"
[[route]]
name = "post"
methods = ["POST", "PATCH"]
path_prefix = "/v1/"
service = "s"
[[route]]
name = "fallback"
path = "/"
service = "s"
"#;

fn route_table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let c =
            config::parse(Path::new("fuzz-routes.toml"), ROUTES).expect("the route table parses");
        let services = [Arc::new(Service::new(c.services[0].clone(), None, &[]))];
        RouteTable::from_config(&c.routes, &services)
    })
}

/// The route matcher. Input lines: host, path (with query), method, then `name: value`
/// headers. The matched route's rewrite runs on the path too.
pub fn route(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let host = lines.next().unwrap_or("");
    let path_and_query = lines.next().unwrap_or("/");
    let method =
        Method::from_bytes(lines.next().unwrap_or("GET").as_bytes()).unwrap_or(Method::GET);
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            headers.append(n, v);
        }
    }
    let path = path_and_query.split('?').next().unwrap_or("");
    let req = RequestView {
        host,
        path,
        method: &method,
        headers: &headers,
    };
    if let Some(r) = route_table().find(&req) {
        let _ = routing::rewrite(&r.config, path_and_query);
    }
    let _ = routing::prefix_matches(host, path);
}

/// The registration API's body parser. What parses must be within the documented limits.
pub fn registration(data: &[u8]) {
    let default_ttl = Duration::from_secs(30).clamp(MIN_TTL, MAX_TTL);
    if let Ok(reg) = busbar::registry::api::parse_registration("orders", "i-1", data, default_ttl) {
        assert!((1..=10_000).contains(&reg.weight), "weight {}", reg.weight);
        let ttl = Duration::from_secs(reg.ttl_secs);
        assert!((MIN_TTL..=MAX_TTL).contains(&ttl), "ttl {ttl:?}");
        assert!(reg.metadata.len() <= 64);
    }
}

/// Where `tests/protos/bookstore.proto` is, from the busbar crate or from `fuzz/`.
fn bookstore_proto() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    [
        here.join("tests/protos/bookstore.proto"),
        here.join("../tests/protos/bookstore.proto"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("tests/protos/bookstore.proto")
}

fn transcoder() -> &'static Transcoder {
    static T: OnceLock<Transcoder> = OnceLock::new();
    T.get_or_init(|| {
        let pool = busbar::translate::descriptors::compile(&[bookstore_proto()], &[])
            .expect("bookstore.proto compiles");
        Transcoder::from_annotations(
            pool,
            &[],
            JsonOptions {
                emit_defaults: false,
                deny_unknown_fields: true,
                initial_metadata: MetadataHeaders::Prefixed,
                stream: StreamFormat::Ndjson,
            },
        )
        .expect("bookstore.proto has bindings")
    })
}

/// JSON/HTTP → protobuf. Input: one byte picking the verb, then lines: path, query,
/// and the rest is the JSON body (also decoded as a reply message of the bound method).
/// The path line is parsed as a `google.api.http` path template too.
pub fn translate(data: &[u8]) {
    let Some((&verb, rest)) = data.split_first() else {
        return;
    };
    let method = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ][usize::from(verb) % 5]
        .clone();
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.splitn(3, '\n');
    let path = parts.next().unwrap_or("");
    let query = parts.next().filter(|q| !q.is_empty());
    let body = parts.next().unwrap_or("");
    let t = transcoder();
    if let Ok((b, vars)) = t.find(&method, path) {
        let _ = t.request(b, vars, query, body.as_bytes());
        let _ = t.response(b, body.as_bytes());
    }
    if let Ok(tpl) = PathTemplate::parse(path) {
        let _ = tpl.matches(path);
        let _ = tpl.matches(body);
    }
    // The body as a client stream, split where the path line's length says: the same
    // messages as in one piece.
    let cut = path.len().min(body.len());
    let (mut whole, mut pieces) = (Vec::new(), Vec::new());
    let mut one = MessageSplitter::default();
    let a = one.push(body.as_bytes(), &mut whole);
    let mut two = MessageSplitter::default();
    let b = two
        .push(&body.as_bytes()[..cut], &mut pieces)
        .and_then(|()| two.push(&body.as_bytes()[cut..], &mut pieces));
    if a.is_ok() && b.is_ok() {
        assert_eq!(
            whole, pieces,
            "a client stream split differently in two pieces"
        );
    }
}

fn web_request(content_type: &[u8]) -> Option<pingora_http::RequestHeader> {
    let mut r = pingora_http::RequestHeader::build("POST", b"/pkg.S/M", None).ok()?;
    r.insert_header(
        http::header::CONTENT_TYPE,
        HeaderValue::from_bytes(content_type).ok()?,
    )
    .ok()?;
    r.insert_header(http::header::ORIGIN, "https://a.example")
        .ok()?;
    Some(r)
}

/// gRPC-Web: the base64 text decoder over arbitrary chunking, content-type detection,
/// and the text-mode round trip (what busbar encodes, its decoder gives back).
pub fn grpc_web(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let _ = grpc_web::decode_text(&mut rest.to_vec());

    let settings = GrpcWebSettings {
        cors_origins: vec!["*".to_string()],
        cors_max_age: Duration::from_secs(60),
    };
    if let Some(req) = web_request(rest.split(|&b| b == b'\n').next().unwrap_or(b"")) {
        let _ = WebCall::detect(&req, &settings);
    }
    let req = web_request(b"application/grpc-web-text+proto").expect("a request header");
    let mut call = WebCall::detect(&req, &settings).expect("text mode is detected");

    // Request body: base64 text in chunks, as a client may send it.
    let mut pieces = rest.chunks(chunk).peekable();
    while let Some(piece) = pieces.next() {
        let mut body = Some(Bytes::copy_from_slice(piece));
        if call
            .request_body(&mut body, pieces.peek().is_none())
            .is_err()
        {
            break;
        }
    }

    // Response: bytes → base64 in chunks, then the trailers frame; decode it all back.
    let mut text = Vec::new();
    for piece in rest.chunks(chunk) {
        let mut body = Some(Bytes::copy_from_slice(piece));
        call.response_body(&mut body, false);
        text.extend_from_slice(body.as_deref().unwrap_or(b""));
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    text.extend_from_slice(&call.trailers(&trailers));
    let decoded = grpc_web::decode_text(&mut text).expect("busbar's own base64 decodes");
    assert!(text.is_empty(), "busbar's base64 ends in whole quanta");
    let frame = grpc_web::trailer_frame(&trailers);
    assert_eq!(decoded.len(), rest.len() + frame.len());
    assert_eq!(&decoded[..rest.len()], rest, "text mode round trip");
    assert_eq!(&decoded[rest.len()..], &frame[..]);
}

/// The request-head checker, with busbar's default limits and with tiny ones.
pub fn head(data: &[u8]) {
    for limits in [
        HeadLimits {
            max_request_line: 8192,
            max_head_bytes: 65536,
            max_headers: 100,
        },
        HeadLimits {
            max_request_line: 16,
            max_head_bytes: 64,
            max_headers: 2,
        },
    ] {
        let _ = head::too_long(data, &limits);
        match head::head_end(data) {
            Some(end) => {
                assert!(end <= data.len());
                let verdict = head::check(&data[..end], &limits);
                if let Err(r) = verdict {
                    assert!(
                        matches!(r.status, 400 | 414 | 431 | 501),
                        "status {}",
                        r.status
                    );
                }
            }
            None => {
                let _ = head::check(data, &limits);
            }
        }
    }
}

/// The strict chunked-body scanner (`drivers::h1::framing::ChunkScan`) that frames both
/// request and response bodies. The first byte picks where the rest is cut in two; the
/// rest is fed whole and in the two parts. Properties: no panic; the verdict and the
/// body's end do not depend on the cut; what passes (with the held trailers) is exactly
/// the body's bytes; the data handed out is what the scanner counted and no more than
/// the body.
pub fn chunked(data: &[u8]) {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut) * body.len() / 255;
    let feed = |parts: &[&[u8]]| {
        let mut s = ChunkScan::default();
        let (mut out, mut got) = (Vec::new(), 0u64);
        let mut seen = 0;
        for p in parts {
            let fed = s.feed_with(p, |d| got += d.len() as u64)?;
            assert!(fed.pass <= p.len());
            out.extend_from_slice(&p[..fed.pass]);
            if let Some(end) = fed.end {
                assert!(fed.pass <= end && end <= p.len());
                out.extend_from_slice(s.held());
                assert_eq!(got, s.data_bytes());
                return Ok(Some((out, seen + end)));
            }
            seen += p.len();
        }
        assert_eq!(got, s.data_bytes());
        Ok::<_, busbar::drivers::h1::framing::Malformed>(None)
    };
    let whole = feed(&[body]);
    let (a, b) = body.split_at(cut.min(body.len()));
    let split = feed(&[a, b]);
    match (&whole, &split) {
        (Ok(Some((out, end))), Ok(Some((out2, end2)))) => {
            assert_eq!(end, end2);
            assert_eq!(&out[..], &body[..*end]);
            assert_eq!(out, out2);
        }
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        _ => panic!("the verdict depends on the cut: {whole:?} vs {split:?}"),
    }
}

/// Fields the h2 crate refuses before busbar sees a stream (RFC 9113 §8.2.2); the
/// harness leaves them out as the crate would.
const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// busbar's HTTP/2 engine turning a stream's head into the HTTP/1.1 request it sends an
/// HTTP/1 service (`drivers::h2`, RFC 9113 §8.2.3). Input: the first byte's low bit is
/// END_STREAM on the HEADERS frame; then lines: the method, the target (`:scheme` and
/// `:authority` as a URI's, or a path alone), and `name: value` fields (lowercase names
/// only, connection-specific ones left out: what the h2 crate hands over).
/// Asserts, for every head busbar accepts: `Host` is `:authority` when there is one,
/// once; at most one `cookie` line; no `te`; an origin-form target; a chunked body says
/// `transfer-encoding: chunked` and no length, a length body one `content-length` of it.
pub fn h2_request(data: &[u8]) {
    let end_stream = data.first().is_some_and(|b| b & 1 == 1);
    let mut lines = data.get(1..).unwrap_or_default().split(|&b| b == b'\n');
    let Some(Ok(method)) = lines.next().map(Method::from_bytes) else {
        return;
    };
    let Some(Ok(uri)) = lines.next().map(http::Uri::try_from) else {
        return;
    };
    let authority = uri.authority().map(|a| a.as_str().to_owned());
    let mut fields = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let (Ok(name), Ok(value)) = (
            HeaderName::from_lowercase(name),
            HeaderValue::from_bytes(value[1..].trim_ascii()),
        ) else {
            continue;
        };
        let te_not_trailers = name == http::header::TE && value.as_bytes() != b"trailers";
        if CONNECTION_SPECIFIC.contains(&name.as_str()) || te_not_trailers {
            continue;
        }
        fields.append(name, value);
    }
    let Ok(request) = http::Request::builder()
        .method(method)
        .uri(uri)
        .version(http::Version::HTTP_2)
        .body(())
    else {
        return;
    };
    let (mut parts, ()) = request.into_parts();
    parts.headers = fields;
    let Some((head, length)) = busbar::drivers::h2::convert_for_fuzzing(parts, end_stream) else {
        return;
    };
    let h = &head.headers;
    let count = |name: http::header::HeaderName| h.get_all(name).iter().count();
    if let Some(authority) = authority {
        assert_eq!(count(http::header::HOST), 1, "one Host: {h:?}");
        let host = h.get(http::header::HOST).map(|v| v.as_bytes());
        assert!(
            host.is_some_and(|v| v.eq_ignore_ascii_case(authority.as_bytes())),
            "Host is the :authority {authority}: {h:?}"
        );
    }
    assert!(count(http::header::COOKIE) <= 1, "cookies joined: {h:?}");
    assert_eq!(count(http::header::TE), 0, "te dropped: {h:?}");
    assert!(
        head.uri.scheme().is_none() && head.uri.authority().is_none(),
        "origin form: {}",
        head.uri
    );
    let chunked = h
        .get(http::header::TRANSFER_ENCODING)
        .is_some_and(|v| v.as_bytes() == b"chunked");
    match length {
        None => {
            assert!(chunked, "a body of unknown length goes chunked: {h:?}");
            assert_eq!(count(http::header::CONTENT_LENGTH), 0, "{h:?}");
        }
        Some(n) => {
            assert!(!chunked, "{h:?}");
            if n > 0 {
                assert_eq!(count(http::header::CONTENT_LENGTH), 1, "{h:?}");
                let declared = h
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                assert_eq!(declared, Some(n), "{h:?}");
            }
        }
    }
}
