//! The registration API, on its own listener:
//!
//! - `PUT /v1/services/{service}/instances/{id}` — register or replace (JSON body)
//! - `PUT /v1/services/{service}/instances/{id}/heartbeat` — renew; 404 means register again
//! - `DELETE /v1/services/{service}/instances/{id}` — leave now
//! - `GET /v1/services`, `GET /v1/services/{service}` — what the bus knows
//!
//! Every call needs `Authorization: Bearer <token>`; a token only sees and touches the
//! services it is scoped to (401 without a valid token; 403 outside its scope, whether or
//! not the service exists). Registered addresses follow the address policy
//! (`config::address`: 400 naming the field) and the token's `addresses` (403). A request
//! that came through a busbar service listener (`Via`) gets 403 before anything else.
//! Owns: parsing and validating requests, authentication, the JSON answers.
//! Must not: store anything itself; writes go through a [`Writer`].

// The `Err` of these handlers is the HTTP refusal itself, sent as it is; this is the
// registration API (control plane), where a 136-byte error costs nothing worth boxing.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;

use crate::base::reply::Refusal;
use crate::config::address::{self, OwnListeners, Refused};
use crate::config::{valid_identifier, RegistryToken, MAX_TTL, MIN_TTL};
use crate::metrics::METRICS;
use crate::model::health::now_ms;
use crate::registry::store::{heartbeat_every, Registration, StoreError};
use crate::snapshot::State;

/// Largest registration body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Limits on what an instance may say about itself.
const MAX_METADATA: usize = 64;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 1024;
const MAX_LABEL: usize = 128;

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    NotFound(#[from] StoreError),
    #[error("the registry store is unavailable: {0}")]
    Unavailable(String),
}

/// Where registrations go: the embedded store, or etcd.
#[async_trait]
pub trait Writer: Send + Sync {
    async fn register(&self, reg: Registration) -> Result<(), WriteError>;
    async fn heartbeat(&self, service: &str, id: &str) -> Result<Duration, WriteError>;
    async fn deregister(&self, service: &str, id: &str) -> Result<(), WriteError>;
}

/// The embedded backend: the node's own store.
pub struct Embedded(pub Arc<crate::registry::store::Store>);

#[async_trait]
impl Writer for Embedded {
    async fn register(&self, reg: Registration) -> Result<(), WriteError> {
        self.0.register(reg);
        Ok(())
    }
    async fn heartbeat(&self, service: &str, id: &str) -> Result<Duration, WriteError> {
        Ok(self.0.heartbeat(service, id)?)
    }
    async fn deregister(&self, service: &str, id: &str) -> Result<(), WriteError> {
        Ok(self.0.deregister(service, id)?)
    }
}

/// The body of a registration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    /// The app's own address, `ip:port`.
    address: String,
    /// The instance's sidecar, `ip:port`, if it has one.
    sidecar: Option<String>,
    weight: Option<u32>,
    zone: Option<String>,
    version: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    /// Seconds.
    ttl: Option<u64>,
    /// The instance speaks TLS on its ports (its service's `[service.tls]` applies).
    tls: Option<bool>,
}

pub struct RegistrationApi {
    pub state: Arc<State>,
    pub writer: Arc<dyn Writer>,
    /// Where this node listens (bound at start; a reload cannot change it): no instance
    /// may be registered there.
    pub listeners: OwnListeners,
    /// Refusals of instances from elsewhere: one written here again is no longer refused.
    pub refused: Arc<crate::registry::gate::Gate>,
}

fn reply(status: StatusCode, v: Value) -> Response<Vec<u8>> {
    crate::base::api::json_reply(status, v)
}

use crate::base::api::{error, refusal};

fn bad_field(field: &str, message: impl Into<String>) -> Response<Vec<u8>> {
    refusal(
        StatusCode::BAD_REQUEST,
        &Refusal::new("invalid_field", &message.into()).field(field),
    )
}

/// The 400 for an address the address policy refuses.
fn refused_address(field: &str, addr: SocketAddr, why: Refused) -> Response<Vec<u8>> {
    bad_field(field, format!("{addr} is refused: {why}"))
}

/// The registration tokens a caller's bearer token matched (normally one).
struct Scope(Vec<RegistryToken>);

