//! Upgrades (WebSocket `101 Switching Protocols`) and `CONNECT` tunnels on busbar's own
//! HTTP/1 engine, against the real binary: frames both ways over plaintext and TLS (client
//! side and upstream side), an upgrade the upstream declines (the connection goes on as
//! HTTP/1.1), bytes sent right behind the head, admission before any upstream connection,
//! a connect failure retried on another instance, the access log line, the idle timeout
//! (`tunnel_idle_timeout`) and the drain on SIGTERM, `Upgrade: h2c` answered as plain
//! HTTP/1.1, and the CONNECT tunnel's idle timeout.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http1::Conn;
use common::{Busbar, SIGTERM};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;

/// Generous for a loaded machine; a hang still fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// Each handshake's request headers (lowercase names), in order.
type Heads = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// A WebSocket echo server (tungstenite), plaintext or TLS: every text and binary message
/// comes back as it was. Records each handshake's request headers (lowercase names) and
/// counts connections.
struct WsEcho {
    addr: SocketAddr,
    heads: Heads,
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl WsEcho {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> WsEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let (h, c) = (heads.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (h, tls) = (h.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(cfg) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                            if let Ok(s) = acceptor.accept(tcp).await {
                                echo(s, h).await;
                            }
                        }
                        None => echo(tcp, h).await,
                    }
                });
            }
        });
        WsEcho {
            addr,
            heads,
            conns,
            task,
        }
    }

    fn heads(&self) -> Vec<Vec<(String, String)>> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// tungstenite's callback type: its error response is large, and returned by value.
#[allow(clippy::result_large_err)]
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: S, heads: Heads) {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let record = |req: &Request, resp: Response| {
        let head = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        heads.lock().unwrap().push(head);
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, record).await else {
        return;
    };
    while let Some(Ok(m)) = ws.next().await {
        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
            return;
        }
    }
}

fn header<'a>(head: &'a [(String, String)], name: &str) -> Option<&'a str> {
    head.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A WebSocket client over `stream` (already connected to busbar, plaintext or TLS).
async fn ws_over<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<S> {
    let url = format!("ws://chat.test{path}");
    let (ws, resp) = tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("handshake in time")
        .expect("WebSocket handshake through busbar");
    assert_eq!(resp.status(), 101);
    ws
}

/// A text and a binary message, each way, and what came back.
async fn echo_both<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) {
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    for m in [
        Message::text("hello through busbar"),
        Message::binary(binary.clone()),
        Message::text("x".repeat(200)),
    ] {
        ws.send(m.clone()).await.unwrap();
        let back = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("echo in time")
            .expect("a message")
            .unwrap();
        assert_eq!(back, m);
    }
}

/// One route `all` to service `s` at `addrs`, with `service_extra` in the service.
fn config(addrs: &[SocketAddr], service_extra: &str, route_extra: &str) -> String {
    let endpoints = addrs
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[service]]\nname = \"s\"\nendpoints = [{endpoints}]\n{service_extra}\n[[route]]\nname = \"all\"\nservice = \"s\"\n{route_extra}\n"
    )
}

