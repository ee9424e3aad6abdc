//! TLS certificates and keys (a listener's, an upstream client certificate): reading a
//! certificate chain and its private key and checking that they belong together, the
//! `[[listen.tls]]` entries (a default certificate and more chosen by SNI name), and the
//! resolver that picks a certificate for a client's SNI name — for `busbar check`, a
//! reload and start-up alike.
//!
//! Owns: PEM files → a rustls [`CertifiedKey`], and why that failed; server-name rules
//! (exact, `*.` for one label, the default); [`SniCerts`].
//! Must not: build acceptors, listen or swap certificates at run time (that is `tls`).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::InconsistentKeys;
use toml::Spanned;

use super::file::TlsListenFile;
use super::model::{SniCert, TlsListen, DEFAULT_HANDSHAKE_TIMEOUT};
use super::validate::Validator;

/// Why a TLS listener's certificate or key can't be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {}: cannot read: {source}", path.display())]
    CertUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate {}: {why}", path.display())]
    NoCertificate { path: PathBuf, why: String },
    #[error("key {}: cannot read: {source}", path.display())]
    KeyUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key {}: {why}", path.display())]
    NoKey { path: PathBuf, why: String },
    #[error("key {} does not belong to certificate {}: {why}", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    #[error("certificate {}: it names no DNS name (subjectAltName): list the names it serves in `names`", path.display())]
    NoNames { path: PathBuf },
    #[error("certificate {}: server name {name} is already served by {}", path.display(), first.display())]
    NameTwice {
        path: PathBuf,
        name: String,
        first: PathBuf,
    },
}

impl TlsError {
    /// Whether the key (rather than the certificate) is what is wrong, for the error's location.
    pub fn is_the_key(&self) -> bool {
        matches!(
            self,
            TlsError::KeyUnreadable { .. } | TlsError::NoKey { .. } | TlsError::Mismatch { .. }
        )
    }
}

/// Reads `cert` (PEM, the leaf first) and `key` (PEM: PKCS#8, PKCS#1 or SEC1) and checks
/// that the key is the certificate's.
pub fn load_identity(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    load_checked(cert, key).map(|(identity, _)| identity)
}

/// [`load_identity`]'s files as they were read: the chain and the key, for a TLS client
/// (an upstream's client certificate) rather than a listener.
pub fn load_identity_der(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    load_checked(cert, key).map(|(identity, private)| (identity.cert, private))
}

fn load_checked(
    cert: &Path,
    key: &Path,
) -> Result<(CertifiedKey, PrivateKeyDer<'static>), TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|source| TlsError::CertUnreadable {
        path: cert.to_path_buf(),
        source,
    })?;
    let no_cert = |why: String| TlsError::NoCertificate {
        path: cert.to_path_buf(),
        why,
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| no_cert(format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(no_cert(
            "no PEM certificate (BEGIN CERTIFICATE) in it".into(),
        ));
    }
    let key_pem = std::fs::read(key).map_err(|source| TlsError::KeyUnreadable {
        path: key.to_path_buf(),
        source,
    })?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoKey {
        path: key.to_path_buf(),
        why: match e {
            pem::Error::NoItemsFound => {
                "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it".to_string()
            }
            e => format!("not a PEM private key: {e}"),
        },
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(private.clone_key())
        .map_err(|e| TlsError::NoKey {
            path: key.to_path_buf(),
            why: format!("unusable private key: {e}"),
        })?;
    let identity = CertifiedKey::new(chain, signing);
    match identity.keys_match() {
        // A key type whose public half rustls can't derive: nothing to compare.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok((identity, private))
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            why: "the certificate's public key is not this key's".into(),
        }),
        Err(e) => Err(no_cert(format!("not a usable X.509 certificate: {e}"))),
    }
}

