//! HTTP/2 to instances through busbar's own pool (`drivers::h2::pool`), seen through its
//! first user, JSON→gRPC: h2 over TLS (ALPN `h2`) verified with a CA file, a certificate
//! that fails verification, an instance that allows one stream per connection under 20
//! concurrent calls, a GOAWAY mid-load whose last stream id is below streams in flight,
//! and REFUSED_STREAM. Misbehaving instances are raw HTTP/2 servers written here (with
//! the `h2` crate, or frame by frame where the crate will not misbehave).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use busbar_testkit::pb::bookstore_client::BookstoreClient;
use busbar_testkit::pb::{PingReply, PingRequest};
use busbar_testkit::GrpcBackend;
use bytes::{Buf, Bytes, BytesMut};
use common::{client, Busbar};
use prost::Message;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;

fn proto() -> String {
    format!(
        "{}/tests/protos/bookstore.proto",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Service `books` (`protocol`, the instances at `addrs`, `extra` lines) and the JSON
/// route `POST /ping` → `bookstore.v1.Bookstore/Ping` on it.
fn config(protocol: &str, addrs: &[SocketAddr], extra: &str) -> String {
    let endpoints = addrs
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[[service]]
name = "books"
protocol = "{protocol}"
endpoints = [{endpoints}]
{extra}

[[route]]
name = "ping"
path = "/ping"
service = "books"
[route.translate]
from = "json"
protos = ["{proto}"]
method = "bookstore.v1.Bookstore/Ping"
emit_defaults = true
"#,
        proto = proto(),
    )
}

async fn ping(bus: &Busbar, text: &str) -> (u16, Value) {
    ping_at(bus.url("/ping"), text.to_string()).await
}

async fn ping_at(url: String, text: String) -> (u16, Value) {
    let r = client()
        .post(url)
        .json(&json!({ "text": text }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    (status, v)
}

/// `n` Ping calls at once, `call 0` … `call n-1`; the answers in that order.
async fn concurrently(bus: &Busbar, n: usize) -> Vec<(u16, Value)> {
    let calls: Vec<_> = (0..n)
        .map(|i| tokio::spawn(ping_at(bus.url("/ping"), format!("call {i}"))))
        .collect();
    let mut answers = Vec::with_capacity(n);
    for c in calls {
        answers.push(c.await.unwrap());
    }
    answers
}

/// A CA and a server certificate it signed for `localhost` and `127.0.0.1`, and a
/// second CA that signed nothing, written to a temp folder.
struct Pki {
    dir: tempfile::TempDir,
    server: rustls::ServerConfig,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let issuer = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
        };
        let ca = issuer("busbar test CA");
        let other = issuer("another CA");
        let mut p = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "server");
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other.pem()).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec()];
        Pki { dir, server }
    }

    fn tls_table(&self, ca: &str) -> String {
        format!(
            "[service.tls]\nca_file = \"{}\"",
            self.dir.path().join(ca).display()
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_to_grpc_reaches_an_h2_service_over_tls_verified_with_a_ca_file() {
    let pki = Pki::new();
    let backend = GrpcBackend::start_tls(7, Arc::new(pki.server.clone())).await;
    let bus = Busbar::start(&config("h2", &[backend.addr], &pki.tls_table("ca.pem"))).await;
    for n in 0..3 {
        let (status, v) = ping(&bus, &format!("over tls {n}")).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v, json!({"text": format!("over tls {n}"), "servedBy": "7"}));
    }
    assert_eq!(backend.calls().len(), 3);
    // One connection, negotiated as h2, carries the calls.
    assert_eq!(backend.h2_handshakes(), 1);
    assert_eq!(
        bus.metric("busbar_upstream_connections_total{from=\"new\",service=\"books\"}")
            .await,
        1.0,
        "{}",
        bus.metrics().await
    );
}

/// Health probes of an `h2` service speak HTTP/2 over TLS (ALPN `h2`, the service's CA):
/// the instance stays healthy through them, while the same instance behind a CA that did
/// not sign its certificate fails them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_of_an_h2_service_go_over_h2_with_tls() {
    let pki = Pki::new();
    let backend = GrpcBackend::start_tls(9, Arc::new(pki.server.clone())).await;
    let health = "[service.health]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"2s\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\n";
    let extra = format!("{}\n{health}", pki.tls_table("ca.pem"));
    let other = format!(
        "\n[[service]]\nname = \"other\"\nprotocol = \"h2\"\nendpoints = [{{ addr = \"{}\" }}]\n{}\n{health}",
        backend.addr,
        pki.tls_table("other-ca.pem")
    );
    let bus = Busbar::start(&(config("h2", &[backend.addr], &extra) + &other)).await;
    // The gauges have followed the probes once the failing service shows unhealthy.
    let mut failed = 0.0;
    for _ in 0..100 {
        failed = bus
            .metric("busbar_instances{service=\"other\",state=\"unhealthy\"}")
            .await;
        if failed == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(failed, 1.0, "{}", bus.metrics().await);
    assert!(backend.h2_handshakes() >= 1, "probes connect with ALPN h2");
    assert_eq!(
        bus.metric("busbar_instances{service=\"books\",state=\"unhealthy\"}")
            .await,
        0.0,
        "{}",
        bus.metrics().await
    );
    assert_eq!(
        bus.metric("busbar_instances{service=\"books\",state=\"healthy\"}")
            .await,
        1.0
    );
}

/// gRPC pass-through on pingora's path (the config has a translating route, so HTTP/2
/// clients go to pingora's proxy) reaches an `h2` service over TLS with ALPN `h2` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_pass_through_reaches_an_h2_service_over_tls() {
    let pki = Pki::new();
    let backend = GrpcBackend::start_tls(8, Arc::new(pki.server.clone())).await;
    let body = config("h2", &[backend.addr], &pki.tls_table("ca.pem"))
        + "\n[[route]]\nname = \"grpc\"\npath_prefix = \"/bookstore.v1.Bookstore/\"\nservice = \"books\"\n";
    let bus = Busbar::start(&body).await;
    let mut grpc = BookstoreClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap();
    let reply = grpc
        .ping(PingRequest {
            text: "passed".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", bus.stderr()));
    assert_eq!(reply.get_ref().text, "passed");
    assert_eq!(reply.get_ref().served_by, 8);
    assert!(backend.h2_handshakes() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_instance_whose_certificate_fails_verification_is_unavailable_with_the_reason() {
    let pki = Pki::new();
    let backend = GrpcBackend::start_tls(7, Arc::new(pki.server.clone())).await;
    let bus = Busbar::start(&config(
        "h2",
        &[backend.addr],
        &pki.tls_table("other-ca.pem"),
    ))
    .await;
    let (status, v) = ping(&bus, "x").await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["code"], 14, "{v}");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(message.contains("certificate"), "{v}");
    assert!(backend.calls().is_empty(), "nothing reached the backend");
    assert!(
        bus.metric("busbar_upstream_errors_total{cause=\"certificate\",service=\"books\"}")
            .await
            >= 1.0
    );
}

/// A registered instance of an h2c service that says `"tls": true` is reached over h2
/// with TLS, as a registered `http1` one is over HTTPS; one that says nothing stays on h2c.
/// With no translating route, an HTTP/2 client's call goes through busbar's own engine,
/// h2 both sides, to an `h2` service over TLS (`:scheme` https, the caller's authority).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_pass_through_on_the_engine_reaches_an_h2_service_over_tls() {
    let pki = Pki::new();
    let backend = GrpcBackend::start_tls(9, Arc::new(pki.server.clone())).await;
    let body = format!(
        "[[service]]\nname = \"books\"\nprotocol = \"h2\"\nendpoints = [{{ addr = \"{}\" }}]\n{}\n\
         [[route]]\nname = \"grpc\"\npath_prefix = \"/bookstore.v1.Bookstore/\"\nservice = \"books\"\n",
        backend.addr,
        pki.tls_table("ca.pem")
    );
    let bus = Busbar::start(&body).await;
    let mut grpc = BookstoreClient::connect(format!("http://{}", bus.http))
        .await
        .unwrap();
    for n in 0..3 {
        let reply = grpc
            .ping(PingRequest {
                text: format!("engine {n}"),
            })
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", bus.stderr()));
        assert_eq!(reply.get_ref().text, format!("engine {n}"));
        assert_eq!(reply.get_ref().served_by, 9);
    }
    // One pooled connection carried the calls.
    assert_eq!(backend.h2_handshakes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_h2c_instance_that_says_tls_is_reached_over_h2_with_tls() {
    const TOKEN: &str = "h2-registration-token";
    let pki = Pki::new();
    let tls = GrpcBackend::start_tls(5, Arc::new(pki.server.clone())).await;
    let plain = GrpcBackend::start(6).await;
    let body = format!(
        r#"
[registry]
listen = "{{registry}}"
[[registry.token]]
token_sha256 = "{token}"
services = ["books"]

[[service]]
name = "books"
protocol = "h2c"
registration = true
{tls_table}

[[route]]
name = "ping"
path = "/ping"
service = "books"
[route.translate]
from = "json"
protos = ["{proto}"]
method = "bookstore.v1.Bookstore/Ping"
emit_defaults = true
"#,
        token = common::sha256_hex(TOKEN),
        tls_table = pki.tls_table("ca.pem"),
        proto = proto(),
    );
    let bus = Busbar::start(&body).await;
    for (id, addr, said) in [("a", tls.addr, Some(true)), ("b", plain.addr, None)] {
        let mut reg = json!({ "address": addr.to_string() });
        if let Some(t) = said {
            reg["tls"] = json!(t);
        }
        let r = client()
            .put(bus.registry_url(&format!("/v1/services/books/instances/{id}")))
            .bearer_auth(TOKEN)
            .json(&reg)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // Both instances answer (the balancer's order is its own: per worker thread, and a
    // registration reaches the routing table a moment after its 200).
    let mut served = std::collections::BTreeSet::new();
    for n in 0..20 {
        let (status, v) = ping(&bus, &format!("reg {n}")).await;
        assert_eq!(status, 200, "{v}");
        served.insert(v["servedBy"].as_str().unwrap_or_default().to_string());
        if served.len() == 2 {
            break;
        }
    }
    assert_eq!(
        served.into_iter().collect::<Vec<_>>(),
        ["5", "6"],
        "both instances answer"
    );
    assert_eq!(tls.h2_handshakes(), 1, "the TLS instance over h2 with TLS");
}

/// What a raw instance does with each stream.
#[derive(Clone, Copy)]
enum Mode {
    /// Answers Ping after `delay`.
    Answer { delay: Duration },
    /// Resets every stream with REFUSED_STREAM.
    Refuse,
}

/// An HTTP/2 gRPC instance made with the `h2` crate: `max_streams` concurrent streams
/// per connection, answering Ping with `served_by = name`.
struct H2Instance {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    /// The most streams one connection had open at once.
    most_at_once: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl H2Instance {
    async fn start(name: i64, max_streams: u32, mode: Mode) -> H2Instance {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let most_at_once = Arc::new(AtomicUsize::new(0));
        let (c, a, r, m) = (
            connections.clone(),
            answered.clone(),
            refused.clone(),
            most_at_once.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, SeqCst);
                let (a, r, m) = (a.clone(), r.clone(), m.clone());
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::Builder::new()
                        .max_concurrent_streams(max_streams)
                        .handshake::<_, Bytes>(tcp)
                        .await
                    else {
                        return;
                    };
                    let open = Arc::new(AtomicUsize::new(0));
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        if let Mode::Refuse = mode {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            r.fetch_add(1, SeqCst);
                            continue;
                        }
                        let now = open.fetch_add(1, SeqCst) + 1;
                        m.fetch_max(now, SeqCst);
                        let (a, open) = (a.clone(), open.clone());
                        tokio::spawn(async move {
                            let Mode::Answer { delay } = mode else { return };
                            let text = read_ping(req.into_body()).await;
                            tokio::time::sleep(delay).await;
                            answer_ping(&mut respond, text, name);
                            open.fetch_sub(1, SeqCst);
                            a.fetch_add(1, SeqCst);
                        });
                    }
                });
            }
        });
        H2Instance {
            addr,
            connections,
            answered,
            refused,
            most_at_once,
            task,
        }
    }
}