/// The access log's lines with `"status":<status>`, parsed.
fn logged(bus: &Busbar, status: u16) -> Vec<serde_json::Value> {
    bus.access_log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["status"] == status)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_echo_both_ways_and_the_upgrade_is_logged() {
    let backend = WsEcho::start(None).await;
    let bus = Busbar::start(&config(&[backend.addr], "", "")).await;
    let tcp = TcpStream::connect(bus.http).await.unwrap();
    let mut ws = ws_over(tcp, "/chat?room=1").await;
    echo_both(&mut ws).await;
    ws.close(None).await.unwrap();
    // The close handshake ends the tunnel: the client sees the end of the stream.
    let end = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(
        end.is_ok(),
        "the tunnel did not end after the close handshake"
    );
    // The client closes its side too (a half-closed tunnel lasts until the idle timeout).
    drop(ws);

    // The upstream got the upgrade through busbar's head builder: `Upgrade` and
    // `Connection: upgrade` kept, busbar's forwarding headers added.
    let heads = backend.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = &heads[0];
    assert_eq!(header(head, "upgrade"), Some("websocket"), "{head:?}");
    assert!(
        header(head, "connection").is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")),
        "{head:?}"
    );
    assert!(header(head, "via").is_some(), "{head:?}");
    assert_eq!(
        header(head, "x-forwarded-for"),
        Some("127.0.0.1"),
        "{head:?}"
    );
    assert!(header(head, "sec-websocket-key").is_some(), "{head:?}");

    // One access log line, when the tunnel ended: status 101, the bytes that went to the
    // client through the tunnel (the frames echoed: more than the 70 KB binary one).
    let ok = common::eventually(PATIENCE, || !logged(&bus, 101).is_empty()).await;
    assert!(
        ok,
        "no access log line for the upgrade:\n{}",
        bus.access_log()
    );
    let line = &logged(&bus, 101)[0];
    assert_eq!(line["path"], "/chat", "{line}");
    assert_eq!(line["route"], "all", "{line}");
    assert!(line["bytes"].as_u64().unwrap() > 70_000, "{line}");
    let requests =
        r#"busbar_requests_total{class="1xx",method="GET",reason="",route="all",service="s"}"#;
    assert_eq!(bus.metric_settled(requests, 1.0).await, 1.0);
    // The bytes each way count as the route's body bytes.
    for way in ["request", "response"] {
        let sample = format!(r#"busbar_{way}_body_bytes_total{{route="all"}}"#);
        let n = bus.metric(&sample).await;
        assert!(n > 70_000.0, "{sample} = {n}");
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
    config: Arc<rustls::ServerConfig>,
    der: rustls::pki_types::CertificateDer<'static>,
}

fn issue(dir: &Path) -> Issued {
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    let der = c.cert.der().clone();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![der.clone()], key_der)
    .unwrap();
    Issued {
        cert,
        key,
        config: Arc::new(config),
        der,
    }
}

/// A TLS connection to `addr` that trusts `root` and offers `http/1.1`.
async fn tls_connect(
    addr: SocketAddr,
    root: &rustls::pki_types::CertificateDer<'static>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with busbar")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_a_tls_client_connection() {
    let backend = WsEcho::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let issued = issue(dir.path());
    let tls: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let line = format!(
        "tls = [{{ addr = \"{tls}\", cert = \"{}\", key = \"{}\" }}]",
        issued.cert.display(),
        issued.key.display()
    );
    let bus = Busbar::start_with_header(&config(&[backend.addr], "", ""), &line).await;
    let ok = common::eventually(PATIENCE, || std::net::TcpStream::connect(tls).is_ok()).await;
    assert!(ok, "TLS listener not up:\n{}", bus.stderr());
    let stream = tls_connect(tls, &issued.der).await;
    let mut ws = ws_over(stream, "/tls").await;
    echo_both(&mut ws).await;
    let head = &backend.heads()[0];
    assert_eq!(header(head, "x-forwarded-proto"), Some("https"), "{head:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_to_an_https_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let issued = issue(dir.path());
    let backend = WsEcho::start(Some(issued.config.clone())).await;
    let tls = format!(
        "protocol = \"https\"\n[service.tls]\nserver_name = \"localhost\"\nca_file = \"{}\"\n",
        issued.cert.display()
    );
    let bus = Busbar::start(&config(&[backend.addr], &tls, "")).await;
    let tcp = TcpStream::connect(bus.http).await.unwrap();
    let mut ws = ws_over(tcp, "/secure").await;
    echo_both(&mut ws).await;
    assert_eq!(backend.conns.load(Ordering::SeqCst), 1);
}

/// What a raw upstream does with each request head it reads.
#[derive(Clone, Copy)]
enum Reply {
    /// `101`, then every byte that follows (those that came with the head first) back.
    Switch,
    /// `101`, then nothing: it waits for the close.
    SwitchAndWait,
    /// An ordinary answer with this status and a small body; the connection stays open.
    Status(u16),
    /// `101` without the `Upgrade` a 101 must carry (RFC 9110 §15.2.2).
    SwitchUnnamed,
}

/// A raw HTTP/1 upstream: records each head (with its connection's number) and when a
/// connection that switched protocols saw busbar close it.
struct Raw {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<(usize, String)>>>,
    conns: Arc<AtomicUsize>,
    closed: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Raw {
    async fn start(reply: Reply) -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(Mutex::new(Vec::new()));
        let (h, c, cl) = (heads.clone(), conns.clone(), closed.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(raw_conn(s, n, reply, h.clone(), cl.clone()));
            }
        });
        Raw {
            addr,
            heads,
            conns,
            closed,
            task,
        }
    }

    fn heads(&self) -> Vec<(usize, String)> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_conn(
    mut s: TcpStream,
    conn: usize,
    reply: Reply,
    heads: Arc<Mutex<Vec<(usize, String)>>>,
    closed: Arc<Mutex<Vec<Instant>>>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = common::read_head(&mut s, &mut buf).await else {
            return;
        };
        heads
            .lock()
            .unwrap()
            .push((conn, String::from_utf8_lossy(&buf[..end]).to_lowercase()));
        buf.drain(..end);
        match reply {
            Reply::Status(status) => {
                let answer =
                    format!("HTTP/1.1 {status} Whatever\r\nContent-Length: 5\r\n\r\nplain");
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
            Reply::SwitchUnnamed => {
                let head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n";
                let _ = s.write_all(head).await;
                let _ = s.read(&mut [0u8; 64]).await;
                closed.lock().unwrap().push(Instant::now());
                return;
            }
            Reply::Switch | Reply::SwitchAndWait => {
                let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                if s.write_all(head).await.is_err() {
                    return;
                }
                let echo = matches!(reply, Reply::Switch);
                if echo && !buf.is_empty() && s.write_all(&buf).await.is_err() {
                    return;
                }
                let mut chunk = [0u8; 4096];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) if echo => {
                            if s.write_all(&chunk[..n]).await.is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                    }
                }
                closed.lock().unwrap().push(Instant::now());
                return;
            }
        }
    }
}

