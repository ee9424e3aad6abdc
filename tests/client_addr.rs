//! The real client address behind a load balancer (issue 24 part 1): trusted
//! `X-Forwarded-For` / `Forwarded` hops, PROXY protocol v1/v2, and HAProxy in front.
//! Clients connect from chosen loopback addresses (all of 127/8 is local): 127.0.0.3
//! plays the trusted load balancer, 127.0.0.2 an untrusted client.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::http1::Conn;
use common::{Backend, Busbar};

const LB: &str = "127.0.0.3";
const STRANGER: &str = "127.0.0.2";

/// A client whose connections come from `from`; h2c (prior knowledge) when `h2c`.
fn client_from(from: &str, h2c: bool) -> reqwest::Client {
    let b = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .local_address(from.parse::<IpAddr>().ok());
    let b = if h2c { b.http2_prior_knowledge() } else { b };
    b.build().unwrap()
}

/// One route to `a`, an ACL denying 198.51.100.66 and a client_ip rate limit of one
/// request a minute.
fn limited(a: SocketAddr) -> String {
    format!(
        r#"
[[service]]
name = "s"
endpoints = [{{ addr = "{a}" }}]
[[route]]
name = "all"
service = "s"
[route.admission]
deny = ["198.51.100.66/32"]
rate_limit = {{ rate = "1/m", burst = 1 }}
"#
    )
}