impl Drop for H2Instance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The text of the Ping request in a request body.
async fn read_ping(mut body: h2::RecvStream) -> String {
    let mut buf = BytesMut::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    if buf.len() < 5 {
        return String::new();
    }
    buf.advance(5);
    PingRequest::decode(&buf[..]).map_or_else(|_| String::new(), |p| p.text)
}

/// A gRPC Ping reply as one length-prefixed message.
fn reply_frame(text: String, name: i64) -> Bytes {
    let msg = PingReply {
        text,
        served_by: name,
    }
    .encode_to_vec();
    let mut frame = Vec::with_capacity(5 + msg.len());
    frame.push(0);
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    Bytes::from(frame)
}

fn answer_ping(respond: &mut h2::server::SendResponse<Bytes>, text: String, name: i64) {
    let head = http::Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let Ok(mut stream) = respond.send_response(head, false) else {
        return;
    };
    let _ = stream.send_data(reply_frame(text, name), false);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let _ = stream.send_trailers(trailers);
}

/// An instance that allows one stream per connection: 20 concurrent calls through busbar
/// all succeed. busbar opens more connections (at most `pool::MAX_CONNECTIONS`, 8, per
/// instance and thread) and queues the rest on them; none carries two streams at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_calls_to_an_instance_that_allows_one_stream_all_succeed() {
    let up = H2Instance::start(
        3,
        1,
        Mode::Answer {
            delay: Duration::from_millis(200),
        },
    )
    .await;
    let bus = Busbar::start(&config("h2c", &[up.addr], "timeout = \"30s\"")).await;
    let answers = concurrently(&bus, 20).await;
    for (n, (status, v)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "call {n}: {v}");
        assert_eq!(v["text"], format!("call {n}"), "{v}");
    }
    assert_eq!(up.answered.load(SeqCst), 20);
    let conns = up.connections.load(SeqCst);
    eprintln!("20 calls, 1 stream per connection: {conns} connections opened");
    assert!(
        (2..=8).contains(&conns),
        "more than one connection, at most 8 (one thread): {conns}"
    );
    assert_eq!(up.most_at_once.load(SeqCst), 1, "one stream per connection");
}

