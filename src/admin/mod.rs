//! The admin API on its own listener (loopback by default).
//!
//! Owns: `/livez`, `/readyz`, `/healthz`, `/metrics` (also alone on `listen.metrics`,
//! [`MetricsApi`]), `/v1/routes`, `/v1/services` (its shape is `listing`'s, shared with
//! the console), `/v1/reload`, `/v1/logs/reopen`; the release
//! and config-history calls (`/v1/releases…`, `/v1/config/…`) are `release::admin`'s, the
//! console under `/console/` is `console`'s.
//! Who may call what: `/livez`, `/readyz`, `/healthz`, `/metrics` and the console's pages
//! are open to whoever reaches the listener; the reads that show topology or config
//! history (`/v1/routes`, `/v1/services`, `/v1/registry`, `GET /v1/releases`,
//! `GET /v1/config/history`, the console's data) need
//! `Authorization: Bearer $BUSBAR_ADMIN_TOKEN` unless `[admin] open_reads = true` (the
//! console's data always does); anything that changes state always needs it. With no
//! token configured those are refused. Nothing is answered through busbar's own data
//! plane (a request whose `Via` names a busbar hop gets 403).
//! Must not: hold policy; it reports state and asks `snapshot` to reload.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::base::api::{self as replies, error, json_reply, reply};
use crate::snapshot::State;

/// The environment variable that holds the admin token.
pub const TOKEN_ENV: &str = "BUSBAR_ADMIN_TOKEN";

pub struct AdminApi {
    pub state: Arc<State>,
    /// `None`: no token configured, so state-changing calls are refused.
    pub token: Option<String>,
    /// Instances from etcd or the snapshot that this node does not route (`/v1/registry`).
    pub refused: Arc<crate::registry::gate::Gate>,
    /// Starting, ready or draining (`/readyz`).
    pub readiness: Arc<crate::ready::Readiness>,
    /// Reopened by `POST /v1/logs/reopen`.
    pub access_log: Arc<crate::accesslog::AccessLog>,
}

impl AdminApi {
    /// `None` when the caller may change state; otherwise the refusal to send.
    fn authorize(&self, session: &ServerSession) -> Option<Response<Vec<u8>>> {
        self.check_token(
            session,
            "set BUSBAR_ADMIN_TOKEN in busbar's environment to enable state-changing admin calls",
        )
    }

    /// `None` when the caller may read topology and config history: the reads are open
    /// (`[admin] open_reads`, read from the running snapshot, so a reload applies it), or
    /// it sent the token. Otherwise the refusal a write would get.
    fn authorize_read(&self, session: &ServerSession) -> Option<Response<Vec<u8>>> {
        if self.state.load().config.admin.open_reads {
            return None;
        }
        self.check_token(
            session,
            "set BUSBAR_ADMIN_TOKEN in busbar's environment and send it, or set [admin] open_reads = true, to read the admin API",
        )
    }

    /// The admin token check; `unconfigured` is the message when no token is set.
    fn check_token(
        &self,
        session: &ServerSession,
        unconfigured: &str,
    ) -> Option<Response<Vec<u8>>> {
        let Some(token) = &self.token else {
            return Some(error(
                StatusCode::FORBIDDEN,
                "admin_token_not_configured",
                unconfigured,
            ));
        };
        match crate::bearer::token(&session.req_header().headers) {
            None => Some(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <admin token>",
            )),
            Some(g) if crate::bearer::same_secret(g, token.as_bytes()) => None,
            Some(_) => Some(error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "wrong admin token",
            )),
        }
    }

    fn routes(&self) -> Value {
        let snap = self.state.load();
        let routes: Vec<Value> = snap
            .routes
            .routes()
            .iter()
            .map(|r| {
                let c = &r.config;
                json!({
                    "name": c.name,
                    "hosts": c.hosts.iter().map(|h| match h {
                        crate::config::HostMatch::Exact(n) => n.clone(),
                        crate::config::HostMatch::Suffix(s) => format!("*{s}"),
                    }).collect::<Vec<_>>(),
                    "path": match &c.path {
                        crate::config::PathMatch::Any => json!({"prefix": "/"}),
                        crate::config::PathMatch::Exact(p) => json!({"exact": p}),
                        crate::config::PathMatch::Prefix(p) => json!({"prefix": p}),
                    },
                    "methods": c.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                    "headers": c.headers.iter().map(|(k, v)| (k.as_str().to_string(), json!(v.to_str().unwrap_or("")))).collect::<serde_json::Map<_, _>>(),
                    "service": c.service,
                    "timeout_ms": c.timeout.map(|t| t.as_millis() as u64),
                    "max_body": c.max_body,
                })
            })
            .collect();
        json!({ "generation": snap.generation, "routes": routes })
    }

    fn registry(&self) -> Value {
        let snap = self.state.load();
        let store = &self.state.registry;
        let r = &snap.config.registry;
        json!({
            "backend": match &r.backend {
                crate::config::RegistryBackend::Embedded => "embedded",
                crate::config::RegistryBackend::Etcd { .. } => "etcd",
            },
            // Where the registration API listens now (null: closed, as no service takes
            // registrations), not what the file says until a reload applied it.
            "listen": self.state.live.registration.addr().map(|a| a.to_string()),
            "snapshot": r.snapshot.display().to_string(),
            "instances": store.all().len(),
            "degraded": store.degraded(),
            "self_preservation": store.self_preservation(),
            "refused": self.refused.list(),
        })
    }

    fn reload(&self) -> Response<Vec<u8>> {
        match self.state.reload() {
            Ok(o) => json_reply(
                StatusCode::OK,
                json!({
                    "status": "reloaded",
                    "generation": o.generation,
                    "applied": o.applied,
                    "not_applied": o.not_applied,
                    "note": if o.not_applied.is_empty() { Value::Null } else {
                        json!("these settings need a restart or a graceful upgrade to take effect")
                    },
                }),
            ),
            Err(e) => error(StatusCode::BAD_REQUEST, "config_invalid", &e),
        }
    }

    fn reopen_logs(&self) -> Response<Vec<u8>> {
        use crate::accesslog::Reopened;
        match self.access_log.reopen_logged("POST /v1/logs/reopen") {
            Ok(Reopened::File(p)) => json_reply(
                StatusCode::OK,
                json!({ "status": "reopened", "access_log": p.display().to_string() }),
            ),
            Ok(Reopened::NotAFile) => json_reply(
                StatusCode::OK,
                json!({ "status": "not_a_file", "note": "the access log goes to stdout or is off: nothing to reopen" }),
            ),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "reopen_failed",
                format!("cannot reopen the access log (still writing to the old file): {e}"),
            ),
        }
    }
}

