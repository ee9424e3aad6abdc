//! TLS certificates and keys (a listener's, an upstream client certificate): reading a
//! certificate chain and its private key and checking that they belong together, for
//! `busbar check`, a reload and start-up alike.
//!
//! Owns: PEM files → a rustls [`CertifiedKey`], and why that failed.
//! Must not: build acceptors or listen (that is `app`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::InconsistentKeys;

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

/// The certificate resolver a TLS listener serves: one identity, whatever the SNI.
pub fn resolver(identity: CertifiedKey) -> Arc<rustls::sign::SingleCertAndKey> {
    Arc::new(rustls::sign::SingleCertAndKey::from(identity))
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