/// An instance that refuses every stream (REFUSED_STREAM: not processed): each call is
/// retried on the other instance and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried_on_another_instance() {
    let refusing = H2Instance::start(1, 100, Mode::Refuse).await;
    let good = GrpcBackend::start(2).await;
    let bus = Busbar::start(&config("h2c", &[refusing.addr, good.addr], "")).await;
    for n in 0..6 {
        let (status, v) = ping(&bus, &format!("r{n}")).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["servedBy"], "2", "{v}");
    }
    assert!(
        refusing.refused.load(SeqCst) >= 2,
        "round robin sent some to the refusing instance"
    );
    assert_eq!(good.calls().len(), 6);
    eprintln!(
        "REFUSED_STREAM: 6 calls, {} refused and retried, 6 answered",
        refusing.refused.load(SeqCst)
    );
    // A refusal is not the instance's fault: it is not ejected for it.
    assert_eq!(
        bus.metric("busbar_outlier_ejections_total{service=\"books\"}")
            .await,
        0.0
    );
}

/// A raw HTTP/2 instance written frame by frame: on its first connection, once `wait_for`
/// requests are in, it sends GOAWAY with the lowest of their stream ids as the last,
/// answers that one, and closes; later connections are answered normally.
struct GoawayInstance {
    addr: SocketAddr,
    /// Streams answered (at or below a GOAWAY's last id, or on a later connection).
    answered: Arc<AtomicUsize>,
    /// Streams above the GOAWAY's last id, left unprocessed.
    dropped: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// The next whole frame at the front of `buf` (type, flags, stream id, payload), taken
/// off it; `None` while the frame is not all there.
fn next_frame(buf: &mut BytesMut) -> Option<(u8, u8, u32, BytesMut)> {
    if buf.len() < 9 {
        return None;
    }
    let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
    if buf.len() < 9 + len {
        return None;
    }
    let (kind, flags) = (buf[3], buf[4]);
    let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
    buf.advance(9);
    Some((kind, flags, id, buf.split_to(len)))
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header block of literal fields, never indexed (no HPACK state to keep).
fn literal_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (k, v) in fields {
        b.push(0x10);
        b.push(k.len() as u8);
        b.extend_from_slice(k.as_bytes());
        b.push(v.len() as u8);
        b.extend_from_slice(v.as_bytes());
    }
    b
}

/// The whole gRPC answer to stream `id`: head, one reply message, trailers.
fn raw_answer(id: u32, text: &str, name: i64) -> Vec<u8> {
    let mut out = Vec::new();
    // :status 200 is static table entry 8.
    let mut head = vec![0x88];
    head.extend(literal_block(&[("content-type", "application/grpc")]));
    out.extend(frame(HEADERS, END_HEADERS, id, &head));
    out.extend(frame(DATA, 0, id, &reply_frame(text.to_string(), name)));
    let trailers = literal_block(&[("grpc-status", "0")]);
    out.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &trailers));
    out
}

