//! TLS to a service's instances (`protocol = "https"`, `[service.tls]`): the CA, the
//! client certificate and the verification settings, read and built once per load.
//!
//! Owns: `[service.tls]` → [`UpstreamTls`]: the rustls `ClientConfig` busbar's own engine
//! and the health probes connect with (one per service and load, so its in-memory
//! session cache resumes sessions across connections), and the same roots and client
//! certificate in the form pingora's `HttpPeer` takes; why a file can't be used.
//! Must not: connect (the drivers and the health checker do) or pick names per instance
//! (`model`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use pingora_core::protocols::tls::CaType;
use pingora_core::utils::tls::{CertKey, WrappedX509};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use toml::Spanned;

use super::file::UpstreamTlsFile;
use super::validate::Validator;
use super::Protocol;

/// What busbar offers in ALPN to an HTTP/1 service's instances (`https`, registered
/// `http1` ones over TLS): HTTP/1.1 only, the protocol its engine speaks to them.
const ALPN_HTTP1: &[u8] = b"http/1.1";
/// What busbar offers to an HTTP/2 service's instances (`h2`, registered `h2c` ones over
/// TLS): h2 only, so a server that cannot speak it fails the handshake rather than
/// answering HTTP/1.1 to an HTTP/2 preface.
const ALPN_H2: &[u8] = b"h2";

/// How busbar reaches a service's TLS instances.
#[derive(Debug)]
pub struct UpstreamTls {
    /// `server_name`: the SNI sent and the name the certificate must carry, for every
    /// instance. `None`: each instance's endpoint host name, or its IP address.
    pub server_name: Option<ServerName<'static>>,
    /// `insecure_skip_verify = true`: any certificate is accepted (logged at every load).
    pub insecure_skip_verify: bool,
    /// busbar's own engine's and the health probes' client configuration.
    pub client: Arc<ClientConfig>,
    /// `ca_file` in pingora's form; `None`: the system roots (pingora's connector default).
    pub ca: Option<Arc<CaType>>,
    /// `cert` + `key` in pingora's form.
    pub client_cert: Option<Arc<CertKey>>,
    /// Unique per build: pooled connections made with one configuration are never
    /// handed to another's (a reload that changes the CA or the client certificate).
    pub id: u64,
}

/// The `[service.tls]` settings, read from the file and resolved to paths.
pub(super) struct TlsSettings<'a> {
    pub server_name: Option<ServerName<'static>>,
    pub ca_file: Option<&'a Path>,
    pub identity: Option<(&'a Path, &'a Path)>,
    pub insecure_skip_verify: bool,
    /// The instances speak HTTP/2 (ALPN `h2`), else HTTP/1.1.
    pub h2: bool,
}

/// Which setting a problem is in, so the error points at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    CaFile,
    Cert,
    Key,
}

/// Builds a service's TLS client. `roots` are the system's CA certificates, used when
/// there is no `ca_file`.
pub(super) fn build(
    s: &TlsSettings<'_>,
    roots: &Arc<RootCertStore>,
) -> Result<UpstreamTls, (Field, String)> {
    static IDS: AtomicU64 = AtomicU64::new(1);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (store, ca) = match s.ca_file {
        Some(path) => {
            let (store, ca) = load_ca(path).map_err(|e| (Field::CaFile, e))?;
            (Arc::new(store), Some(ca))
        }
        None => (roots.clone(), None),
    };
    let identity = match s.identity {
        Some((cert, key)) => Some(load_client_cert(cert, key)?),
        None => None,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| (Field::CaFile, format!("no TLS version available: {e}")))?;
    let builder = if s.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    } else {
        builder.with_root_certificates(store)
    };
    let (mut client, client_cert) = match identity {
        Some((chain, key, cert_key)) => (
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| (Field::Key, format!("unusable client certificate: {e}")))?,
            Some(Arc::new(cert_key)),
        ),
        None => (builder.with_no_client_auth(), None),
    };
    client.alpn_protocols = vec![if s.h2 { ALPN_H2 } else { ALPN_HTTP1 }.to_vec()];
    Ok(UpstreamTls {
        server_name: s.server_name.clone(),
        insecure_skip_verify: s.insecure_skip_verify,
        client: Arc::new(client),
        ca,
        client_cert,
        id: IDS.fetch_add(1, Relaxed),
    })
}

