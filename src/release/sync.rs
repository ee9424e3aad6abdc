//! Release overrides shared through etcd: `<releases prefix><route>` holds a route's
//! override as JSON. An admin change on any node writes there; every node watches the
//! prefix and applies what it sees, so a change takes effect cluster-wide. At start and
//! after a lost watch, a node re-lists the prefix: etcd's overrides replace its own.
//!
//! Owns: the etcd client for releases and the watch loop.
//! Must not: be awaited by the request path.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::Mutex as AsyncMutex;

use super::ReleaseError;
use crate::config::SplitConfig;
use crate::snapshot::State;

/// Each etcd call gives up after this long; an admin change then answers 503.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// gRPC keep-alive: etcd refuses pings more often than every 5 s.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Pause between reconnection attempts of the watch loop.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Where release overrides live, beside the registry's instances: `/busbar/services/`
/// gives `/busbar/releases/`; a prefix not ending in `services/` gets `-releases/`
/// appended to it (outside the registry's prefix, so its watch never sees them).
pub fn releases_prefix(registry_prefix: &str) -> String {
    match registry_prefix.strip_suffix("services/") {
        Some(parent) if parent.is_empty() || parent.ends_with('/') => format!("{parent}releases/"),
        _ => format!("{}-releases/", registry_prefix.trim_end_matches('/')),
    }
}

fn unavailable(e: impl std::fmt::Display) -> ReleaseError {
    ReleaseError::Unavailable(e.to_string())
}

async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ReleaseError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("etcd did not answer in time")),
    }
}

pub struct ReleaseEtcd {
    endpoints: Vec<String>,
    pub prefix: String,
    client: AsyncMutex<Option<Client>>,
}

impl ReleaseEtcd {
    pub fn new(endpoints: Vec<String>, prefix: String) -> ReleaseEtcd {
        ReleaseEtcd {
            endpoints,
            prefix,
            client: AsyncMutex::new(None),
        }
    }

    async fn client(&self) -> Result<Client, ReleaseError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(KEEPALIVE, CALL_TIMEOUT);
        let c = timed(Client::connect(&self.endpoints, Some(opts))).await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn forget_client(&self) {
        *self.client.lock().await = None;
    }

    /// Writes (or, with `None`, deletes) a route's override.
    pub async fn write(
        &self,
        route: &str,
        split: Option<&SplitConfig>,
    ) -> Result<(), ReleaseError> {
        let mut c = self.client().await?;
        let key = format!("{}{route}", self.prefix);
        let result = match split {
            Some(s) => timed(c.put(key, s.to_json().to_string(), None))
                .await
                .map(|_| ()),
            None => timed(c.delete(key, None)).await.map(|_| ()),
        };
        if result.is_err() {
            self.forget_client().await;
        }
        result
    }

    fn parse(&self, key: &[u8], value: &[u8]) -> Option<(String, SplitConfig)> {
        let route = std::str::from_utf8(key)
            .ok()?
            .strip_prefix(self.prefix.as_str())?;
        match crate::config::parse_split_json(value) {
            Ok(s) => Some((route.to_string(), s)),
            Err(e) => {
                tracing::warn!(route, "ignoring an invalid release override in etcd: {e}");
                None
            }
        }
    }

    /// Lists the prefix and makes this node's overrides match; returns the revision.
    async fn relist(&self, state: &State, client: &mut Client) -> Result<i64, ReleaseError> {
        let resp =
            timed(client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
        let all: Vec<_> = resp
            .kvs()
            .iter()
            .filter_map(|kv| self.parse(kv.key(), kv.value()))
            .map(|(r, s)| (r, Some(s)))
            .collect();
        super::apply_local(state, &all, true, "cluster");
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Watches until the stream breaks; `None` when a re-list is needed.
    async fn watch(
        &self,
        state: &State,
        client: &mut Client,
        from: i64,
        shutdown: &mut ShutdownWatch,
    ) -> Option<i64> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = match timed(client.watch(self.prefix.as_str(), Some(opts))).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("etcd release watch not started: {e}");
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
                return None;
            }
            if resp.canceled() {
                return Some(next);
            }
            let mut changes = Vec::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                next = next.max(kv.mod_revision() + 1);
                match ev.event_type() {
                    EventType::Put => {
                        if let Some((r, s)) = self.parse(kv.key(), kv.value()) {
                            changes.push((r, Some(s)));
                        }
                    }
                    EventType::Delete => {
                        let key = String::from_utf8_lossy(kv.key());
                        if let Some(r) = key.strip_prefix(self.prefix.as_str()) {
                            changes.push((r.to_string(), None));
                        }
                    }
                }
            }
            super::apply_local(state, &changes, false, "cluster");
        }
    }
}

/// The release watch as a background service; idle without etcd.
pub struct ReleaseSync {
    pub state: Arc<State>,
}

#[async_trait]
impl BackgroundService for ReleaseSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(etcd) = self.state.releases.cluster.clone() else {
            return;
        };
        let mut resume: Option<i64> = None;
        let mut logged = false;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let attempt = async {
                let mut client = etcd.client().await?;
                let from = match resume {
                    Some(r) => r,
                    None => etcd.relist(&self.state, &mut client).await? + 1,
                };
                Ok::<_, ReleaseError>((client, from))
            }
            .await;
            match attempt {
                Ok((mut client, from)) => {
                    logged = false;
                    resume = etcd
                        .watch(&self.state, &mut client, from, &mut shutdown)
                        .await;
                    if resume.is_some() {
                        etcd.forget_client().await;
                    }
                }
                Err(e) => {
                    etcd.forget_client().await;
                    if !logged {
                        tracing::warn!(
                            "etcd unreachable: release overrides stay as they are here: {e}"
                        );
                        logged = true;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_sit_beside_the_registry() {
        assert_eq!(releases_prefix("/busbar/services/"), "/busbar/releases/");
        assert_eq!(
            releases_prefix("/busbar-test/services/"),
            "/busbar-test/releases/"
        );
        assert_eq!(releases_prefix("services/"), "releases/");
        assert_eq!(releases_prefix("/x/"), "/x-releases/");
        assert_eq!(releases_prefix("/myservices/"), "/myservices-releases/");
    }
}