impl GoawayInstance {
    async fn start(name: i64, wait_for: usize) -> GoawayInstance {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (a, d) = (answered.clone(), dropped.clone());
        let task = tokio::spawn(async move {
            let mut first = true;
            while let Ok((tcp, _)) = listener.accept().await {
                let goaway = std::mem::replace(&mut first, false);
                let (a, d) = (a.clone(), d.clone());
                tokio::spawn(async move {
                    let _ = raw_connection(tcp, name, goaway.then_some(wait_for), a, d).await;
                });
            }
        });
        GoawayInstance {
            addr,
            answered,
            dropped,
            task,
        }
    }
}

impl Drop for GoawayInstance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection. With `goaway = Some(n)`: once n requests are complete (or 3 s
/// have passed with at least one), GOAWAY(last = the lowest), answer it, close.
async fn raw_connection(
    mut tcp: TcpStream,
    name: i64,
    goaway: Option<usize>,
    answered: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let mut preface = [0u8; 24];
    tcp.read_exact(&mut preface).await?;
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    let mut complete: Vec<u32> = Vec::new();
    let started = tokio::time::Instant::now();
    let mut buf = BytesMut::new();
    loop {
        // Whole frames off the front of what was read (a read may end mid-frame).
        while let Some((kind, flags, id, payload)) = next_frame(&mut buf) {
            match kind {
                SETTINGS if flags & 1 == 0 => tcp.write_all(&frame(SETTINGS, 1, 0, &[])).await?,
                PING if flags & 1 == 0 => tcp.write_all(&frame(PING, 1, 0, &payload)).await?,
                HEADERS | DATA if flags & END_STREAM != 0 => complete.push(id),
                _ => {}
            }
        }
        match goaway {
            None => {
                for id in complete.drain(..) {
                    tcp.write_all(&raw_answer(id, "after goaway", name)).await?;
                    answered.fetch_add(1, SeqCst);
                }
            }
            Some(n) => {
                let waited = started.elapsed() > Duration::from_secs(3);
                if complete.len() >= n || (waited && !complete.is_empty()) {
                    complete.sort_unstable();
                    let last = complete[0];
                    let mut payload = last.to_be_bytes().to_vec();
                    payload.extend_from_slice(&0u32.to_be_bytes());
                    tcp.write_all(&frame(GOAWAY, 0, 0, &payload)).await?;
                    tcp.write_all(&raw_answer(last, "before goaway", name))
                        .await?;
                    answered.fetch_add(1, SeqCst);
                    dropped.fetch_add(complete.len() - 1, SeqCst);
                    tcp.flush().await?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return Ok(());
                }
            }
        }
        // `read_buf` may be cancelled by the timeout without losing bytes.
        let read = tokio::time::timeout(Duration::from_millis(100), tcp.read_buf(&mut buf));
        if let Ok(r) = read.await {
            if r? == 0 {
                return Ok(());
            }
        }
    }
}

/// GOAWAY mid-load with a last stream id below streams in flight: the stream at the
/// last id is answered; those above it were not processed and are retried on the other
/// instance; no call is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_mid_load_loses_no_call() {
    let going = GoawayInstance::start(1, 3).await;
    let good = GrpcBackend::start(2).await;
    let bus = Busbar::start(&config(
        "h2c",
        &[going.addr, good.addr],
        "[service.retry]\nattempts = 3",
    ))
    .await;
    let answers = concurrently(&bus, 12).await;
    let mut by = [0usize; 3];
    for (n, (status, v)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "call {n}: {v}");
        let served: usize = v["servedBy"].as_str().unwrap().parse().unwrap();
        by[served] += 1;
    }
    let dropped = going.dropped.load(SeqCst);
    eprintln!("GOAWAY mid-load: 12 calls, at least {dropped} streams above the last id, answered by instance 1: {}, by instance 2: {}", by[1], by[2]);
    assert!(dropped >= 1, "some streams were above the GOAWAY's last id");
    assert_eq!(by[1], going.answered.load(SeqCst), "{by:?}");
    assert_eq!(by[1] + by[2], 12);
    assert_eq!(good.calls().len(), by[2]);
}

