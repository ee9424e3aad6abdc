//! The services listing: each service and its instances as the admin API
//! (`GET /v1/services`) and the console (`GET /console/api/services`) show them, in one
//! JSON shape, so the two never tell an operator different things.
//!
//! Owns: that shape. Must not: change state, or decide who may read it (the callers'
//! token checks do).

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{json, Value};

use crate::model::health::now_ms;
use crate::model::{Instance, InstanceSet};
use crate::registry::store::Store;
use crate::snapshot::State;

/// Every service of the running snapshot with its instances, the generation they belong
/// to and the registry's mode.
pub fn services(state: &State) -> Value {
    let snap = state.load();
    let store = &state.registry;
    let now = now_ms();
    let services: Vec<Value> = snap
        .services
        .iter()
        .map(|s| {
            let set = s.instances();
            let instances: Vec<Value> = set
                .instances
                .iter()
                .enumerate()
                .map(|(n, i)| instance(&set, n, i, store, now))
                .collect();
            json!({
                "name": s.name(),
                "protocol": s.config.protocol.as_str(),
                "balance": s.config.balance.as_str(),
                "registration": s.config.registration,
                "panic_mode": s.panic.load(Relaxed),
                "instances": instances,
            })
        })
        .collect();
    json!({
        "generation": snap.generation,
        "degraded": store.degraded(),
        "self_preservation": store.self_preservation(),
        "services": services,
    })
}

/// Instance `i`, the `n`th of `set`: where it is, where it came from, its version and
/// zone, its health and load, its sidecar, and its lease.
fn instance(set: &InstanceSet, n: usize, i: &Instance, store: &Store, now: u64) -> Value {
    let reg = i.registration.as_deref();
    json!({
        "id": i.id,
        "addr": i.addr.to_string(),
        "source": if reg.is_some() { "registered" } else if i.dns.is_some() { "dns" } else { "config" },
        "dns_name": i.dns.as_deref(),
        "version": set.versions.name_of(n),
        "zone": reg.and_then(|r| r.zone.as_deref()),
        "weight": i.weight,
        // Reached over TLS (an https service, or a registration that said "tls": true).
        "tls": i.tls.is_some(),
        "health": i.health.state().as_str(),
        "ejected_for_ms": i.health.ejection_left(now).map(|d| d.as_millis() as u64),
        "in_flight": i.health.in_flight(),
        "sidecar": i.sidecar.as_ref().map(|(a, st)| json!({
            "addr": a.to_string(),
            "up": st.is_up(),
            "path": st.last_path().map(|p| p.as_str()),
        })),
        // Only for leases this node holds; etcd holds the others'.
        "ttl_secs": reg.map(|r| r.ttl_secs),
        "ttl_left_ms": reg.and_then(|r| store.lease_left(&r.service, &r.id)).map(|d| d.as_millis() as u64),
    })
}
