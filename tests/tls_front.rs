//! TLS on the service listeners, against the real binary: certificates chosen by SNI
//! name (exact, wildcard, default), certificates swapped by a reload (and a broken one
//! refused), the handshake timeout, and the front door's head deadline and checks on TLS
//! connections as on plaintext.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, Busbar};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// A self-signed certificate for `names`, written as `<stem>.crt` and `<stem>.key`.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn issue(dir: &Path, stem: &str, names: &[&str]) -> Issued {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    Issued {
        cert,
        key,
        der: c.cert.der().clone(),
    }
}

/// Replaces `to`'s content with `from`'s in one step (a rename), as a deploy tool does.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("swap");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `addr` with `sni` (none when `None`), ALPN `http/1.1`.
async fn connect(addr: SocketAddr, sni: Option<&str>) -> std::io::Result<Tls> {
    let mut config = common::tls::trusting_client(&[b"http/1.1"]);
    config.enable_sni = sni.is_some();
    let name = ServerName::try_from(sni.unwrap_or("no-sni.invalid").to_string()).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tokio::time::timeout(Duration::from_secs(15), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// The certificate the server shows to `sni`.
async fn shown(addr: SocketAddr, sni: Option<&str>) -> CertificateDer<'static> {
    let tls = connect(addr, sni).await.expect("handshake");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
}

/// One request on a new TLS connection (`Connection: close`): the answer's bytes and the
/// certificate the handshake showed.
async fn exchange(
    addr: SocketAddr,
    sni: Option<&str>,
    request: &[u8],
) -> std::io::Result<(String, CertificateDer<'static>)> {
    let mut tls = connect(addr, sni).await?;
    let cert = tls.get_ref().1.peer_certificates().unwrap_or_default()[0].clone();
    tls.write_all(request).await?;
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut out)).await {
        Ok(Ok(_)) => {}
        // A server that closes without close_notify is no error for an HTTP answer.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::Error::other("no answer in time")),
    }
    Ok((String::from_utf8_lossy(&out).into_owned(), cert))
}

const GET: &[u8] = b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A free loopback address for a TLS listener.
fn tls_addr() -> SocketAddr {
    format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap()
}

fn tls_line(addr: SocketAddr, default: &Issued, extra: &str) -> String {
    format!(
        "tls = [{{ addr = \"{addr}\", cert = \"{}\", key = \"{}\"{extra} }}]",
        default.cert.display(),
        default.key.display()
    )
}

async fn up(bus: &Busbar, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "TLS listener not up:\n{}",
            bus.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn tls_bus(backend: &Backend, line: &str, addr: SocketAddr) -> Busbar {
    let bus = Busbar::start_with_header(&common::one_route(backend.addr, "", ""), line).await;
    up(&bus, addr).await;
    bus
}

/// Two certificates by SNI name (one with its names listed, one whose names come from
/// its subjectAltName, a wildcard) and a default: each client sees the certificate for
/// the name it sent, the default for an unknown name or none, and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_the_certificate_by_name_with_a_wildcard_and_a_default() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let default = issue(dir.path(), "default", &["default.test"]);
    let api = issue(dir.path(), "api", &["api.example.com"]);
    let wild = issue(dir.path(), "wild", &["*.apps.example.com"]);
    let addr = tls_addr();
    let certs = format!(
        ", certs = [{{ cert = \"{}\", key = \"{}\", names = [\"API.example.com\"] }}, {{ cert = \"{}\", key = \"{}\" }}]",
        api.cert.display(),
        api.key.display(),
        wild.cert.display(),
        wild.key.display()
    );
    let bus = tls_bus(&a, &tls_line(addr, &default, &certs), addr).await;

    assert_eq!(
        shown(addr, Some("api.example.com")).await,
        api.der,
        "exact name"
    );
    assert_eq!(
        shown(addr, Some("one.apps.example.com")).await,
        wild.der,
        "wildcard"
    );
    assert_eq!(
        shown(addr, Some("two.one.apps.example.com")).await,
        default.der,
        "a wildcard is for one label only"
    );
    assert_eq!(shown(addr, Some("apps.example.com")).await, default.der);
    assert_eq!(
        shown(addr, Some("other.test")).await,
        default.der,
        "unknown name"
    );
    assert_eq!(shown(addr, None).await, default.der, "no SNI");

    let (answer, cert) = exchange(addr, Some("api.example.com"), GET).await.unwrap();
    assert_eq!(status(&answer), 200, "{answer}\n{}", bus.stderr());
    assert_eq!(cert, api.der);
    assert_eq!(a.seen()[0].headers["x-forwarded-proto"], "https");
}