/// `protocol = "h2"`, `h2_max_streams` and `[service.tls]` on h2c are validated with
/// their place in the file.
#[test]
fn h2_settings_are_validated_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busbar.toml");
    let checked = |service: &str| {
        let text = format!(
            "[listen]\nhttp = [\"127.0.0.1:{}\"]\n\n[[service]]\nname = \"s\"\nendpoints = [{{ addr = \"127.0.0.1:1\" }}]\n{service}",
            common::free_port()
        );
        std::fs::write(&path, text).unwrap();
        let out = common::check(&path);
        assert!(!out.status.success(), "{service}");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let err = checked("protocol = \"http1\"\nh2_max_streams = 10\n");
    assert!(
        err.contains(":8:18:")
            && err.contains("h2_max_streams applies to protocol = \"h2c\" or \"h2\""),
        "{err}"
    );
    let err = checked("protocol = \"h2\"\nh2_max_streams = 0\n");
    assert!(
        err.contains(":8:18:") && err.contains("h2_max_streams must be between 1 and 10000"),
        "{err}"
    );
    let err = checked("protocol = \"h2c\"\n[service.tls]\nca_file = \"ca.pem\"\n");
    assert!(
        err.contains(":8:1:") && err.contains("tls applies to protocol = \"h2\""),
        "{err}"
    );
    let err = checked("protocol = \"h3\"\n");
    assert!(
        err.contains(":7:12:") && err.contains("\"h2c\" or \"h2\""),
        "{err}"
    );
}

