//! TLS to instances (`protocol = "https"`, `[service.tls]`, `"tls": true` registrations):
//! verified with a CA file on busbar's own engine and on pingora's path (an h2c client:
//! pingora serves h2 downstream), mTLS, verification failures answered 502 with their reason, the
//! `insecure_skip_verify` escape hatch and its warning, health probes over TLS, and
//! pooled TLS connections.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{client, sha256_hex, Busbar};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A test PKI in a temp folder: a CA, a server certificate it signed for `localhost` and
/// `127.0.0.1`, a client certificate it signed, and a second CA that signed nothing.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    server: (CertificateDer<'static>, PrivateKeyDer<'static>),
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = issuer("busbar test CA");
        let other = issuer("another CA");
        let leaf = |names: Vec<String>, cn: &str| {
            let mut p = CertificateParams::new(names).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca).unwrap();
            (cert, key)
        };
        let (server, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "server");
        let (client_cert, client_key) = leaf(vec!["busbar-client".into()], "busbar");
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        write("other-ca.pem", other.pem());
        write("client.pem", client_cert.pem());
        write("client.key", client_key.serialize_pem());
        Pki {
            ca: ca.der().clone(),
            server: (
                server.der().clone(),
                PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
            ),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn issuer(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, cn);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// What the TLS backend saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    body: Vec<u8>,
    /// The SNI the client sent, if any.
    sni: Option<String>,
    /// The client showed a certificate.
    client_cert: bool,
}

#[derive(Default)]
struct Record {
    /// Completed TLS handshakes (one per connection).
    handshakes: AtomicUsize,
    /// Of those, the ones that resumed an earlier session.
    resumed: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
}

/// An HTTPS (HTTP/1.1) backend with the PKI's server certificate; with `require_client`,
/// it refuses a client without a certificate signed by the PKI's CA.
struct TlsServer {
    addr: SocketAddr,
    record: Arc<Record>,
    task: JoinHandle<()>,
}

impl TlsServer {
    async fn start(pki: &Pki, require_client: bool) -> TlsServer {
        Self::start_with(pki, require_client, true).await
    }

    /// With `keep_alive = false`, each connection closes after one response.
    async fn start_with(pki: &Pki, require_client: bool, keep_alive: bool) -> TlsServer {
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap();
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(pki.ca.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let (cert, key) = (pki.server.0.clone(), pki.server.1.clone_key());
        let mut config = builder.with_single_cert(vec![cert], key).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Arc::new(Record::default());
        let r = record.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, r) = (acceptor.clone(), r.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    r.handshakes.fetch_add(1, SeqCst);
                    let (_, session) = tls.get_ref();
                    if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        r.resumed.fetch_add(1, SeqCst);
                    }
                    let sni = session.server_name().map(str::to_string);
                    let client_cert = session.peer_certificates().is_some_and(|c| !c.is_empty());
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (r, sni) = (r.clone(), sni.clone());
                            async move {
                                let method = req.method().to_string();
                                let path = req.uri().path().to_string();
                                if path.contains("/slow") {
                                    // busbar's writes block meanwhile.
                                    tokio::time::sleep(Duration::from_millis(500)).await;
                                }
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes().to_vec())
                                    .unwrap_or_default();
                                let answer = format!("tls ok: {method} {path} {}", body.len());
                                r.seen.lock().unwrap().push(Seen {
                                    method,
                                    path,
                                    body,
                                    sni,
                                    client_cert,
                                });
                                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                                    answer,
                                ))))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        TlsServer { addr, record, task }
    }

    fn handshakes(&self) -> usize {
        self.record.handshakes.load(SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.record.seen.lock().unwrap().clone()
    }

    /// Requests seen, health probes excluded.
    fn requests(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path != "/healthz")
            .collect()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A service `name` with one route `/{name}/` to it.
fn service(name: &str, addr: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[[service]]
name = "{name}"
protocol = "https"
endpoints = [{{ addr = "{addr}" }}]
{extra}
[[route]]
name = "{name}"
path_prefix = "/{name}/"
service = "{name}"
"#
    )
}

fn tls_table(lines: &str) -> String {
    format!("[service.tls]\n{lines}\n")
}

fn ca_line(p: &Path) -> String {
    format!("ca_file = \"{}\"", p.display())
}

/// A client that speaks h2c by prior knowledge: busbar hands it to pingora's proxy, so
/// its requests take pingora's upstream path.
fn h2c() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