impl Scope {
    fn allows(&self, service: &str) -> bool {
        self.0.iter().any(|t| t.allows(service))
    }

    /// An instance of `service` may use `addr` if a token that may touch the service
    /// allows it.
    fn allows_address(&self, service: &str, addr: SocketAddr) -> bool {
        self.0
            .iter()
            .any(|t| t.allows(service) && t.allows_address(addr.ip()))
    }
}

/// A route under `/v1/services`.
enum Call<'a> {
    List,
    Service(&'a str),
    Instance(&'a str, &'a str),
    Heartbeat(&'a str, &'a str),
}

fn parse_path(path: &str) -> Option<Call<'_>> {
    let rest = path.strip_prefix("/v1/services")?;
    if rest.is_empty() || rest == "/" {
        return Some(Call::List);
    }
    let parts: Vec<&str> = rest.strip_prefix('/')?.split('/').collect();
    match parts.as_slice() {
        [s] => Some(Call::Service(s)),
        [s, "instances", id] => Some(Call::Instance(s, id)),
        [s, "instances", id, "heartbeat"] => Some(Call::Heartbeat(s, id)),
        _ => None,
    }
}

fn valid_instance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LABEL
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn label_ok(v: &str) -> bool {
    v.len() <= MAX_LABEL && !v.chars().any(char::is_control)
}

/// Parses a registration body for instance `id` of `service` into a [`Registration`], or
/// the 400 reply naming the bad field. Pure: the fuzz targets call it directly.
pub fn parse_registration(
    service: &str,
    id: &str,
    body: &[u8],
    default_ttl: Duration,
) -> Result<Registration, Response<Vec<u8>>> {
    RegistrationApi::parse_body(service, id, body, default_ttl)
}