/// busbar's own per-request fields (`traceparent`, `x-request-id`; a JSON call's
/// `grpc-timeout` too) have a new value on every request. Indexed, each would take room
/// in the upstream connection's HPACK dynamic table that no later request uses, and
/// push out the fields that do repeat, sent again as literals. They go as never-indexed
/// literals: once the first request has put the repeating fields in the table, later
/// requests add nothing to it and name those fields by their index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_fields_stay_out_of_the_hpack_table() {
    let (addr, blocks, task) = recording_instance().await;
    let bus = Busbar::start(&common::one_route(addr, "", r#"protocol = "h2c""#)).await;
    const REQUESTS: usize = 40;
    for _ in 0..REQUESTS {
        let r = client().get(bus.url("/books")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let blocks = blocks.lock().unwrap().clone();
    task.abort();
    assert_eq!(blocks.len(), REQUESTS, "every request reached the instance");
    for (n, block) in blocks.iter().enumerate().skip(1) {
        let [indexed, inserted, never, _] = representations(block);
        assert_eq!(inserted, 0, "request {n} added to the table: {block:02x?}");
        assert!(
            never >= 2,
            "request {n}: trace context and id never indexed: {block:02x?}"
        );
        assert!(
            indexed >= 4,
            "request {n}: repeating fields by index: {block:02x?}"
        );
    }
}

/// A header block's representations (RFC 7541 §6) by kind: indexed fields, literals
/// added to the table, never-indexed literals, other literals. Strings are skipped by
/// their length, not decoded.
fn representations(mut b: &[u8]) -> [usize; 4] {
    fn int(b: &mut &[u8], prefix: u8) -> usize {
        let max = (1usize << prefix) - 1;
        let mut v = usize::from(b[0]) & max;
        *b = &b[1..];
        if v < max {
            return v;
        }
        // Continuation bytes, seven bits each, least significant first.
        let mut shift = 0;
        loop {
            let byte = b[0];
            *b = &b[1..];
            v += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                return v;
            }
        }
    }
    fn literal(b: &mut &[u8], prefix: u8) {
        for _ in 0..1 + usize::from(int(b, prefix) == 0) {
            let n = int(b, 7);
            *b = &b[n..];
        }
    }
    let mut counts = [0; 4];
    while let Some(&first) = b.first() {
        match first {
            0x80.. => {
                int(&mut b, 7);
                counts[0] += 1;
            }
            0x40.. => {
                literal(&mut b, 6);
                counts[1] += 1;
            }
            // A dynamic table size update.
            0x20.. => {
                int(&mut b, 5);
            }
            0x10.. => {
                literal(&mut b, 4);
                counts[2] += 1;
            }
            _ => {
                literal(&mut b, 4);
                counts[3] += 1;
            }
        }
    }
    counts
}

/// An h2c instance written frame by frame that keeps the header block of every request
/// it gets (HEADERS frames whole, as busbar's h2 encoder wrote them) and answers each
/// stream `200` with no body.
async fn recording_instance() -> (
    SocketAddr,
    Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let blocks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = blocks.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                tcp.read_exact(&mut preface).await?;
                tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
                let mut buf = BytesMut::new();
                loop {
                    while let Some((kind, flags, id, payload)) = next_frame(&mut buf) {
                        match kind {
                            SETTINGS if flags & 1 == 0 => {
                                tcp.write_all(&frame(SETTINGS, 1, 0, &[])).await?
                            }
                            PING if flags & 1 == 0 => {
                                tcp.write_all(&frame(PING, 1, 0, &payload)).await?
                            }
                            HEADERS => {
                                kept.lock().unwrap().push(payload.to_vec());
                                // 0x88: `:status: 200` from the static table.
                                let end = END_HEADERS | END_STREAM;
                                tcp.write_all(&frame(HEADERS, end, id, &[0x88])).await?;
                            }
                            _ => {}
                        }
                    }
                    if tcp.read_buf(&mut buf).await? == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                }
            });
        }
    });
    (addr, blocks, task)
}

