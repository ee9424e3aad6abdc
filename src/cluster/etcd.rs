//! The etcd registry backend.
//!
//! An instance is a key `<prefix><service>/<id>` holding its registration as JSON, bound
//! to a lease whose TTL is the instance's TTL. Registrations and heartbeats on any node
//! write to etcd; every node watches the prefix (resuming from the last revision after a
//! disconnect, re-listing when that revision was compacted) and keeps its local store,
//! hence its routing and snapshot, current. What the watch brings passes this node's
//! address policy first (`registry::gate`): a peer checked it against its own listeners.
//! When etcd is unreachable, writes answer 503, routing goes on from memory, and the node
//! says it is degraded.
//!
//! Owns: the etcd client, the lease ids it learns, the watch loop.
//! Must not: be awaited by the request path.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Event, EventType, KeyValue, PutOptions};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::etcd_conn::{self, timed, EtcdConn, Mirror};
use crate::registry::api::{WriteError, Writer};
use crate::registry::gate::{Gate, Source};
use crate::registry::store::{Registration, Store, StoreError};

/// The registry in etcd, mirrored into the node's store.
pub struct Etcd {
    conn: EtcdConn,
    prefix: String,
    /// (service, id) → lease, learned from the watch: a heartbeat on any node finds it here.
    leases: Mutex<HashMap<(String, String), i64>>,
    store: Arc<Store>,
    /// This node's address policy for what peers registered.
    gate: Arc<Gate>,
}

fn unavailable(e: impl std::fmt::Display) -> WriteError {
    WriteError::Unavailable(e.to_string())
}

impl Etcd {
    pub fn new(
        endpoints: Vec<String>,
        prefix: String,
        store: Arc<Store>,
        gate: Arc<Gate>,
    ) -> Arc<Etcd> {
        Arc::new(Etcd {
            conn: EtcdConn::new(endpoints),
            prefix,
            leases: Mutex::new(HashMap::new()),
            store,
            gate,
        })
    }

    fn key(&self, service: &str, id: &str) -> String {
        format!("{}{service}/{id}", self.prefix)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), i64>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lease_of(&self, service: &str, id: &str) -> Option<i64> {
        self.leases()
            .get(&(service.to_string(), id.to_string()))
            .copied()
    }

    fn parse(&self, kv: &KeyValue) -> Option<Registration> {
        let parsed = serde_json::from_slice::<Registration>(kv.value())
            .ok()
            .filter(|r| self.key(&r.service, &r.id).as_bytes() == kv.key());
        if parsed.is_none() {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "ignoring a malformed registry key in etcd");
        }
        parsed
    }
}

impl Mirror for Etcd {
    fn prefix(&self) -> &str {
        &self.prefix
    }

    fn reset(&self, kvs: &[KeyValue]) {
        let mut regs = Vec::with_capacity(kvs.len());
        let mut leases = HashMap::new();
        let mut listed = HashSet::with_capacity(kvs.len());
        for kv in kvs {
            if let Some(r) = self.parse(kv) {
                // A refused instance keeps its lease here: heartbeats through this node
                // still renew it in etcd for the nodes that do route it.
                leases.insert((r.service.clone(), r.id.clone()), kv.lease());
                listed.insert((r.service.clone(), r.id.clone()));
                if self.gate.admit(&r, Source::Etcd) {
                    regs.push(r);
                }
            }
        }
        *self.leases() = leases;
        self.gate.keep_only(&listed);
        self.store.replace_external(regs);
    }