impl RegistrationApi {
    /// The tokens the caller's bearer token matches, or the refusal.
    fn authenticate(&self, session: &ServerSession) -> Result<Scope, Response<Vec<u8>>> {
        let Some(given) = crate::bearer::token(&session.req_header().headers) else {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <registration token>",
            ));
        };
        let hash: [u8; 32] = sha2::Sha256::digest(given).into();
        let snap = self.state.load();
        // Every token is compared (no early exit), each in constant time.
        let matched = snap
            .config
            .registry
            .tokens
            .iter()
            .filter(|t| crate::bearer::same_secret(&t.sha256, &hash))
            .cloned()
            .collect::<Vec<_>>();
        if matched.is_empty() {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown registration token",
            ));
        }
        Ok(Scope(matched))
    }

    /// A token only learns about the services it is scoped to: out of scope is 403 whether
    /// or not the service exists, so this comes before any look-up. A malformed name is
    /// a 400 first: it cannot exist, so saying so reveals nothing.
    fn scope_check(scope: &Scope, service: &str) -> Result<(), Response<Vec<u8>>> {
        if !valid_identifier(service) {
            return Err(bad_field(
                "service",
                "a service name is 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter",
            ));
        }
        if scope.allows(service) {
            Ok(())
        } else {
            Err(error(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this token may not touch service \"{service}\""),
            ))
        }
    }

    /// For a caller in scope: whether `service` is configured and takes registrations.
    fn known_service(&self, service: &str) -> Result<(), Response<Vec<u8>>> {
        let snap = self.state.load();
        match snap.service(service) {
            Some(s) if s.config.registration => Ok(()),
            Some(_) => Err(error(
                StatusCode::FORBIDDEN,
                "registration_disabled",
                format!(
                    "service \"{service}\" does not take registrations (set registration = true)"
                ),
            )),
            None => Err(error(
                StatusCode::NOT_FOUND,
                "unknown_service",
                format!("no service \"{service}\" is configured"),
            )),
        }
    }

    /// Whether the instance's `tls` fits its service: the service's `protocol` is the
    /// floor (an instance of an `https` or `h2` service cannot ask for plaintext: the
    /// operator asked for TLS). An `http1` service's instances that say `"tls": true` are
    /// reached over HTTP/1.1 over TLS, an `h2c` one's over h2 over TLS.
    fn check_tls(&self, reg: &Registration) -> Result<(), Response<Vec<u8>>> {
        let snap = self.state.load();
        let Some(svc) = snap.service(&reg.service) else {
            return Ok(());
        };
        let protocol = svc.config.protocol;
        if protocol.is_tls() && reg.tls == Some(false) {
            return Err(bad_field(
                "tls",
                format!(
                    "service \"{}\" is protocol = \"{}\": its instances are reached over TLS",
                    reg.service,
                    protocol.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// Whether `addr` reaches the registration listener where it is now: a reload may
    /// have moved it since `listeners` (the ones fixed until a restart) was made.
    fn registration_listener_at(&self, addr: SocketAddr) -> bool {
        self.state
            .live
            .registration
            .addr()
            .is_some_and(|l| OwnListeners::of(&[l]).reached_by(addr))
    }

    /// What only the running node can judge of a parsed registration: its own listeners
    /// (400 naming the field) and the token's networks (403 naming the address).
    fn check_addresses(&self, reg: &Registration, scope: &Scope) -> Result<(), Response<Vec<u8>>> {
        let fields = [("address", Some(reg.address)), ("sidecar", reg.sidecar)];
        for (field, addr) in fields {
            let Some(addr) = addr else { continue };
            if self.listeners.reached_by(addr) || self.registration_listener_at(addr) {
                return Err(refused_address(field, addr, Refused::OwnListener));
            }
        }
        for (field, addr) in fields {
            let Some(addr) = addr else { continue };
            if !scope.allows_address(&reg.service, addr) {
                let message = format!(
                    "this token may not register {addr}: it is outside the token's addresses"
                );
                return Err(refusal(
                    StatusCode::FORBIDDEN,
                    &Refusal::new("forbidden_address", &message).field(field),
                ));
            }
        }
        Ok(())
    }

    async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
        crate::base::api::read_body(session, MAX_BODY, "a registration body")
            .await
            .map_err(|(status, code, message)| error(status, code, message))
    }

    /// Parses and checks a registration body; the error is the 400 reply naming the field.
    pub fn parse_body(
        service: &str,
        id: &str,
        body: &[u8],
        default_ttl: Duration,
    ) -> Result<Registration, Response<Vec<u8>>> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        let b: RegisterBody = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let field = if path == "." {
                // Missing or unknown fields are named in serde's message.
                inner
                    .to_string()
                    .split('`')
                    .nth(1)
                    .unwrap_or("body")
                    .to_string()
            } else {
                path
            };
            bad_field(&field, inner.to_string())
        })?;
        let address: SocketAddr = b.address.parse().map_err(|_| {
            bad_field(
                "address",
                format!("\"{}\" is not an ip:port address", b.address),
            )
        })?;
        address::check_kind(address).map_err(|why| refused_address("address", address, why))?;
        let sidecar =
            match &b.sidecar {
                None => None,
                Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
                    bad_field("sidecar", format!("\"{s}\" is not an ip:port address"))
                })?),
            };
        if let Some(s) = sidecar {
            address::check_kind(s).map_err(|why| refused_address("sidecar", s, why))?;
        }
        let weight = b.weight.unwrap_or(1);
        if !(1..=10_000).contains(&weight) {
            return Err(bad_field("weight", "weight must be between 1 and 10000"));
        }
        let ttl = b.ttl.map_or(default_ttl, Duration::from_secs);
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(bad_field(
                "ttl",
                format!(
                    "ttl must be between {} and {} seconds",
                    MIN_TTL.as_secs(),
                    MAX_TTL.as_secs()
                ),
            ));
        }
        for (field, v) in [("zone", &b.zone), ("version", &b.version)] {
            if v.as_deref().is_some_and(|v| !label_ok(v)) {
                return Err(bad_field(
                    field,
                    format!("at most {MAX_LABEL} printable characters"),
                ));
            }
        }
        if b.metadata.len() > MAX_METADATA
            || b.metadata.iter().any(|(k, v)| {
                k.is_empty() || k.len() > MAX_METADATA_KEY || v.len() > MAX_METADATA_VALUE
            })
        {
            return Err(bad_field(
                "metadata",
                format!(
                    "at most {MAX_METADATA} entries, keys 1-{MAX_METADATA_KEY} bytes, values up to {MAX_METADATA_VALUE} bytes"
                ),
            ));
        }
        Ok(Registration {
            service: service.to_string(),
            id: id.to_string(),
            address,
            sidecar,
            weight,
            zone: b.zone,
            version: b.version,
            metadata: b.metadata,
            ttl_secs: ttl.as_secs(),
            tls: b.tls,
        })
    }

    fn describe(&self, service: &str) -> Value {
        let snap = self.state.load();
        let store = &self.state.registry;
        let now = now_ms();
        let health: Vec<Value> = snap
            .service(service)
            .map(|s| {
                s.instances()
                    .instances
                    .iter()
                    .map(|i| {
                        json!({
                            "id": i.id,
                            "address": i.addr.to_string(),
                            "sidecar": i.sidecar.as_ref().map(|(a, s)| json!({
                                "addr": a.to_string(),
                                "up": s.is_up(),
                            })),
                            "path": i.sidecar.as_ref().map(|(_, s)| {
                                s.choose(
                                    snap.service(service).map_or(crate::config::PathPreference::Sidecar, |x| x.config.prefer),
                                    snap.service(service).map_or(crate::config::DEFAULT_HOLD_DOWN, |x| x.config.hold_down),
                                    i.health.is_available(),
                                    now,
                                ).as_str()
                            }).unwrap_or("direct"),
                            "path_reason": i.sidecar.as_ref().map(|(_, s)| if s.is_up() { "sidecar healthy or in hold-down" } else { "sidecar down" }),
                            "weight": i.weight,
                            "tls": i.tls.is_some(),
                            "zone": i.registration.as_ref().and_then(|r| r.zone.clone()),
                            "version": i.registration.as_ref().and_then(|r| r.version.clone()),
                            "metadata": i.registration.as_ref().map(|r| json!(r.metadata)),
                            "source": if i.registration.is_some() { "registered" } else if i.dns.is_some() { "dns" } else { "config" },
                            "dns_name": i.dns.as_deref(),
                            "health": i.health.state().as_str(),
                            "ejected_for_ms": i.health.ejection_left(now).map(|d| d.as_millis() as u64),
                            "lease_left_ms": store.lease_left(service, &i.id).map(|d| d.as_millis() as u64),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        json!({ "name": service, "instances": health })
    }

    /// An acknowledged write is routable on this node before the reply leaves; the sync
    /// task brings every other view (and the disk snapshot) along.
    fn apply_now(&self, service: &str, id: &str, ok: bool) {
        if !ok {
            return;
        }
        // What an older snapshot or a peer said of this instance is superseded.
        self.refused.forget(service, id);
        if let Some(svc) = self.state.load().service(service) {
            svc.set_registered(&self.state.registry.instances(service));
        }
    }

    fn write_result(op: &str, r: Result<Value, WriteError>) -> Response<Vec<u8>> {
        let (status, body, result) = match r {
            Ok(v) => (StatusCode::OK, v, "ok"),
            Err(WriteError::NotFound(e)) => (
                StatusCode::NOT_FOUND,
                Refusal::new("not_registered", &format!("{e}; register again")).to_value(),
                "not_found",
            ),
            Err(WriteError::Unavailable(m)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Refusal::new(
                    "registry_unavailable",
                    &format!("the registry store is unreachable, try again: {m}"),
                )
                .to_value(),
                "unavailable",
            ),
        };
        METRICS.registrations.with_label_values(&[op, result]).inc();
        reply(status, body)
    }

    async fn handle(
        &self,
        session: &mut ServerSession,
    ) -> Result<Response<Vec<u8>>, Response<Vec<u8>>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let call = parse_path(&path)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"))?;
        let scope = self.authenticate(session)?;
        match (method, call) {
            (Method::GET, Call::List) => {
                let snap = self.state.load();
                let all: Vec<Value> = snap
                    .services
                    .iter()
                    .map(|s| s.name())
                    .filter(|n| scope.allows(n))
                    .map(|n| self.describe(n))
                    .collect();
                Ok(reply(StatusCode::OK, json!({ "services": all })))
            }
            (Method::GET, Call::Service(s)) => {
                Self::scope_check(&scope, s)?;
                if self.state.load().service(s).is_none() {
                    return Err(error(
                        StatusCode::NOT_FOUND,
                        "unknown_service",
                        format!("no service \"{s}\""),
                    ));
                }
                Ok(reply(StatusCode::OK, self.describe(s)))
            }
            (Method::PUT, Call::Instance(s, id)) => {
                Self::scope_check(&scope, s)?;
                self.known_service(s)?;
                if !valid_instance_id(id) {
                    return Err(bad_field(
                        "id",
                        "an instance id is 1-128 characters of A-Z, a-z, 0-9, '-', '_', '.', ':'",
                    ));
                }
                let body = Self::read_body(session).await?;
                let default_ttl = self.state.load().config.registry.default_ttl;
                let reg = parse_registration(s, id, &body, default_ttl)?;
                self.check_addresses(&reg, &scope)?;
                self.check_tls(&reg)?;
                let ttl = reg.ttl_secs;
                let r = self.writer.register(reg).await.map(|()| {
                    json!({ "status": "registered", "service": s, "id": id, "ttl": ttl, "heartbeat_every": heartbeat_every(ttl) })
                });
                self.apply_now(s, id, r.is_ok());
                Ok(Self::write_result("register", r))
            }
            (Method::PUT, Call::Heartbeat(s, id)) => {
                Self::scope_check(&scope, s)?;
                self.known_service(s)?;
                let r = self
                    .writer
                    .heartbeat(s, id)
                    .await
                    .map(|ttl| json!({ "status": "renewed", "ttl": ttl.as_secs() }));
                Ok(Self::write_result("heartbeat", r))
            }
            (Method::DELETE, Call::Instance(s, id)) => {
                Self::scope_check(&scope, s)?;
                self.known_service(s)?;
                let r = self
                    .writer
                    .deregister(s, id)
                    .await
                    .map(|()| json!({ "status": "deregistered", "service": s, "id": id }));
                self.apply_now(s, id, r.is_ok());
                Ok(Self::write_result("deregister", r))
            }
            _ => Err(error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "see the registration API in README.md",
            )),
        }
    }
}

#[async_trait]
impl ServeHttp for RegistrationApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if let Some(refusal) = crate::base::api::forwarded_by_busbar(session) {
            return refusal;
        }
        match self.handle(session).await {
            Ok(r) | Err(r) => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse() {
        assert!(matches!(parse_path("/v1/services"), Some(Call::List)));
        assert!(matches!(
            parse_path("/v1/services/a"),
            Some(Call::Service("a"))
        ));
        assert!(matches!(
            parse_path("/v1/services/a/instances/i1"),
            Some(Call::Instance("a", "i1"))
        ));
        assert!(matches!(
            parse_path("/v1/services/a/instances/i1/heartbeat"),
            Some(Call::Heartbeat("a", "i1"))
        ));
        assert!(parse_path("/v1/services/a/instances").is_none());
        assert!(parse_path("/v2/x").is_none());
    }

    #[test]
    fn addresses_no_instance_can_have_name_their_field() {
        let field = |body: &str| {
            let r = parse_registration("s", "i", body.as_bytes(), Duration::from_secs(30))
                .expect_err(body);
            let v: Value = serde_json::from_slice(r.body()).unwrap();
            (r.status(), v["field"].as_str().unwrap_or("").to_string())
        };
        assert_eq!(
            field(r#"{"address":"169.254.169.254:80"}"#),
            (StatusCode::BAD_REQUEST, "address".into())
        );
        assert_eq!(
            field(r#"{"address":"10.0.0.1:80","sidecar":"[::ffff:169.254.169.254]:80"}"#),
            (StatusCode::BAD_REQUEST, "sidecar".into())
        );
        assert!(parse_registration(
            "s",
            "i",
            br#"{"address":"10.0.0.1:80","sidecar":"10.0.0.1:15001"}"#,
            Duration::from_secs(30)
        )
        .is_ok());
    }

    #[test]
    fn instance_ids() {
        assert!(valid_instance_id("orders-1.zone:a"));
        assert!(!valid_instance_id(""));
        assert!(!valid_instance_id("a/b"));
        assert!(!valid_instance_id(&"x".repeat(200)));
    }
}