/// The system's CA certificates (the OS store, or `SSL_CERT_FILE`/`SSL_CERT_DIR`), as
/// pingora's connector loads them. Certificates that do not parse are skipped; an empty
/// store means nothing will verify, which the caller reports.
pub(super) fn system_roots() -> Arc<RootCertStore> {
    let mut store = RootCertStore::empty();
    if let Ok(certs) = rustls_native_certs::load_native_certs() {
        store.add_parsable_certificates(certs);
    }
    Arc::new(store)
}

/// Reads a PEM CA file: every certificate in it is trusted.
fn load_ca(path: &Path) -> Result<(RootCertStore, Arc<CaType>), String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("ca_file {}: cannot read: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| format!("ca_file {}: not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "ca_file {}: no PEM certificate (BEGIN CERTIFICATE) in it",
            path.display()
        ));
    }
    let mut store = RootCertStore::empty();
    let mut wrapped = Vec::with_capacity(certs.len());
    for (n, c) in certs.into_iter().enumerate() {
        let unusable = |why: String| {
            format!(
                "ca_file {}: certificate {} is not a usable CA certificate: {why}",
                path.display(),
                n + 1
            )
        };
        x509_parser::parse_x509_certificate(&c).map_err(|e| unusable(e.to_string()))?;
        wrapped.push(WrappedX509::new(
            c.to_vec(),
            pingora_core::utils::tls::parse_x509,
        ));
        store.add(c).map_err(|e| unusable(e.to_string()))?;
    }
    Ok((store, Arc::from(wrapped.into_boxed_slice())))
}

type Identity = (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    CertKey,
);

/// Reads the client certificate chain and its key (checked to belong together, as a TLS
/// listener's are), in rustls's form and pingora's.
fn load_client_cert(cert: &Path, key: &Path) -> Result<Identity, (Field, String)> {
    let (chain, private) = super::tls::load_identity_der(cert, key).map_err(|e| {
        let field = if e.is_the_key() {
            Field::Key
        } else {
            Field::Cert
        };
        (field, e.to_string())
    })?;
    for c in &chain {
        if let Err(e) = x509_parser::parse_x509_certificate(c) {
            return Err((
                Field::Cert,
                format!(
                    "certificate {}: not a usable X.509 certificate: {e}",
                    cert.display()
                ),
            ));
        }
    }
    // pingora reads the key back from its DER by guessing the format; a key it could
    // not read would panic in a connect.
    if PrivateKeyDer::try_from(private.secret_der().to_vec()).is_err() {
        return Err((
            Field::Key,
            format!("key {}: unrecognised private key format", key.display()),
        ));
    }
    let cert_key = CertKey::new(
        chain.iter().map(|c| c.to_vec()).collect(),
        private.secret_der().to_vec(),
    );
    Ok((chain, private, cert_key))
}

