//! The `[auth]` section: JWT issuers and API keys that routes' `identity` lists use.
//!
//! Owns: the file types, validated types and validation of `[auth]`, including reading
//! the key files and secret environment variables it names, so a missing key is a
//! config error with its place in the file (an unset variable is only a warning from
//! `busbar check`, which runs where the secrets are not).
//! Must not: verify tokens or look keys up per request (that is `admission::identity`).

use std::collections::HashSet;
use std::time::Duration;

use http::HeaderName;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use toml::Spanned;

use super::validate::Validator;

/// Header that carries an API key when `[auth]` names none (the common convention).
pub const DEFAULT_API_KEY_HEADER: &str = "x-api-key";
/// Clock skew tolerated on `exp` and `nbf`: short, since busbar and issuers run NTP.
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);
/// The JWT claim that names the user (RFC 7519's subject).
pub const DEFAULT_JWT_CLAIM: &str = "sub";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub api_key_header: Option<Spanned<String>>,
    #[serde(default)]
    pub jwt: Vec<JwtFile>,
    #[serde(default)]
    pub api_key: Vec<ApiKeyFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtFile {
    pub name: Spanned<String>,
    pub algorithm: Spanned<String>,
    pub issuer: Option<Spanned<String>>,
    #[serde(default)]
    pub audience: Vec<Spanned<String>>,
    pub secret_env: Option<Spanned<String>>,
    #[serde(default)]
    pub public_keys: Vec<Spanned<String>>,
    pub jwks: Option<Spanned<String>>,
    pub leeway: Option<Spanned<String>>,
    pub claim: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyFile {
    pub user: Spanned<String>,
    pub sha256: Spanned<String>,
}

/// Validated `[auth]`.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Request header an API key is read from.
    pub api_key_header: HeaderName,
    pub jwt: Vec<JwtIssuer>,
    pub api_keys: Vec<ApiKey>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            api_key_header: HeaderName::from_static(DEFAULT_API_KEY_HEADER),
            jwt: Vec::new(),
            api_keys: Vec::new(),
        }
    }
}

/// One trusted token issuer and the keys its tokens are checked with.
#[derive(Debug, Clone)]
pub struct JwtIssuer {
    pub name: String,
    pub algorithm: Algorithm,
    /// Required `iss` value, when set.
    pub issuer: Option<String>,
    /// Accepted `aud` values; empty: `aud` is not checked.
    pub audience: Vec<String>,
    pub leeway: Duration,
    /// Claim whose (string or number) value is the user.
    pub claim: String,
    pub keys: Vec<JwtKey>,
}

/// A verification key; `kid` set for keys from a JWKS, so tokens naming a kid use that key.
#[derive(Debug, Clone)]
pub struct JwtKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
}

/// A configured API key: only its SHA-256 is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub user: String,
    pub sha256: [u8; 32],
}