/// Waits until the access log has a line with `needle` (it is flushed every 200 ms).
async fn logged(bus: &Busbar, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if bus.access_log().contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_load_balancers_chain_names_the_client_on_both_paths() {
    let a = Backend::start("a").await;
    let bus = Busbar::start_with_header(
        &limited(a.addr),
        &format!("trusted_proxies = [\"{LB}/32\"]"),
    )
    .await;
    let lb = client_from(LB, false);
    // busbar's own HTTP/1.1 path (a bodyless GET). The client wrote 1.2.3.4 itself;
    // the load balancer appended the address it saw.
    let get = |xff: &'static str| lb.get(bus.url("/x")).header("x-forwarded-for", xff).send();
    let r = get("1.2.3.4, 198.51.100.7").await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = a.seen();
    assert_eq!(
        seen[0].headers["x-forwarded-for"],
        format!("1.2.3.4, 198.51.100.7, {LB}"),
        "the chain goes on with the peer appended"
    );
    assert_eq!(seen[0].headers["forwarded"], format!("for={LB};proto=http"));
    // The rate limit is the client's, not the load balancer's.
    assert_eq!(get("198.51.100.7").await.unwrap().status(), 429);
    assert_eq!(get("198.51.100.8").await.unwrap().status(), 200);
    // The ACL sees the client.
    let r = get("198.51.100.66").await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("client_address"));

    // pingora's path: h2c, and an HTTP/1.1 request with a body.
    let h2 = client_from(LB, true);
    let r = h2
        .get(bus.url("/x"))
        .header("x-forwarded-for", "198.51.100.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        a.seen().last().unwrap().headers["x-forwarded-for"],
        format!("198.51.100.9, {LB}")
    );
    let post = |xff: &'static str| {
        lb.post(bus.url("/x"))
            .header("x-forwarded-for", xff)
            .body("body")
            .send()
    };
    assert_eq!(post("198.51.100.9").await.unwrap().status(), 429);
    assert_eq!(post("198.51.100.10").await.unwrap().status(), 200);
    assert_eq!(post("198.51.100.66").await.unwrap().status(), 403);
    // `Forwarded` names the client when there is no X-Forwarded-For.
    let r = lb
        .get(bus.url("/x"))
        .header("forwarded", "for=\"[2001:db8::7]:4711\";proto=https")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        a.seen().last().unwrap().headers["forwarded"],
        format!("for=\"[2001:db8::7]:4711\";proto=https, for={LB};proto=http")
    );
    for client in [
        "198.51.100.7",
        "198.51.100.9",
        "198.51.100.10",
        "2001:db8::7",
    ] {
        let needle = format!("\"client\":\"{client}\"");
        assert!(
            logged(&bus, &needle).await,
            "{needle}: {}",
            bus.access_log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_peer_cannot_name_another_client() {
    let a = Backend::start("a").await;
    let bus = Busbar::start_with_header(
        &limited(a.addr),
        &format!("trusted_proxies = [\"{LB}/32\"]"),
    )
    .await;
    for h2c in [false, true] {
        let c = client_from(STRANGER, h2c);
        let spoof = |who: &'static str| {
            c.get(bus.url("/x"))
                .header("x-forwarded-for", who)
                .header("forwarded", format!("for={who}"))
                .send()
        };
        let r = spoof("198.51.100.20").await.unwrap();
        if !h2c {
            assert_eq!(r.status(), 200);
            let seen = a.seen();
            let sent = &seen.last().unwrap().headers;
            assert_eq!(sent["x-forwarded-for"], STRANGER, "replaced, not kept");
            assert_eq!(sent["forwarded"], format!("for={STRANGER};proto=http"));
        } else {
            // The stranger's one request a minute is spent, whatever it claims.
            assert_eq!(r.status(), 429);
        }
        assert_eq!(spoof("198.51.100.21").await.unwrap().status(), 429);
        // Denied addresses can't be dodged, nor an allowed one borrowed.
        assert_ne!(spoof("198.51.100.66").await.unwrap().status(), 403);
    }
    assert_eq!(a.seen().len(), 1);
    let needle = format!("\"client\":\"{STRANGER}:");
    assert!(logged(&bus, &needle).await, "{}", bus.access_log());
    assert!(!bus.access_log().contains("198.51.100.2"));
}

/// busbar with `http` listening on its harness address with `proxy_protocol = true`
/// and, when `plain`, a second plain listener (returned), `listen.trusted_proxies` the
/// load balancer; `body` its services and routes.
async fn proxied_bus(body: &str, plain: bool) -> (Busbar, Option<SocketAddr>) {
    let mut bus = Busbar::start(body).await;
    let second: Option<SocketAddr> = plain.then(|| {
        format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap()
    });
    let extra = second.map_or(String::new(), |a| format!(", \"{a}\""));
    let header = bus
        .header(&format!("trusted_proxies = [\"{LB}/32\"]"))
        .replace(
            &format!("http = [\"{}\"]", bus.http),
            &format!(
                "http = [{{ addr = \"{}\", proxy_protocol = true }}{extra}]",
                bus.http
            ),
        );
    let mut text = body.to_string();
    if !text.contains("[registry]") {
        text = format!("[registry]\nlisten = \"{}\"\n\n{text}", bus.registry);
    }
    std::fs::write(&bus.config, format!("{header}{text}")).unwrap();
    bus.kill_and_restart().await;
    (bus, second)
}

/// Connects to `to` from `from`.
async fn connect_from(from: &str, to: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// Sends `bytes` from `from` and reads until the close: what busbar answered.
async fn exchange(from: &str, to: SocketAddr, bytes: &[u8]) -> String {
    let mut c = Conn::new(connect_from(from, to).await);
    c.send(bytes).await.unwrap();
    let (out, closed) = c.read_to_close(Duration::from_secs(15)).await;
    assert!(closed, "busbar neither answered nor closed");
    String::from_utf8_lossy(&out).into_owned()
}

/// A PROXY v2 header for a TCP/IPv4 connection from `src`.
fn v2_header(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&src);
    h.extend_from_slice(&[10, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_is_believed_only_from_trusted_proxies() {
    let a = Backend::start("a").await;
    // A short head deadline: one header below never ends.
    let body = format!("[limits]\nheader_timeout = \"2s\"\n{}", limited(a.addr));
    let (bus, _) = proxied_bus(&body, false).await;
    const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    // v1 from the load balancer, busbar's own HTTP/1.1 path.
    let mut bytes = b"PROXY TCP4 198.51.100.7 10.0.0.1 5000 80\r\n".to_vec();
    bytes.extend_from_slice(GET);
    let answer = exchange(LB, bus.http, &bytes).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        a.seen().last().unwrap().headers["x-forwarded-for"],
        "198.51.100.7"
    );
    // The rate limit is the client's.
    assert!(exchange(LB, bus.http, &bytes)
        .await
        .starts_with("HTTP/1.1 429"));
    // v2, a request with a body (pingora's path), and the ACL.
    let post = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbody";
    let mut bytes = v2_header([198, 51, 100, 8], 5001);
    bytes.extend_from_slice(post);
    let answer = exchange(LB, bus.http, &bytes).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        a.seen().last().unwrap().headers["x-forwarded-for"],
        "198.51.100.8"
    );
    let mut bytes = v2_header([198, 51, 100, 66], 5002);
    bytes.extend_from_slice(GET);
    assert!(exchange(LB, bus.http, &bytes)
        .await
        .starts_with("HTTP/1.1 403"));
    let hits = a.hits();

    // A trusted peer's malformed header, or none, or one that never ends: closed,
    // nothing answered or forwarded.
    for bad in [
        &b"PROXY TCP4 198.51.100.7 10.0.0.1 5000\r\nGET /x HTTP/1.1\r\n\r\n"[..],
        b"PROXY TCP4 bogus 10.0.0.1 5000 80\r\nGET /x HTTP/1.1\r\n\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc6\x33",
        GET,
    ] {
        assert_eq!(exchange(LB, bus.http, bad).await, "", "{bad:?}");
    }
    // A stranger's header: closed. Its plain request: served as its own.
    let mut bytes = b"PROXY TCP4 198.51.100.9 10.0.0.1 5000 80\r\n".to_vec();
    bytes.extend_from_slice(GET);
    assert_eq!(exchange(STRANGER, bus.http, &bytes).await, "");
    let mut bytes = v2_header([198, 51, 100, 9], 5003);
    bytes.extend_from_slice(GET);
    assert_eq!(exchange(STRANGER, bus.http, &bytes).await, "");
    assert_eq!(a.hits(), hits, "nothing forwarded");
    let answer = exchange(STRANGER, bus.http, GET).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        a.seen().last().unwrap().headers["x-forwarded-for"],
        STRANGER
    );
    for (needle, want) in [
        ("\"client\":\"198.51.100.7:5000\"", true),
        ("\"client\":\"198.51.100.8:5001\"", true),
        ("198.51.100.9", false),
    ] {
        assert_eq!(
            logged(&bus, needle).await,
            want,
            "{needle}: {}",
            bus.access_log()
        );
    }
    let m = bus.metrics().await;
    let refused = |reason: &str| {
        common::metric_value(
            &m,
            &format!("busbar_edge_refusals_total{{reason=\"proxy_protocol_{reason}\"}}"),
        )
    };
    assert_eq!(refused("untrusted"), 2.0);
    assert_eq!(refused("malformed"), 3.0);
    assert_eq!(refused("timeout"), 1.0);
}

/// HAProxy from Debian in front, as an operator runs it: `send-proxy-v2` to the
/// PROXY-protocol listener (TCP mode), `option forwardfor` to a plain one (HTTP mode),
/// connecting to busbar from the trusted address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_with_proxy_v2_and_forwardfor() {
    let a = Backend::start("a").await;
    let (bus, plain) = proxied_bus(&limited(a.addr), true).await;
    let plain = plain.unwrap();
    let (pp_port, xff_port) = (common::free_port(), common::free_port());
    let cfg = bus.dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            r#"global
  maxconn 100
defaults
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend pp
  mode tcp
  bind 127.0.0.1:{pp_port}
  default_backend busbar_pp
backend busbar_pp
  mode tcp
  server bus {pp} send-proxy-v2 source {LB}
frontend xff
  mode http
  bind 127.0.0.1:{xff_port}
  option forwardfor
  default_backend busbar_xff
backend busbar_xff
  mode http
  server bus {plain} source {LB}
"#,
            pp = bus.http,
        ),
    )
    .unwrap();
    let mut haproxy = common::daemon::Daemon::new(
        "haproxy",
        [
            std::ffi::OsString::from("-db"),
            "-f".into(),
            cfg.clone().into(),
        ],
        bus.dir.path().join("haproxy.log"),
        "HAProxy (Debian: apt-get install haproxy)",
    );
    haproxy.start();
    let pp: SocketAddr = format!("127.0.0.1:{pp_port}").parse().unwrap();
    let xff: SocketAddr = format!("127.0.0.1:{xff_port}").parse().unwrap();
    common::daemon::wait_until(
        "haproxy",
        Duration::from_secs(15),
        Duration::from_millis(50),
        || async {
            std::net::TcpStream::connect(pp).is_ok() && std::net::TcpStream::connect(xff).is_ok()
        },
    )
    .await;

    let url = |at: SocketAddr| format!("http://{at}/x");
    // Through PROXY v2: busbar sees the client that connected to HAProxy.
    let r = client_from(STRANGER, false)
        .get(url(pp))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", haproxy.log());
    assert_eq!(
        a.seen().last().unwrap().headers["x-forwarded-for"],
        STRANGER
    );
    let r = client_from(STRANGER, false)
        .get(url(pp))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "the limit is the client's, not HAProxy's");
    // Through `option forwardfor`: the chain HAProxy wrote, with HAProxy appended.
    let client = "127.0.0.4";
    let r = client_from(client, false)
        .get(url(xff))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", haproxy.log());
    assert_eq!(
        a.seen().last().unwrap().headers["x-forwarded-for"],
        format!("{client}, {LB}")
    );
    // A client's own X-Forwarded-For through HAProxy names nobody else.
    let r = client_from(client, false)
        .get(url(xff))
        .header("x-forwarded-for", "198.51.100.30")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "still {client}'s limit");
    let needle = format!("\"client\":\"{STRANGER}:");
    assert!(logged(&bus, &needle).await, "{}", bus.access_log());
    let needle = format!("\"client\":\"{client}\"");
    assert!(logged(&bus, &needle).await, "{}", bus.access_log());
    assert!(!bus.access_log().contains("\"client\":\"198.51.100.30\""));
    haproxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_trusted_proxies_to_headers_and_proxy_protocol() {
    let a = Backend::start("a").await;
    let (bus, _) = proxied_bus(&limited(a.addr), false).await;
    const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.40\r\nConnection: close\r\n\r\n";
    let mut proxied = b"PROXY TCP4 198.51.100.41 10.0.0.1 5000 80\r\n".to_vec();
    proxied.extend_from_slice(GET);
    assert!(exchange(LB, bus.http, &proxied)
        .await
        .starts_with("HTTP/1.1 200"));
    assert_eq!(
        a.seen().last().unwrap().headers["x-forwarded-for"],
        "198.51.100.41"
    );
    let text = std::fs::read_to_string(&bus.config).unwrap();
    let trusted = format!("trusted_proxies = [\"{LB}/32\"]");
    assert!(text.contains(&trusted));
    std::fs::write(
        &bus.config,
        text.replace(&trusted, "trusted_proxies = [\"192.0.2.0/24\"]"),
    )
    .unwrap();
    let v: serde_json::Value = bus.reload().await.json().await.unwrap();
    assert_eq!(v["not_applied"], serde_json::json!([]), "{v}");
    // The load balancer is a stranger now: its header closes the connection, and its
    // plain request is its own.
    assert_eq!(exchange(LB, bus.http, &proxied).await, "");
    let answer = exchange(LB, bus.http, GET).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(a.seen().last().unwrap().headers["x-forwarded-for"], LB);
}