const UPGRADE: &[u8] =
    b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_upstream_declines_goes_on_as_http11() {
    for status in [200u16, 404] {
        let up = Raw::start(Reply::Status(status)).await;
        let bus = Busbar::start(&config(&[up.addr], "", "")).await;
        let mut c = Conn::connect(bus.http).await;
        let r = c.ask(UPGRADE, false).await;
        assert_eq!(r.status(), status, "{r:?}");
        assert_eq!(r.text(), "plain");
        assert!(r.complete && !r.closed, "{r:?}");
        // The same connection carries the next request.
        let r = c.ask(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n", false).await;
        assert_eq!((r.status(), r.text().as_str()), (status, "plain"), "{r:?}");
        let heads = up.heads();
        assert_eq!(heads.len(), 2, "{heads:?}");
        assert!(heads[0].1.contains("upgrade: websocket"), "{heads:?}");
        // A declined upgrade leaves an ordinary keep-alive connection: reused.
        assert_eq!(heads[1].0, heads[0].0, "{heads:?}");
        assert!(!heads[1].1.contains("upgrade"), "{heads:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_right_behind_the_head_reach_the_upstream_first() {
    let up = Raw::start(Reply::Switch).await;
    let bus = Busbar::start(&config(&[up.addr], "", "")).await;
    let mut c = Conn::connect(bus.http).await;
    let mut first = UPGRADE.to_vec();
    first.extend_from_slice(b"early frame bytes|");
    c.send(&first).await.unwrap();
    c.send(b"later bytes").await.unwrap();
    let want = "early frame bytes|later bytes";
    let mut got = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    let text = loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(PATIENCE, c.stream.read(&mut chunk))
            .await
            .unwrap_or(Ok(0))
            .unwrap_or(0);
        got.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if n == 0 || text.ends_with(want) || Instant::now() > deadline {
            break text;
        }
    };
    assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
    assert!(
        text.to_lowercase().contains("\r\nupgrade: websocket\r\n"),
        "{text}"
    );
    assert!(
        text.to_lowercase().contains("\r\nconnection: upgrade\r\n"),
        "{text}"
    );
    assert!(text.ends_with(&format!("\r\n\r\n{want}")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    let up = Raw::start(Reply::SwitchAndWait).await;
    let bus = Busbar::start(&config(&[up.addr], "tunnel_idle_timeout = \"1s\"", "")).await;
    let mut c = Conn::connect(bus.http).await;
    c.send(UPGRADE).await.unwrap();
    let r = c.read_response(true).await;
    assert_eq!(r.status(), 101, "{r:?}");
    let switched = Instant::now();
    // Bytes keep it open past the idle timeout.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.send(b"tick").await.unwrap();
    }
    let last = Instant::now();
    let (_, closed) = c.read_to_close(PATIENCE).await;
    let after = switched.elapsed();
    assert!(closed, "the idle tunnel was not closed");
    eprintln!(
        "idle tunnel closed {after:?} after the switch, {:?} after its last byte",
        last.elapsed()
    );
    assert!(
        after >= Duration::from_millis(2400),
        "closed after {after:?}"
    );
    let ok = common::eventually(PATIENCE, || !up.closed.lock().unwrap().is_empty()).await;
    assert!(ok, "the upstream did not see the tunnel close");
    let ok = common::eventually(PATIENCE, || !logged(&bus, 101).is_empty()).await;
    assert!(ok, "{}", bus.access_log());
    assert_eq!(
        logged(&bus, 101)[0]["error"],
        "tunnel_idle",
        "{}",
        bus.access_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_an_upgrade_before_any_upstream_connection() {
    let up = Raw::start(Reply::Switch).await;
    let admission = "[route.admission]\nidentity = [\"header:x-user-id\"]\ntrusted_proxies = [\"127.0.0.1\"]\nrequire_auth = true\n";
    let bus = Busbar::start(&config(&[up.addr], "", admission)).await;
    let mut c = Conn::connect(bus.http).await;
    let r = c.ask(UPGRADE, false).await;
    assert_eq!(r.status(), 401, "{r:?}");
    assert!(r.text().contains("\"error\""), "{r:?}");
    assert_eq!(up.conns.load(Ordering::SeqCst), 0);
    // With the identity it goes through.
    let mut c = Conn::connect(bus.http).await;
    c.send(b"GET /up HTTP/1.1\r\nHost: a\r\nX-User-Id: ann\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nping")
        .await
        .unwrap();
    let r = c.read_response(true).await;
    assert_eq!(r.status(), 101, "{r:?}");
    let (got, _) = c.read_to_close(Duration::from_millis(500)).await;
    assert_eq!(got, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_is_retried_on_another_instance() {
    let backend = WsEcho::start(None).await;
    // A port nothing listens on.
    let dead: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let bus = Busbar::start(&config(&[dead, backend.addr], "", "")).await;
    // Round robin: of two upgrades, one goes to the dead instance first.
    for _ in 0..2 {
        let tcp = TcpStream::connect(bus.http).await.unwrap();
        let mut ws = ws_over(tcp, "/retry").await;
        ws.send(Message::text("again")).await.unwrap();
        let back = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap();
        assert_eq!(back.unwrap().unwrap(), Message::text("again"));
        ws.close(None).await.unwrap();
        while let Ok(Some(Ok(_))) = tokio::time::timeout(PATIENCE, ws.next()).await {}
    }
    assert_eq!(backend.conns.load(Ordering::SeqCst), 2);
    // Each upgrade is logged when its tunnel ends; one of them took two tries.
    let ok = common::eventually(PATIENCE, || logged(&bus, 101).len() == 2).await;
    assert!(ok, "{}", bus.access_log());
    let tries: Vec<_> = logged(&bus, 101)
        .iter()
        .map(|l| l["tries"].as_u64())
        .collect();
    assert!(tries.contains(&Some(2)), "{}", bus.access_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_is_answered_as_plain_http11() {
    let up = Raw::start(Reply::Status(200)).await;
    let bus = Busbar::start(&config(&[up.addr], "", "")).await;
    let mut c = Conn::connect(bus.http).await;
    let r = c
        .ask(
            b"GET /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            false,
        )
        .await;
    assert_eq!((r.status(), r.text().as_str()), (200, "plain"), "{r:?}");
    let head = &up.heads()[0].1;
    for gone in ["upgrade", "http2-settings"] {
        assert!(!head.contains(gone), "{gone} went upstream: {head}");
    }
    let r = c.ask(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n", false).await;
    assert_eq!(r.status(), 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_gives_tunnels_the_grace_period_then_closes_them() {
    let backend = WsEcho::start(None).await;
    let mut bus = Busbar::start(&config(&[backend.addr], "", "")).await;
    let tcp = TcpStream::connect(bus.http).await.unwrap();
    let mut ws = ws_over(tcp, "/drain").await;
    let signalled = Instant::now();
    bus.signal(SIGTERM);
    // Still open well into the drain (the harness's grace period is 10 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    ws.send(Message::text("during the drain")).await.unwrap();
    let back = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap();
    assert_eq!(back.unwrap().unwrap(), Message::text("during the drain"));
    // Closed at the drain's deadline, and the process exits cleanly.
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(end.is_ok(), "the tunnel outlived the drain");
    let after = signalled.elapsed();
    assert!(after >= Duration::from_secs(9), "closed after {after:?}");
    eprintln!("tunnel closed {after:?} after SIGTERM (grace period 10 s)");
    assert_eq!(bus.wait_exit(Duration::from_secs(10)).await, Some(0));
    let line = logged(&bus, 101);
    assert_eq!(line.len(), 1, "{}", bus.access_log());
    assert_eq!(line[0]["error"], "tunnel_drained", "{}", bus.access_log());
}

const MESH: &str = r#"
[mesh]
domains = ["svc.cluster.local"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_tunnel_is_closed_after_the_idle_timeout() {
    let up = Raw::start(Reply::Switch).await;
    let body = format!(
        "{MESH}{}",
        config(
            &[up.addr],
            "tunnel_idle_timeout = \"1s\"",
            "path_prefix = \"/api\""
        )
    );
    let bus = Busbar::start(&body).await;
    let mut c = Conn::connect(bus.http).await;
    c.send(b"CONNECT s:80 HTTP/1.1\r\nHost: s:80\r\n\r\n")
        .await
        .unwrap();
    let r = c.read_response(true).await;
    assert_eq!(r.status(), 200, "{r:?}");
    // The tunnel carries bytes both ways: a request head and what follows it, echoed
    // after the raw upstream's 101.
    c.send(UPGRADE).await.unwrap();
    let r = c.read_response(true).await;
    assert_eq!(r.status(), 101, "{r:?}");
    let opened = Instant::now();
    let (_, closed) = c.read_to_close(PATIENCE).await;
    assert!(closed, "the idle CONNECT tunnel was not closed");
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "{:?}",
        opened.elapsed()
    );
    let ok = common::eventually(PATIENCE, || !up.closed.lock().unwrap().is_empty()).await;
    assert!(ok, "the upstream did not see the tunnel close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_that_does_not_name_its_protocol_is_a_502() {
    let up = Raw::start(Reply::SwitchUnnamed).await;
    let bus = Busbar::start(&config(&[up.addr], "", "")).await;
    let mut c = Conn::connect(bus.http).await;
    let r = c.ask(UPGRADE, false).await;
    assert_eq!(r.status(), 502, "{r:?}");
    assert!(r.text().contains("upstream_error"), "{r:?}");
    // busbar dropped that upstream connection.
    let ok = common::eventually(PATIENCE, || !up.closed.lock().unwrap().is_empty()).await;
    assert!(ok, "the upstream connection was kept");
}

/// RFC 9110 §7.8: a server switches protocols only when the client asked (`Upgrade` in
/// the request). A `101` to a plain GET would turn the client's connection into a tunnel
/// to bytes it never asked for: it is an answer busbar cannot frame, a 502, and that
/// upstream connection is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_nobody_asked_for_is_a_502() {
    let up = Raw::start(Reply::SwitchAndWait).await;
    let bus = Busbar::start(&config(&[up.addr], "", "")).await;
    let mut c = Conn::connect(bus.http).await;
    let r = c
        .ask(b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n", false)
        .await;
    assert_eq!(r.status(), 502, "{r:?}");
    assert!(r.text().contains("upstream_error"), "{r:?}");
    let ok = common::eventually(PATIENCE, || !up.closed.lock().unwrap().is_empty()).await;
    assert!(ok, "the upstream connection was kept as a tunnel");
}