/// `/metrics` in the Prometheus text format.
fn metrics_reply() -> Response<Vec<u8>> {
    reply(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        crate::metrics::render(),
    )
}

/// The `listen.metrics` listener: `GET /metrics` and nothing else, so Prometheus can
/// scrape a node without reaching the admin API's reads and calls.
pub struct MetricsApi;

#[async_trait]
impl ServeHttp for MetricsApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if let Some(refusal) = replies::forwarded_by_busbar(session) {
            return refusal;
        }
        let req = session.req_header();
        match (&req.method, req.uri.path()) {
            (&Method::GET, "/metrics") => metrics_reply(),
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "this listener serves GET /metrics only",
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApi {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if let Some(refusal) = replies::forwarded_by_busbar(session) {
            return refusal;
        }
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        match (method, path.as_str()) {
            // The process answers: for a liveness check that must not fail on a busy
            // or degraded node (a restart would not help).
            (Method::GET, "/livez") => json_reply(StatusCode::OK, json!({ "status": "live" })),
            // Take traffic or not: 503 until every listener accepts, and again from the
            // start of a drain or an upgrade handover.
            (Method::GET, "/readyz") => {
                let status = if self.readiness.is_ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_reply(
                    status,
                    json!({
                        "status": self.readiness.phase(),
                        "generation": self.state.load().generation,
                        "version": crate::version::VERSION,
                        "commit": crate::version::COMMIT,
                        "built": crate::version::BUILD_DATE,
                        "pid": std::process::id(),
                    }),
                )
            }
            (Method::GET, "/healthz") => {
                let degraded = self.state.registry.degraded();
                json_reply(
                    StatusCode::OK,
                    json!({
                        "status": if degraded { "degraded" } else { "ok" },
                        "registry": if degraded { "unreachable: routing from memory and snapshot" } else { "ok" },
                    }),
                )
            }
            (Method::GET, "/metrics") => metrics_reply(),
            (Method::GET, "/v1/routes" | "/v1/services" | "/v1/registry") => {
                if let Some(refusal) = self.authorize_read(session) {
                    return refusal;
                }
                let body = match path.as_str() {
                    "/v1/routes" => self.routes(),
                    "/v1/services" => crate::listing::services(&self.state),
                    _ => self.registry(),
                };
                json_reply(StatusCode::OK, body)
            }
            // The console's pages are open like the reads; its own data reads need the
            // token (the browser sends it on every call).
            (m, p) if crate::console::handles(p) => {
                if crate::console::needs_token(p) {
                    if let Some(refusal) = self.authorize(session) {
                        return crate::console::refuse(refusal);
                    }
                }
                let ctx = crate::console::api::Context {
                    state: &self.state,
                    readiness: &self.readiness,
                };
                crate::console::serve(&ctx, &m, p)
            }
            (m, p) if crate::release::admin::handles(p) => {
                let refusal = if m == Method::GET {
                    self.authorize_read(session)
                } else {
                    self.authorize(session)
                };
                if let Some(refusal) = refusal {
                    return refusal;
                }
                let (status, v) = crate::release::admin::serve(&self.state, session, &m, p).await;
                json_reply(status, v)
            }
            (Method::POST, "/v1/reload") => match self.authorize(session) {
                Some(refusal) => refusal,
                None => self.reload(),
            },
            (Method::POST, "/v1/logs/reopen") => match self.authorize(session) {
                Some(refusal) => refusal,
                None => self.reopen_logs(),
            },
            (
                _,
                "/livez" | "/readyz" | "/healthz" | "/metrics" | "/v1/routes" | "/v1/services"
                | "/v1/registry" | "/v1/reload" | "/v1/logs/reopen",
            ) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "see the admin API in README.md",
            ),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        }
    }
}
