//! An HTTPS backend with a self-signed certificate for a given name, self-signed
//! certificate files for busbar's own TLS listeners, and clients that trust any server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;

/// A fresh self-signed certificate for `names` and its key, written as PEM into `dir`
/// (`s.crt`, `s.key`): what a `listen.tls` entry of a test's busbar points at.
pub fn self_signed_files(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let (cert, key) = (dir.join("s.crt"), dir.join("s.key"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A busbar on `body` with a TLS listener besides its plaintext one: a free loopback port
/// serving a fresh self-signed certificate for `localhost`, its files in `certs` (which
/// the caller keeps). Returned once that port accepts, with its address and the
/// certificate's PEM (for a client that trusts it).
pub async fn busbar_with_tls(body: &str, certs: &Path) -> (super::Busbar, SocketAddr, String) {
    let (cert, key) = self_signed_files(certs, &["localhost"]);
    let cert_pem = std::fs::read_to_string(&cert).unwrap();
    let tls: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
    let entry = format!(
        "tls = [{{ addr = \"{tls}\", cert = \"{}\", key = \"{}\" }}]",
        cert.display(),
        key.display()
    );
    let bus = super::Busbar::start_with_header(body, &entry).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(tls).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "TLS listener not up:\n{}",
            bus.stderr()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (bus, tls, cert_pem)
}

pub struct TlsBackend {
    pub addr: SocketAddr,
    pub cert_pem: String,
    task: JoinHandle<()>,
}

impl TlsBackend {
    /// Answers `tls ok: <path>` over HTTPS for `name`.
    pub async fn start(name: &str) -> TlsBackend {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let cert_pem = cert.cert.pem();
        let cert_der = cert.cert.der().clone();
        let key_der =
            rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                                format!("tls ok: {}", req.uri().path()),
                            ))))
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        TlsBackend {
            addr,
            cert_pem,
            task,
        }
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS client config that takes whatever certificate the server shows (tests that look
/// at the answer, or at which certificate it is), offering `alpn`.
pub fn trusting_client(alpn: &[&[u8]]) -> rustls::ClientConfig {
    trusting_client_of(rustls::DEFAULT_VERSIONS, alpn)
}

/// [`trusting_client`] speaking only the TLS `versions` given.
pub fn trusting_client_of(
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Takes whatever certificate the server shows.
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