/// New certificate files at the same paths, and a reload, while a client makes ~500
/// requests each on a new TLS connection: none fails, and the handshakes after the
/// reload show the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_certificates_under_load_without_a_failed_request() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let old = issue(dir.path(), "served", &["localhost"]);
    let old_api = issue(dir.path(), "api", &["api.example.com"]);
    let new = issue(dir.path(), "next", &["localhost"]);
    let new_api = issue(dir.path(), "next-api", &["api.example.com"]);
    let addr = tls_addr();
    let certs = format!(
        ", certs = [{{ cert = \"{}\", key = \"{}\" }}]",
        old_api.cert.display(),
        old_api.key.display()
    );
    let bus = tls_bus(&a, &tls_line(addr, &old, &certs), addr).await;

    const N: usize = 500;
    let client = tokio::spawn(async move {
        let mut seen = Vec::with_capacity(N);
        let mut failed = Vec::new();
        for i in 0..N {
            let sni = if i % 2 == 0 {
                None
            } else {
                Some("api.example.com")
            };
            // When the connection began: a handshake that began before the reload was
            // answered may finish after it, with the old certificate.
            let began = Instant::now();
            match exchange(addr, sni, GET).await {
                Ok((answer, cert)) if status(&answer) == 200 => seen.push((began, cert)),
                Ok((answer, _)) => failed.push(format!("#{i}: {answer}")),
                Err(e) => failed.push(format!("#{i}: {e}")),
            }
        }
        (seen, failed)
    });
    // Let the loop run on the old certificates for a while.
    while a.seen().len() < N / 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    replace(&new.cert, &old.cert);
    replace(&new.key, &old.key);
    replace(&new_api.cert, &old_api.cert);
    replace(&new_api.key, &old_api.key);
    let r = bus.reload().await;
    let reloaded = Instant::now();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "reloaded", "{v}");
    assert!(
        v["applied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "listen.tls certificates"),
        "{v}"
    );
    assert!(
        !v["not_applied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "listen"),
        "new certificates need no restart: {v}"
    );
    let (seen, failed) = client.await.unwrap();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert_eq!(seen.len(), N);
    let before = seen
        .iter()
        .filter(|(_, c)| *c == old.der || *c == old_api.der)
        .count();
    let after: Vec<_> = seen.iter().filter(|(at, _)| *at > reloaded).collect();
    assert!(
        before >= N / 5,
        "the old certificates served first ({before})"
    );
    assert!(!after.is_empty(), "requests after the reload");
    for (_, cert) in after {
        assert!(
            *cert == new.der || *cert == new_api.der,
            "a handshake after the reload showed an old certificate"
        );
    }
    assert_eq!(shown(addr, Some("api.example.com")).await, new_api.der);
    assert_eq!(shown(addr, None).await, new.der);
}

/// A reload whose key is broken, or belongs to another certificate, is refused, naming
/// the file; the old certificate keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_broken_key_is_refused_and_the_old_certificate_serves() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let served = issue(dir.path(), "served", &["localhost"]);
    let other = issue(dir.path(), "other", &["localhost"]);
    let addr = tls_addr();
    let bus = tls_bus(&a, &tls_line(addr, &served, ""), addr).await;

    std::fs::write(&served.key, "-----BEGIN PRIVATE KEY-----\nbroken\n").unwrap();
    let r = bus.reload().await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains(&served.key.display().to_string()),
        "names the key: {v}"
    );
    assert_eq!(
        shown(addr, None).await,
        served.der,
        "the old certificate serves"
    );

    // A key of another certificate, then a certificate of another key.
    replace(&other.key, &served.key);
    let v: Value = bus.reload().await.json().await.unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("does not belong"),
        "{v}"
    );
    assert_eq!(shown(addr, None).await, served.der);
    let (answer, _) = exchange(addr, None, GET).await.unwrap();
    assert_eq!(status(&answer), 200, "{answer}");
}