/// `insecure_skip_verify = true`: accepts any certificate for any name. The handshake's
/// signatures are still checked (the peer holds the key of the certificate it sent).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl Validator<'_> {
    /// `protocol` and `[service.tls]` of a service: its TLS client, when any of its
    /// instances can be reached over TLS.
    pub(super) fn upstream_tls(
        &mut self,
        file: Option<&Spanned<UpstreamTlsFile>>,
        protocol: Protocol,
        registration: bool,
        ctx: &str,
    ) -> Option<Arc<UpstreamTls>> {
        let wanted = match (protocol, file) {
            (Protocol::Https | Protocol::H2, _) => true,
            (Protocol::Http1 | Protocol::H2c, Some(t)) if !registration => {
                let tls = if protocol == Protocol::H2c {
                    "h2"
                } else {
                    "https"
                };
                self.err(
                    t.span(),
                    ctx,
                    format!("tls applies to protocol = \"{tls}\", or to registered instances that say \"tls\": true (set registration = true)"),
                );
                return None;
            }
            // Registered instances may say they speak TLS: they get the defaults.
            (Protocol::Http1 | Protocol::H2c, _) => registration,
        };
        if !wanted {
            return None;
        }
        let t = file.map(|t| t.get_ref());
        let server_name = t.and_then(|t| t.server_name.as_ref()).and_then(|n| {
            match ServerName::try_from(n.get_ref().as_str()) {
                Ok(name) if !n.get_ref().is_empty() => Some(name.to_owned()),
                _ => {
                    self.err(
                        n.span(),
                        ctx,
                        "tls.server_name must be a DNS name (\"orders.internal\") or an IP address",
                    );
                    None
                }
            }
        });
        let insecure = t.and_then(|t| t.insecure_skip_verify.as_ref());
        let insecure_skip_verify = insecure.is_some_and(|i| *i.get_ref());
        let ca_file = t.and_then(|t| t.ca_file.as_ref());
        if let (Some(ca), Some(_)) = (ca_file, insecure.filter(|i| *i.get_ref())) {
            self.err(
                ca.span(),
                ctx,
                "tls.ca_file has no effect with tls.insecure_skip_verify = true: remove one",
            );
        }
        let (cert, key) = (
            t.and_then(|t| t.cert.as_ref()),
            t.and_then(|t| t.key.as_ref()),
        );
        match (cert, key) {
            (Some(c), None) => self.err(c.span(), ctx, "tls.cert needs tls.key"),
            (None, Some(k)) => self.err(k.span(), ctx, "tls.key needs tls.cert"),
            _ => {}
        }
        let ca_path = ca_file.map(|c| self.path(c.get_ref()));
        let cert_paths = cert
            .zip(key)
            .map(|(c, k)| (self.path(c.get_ref()), self.path(k.get_ref())));
        let roots = if ca_path.is_none() && !insecure_skip_verify {
            let roots = self.system_roots();
            if roots.is_empty() && protocol.is_tls() {
                let span = file.map_or(0..0, |f| f.span());
                self.host_problem(
                    span,
                    ctx,
                    "no system CA certificates found to verify instances with: set tls.ca_file",
                );
            }
            roots
        } else {
            Arc::new(RootCertStore::empty())
        };
        let settings = TlsSettings {
            server_name,
            ca_file: ca_path.as_deref(),
            identity: cert_paths.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            insecure_skip_verify,
            h2: protocol.is_h2(),
        };
        match build(&settings, &roots) {
            Ok(built) => {
                if let Some(i) = insecure.filter(|i| *i.get_ref()) {
                    self.caution(
                        i.span(),
                        ctx,
                        "tls.insecure_skip_verify = true: instances' certificates are not verified; anyone on the path can read and change this service's traffic",
                    );
                }
                Some(Arc::new(built))
            }
            Err((field, message)) => {
                let at = match field {
                    Field::CaFile => ca_file,
                    Field::Cert => cert,
                    Field::Key => key,
                };
                let span = at.map_or_else(|| file.map_or(0..0, |f| f.span()), |a| a.span());
                self.err(span, ctx, message);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write_pair(dir: &Path) -> (PathBuf, PathBuf) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.join("c.crt");
        let key = dir.join("c.key");
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn a_ca_file_and_a_client_certificate_build_both_forms() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path());
        let s = TlsSettings {
            server_name: None,
            ca_file: Some(&cert),
            identity: Some((&cert, &key)),
            insecure_skip_verify: false,
            h2: false,
        };
        let t = build(&s, &Arc::new(RootCertStore::empty())).unwrap();
        assert_eq!(t.ca.as_ref().map(|c| c.len()), Some(1));
        assert!(t.client_cert.is_some());
        assert!(t.client.client_auth_cert_resolver.has_certs());
        assert_eq!(t.client.alpn_protocols, vec![b"http/1.1".to_vec()]);
        // An HTTP/2 service's instances are offered h2 alone.
        let h2 = TlsSettings { h2: true, ..s };
        let t = build(&h2, &Arc::new(RootCertStore::empty())).unwrap();
        assert_eq!(t.client.alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[test]
    fn unusable_files_name_their_field() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path());
        let missing = dir.path().join("missing.pem");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "no pem here\n").unwrap();
        let roots = Arc::new(RootCertStore::empty());
        let try_build = |ca: Option<&Path>, id: Option<(&Path, &Path)>| {
            let s = TlsSettings {
                server_name: None,
                ca_file: ca,
                identity: id,
                insecure_skip_verify: false,
                h2: false,
            };
            build(&s, &roots).err()
        };
        let (f, m) = try_build(Some(&missing), None).unwrap();
        assert_eq!(f, Field::CaFile);
        assert!(m.contains("cannot read"), "{m}");
        let (f, m) = try_build(Some(&junk), None).unwrap();
        assert_eq!(f, Field::CaFile);
        assert!(m.contains("no PEM certificate"), "{m}");
        assert_eq!(
            try_build(None, Some((&missing, &key))).unwrap().0,
            Field::Cert
        );
        assert_eq!(try_build(None, Some((&cert, &junk))).unwrap().0, Field::Key);
        assert!(try_build(Some(&cert), Some((&cert, &key))).is_none());
    }
}
