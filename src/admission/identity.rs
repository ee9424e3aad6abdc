//! Who is calling: a trusted header, a JWT claim, an API key or the client address.
//!
//! Owns: [`Keyring`] (JWT issuers with their validation and API-key hashes, built from
//! `[auth]`) and [`Resolver`] (one route's ordered identity sources).
//! Must not: rate-limit, queue or touch the response; it only says who or why not.
//!
//! Sources are tried in the route's order. A source that is absent (no header, no token)
//! passes to the next; one that is present but wrong (bad token, unknown key) or malformed
//! (`Authorization: Bearer<TAB>token`, a user claim with spaces at its ends) is a 401: a
//! caller who presents credentials gets them checked, never silently downgraded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, decode_header, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, IdentitySource, JwtIssuer, RouteAdmission};

/// Longest identity busbar passes on; longer values are refused rather than cut.
const MAX_IDENTITY_LEN: usize = 256;

/// Where an identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Header,
    Jwt,
    ApiKey,
    ClientIp,
}

impl Kind {
    /// What starts the keys of this source's callers.
    fn prefix(self) -> &'static str {
        match self {
            Kind::Header => "hdr:",
            Kind::Jwt => "jwt:",
            Kind::ApiKey => "key:",
            Kind::ClientIp => "ip:",
        }
    }
}

/// The caller, as far as busbar could verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: Kind,
    /// The source's prefix, then the user: the key limiters and queues use. The source
    /// is part of it, so a JWT subject "10.0.0.1" and the client 10.0.0.1 are different
    /// users. One string serves both, so resolving a caller allocates once.
    key: String,
}

impl Identity {
    fn new(kind: Kind, user: &str) -> Identity {
        let prefix = kind.prefix();
        let mut key = String::with_capacity(prefix.len() + user.len());
        key.push_str(prefix);
        key.push_str(user);
        Identity { kind, key }
    }

    pub fn is_authenticated(&self) -> bool {
        self.kind != Kind::ClientIp
    }

    /// The user as the upstream sees it in the identity header.
    pub fn user(&self) -> &str {
        &self.key[self.kind.prefix().len()..]
    }

    /// The key limiters and queues use (see [`Identity`]).
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// Why a caller is not authenticated; `reason` goes into the 401 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct AuthError {
    pub reason: &'static str,
    pub message: &'static str,
}

fn auth_error(reason: &'static str, message: &'static str) -> AuthError {
    AuthError { reason, message }
}

struct CompiledIssuer {
    config: JwtIssuer,
    validation: Validation,
}

/// Everything `[auth]` configures, ready for lookups; shared by all routes of a snapshot.
pub struct Keyring {
    issuers: Vec<CompiledIssuer>,
    api_key_header: HeaderName,
    api_keys: HashMap<[u8; 32], String>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("issuers", &self.issuers.len())
            .field("api_keys", &self.api_keys.len())
            .finish()
    }
}

impl Keyring {
    pub fn new(auth: &AuthConfig) -> Self {
        let issuers = auth
            .jwt
            .iter()
            .map(|j| {
                let mut v = Validation::new(j.algorithm);
                v.leeway = j.leeway.as_secs();
                v.validate_nbf = true;
                let mut required = vec!["exp"];
                if let Some(iss) = &j.issuer {
                    v.set_issuer(&[iss]);
                    required.push("iss");
                }
                if j.audience.is_empty() {
                    v.validate_aud = false;
                } else {
                    v.set_audience(&j.audience);
                    required.push("aud");
                }
                v.set_required_spec_claims(&required);
                CompiledIssuer {
                    config: j.clone(),
                    validation: v,
                }
            })
            .collect();
        Keyring {
            issuers,
            api_key_header: auth.api_key_header.clone(),
            api_keys: auth
                .api_keys
                .iter()
                .map(|k| (k.sha256, k.user.clone()))
                .collect(),
        }
    }