/// A TLS client that trusts `cert_pem` and offers `alpn`, on a connection from `from` that
/// first sends `preface` (a PROXY header, or nothing); the answer to `request`, or `Err`
/// when busbar closed the connection (or failed the handshake).
async fn tls_exchange(
    from: &str,
    to: SocketAddr,
    cert_der: rustls_pki::CertificateDer<'static>,
    preface: &[u8],
    request: &[u8],
) -> Result<String, std::io::Error> {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut tcp = connect_from(from, to).await;
    tcp.write_all(preface).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = tokio::time::timeout(Duration::from_secs(15), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))??;
    tls.write_all(request).await?;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut out)).await;
    match read {
        Ok(Ok(_)) => Ok(String::from_utf8_lossy(&out).into_owned()),
        // A close without close_notify after a full answer is still the answer.
        Ok(Err(_)) if !out.is_empty() => Ok(String::from_utf8_lossy(&out).into_owned()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("no answer")),
    }
}

use tokio_rustls::rustls::pki_types as rustls_pki;

/// busbar with a TLS listener (returned, with its certificate) and the harness's plain
/// one, both with `proxy_protocol`, trusting the load balancer; `body` its routes.
async fn tls_proxied_bus(body: &str) -> (Busbar, SocketAddr, rustls_pki::CertificateDer<'static>) {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let tls: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let mut bus = Busbar::start(body).await;
    let (cert, key) = (
        bus.dir.path().join("busbar.crt"),
        bus.dir.path().join("busbar.key"),
    );
    std::fs::write(&cert, issued.cert.pem()).unwrap();
    std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
    let extra = format!(
        "trusted_proxies = [\"{LB}/32\"]\ntls = [{{ addr = \"{tls}\", cert = \"{}\", key = \"{}\", proxy_protocol = true }}]",
        cert.display(),
        key.display()
    );
    let header = bus.header(&extra).replace(
        &format!("http = [\"{}\"]", bus.http),
        &format!(
            "http = [{{ addr = \"{}\", proxy_protocol = true }}]",
            bus.http
        ),
    );
    std::fs::write(
        &bus.config,
        format!(
            "{header}[registry]\nlisten = \"{}\"\n\n{body}",
            bus.registry
        ),
    )
    .unwrap();
    bus.kill_and_restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(tls).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "TLS listener not up:\n{}",
            bus.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (bus, tls, issued.cert.der().clone())
}