/// Streams of many clients share an upstream connection, and so its HPACK dynamic
/// table: busbar sends `authorization`, `proxy-authorization` and a short `cookie` as
/// never-indexed literals (RFC 7541 §7.1.3; nghttp2's rule), so no client's credentials
/// enter a table another client's requests are compressed against, here or at a later
/// hop. On the wire that is the 4-bit-prefix form `0001xxxx` with the static table's name
/// index: `authorization` (23) is `1f 08`, `cookie` (32) `1f 11`, `proxy-authorization`
/// (49) `1f 22`. Before, the first two went as "without indexing" (`0f 08`, `0f 11`),
/// which a later hop may index, and `proxy-authorization` was indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_reach_an_h2_instance_as_never_indexed_fields() {
    let (addr, blocks, task) = recording_instance().await;
    let bus = Busbar::start(&common::one_route(addr, "", r#"protocol = "h2c""#)).await;
    for _ in 0..2 {
        let r = client()
            .get(bus.url("/account"))
            .header("authorization", "Bearer s3cret-token")
            .header("proxy-authorization", "Basic eDp5")
            .header("cookie", "sid=42")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let blocks = blocks.lock().unwrap().clone();
    task.abort();
    assert_eq!(blocks.len(), 2, "two requests reached the instance");
    let has = |block: &[u8], bytes: &[u8]| block.windows(2).any(|w| w == bytes);
    for (n, block) in blocks.iter().enumerate() {
        assert!(
            has(block, &[0x1f, 0x08]),
            "request {n}: authorization never indexed: {block:02x?}"
        );
        assert!(
            has(block, &[0x1f, 0x11]),
            "request {n}: short cookie never indexed: {block:02x?}"
        );
    }
}