/// Decodes a SHA-256 written as 64 hex digits, either case: `[[auth.api_key]]`'s
/// `sha256` and `[[registry.token]]`'s `token_sha256`. Only digits: `from_str_radix`
/// would also take a sign (`+f`).
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl Validator<'_> {
    pub(super) fn auth(&mut self, f: Option<&AuthFile>) -> AuthConfig {
        let mut out = AuthConfig::default();
        let Some(f) = f else {
            return out;
        };
        if let Some(h) = &f.api_key_header {
            match HeaderName::from_bytes(h.get_ref().as_bytes()) {
                Ok(n) => out.api_key_header = n,
                Err(_) => self.err(h.span(), "[auth]", "not a valid header name"),
            }
        }
        let mut names = HashSet::new();
        for j in &f.jwt {
            let ctx = format!("[[auth.jwt]] \"{}\"", j.name.get_ref());
            if !names.insert(j.name.get_ref().clone()) {
                self.err(j.name.span(), &ctx, "duplicate issuer name");
            }
            if let Some(issuer) = self.jwt_issuer(j, &ctx) {
                out.jwt.push(issuer);
            }
        }
        let mut users = HashSet::new();
        for k in &f.api_key {
            let ctx = format!("[[auth.api_key]] \"{}\"", k.user.get_ref());
            if k.user.get_ref().is_empty() || http::HeaderValue::from_str(k.user.get_ref()).is_err()
            {
                self.err(
                    k.user.span(),
                    &ctx,
                    "a user name is non-empty printable text",
                );
            }
            let Some(sha256) = parse_sha256_hex(k.sha256.get_ref()) else {
                self.err(
                    k.sha256.span(),
                    &ctx,
                    "sha256 is the key's SHA-256 as 64 hex digits (`printf %s KEY | sha256sum`)",
                );
                continue;
            };
            if !users.insert(sha256) {
                self.err(k.sha256.span(), &ctx, "this key hash is listed twice");
            }
            out.api_keys.push(ApiKey {
                user: k.user.get_ref().clone(),
                sha256,
            });
        }
        out
    }

    fn jwt_issuer(&mut self, j: &JwtFile, ctx: &str) -> Option<JwtIssuer> {
        let algorithm = match j.algorithm.get_ref().as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            _ => {
                self.err(
                    j.algorithm.span(),
                    ctx,
                    "algorithm must be \"HS256\", \"RS256\" or \"ES256\"",
                );
                return None;
            }
        };
        let mut keys = Vec::new();
        if algorithm == Algorithm::HS256 {
            for p in &j.public_keys {
                self.err(
                    p.span(),
                    ctx,
                    "public_keys are for RS256/ES256; HS256 uses secret_env",
                );
            }
            if let Some(p) = &j.jwks {
                self.err(
                    p.span(),
                    ctx,
                    "jwks is for RS256/ES256; HS256 uses secret_env",
                );
            }
            match &j.secret_env {
                None => self.err(
                    j.algorithm.span(),
                    ctx,
                    "HS256 needs secret_env: the name of the environment variable holding the secret",
                ),
                Some(var) => match std::env::var(var.get_ref()) {
                    Ok(s) if s.len() >= 16 => keys.push(JwtKey {
                        kid: None,
                        key: DecodingKey::from_secret(s.as_bytes()),
                    }),
                    Ok(_) => self.err(
                        var.span(),
                        ctx,
                        format!("${} is shorter than 16 bytes", var.get_ref()),
                    ),
                    Err(_) => {
                        self.host_problem(
                            var.span(),
                            ctx,
                            format!("environment variable ${} is not set", var.get_ref()),
                        );
                        if self.checking() {
                            // `check` goes on with the issuer; this key is never used.
                            keys.push(JwtKey {
                                kid: None,
                                key: DecodingKey::from_secret(&[0; 32]),
                            });
                        }
                    }
                },
            }
        } else {
            if let Some(var) = &j.secret_env {
                self.err(var.span(), ctx, "secret_env is for HS256 only");
            }
            for p in &j.public_keys {
                if let Some(key) = self.pem_key(p, algorithm, ctx) {
                    keys.push(JwtKey { kid: None, key });
                }
            }
            if let Some(p) = &j.jwks {
                self.jwks(p, algorithm, ctx, &mut keys);
            }
            if j.public_keys.is_empty() && j.jwks.is_none() {
                self.err(
                    j.algorithm.span(),
                    ctx,
                    "set public_keys (PEM files) or jwks (a JWKS JSON file)",
                );
            }
        }
        let claim = j
            .claim
            .as_ref()
            .map_or_else(|| DEFAULT_JWT_CLAIM.to_string(), |c| c.get_ref().clone());
        if claim.is_empty() {
            if let Some(c) = &j.claim {
                self.err(c.span(), ctx, "claim must not be empty");
            }
        }
        let leeway = self.duration(&j.leeway, ctx, DEFAULT_JWT_LEEWAY);
        if keys.is_empty() {
            return None;
        }
        Some(JwtIssuer {
            name: j.name.get_ref().clone(),
            algorithm,
            issuer: j.issuer.as_ref().map(|i| i.get_ref().clone()),
            audience: j.audience.iter().map(|a| a.get_ref().clone()).collect(),
            leeway,
            claim,
            keys,
        })
    }

    fn pem_key(&mut self, p: &Spanned<String>, alg: Algorithm, ctx: &str) -> Option<DecodingKey> {
        let path = self.path(p.get_ref());
        let pem = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                self.err(
                    p.span(),
                    ctx,
                    format!("cannot read {}: {e}", path.display()),
                );
                return None;
            }
        };
        let key = if alg == Algorithm::RS256 {
            DecodingKey::from_rsa_pem(&pem)
        } else {
            DecodingKey::from_ec_pem(&pem)
        };
        match key {
            Ok(k) => Some(k),
            Err(e) => {
                self.err(
                    p.span(),
                    ctx,
                    format!("{} is not a {alg:?} public key in PEM: {e}", path.display()),
                );
                None
            }
        }
    }

    fn jwks(&mut self, p: &Spanned<String>, alg: Algorithm, ctx: &str, keys: &mut Vec<JwtKey>) {
        let path = self.path(p.get_ref());
        let set: JwkSet = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                self.err(
                    p.span(),
                    ctx,
                    format!("cannot read the JWKS {}: {e}", path.display()),
                );
                return;
            }
        };
        let before = keys.len();
        for jwk in &set.keys {
            let fits = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok())
                .is_none_or(|a| a == alg);
            match DecodingKey::from_jwk(jwk) {
                Ok(key) if fits && key.family() == alg.family() => keys.push(JwtKey {
                    kid: jwk.common.key_id.clone(),
                    key,
                }),
                _ => {}
            }
        }
        if keys.len() == before {
            self.err(
                p.span(),
                ctx,
                format!("the JWKS {} has no {alg:?} key", path.display()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_parses() {
        let h = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(parse_sha256_hex(h).map(|b| b[0]), Some(0x9f));
        assert_eq!(parse_sha256_hex(&h[1..]), None);
        assert_eq!(parse_sha256_hex(&h.replace('9', "g")), None);
        assert_eq!(parse_sha256_hex(&format!("+f{}", &h[2..])), None);
        assert_eq!(
            parse_sha256_hex(&h.to_ascii_uppercase()),
            parse_sha256_hex(h)
        );
    }
}
