//! The etcd registry backend.
//!
//! An instance is a key `<prefix><service>/<id>` holding its registration as JSON, bound
//! to a lease whose TTL is the instance's TTL. Registrations and heartbeats on any node
//! write to etcd; every node watches the prefix (resuming from the last revision after a
//! disconnect, re-listing when that revision was compacted) and keeps its local store,
//! hence its routing and snapshot, current. When etcd is unreachable, writes answer 503,
//! routing goes on from memory, and the node says it is degraded.
//!
//! Owns: the etcd client, the lease ids it learns, the watch loop.
//! Must not: be awaited by the request path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::Mutex as AsyncMutex;

use crate::registry::api::{WriteError, Writer};
use crate::registry::store::{Registration, Store, StoreError};

/// Each etcd call gives up after this long; a write then answers 503.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// gRPC keep-alive: etcd refuses pings more often than every 5 s (FIELD-NOTES).
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Pause between reconnection attempts of the watch loop.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// What the watcher and the writer share.
pub struct Etcd {
    endpoints: Vec<String>,
    prefix: String,
    client: AsyncMutex<Option<Client>>,
    /// (service, id) → lease, learned from the watch: a heartbeat on any node finds it here.
    leases: Mutex<HashMap<(String, String), i64>>,
    store: Arc<Store>,
}

fn unavailable(e: impl std::fmt::Display) -> WriteError {
    WriteError::Unavailable(e.to_string())
}

async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, WriteError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("etcd did not answer in time")),
    }
}

impl Etcd {
    pub fn new(endpoints: Vec<String>, prefix: String, store: Arc<Store>) -> Arc<Etcd> {
        Arc::new(Etcd {
            endpoints,
            prefix,
            client: AsyncMutex::new(None),
            leases: Mutex::new(HashMap::new()),
            store,
        })
    }

    fn key(&self, service: &str, id: &str) -> String {
        format!("{}{service}/{id}", self.prefix)
    }

    /// A connected client (connecting on first use; a failed call drops it).
    async fn client(&self) -> Result<Client, WriteError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(KEEPALIVE, CALL_TIMEOUT);
        let c = timed(Client::connect(&self.endpoints, Some(opts))).await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn forget_client(&self) {
        *self.client.lock().await = None;
    }