/// A client that connects and never starts its handshake is closed after the
/// listener's handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_starts_is_closed_after_the_timeout() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let served = issue(dir.path(), "served", &["localhost"]);
    let addr = tls_addr();
    let bus = tls_bus(
        &a,
        &tls_line(addr, &served, ", handshake_timeout = \"1s\""),
        addr,
    )
    .await;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf)).await;
    let waited = started.elapsed();
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not {read:?}: {}",
        bus.stderr()
    );
    assert!(
        waited >= Duration::from_millis(900),
        "not before the timeout: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "the 1 s timeout, not the default: {waited:?}"
    );
    let sample = r#"busbar_edge_refusals_total{reason="tls_handshake_timeout"}"#;
    assert_eq!(bus.metric_settled(sample, 1.0).await, 1.0, "{sample}");
}

/// Reads one HTTP/1.1 answer with a `Content-Length` from `tls`: head and body. `got`
/// keeps what was read past it (the next pipelined answer).
async fn read_answer(tls: &mut Tls, got: &mut Vec<u8>) -> String {
    let answer = common::read_answer(tls, got, Duration::from_secs(15)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The access log's lines once `n` are there (it is flushed in the background).
async fn log_lines(bus: &Busbar, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<Value> = bus
            .access_log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn tls_bus_with_limits(
    backend: &Backend,
    limits: &str,
) -> (Busbar, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let served = issue(dir.path(), "served", &["localhost"]);
    let addr = tls_addr();
    let bus = Busbar::start_with_header(
        &common::one_route(backend.addr, &format!("[limits]\n{limits}"), ""),
        &tls_line(addr, &served, ""),
    )
    .await;
    up(&bus, addr).await;
    (bus, addr, dir)
}

/// TLS slowloris: a client that completes its handshake and trickles its head is cut off
/// by the head deadline with busbar's 408, logged, as on plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_trickled_over_tls_gets_408_at_the_deadline() {
    let a = Backend::start("a").await;
    let (bus, addr, _dir) = tls_bus_with_limits(&a, "header_timeout = \"1s\"").await;
    let mut tls = connect(addr, Some("localhost")).await.unwrap();
    let start = Instant::now();
    tls.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    // One header byte every 200 ms: pingora's per-read timeout never fires on that.
    let trickle = async {
        for _ in 0..40 {
            if tls.write_all(b"X").await.is_err() || tls.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), trickle)
        .await
        .ok();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    let reply = String::from_utf8_lossy(&out);
    assert!(
        reply.starts_with("HTTP/1.1 408"),
        "{reply:?}\n{}",
        bus.stderr()
    );
    assert!(reply.contains(r#""error":"header_timeout""#), "{reply}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(a.hits(), 0);
    let lines = log_lines(&bus, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["status"], 408);
    assert_eq!(lines[0]["error"], "header_timeout");
    assert_eq!(lines[0]["method"], "GET");
}

/// A head with ambiguous framing over TLS is busbar's 400 with the JSON reason (not
/// pingora's own answer), logged, and reaches no backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_head_over_tls_gets_400_with_the_reason() {
    let a = Backend::start("a").await;
    let (bus, addr, _dir) = tls_bus_with_limits(&a, "header_timeout = \"5s\"").await;
    let smuggle: &[u8] =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let (reply, _) = exchange(addr, Some("localhost"), smuggle).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let body = &reply[reply.find("\r\n\r\n").unwrap() + 4..];
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"], "malformed_request", "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(a.hits(), 0);
    let lines = log_lines(&bus, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["status"], 400);
    assert_eq!(lines[0]["error"], "malformed_request");
}

/// One TLS keep-alive connection carries a bodyless request (busbar's own engine), a
/// request with a body (handed to pingora with the bytes already read put back), and
/// another bodyless one after it: each is answered, and the backend sees them as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_keep_alive_connection_goes_back_and_forth_between_the_engines() {
    let a = Backend::start("a").await;
    let (bus, addr, _dir) = tls_bus_with_limits(&a, "header_timeout = \"5s\"").await;
    let mut tls = connect(addr, Some("localhost")).await.unwrap();
    let mut got = Vec::new();
    let requests: [&[u8]; 3] = [
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /three HTTP/1.1\r\nHost: a\r\n\r\n",
    ];
    for r in requests {
        tls.write_all(r).await.unwrap();
        let answer = read_answer(&mut tls, &mut got).await;
        assert_eq!(status(&answer), 200, "{answer}\n{}", bus.stderr());
    }
    // Pipelined: two at once.
    tls.write_all(b"GET /four HTTP/1.1\r\nHost: a\r\n\r\nGET /five HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..2 {
        let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut tls, &mut got))
            .await
            .unwrap_or_else(|_| panic!("no answer to a pipelined request\n{}", bus.stderr()));
        assert_eq!(status(&answer), 200, "{answer}");
    }
    let seen = a.seen();
    let paths: Vec<_> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/one", "/two", "/three", "/four", "/five"]);
    for s in &seen {
        assert_eq!(s.headers["x-forwarded-proto"], "https", "{}", s.path);
    }
    assert_eq!(seen[1].body, b"hello");
}

