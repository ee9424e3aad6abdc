//! The console's read endpoints, `GET /console/api/{name}`: what its pages show beside
//! the admin API's reads (an overview of the node, the admission settings per route, the
//! users refused most often (a bounded top list), the running configuration with secrets
//! redacted), and the services listing, which is the admin API's (`listing`).
//!
//! Owns: the JSON shapes of those reads but the services listing.
//! Must not: change state or compute what the browser can (request rates and error
//! shares come from `/metrics`, diffed by the page between two refreshes).

use serde_json::{json, Value};

use crate::config::IdentitySource;
use crate::snapshot::State;

/// Where the console's reads live.
pub const PREFIX: &str = "/console/api/";

/// What the reads look at: the admin API's own handles.
pub struct Context<'a> {
    pub state: &'a State,
    pub readiness: &'a crate::ready::Readiness,
}

/// The read named `what` (the path after [`PREFIX`]); `None` for an unknown name.
pub fn read(ctx: &Context<'_>, what: &str) -> Option<Value> {
    match what {
        "overview" => Some(overview(ctx)),
        // The admin API's `/v1/services`: one shape for both.
        "services" => Some(crate::listing::services(ctx.state)),
        "admission" => Some(admission(ctx.state)),
        "config" => Some(config(ctx.state)),
        _ => None,
    }
}

fn ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This node, the cluster it knows and the configuration it runs.
fn overview(ctx: &Context<'_>) -> Value {
    let snap = ctx.state.load();
    let c = &snap.config;
    let store = &ctx.state.registry;
    json!({
        "node": {
            // The `[cluster] node_id` when there is one (its name in the live-node set),
            // else the pseudonym this process puts in `Via`.
            "id": c.cluster.as_ref().map_or_else(|| crate::via::node().id().to_string(), |k| k.node_id.clone()),
            "version": crate::version::VERSION,
            "commit": crate::version::COMMIT,
            "pid": std::process::id(),
            "phase": ctx.readiness.phase(),
            "admin": c.listen.admin.to_string(),
        },
        "cluster": {
            "registry": match &c.registry.backend {
                crate::config::RegistryBackend::Embedded => "embedded",
                crate::config::RegistryBackend::Etcd { .. } => "etcd",
            },
            "redis": c.cluster.is_some(),
            "degraded": store.degraded(),
        },
        "config": {
            "file": c.source.display().to_string(),
            "generation": snap.generation,
            "hash": format!("{:012x}", c.hash),
            "loaded_at_ms": ms(snap.loaded_at),
            "routes": c.routes.len(),
            "services": c.services.len(),
        },
    })
}

fn identity_name(i: &IdentitySource) -> String {
    match i {
        IdentitySource::Header(h) => format!("header:{h}"),
        IdentitySource::Jwt(None) => "jwt".to_string(),
        IdentitySource::Jwt(Some(n)) => format!("jwt:{n}"),
        IdentitySource::ApiKey => "api_key".to_string(),
        IdentitySource::ClientIp => "client_ip".to_string(),
    }
}

/// Users in the admission page's top list of refusals.
const TOP_REFUSED: usize = 20;

/// Per route: who it admits, how often and how many wait; live counts are in `/metrics`.
fn admission(state: &State) -> Value {
    let snap = state.load();
    let c = &snap.config;
    let routes: Vec<Value> = c
        .routes
        .iter()
        .map(|r| {
            let a = &r.admission;
            let max_in_flight = c
                .services
                .iter()
                .find(|s| s.name == r.service)
                .and_then(|s| s.max_in_flight);
            json!({
                "route": r.name,
                "service": r.service,
                "configured": a.configured,
                "identity": a.identity.iter().map(identity_name).collect::<Vec<_>>(),
                "require_auth": a.require_auth,
                "rate_limit": a.rate_limit.as_ref().map(|l| json!({
                    "count": l.rate.count,
                    "per_ms": l.rate.per.as_millis() as u64,
                    "burst": l.burst,
                    "global": l.global.map(|(g, b)| json!({
                        "count": g.count,
                        "per_ms": g.per.as_millis() as u64,
                        "burst": b,
                    })),
                    "max_users": l.max_users,
                    "scope": match l.scope {
                        crate::config::LimitScope::Node => "node",
                        crate::config::LimitScope::Cluster => "cluster",
                    },
                })),
                "queue": {
                    "max_in_flight": max_in_flight,
                    "max_depth": a.queue.max_depth,
                    "max_wait_ms": a.queue.max_wait.as_millis() as u64,
                },
            })
        })
        .collect();
    json!({
        "generation": snap.generation,
        "routes": routes,
        "top_refused": snap.admission.stores().top_refused(TOP_REFUSED),
    })
}

/// The text of the running configuration, secrets redacted ([`super::redact`]).
fn config(state: &State) -> Value {
    let snap = state.load();
    let newest = state.history.entries().pop();
    json!({
        "file": snap.config.source.display().to_string(),
        "generation": snap.generation,
        "digest": newest.as_ref().map(|e| e.digest.clone()),
        "text": newest.map(|e| super::redact::redact(&e.text)),
    })
}