/// The DNS names a certificate (DER) is for, from its subjectAltName, lower-cased.
pub fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(c) => c.valid_dns_names().map(str::to_ascii_lowercase).collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether `name` is a server name a certificate can be chosen by: a DNS name of
/// letters, digits and hyphens (lower case), or `*.` and such a name (one label).
pub fn valid_server_name(name: &str) -> bool {
    let exact = name.strip_prefix("*.").unwrap_or(name);
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    name.len() <= 253 && exact.split('.').all(label) && exact.parse::<std::net::IpAddr>().is_err()
}

/// A TLS listener's certificates, loaded: the one for each server name, those for each
/// wildcard's parent domain, and the default. What its handshakes choose from.
#[derive(Debug)]
pub struct SniCerts {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com`'s certificate under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniCerts {
    /// Reads every certificate and key `tls` names (the same files `busbar check`
    /// validated; a reload reads them again, so new content at the same paths counts).
    pub fn load(tls: &TlsListen) -> Result<SniCerts, TlsError> {
        let default = Arc::new(load_identity(&tls.cert, &tls.key)?);
        let mut certs = SniCerts {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default,
        };
        let mut first: HashMap<String, &Path> = HashMap::new();
        for c in &tls.certs {
            let identity = Arc::new(load_identity(&c.cert, &c.key)?);
            let names = match c.names.is_empty() {
                true => identity.cert.first().map(dns_names).unwrap_or_default(),
                false => c.names.clone(),
            };
            if names.is_empty() {
                return Err(TlsError::NoNames {
                    path: c.cert.clone(),
                });
            }
            for name in names {
                if let Some(earlier) = first.insert(name.clone(), &c.cert) {
                    return Err(TlsError::NameTwice {
                        path: c.cert.clone(),
                        name,
                        first: earlier.to_path_buf(),
                    });
                }
                match name.strip_prefix("*.") {
                    Some(parent) => certs.wildcard.insert(parent.to_string(), identity.clone()),
                    None => certs.exact.insert(name, identity.clone()),
                };
            }
        }
        Ok(certs)
    }

    /// The certificate for a client's SNI name (`None`: it sent none): the name's own,
    /// else its parent domain's wildcard (one label: `*.example.com` is not for
    /// `a.b.example.com`), else the default.
    pub fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = sni else {
            return &self.default;
        };
        // rustls hands the name over lower-cased; a name that is not is looked up as one.
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        self.exact
            .get(name)
            .or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent)
            })
            .unwrap_or(&self.default)
    }

    /// Whether `other` serves the same certificates to the same names (a reload that
    /// changed none of them reports none applied).
    pub fn same_as(&self, other: &SniCerts) -> bool {
        let same = |a: &CertifiedKey, b: &CertifiedKey| a.cert == b.cert;
        let same_map = |a: &HashMap<String, Arc<CertifiedKey>>,
                        b: &HashMap<String, Arc<CertifiedKey>>| {
            a.len() == b.len() && a.iter().all(|(n, c)| b.get(n).is_some_and(|d| same(c, d)))
        };
        same(&self.default, &other.default)
            && same_map(&self.exact, &other.exact)
            && same_map(&self.wildcard, &other.wildcard)
    }
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).clone())
    }
}

impl Validator<'_> {
    /// One `[[listen.tls]]` entry past its address: the certificates (each loaded, so
    /// `check` and a reload refuse what start-up would), their names and the handshake
    /// timeout.
    pub(super) fn tls_listener(
        &mut self,
        t: &TlsListenFile,
        addr: std::net::SocketAddr,
        ctx: &str,
    ) -> TlsListen {
        let (cert, key) = (self.path(t.cert.get_ref()), self.path(t.key.get_ref()));
        self.identity(&cert, &key, &t.cert, &t.key, ctx);
        let handshake_timeout = self.duration(&t.handshake_timeout, ctx, DEFAULT_HANDSHAKE_TIMEOUT);
        let mut certs = Vec::new();
        // Each name once per listener, where it was first given.
        let mut seen: HashMap<String, PathBuf> = HashMap::new();
        for c in &t.certs {
            let (path, key) = (self.path(c.cert.get_ref()), self.path(c.key.get_ref()));
            let identity = self.identity(&path, &key, &c.cert, &c.key, ctx);
            let mut names = Vec::new();
            let listed: Vec<(String, Range<usize>)> = match &c.names {
                Some(list) => {
                    if list.is_empty() {
                        self.err(c.cert.span(), ctx, "certs: `names` is empty: list the server names, or leave it out to take the certificate's own");
                    }
                    list.iter()
                        .map(|n| (n.get_ref().to_ascii_lowercase(), n.span()))
                        .collect()
                }
                None => match &identity {
                    Some(id) => {
                        let sans = id.cert.first().map(dns_names).unwrap_or_default();
                        if sans.is_empty() {
                            let e = TlsError::NoNames { path: path.clone() };
                            self.err(c.cert.span(), ctx, e.to_string());
                        }
                        sans.into_iter().map(|n| (n, c.cert.span())).collect()
                    }
                    None => Vec::new(),
                },
            };
            for (name, span) in listed {
                if !valid_server_name(&name) {
                    self.err(span, ctx, format!("certs: \"{name}\" is not a server name like \"api.example.com\" or \"*.example.com\""));
                    continue;
                }
                if let Some(first) = seen.get(&name) {
                    let e = TlsError::NameTwice {
                        path: path.clone(),
                        name,
                        first: first.clone(),
                    };
                    self.err(span, ctx, e.to_string());
                    continue;
                }
                seen.insert(name.clone(), path.clone());
                if c.names.is_some() {
                    names.push(name);
                }
            }
            certs.push(SniCert {
                cert: path,
                key,
                names,
            });
        }
        TlsListen {
            addr,
            cert,
            key,
            certs,
            handshake_timeout,
        }
    }

    /// Loads a certificate and its key; a problem is an error at the file that has it.
    fn identity(
        &mut self,
        cert: &Path,
        key: &Path,
        at_cert: &Spanned<String>,
        at_key: &Spanned<String>,
        ctx: &str,
    ) -> Option<CertifiedKey> {
        match load_identity(cert, key) {
            Ok(id) => Some(id),
            Err(e) => {
                let at = if e.is_the_key() { at_key } else { at_cert };
                self.err(at.span(), ctx, e.to_string());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn issued(dir: &Path, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let c = rcgen::generate_simple_self_signed(
            sans.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn listen(default: &(PathBuf, PathBuf), certs: Vec<SniCert>) -> TlsListen {
        TlsListen {
            addr: "127.0.0.1:8443".parse().unwrap(),
            cert: default.0.clone(),
            key: default.1.clone(),
            certs,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    #[test]
    fn a_name_picks_its_certificate_then_its_wildcard_then_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let d = issued(dir.path(), "d", &["default.test"]);
        let a = issued(dir.path(), "a", &["a.example.com"]);
        let w = issued(dir.path(), "w", &["*.example.com", "example.org"]);
        let certs = SniCerts::load(&listen(
            &d,
            vec![
                SniCert {
                    cert: a.0.clone(),
                    key: a.1.clone(),
                    names: vec!["a.example.com".into()],
                },
                // Names from the certificate.
                SniCert {
                    cert: w.0.clone(),
                    key: w.1.clone(),
                    names: Vec::new(),
                },
            ],
        ))
        .unwrap();
        let is = |sni: Option<&str>, want: &Arc<CertifiedKey>| {
            assert!(Arc::ptr_eq(certs.pick(sni), want), "{sni:?}");
        };
        let (default, a_key, w_key) = (
            certs.default.clone(),
            certs.exact["a.example.com"].clone(),
            certs.wildcard["example.com"].clone(),
        );
        is(Some("a.example.com"), &a_key);
        is(Some("A.Example.COM"), &a_key);
        is(Some("b.example.com"), &w_key);
        is(Some("example.org"), &w_key);
        is(Some("x.b.example.com"), &default);
        is(Some("example.com"), &default);
        is(Some("other.test"), &default);
        is(None, &default);
        assert!(certs.same_as(
            &SniCerts::load(&listen(&d, Vec::new()))
                .map(|mut c| {
                    c.exact = certs.exact.clone();
                    c.wildcard = certs.wildcard.clone();
                    c
                })
                .unwrap()
        ));
        let other = issued(dir.path(), "d2", &["default.test"]);
        assert!(!certs.same_as(&SniCerts::load(&listen(&other, Vec::new())).unwrap()));
    }

    #[test]
    fn server_names_are_dns_names_or_one_label_wildcards() {
        for ok in ["a.example.com", "*.example.com", "localhost", "x-1.y"] {
            assert!(valid_server_name(ok), "{ok}");
        }
        for bad in [
            "", "*", "*.", "a.*.com", "**.a.com", "a..b", "-a.com", "a b", "10.0.0.1", "Ab.com",
        ] {
            assert!(!valid_server_name(bad), "{bad}");
        }
    }

    #[test]
    fn certs_entries_are_checked_at_their_location() {
        let dir = tempfile::tempdir().unwrap();
        let (dc, dk) = issued(dir.path(), "d", &["default.test"]);
        let (ac, ak) = issued(dir.path(), "a", &["a.example.com"]);
        let (_, other_key) = issued(dir.path(), "o", &["o.test"]);
        let (ipc, ipk) = issued(dir.path(), "ip", &["127.0.0.1"]);
        let file = dir.path().join("busbar.toml");
        let parse = |certs: &str| {
            let text = format!(
                "[listen]\ntls = [{{ addr = \"127.0.0.1:8443\", cert = \"{}\", key = \"{}\", certs = [{certs}] }}]\n",
                dc.display(),
                dk.display()
            );
            crate::config::parse(&file, &text).map_err(|e| e.to_string())
        };
        let entry = |c: &Path, k: &Path, names: &str| {
            format!(
                "{{ cert = \"{}\", key = \"{}\"{names} }}",
                c.display(),
                k.display()
            )
        };
        let ok = parse(&entry(&ac, &ak, "")).unwrap();
        assert_eq!(ok.listen.tls[0].certs[0].names, Vec::<String>::new());
        assert_eq!(
            ok.listen.tls[0].handshake_timeout,
            DEFAULT_HANDSHAKE_TIMEOUT
        );

        let e = parse(&entry(&ac, &ak, ", names = [\"a b\"]")).unwrap_err();
        assert!(
            e.contains("busbar.toml:2:") && e.contains("is not a server name"),
            "{e}"
        );
        let twice = format!(
            "{}, {}",
            entry(&ac, &ak, ", names = [\"a.example.com\"]"),
            entry(&ac, &ak, "")
        );
        let e = parse(&twice).unwrap_err();
        assert!(e.contains("already served by"), "{e}");
        let e = parse(&entry(&ac, &other_key, "")).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        let e = parse(&entry(&ipc, &ipk, "")).unwrap_err();
        assert!(e.contains("names no DNS name"), "{e}");
        assert!(parse(&entry(&ipc, &ipk, ", names = [\"ip.test\"]")).is_ok());
        let e = parse(&entry(&ac, &ak, ", names = []")).unwrap_err();
        assert!(e.contains("`names` is empty"), "{e}");
    }

    #[test]
    fn a_matching_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), "a");
        let id = load_identity(&cert, &key).unwrap();
        assert_eq!(id.cert.len(), 1);
    }

    #[test]
    fn each_problem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), "a");
        let (_, other_key) = pair(dir.path(), "b");
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem at all\n").unwrap();

        let e = load_identity(&missing, &key).unwrap_err();
        assert!(
            matches!(e, TlsError::CertUnreadable { .. }) && !e.is_the_key(),
            "{e}"
        );
        let e = load_identity(&garbage, &key).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        // A certificate where the key should be: no key in it.
        let e = load_identity(&cert, &cert).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }) && e.is_the_key(), "{e}");
        let e = load_identity(&cert, &missing).unwrap_err();
        assert!(matches!(e, TlsError::KeyUnreadable { .. }), "{e}");
        let e = load_identity(&cert, &other_key).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("does not belong"), "{e}");
    }
}
