//! Registrations this node learns from elsewhere — from a peer node through etcd, or from
//! the disk snapshot on start — held to this node's address policy before they route.
//!
//! The registration API checks an address against the listeners of the node it runs on.
//! A peer on another host therefore accepts "this node's address + its service port",
//! anyone who can write etcd skips every node's API, and a snapshot written under an
//! older config may name what is now one of this node's listeners. So every registration
//! that did not come through this node's own API passes [`Gate::admit`], with the same
//! rules (`config::address`, including this node's own listeners); a refused one never
//! reaches the store: it is not routed, not listed, not written back to the snapshot.
//! Every address a DNS answer gives for an endpoint name or SRV name (`registry::dns`)
//! passes the same check ([`Gate::admit_resolved`]): DNS is just as much from elsewhere.
//! A token's `addresses` cannot be checked here: etcd does not record which token wrote a
//! key, and the node that took the registration checked them.
//!
//! Owns: that check, the WARN logged once per (service, id) and address, the
//! `busbar_registrations_refused_total` count, and the list of refusals the admin API
//! shows. Must not: store instances (the store does), or run on the request path (the
//! own-listener check may cost a syscall).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::config::address::{self, OwnListeners, Refused};
use crate::metrics::METRICS;
use crate::registry::store::Registration;

/// Where a registration came from, when it was not this node's registration API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The etcd watch or re-list: written by a peer node (or by hand).
    Etcd,
    /// The registry snapshot file, read on start.
    Snapshot,
    /// An answer for an endpoint named by host or SRV (`registry::dns`).
    Dns,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Etcd => "etcd",
            Source::Snapshot => "snapshot",
            Source::Dns => "dns",
        }
    }
}

/// One instance this node does not route, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub service: String,
    pub id: String,
    /// `address` or `sidecar`.
    pub field: &'static str,
    pub address: SocketAddr,
    /// [`Refused::code`].
    pub reason: &'static str,
    /// Where it was first refused from.
    pub source: Source,
}

/// The address policy for registrations from elsewhere; see the module header.
pub struct Gate {
    own: OwnListeners,
    /// Refused instances still present where they came from, by (service, id): an entry
    /// goes when the instance is deleted, re-listed without it, or admitted, so this holds
    /// at most what etcd (or the snapshot) holds.
    refused: Mutex<BTreeMap<(String, String), Refusal>>,
}

impl Gate {
    /// A gate for the node that listens on `own`.
    pub fn new(own: OwnListeners) -> Gate {
        Gate {
            own,
            refused: Mutex::new(BTreeMap::new()),
        }
    }

    fn refused(&self) -> MutexGuard<'_, BTreeMap<(String, String), Refusal>> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `reg` may be routed on this node. A refusal is logged at WARN and counted
    /// the first time this (service, id) is refused at this address, not on every put
    /// or re-list that repeats it.
    pub fn admit(&self, reg: &Registration, source: Source) -> bool {
        // The check may probe a socket: never under the lock.
        let verdict = self.verdict(reg);
        self.judge(&reg.service, &reg.id, verdict, source)
    }

    /// Whether an address DNS gave for `service`'s endpoint `name` may be routed; a
    /// refusal is logged and counted once per (service, name, address), as for `admit`.
    pub fn admit_resolved(&self, service: &str, name: &str, addr: SocketAddr) -> bool {
        let verdict = address::check(addr, &self.own)
            .err()
            .map(|why| ("address", addr, why));
        let id = format!("{name}@{addr}");
        self.judge(service, &id, verdict, Source::Dns)
    }