    fn verify_jwt(&self, token: &str, issuer: Option<&str>) -> Result<String, AuthError> {
        let header = decode_header(token)
            .map_err(|_| auth_error("invalid_token", "the token is not a JWT"))?;
        let mut best: Option<AuthError> = None;
        let candidates = self.issuers.iter().filter(|i| {
            issuer.is_none_or(|n| i.config.name == n) && i.config.algorithm == header.alg
        });
        for issuer in candidates {
            let keys = issuer
                .config
                .keys
                .iter()
                .filter(|k| match (&header.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                });
            for key in keys {
                match decode::<Map<String, Value>>(token, &key.key, &issuer.validation) {
                    Ok(data) => return claim(&data.claims, &issuer.config.claim),
                    Err(e) => {
                        let err = jwt_error(e.kind());
                        // Past the signature check, this issuer's complaint is the answer.
                        if err.reason != "bad_signature" {
                            return Err(err);
                        }
                        best.get_or_insert(err);
                    }
                }
            }
        }
        Err(best.unwrap_or(auth_error(
            "algorithm_not_accepted",
            "no configured issuer accepts this token's algorithm or key id",
        )))
    }

    fn api_key(&self, key: &[u8]) -> Result<&str, AuthError> {
        let hash: [u8; 32] = Sha256::digest(key).into();
        self.api_keys
            .get(&hash)
            .map(String::as_str)
            .ok_or(auth_error("unknown_api_key", "the API key is not known"))
    }
}

fn jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => auth_error("token_expired", "the token has expired"),
        ErrorKind::ImmatureSignature => {
            auth_error("token_not_yet_valid", "the token is not valid yet (nbf)")
        }
        ErrorKind::InvalidIssuer => {
            auth_error("wrong_issuer", "the token's issuer is not accepted")
        }
        ErrorKind::InvalidAudience => {
            auth_error("wrong_audience", "the token is not meant for this audience")
        }
        ErrorKind::MissingRequiredClaim(_) => {
            auth_error("missing_claim", "the token lacks a required claim")
        }
        ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) => {
            auth_error("bad_signature", "the token's signature does not verify")
        }
        ErrorKind::InvalidAlgorithm => auth_error(
            "algorithm_not_accepted",
            "the token's algorithm is not accepted",
        ),
        _ => auth_error("invalid_token", "the token was refused"),
    }
}

/// `user` when busbar can pass it on as it is: not empty, not too long, printable ASCII
/// only, and no space at either end (an upstream that trims the header value would read
/// `" admin "` as `admin`).
fn clean(user: &str) -> Option<&str> {
    (!user.is_empty()
        && user.len() <= MAX_IDENTITY_LEN
        && user.bytes().all(|b| (b' '..0x7f).contains(&b))
        && !user.starts_with(' ')
        && !user.ends_with(' '))
    .then_some(user)
}

/// The user in the token's `claim`: a string [`clean`] accepts, or an integer (written
/// in decimal, as the string `"42"` would be). Anything else (a fraction, an object,
/// spaces around the name) is refused rather than reshaped.
fn claim(claims: &Map<String, Value>, name: &str) -> Result<String, AuthError> {
    let user = match claims.get(name) {
        Some(Value::String(s)) => clean(s).map(str::to_string),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    };
    user.ok_or(auth_error(
        "missing_claim",
        "the token has no usable user claim",
    ))
}

/// One route's identity sources, in order.
#[derive(Debug)]
pub struct Resolver {
    sources: Vec<IdentitySource>,
    trusted_proxies: Vec<IpNet>,
    require_auth: bool,
    keyring: Arc<Keyring>,
}

impl Resolver {
    pub fn new(c: &RouteAdmission, keyring: Arc<Keyring>) -> Self {
        Resolver {
            sources: c.identity.clone(),
            trusted_proxies: c.trusted_proxies.clone(),
            require_auth: c.require_auth,
            keyring,
        }
    }

    /// An IPv4-mapped peer (a `[::]` listener's view of an IPv4 client) is judged as the
    /// IPv4 address it is, as the ACL and the trusted-hop logic judge it.
    fn trusted(&self, client: Option<IpAddr>) -> bool {
        client.is_some_and(|ip| crate::client_addr::trusted(ip, &self.trusted_proxies))
    }

    /// Who the caller is, for a request straight from `client` (no proxy in front).
    pub fn resolve(
        &self,
        client: Option<IpAddr>,
        headers: &HeaderMap,
    ) -> Result<Identity, AuthError> {
        self.resolve_via(client, client, headers)
    }