/// A TLS listener with `proxy_protocol`: the PROXY header (v1 and v2) is read before the
/// handshake from a trusted load balancer, and names the client upstream and in the
/// access log; a stranger's header, or a trusted peer's TLS without one, is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_on_a_tls_listener_comes_before_the_handshake() {
    let a = Backend::start("a").await;
    let (bus, tls, cert_der) = tls_proxied_bus(&limited(a.addr)).await;
    const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

    let v1 = b"PROXY TCP4 198.51.100.7 10.0.0.1 5000 443\r\n";
    let answer = tls_exchange(LB, tls, cert_der.clone(), v1, GET)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = a.seen().last().unwrap().clone();
    assert_eq!(seen.headers["x-forwarded-for"], "198.51.100.7");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    // v2, from another client: its own rate limit (the first's is spent).
    let answer = tls_exchange(
        LB,
        tls,
        cert_der.clone(),
        &v2_header([198, 51, 100, 8], 5001),
        GET,
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        a.seen().last().unwrap().headers["x-forwarded-for"],
        "198.51.100.8"
    );
    let hits = a.hits();
    // A stranger's header, and a trusted peer's TLS with no header: no answer.
    assert!(tls_exchange(STRANGER, tls, cert_der.clone(), v1, GET)
        .await
        .is_err());
    assert!(tls_exchange(LB, tls, cert_der.clone(), b"", GET)
        .await
        .is_err());
    assert_eq!(a.hits(), hits, "nothing forwarded");
    assert!(
        logged(&bus, "\"client\":\"198.51.100.7:5000\"").await,
        "{}",
        bus.access_log()
    );
    let untrusted = common::metric_value(
        &bus.metrics().await,
        "busbar_edge_refusals_total{reason=\"proxy_protocol_untrusted\"}",
    );
    assert_eq!(untrusted, 1.0);
}