    fn lease_of(&self, service: &str, id: &str) -> Option<i64> {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(service.to_string(), id.to_string()))
            .copied()
    }

    fn parse(&self, key: &[u8], value: &[u8]) -> Option<Registration> {
        let reg: Registration = serde_json::from_slice(value).ok()?;
        let expected = self.key(&reg.service, &reg.id);
        (expected.as_bytes() == key).then_some(reg)
    }

    /// Lists the prefix and makes the local view match it; returns the revision to watch from.
    async fn relist(&self, client: &mut Client) -> Result<i64, WriteError> {
        let resp =
            timed(client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
        let mut regs = Vec::with_capacity(resp.kvs().len());
        let mut leases = HashMap::new();
        for kv in resp.kvs() {
            match self.parse(kv.key(), kv.value()) {
                Some(r) => {
                    leases.insert((r.service.clone(), r.id.clone()), kv.lease());
                    regs.push(r);
                }
                None => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "ignoring a malformed registry key in etcd")
                }
            }
        }
        *self.leases.lock().unwrap_or_else(|e| e.into_inner()) = leases;
        self.store.replace_external(regs);
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Watches until the stream breaks; returns the revision to resume from, or `None`
    /// when the history was compacted and a re-list is needed.
    async fn watch(
        &self,
        client: &mut Client,
        from: i64,
        shutdown: &mut ShutdownWatch,
    ) -> Option<i64> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_prev_key();
        let mut stream = match timed(client.watch(self.prefix.as_str(), Some(opts))).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("etcd watch not started: {e}");
                return Some(from);
            }
        };
        let mut next = from;
        loop {
            let msg = tokio::select! {
                _ = shutdown.changed() => return Some(next),
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => return Some(next),
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(
                    compacted = resp.compact_revision(),
                    "etcd history compacted: re-listing the registry"
                );
                return None;
            }
            if resp.canceled() {
                return Some(next);
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                next = next.max(kv.mod_revision() + 1);
                match ev.event_type() {
                    EventType::Put => match self.parse(kv.key(), kv.value()) {
                        Some(r) => {
                            self.leases
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert((r.service.clone(), r.id.clone()), kv.lease());
                            self.store.upsert_external(r);
                        }
                        None => {
                            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "ignoring a malformed registry key in etcd")
                        }
                    },
                    EventType::Delete => {
                        let key = String::from_utf8_lossy(kv.key());
                        let Some(rest) = key.strip_prefix(self.prefix.as_str()) else {
                            continue;
                        };
                        let Some((service, id)) = rest.split_once('/') else {
                            continue;
                        };
                        self.leases
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&(service.to_string(), id.to_string()));
                        let _ = self.store.deregister(service, id);
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Writer for Etcd {
    async fn register(&self, reg: Registration) -> Result<(), WriteError> {
        let mut c = self.client().await?;
        let result = async {
            let value = serde_json::to_vec(&reg).map_err(unavailable)?;
            let lease = timed(c.lease_grant(reg.ttl_secs as i64, None)).await?;
            let key = self.key(&reg.service, &reg.id);
            let old = self.lease_of(&reg.service, &reg.id);
            timed(c.put(key, value, Some(PutOptions::new().with_lease(lease.id())))).await?;
            // The key moved to the new lease; the old one would only expire it later.
            if let Some(old) = old.filter(|&o| o != lease.id()) {
                let _ = timed(c.lease_revoke(old)).await;
            }
            self.leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((reg.service.clone(), reg.id.clone()), lease.id());
            // Acknowledged means routable here at once; the watch confirms it everywhere.
            self.store.upsert_external(reg);
            Ok(())
        }
        .await;
        if result.is_err() {
            self.forget_client().await;
        }
        result
    }

    async fn heartbeat(&self, service: &str, id: &str) -> Result<Duration, WriteError> {
        let not_found = || {
            WriteError::NotFound(StoreError::NotFound {
                service: service.to_string(),
                id: id.to_string(),
            })
        };
        let Some(lease) = self.lease_of(service, id) else {
            return Err(not_found());
        };
        let mut c = self.client().await?;
        let result = async {
            let (mut keeper, mut stream) = timed(c.lease_keep_alive(lease)).await?;
            timed(keeper.keep_alive()).await?;
            let resp = timed(stream.message()).await?;
            match resp {
                Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
                _ => Err(not_found()),
            }
        }
        .await;
        if matches!(result, Err(WriteError::Unavailable(_))) {
            self.forget_client().await;
        }
        result
    }

    async fn deregister(&self, service: &str, id: &str) -> Result<(), WriteError> {
        let mut c = self.client().await?;
        let result = async {
            let resp = timed(c.delete(self.key(service, id), None)).await?;
            if let Some(lease) = self.lease_of(service, id) {
                let _ = timed(c.lease_revoke(lease)).await;
            }
            if resp.deleted() == 0 {
                return Err(WriteError::NotFound(StoreError::NotFound {
                    service: service.to_string(),
                    id: id.to_string(),
                }));
            }
            let _ = self.store.deregister(service, id);
            Ok(())
        }
        .await;
        if matches!(result, Err(WriteError::Unavailable(_))) {
            self.forget_client().await;
        }
        result
    }
}

/// The watch loop as a background service: list, watch, resume; degraded while etcd is away.
pub struct EtcdWatch(pub Arc<Etcd>);

#[async_trait]
impl BackgroundService for EtcdWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let etcd = &self.0;
        let mut resume: Option<i64> = None;
        let mut degraded_logged = false;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let attempt = async {
                let mut client = etcd.client().await?;
                let from = match resume {
                    Some(r) => {
                        // Resuming: make sure etcd answers before saying we are caught up.
                        let probe = GetOptions::new().with_prefix().with_count_only();
                        timed(client.get(etcd.prefix.as_str(), Some(probe))).await?;
                        r
                    }
                    None => etcd.relist(&mut client).await? + 1,
                };
                Ok::<_, WriteError>((client, from))
            }
            .await;
            match attempt {
                Ok((mut client, from)) => {
                    if degraded_logged || etcd.store.degraded() {
                        tracing::info!("etcd reachable again: registry catching up");
                        degraded_logged = false;
                    }
                    etcd.store.set_degraded(false);
                    resume = etcd.watch(&mut client, from, &mut shutdown).await;
                    if resume.is_some() {
                        // The stream broke: check etcd is really there before trusting it again.
                        etcd.forget_client().await;
                    }
                }
                Err(e) => {
                    etcd.forget_client().await;
                    etcd.store.set_degraded(true);
                    if !degraded_logged {
                        tracing::warn!("etcd unreachable, routing from memory and snapshot: {e}");
                        degraded_logged = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
        }
    }
}