/// A TLS client that chose `http/1.1` by ALPN and then speaks HTTP/2 (the preface) is
/// served by the HTTP/2 engine, and the request still says it came over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_a_tls_connection_that_chose_http1_still_says_https() {
    let a = Backend::start("a").await;
    let (bus, addr, _dir) = tls_bus_with_limits(&a, "header_timeout = \"5s\"").await;
    let tls = connect(addr, Some("localhost")).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("https://localhost/h2-over-tls")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", bus.stderr());
    let seen = a.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/h2-over-tls");
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
}

/// The process a graceful upgrade started; killed by pid when the test ends.
struct Upgraded(std::process::Child);

impl Drop for Upgraded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// After a graceful upgrade (pingora accepts on the sockets handed over), a TLS listener
/// still chooses its certificate by SNI, and its connections still go through the front
/// door (a malformed head is busbar's 400) and are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_handed_over_by_an_upgrade_keeps_sni_and_the_front_door() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let default = issue(dir.path(), "default", &["default.test"]);
    let api = issue(dir.path(), "api", &["api.example.com"]);
    let addr = tls_addr();
    let certs = format!(
        ", certs = [{{ cert = \"{}\", key = \"{}\" }}]",
        api.cert.display(),
        api.key.display()
    );
    let mut bus = tls_bus(&a, &tls_line(addr, &default, &certs), addr).await;
    let new = std::process::Command::new(common::bin())
        .args(["run", "-u", "-c"])
        .arg(&bus.config)
        .env("BUSBAR_ADMIN_TOKEN", &bus.token)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("upgraded.stderr")).unwrap())
        .spawn()
        .expect("start busbar --upgrade");
    let _new = Upgraded(new);
    let sock = bus
        .dir
        .path()
        .join(format!("busbar-{}.upgrade.sock", bus.http.port()));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the new process never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.signal(3); // SIGQUIT: hand the sockets over
    assert_eq!(bus.wait_exit(Duration::from_secs(30)).await, Some(0));
    let upgraded = || std::fs::read_to_string(dir.path().join("upgraded.stderr")).unwrap();

    assert_eq!(
        shown(addr, Some("api.example.com")).await,
        api.der,
        "{}",
        upgraded()
    );
    assert_eq!(shown(addr, None).await, default.der);
    let (answer, _) = exchange(addr, Some("api.example.com"), GET).await.unwrap();
    assert_eq!(status(&answer), 200, "{answer}\n{}", upgraded());
    let smuggle: &[u8] =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let (reply, _) = exchange(addr, None, smuggle).await.unwrap();
    assert!(reply.contains(r#""error":"malformed_request""#), "{reply}");
}

/// Connections queued on a TLS listener when the drain starts (their handshake not yet
/// run) are accepted, shaken hands with and answered (`Connection: close`) before the
/// process exits, as on plaintext (D8): none is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_queued_when_the_drain_starts_are_answered() {
    const QUEUED: usize = 50;
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let served = issue(dir.path(), "served", &["localhost"]);
    let addr = tls_addr();
    let mut bus = tls_bus(&a, &tls_line(addr, &served, ""), addr).await;
    bus.signal(19); // SIGSTOP: the connections queue in the kernel
    let clients: Vec<_> = (0..QUEUED)
        .map(|_| {
            tokio::spawn(exchange(
                addr,
                Some("localhost"),
                b"GET /queued HTTP/1.1\r\nHost: a\r\n\r\n",
            ))
        })
        .collect();
    // Their TCP connects complete in the kernel; their ClientHellos wait in the socket.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    bus.signal(15); // SIGTERM
    bus.signal(18); // SIGCONT
    let mut failed = Vec::new();
    for c in clients {
        match c.await.unwrap() {
            Ok((answer, _)) if status(&answer) == 200 => {
                assert!(
                    answer.to_ascii_lowercase().contains("connection: close"),
                    "{answer}"
                );
            }
            Ok((answer, _)) => failed.push(answer),
            Err(e) => failed.push(e.to_string()),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {QUEUED}: {failed:?}",
        failed.len()
    );
    assert_eq!(a.hits(), QUEUED);
    let code = bus.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "exit after drain:\n{}", bus.stderr());
}
