//! Mesh fallback: busbar as the path of last resort when sidecars are down.
//!
//! Provider side (`path`, the per-instance state in `model::sidecar`): an instance
//! registered with a sidecar is reached through it while it is healthy, straight at its
//! app port when it is not.
//! Caller side (this file, `connect`): a caller whose own sidecar is down sends to busbar
//! as it would to the mesh — `Host: orders`, `Host: orders.<mesh domain>`, absolute-form
//! `GET http://orders/…` (HTTP_PROXY), `:authority orders`, or `CONNECT orders:443` — and
//! busbar routes by service name where no TOML route matched.
//! Must not: open busbar as a proxy to arbitrary hosts: only configured services resolve.

pub mod connect;
/// The sidecar path state lives in the model (instances carry it); the request path
/// names it from here.
pub use crate::model::sidecar as path;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::model::sidecar::Path;

use crate::config::{
    Config, HeaderEdit, PathMatch, PathPreference, Rewrite, RouteConfig, DEFAULT_MAX_BODY,
};
use crate::metrics::RouteMetrics;
use crate::model::{Instance, Service};
use crate::routing::Route;

/// Where to send a request for `inst`: its sidecar or its app port, by the service's
/// preference and the sidecar's state. Logs and counts a path switch once.
pub fn target(svc: &Service, inst: &Instance, now_ms: u64) -> (SocketAddr, Option<Path>) {
    let Some((sidecar, state)) = &inst.sidecar else {
        return (inst.addr, None);
    };
    let p = state.choose(
        svc.config.prefer,
        svc.config.hold_down,
        inst.health.is_available(),
        now_ms,
    );
    if let Some(sw) = state.note_path(p) {
        if sw.from.is_some() {
            svc.metrics.path_switch(p.as_str()).inc();
            tracing::warn!(service = svc.name(), instance = %inst.id, from = sw.from.map_or("none", Path::as_str), to = p.as_str(), "instance path switched");
        }
    }
    if p != Path::Sidecar && svc.config.prefer == PathPreference::Sidecar {
        svc.metrics.fallback_sidecar_down.inc();
    }
    match p {
        Path::Sidecar => (*sidecar, Some(p)),
        Path::Direct | Path::Out => (inst.addr, Some(p)),
    }
}

/// One implicit route per service, used when a request names the service as its host.
pub fn mesh_routes(config: &Config, services: &[Arc<Service>]) -> HashMap<String, Arc<Route>> {
    if !config.mesh.enabled {
        return HashMap::new();
    }
    services
        .iter()
        .map(|svc| {
            let name = format!("mesh:{}", svc.name());
            let route = Route {
                metrics: RouteMetrics::new(&name, svc.name()),
                config: RouteConfig {
                    name,
                    hosts: Vec::new(),
                    path: PathMatch::Any,
                    methods: Vec::new(),
                    headers: Vec::new(),
                    service: svc.name().to_string(),
                    rewrite: Rewrite::None,
                    timeout: None,
                    max_body: DEFAULT_MAX_BODY,
                    request_headers: HeaderEdit::default(),
                    response_headers: HeaderEdit::default(),
                    admission: Default::default(),
                },
                service: svc.clone(),
            };
            (svc.name().to_string(), Arc::new(route))
        })
        .collect()
}

/// The service a host names: `orders`, or `orders.<domain>` for a configured mesh domain.
/// The host has no port. Case is ignored; anything else is `None`.
pub fn service_name<'h>(host: &'h str, domains: &[String]) -> Option<&'h str> {
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    let name = domains
        .iter()
        .find_map(|d| {
            let cut = host.len().checked_sub(d.len())?;
            let tail = host.get(cut..)?;
            tail.eq_ignore_ascii_case(d)
                .then(|| host.get(..cut))
                .flatten()
        })
        .unwrap_or(host);
    (!name.is_empty() && !name.contains('.')).then_some(name)
}

/// The implicit route for `host`, if mesh fallback is on and it names a known service.
pub fn route_for_host<'s>(
    routes: &'s HashMap<String, Arc<Route>>,
    host: &str,
    domains: &[String],
) -> Option<&'s Arc<Route>> {
    if routes.is_empty() {
        return None;
    }
    let name = service_name(host, domains)?;
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return routes.get(&name.to_ascii_lowercase());
    }
    routes.get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_from_hosts() {
        let d = vec![".svc.cluster.local".to_string()];
        assert_eq!(service_name("orders", &d), Some("orders"));
        assert_eq!(service_name("orders.svc.cluster.local", &d), Some("orders"));
        assert_eq!(service_name("Orders.SVC.cluster.local", &d), Some("Orders"));
        assert_eq!(service_name("orders.example.com", &d), None);
        assert_eq!(service_name("a.b.svc.cluster.local", &d), None);
        assert_eq!(service_name(".svc.cluster.local", &d), None);
        assert_eq!(service_name("", &d), None);
    }
}