const SIGQUIT: i32 = 3;

/// `busbar run --upgrade` on `bus`'s config; SIGQUIT to `bus` once the new process waits
/// for the sockets. The new process, killed (by its pid) when dropped.
struct Upgraded(std::process::Child);

impl Drop for Upgraded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn upgrade(bus: &mut Busbar) -> Upgraded {
    let child = std::process::Command::new(common::bin())
        .args(["run", "-u", "-c"])
        .arg(&bus.config)
        .env("BUSBAR_ADMIN_TOKEN", &bus.token)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(bus.dir.path().join("upgraded.stderr")).unwrap())
        .spawn()
        .expect("start busbar --upgrade");
    let new = Upgraded(child);
    let sock = bus
        .dir
        .path()
        .join(format!("busbar-{}.upgrade.sock", bus.http.port()));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the new process never waited for the sockets"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.signal(SIGQUIT);
    assert_eq!(
        bus.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        bus.stderr()
    );
    new
}

/// After a graceful upgrade, the listeners handed over keep `proxy_protocol`: the new
/// process (pingora accepts for it) reads the PROXY header on the plain listener, and
/// before the handshake on the TLS one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_handed_over_by_an_upgrade_keep_proxy_protocol() {
    let a = Backend::start("a").await;
    let (mut bus, tls, cert_der) = tls_proxied_bus(&limited(a.addr)).await;
    let _new = upgrade(&mut bus).await;
    let upgraded =
        || std::fs::read_to_string(bus.dir.path().join("upgraded.stderr")).unwrap_or_default();
    const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let mut bytes = v2_header([198, 51, 100, 20], 6000);
    bytes.extend_from_slice(GET);
    let answer = exchange(LB, bus.http, &bytes).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n{}",
        upgraded()
    );
    assert_eq!(
        a.seen().last().unwrap().headers["x-forwarded-for"],
        "198.51.100.20"
    );
    let v1 = b"PROXY TCP4 198.51.100.21 10.0.0.1 6001 443\r\n";
    let answer = tls_exchange(LB, tls, cert_der.clone(), v1, GET).await;
    let answer = answer.unwrap_or_else(|e| panic!("{e}\n{}", upgraded()));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = a.seen().last().unwrap().clone();
    assert_eq!(seen.headers["x-forwarded-for"], "198.51.100.21");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    // A stranger's header is still refused on both.
    assert_eq!(exchange(STRANGER, bus.http, &bytes).await, "");
    assert!(tls_exchange(STRANGER, tls, cert_der, v1, GET)
        .await
        .is_err());
}