    fn apply(&self, events: &[Event]) {
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    if let Some(r) = self.parse(kv) {
                        self.leases()
                            .insert((r.service.clone(), r.id.clone()), kv.lease());
                        if self.gate.admit(&r, Source::Etcd) {
                            self.store.upsert_external(r);
                        } else {
                            // It moved to a refused address: where it was is stale.
                            let _ = self.store.deregister(&r.service, &r.id);
                        }
                    }
                }
                EventType::Delete => {
                    let key = String::from_utf8_lossy(kv.key());
                    let Some(rest) = key.strip_prefix(self.prefix.as_str()) else {
                        continue;
                    };
                    let Some((service, id)) = rest.split_once('/') else {
                        continue;
                    };
                    self.leases().remove(&(service.to_string(), id.to_string()));
                    self.gate.forget(service, id);
                    let _ = self.store.deregister(service, id);
                }
            }
        }
    }

    fn reachable(&self, up: bool, why: &str) {
        if up {
            if self.store.degraded() {
                tracing::info!("etcd reachable again: registry catching up");
            }
        } else {
            tracing::warn!("etcd unreachable, routing from memory and snapshot: {why}");
        }
        self.store.set_degraded(!up);
    }
}

#[async_trait]
impl Writer for Etcd {
    async fn register(&self, reg: Registration) -> Result<(), WriteError> {
        let value = serde_json::to_vec(&reg).map_err(unavailable)?;
        let key = self.key(&reg.service, &reg.id);
        let ttl = reg.ttl_secs as i64;
        let old = self.lease_of(&reg.service, &reg.id);
        let lease = self
            .conn
            .run(|mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    let lease = timed(c.lease_grant(ttl, None)).await?.id();
                    timed(c.put(key, value, Some(PutOptions::new().with_lease(lease)))).await?;
                    // The key moved to the new lease; the old one would only expire it later.
                    if let Some(old) = old.filter(|&o| o != lease) {
                        let _ = timed(c.lease_revoke(old)).await;
                    }
                    Ok(lease)
                }
            })
            .await
            .map_err(unavailable)?;
        self.leases()
            .insert((reg.service.clone(), reg.id.clone()), lease);
        // Acknowledged means routable here at once; the watch confirms it everywhere.
        self.store.upsert_external(reg);
        Ok(())
    }

    async fn heartbeat(&self, service: &str, id: &str) -> Result<Duration, WriteError> {
        let known = self.lease_of(service, id);
        let key = self.key(service, id);
        let ttl = self
            .conn
            .run(|mut c| {
                let key = key.clone();
                async move {
                    // A node that has not seen the key (started while etcd was away, or
                    // its watch is behind) asks etcd: the instance may well be registered.
                    let lease = match known {
                        Some(lease) => lease,
                        None => match timed(c.get(key, None)).await?.kvs().first() {
                            Some(kv) if kv.lease() != 0 => kv.lease(),
                            _ => return Ok(0),
                        },
                    };
                    let (mut keeper, mut stream) = timed(c.lease_keep_alive(lease)).await?;
                    timed(keeper.keep_alive()).await?;
                    Ok(timed(stream.message()).await?.map_or(0, |r| r.ttl()))
                }
            })
            .await
            .map_err(unavailable)?;
        if ttl > 0 {
            Ok(Duration::from_secs(ttl as u64))
        } else {
            Err(not_found(service, id))
        }
    }

    async fn deregister(&self, service: &str, id: &str) -> Result<(), WriteError> {
        let key = self.key(service, id);
        let lease = self.lease_of(service, id);
        let deleted = self
            .conn
            .run(|mut c| {
                let key = key.clone();
                async move {
                    let resp = timed(c.delete(key, None)).await?;
                    if let Some(lease) = lease {
                        let _ = timed(c.lease_revoke(lease)).await;
                    }
                    Ok(resp.deleted())
                }
            })
            .await
            .map_err(unavailable)?;
        if deleted == 0 {
            return Err(not_found(service, id));
        }
        let _ = self.store.deregister(service, id);
        Ok(())
    }
}

fn not_found(service: &str, id: &str) -> WriteError {
    WriteError::NotFound(StoreError::NotFound {
        service: service.to_string(),
        id: id.to_string(),
    })
}

/// The watch loop as a background service: list, watch, resume; degraded while etcd is away.
pub struct EtcdWatch(pub Arc<Etcd>);

#[async_trait]
impl BackgroundService for EtcdWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        etcd_conn::mirror(&self.0.conn, &*self.0, &mut shutdown).await;
    }
}