    fn judge(
        &self,
        service: &str,
        id: &str,
        verdict: Option<(&'static str, SocketAddr, Refused)>,
        source: Source,
    ) -> bool {
        let Some((field, addr, why)) = verdict else {
            let mut refused = self.refused();
            if !refused.is_empty() {
                refused.remove(&(service.to_string(), id.to_string()));
            }
            return true;
        };
        let refusal = Refusal {
            service: service.to_string(),
            id: id.to_string(),
            field,
            address: addr,
            reason: why.code(),
            source,
        };
        let new = {
            let mut refused = self.refused();
            let key = (service.to_string(), id.to_string());
            let new = refused
                .get(&key)
                .is_none_or(|old| old.field != field || old.address != addr);
            if new {
                refused.insert(key, refusal);
            }
            new
        };
        if new && source == Source::Dns {
            tracing::warn!(service = %service, name = %id, address = %addr,
                "DNS answer refused, not routed on this node: {why}");
        } else if new {
            tracing::warn!(
                service = %service,
                id = %id,
                field,
                address = %addr,
                source = source.as_str(),
                "registration refused, not routed on this node: {why}"
            );
        }
        if new {
            METRICS
                .registrations_refused
                .with_label_values(&[source.as_str(), why.code()])
                .inc();
        }
        false
    }

    /// The first field of `reg` the policy refuses.
    fn verdict(&self, reg: &Registration) -> Option<(&'static str, SocketAddr, Refused)> {
        [("address", Some(reg.address)), ("sidecar", reg.sidecar)]
            .into_iter()
            .find_map(|(field, addr)| {
                let addr = addr?;
                address::check(addr, &self.own)
                    .err()
                    .map(|why| (field, addr, why))
            })
    }

    /// The instance is gone where it came from.
    pub fn forget(&self, service: &str, id: &str) {
        let mut refused = self.refused();
        if !refused.is_empty() {
            refused.remove(&(service.to_string(), id.to_string()));
        }
    }

    /// After a full re-list: only these (service, id) still exist.
    pub fn keep_only(&self, listed: &HashSet<(String, String)>) {
        self.refused().retain(|key, _| listed.contains(key));
    }

    /// What this node refuses now, for the admin API.
    pub fn list(&self) -> Vec<Refusal> {
        self.refused().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Listen;

    fn reg(id: &str, address: &str, sidecar: Option<&str>) -> Registration {
        Registration {
            service: "orders".into(),
            id: id.into(),
            address: address.parse().unwrap(),
            sidecar: sidecar.map(|s| s.parse().unwrap()),
            weight: 1,
            zone: None,
            version: None,
            metadata: Default::default(),
            ttl_secs: 30,
            tls: None,
        }
    }

    fn gate() -> Gate {
        let listen = Listen {
            http: vec!["127.0.0.1:8080".parse().unwrap()],
            tls: Vec::new(),
            admin: "127.0.0.1:9901".parse().unwrap(),
            metrics: None,
            proxy_protocol: Vec::new(),
            trusted_proxies: Vec::new(),
        };
        Gate::new(OwnListeners::new(
            &listen,
            Some("127.0.0.1:9902".parse().unwrap()),
        ))
    }

    fn ids(g: &Gate) -> Vec<(String, &'static str, &'static str)> {
        g.list()
            .into_iter()
            .map(|r| (r.id, r.field, r.reason))
            .collect()
    }

    #[test]
    fn the_address_policy_and_own_listeners_hold_for_address_and_sidecar() {
        let g = gate();
        assert!(g.admit(&reg("ok", "10.0.0.1:8080", None), Source::Etcd));
        assert!(g.admit(
            &reg("ok2", "127.0.0.1:8081", Some("127.0.0.1:15001")),
            Source::Etcd
        ));
        assert!(!g.admit(&reg("self", "127.0.0.1:8080", None), Source::Etcd));
        assert!(!g.admit(&reg("meta", "169.254.169.254:80", None), Source::Snapshot));
        assert!(!g.admit(
            &reg("side", "10.0.0.1:8080", Some("[::ffff:127.0.0.1]:9902")),
            Source::Etcd
        ));
        assert_eq!(
            ids(&g),
            [
                ("meta".into(), "address", "link_local"),
                ("self".into(), "address", "own_listener"),
                ("side".into(), "sidecar", "own_listener"),
            ]
        );
    }

    #[test]
    fn refusals_are_forgotten_when_the_instance_is_gone_or_admitted() {
        let g = gate();
        for id in ["a", "b", "c"] {
            assert!(!g.admit(&reg(id, "0.0.0.0:80", None), Source::Etcd));
        }
        g.forget("orders", "a");
        assert!(g.admit(&reg("b", "10.0.0.2:80", None), Source::Etcd));
        assert_eq!(ids(&g), [("c".into(), "address", "unspecified")]);
        g.keep_only(&HashSet::new());
        assert!(g.list().is_empty());
    }
}
