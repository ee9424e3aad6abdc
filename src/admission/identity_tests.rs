//! Identity tests: JWT outcomes, API keys, trusted headers, require_auth.

use super::*;
use crate::config::{ApiKey, JwtKey};
use jsonwebtoken::{encode, Algorithm, DecodingKey, EncodingKey, Header};
use std::time::Duration;

const SECRET: &[u8] = b"a-test-secret-of-some-length";

fn keyring() -> Arc<Keyring> {
    let auth = AuthConfig {
        jwt: vec![JwtIssuer {
            name: "main".into(),
            algorithm: Algorithm::HS256,
            issuer: Some("https://id.test".into()),
            audience: vec!["busbar".into()],
            leeway: Duration::from_secs(5),
            claim: "sub".into(),
            keys: vec![JwtKey {
                kid: None,
                key: DecodingKey::from_secret(SECRET),
            }],
        }],
        api_keys: vec![ApiKey {
            user: "svc-reports".into(),
            sha256: Sha256::digest(b"k-123").into(),
        }],
        ..AuthConfig::default()
    };
    Arc::new(Keyring::new(&auth))
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn token(claims: Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn good() -> Value {
    serde_json::json!({"sub": "alice", "iss": "https://id.test", "aud": "busbar", "exp": now() + 60})
}

fn resolver(sources: Vec<IdentitySource>, require_auth: bool) -> Resolver {
    let c = RouteAdmission {
        identity: sources,
        trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
        require_auth,
        ..RouteAdmission::default()
    };
    Resolver::new(&c, keyring())
}

fn with(name: &str, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        HeaderName::from_bytes(name.as_bytes()).unwrap(),
        value.parse().unwrap(),
    );
    h
}

fn bearer_of(t: &str) -> HeaderMap {
    with("authorization", &format!("Bearer {t}"))
}

const CLIENT: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7)));

#[test]
fn jwt_outcomes() {
    let r = resolver(
        vec![IdentitySource::Jwt(None), IdentitySource::ClientIp],
        false,
    );
    let id = r
        .resolve(CLIENT, &bearer_of(&token(good(), SECRET)))
        .unwrap();
    assert_eq!((id.kind, id.user()), (Kind::Jwt, "alice"));
    let cases = [
        (serde_json::json!({"exp": now() - 60}), "token_expired"),
        (
            serde_json::json!({"nbf": now() + 60}),
            "token_not_yet_valid",
        ),
        (
            serde_json::json!({"iss": "https://evil.test"}),
            "wrong_issuer",
        ),
        (serde_json::json!({"aud": "other"}), "wrong_audience"),
        (serde_json::json!({"sub": null}), "missing_claim"),
    ];
    for (patch, reason) in cases {
        let mut c = good();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        let e = r
            .resolve(CLIENT, &bearer_of(&token(c, SECRET)))
            .unwrap_err();
        assert_eq!(e.reason, reason);
    }
    let e = r
        .resolve(
            CLIENT,
            &bearer_of(&token(good(), b"another-secret-entirely")),
        )
        .unwrap_err();
    assert_eq!(e.reason, "bad_signature");
    let e = r.resolve(CLIENT, &bearer_of("not.a.jwt")).unwrap_err();
    assert_eq!(e.reason, "invalid_token");
    // Within the leeway an expired token still passes.
    let mut c = good();
    c["exp"] = (now() - 2).into();
    assert!(r.resolve(CLIENT, &bearer_of(&token(c, SECRET))).is_ok());
}

#[test]
fn api_keys_are_looked_up_by_hash() {
    let r = resolver(vec![IdentitySource::ApiKey], false);
    let id = r.resolve(CLIENT, &with("x-api-key", "k-123")).unwrap();
    assert_eq!((id.kind, id.user()), (Kind::ApiKey, "svc-reports"));
    assert_eq!(
        r.resolve(CLIENT, &with("x-api-key", "k-124"))
            .unwrap_err()
            .reason,
        "unknown_api_key"
    );
    let anon = r.resolve(CLIENT, &HeaderMap::new()).unwrap();
    assert_eq!((anon.kind, anon.key()), (Kind::ClientIp, "ip:192.0.2.7"));
    let mut two = with("x-api-key", "k-123");
    two.append("x-api-key", "k-124".parse().unwrap());
    assert_eq!(
        r.resolve(CLIENT, &two).unwrap_err().reason,
        "malformed_credentials"
    );
}