    /// Who the caller is; with no source matching, the (real) client address. A header
    /// identity is believed when the TCP `peer` (the proxy that set it) is trusted,
    /// whoever the client behind it is.
    pub fn resolve_via(
        &self,
        client: Option<IpAddr>,
        peer: Option<IpAddr>,
        headers: &HeaderMap,
    ) -> Result<Identity, AuthError> {
        for source in &self.sources {
            let found = match source {
                IdentitySource::Header(name) if self.trusted(peer) => headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(clean)
                    .map(|user| Identity::new(Kind::Header, user)),
                IdentitySource::Header(_) => None,
                IdentitySource::Jwt(issuer) => match bearer(headers)? {
                    Some(token) => Some(Identity::new(
                        Kind::Jwt,
                        &self.keyring.verify_jwt(token, issuer.as_deref())?,
                    )),
                    None => None,
                },
                IdentitySource::ApiKey => {
                    let mut keys = headers.get_all(&self.keyring.api_key_header).iter();
                    match (keys.next(), keys.next()) {
                        (Some(v), None) => Some(Identity::new(
                            Kind::ApiKey,
                            self.keyring.api_key(v.as_bytes())?,
                        )),
                        // busbar would check one and the upstream might read the other.
                        (Some(_), Some(_)) => {
                            return Err(auth_error(
                                "malformed_credentials",
                                "the request has more than one API key header",
                            ))
                        }
                        (None, _) => None,
                    }
                }
                IdentitySource::ClientIp => None,
            };
            if let Some(id) = found {
                return Ok(id);
            }
        }
        if self.require_auth {
            return Err(auth_error(
                "authentication_required",
                "this route needs credentials",
            ));
        }
        // The address written by hand: `Display` costs ~1k instructions.
        let mut key = Vec::with_capacity(48);
        key.extend_from_slice(Kind::ClientIp.prefix().as_bytes());
        match client {
            // Canonical, so one IPv4 caller is one user on `0.0.0.0` and `[::]` listeners.
            Some(ip) => crate::text::ip(&mut key, ip.to_canonical()),
            None => key.extend_from_slice(b"unknown"),
        }
        Ok(Identity {
            kind: Kind::ClientIp,
            key: String::from_utf8(key).unwrap_or_default(),
        })
    }
}

/// The token of `Authorization: Bearer <token>`; `Ok(None)` when the request has no
/// bearer credential (no `Authorization`, or one of another scheme, such as `Basic`).
///
/// The grammar is RFC 6750 §2.1 within RFC 9110 §11.4: the scheme (any case), one or more
/// SP, then a b64token. Anything else that names the bearer scheme (`Bearer<TAB>tok`,
/// `Bearertok`, `Bearer` alone, junk in the token) or is not a credential at all is a
/// 401: frameworks read such headers leniently, so busbar must not forward them unchecked.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || {
        auth_error(
            "malformed_credentials",
            "the Authorization header is not \"Bearer\", spaces and a token",
        )
    };
    // Optional whitespace around a field value is not part of it (RFC 9110 §5.5).
    let v = value.as_bytes().trim_ascii();
    let scheme_len = v.iter().position(|&b| !is_tchar(b)).unwrap_or(v.len());
    let (scheme, rest) = v.split_at(scheme_len);
    let names_bearer = scheme
        .get(..6)
        .is_some_and(|s| s.eq_ignore_ascii_case(b"bearer"));
    if !names_bearer {
        // Another scheme: not busbar's to judge, as long as it is a credential.
        return if !scheme.is_empty() && matches!(rest.first(), None | Some(b' ')) {
            Ok(None)
        } else {
            Err(malformed())
        };
    }
    // One or more SP (not HTAB) before the token.
    let spaces = rest.iter().take_while(|&&b| b == b' ').count();
    let token = rest.get(spaces..).unwrap_or_default();
    if scheme.len() != 6 || spaces == 0 || !is_b64token(token) {
        return Err(malformed());
    }
    // All ASCII (checked above).
    std::str::from_utf8(token)
        .map(Some)
        .map_err(|_| malformed())
}

/// A `tchar` of RFC 9110 §5.6.2: what a token (an auth scheme) is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 6750's `b64token`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(t: &[u8]) -> bool {
    let body = t.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    body > 0
        && t.iter()
            .take(body)
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

#[cfg(test)]
#[path = "identity_tests.rs"]
mod tests;