async fn error_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, v["error"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
async fn an_https_upstream_verified_with_a_ca_file_answers_get_and_post() {
    let pki = Pki::new();
    let up = TlsServer::start(&pki, false).await;
    let ca = ca_line(&pki.path("ca.pem"));
    // By IP (the certificate lists 127.0.0.1), and by a configured server name.
    let body = service("byip", up.addr, &tls_table(&ca))
        + &service(
            "byname",
            up.addr,
            &tls_table(&format!("{ca}\nserver_name = \"localhost\"")),
        );
    let bus = Busbar::start(&body).await;
    let r = client().get(bus.url("/byip/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tls ok: GET /byip/a 0");
    let r = client().get(bus.url("/byname/b")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // pingora's path: TLS there too.
    let r = h2c()
        .post(bus.url("/byname/c"))
        .body(vec![b'x'; 3000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tls ok: POST /byname/c 3000");
    let r = h2c()
        .post(bus.url("/byip/d"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.requests();
    let sni = |path: &str| {
        seen.iter()
            .find(|s| s.path == path)
            .unwrap_or_else(|| panic!("{path} reached the backend: {seen:?}"))
            .sni
            .clone()
    };
    // An IP address is never sent as SNI; a name is.
    assert_eq!(sni("/byip/a"), None);
    assert_eq!(sni("/byname/b").as_deref(), Some("localhost"));
    assert_eq!(sni("/byname/c").as_deref(), Some("localhost"));
    assert_eq!(sni("/byip/d"), None);
    let c = seen.iter().find(|s| s.path == "/byname/c").unwrap();
    assert_eq!((c.method.as_str(), c.body.len()), ("POST", 3000));
}

/// A body larger than what busbar holds streams through the TLS session whole, on a
/// pooled connection, also to a backend slow to start reading (busbar's writes block).
#[tokio::test]
async fn a_large_body_streams_over_tls() {
    let pki = Pki::new();
    let up = TlsServer::start(&pki, false).await;
    let body = service("s", up.addr, &tls_table(&ca_line(&pki.path("ca.pem"))));
    let bus = Busbar::start(&body).await;
    let big: Vec<u8> = (0..9_500_000u32).map(|i| (i % 251) as u8).collect();
    for i in 0..2 {
        let r = client()
            .post(bus.url(&format!("/s/slow{i}")))
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.text().await.unwrap(),
            format!("tls ok: POST /s/slow{i} 9500000")
        );
    }
    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|s| s.body == big),
        "the bytes arrived as sent"
    );
    assert_eq!(up.handshakes(), 1, "the second body reused the connection");
}

#[tokio::test]
async fn sequential_requests_share_one_tls_connection() {
    let pki = Pki::new();
    let up = TlsServer::start(&pki, false).await;
    let body = service("s", up.addr, &tls_table(&ca_line(&pki.path("ca.pem"))));
    let bus = Busbar::start(&body).await;
    for i in 0..5 {
        let r = client()
            .get(bus.url(&format!("/s/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), format!("tls ok: GET /s/{i} 0"));
    }
    assert_eq!(up.requests().len(), 5);
    assert_eq!(up.handshakes(), 1, "one TLS connection for five requests");
    assert_eq!(
        bus.metric("busbar_upstream_connections_total{from=\"pool\",service=\"s\"}")
            .await,
        4.0
    );
}

/// New connections resume the TLS session of an earlier one: the service's client
/// configuration (and its session cache) is built once, not per connection.
#[tokio::test]
async fn new_tls_connections_resume_the_session() {
    let pki = Pki::new();
    let up = TlsServer::start_with(&pki, false, false).await;
    let body = service("s", up.addr, &tls_table(&ca_line(&pki.path("ca.pem"))));
    let bus = Busbar::start(&body).await;
    for i in 0..3 {
        let r = client()
            .get(bus.url(&format!("/s/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(up.handshakes(), 3, "the backend closes every connection");
    assert_eq!(
        up.record.resumed.load(SeqCst),
        2,
        "the second and third resumed"
    );
}

#[tokio::test]
async fn an_mtls_upstream_takes_busbar_only_with_its_client_certificate() {
    let pki = Pki::new();
    let up = TlsServer::start(&pki, true).await;
    let ca = ca_line(&pki.path("ca.pem"));
    let with_cert = format!(
        "{ca}\ncert = \"{}\"\nkey = \"{}\"",
        pki.path("client.pem").display(),
        pki.path("client.key").display()
    );
    let body =
        service("anon", up.addr, &tls_table(&ca)) + &service("me", up.addr, &tls_table(&with_cert));
    let bus = Busbar::start(&body).await;
    let r = client().get(bus.url("/anon/x")).send().await.unwrap();
    assert_eq!(r.status(), 502, "refused without a client certificate");
    let r = client().get(bus.url("/me/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tls ok: GET /me/x 0");
    // pingora's path sends the client certificate too.
    let r = h2c().post(bus.url("/me/y")).body("b").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = h2c()
        .post(bus.url("/anon/y"))
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let seen = up.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen
        .iter()
        .all(|s| s.client_cert && s.path.starts_with("/me/")));
}

#[tokio::test]
async fn a_certificate_that_does_not_verify_is_a_502_that_says_so() {
    let pki = Pki::new();
    let up = TlsServer::start(&pki, false).await;
    let wrong_ca = tls_table(&ca_line(&pki.path("other-ca.pem")));
    let wrong_name = tls_table(&format!(
        "{}\nserver_name = \"orders.example\"",
        ca_line(&pki.path("ca.pem"))
    ));
    let body = service("wrongca", up.addr, &wrong_ca) + &service("wrongname", up.addr, &wrong_name);
    let bus = Busbar::start(&body).await;
    for path in ["/wrongca/a", "/wrongname/a"] {
        let r = client().get(bus.url(path)).send().await.unwrap();
        assert_eq!(
            error_code(r).await,
            (502, "upstream_certificate_rejected".to_string()),
            "{path}"
        );
        // pingora's path says the same.
        let r = h2c().get(bus.url(path)).send().await.unwrap();
        assert_eq!(
            error_code(r).await,
            (502, "upstream_certificate_rejected".to_string()),
            "{path} on pingora's path"
        );
    }
    assert!(up.requests().is_empty(), "nothing reached the backend");
    let logged = common::eventually(Duration::from_secs(10), || {
        bus.access_log()
            .lines()
            .filter(|l| l.contains("upstream_certificate_rejected"))
            .count()
            >= 4
    })
    .await;
    assert!(
        logged,
        "the access log names the reason:\n{}",
        bus.access_log()
    );
    // Counted as connect failures (and as certificate failures).
    assert!(
        bus.metric("busbar_upstream_connect_failures_total{service=\"wrongca\"}")
            .await
            >= 2.0
    );
    assert!(
        bus.metric("busbar_upstream_errors_total{cause=\"certificate\",service=\"wrongname\"}")
            .await
            >= 2.0
    );
}

#[tokio::test]
async fn insecure_skip_verify_reaches_any_certificate_and_is_warned_about() {
    let pki = Pki::new();
    let up = TlsServer::start(&pki, false).await;
    let body = service("lax", up.addr, &tls_table("insecure_skip_verify = true"));
    let bus = Busbar::start(&body).await;
    let r = client().get(bus.url("/lax/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = h2c()
        .post(bus.url("/lax/b"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        bus.stderr().contains("insecure_skip_verify = true"),
        "logged at load:\n{}",
        bus.stderr()
    );
    let out = std::process::Command::new(common::bin())
        .arg("check")
        .arg(&bus.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning:") && err.contains("insecure_skip_verify = true"),
        "{err}"
    );
}

#[tokio::test]
async fn health_probes_go_over_tls_with_the_services_settings() {
    let pki = Pki::new();
    let up = TlsServer::start(&pki, false).await;
    let health = "[service.health]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"2s\"\nhealthy_threshold = 1\nunhealthy_threshold = 2\n";
    let good = format!("{health}{}", tls_table(&ca_line(&pki.path("ca.pem"))));
    let bad = format!("{health}{}", tls_table(&ca_line(&pki.path("other-ca.pem"))));
    let body = service("good", up.addr, &good) + &service("bad", up.addr, &bad);
    let bus = Busbar::start(&body).await;
    let probed = common::eventually(Duration::from_secs(15), || {
        up.seen().iter().filter(|s| s.path == "/healthz").count() >= 3
    })
    .await;
    assert!(probed, "probes reached the TLS backend: {:?}", up.seen());
    let mut unhealthy = 0.0;
    for _ in 0..150 {
        unhealthy = bus
            .metric("busbar_instances{service=\"bad\",state=\"unhealthy\"}")
            .await;
        if unhealthy == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(unhealthy, 1.0, "a probe that does not verify fails");
    assert_eq!(
        bus.metric("busbar_instances{service=\"good\",state=\"healthy\"}")
            .await,
        1.0
    );
    let r = client().get(bus.url("/good/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

const TOKEN: &str = "tls-registration-token";

#[tokio::test]
async fn a_registered_instance_that_says_tls_is_reached_over_tls() {
    let pki = Pki::new();
    let up = TlsServer::start(&pki, false).await;
    let body = format!(
        r#"
[registry]
listen = "{{registry}}"
[[registry.token]]
token_sha256 = "{token}"
services = ["reg", "sec", "grpc"]

[[service]]
name = "reg"
registration = true
[service.tls]
{ca}
[[route]]
name = "reg"
path_prefix = "/reg/"
service = "reg"

[[service]]
name = "sec"
protocol = "https"
registration = true
[service.tls]
{ca}
[[route]]
name = "sec"
path_prefix = "/sec/"
service = "sec"

[[service]]
name = "grpc"
protocol = "h2c"
registration = true
[[route]]
name = "grpc"
path_prefix = "/grpc/"
service = "grpc"
"#,
        token = sha256_hex(TOKEN),
        ca = ca_line(&pki.path("ca.pem")),
    );
    let bus = Busbar::start(&body).await;
    let register = |service: &'static str, id: &'static str, body: Value| {
        let url = bus.registry_url(&format!("/v1/services/{service}/instances/{id}"));
        async move {
            client()
                .put(url)
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let addr = up.addr.to_string();
    let r = register("reg", "a", json!({"address": addr, "tls": true})).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = client().get(bus.url("/reg/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tls ok: GET /reg/x 0");
    let r = h2c()
        .post(bus.url("/reg/y"))
        .body("z")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.requests().len(), 2);
    // What the bus knows says so.
    let v: Value = client()
        .get(bus.registry_url("/v1/services/reg"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["instances"][0]["tls"], json!(true), "{v}");

    // Malformed, or against the service's protocol: 400 naming the field. (An h2c
    // service's instance may say `"tls": true`: `tests/h2_upstream.rs`.)
    for (service, body) in [
        ("reg", json!({"address": addr, "tls": "yes"})),
        ("sec", json!({"address": addr, "tls": false})),
    ] {
        let r = register(service, "b", body.clone()).await;
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (status, v["field"].as_str()),
            (400, Some("tls")),
            "{body}: {v}"
        );
    }
    // An https service's instance that says nothing is reached over TLS.
    let r = register("sec", "c", json!({"address": addr})).await;
    assert_eq!(r.status(), 200);
    let r = client().get(bus.url("/sec/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn unusable_tls_settings_are_refused_with_their_place() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let check = |service_tls: &str| {
        let path = dir.path().join("busbar.toml");
        std::fs::write(
            &path,
            format!(
                "[listen]\nhttp = [\"127.0.0.1:1\"]\n[[service]]\nname = \"s\"\nprotocol = \"https\"\nendpoints = [{{ addr = \"127.0.0.1:2\" }}]\n[service.tls]\n{service_tls}\n[[route]]\nname = \"r\"\nservice = \"s\"\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(common::bin())
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let missing = pki.path("missing.pem");
    let (ok, err) = check(&ca_line(&missing));
    assert!(!ok);
    assert!(
        err.contains(":8:") && err.contains("ca_file") && err.contains("cannot read"),
        "{err}"
    );
    let (ok, err) = check(&format!("cert = \"{}\"", pki.path("client.pem").display()));
    assert!(!ok);
    assert!(err.contains("tls.cert needs tls.key"), "{err}");
    let (ok, err) = check(&format!(
        "cert = \"{}\"\nkey = \"{}\"",
        pki.path("client.pem").display(),
        pki.path("ca.pem").display()
    ));
    assert!(!ok);
    assert!(err.contains(":9:") && err.contains("key"), "{err}");
    let (ok, err) = check("server_name = \"not a name\"");
    assert!(!ok);
    assert!(err.contains("tls.server_name"), "{err}");
    let (ok, err) = check(&ca_line(&pki.path("ca.pem")));
    assert!(ok, "{err}");
}

/// A reload to a CA file that cannot be read is refused; the running one keeps serving.
#[tokio::test]
async fn a_reload_to_an_unreadable_ca_file_is_refused() {
    let pki = Pki::new();
    let up = TlsServer::start(&pki, false).await;
    let good = service("s", up.addr, &tls_table(&ca_line(&pki.path("ca.pem"))));
    let bus = Busbar::start(&good).await;
    let bad = service("s", up.addr, &tls_table(&ca_line(&pki.path("gone.pem"))));
    bus.write_config(&bad, "");
    let r = bus.reload().await;
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(!status.is_success(), "{status}: {text}");
    assert!(
        text.contains("gone.pem") && text.contains("cannot read"),
        "{text}"
    );
    let r = client().get(bus.url("/s/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