#[test]
fn a_header_is_believed_only_from_trusted_proxies() {
    let r = resolver(
        vec![IdentitySource::Header(HeaderName::from_static("x-user-id"))],
        true,
    );
    let proxy = Some("10.1.2.3".parse().unwrap());
    let id = r.resolve(proxy, &with("x-user-id", "bob")).unwrap();
    assert_eq!((id.kind, id.key()), (Kind::Header, "hdr:bob"));
    let e = r.resolve(CLIENT, &with("x-user-id", "bob")).unwrap_err();
    assert_eq!(e.reason, "authentication_required");
    assert!(r.resolve(proxy, &with("x-user-id", "bad\tvalue")).is_err());
}

/// A `[::]` listener sees an IPv4 proxy as `::ffff:a.b.c.d`: it is the same proxy, and the
/// same client-address user, as on a `0.0.0.0` listener.
#[test]
fn an_ipv4_mapped_peer_is_judged_as_its_ipv4_address() {
    let r = resolver(
        vec![
            IdentitySource::Header(HeaderName::from_static("x-user-id")),
            IdentitySource::ClientIp,
        ],
        false,
    );
    let mapped = Some("::ffff:10.1.2.3".parse().unwrap());
    let id = r.resolve(mapped, &with("x-user-id", "bob")).unwrap();
    assert_eq!((id.kind, id.key()), (Kind::Header, "hdr:bob"));
    let untrusted = Some("::ffff:192.0.2.7".parse().unwrap());
    let id = r.resolve(untrusted, &with("x-user-id", "bob")).unwrap();
    assert_eq!((id.kind, id.key()), (Kind::ClientIp, "ip:192.0.2.7"));
}

#[test]
fn bearer_credentials_follow_rfc_6750() {
    let r = resolver(
        vec![IdentitySource::Jwt(None), IdentitySource::ClientIp],
        false,
    );
    let t = token(good(), SECRET);
    for ok in [
        format!("Bearer {t}"),
        format!("bearer {t}"),
        format!("BEARER   {t}"),
    ] {
        let id = r.resolve(CLIENT, &with("authorization", &ok)).unwrap();
        assert_eq!((id.kind, id.user()), (Kind::Jwt, "alice"), "{ok}");
    }
    for bad in [
        format!("Bearer\t{t}"),
        format!("Bearer{t}"),
        format!("Bearer \t{t}"),
        format!("Bearer {t} extra"),
        format!("Bearer {t},x"),
        "Bearer".to_string(),
        "Bearer ".to_string(),
        "Bearer ====".to_string(),
        "Bearers abc".to_string(),
        format!("\"Bearer\" {t}"),
        format!("Basic\t{t}"),
    ] {
        let e = r.resolve(CLIENT, &with("authorization", &bad)).unwrap_err();
        assert_eq!(e.reason, "malformed_credentials", "{bad:?}");
    }
    // Another scheme is not a bearer credential: the next source decides.
    for other in ["Basic YWxpY2U6cHc=", "Negotiate", "Digest a=\"b\""] {
        let id = r.resolve(CLIENT, &with("authorization", other)).unwrap();
        assert_eq!(id.kind, Kind::ClientIp, "{other}");
    }
}

#[test]
fn a_user_claim_is_taken_as_it_is_or_refused() {
    let r = resolver(vec![IdentitySource::Jwt(None)], true);
    let with_sub = |sub: Value| {
        let mut c = good();
        c["sub"] = sub;
        r.resolve(CLIENT, &bearer_of(&token(c, SECRET)))
    };
    for bad in [
        Value::from(" admin "),
        Value::from("admin "),
        Value::from(" admin"),
        Value::from("ad\tmin"),
        Value::from("ad\u{7f}min"),
        Value::from(""),
        Value::from("x".repeat(MAX_IDENTITY_LEN + 1)),
        Value::from(1.5),
    ] {
        let e = with_sub(bad.clone()).unwrap_err();
        assert_eq!(e.reason, "missing_claim", "{bad}");
    }
    assert_eq!(
        with_sub(Value::from("Jane Doe")).unwrap().user(),
        "Jane Doe"
    );
    assert_eq!(with_sub(Value::from(42)).unwrap().user(), "42");
    assert_eq!(with_sub(Value::from(-7)).unwrap().user(), "-7");
    assert_eq!(
        with_sub(Value::from(u64::MAX)).unwrap().user(),
        "18446744073709551615"
    );
}
